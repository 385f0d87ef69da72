//! A fleet on a three-node NATS cluster (issue 24): Debian's `nats-server` nodes routed to each
//! other, JetStream on each (where NATS keeps MQTT sessions, QoS 1 messages and retained
//! messages, replicated three times) and an MQTT listener on each. The real aggregator and five
//! real edge clients (EfficientNet-Lite0 trunk, LoRA, updates and global adapters in 4 chunks)
//! each take the list of all three nodes as `broker.url`, starting at different nodes: the
//! aggregator and clients 0 and 3 at the first node of the plan, clients 1 and 4 at the second,
//! client 2 at the third.
//!
//! When round 2 starts, one node is SIGKILLed: the second (two clients, not the aggregator), or
//! the first (the aggregator and two clients). Whoever was connected to it loses the connection
//! (and its last will, which only that node held) and must move on to another node of its
//! list, where its persistent session is waiting (JetStream holds sessions cluster-wide: the
//! node answers "session present"). The run must finish, every round `ok` with all five
//! clients' updates accepted and none failed (nothing lost); whoever started on the killed node
//! must have connected there first, then only elsewhere, finding its session; everyone else
//! must have stayed where they started.
//!
//! The node killed is one that leads neither of the streams QoS 1 and retained messages are
//! stored in. When the node leading `$MQTT_msgs` dies, NATS 2.9 holds every QoS 1 PUBLISH, on
//! every node, until the cluster has elected a new leader (4 to 9 s in our runs); a PUBLISH
//! still waiting after NATS's internal 4 s gets its connection closed, and its last will
//! published. The aggregator counts a sampled client whose will arrives as dropped for the
//! round until its update, sent again after it reconnects, arrives, and when that client was
//! the last one the round waited for, the round closes without it. With `$MQTT_rmsgs`, each
//! retained publish waits out the same limit and its retained copy is lost. That window is
//! NATS's, documented in the guide (`docs/src/guide/cluster.md`); this test is about failover,
//! so it keeps out of it (and fails loudly if the leaders moved by the time of the kill).

use std::collections::BTreeMap;
use std::time::Duration;

use fedpeft_tests::Proc;
use fedpeft_tests::e2e::{Federation, round_record};
use fedpeft_tests::nats::NatsCluster;

const CLIENTS: usize = 5;
const ROUNDS: u32 = 3;
/// Below the LoRA adapter's f32 size (≈ 102 KB): updates and global adapters are chunked, so
/// a node can die between the chunks of one message.
const MAX_PACKET: usize = 32_768;
/// The streams whose leader's death stalls publishes (see above).
const PUBLISH_STREAMS: [&str; 2] = ["$MQTT_msgs", "$MQTT_rmsgs"];

/// The slot of the plan each client's list starts at (the aggregator's starts at slot 0).
fn first_slot(client: usize) -> usize {
    client % 3
}

/// `(broker, session_present)` of every connection in a log, in order: the lines that hold
/// `{marker}mqtt://127.0.0.1:PORT session_present=BOOL` (the edge client's "connected", the
/// aggregator's "connected to broker").
fn connections(log: &[String], marker: &str) -> Vec<(String, bool)> {
    log.iter()
        .filter_map(|line| {
            let rest = &line[line.find(marker)? + marker.len()..];
            let (broker, rest) = rest.split_once(' ')?;
            let present = rest.strip_prefix("session_present=")?.starts_with("true");
            Some((broker.to_string(), present))
        })
        .collect()
}

const CLIENT_CONNECTED: &str = " connected broker=";
const AGGREGATOR_CONNECTED: &str = "connected to broker broker=";

/// Checks the connections of `who`, which started on `own`: there first; if `own` is the
/// killed node, then elsewhere (and never there again), finding the session; otherwise only
/// there (nobody moves without need).
fn check_connections(who: &str, seen: &[(String, bool)], own: &str, killed: &str) {
    assert!(!seen.is_empty(), "{who}: no connection logged");
    assert_eq!(seen[0].0, own, "{who}: first connection {seen:?}");
    let after = &seen[1..];
    if own == killed {
        assert!(
            !after.is_empty() && after.iter().all(|(b, _)| b != killed),
            "{who}: no reconnection away from the killed node {killed}: {seen:?}"
        );
        assert!(
            after.iter().all(|(_, present)| *present),
            "{who}: a reconnection did not find the session: {seen:?}"
        );
    } else {
        assert!(
            after.iter().all(|(b, _)| b == own),
            "{who}: it left its node {own}: {seen:?}"
        );
    }
}

/// Which node is which: `plan[slot]` is a node of the cluster; every list goes round the plan
/// from its first slot.
fn list_from(cluster: &NatsCluster, plan: &[usize; 3], slot: usize) -> String {
    cluster.urls((0..3).map(|k| plan[(slot + k) % 3]))
}

/// Runs the fleet and SIGKILLs the node in `killed_slot` when round 2 starts: slot 0 holds the
/// aggregator and clients 0 and 3, slot 1 clients 1 and 4.
fn run_with_a_node_killed_in_round_2(killed_slot: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cluster = NatsCluster::start(3);
    let leaders = cluster.stream_leaders(0);
    eprintln!("stream leaders: {leaders:?}");
    let leads_publish_streams = |node: usize, leaders: &BTreeMap<String, usize>| {
        PUBLISH_STREAMS
            .iter()
            .any(|s| leaders.get(*s) == Some(&node))
    };
    let victim = (0..3)
        .find(|&n| !leads_publish_streams(n, &leaders))
        .expect("two streams leave one of three nodes leading neither");
    let others: Vec<usize> = (0..3).filter(|&n| n != victim).collect();
    let plan = match killed_slot {
        0 => [victim, others[0], others[1]],
        _ => [others[0], victim, others[1]],
    };
    let fed = Federation {
        fleet: "cluster".into(),
        run_id: 24,
        max_packet: MAX_PACKET,
        dir: dir.path().to_path_buf(),
        clients: CLIENTS,
        max_examples: 64,
    };
    // Every round waits for all five (a round closed by its deadline would miss someone, and
    // the deadline is far beyond the test's patience).
    let top = format!("min_clients = {CLIENTS}\nquorum = {CLIENTS}\nround_timeout_secs = 600.0");
    let config = fed.aggregator_config(&list_from(&cluster, &plan, 0), 0, ROUNDS, &top, "");
    let mut aggregator = fed.start_aggregator(&config, "aggregator");
    // A client waits at most 2 s between attempts (instead of up to 30 s): the cluster takes a
    // few seconds to elect new leaders for what the dead node led (the sessions' stream among
    // them), and a client that tried too early should not then sleep through the round.
    let edge_config = dir.path().join("edge.toml");
    std::fs::write(&edge_config, "[reconnect]\nmax_ms = 2000\n").expect("write edge.toml");
    let edge_config = edge_config.display().to_string();
    let mut clients: Vec<Proc> = (0..CLIENTS)
        .map(|i| {
            fed.spawn_client_with(
                &list_from(&cluster, &plan, first_slot(i)),
                i,
                &["--config", &edge_config],
            )
        })
        .collect();

    aggregator
        .wait_for_line("round started round=2", Duration::from_secs(300))
        .expect("round 2 started");
    let leaders = cluster.stream_leaders(others[0]);
    assert!(
        !leads_publish_streams(victim, &leaders),
        "{} took over a stream QoS 1 or retained messages are stored in before it was killed \
         (the leaders moved under load: {leaders:?}); killing it now would test NATS's election \
         window, not failover",
        cluster.nodes[victim].name
    );
    eprintln!("killing {} (SIGKILL)", cluster.nodes[victim].name);
    cluster.kill(victim);

    let status = aggregator
        .wait_exit(Duration::from_secs(300))
        .expect("the aggregator finished the run");
    assert!(status.success(), "the aggregator exited with {status}");
    for c in &mut clients {
        let s = c
            .wait_exit(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("{} did not exit after the run", c.name));
        assert!(s.success(), "{} exited with {s}", c.name);
    }

    // Nothing lost: every round aggregated every client's update.
    let report = fed.report();
    assert_eq!(report["finished"], true, "{report}");
    for r in 1..=ROUNDS {
        let rec = round_record(&report, r);
        assert_eq!(rec["status"], "ok", "round {r}: {rec}");
        assert_eq!(rec["clients_ok"], CLIENTS, "round {r}: {rec}");
        assert_eq!(rec["clients_failed"], 0, "round {r}: {rec}");
    }

    // Who connected where.
    let killed = cluster.url(victim);
    for (i, c) in clients.iter().enumerate() {
        let seen = connections(&c.output(), CLIENT_CONNECTED);
        check_connections(&c.name, &seen, &cluster.url(plan[first_slot(i)]), &killed);
    }
    let seen = connections(&aggregator.output(), AGGREGATOR_CONNECTED);
    check_connections("the aggregator", &seen, &cluster.url(plan[0]), &killed);
}

#[test]
#[ignore = "known gap: in about one run in five on this machine, a client that joined through \
            a NATS 2.9 node never receives round 1's announcement or global adapter, before any \
            node is killed, and the round waits for it; not yet understood"]
fn a_fleet_on_a_nats_cluster_loses_nothing_when_a_node_of_its_clients_dies_mid_round() {
    // Slot 1: clients 1 and 4, not the aggregator.
    run_with_a_node_killed_in_round_2(1);
}

#[test]
#[ignore = "known gap: in about one run in five on this machine, a client that joined through \
            a NATS 2.9 node never receives round 1's announcement or global adapter, before any \
            node is killed, and the round waits for it; not yet understood"]
fn a_fleet_on_a_nats_cluster_loses_nothing_when_the_aggregators_node_dies_mid_round() {
    // Slot 0: the aggregator, clients 0 and 3.
    run_with_a_node_killed_in_round_2(0);
}
