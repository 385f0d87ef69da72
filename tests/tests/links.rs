//! Constrained links end to end: `fedpeft-fleet` runs a 2-client, 2-round LoRA trial (the real
//! aggregator with its embedded broker, real edge-client processes on EfficientNet-Lite0 at
//! 96 px, 64 examples each, the e2e activation cache) with every client's link shaped to
//! 512 kbit/s up and 1024 kbit/s down, once through kernel namespaces + tbf (needs root) and
//! once through the runner's user-space token-bucket relays. The measured update send time must
//! agree with the bytes actually sent over the configured rate, and the round must take at
//! least the download plus the upload.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fedpeft_tests::e2e::{FleetRun, backbone, round_record, run_fleet, shared_cache};

const UP_KBIT: f64 = 512.0;
const DOWN_KBIT: f64 = 1024.0;

fn trial(dir: &Path, mechanism: &str) -> std::path::PathBuf {
    let text = format!(
        r#"name = "links-{mechanism}"
rounds = 2
clients = 2
min_clients = 2
quorum = 2
round_timeout_secs = 240
seed = 3
cache_dir = "{cache}"

[model]
backbone = "{backbone}"
peft = "lora"
lora_rank = 8
lora_alpha = 16.0
runtime = "auto"
image_size = 96
eval_examples = 600

[data]
max_examples = 64

[local]
epochs = 1
batch_size = 32
learning_rate = 0.001
optimizer = "adamw"
update_dtype = "f32"

[broker]
max_packet_bytes = 65536

[links]
mechanism = "{mechanism}"
profile = "slow"
[links.profiles.slow]
up_kbit = {UP_KBIT:.1}
down_kbit = {DOWN_KBIT:.1}
latency_ms = 20.0
"#,
        cache = shared_cache().display(),
        backbone = backbone().display(),
    );
    let path = dir.join("trial.toml");
    std::fs::write(&path, text).expect("write trial");
    path
}

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Runs the trial with `mechanism`; returns the report with its `links` section and the
/// fleet's pid.
fn run(mechanism: &str) -> (serde_json::Value, u32) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = trial(dir.path(), mechanism);
    let out = dir.path().join("out");
    let FleetRun { report, pid } = run_fleet(&path, &out, Duration::from_secs(300));
    let csv = std::fs::read_to_string(out.join("links.csv")).expect("links.csv");
    assert_eq!(
        csv.lines().count(),
        1 + 2 * 2,
        "a header and a row per round and client"
    );
    (report, pid)
}

/// The checks both mechanisms must pass. `header_factor` is how many bytes the shaper counts
/// per byte the relay forwards (1 for the user-space bucket, which meters the TCP payload).
fn check(report: &serde_json::Value, header_factor: impl Fn(usize) -> f64, tolerance: f64) {
    let links = &report["links"];
    for round in 1..=2u32 {
        let rec = round_record(report, round);
        assert_eq!(rec["status"], "ok", "round {round}: {rec}");
        let l = &links["rounds"][(round - 1) as usize];
        assert_eq!(l["round"], round);
        let wall = f(&l["wall_secs"]);
        let mut update_sum = 0u64;
        for (i, c) in l["clients"].as_array().expect("clients").iter().enumerate() {
            let bytes = c["update_bytes"].as_u64().expect("update bytes");
            update_sum += bytes;
            // LoRA r=8 + head: 25 610 f32 values in two 64 KiB-limited chunks.
            assert!(
                (102_440..110_000).contains(&bytes),
                "round {round} client {i}: {bytes} update bytes"
            );
            let burst = links["clients"][i]["burst_bytes"].as_u64().expect("burst") as f64;
            let expected = (bytes as f64 * header_factor(i) - burst) / (UP_KBIT * 1000.0 / 8.0);
            let sent = f(&c["update_send_secs"]);
            let err = (sent - expected) / expected;
            eprintln!(
                "round {round} client {i}: update {bytes} B sent in {sent:.3} s; \
                 expected {expected:.3} s ({:+.1} %); round wall {wall:.2} s",
                100.0 * err
            );
            assert!(
                err.abs() <= tolerance,
                "round {round} client {i}: update took {sent:.3} s, the rate says {expected:.3} s \
                 ({:+.1} %, tolerance {:.0} %)",
                100.0 * err,
                100.0 * tolerance
            );
            // The round holds at least the global adapter's download and the update's upload.
            let global = c["global_bytes"].as_u64().expect("global bytes") as f64;
            let down = (global - burst) / (DOWN_KBIT * 1000.0 / 8.0);
            assert!(
                wall >= (1.0 - tolerance) * (down + expected),
                "round {round}: wall {wall:.3} s < download {down:.3} s + upload {expected:.3} s"
            );
        }
        // The relay's count of update bytes agrees with the aggregator's own count of what it
        // received that round (which adds the clients' small status messages).
        let agg_up = rec["traffic"]["up_bytes"]
            .as_u64()
            .expect("aggregator up bytes");
        assert!(
            update_sum <= agg_up && update_sum as f64 >= 0.99 * agg_up as f64,
            "round {round}: relay counted {update_sum} update bytes, the aggregator {agg_up}"
        );
    }
}

#[test]
fn userspace_token_buckets_pace_updates_at_the_configured_rate() {
    let (report, _) = run("userspace");
    let links = &report["links"];
    assert_eq!(links["mechanism"], "userspace");
    assert_eq!(links["applied"]["rate"], "userspace-token-bucket");
    // The bucket meters exactly the bytes the relay forwards; what is left is timing
    // granularity: the send time is read where whole 1448-byte segments leave the delay line
    // (one segment is 23 ms at 512 kbit/s, 1.4 % of the ~1.6 s upload) plus thread wake-up
    // latency on a loaded 2-core machine. 5 % covers both with room.
    check(&report, |_| 1.0, 0.05);
}

#[test]
fn kernel_namespaces_shape_updates_at_the_configured_rate_and_are_removed() {
    if fedpeft_fleet_is_root() {
        let (report, pid) = run("kernel");
        let links = &report["links"];
        assert_eq!(links["mechanism"], "kernel");
        assert_eq!(links["applied"]["rate"], "kernel-tbf");
        // tbf meters Ethernet frames, so the payload the relay counts costs more: the factor is
        // the kernel's own byte count over the relay's for that client (TCP/IP/Ethernet
        // headers, ~66 B per 1448-byte segment, plus ACKs of the downloads), which must lie
        // between 1 and 1.2. The remaining tolerance (10 %) is for what that run-wide factor
        // does not capture per upload (ACK share, TSO segment sizes) and tbf's burst.
        let factors: Vec<f64> = (0..2)
            .map(|i| {
                let c = &links["clients"][i];
                let k = f(&c["kernel_to_relay_up"]);
                assert!(
                    (1.0..1.2).contains(&k),
                    "client {i}: kernel/relay up = {k}: {c}"
                );
                let k_down = f(&c["kernel_to_relay_down"]);
                assert!(
                    (1.0..1.2).contains(&k_down),
                    "client {i}: kernel/relay down = {k_down}"
                );
                // The namespace's own end counted what the host's end did (within a few
                // packets: neighbour discovery and the like).
                let host = c["kernel"]["up_bytes"].as_u64().unwrap();
                let inside = c["kernel"]["inside_up_bytes"].as_u64().unwrap();
                assert!(
                    inside.abs_diff(host) < 2048,
                    "client {i}: veth {host} vs inside {inside}"
                );
                k
            })
            .collect();
        check(&report, |i| factors[i], 0.10);
        let left = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list");
        let left = String::from_utf8_lossy(&left.stdout);
        assert!(
            !left.contains(&format!("fedpeft-{pid}-")),
            "namespaces left behind by pid {pid}:\n{left}"
        );
        let links_left = Command::new("ip")
            .args(["-o", "link"])
            .output()
            .expect("ip link");
        let tag = format!("fh{pid:x}");
        assert!(
            !String::from_utf8_lossy(&links_left.stdout).contains(&tag),
            "veths {tag}* left behind"
        );
    } else {
        panic!(
            "NOT RUN: kernel link shaping needs root (network namespaces, veth, tc); this test \
             fails rather than pass without running. Run it as root, or deselect it explicitly."
        );
    }
}

fn fedpeft_fleet_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
