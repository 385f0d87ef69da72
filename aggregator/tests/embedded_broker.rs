//! One real round over real sockets: the aggregator's async shell with its embedded rumqttd on
//! a free loopback port, and rumqttc clients that publish hand-built ClientUpdate messages.
//! The global adapter the aggregator publishes must equal FedAvg computed here independently.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use fedpeft_aggregator::config::{self, AggregatorFile};
use fedpeft_aggregator::host::LayoutHost;
use fedpeft_aggregator::round::RejectReason;
use fedpeft_aggregator::shell;
use fedpeft_protocol::{
    Capabilities, ClientId, ClientState, ClientUpdate, Codec, DType, Envelope, Join, Message,
    PeftMethod, Reassembler, ReassemblyLimits, RoundAnnounce, Sampling, SplitMix64, Status,
    TrainMetrics,
};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, oneshot};

const FLEET: &str = "itest";
const RUN: u64 = 99;
const W_LEN: usize = 700; // 2.8 KB of f32: above the 2 KiB payload limit, so it is chunked.

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(port: u16, dir: &Path) -> fedpeft_aggregator::config::Config {
    let text = format!(
        r#"
fleet = "{FLEET}"
run_id = {RUN}
rounds = 1
min_clients = 3
quorum = 3
round_timeout_secs = 20
max_payload_bytes = 2048
backbone_params = 1000000
[broker]
port = {port}
max_packet_bytes = 8192
[model]
tensors = [{{ name = "w", shape = [{W_LEN}] }}, {{ name = "b", shape = [2] }}]
[output]
dir = "{}"
"#,
        dir.display()
    );
    config::validate(AggregatorFile::parse(&text, Path::new("itest.toml")).unwrap()).unwrap()
}

fn topic(kind: &str) -> String {
    format!("fedpeft/v1/{FLEET}/{kind}")
}

/// A client's connection: its handle and everything published to it, decoded.
struct Client {
    id: String,
    mqtt: AsyncClient,
    inbox: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
}

async fn connect(id: &str, port: u16) -> Client {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_max_packet_size(64 * 1024, 64 * 1024);
    opts.set_clean_session(false);
    let will = Envelope::new(
        RUN,
        0,
        Status {
            client: ClientId::new(id).unwrap(),
            state: ClientState::Offline,
        },
    )
    .encode()
    .unwrap();
    opts.set_last_will(LastWill::new(
        topic(&format!("status/{id}")),
        will,
        QoS::AtLeastOnce,
        true,
    ));
    let (mqtt, mut eventloop) = AsyncClient::new(opts, 256);
    let (tx, inbox) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send((p.topic, p.payload.to_vec())).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    mqtt.subscribe(topic("round"), QoS::AtLeastOnce)
        .await
        .unwrap();
    mqtt.subscribe(topic("global/#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    Client {
        id: id.to_string(),
        mqtt,
        inbox,
    }
}

impl Client {
    async fn join(&self, num_examples: u64) {
        let join = Join {
            client: ClientId::new(&self.id).unwrap(),
            capabilities: Capabilities {
                backbone_id: heapless::String::try_from("none").unwrap(),
                backbone_sha256: [0; 32],
                peft: PeftMethod::Head,
                accepted_dtypes: heapless::Vec::from_slice(&[DType::F32]).unwrap(),
                max_packet_size: 8192,
            },
            num_examples,
        };
        let online = Status {
            client: ClientId::new(&self.id).unwrap(),
            state: ClientState::Online,
        };
        self.publish(
            &format!("status/{}", self.id),
            Envelope::new(RUN, 0, online),
            true,
        )
        .await;
        self.publish("join", Envelope::new(RUN, 0, join), false)
            .await;
    }

    async fn publish(&self, kind: &str, env: Envelope, retain: bool) {
        self.publish_raw(kind, env.encode().unwrap(), retain).await;
    }

    async fn publish_raw(&self, kind: &str, payload: Vec<u8>, retain: bool) {
        self.mqtt
            .publish(topic(kind), QoS::AtLeastOnce, retain, payload)
            .await
            .unwrap();
    }

    /// Waits for the next message matching `pick`, reassembling chunked global adapters.
    async fn wait_for<T>(&mut self, mut pick: impl FnMut(Message) -> Option<T>) -> T {
        let mut chunks: Reassembler<u8> = Reassembler::new(ReassemblyLimits::default());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (_, payload) = tokio::time::timeout_at(deadline, self.inbox.recv())
                .await
                .expect("timed out waiting for a message")
                .expect("client event loop ended");
            let env = Envelope::decode(&payload).unwrap();
            let msg = match env.message {
                Message::Chunk(c) => match chunks.push(0, c, 0).unwrap() {
                    Some(whole) => Envelope::decode(&whole).unwrap().message,
                    None => continue,
                },
                m => m,
            };
            if let Some(t) = pick(msg) {
                return t;
            }
        }
    }
}

fn delta(seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = SplitMix64::new(seed);
    let w = (0..W_LEN).map(|_| rng.next_f32() - 0.5).collect();
    let b = vec![rng.next_f32(), -rng.next_f32()];
    (w, b)
}

fn update(id: &str, round: u32, num_examples: u64, w: &[f32], b: &[f32]) -> Envelope {
    let mut rng = SplitMix64::new(0);
    let enc = |name: &str, v: &[f32], rng: &mut SplitMix64| {
        fedpeft_protocol::Tensor::encode(name, &[v.len() as u32], v, Codec::dense(DType::F32), rng)
            .unwrap()
    };
    Envelope::new(
        RUN,
        round,
        ClientUpdate {
            client: ClientId::new(id).unwrap(),
            round,
            sequence: round,
            num_examples,
            metrics: TrainMetrics {
                loss: 0.5,
                accuracy: 0.75,
                steps: 3,
                elapsed_ms: 10,
                epsilon: None,
            },
            tensors: vec![enc("w", w, &mut rng), enc("b", b, &mut rng)],
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_round_over_the_embedded_broker_publishes_the_fedavg_of_the_updates() {
    // The aggregator's log (shown when the test fails): rejections name client, round, reason.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info,rumqttd=off")
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = config(port, dir.path());
    let host = Box::new(LayoutHost::new(&cfg.model, 0));
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (ready_tx, ready_rx) = oneshot::channel();
    let agg = tokio::spawn(shell::run(
        cfg,
        host,
        async {
            let _ = stop_rx.await;
        },
        Some(ready_tx),
    ));
    let addr = tokio::time::timeout(Duration::from_secs(20), ready_rx)
        .await
        .expect("aggregator ready in time")
        .unwrap();
    assert_eq!(addr.port(), port);

    let examples = [("c1", 100u64), ("c2", 300), ("c3", 50)];
    let mut clients = Vec::new();
    for (id, n) in examples {
        let c = connect(id, port).await;
        c.join(n).await;
        clients.push(c);
    }

    let mut announce: Option<RoundAnnounce> = None;
    for c in &mut clients {
        let a = c
            .wait_for(|m| match m {
                Message::RoundAnnounce(a) => Some(a),
                _ => None,
            })
            .await;
        announce = Some(a);
    }
    let announce = announce.unwrap();
    assert_eq!(announce.round, 1);
    let Sampling::Clients(sampled) = &announce.sampling else {
        panic!("expected an explicit client list")
    };
    assert_eq!(sampled.len(), 3);

    // Rejected on the way: the intruder (unknown client), a NaN update, a wrong-round update.
    let (w, b) = delta(1);
    // An intruder that never joined. Every update below goes through c1's connection, whose
    // order the broker keeps, so each rejection is counted before the round closes.
    clients[0]
        .publish("update/intruder", update("intruder", 1, 10, &w, &b), false)
        .await;
    let mut nan = w.clone();
    nan[3] = f32::NAN;
    // The NaN update comes from c1 but for round 2 (future): rejected before the NaN check,
    // so c1's real update below is still accepted.
    clients[0]
        .publish("update/c1", update("c1", 2, 100, &nan, &b), false)
        .await;

    let mut expected_w = vec![0f64; W_LEN];
    let mut expected_b = vec![0f64; 2];
    let total: u64 = examples.iter().map(|(_, n)| n).sum();
    // The duplicate below reaches the aggregator before the last update closes the round.
    let c = &clients[0];
    for (i, (id, n)) in examples.iter().enumerate() {
        let (w, b) = delta(10 + i as u64);
        for (e, v) in expected_w.iter_mut().zip(&w) {
            *e += *n as f64 * f64::from(*v);
        }
        for (e, v) in expected_b.iter_mut().zip(&b) {
            *e += *n as f64 * f64::from(*v);
        }
        let payload = update(id, 1, *n, &w, &b).encode().unwrap();
        assert!(payload.len() > 2048, "the update should need chunking");
        // Clients chunk above the packet limit, as the edge client does.
        for part in fedpeft_protocol::chunk::split(&payload, 2048, RUN, 1, 7).unwrap() {
            c.publish_raw(&format!("update/{id}"), part, false).await;
        }
        if i == 0 {
            // A redelivered duplicate of c1's update: idempotent.
            c.publish("update/c1", update(id, 1, *n, &w, &b), false)
                .await;
        }
    }

    let global = clients[1]
        .wait_for(|m| match m {
            Message::GlobalAdapter(g) if g.round == 1 => Some(g),
            _ => None,
        })
        .await;
    let got: BTreeMap<String, Vec<f32>> = global
        .tensors
        .iter()
        .map(|t| (t.name().to_string(), t.to_f32()))
        .collect();
    let fedavg = |sum: &[f64]| -> Vec<f32> {
        sum.iter()
            .map(|s| (0.0f64 + s / total as f64) as f32)
            .collect()
    };
    assert_eq!(got["w"], fedavg(&expected_w));
    assert_eq!(got["b"], fedavg(&expected_b));

    // The run ends by itself after its one round, with a "done" announcement.
    let done = clients[2]
        .wait_for(|m| match m {
            Message::RoundAnnounce(a) if a.round == 2 => Some(a),
            _ => None,
        })
        .await;
    assert!(done.is_run_done());
    let outcome = tokio::time::timeout(Duration::from_secs(10), agg)
        .await
        .expect("aggregator finished")
        .unwrap()
        .unwrap();
    drop(stop_tx);
    assert!(outcome.finished);
    let r = &outcome.report;
    assert_eq!(r.rounds.len(), 2);
    assert_eq!(r.rounds[1].status, "ok");
    assert_eq!(r.rounds[1].clients_ok, 3);
    assert_eq!(r.rejected.get(&RejectReason::UnknownClient), Some(&1));
    assert_eq!(r.rejected.get(&RejectReason::FutureRound), Some(&1));
    assert_eq!(r.rejected.get(&RejectReason::Duplicate), Some(&1));
    // Every client sent at least its chunked update (2.8 KB of tensors alone).
    for (id, _) in examples {
        assert!(
            r.clients[id].up_bytes > 4 * W_LEN as u64,
            "{id}: {:?}",
            r.clients[id]
        );
        // Status, Join, update: a chunked update counts as one message (its bytes are all
        // its chunks).
        assert!(r.clients[id].up_messages >= 3, "{id}: {:?}", r.clients[id]);
        assert!(r.clients[id].down_bytes > 0);
    }
    assert_eq!(r.totals.full_model_fedavg_bytes, 1_000_000 * 4 * 2 * 3);
    // The report files exist and parse.
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(json["schema"], "fedpeft-aggregator-report/1");
    assert_eq!(json["rounds"][1]["clients_ok"], 3);
    let csv = std::fs::read_to_string(dir.path().join("report.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3);
    assert!(dir.path().join("aggregator.ckpt").is_file());
}
