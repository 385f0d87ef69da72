//! Site aggregators under a root, over real Mosquitto bridges (issue 24): four real edge clients
//! (EfficientNet-Lite0 trunk, LoRA r 8, f32 updates) on two site brokers, each bridged to the
//! root's broker by a `connection` stanza this test writes; a site aggregator beside each site
//! broker and the root aggregator beside the root's.
//!
//! The same four clients (same shards, seeds and training config) first run flat: one
//! aggregator, one broker. Every global adapter the root publishes in rounds 1 and 2 must be
//! byte-identical to the flat run's: each site forwards the exact weighted sum of its devices'
//! updates and the root folds the sums exactly. In round 3 site-b goes dark (its broker and its
//! aggregator SIGKILLed while its devices train): the root closes the round at its deadline
//! with site-a alone and counts site-b as a participant that did not reply. The bytes the root
//! received from a site per round (its uplink, one aggregate) are compared with what the site
//! received from its devices.

use std::path::Path;
use std::time::Duration;

use fedpeft_tests::e2e::{Federation, round_record};
use fedpeft_tests::{Mosquitto, Proc};

const CLIENTS: usize = 4;
const MAX_PACKET: usize = 1 << 20;
const RUN_ID: u64 = 11;

fn federation(fleet: &str, dir: &Path) -> Federation {
    std::fs::create_dir_all(dir).expect("federation dir");
    Federation {
        fleet: fleet.into(),
        run_id: RUN_ID,
        max_packet: MAX_PACKET,
        dir: dir.to_path_buf(),
        clients: CLIENTS,
        max_examples: 96,
    }
}

/// The bridge a site's broker opens to the root's: the root's announcements and global
/// adapters in, the site's join, status and aggregates out.
fn bridge(site: &str, root_port: u16) -> String {
    format!(
        "\nconnection {site}-to-root\naddress 127.0.0.1:{root_port}\nclientid bridge-{site}\n\
         cleansession false\nrestart_timeout 1\n\
         topic fedpeft/v1/plant/round in 1\n\
         topic fedpeft/v1/plant/global in 1\n\
         topic fedpeft/v1/plant/global/+ in 1\n\
         topic fedpeft/v1/plant/join out 1\n\
         topic fedpeft/v1/plant/status/{site} out 1\n\
         topic fedpeft/v1/plant/update/{site} out 1\n"
    )
}

fn global_file(f: &Federation, round: u32) -> Vec<u8> {
    let path = f.out().join(format!("globals/round-{round:04}.bin"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The flat federation: the four clients on one aggregator and broker, two rounds.
fn flat(dir: &Path) -> Federation {
    let broker = Mosquitto::start(MAX_PACKET as u32);
    let f = federation("plant", &dir.join("flat"));
    let top = "min_clients = 4\nquorum = 4\nround_timeout_secs = 120";
    let config = f.aggregator_config(&broker.url(), 0, 2, top, "epochs = 1");
    let mut aggregator = f.start_aggregator(&config, "flat");
    let _clients: Vec<Proc> = (0..CLIENTS)
        .map(|i| f.spawn_client(&broker.url(), i))
        .collect();
    let status = aggregator
        .wait_exit(Duration::from_secs(300))
        .expect("the flat run finishes within 300 s");
    assert!(status.success(), "flat aggregator failed: {status:?}");
    f
}

#[test]
fn a_root_over_two_bridged_sites_publishes_the_flat_runs_globals_and_outlives_a_dark_site() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let flat = flat(tmp.path());

    let root_broker = Mosquitto::start(MAX_PACKET as u32);
    let mut site_brokers: Vec<Mosquitto> = ["site-a", "site-b"]
        .iter()
        .map(|s| Mosquitto::start_with(MAX_PACKET as u32, &bridge(s, root_broker.port)))
        .collect();
    let root = federation("plant", &tmp.path().join("root"));
    let top = "min_clients = 2\nquorum = 1\nround_timeout_secs = 20";
    let config = root.aggregator_config(&root_broker.url(), 0, 3, top, "epochs = 1");
    let mut root_proc = root.start_aggregator(&config, "root");

    let sites: Vec<Federation> = ["site-a", "site-b"]
        .iter()
        .map(|s| federation(s, &tmp.path().join(s)))
        .collect();
    let mut site_procs: Vec<Proc> = sites
        .iter()
        .zip(&site_brokers)
        .map(|(f, broker)| {
            let top = format!(
                "min_clients = 2\nquorum = 2\nround_timeout_secs = 120\n\n[site]\n\
                 root_fleet = \"plant\"\nroot_run_id = {RUN_ID}\nid = \"{}\"\nmargin_secs = 2",
                f.fleet
            );
            let config = f.aggregator_config(&broker.url(), 0, 1, &top, "epochs = 1");
            f.start_aggregator(&config, &f.fleet)
        })
        .collect();
    // Clients 0 and 1 at site-a, 2 and 3 at site-b: the flat run's shards.
    let mut clients: Vec<Proc> = (0..CLIENTS)
        .map(|i| sites[i / 2].spawn_client(&site_brokers[i / 2].url(), i))
        .collect();

    // Round 3: site-b goes dark once its devices have the round.
    site_procs[1]
        .wait_for_line("round started round=3", Duration::from_secs(300))
        .expect("site-b opens round 3");
    site_procs[1].kill_hard();
    site_brokers[1].kill();
    for c in &mut clients[2..] {
        c.kill_hard();
    }
    let status = root_proc
        .wait_exit(Duration::from_secs(120))
        .expect("the root finishes");
    assert!(status.success(), "root failed: {status:?}");
    let status = site_procs[0]
        .wait_exit(Duration::from_secs(30))
        .expect("site-a finishes when the root does");
    assert!(status.success(), "site-a failed: {status:?}");

    for round in 1..=2 {
        assert_eq!(
            global_file(&root, round),
            global_file(&flat, round),
            "round {round}: the root's global adapter differs from the flat run's"
        );
    }
    let report = root.report();
    for round in 1..=2 {
        let r = round_record(&report, round);
        assert_eq!(r["status"], "ok", "round {round}: {r}");
        assert_eq!(r["clients_ok"], 2, "round {round}: {r}");
    }
    let r3 = round_record(&report, 3);
    assert_eq!(r3["status"], "ok", "round 3 closes with site-a: {r3}");
    assert_eq!(r3["clients_ok"], 1, "{r3}");
    assert!(
        r3["failed_clients"].get("site-b").is_some(),
        "site-b counted as dropped: {r3}"
    );
    assert_ne!(
        global_file(&root, 3),
        global_file(&root, 2),
        "round 3 moved the global adapter on site-a's updates"
    );

    // A site's uplink: one aggregate per round, against its devices' updates.
    let site_a = sites[0].report();
    let up = |report: &serde_json::Value, round: u32| {
        round_record(report, round)["traffic"]["up_bytes"]
            .as_u64()
            .expect("up_bytes")
    };
    let root_up = up(&report, 2);
    let devices_up = up(&site_a, 2);
    eprintln!(
        "round 2: the root received {root_up} bytes from its two sites; site-a received \
         {devices_up} bytes from its two devices"
    );
    assert!(root_up > 0 && devices_up > 0);
}
