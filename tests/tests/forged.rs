//! Forged messages end to end (issue 19): the rows of the table in the reliability guide
//! (`docs/src/guide/reliability.md`), published by a scripted attacker onto a running fleet of
//! real edge clients (EfficientNet-Lite0 trunk, LoRA, updates in 4 chunks), over the
//! aggregator's embedded rumqttd and over Mosquitto; and a delivery larger than the
//! aggregator's packet limit, which Mosquitto lets through.
//!
//! The table: the same federation runs undisturbed, then with an attacker that, in round 2,
//! publishes on the fleet's update topics
//! - as round 2 is announced: 1 000 random bytes on client-01's topic, and replays of every
//!   client's round-1 update (all its chunks, captured from `update/+`) on its own topic;
//! - as soon as the first round-2 update (client A's) is whole, on the topic of client-03,
//!   which has not answered yet (it holds 20 × the examples, so it trains last): A's chunks;
//!   A's chunks with one bit of the first altered (each sealed again, so only the chunks'
//!   CRC-32C of the whole payload can tell); A's first chunk cut in half (the packet, so its
//!   envelope's checksum fails); A's first chunk with its data cut in half (sealed again, so
//!   the chunk's length is what is wrong); and on A's own topic, A's chunks again.
//!
//! Each must be refused with its row's reason, named in the aggregator's log and counted in
//! the report, before round 2 closes; every round must still be `ok` with all four clients
//! and none failed, nothing refused as `late`, and the final global adapter (the aggregator's
//! `global-adapter.bin`) must be the undisturbed run's, bit for bit. Runs with the same seed
//! are bit-identical (each client trains on one thread from cached activations, and FedAvg sums
//! exactly: undisturbed runs over either broker end with the same bytes), so any difference is
//! the attack's.
//!
//! Against the code before issue 19 (205665d), which counted a client failed when an update on
//! its topic for the open round was refused (unless a duplicate, or the client had already been
//! accepted), the random bytes, the copy and each cut or altered chunk fail this test on their
//! own. The random bytes made client-01 "fail" as round 2 opened; its real update was then
//! accepted too, so the round counted five replies from four clients and closed as soon as
//! client-00..02 had answered, dropping client-03's honest update as `late` (clients_failed 1,
//! a `late` refusal, another global adapter). Each forgery on client-03's topic did the same to
//! client-03 before it answered. The old reassembler also keyed chunks by topic and message id
//! alone, and client-03's own update reuses the message id of A's (every client numbers its
//! chunked payloads from 0), so a forged chunk still held there would have spoiled it. The
//! replays were refused harmlessly before too (as duplicates); here their counting is checked.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use fedpeft_protocol::checksum::crc32c;
use fedpeft_protocol::{
    DecodeError, Envelope, Message, Reassembler, ReassemblyError, ReassemblyLimits, SplitMix64,
    Topic, TopicKind,
};
use fedpeft_tests::e2e::{Federation, round_record};
use fedpeft_tests::{Mosquitto, Proc, free_port};

const RUN: u64 = 19;
const FLEET: &str = "forged";
const CLIENTS: usize = 4;
const ROUNDS: u32 = 3;
/// Below the LoRA adapter's f32 size (25,610 values ≈ 102 KB): every update and global
/// adapter travels in 4 chunks.
const MAX_PACKET: usize = 32_768;
/// Examples of each client, and of the slow one: it trains last in every round, which leaves
/// the attacker the time to act on the first update of round 2 before the round can close.
const EXAMPLES: usize = 64;
const SLOW: usize = 3;
const SLOW_EXAMPLES: usize = 1280;

fn client(i: usize) -> String {
    format!("client-{i:02}")
}

/// The reason the aggregator's decoder gives for bytes that are not an envelope
/// (`aggregator/src/wire.rs`), and a piece of its detail.
fn decode_refusal(bytes: &[u8]) -> (&'static str, &'static str) {
    match Envelope::decode(bytes) {
        Err(DecodeError::UnsupportedVersion { .. }) => ("wrong_version", "protocol version"),
        Err(DecodeError::CrcMismatch { .. }) => ("bad_checksum", "checksum mismatch"),
        Err(_) => ("malformed", ""),
        Ok(e) => panic!("forged bytes decode as a {}", e.kind()),
    }
}

/// One forged publish and the refusal it must cause.
#[derive(Debug, Clone)]
struct Forgery {
    row: &'static str,
    /// The client whose update topic it went to.
    topic: String,
    /// The round the refusal names, where the bytes say it.
    round: Option<u32>,
    reason: &'static str,
    /// Part of the refusal's detail, where the reason alone does not tell rows apart.
    detail: String,
}

/// What the attacker saw and did.
#[derive(Debug, Default)]
struct Attack {
    /// The newest round announced.
    announced: u32,
    /// The first whole update each client published for each round: the packets that carried
    /// it, as they were published.
    captured: BTreeMap<(String, u32), Vec<Vec<u8>>>,
    /// Packets of chunked updates not yet whole, by (topic's client, message id, CRC).
    partial: BTreeMap<(String, u32, u32), Vec<Vec<u8>>>,
    forgeries: Vec<Forgery>,
    /// What the attacker could not do (a capture it needed was missing).
    problems: Vec<String>,
}

/// A scripted MQTT client that captures the fleet's updates and publishes forgeries of them.
struct Attacker {
    state: Arc<Mutex<Attack>>,
    stop: Arc<AtomicBool>,
    mqtt: rumqttc::Client,
    thread: thread::JoinHandle<()>,
}

impl Attacker {
    /// Connects to `127.0.0.1:port`; returns once it is subscribed to the fleet's update and
    /// round topics.
    fn start(port: u16, fleet: &str) -> Attacker {
        let mut opts = rumqttc::MqttOptions::new(format!("forger-{port}"), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(MAX_PACKET + 1024, MAX_PACKET + 1024);
        let (mqtt, mut connection) = rumqttc::Client::new(opts, 1024);
        let base = format!("fedpeft/v1/{fleet}");
        mqtt.subscribe_many(["update/+", "round"].map(|t| {
            rumqttc::SubscribeFilter::new(format!("{base}/{t}"), rumqttc::QoS::AtLeastOnce)
        }))
        .expect("queue the attacker's subscription");
        let state = Arc::new(Mutex::new(Attack::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (state, stop, publisher) = (state.clone(), stop.clone(), mqtt.clone());
            thread::spawn(move || {
                let mut reassembler = Reassembler::new(ReassemblyLimits::default());
                for event in connection.iter() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match event {
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                            let _ = ready_tx.send(());
                        }
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                            let mut attack = state.lock().expect("attack lock");
                            let send = |topic_client: &str, payload: Vec<u8>| {
                                publisher
                                    .publish(
                                        format!("{base}/update/{topic_client}"),
                                        rumqttc::QoS::AtLeastOnce,
                                        false,
                                        payload,
                                    )
                                    .expect("queue a forged publish");
                            };
                            attack.on_publish(&mut reassembler, &p.topic, &p.payload, send);
                        }
                        Ok(_) => {}
                        Err(_) => thread::sleep(Duration::from_millis(100)),
                    }
                }
            })
        };
        ready_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the attacker's subscription was not acknowledged within 20 s");
        Attacker {
            state,
            stop,
            mqtt,
            thread,
        }
    }

    /// Disconnects; returns what it saw and did.
    fn finish(self) -> Attack {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.mqtt.disconnect();
        let _ = self.thread.join();
        std::mem::take(&mut *self.state.lock().expect("attack lock"))
    }
}

impl Attack {
    fn on_publish(
        &mut self,
        reassembler: &mut Reassembler<(String, u32, u32)>,
        topic: &str,
        payload: &[u8],
        send: impl Fn(&str, Vec<u8>),
    ) {
        let Ok(parsed) = Topic::parse(topic) else {
            return;
        };
        // The attacker's own forgeries come back too: they do not decode, name another client
        // or round, or repeat a capture, and are skipped below.
        let Ok(env) = Envelope::decode(payload) else {
            return;
        };
        if env.run_id != RUN {
            return;
        }
        match (parsed.kind, env.message) {
            (TopicKind::Round, Message::RoundAnnounce(a))
                if a.round > self.announced && !a.is_run_done() =>
            {
                self.announced = a.round;
                if a.round == 2 {
                    self.round_two_starts(&send);
                }
            }
            (TopicKind::Update(c), Message::Chunk(chunk)) => {
                let key = (c.as_str().to_string(), chunk.message_id, chunk.crc32);
                match reassembler.push(key.clone(), chunk, 0) {
                    Ok(None) => self.partial.entry(key).or_default().push(payload.to_vec()),
                    Ok(Some(whole)) => {
                        let mut packets = self.partial.remove(&key).unwrap_or_default();
                        packets.push(payload.to_vec());
                        self.whole_update(c.as_str(), &whole, packets, &send);
                    }
                    Err(ReassemblyError::CrcMismatch { .. }) => {
                        self.partial.remove(&key);
                    }
                    Err(_) => {}
                }
            }
            (TopicKind::Update(c), Message::ClientUpdate(_)) => {
                self.whole_update(c.as_str(), payload, vec![payload.to_vec()], &send);
            }
            _ => {}
        }
    }

    /// A whole update on `topic_client`'s topic, carried by `packets`.
    fn whole_update(
        &mut self,
        topic_client: &str,
        whole: &[u8],
        packets: Vec<Vec<u8>>,
        send: &impl Fn(&str, Vec<u8>),
    ) {
        let Ok(Envelope {
            message: Message::ClientUpdate(u),
            ..
        }) = Envelope::decode(whole)
        else {
            return;
        };
        let key = (topic_client.to_string(), u.round);
        if u.client.as_str() != topic_client || self.captured.contains_key(&key) {
            return;
        }
        let first_of_round_two =
            u.round == 2 && !self.captured.keys().any(|(_, round)| *round == 2);
        self.captured.insert(key, packets);
        if first_of_round_two {
            self.first_update_of_round_two(topic_client, send);
        }
    }

    /// Round 2 is announced: random bytes, and replays of round 1.
    fn round_two_starts(&mut self, send: &impl Fn(&str, Vec<u8>)) {
        let mut rng = SplitMix64::new(RUN);
        let random: Vec<u8> = (0..1000).map(|_| rng.next_u64() as u8).collect();
        let (reason, detail) = decode_refusal(&random);
        self.forge(
            send,
            vec![random],
            Forgery::new("random bytes", &client(1), None, reason, detail),
        );
        for i in 0..CLIENTS {
            let Some(packets) = self.captured.get(&(client(i), 1)).cloned() else {
                self.problems
                    .push(format!("no round-1 update of {} captured", client(i)));
                continue;
            };
            self.forge(
                send,
                packets,
                Forgery::new(
                    "replay of an earlier round",
                    &client(i),
                    Some(1),
                    "duplicate",
                    "already accepted",
                ),
            );
        }
    }

    /// Client `a`'s update is the first of round 2: copied, altered and cut onto the topic of a
    /// client that has not answered (the slow one), and replayed on its own.
    fn first_update_of_round_two(&mut self, a: &str, send: &impl Fn(&str, Vec<u8>)) {
        let packets = self.captured[&(a.to_string(), 2)].clone();
        let b = (0..CLIENTS)
            .map(client)
            .filter(|c| c != a && !self.captured.contains_key(&(c.clone(), 2)))
            .max()
            .expect("a client that has not answered round 2");
        let first = match Envelope::decode(&packets[0]).map(|e| e.message) {
            Ok(Message::Chunk(c)) => c,
            other => {
                self.problems
                    .push(format!("{a}'s round-2 update is not chunked: {other:?}"));
                return;
            }
        };
        self.forge(
            send,
            packets.clone(),
            Forgery::new(
                "another client's update",
                &b,
                Some(2),
                "client_mismatch",
                &format!("body names client `{a}`"),
            ),
        );
        // All of A's chunks, the first with one bit flipped and sealed again: every envelope
        // is sound, only the chunks' CRC-32C of the whole payload can tell.
        let mut altered = first.clone();
        altered.data[7] ^= 0x40;
        let mut with_altered = packets.clone();
        with_altered[0] = Envelope::new(RUN, 2, altered).encode().unwrap();
        self.forge(
            send,
            with_altered,
            Forgery::new(
                "altered chunk",
                &b,
                Some(2),
                "bad_checksum",
                "reassembled with CRC",
            ),
        );
        let cut = packets[0][..packets[0].len() / 2].to_vec();
        let (reason, detail) = decode_refusal(&cut);
        self.forge(
            send,
            vec![cut],
            Forgery::new("truncated chunk", &b, Some(2), reason, detail),
        );
        let mut short = first;
        short.data.truncate(short.data.len() / 2);
        let short = Envelope::new(RUN, 2, short).encode().unwrap();
        self.forge(
            send,
            vec![short],
            Forgery::new(
                "chunk with its data cut short",
                &b,
                Some(2),
                "malformed",
                "expected",
            ),
        );
        self.forge(
            send,
            packets,
            Forgery::new(
                "replay of this round's accepted update",
                a,
                Some(2),
                "duplicate",
                "already accepted",
            ),
        );
    }

    /// Publishes `packets` on the update topic of `expect.topic` and records the refusal they
    /// must cause.
    fn forge(&mut self, send: &impl Fn(&str, Vec<u8>), packets: Vec<Vec<u8>>, expect: Forgery) {
        for p in packets {
            send(&expect.topic, p);
        }
        self.forgeries.push(expect);
    }
}

impl Forgery {
    fn new(
        row: &'static str,
        topic: &str,
        round: Option<u32>,
        reason: &'static str,
        detail: &str,
    ) -> Forgery {
        Forgery {
            row,
            topic: topic.to_string(),
            round,
            reason,
            detail: detail.to_string(),
        }
    }
}

/// The broker a federation runs on: the aggregator's embedded one, or a Mosquitto of its own
/// (a fresh one per run: the undisturbed run's retained messages must not reach the next).
enum Broker {
    Embedded { port: u16 },
    Mosquitto(Mosquitto),
}

impl Broker {
    fn start(mosquitto: bool) -> Broker {
        if mosquitto {
            Broker::Mosquitto(Mosquitto::start((MAX_PACKET + 4096) as u32))
        } else {
            Broker::Embedded { port: free_port() }
        }
    }

    fn port(&self) -> u16 {
        match self {
            Broker::Embedded { port } => *port,
            Broker::Mosquitto(m) => m.port,
        }
    }

    /// `broker.url` of the aggregator's config.
    fn config_url(&self) -> String {
        match self {
            Broker::Embedded { .. } => "embedded".into(),
            Broker::Mosquitto(m) => m.url(),
        }
    }
}

/// What a federation left.
struct Outcome {
    report: serde_json::Value,
    /// The final global adapter, as the aggregator saved it.
    global: Vec<u8>,
    /// The aggregator's output.
    log: Vec<String>,
}

/// Runs the federation to the end, attacked or not.
fn federate(dir: &Path, mosquitto: bool, attacked: bool) -> (Outcome, Option<Attack>) {
    let broker = Broker::start(mosquitto);
    let fed = Federation {
        fleet: FLEET.into(),
        run_id: RUN,
        max_packet: MAX_PACKET,
        dir: dir.to_path_buf(),
        clients: CLIENTS,
        max_examples: EXAMPLES,
    };
    std::fs::create_dir_all(dir).expect("federation folder");
    let top = format!("min_clients = {CLIENTS}\nquorum = 2\nround_timeout_secs = 120.0");
    let config = fed.aggregator_config(&broker.config_url(), broker.port(), ROUNDS, &top, "");
    let name = if attacked { "attacked" } else { "undisturbed" };
    let mut aggregator = fed.start_aggregator(&config, &format!("aggregator-{name}"));
    let attacker = attacked.then(|| Attacker::start(broker.port(), FLEET));
    let url = format!("mqtt://127.0.0.1:{}", broker.port());
    let slow = Federation {
        max_examples: SLOW_EXAMPLES,
        ..fed.clone()
    };
    let mut clients: Vec<Proc> = (0..CLIENTS)
        .map(|i| {
            if i == SLOW {
                slow.spawn_client(&url, i)
            } else {
                fed.spawn_client(&url, i)
            }
        })
        .collect();
    let status = aggregator
        .wait_exit(Duration::from_secs(600))
        .unwrap_or_else(|| panic!("{name}: the aggregator did not finish"));
    assert!(
        status.success(),
        "{name}: the aggregator exited with {status}"
    );
    for c in &mut clients {
        let s = c
            .wait_exit(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("{name}: {} did not exit after the run", c.name));
        assert!(s.success(), "{name}: {} exited with {s}", c.name);
    }
    let attack = attacker.map(Attacker::finish);
    let global_path = fed.out().join("global-adapter.bin");
    let global =
        std::fs::read(&global_path).unwrap_or_else(|e| panic!("{}: {e}", global_path.display()));
    let outcome = Outcome {
        report: fed.report(),
        global,
        log: aggregator.output(),
    };
    (outcome, attack)
}

/// A refusal as the aggregator logged it: `update rejected client=… round=… reason=…
/// detail=… signed=…`.
#[derive(Debug, Clone, PartialEq)]
struct Refusal {
    line: usize,
    client: String,
    round: u32,
    reason: String,
    detail: String,
}

fn field<'a>(line: &'a str, name: &str, end: &str) -> &'a str {
    let start = line
        .find(&format!(" {name}="))
        .unwrap_or_else(|| panic!("no {name}= in {line}"))
        + name.len()
        + 2;
    let rest = &line[start..];
    &rest[..rest.find(end).unwrap_or(rest.len())]
}

fn refusals(log: &[String]) -> Vec<Refusal> {
    log.iter()
        .enumerate()
        .filter(|(_, l)| l.contains("update rejected"))
        .map(|(line, l)| Refusal {
            line,
            client: field(l, "client", " ").to_string(),
            round: field(l, "round", " ").parse().expect("a round number"),
            reason: field(l, "reason", " ").to_string(),
            detail: field(l, "detail", " signed=").to_string(),
        })
        .collect()
}

/// The first line of `log` containing every one of `needles`.
fn line_of(log: &[String], needles: &[&str]) -> usize {
    log.iter()
        .position(|l| needles.iter().all(|n| l.contains(n)))
        .unwrap_or_else(|| panic!("no line of the aggregator's log contains {needles:?}"))
}

/// Counts by reason, as the report writes them.
fn by_reason<'a>(reasons: impl Iterator<Item = &'a str>) -> serde_json::Value {
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    for r in reasons {
        *counts.entry(r).or_default() += 1;
    }
    serde_json::to_value(counts).expect("counts as JSON")
}

fn every_row_of_the_table(mosquitto: bool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (clean, _) = federate(&dir.path().join("undisturbed"), mosquitto, false);
    let (attacked, attack) = federate(&dir.path().join("attacked"), mosquitto, true);
    let attack = attack.expect("the attacked run's record");
    assert!(attack.problems.is_empty(), "{:?}", attack.problems);

    // The updates were chunked: every captured update came in several packets.
    for round in 1..=ROUNDS {
        for i in 0..CLIENTS {
            let packets = attack
                .captured
                .get(&(client(i), round))
                .unwrap_or_else(|| panic!("no round-{round} update of {} seen", client(i)));
            assert!(
                packets.len() >= 2,
                "{}'s round-{round} update came in {} packet(s), not chunks",
                client(i),
                packets.len()
            );
        }
    }

    // Every round aggregated all four clients, nobody counted failed, in both runs.
    for (name, outcome) in [("undisturbed", &clean), ("attacked", &attacked)] {
        for r in 1..=ROUNDS {
            let rec = round_record(&outcome.report, r);
            assert_eq!(rec["status"], "ok", "{name} round {r}: {rec}");
            assert_eq!(rec["clients_ok"], CLIENTS, "{name} round {r}: {rec}");
            assert_eq!(rec["clients_failed"], 0, "{name} round {r}: {rec}");
            assert_eq!(
                rec["failed_clients"],
                serde_json::json!({}),
                "{name} round {r}"
            );
        }
    }
    assert_eq!(clean.report["rejected"], serde_json::json!({}));

    // Each forgery was refused once, with its row's reason, naming its topic's client, while
    // round 2 was open and before the slow client answered it: the attack hit the window in
    // which the old code let a refusal close the round early.
    let mut logged = refusals(&attacked.log);
    eprintln!("forgeries: {:#?}\nrefusals: {logged:#?}", attack.forgeries);
    assert_eq!(
        logged.len(),
        attack.forgeries.len(),
        "one refusal per forgery, and no other refusal"
    );
    let slow_answered = line_of(
        &attacked.log,
        &[
            "update accepted",
            &format!("client={} ", client(SLOW)),
            "round=2 ",
        ],
    );
    for f in &attack.forgeries {
        let at = logged
            .iter()
            .position(|r| {
                r.client == f.topic
                    && r.reason == f.reason
                    && f.round.is_none_or(|round| r.round == round)
                    && r.detail.contains(&f.detail)
            })
            .unwrap_or_else(|| {
                panic!(
                    "row `{}`: no refusal of {} as {} (round {:?}, detail containing {:?}) \
                     left among {logged:#?}",
                    f.row, f.topic, f.reason, f.round, f.detail
                )
            });
        let r = logged.remove(at);
        assert!(
            r.line < slow_answered,
            "row `{}` was refused after {} answered round 2 (line {} > {slow_answered}): \
             the test missed its window",
            f.row,
            client(SLOW),
            r.line
        );
    }

    // Counted by reason: all in round 2, and the run's totals the same.
    let expected = by_reason(attack.forgeries.iter().map(|f| f.reason));
    assert_eq!(round_record(&attacked.report, 2)["rejected"], expected);
    for r in [1, 3] {
        let rec = round_record(&attacked.report, r);
        assert_eq!(rec["rejected"], serde_json::json!({}), "round {r}: {rec}");
    }
    assert_eq!(attacked.report["rejected"], expected);
    assert!(
        attacked.report["rejected"].get("late").is_none(),
        "no update was refused as late"
    );

    // The attack changed nothing: the same final global adapter, bit for bit.
    eprintln!(
        "final global adapter: undisturbed {} B, CRC-32C {:#010x}; attacked {} B, CRC-32C {:#010x}",
        clean.global.len(),
        crc32c(&clean.global),
        attacked.global.len(),
        crc32c(&attacked.global)
    );
    assert!(
        clean.global == attacked.global,
        "the attacked run's final global adapter differs from the undisturbed run's \
         ({} and {} bytes); eval accuracy per round: undisturbed {:?}, attacked {:?}",
        clean.global.len(),
        attacked.global.len(),
        (0..=ROUNDS)
            .map(|r| round_record(&clean.report, r)["eval_accuracy"].clone())
            .collect::<Vec<_>>(),
        (0..=ROUNDS)
            .map(|r| round_record(&attacked.report, r)["eval_accuracy"].clone())
            .collect::<Vec<_>>(),
    );
}

#[test]
fn every_row_of_the_table_is_refused_and_counted_over_the_embedded_broker_and_the_global_is_unchanged()
 {
    every_row_of_the_table(false);
}

#[test]
fn every_row_of_the_table_is_refused_and_counted_over_mosquitto_and_the_global_is_unchanged() {
    every_row_of_the_table(true);
}

/// Publishes `bytes` of zeros as a QoS 1 update of `client` in `fleet` (retained or not) on its
/// own connection, and returns once the broker has acknowledged it.
fn poison(port: u16, fleet: &str, client: &str, bytes: usize, retain: bool) {
    let mut opts = rumqttc::MqttOptions::new(format!("poisoner-{port}"), "127.0.0.1", port);
    opts.set_max_packet_size(4096, bytes + 4096);
    let (mqtt, mut connection) = rumqttc::Client::new(opts, 16);
    mqtt.publish(
        format!("fedpeft/v1/{fleet}/update/{client}"),
        rumqttc::QoS::AtLeastOnce,
        retain,
        vec![0u8; bytes],
    )
    .expect("queue the oversized publish");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for event in connection.iter() {
        match event {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => break,
            Ok(_) => {}
            Err(e) => panic!("the poisoner's connection failed: {e}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the broker did not acknowledge the poison within 20 s"
        );
    }
    let _ = mqtt.disconnect();
    for event in connection.iter() {
        if event.is_err() {
            break;
        }
    }
}

/// One run of a 3-client federation on `broker`; with `poison_in_round_2`, 3 rounds, and the
/// 5 MiB poison published on client-00's update topic once round 2 is open; else 2 quick rounds.
fn poisoned_run(
    dir: &Path,
    broker: &Mosquitto,
    run_id: u64,
    poison_in_round_2: bool,
) -> Vec<String> {
    let fed = Federation {
        fleet: "poisoned".into(),
        run_id,
        max_packet: 65_536,
        dir: dir.to_path_buf(),
        clients: 3,
        max_examples: EXAMPLES,
    };
    std::fs::create_dir_all(dir).expect("run folder");
    let top = "min_clients = 3\nquorum = 2\nround_timeout_secs = 60.0";
    // Poisoned: every client holds its finished update for 4 s (the straggler fault), so no
    // update is in flight while the aggregator reconnects (half a second after the poison),
    // since a clean session loses what was queued for it. How long training takes on this
    // machine does not matter (on a fast one, 25 epochs took 0.4 s: an update was lost).
    let (rounds, extra): (u32, &[&str]) = if poison_in_round_2 {
        (3, &["--straggle-secs", "4"])
    } else {
        (2, &[])
    };
    let config = fed.aggregator_config(&broker.url(), broker.port, rounds, top, "epochs = 1");
    let name = format!("aggregator-run-{run_id}");
    let mut aggregator = fed.start_aggregator(&config, &name);
    let mut clients: Vec<Proc> = (0..fed.clients)
        .map(|i| fed.spawn_client_with(&broker.url(), i, extra))
        .collect();
    if poison_in_round_2 {
        aggregator
            .wait_for_line("round started round=2", Duration::from_secs(300))
            .expect("round 2 started");
        poison(broker.port, &fed.fleet, "client-00", POISON_BYTES, false);
    }
    let status = aggregator
        .wait_exit(Duration::from_secs(300))
        .unwrap_or_else(|| panic!("{name} did not finish"));
    assert!(status.success(), "{name} exited with {status}");
    for c in &mut clients {
        let s = c
            .wait_exit(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("{} did not exit after run {run_id}", c.name));
        assert!(s.success(), "{} exited with {s}", c.name);
    }
    let report = fed.report();
    assert_eq!(report["finished"], true, "run {run_id}: {report}");
    for r in 1..=rounds {
        let rec = round_record(&report, r);
        assert_eq!(rec["status"], "ok", "run {run_id} round {r}: {rec}");
        assert_eq!(
            rec["clients_ok"], fed.clients,
            "run {run_id} round {r}: {rec}"
        );
        assert_eq!(rec["clients_failed"], 0, "run {run_id} round {r}: {rec}");
    }
    aggregator.output()
}

/// 5 MiB: more than the aggregator's 64 KiB packet limit, less than this Mosquitto's.
const POISON_BYTES: usize = 5 << 20;

/// Before issue 19 the aggregator's session was persistent under one client id for every run:
/// a delivery it could not read (over its packet limit, which Mosquitto does not know) was
/// never acknowledged, so the broker handed it over again on every reconnect: the run stalled
/// for good, and so did every later run on that broker, which resumed the same session.
#[test]
fn a_delivery_over_the_packet_limit_is_dropped_and_the_next_run_on_that_mosquitto_finishes() {
    let broker = Mosquitto::start(8 << 20);
    let dir = tempfile::tempdir().expect("temp dir");
    let log = poisoned_run(&dir.path().join("run-1"), &broker, 1, true);
    let warning = log
        .iter()
        .find(|l| l.contains("dropped a delivery over broker.max_packet_bytes"))
        .expect("the aggregator warned that it dropped the oversized delivery");
    let bytes: usize = field(warning, "bytes", " ").parse().expect("bytes=N");
    assert!(bytes >= POISON_BYTES, "{warning}");
    // Poisoned again while no aggregator is connected: a session left behind would hold it.
    poison(broker.port, "poisoned", "client-00", POISON_BYTES, false);
    let log = poisoned_run(&dir.path().join("run-2"), &broker, 2, false);
    assert!(
        !log.iter().any(|l| l.contains("dropped a delivery")),
        "the second run was handed the first run's poison"
    );
}

/// A *retained* message over the packet limit is not in the aggregator's session but on the
/// broker: Mosquitto hands it over again on every subscription, so the clean reconnect does not
/// get rid of it, the aggregator reconnects every half second for good (measured: 119 times in
/// 60 s) and no client's join gets through. Without the broker's ACL anybody can publish it.
#[test]
#[ignore = "known gap: a retained delivery over broker.max_packet_bytes makes the aggregator \
            reconnect forever"]
fn a_retained_delivery_over_the_packet_limit_does_not_stop_the_run() {
    let broker = Mosquitto::start(8 << 20);
    poison(broker.port, "retained", "client-00", POISON_BYTES, true);
    let dir = tempfile::tempdir().expect("temp dir");
    let fed = Federation {
        fleet: "retained".into(),
        run_id: 1,
        max_packet: 65_536,
        dir: dir.path().to_path_buf(),
        clients: 2,
        max_examples: EXAMPLES,
    };
    let top = "min_clients = 2\nquorum = 2\nround_timeout_secs = 30.0";
    let config = fed.aggregator_config(&broker.url(), broker.port, 2, top, "");
    let mut aggregator = fed.start_aggregator(&config, "aggregator");
    let _clients: Vec<Proc> = (0..fed.clients)
        .map(|i| fed.spawn_client(&broker.url(), i))
        .collect();
    let status = aggregator.wait_exit(Duration::from_secs(90));
    let drops = aggregator
        .output()
        .iter()
        .filter(|l| l.contains("dropped a delivery"))
        .count();
    assert!(
        status.is_some_and(|s| s.success()),
        "the run did not finish within 90 s ({drops} oversized deliveries dropped)"
    );
}
