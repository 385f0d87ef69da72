//! Runs the real `fedpeft-decode` binary on real payloads.

use std::io::Write;
use std::process::{Command, Stdio};

use fedpeft_protocol::*;
use serde_json::Value;

fn update_payload() -> Vec<u8> {
    let mut rng = SplitMix64::new(1);
    let tensors = vec![
        Tensor::encode(
            "head.bias",
            &[2],
            &[0.5, -1.0],
            Codec::dense(DType::F32),
            &mut rng,
        )
        .unwrap(),
        Tensor::sparse(
            "lora.b",
            &[10],
            vec![1, 7],
            Values::I8 {
                scale: 0.5,
                values: vec![127, -3],
            },
        )
        .unwrap(),
    ];
    let update = ClientUpdate {
        client: ClientId::new("pi-01").unwrap(),
        round: 5,
        sequence: 9,
        num_examples: 600,
        metrics: TrainMetrics {
            loss: 0.5,
            accuracy: 0.75,
            steps: 38,
            elapsed_ms: 1500,
            epsilon: None,
        },
        tensors,
    };
    Envelope::new(0x1234, 5, update).encode().unwrap()
}

fn run(args: &[&str], stdin: &[u8]) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fedpeft-decode"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn decoding_an_update_from_a_file_prints_every_field_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("update.bin");
    std::fs::write(&path, update_payload()).unwrap();
    let (ok, stdout, stderr) = run(&[path.to_str().unwrap()], b"");
    assert!(ok, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["kind"], "client_update");
    assert_eq!(v["run_id"], 0x1234);
    assert_eq!(v["body"]["client"], "pi-01");
    assert_eq!(v["body"]["sequence"], 9);
    assert_eq!(
        v["body"]["tensors"][0]["values"],
        serde_json::json!([0.5, -1.0])
    );
    assert_eq!(v["body"]["tensors"][1]["layout"], "sparse");
    assert_eq!(
        v["body"]["tensors"][1]["indices"],
        serde_json::json!([1, 7])
    );
    assert_eq!(
        v["body"]["tensors"][1]["values"],
        serde_json::json!([63.5, -1.5])
    );
    assert_eq!(v["valid"], true);
}

#[test]
fn summary_mode_reports_statistics_and_the_topic_check_from_stdin() {
    let topic = "fedpeft/v1/lab/update/pi-01";
    let (ok, stdout, stderr) = run(&["--summary", "--topic", topic], &update_payload());
    assert!(ok, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    let t = &v["body"]["tensors"][1];
    assert!(t.get("values").is_none());
    assert_eq!(t["stats"]["max"], 63.5);
    assert_eq!(t["stats"]["zeros"], 8);
    assert_eq!(v["topic"]["matches_payload"], true);
    assert_eq!(v["topic"]["retain"], false);
    let (_, stdout, _) = run(
        &["--topic", "fedpeft/v1/lab/update/other"],
        &update_payload(),
    );
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["topic"]["matches_payload"], false);
}

#[test]
fn a_trailing_newline_from_mosquitto_sub_is_tolerated() {
    let mut bytes = update_payload();
    bytes.push(b'\n');
    let (ok, stdout, stderr) = run(&[], &bytes);
    assert!(ok, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["stripped_newline"], true);
}

#[test]
fn garbage_exits_non_zero_with_a_clear_error() {
    let (ok, stdout, stderr) = run(&[], b"hello, broker");
    assert!(!ok);
    assert!(stdout.is_empty());
    assert!(
        stderr.contains("standard input (13 bytes) is not a fedpeft payload"),
        "{stderr}"
    );
    assert!(
        stderr.contains("unsupported protocol version 104"),
        "{stderr}"
    );
    let mut corrupt = update_payload();
    corrupt[10] ^= 1;
    let (ok, _, stderr) = run(&[], &corrupt);
    assert!(!ok);
    assert!(stderr.contains("checksum mismatch"), "{stderr}");
    let (ok, _, stderr) = run(&["/nonexistent/payload.bin"], b"");
    assert!(!ok);
    assert!(
        stderr.contains("reading /nonexistent/payload.bin"),
        "{stderr}"
    );
}

#[test]
fn a_reader_closing_the_pipe_early_is_not_an_error() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fedpeft-decode"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close our end of stdout before the decoder writes, as `| head -0` would.
    drop(child.stdout.take());
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&update_payload())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
