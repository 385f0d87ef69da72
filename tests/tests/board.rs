//! The edge client as built for a board (aarch64 or armv7), run under qemu user-mode, trains a
//! federated round against the host's aggregator and its embedded rumqttd on loopback: the
//! real EfficientNet-Lite0 trunk on tract (emulated), real Fashion-MNIST, real sockets.
//!
//! `make test-cross` (scripts/cross/test.sh) cross-builds `edge-client` and names it here; the
//! tests are `#[ignore]`d in a plain run, since they need that binary:
//!
//! ```sh
//! FEDPEFT_BOARD_CLIENT_AARCH64=target/aarch64-unknown-linux-gnu/cross-test/edge-client \
//!   cargo nextest run -p fedpeft-tests --test board --run-ignored only aarch64
//! ```
//!
//! Run that way, a missing variable or binary is a failure, not a skip.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use fedpeft_tests::e2e::{Federation, backbone, check_fedavg, observe, round_record};
use fedpeft_tests::{Proc, Sniffer, free_port, workspace_root};

/// Below the LoRA adapter's f32 size (25,610 values ≈ 102 KB): the global adapter and the
/// update travel in chunks, as they do to a board on a broker with a packet limit.
const MAX_PACKET: usize = 65536;
/// Images the board trains on: the trunk runs over each under emulation.
const EXAMPLES: usize = 16;
const CLIENT: &str = "pi-01";

/// The board binary named by `var`.
fn board_client(var: &str) -> PathBuf {
    let path = PathBuf::from(std::env::var_os(var).unwrap_or_else(|| {
        panic!("{var} is not set: it names the cross-built edge-client (make test-cross sets it)")
    }));
    let path = if path.is_relative() {
        workspace_root().join(path)
    } else {
        path
    };
    assert!(path.is_file(), "{var}: {} is not a file", path.display());
    path
}

/// One round: the host aggregator (embedded broker, held-out evaluation natively), the board's
/// client under `cross/qemu-run ARCH` with a fresh activation cache, so its trunk runs here.
fn one_round_on_the_board(arch: &str, var: &str) {
    let binary = board_client(var);
    let dir = tempfile::tempdir().expect("temp dir");
    let fed = Federation {
        fleet: format!("board-{arch}"),
        run_id: 7,
        max_packet: MAX_PACKET,
        dir: dir.path().to_path_buf(),
        clients: 8,
        max_examples: EXAMPLES,
    };
    let port = free_port();
    // Emulation is slow: the deadline is generous, and the round closes at quorum anyway.
    let top = "min_clients = 1\nquorum = 1\nround_timeout_secs = 3600.0";
    let config = fed.aggregator_config("embedded", port, 1, top, "epochs = 2");
    let mut aggregator = fed.start_aggregator(&config, "aggregator");
    let sniffer = Sniffer::start(port, &fed.fleet, MAX_PACKET);

    let summary = dir.path().join("summary.json");
    let mut cmd = Command::new(workspace_root().join("cross/qemu-run"));
    cmd.arg(arch)
        .arg(&binary)
        .args(["--broker", &format!("mqtt://127.0.0.1:{port}")])
        .args(["--fleet", &fed.fleet, "--client-id", CLIENT])
        .args(["--run-id", &fed.run_id.to_string()])
        .arg("--model-dir")
        .arg(backbone())
        .args(["--runtime", "tract", "--peft", "lora", "--image-size", "96"])
        .args(["--dataset", "fashion-mnist", "--partition", "dirichlet"])
        .args(["--alpha", "0.5", "--num-clients", &fed.clients.to_string()])
        .args(["--client-index", "0", "--seed", "3"])
        .args(["--max-examples", &EXAMPLES.to_string()])
        .args(["--max-packet-bytes", &MAX_PACKET.to_string()])
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .arg("--summary-json")
        .arg(&summary);
    let mut client = Proc::spawn(CLIENT, cmd);

    let status = aggregator
        .wait_exit(Duration::from_secs(1800))
        .expect("the aggregator did not finish its round within 30 minutes");
    assert!(status.success(), "aggregator exited with {status}");
    let status = client
        .wait_exit(Duration::from_secs(120))
        .expect("the board's client did not exit after the run was done");
    assert!(status.success(), "the board's client exited with {status}");
    std::thread::sleep(Duration::from_millis(500));

    // What travelled: the board's update, and a new global equal to FedAvg over it.
    let seen = observe(&sniffer.messages());
    let updates = seen
        .updates
        .get(&1)
        .expect("no update for round 1 observed");
    let (examples, _) = updates
        .get(CLIENT)
        .unwrap_or_else(|| panic!("no update from {CLIENT}: {:?}", updates.keys()));
    assert_eq!(*examples, EXAMPLES as u64);
    let (compared, differing) = check_fedavg(&seen, 1);
    assert_eq!(compared, 25_610, "LoRA r=8 + head on EfficientNet-Lite0");
    assert_eq!(differing, 0, "{differing} values differ from FedAvg");
    let moved = seen.globals[&0]
        .iter()
        .zip(&seen.globals[&1])
        .flat_map(|((_, a), (_, b))| a.iter().zip(b))
        .filter(|(a, b)| a != b)
        .count();
    assert!(moved > 0, "the global adapter did not change in round 1");

    // What the aggregator and the client recorded.
    let rec = round_record(&fed.report(), 1);
    assert_eq!(rec["status"], "ok", "{rec}");
    assert_eq!(rec["clients_ok"], 1, "{rec}");
    let loss = rec["train_loss"].as_f64().expect("a train loss in round 1");
    assert!(loss.is_finite() && loss > 0.0, "train loss {loss}");
    let text = std::fs::read_to_string(&summary).expect("the client's summary.json");
    let s: serde_json::Value = serde_json::from_str(&text).expect("summary.json is JSON");
    assert_eq!(
        (&s["exit"], &s["rounds_trained"], &s["updates_sent"]),
        (&"run_done".into(), &1.into(), &1.into()),
        "{s}"
    );
    eprintln!(
        "{arch}: round 1 on the board: {moved} of {compared} global values moved, \
         train loss {loss:.4}"
    );
}

#[test]
#[ignore = "needs the cross-built edge client: make test-cross"]
fn aarch64_client_under_qemu_trains_a_round_against_the_host_aggregator() {
    one_round_on_the_board("aarch64", "FEDPEFT_BOARD_CLIENT_AARCH64");
}

#[test]
#[ignore = "needs the cross-built edge client: make test-cross"]
fn armv7_client_under_qemu_trains_a_round_against_the_host_aggregator() {
    one_round_on_the_board("armv7", "FEDPEFT_BOARD_CLIENT_ARMV7");
}
