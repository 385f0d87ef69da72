//! End-to-end faults with the real binaries over the aggregator's embedded broker: an edge
//! client killed while it trains, and the aggregator itself killed (SIGKILL) in the middle of a
//! round and started again on the same checkpoint.

use std::time::{Duration, Instant};

use fedpeft_tests::e2e::{Federation, check_fedavg, observe, round_record};
use fedpeft_tests::{Mosquitto, Proc, Sniffer, free_port};

const MAX_PACKET: usize = 65536;

fn federation(dir: &std::path::Path, fleet: &str, clients: usize) -> Federation {
    Federation {
        fleet: fleet.into(),
        run_id: 11,
        max_packet: MAX_PACKET,
        dir: dir.to_path_buf(),
        clients,
        max_examples: 160,
    }
}

/// Lines of `p`'s output that contain every one of `needles`.
fn count_lines(p: &Proc, needles: &[&str]) -> usize {
    p.output()
        .iter()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .count()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_client_killed_while_training_is_counted_failed_and_the_next_round_goes_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let fed = federation(dir.path(), "faults-client", 4);
    // Round 1 starts with the first three clients to join; client-03 joins first, so it is
    // sampled, and is killed while it trains (30 local epochs take seconds).
    let top = "min_clients = 3\nquorum = 2\nround_timeout_secs = 120.0";
    let config = fed.aggregator_config("embedded", port, 2, top, "epochs = 30");
    let mut aggregator = fed.start_aggregator(&config, "aggregator");
    let url = format!("mqtt://127.0.0.1:{port}");
    let mut victim = fed.spawn_client(&url, 3);
    assert!(
        aggregator
            .wait_for_line("client joined client=client-03", Duration::from_secs(600))
            .is_some(),
        "client-03 never joined"
    );
    let mut others: Vec<Proc> = (0..3).map(|i| fed.spawn_client(&url, i)).collect();
    let started = aggregator
        .wait_for_line("round started round=1", Duration::from_secs(600))
        .expect("round 1 never started");
    assert!(
        started.contains("client-03"),
        "client-03 not sampled: {started}"
    );
    victim
        .wait_for_line("training round=1", Duration::from_secs(60))
        .expect("client-03 did not start training");
    victim.kill_hard();

    let status = aggregator
        .wait_exit(Duration::from_secs(600))
        .expect("the aggregator did not finish");
    assert!(status.success(), "aggregator exited with {status}");
    for p in &mut others {
        let s = p.wait_exit(Duration::from_secs(60)).expect("client exits");
        assert!(s.success(), "{} exited with {s}", p.name);
    }
    let report = fed.report();
    let r1 = round_record(&report, 1);
    assert_eq!(r1["status"], "ok", "{r1}");
    assert_eq!(r1["clients_ok"], 2, "{r1}");
    assert_eq!(r1["clients_failed"], 1, "{r1}");
    assert!(
        r1["failed_clients"].get("client-03").is_some(),
        "client-03 not named among the failed: {r1}"
    );
    let r2 = round_record(&report, 2);
    assert_eq!(r2["status"], "ok", "{r2}");
    assert_eq!(
        r2["clients_ok"], 3,
        "round 2 runs on the three live clients: {r2}"
    );
    assert_eq!(r2["clients_failed"], 0, "{r2}");
}

#[test]
fn the_aggregator_killed_mid_round_resumes_from_its_checkpoint_without_losing_or_repeating_updates()
{
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let mut fed = federation(dir.path(), "faults-aggregator", 3);
    let top = "min_clients = 3\nquorum = 3\nround_timeout_secs = 240.0";
    let config = fed.aggregator_config("embedded", port, 3, top, "epochs = 20");
    let mut first = fed.start_aggregator(&config, "aggregator-1");
    let sniffer = Sniffer::start(port, &fed.fleet, MAX_PACKET);
    let url = format!("mqtt://127.0.0.1:{port}");
    let mut clients: Vec<Proc> = (0..2).map(|i| fed.spawn_client(&url, i)).collect();
    // client-02 holds six times the examples: its round takes six times as long, which
    // leaves a window where round 2 has accepted updates and is still open.
    fed.max_examples = 960;
    clients.push(fed.spawn_client(&url, 2));

    wait_until(
        "two accepted updates in round 2",
        Duration::from_secs(900),
        || count_lines(&first, &["update accepted", "round=2"]) >= 2,
    );
    first.kill_hard();
    let accepted_before = count_lines(&first, &["update accepted", "round=2"]);
    assert!(
        count_lines(&first, &["round closed", "round=2"]) == 0,
        "round 2 closed before the kill: the test's window was missed"
    );
    eprintln!("killed the aggregator with {accepted_before} accepted update(s) in round 2");

    let mut second = fed.start_aggregator(&config, "aggregator-2");
    let status = second
        .wait_exit(Duration::from_secs(900))
        .expect("the restarted aggregator did not finish");
    assert!(
        status.success(),
        "restarted aggregator exited with {status}"
    );
    assert!(
        count_lines(&second, &["resuming from checkpoint"]) == 1,
        "the restarted aggregator did not resume"
    );
    for p in &mut clients {
        let s = p.wait_exit(Duration::from_secs(120)).expect("client exits");
        assert!(s.success(), "{} exited with {s}", p.name);
    }
    std::thread::sleep(Duration::from_millis(500));

    let report = fed.report();
    for r in 1..=3 {
        let rec = round_record(&report, r);
        assert_eq!(rec["status"], "ok", "round {r}: {rec}");
        assert_eq!(
            rec["clients_ok"], 3,
            "round {r}: each client counted once: {rec}"
        );
    }
    // The updates accepted before the kill are in round 2's global adapter, once each: it is
    // exactly FedAvg of the first update each client sent for round 2.
    let seen = observe(&sniffer.messages());
    for round in 1..=3 {
        let (compared, differing) = check_fedavg(&seen, round);
        assert_eq!(compared, 25_610);
        assert_eq!(
            differing, 0,
            "round {round}: the global adapter is not FedAvg of the clients' updates"
        );
    }
    // Clients whose connection dropped sent their round-2 update again: the restarted
    // aggregator folded in the ones its checkpoint did not have and refused the others as
    // duplicates (so every round above counts exactly three).
    let resent: usize = clients
        .iter()
        .map(|c| count_lines(c, &["update published again after reconnecting", "round=2"]))
        .sum();
    let duplicates = count_lines(&second, &["update rejected", "round=2", "reason=duplicate"]);
    let accepted_after = count_lines(&second, &["update accepted", "round=2"]);
    eprintln!(
        "killed with {accepted_before} update(s) logged as accepted; after the restart: \
         {resent} resent, {accepted_after} accepted, {duplicates} refused as duplicates"
    );
    assert!(duplicates <= resent, "more duplicates than resends");
}

#[test]
fn mosquitto_killed_and_restarted_mid_round_every_process_reconnects_and_the_rounds_complete() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut broker = Mosquitto::start(MAX_PACKET as u32 + 4096);
    let fed = federation(dir.path(), "faults-broker", 3);
    let top = "min_clients = 3\nquorum = 3\nround_timeout_secs = 300.0";
    let config = fed.aggregator_config(&broker.url(), broker.port, 2, top, "epochs = 40");
    let mut aggregator = fed.start_aggregator(&config, "aggregator");
    let sniffer = Sniffer::start(broker.port, &fed.fleet, MAX_PACKET);
    let mut clients: Vec<Proc> = (0..3).map(|i| fed.spawn_client(&broker.url(), i)).collect();

    // Kill the broker while every client trains round 1, so their updates go out only once it
    // is back: a restarted Mosquitto (no persistence) has lost every session and retained
    // message, and everyone must reconnect, subscribe again and get the round back.
    wait_until(
        "every client training round 1",
        Duration::from_secs(600),
        || {
            clients
                .iter()
                .all(|c| count_lines(c, &["training round=1"]) >= 1)
        },
    );
    broker.kill();
    std::thread::sleep(Duration::from_secs(2));
    broker.restart();
    eprintln!("mosquitto restarted on port {}", broker.port);

    let status = aggregator
        .wait_exit(Duration::from_secs(900))
        .expect("the aggregator did not finish");
    assert!(status.success(), "aggregator exited with {status}");
    for p in &mut clients {
        let s = p.wait_exit(Duration::from_secs(120)).expect("client exits");
        assert!(s.success(), "{} exited with {s}", p.name);
        assert!(
            count_lines(p, &["connected", "session_present"]) >= 2,
            "{} never reconnected",
            p.name
        );
    }
    assert!(
        count_lines(&aggregator, &["connected to broker"]) >= 2,
        "the aggregator never reconnected"
    );
    std::thread::sleep(Duration::from_millis(500));
    let report = fed.report();
    for r in 1..=2 {
        let rec = round_record(&report, r);
        assert_eq!(rec["status"], "ok", "round {r}: {rec}");
        assert_eq!(rec["clients_ok"], 3, "round {r}: {rec}");
    }
    let seen = observe(&sniffer.messages());
    for round in 1..=2 {
        let (compared, differing) = check_fedavg(&seen, round);
        assert_eq!(compared, 25_610);
        assert_eq!(
            differing, 0,
            "round {round}: the global adapter is not FedAvg of the clients' updates"
        );
    }
}
