//! End-to-end federation: the real `aggregator` and `edge-client` binaries as separate
//! processes, a real broker on loopback (the aggregator's embedded rumqttd, or Mosquitto), the
//! real EfficientNet-Lite0 trunk and Fashion-MNIST. An observer subscribed to the fleet's topics
//! records what really travelled, and the test recomputes FedAvg from the clients' updates.

use std::collections::BTreeMap;
use std::time::Duration;

use fedpeft_tests::e2e::{Federation, check_fedavg, observe, round_record};
use fedpeft_tests::{Mosquitto, Proc, Sniffer, free_port};

/// Below the LoRA adapter's f32 size (25,610 values ≈ 102 KB): globals and updates are chunked.
const MAX_PACKET: usize = 65536;

/// Runs a 3-round, 3-client LoRA federation and checks it end to end.
fn federate(broker: &str, broker_port: u16) {
    let dir = tempfile::tempdir().expect("temp dir");
    let rounds = 3;
    let fed = Federation {
        fleet: "e2e".into(),
        run_id: 7,
        max_packet: MAX_PACKET,
        dir: dir.path().to_path_buf(),
        clients: 3,
        max_examples: 160,
    };
    let top = "min_clients = 3\nquorum = 3\nround_timeout_secs = 240.0";
    let config = fed.aggregator_config(broker, broker_port, rounds, top, "epochs = 1");
    let mut aggregator = fed.start_aggregator(&config, "aggregator");
    let sniffer = Sniffer::start(broker_port, &fed.fleet, MAX_PACKET);
    let url = format!("mqtt://127.0.0.1:{broker_port}");
    let mut procs: Vec<Proc> = (0..fed.clients)
        .map(|i| fed.spawn_client(&url, i))
        .collect();

    let status = aggregator
        .wait_exit(Duration::from_secs(900))
        .expect("the aggregator did not finish 3 rounds within 15 minutes");
    assert!(status.success(), "aggregator exited with {status}");
    for p in &mut procs {
        let status = p
            .wait_exit(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("{} did not exit after the run was done", p.name));
        assert!(status.success(), "{} exited with {status}", p.name);
    }
    std::thread::sleep(Duration::from_millis(500));

    let seen = observe(&sniffer.messages());
    for round in 0..=rounds {
        assert!(
            seen.globals.contains_key(&round),
            "no global adapter for round {round} was observed (saw {:?})",
            seen.globals.keys().collect::<Vec<_>>()
        );
    }
    for round in 1..=rounds {
        let n = seen.updates.get(&round).map_or(0, BTreeMap::len);
        assert_eq!(n, fed.clients, "round {round}: {n} client updates observed");
        let (compared, differing) = check_fedavg(&seen, round);
        assert_eq!(compared, 25_610, "LoRA r=8 + head on EfficientNet-Lite0");
        assert_eq!(
            differing, 0,
            "round {round}: {differing} of {compared} values differ from FedAvg"
        );
        eprintln!("round {round}: FedAvg recomputed; all {compared} values bit-identical");
    }

    let report = fed.report();
    let accuracy = |r: u32| {
        round_record(&report, r)["eval_accuracy"]
            .as_f64()
            .unwrap_or_else(|| panic!("no eval accuracy for round {r} in the report"))
    };
    let (first, last) = (accuracy(0), accuracy(rounds));
    eprintln!("eval accuracy: round 0 {first:.3}, round {rounds} {last:.3}");
    assert!(
        last > first + 0.2,
        "accuracy did not improve: round 0 {first}, round {rounds} {last}"
    );
    for r in 1..=rounds {
        let rec = round_record(&report, r);
        assert_eq!(rec["status"], "ok", "round {r}: {rec}");
        assert_eq!(rec["clients_ok"], fed.clients, "round {r}: {rec}");
    }
    let up = report["totals"]["up_bytes"].as_u64().expect("up bytes");
    assert!(up > 3 * 3 * 25_610 * 4, "uploads accounted: {up} bytes");
}

#[test]
fn three_rounds_over_the_embedded_broker_equal_fedavg_of_the_clients_updates() {
    federate("embedded", free_port());
}

#[test]
fn three_rounds_over_mosquitto_equal_fedavg_of_the_clients_updates() {
    let broker = Mosquitto::start((MAX_PACKET + 4096) as u32);
    federate(&broker.url(), broker.port);
}
