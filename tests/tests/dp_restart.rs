//! Client-level DP across an aggregator crash: the real `aggregator` binary with `[dp]` behind
//! a real Mosquitto, two scripted clients, three rounds. One run goes straight through; the
//! other is SIGKILLed after round 2 and started again on the same output folder. The restarted
//! aggregator must go on from the ε it had (the accountant is in the checkpoint): the reports
//! give the same ε for every round, and the same clip counts.

use std::time::Duration;

use fedpeft_protocol::{Capabilities, ClientId, DType, Envelope, Join, PeftMethod, Tensor, Values};
use fedpeft_tests::{Mosquitto, Proc, binary};

const FLEET: &str = "dp";
const RUN: u64 = 9;

fn publish(mqtt: &rumqttc::Client, kind: &str, payload: Vec<u8>) {
    mqtt.publish(
        format!("fedpeft/v1/{FLEET}/{kind}"),
        rumqttc::QoS::AtLeastOnce,
        false,
        payload,
    )
    .expect("queue a publish");
}

fn connect(port: u16) -> rumqttc::Client {
    let opts = rumqttc::MqttOptions::new("dp-clients", "127.0.0.1", port);
    let (mqtt, mut connection) = rumqttc::Client::new(opts, 64);
    std::thread::spawn(move || {
        for event in connection.iter() {
            if event.is_err() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    });
    mqtt
}

fn join(mqtt: &rumqttc::Client, id: &str) {
    let join = Join {
        client: ClientId::new(id).unwrap(),
        capabilities: Capabilities {
            backbone_id: heapless::String::new(),
            backbone_sha256: [0; 32],
            peft: PeftMethod::Head,
            accepted_dtypes: heapless::Vec::from_slice(&[DType::F32]).unwrap(),
            max_packet_size: 64 * 1024,
        },
        num_examples: 100,
    };
    publish(mqtt, "join", Envelope::new(RUN, 0, join).encode().unwrap());
}

/// An update of norm 2 · 5 = 10 (above the clip norm 1).
fn update(mqtt: &rumqttc::Client, id: &str, round: u32) {
    let w = Tensor::dense("w", &[2], Values::F32(vec![6.0, 8.0])).unwrap();
    let u = fedpeft_tests::client_update(id, round, round, 100, vec![w]);
    let payload = Envelope::new(RUN, round, u).encode().unwrap();
    publish(mqtt, &format!("update/{id}"), payload);
}

fn start(config: &std::path::Path, name: &str) -> Proc {
    let mut cmd = std::process::Command::new(binary("aggregator"));
    cmd.arg("--config").arg(config);
    let p = Proc::spawn(name, cmd);
    p.wait_for_line("aggregator ready", Duration::from_secs(60))
        .expect("aggregator ready");
    p
}

/// Runs three rounds; with `crash`, SIGKILLs the aggregator after round 2 and restarts it.
fn run(crash: bool) -> serde_json::Value {
    let broker = Mosquitto::start(64 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agg.toml");
    std::fs::write(
        &config,
        format!(
            "fleet = \"{FLEET}\"\nrun_id = {RUN}\nrounds = 3\nmin_clients = 2\n\
             round_timeout_secs = 60\n[dp]\nclip_norm = 1.0\nnoise_multiplier = 1.1\n\
             fleet_size = 20\nexpected_clients = 2\ndelta = 1e-5\n\
             [broker]\nurl = \"mqtt://127.0.0.1:{}\"\nmax_packet_bytes = 65536\n\
             [model]\ntensors = [{{ name = \"w\", shape = [2] }}]\n[output]\ndir = \"{}\"\n",
            broker.port,
            dir.path().join("out").display()
        ),
    )
    .unwrap();
    let mut agg = start(&config, "aggregator");
    let mqtt = connect(broker.port);
    for id in ["a", "b"] {
        join(&mqtt, id);
    }
    for round in 1..=3u32 {
        // A restarted aggregator resumes the round its checkpoint holds open.
        let (started, resumed) = (
            format!("round started round={round} "),
            format!("round resumed round={round} "),
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !agg
            .output()
            .iter()
            .any(|l| l.contains(&started) || l.contains(&resumed))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        for id in ["a", "b"] {
            update(&mqtt, id, round);
        }
        if crash && round == 2 {
            agg.wait_for_line("round closed round=2", Duration::from_secs(60))
                .expect("round 2 closed");
            // Round 2's close is checkpointed before the log line; give the rename a moment.
            std::thread::sleep(Duration::from_millis(300));
            agg.kill_hard();
            agg = start(&config, "aggregator-restarted");
            for id in ["a", "b"] {
                join(&mqtt, id);
            }
        }
    }
    let status = agg
        .wait_exit(Duration::from_secs(60))
        .expect("the aggregator did not finish");
    assert!(status.success(), "aggregator exited with {status}");
    let text = std::fs::read_to_string(dir.path().join("out/report.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn epsilons(report: &serde_json::Value) -> Vec<f64> {
    report["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["round"].as_u64() > Some(0))
        .map(|r| r["robust"]["dp_epsilon"].as_f64().expect("dp_epsilon"))
        .collect()
}

#[test]
fn a_restarted_aggregator_keeps_counting_epsilon_and_clips_where_it_stopped() {
    let straight = run(false);
    let crashed = run(true);
    let (a, b) = (epsilons(&straight), epsilons(&crashed));
    assert_eq!(a.len(), 3, "{straight}");
    assert!(a[0] < a[1] && a[1] < a[2], "ε must grow every round: {a:?}");
    assert_eq!(
        a, b,
        "ε after the restart differs from the uninterrupted run"
    );
    assert_eq!(straight["robust"]["dp_epsilon"].as_f64(), Some(a[2]));
    // Every update (norm 10) is clipped to S = 1: 2 per round, 6 in all, restart or not.
    for r in [&straight, &crashed] {
        assert_eq!(r["robust"]["clipped_total"], 6, "{r}");
        assert_eq!(r["strategy"], "dp-fedavg");
    }
    println!("client-level DP, q = 0.1, σ = 1.1, δ = 1e-5: ε per round {a:?}");
}
