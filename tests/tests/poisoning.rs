//! Poisoning end to end: 8 real edge clients (EfficientNet-Lite0 trunk, shared activation
//! cache, LoRA) and 2 scripted attackers (20 % of a 10-client fleet) that send, every round,
//! an honest client's delta of that round times −10 (sign-flipped and scaled) as their own.
//! The attackers have no data: they copy client-00's Join (backbone, PEFT method, example
//! count) under their own id and, when client-00's update for round r appears on the broker,
//! publish −10 × its delta for round r.
//!
//! Three federations from the same seed: clean FedAvg (8 honest clients), attacked FedAvg, and
//! attacked trimmed mean (trim 0.2) with the adaptive norm bound (2 × the previous round's
//! median norm). Held-out accuracy after the last round: attacked FedAvg must lose at least 10
//! points; the robust run must stay within 2 points of the clean one. The three accuracies are
//! printed (docs/src/results/poisoning.md).

use std::time::Duration;

use fedpeft_protocol::{Envelope, Message, Tensor, Values};
use fedpeft_tests::Proc;
use fedpeft_tests::e2e::{Federation, round_record};

const HONEST: usize = 8;
const ATTACKERS: usize = 2;
const ROUNDS: u32 = 3;
/// Large enough that no update or global adapter is chunked (LoRA f32 ≈ 102 KB).
const MAX_PACKET: usize = 262_144;

/// The attackers' MQTT connection: copies client-00's join and poisons its updates.
fn start_attackers(
    port: u16,
    fleet: &str,
    run_id: u64,
    factor: f32,
) -> std::thread::JoinHandle<()> {
    let mut opts = rumqttc::MqttOptions::new("attackers", "127.0.0.1", port);
    opts.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    let (mqtt, mut connection) = rumqttc::Client::new(opts, 64);
    let base = format!("fedpeft/v1/{fleet}");
    for t in ["join", "update/client-00", "round"] {
        mqtt.subscribe(format!("{base}/{t}"), rumqttc::QoS::AtLeastOnce)
            .expect("subscribe");
    }
    std::thread::spawn(move || {
        for event in connection.iter() {
            let Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) = event else {
                if event.is_err() {
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            };
            let Ok(env) = Envelope::decode(&p.payload) else {
                continue;
            };
            match env.message {
                Message::Join(join) if join.client.as_str() == "client-00" => {
                    for a in 0..ATTACKERS {
                        let mut j = join.clone();
                        j.client =
                            fedpeft_protocol::ClientId::new(&format!("attacker-{a}")).unwrap();
                        let bytes = Envelope::new(run_id, 0, j).encode().unwrap();
                        let _ = mqtt.publish(
                            format!("{base}/join"),
                            rumqttc::QoS::AtLeastOnce,
                            false,
                            bytes,
                        );
                    }
                }
                Message::ClientUpdate(u) => {
                    for a in 0..ATTACKERS {
                        let mut poisoned = u.clone();
                        let id = format!("attacker-{a}");
                        poisoned.client = fedpeft_protocol::ClientId::new(&id).unwrap();
                        poisoned.tensors = u
                            .tensors
                            .iter()
                            .map(|t| {
                                let v = t.to_f32().iter().map(|x| x * factor).collect();
                                Tensor::dense(t.name(), t.shape(), Values::F32(v)).unwrap()
                            })
                            .collect();
                        let bytes = Envelope::new(run_id, u.round, poisoned).encode().unwrap();
                        let _ = mqtt.publish(
                            format!("{base}/update/{id}"),
                            rumqttc::QoS::AtLeastOnce,
                            false,
                            bytes,
                        );
                    }
                }
                Message::RoundAnnounce(a) if fedpeft_aggregator_done(&a) => return,
                _ => {}
            }
        }
    })
}

/// The aggregator's end-of-run announcement (deadline 0, nobody sampled).
fn fedpeft_aggregator_done(a: &fedpeft_protocol::RoundAnnounce) -> bool {
    a.deadline_unix_ms == 0
        && matches!(&a.sampling, fedpeft_protocol::Sampling::Clients(c) if c.is_empty())
}

/// Runs one federation; returns the report.
fn federate(name: &str, attacked: bool, strategy: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = fedpeft_tests::free_port();
    let total = HONEST + if attacked { ATTACKERS } else { 0 };
    let fed = Federation {
        fleet: format!("poison-{name}"),
        run_id: 11,
        max_packet: MAX_PACKET,
        dir: dir.path().to_path_buf(),
        clients: HONEST,
        max_examples: 120,
    };
    let top =
        format!("min_clients = {total}\nquorum = {total}\nround_timeout_secs = 300.0\n{strategy}");
    let config = fed.aggregator_config("embedded", port, ROUNDS, &top, "epochs = 2");
    let mut aggregator = fed.start_aggregator(&config, &format!("aggregator-{name}"));
    let attackers = attacked.then(|| start_attackers(port, &fed.fleet, fed.run_id, -10.0));
    let url = format!("mqtt://127.0.0.1:{port}");
    let mut procs: Vec<Proc> = (0..HONEST).map(|i| fed.spawn_client(&url, i)).collect();
    let status = aggregator
        .wait_exit(Duration::from_secs(600))
        .unwrap_or_else(|| panic!("{name}: the aggregator did not finish within 10 minutes"));
    assert!(status.success(), "{name}: aggregator exited with {status}");
    for p in &mut procs {
        let status = p
            .wait_exit(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("{} did not exit after the run was done", p.name));
        assert!(status.success(), "{} exited with {status}", p.name);
    }
    if let Some(a) = attackers {
        let _ = a.join();
    }
    let report = fed.report();
    for r in 1..=ROUNDS {
        let rec = round_record(&report, r);
        assert_eq!(rec["status"], "ok", "{name}: round {r}: {rec}");
        assert_eq!(rec["clients_ok"], total, "{name}: round {r}: {rec}");
    }
    report
}

fn accuracy(report: &serde_json::Value) -> f64 {
    round_record(report, ROUNDS)["eval_accuracy"]
        .as_f64()
        .expect("held-out accuracy of the last round")
}

#[test]
fn norm_bound_and_trimmed_mean_hold_against_sign_flipped_updates_where_fedavg_does_not() {
    let clean = federate("clean", false, "");
    let attacked = federate("fedavg", true, "");
    let robust = federate(
        "robust",
        true,
        "adaptive_norm_multiple = 2.0\n[strategy]\nkind = \"trimmed-mean\"\ntrim = 0.2",
    );
    let (c, a, r) = (accuracy(&clean), accuracy(&attacked), accuracy(&robust));
    let initial = round_record(&clean, 0)["eval_accuracy"].as_f64().unwrap();
    println!(
        "poisoning: held-out accuracy after round {ROUNDS} (initial {:.2} %): clean FedAvg {:.2} %, \
         attacked FedAvg {:.2} %, attacked norm bound + trimmed mean {:.2} %",
        100.0 * initial,
        100.0 * c,
        100.0 * a,
        100.0 * r
    );
    for rec in robust["rounds"].as_array().unwrap().iter().skip(1) {
        println!("robust round {}: {}", rec["round"], rec["robust"]);
    }
    assert!(
        c > initial + 0.2,
        "the clean run must learn: {initial} -> {c}"
    );
    assert!(
        a < c - 0.10,
        "attacked FedAvg {a} did not drop 10 points below clean {c}"
    );
    assert!(
        (r - c).abs() <= 0.02,
        "robust {r} is not within 2 points of clean {c}"
    );
    // Rounds 2 and 3 have a bound (2 × the previous round's median norm): both attackers are
    // clipped (an honest client may be too), and
    // the trimmed mean discards their values at more coordinates than any honest client's
    // (clipped, they sit at an extreme less often: measured 0.82-0.83 in rounds 2 and 3, 0.95
    // in round 1; honest clients 0.20-0.49).
    for round in 2..=ROUNDS {
        let rob = &round_record(&robust, round)["robust"];
        let clipped: Vec<&str> = rob["clipped_clients"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c.as_str())
            .collect();
        assert!(
            clipped.contains(&"attacker-0") && clipped.contains(&"attacker-1"),
            "round {round}: {rob}"
        );
        assert_eq!(
            rob["values_trimmed_per_coordinate"], 4,
            "round {round}: {rob}"
        );
        let shares = rob["trimmed_share"].as_object().unwrap();
        let honest_max = shares
            .iter()
            .filter(|(c, _)| c.starts_with("client-"))
            .map(|(_, s)| s.as_f64().unwrap())
            .fold(0.0, f64::max);
        for a in 0..ATTACKERS {
            let share = shares[&format!("attacker-{a}")].as_f64().unwrap();
            assert!(
                share > 0.75 && share > honest_max,
                "round {round}: attacker-{a} trimmed at {share} of the coordinates, an honest \
                 client at up to {honest_max}"
            );
        }
    }
}
