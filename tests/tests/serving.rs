//! Serving the federation's model over HTTP during a real fleet run: one edge client trains
//! with `--serve` (the global adapters it receives over the broker swapped in as they come),
//! and `edge-client serve --watch` beside the aggregator follows the globals it keeps. Both
//! answer `POST /predict` all through the run with ever newer rounds; the standalone server's
//! answer equals `edge-client predict`'s for the same round; and every bad request, and a
//! corrupt newer adapter, is refused while the server keeps answering with what it had.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use fedpeft_tests::e2e::Federation;
use fedpeft_tests::{HttpResponse, Proc, binary, free_port, http};

/// A Fashion-MNIST test image as PNG bytes, and its label.
fn png(i: usize) -> (Vec<u8>, u32) {
    let ds = fedpeft_backbone::data::fashion_mnist(false).expect("Fashion-MNIST test split");
    let img = image::GrayImage::from_raw(28, 28, ds.image(i).to_vec()).expect("28x28");
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .expect("encode PNG");
    (bytes, ds.labels[i])
}

fn predict_png(addr: &str, png: &[u8], token: Option<&str>) -> Option<HttpResponse> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "image/png")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    http(addr, "POST", "/predict?top_k=10", &headers, png)
}

/// Class probabilities of an answer, by class id.
fn probabilities(answer: &serde_json::Value) -> Vec<f64> {
    let mut p = vec![0.0; 10];
    for t in answer["top"].as_array().expect("top") {
        p[t["id"].as_u64().unwrap() as usize] = t["p"].as_f64().unwrap();
    }
    p
}

/// Rounds seen must never go back, and more than one must have been served.
fn check_rounds(name: &str, rounds: &[u64]) {
    assert!(
        rounds.windows(2).all(|w| w[0] <= w[1]),
        "{name}: rounds went back: {rounds:?}"
    );
    let mut distinct = rounds.to_vec();
    distinct.dedup();
    assert!(
        distinct.len() >= 2,
        "{name} never swapped in a newer global adapter: {rounds:?}"
    );
}

fn refused(r: Option<HttpResponse>, status: u16, needle: &str) {
    let r = r.expect("the server answers");
    let body = String::from_utf8_lossy(&r.body).to_string();
    assert_eq!(r.status, status, "{body}");
    assert!(body.contains(needle), "`{needle}` not in {body}");
}

#[test]
fn the_model_is_served_and_hot_swapped_during_a_fleet_run_and_bad_requests_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let rounds = 4;
    let fed = Federation {
        fleet: "serve".into(),
        run_id: 11,
        max_packet: 65536,
        dir: dir.path().to_path_buf(),
        clients: 2,
        max_examples: 48,
    };
    let broker_port = free_port();
    let top = "min_clients = 2\nquorum = 2\nround_timeout_secs = 240.0";
    let config = fed.aggregator_config("embedded", broker_port, rounds, top, "epochs = 1");
    let mut aggregator = fed.start_aggregator(&config, "aggregator");
    let url = format!("mqtt://127.0.0.1:{broker_port}");
    let serve_port = free_port();
    let fleet_addr = format!("127.0.0.1:{serve_port}");
    // Each update is held back a second so that every round lasts long enough to be seen.
    let slow = ["--straggle-secs", "1.5"];
    let mut clients = [
        fed.spawn_client_with(&url, 0, &["--serve", &fleet_addr, slow[0], slow[1]]),
        fed.spawn_client_with(&url, 1, &slow),
    ];

    // The standalone server, beside the aggregator, follows the globals it keeps.
    let out = fed.out();
    let token = "a-token-of-sixteen-chars";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let start = Instant::now();
    while !out.join("globals/index.json").is_file() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no globals index"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut cmd = Command::new(binary("edge-client"));
    cmd.arg("serve")
        .arg("--adapter")
        .arg(&out)
        .args(["--round", "last", "--watch", "--watch-ms", "200"])
        .args(["--listen", "127.0.0.1:0", "--max-body-kb", "64"])
        .arg("--token-file")
        .arg(&token_file);
    let mut server = Proc::spawn("serve", cmd);
    let line = server
        .wait_for_line("http://", Duration::from_secs(120))
        .expect("edge-client serve prints its address");
    let watch_addr = line[line.find("http://").unwrap()..].trim().to_string();

    // And one that follows the broker's retained global adapter, as an observer.
    let backbone = fedpeft_tests::e2e::backbone();
    let client_flags = |id: &str| -> Vec<String> {
        [
            "--broker",
            &url,
            "--fleet",
            &fed.fleet,
            "--run-id",
            "11",
            "--client-id",
            id,
            "--peft",
            "lora",
            "--image-size",
            "96",
            "--model-dir",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([backbone.display().to_string()])
        .collect()
    };
    let mut cmd = Command::new(binary("edge-client"));
    cmd.args(client_flags("viewer"))
        .args(["serve", "--from-broker", "--listen", "127.0.0.1:0"]);
    let broker_server = Proc::spawn("serve-broker", cmd);
    let line = broker_server
        .wait_for_line("http://", Duration::from_secs(120))
        .expect("edge-client serve --from-broker prints its address");
    let broker_addr = line[line.find("http://").unwrap()..].trim().to_string();

    let (image, _) = png(0);
    let png_path = dir.path().join("image.png");
    std::fs::write(&png_path, &image).unwrap();
    let mut broker_rounds = Vec::new();
    let mut from_broker: Option<serde_json::Value> = None;
    let (mut fleet_rounds, mut watch_rounds) = (Vec::new(), Vec::new());
    let mut not_ready = 0;
    let deadline = Instant::now() + Duration::from_secs(900);
    while aggregator.wait_exit(Duration::from_millis(100)).is_none() {
        assert!(
            Instant::now() < deadline,
            "the run did not finish in 15 minutes"
        );
        if let Some(r) = predict_png(&fleet_addr, &image, None) {
            match r.status {
                200 => fleet_rounds.push(r.json()["round"].as_u64().unwrap()),
                503 => {
                    assert!(
                        String::from_utf8_lossy(&r.body).contains("no global adapter yet"),
                        "{:?}",
                        String::from_utf8_lossy(&r.body)
                    );
                    not_ready += 1;
                }
                s => panic!("the fleet client's server answered {s}: {r:?}"),
            }
        }
        let r = predict_png(&watch_addr, &image, Some(token)).expect("serve answers");
        if r.status == 503 && watch_rounds.is_empty() {
            // Started before the aggregator kept its first global adapter.
            continue;
        }
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        watch_rounds.push(r.json()["round"].as_u64().unwrap());
        let r = predict_png(&broker_addr, &image, None).expect("serve --from-broker answers");
        match r.status {
            200 => broker_rounds.push(r.json()["round"].as_u64().unwrap()),
            503 if broker_rounds.is_empty() => {}
            s => panic!("serve --from-broker answered {s}: {r:?}"),
        }
        // Once, mid-run: predict with the broker's retained global adapter.
        if from_broker.is_none() && watch_rounds.last().is_some_and(|&r| r >= 1) {
            let o = Command::new(binary("edge-client"))
                .args(client_flags("viewer-2"))
                .args(["predict", "--from-broker", "--top-k", "10"])
                .arg(&png_path)
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let log = String::from_utf8_lossy(&o.stderr).to_string();
            let round: u64 = log
                .split("round=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|r| r.parse().ok())
                .unwrap_or_else(|| panic!("no round in {log}"));
            let mut v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            v["round"] = round.into();
            from_broker = Some(v);
        }
    }
    for c in &mut clients {
        let status = c
            .wait_exit(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("{} did not exit after the run", c.name));
        assert!(status.success(), "{} exited with {status}", c.name);
    }
    eprintln!("fleet client served rounds {fleet_rounds:?} ({not_ready} not ready)");
    eprintln!("standalone server served rounds {watch_rounds:?}");
    check_rounds("the fleet client's server", &fleet_rounds);
    eprintln!("serve --from-broker served rounds {broker_rounds:?}");
    check_rounds("edge-client serve --from-broker", &broker_rounds);
    drop(broker_server);

    // The standalone server ends on the last round, with what `predict` says for it.
    let start = Instant::now();
    let answer = loop {
        let r = predict_png(&watch_addr, &image, Some(token)).unwrap();
        let a = r.json();
        if a["round"] == u64::from(rounds) {
            break a;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "still on {a}");
        std::thread::sleep(Duration::from_millis(100));
    };
    watch_rounds.push(u64::from(rounds));
    check_rounds("edge-client serve --watch", &watch_rounds);
    let kept = |round: u64| -> serde_json::Value {
        let cli = Command::new(binary("edge-client"))
            .args(["predict", "--top-k", "10", "--round", &round.to_string()])
            .arg("--adapter")
            .arg(&out)
            .arg(&png_path)
            .output()
            .unwrap();
        assert!(
            cli.status.success(),
            "{}",
            String::from_utf8_lossy(&cli.stderr)
        );
        serde_json::from_slice(&cli.stdout).unwrap()
    };
    // predict --from-broker gave what the kept adapter of its round gives.
    let b = from_broker.expect("predict --from-broker ran during the run");
    let round = b["round"].as_u64().unwrap();
    let (got, want) = (probabilities(&b), probabilities(&kept(round)));
    for (a, w) in got.iter().zip(&want) {
        assert!(
            (a - w).abs() < 1e-6,
            "round {round}: broker {got:?}, kept {want:?}"
        );
    }
    let cli = Command::new(binary("edge-client"))
        .args(["predict", "--top-k", "10", "--round", &rounds.to_string()])
        .arg("--adapter")
        .arg(&out)
        .arg(&png_path)
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&cli.stdout).unwrap();
    let served = probabilities(&answer["predictions"][0]);
    let predicted = probabilities(&line);
    for (a, b) in served.iter().zip(&predicted) {
        assert!(
            (a - b).abs() < 1e-6,
            "served {served:?}, predict {predicted:?}"
        );
    }

    bad_requests(&watch_addr, token, &image);
    corrupt_adapter_is_refused(&out, &watch_addr, token, &image, rounds);
    server.terminate(Duration::from_secs(10));
}

/// Each bad request gets its status and a message naming what was wrong; the server answers
/// the next good one.
fn bad_requests(addr: &str, token: &str, image: &[u8]) {
    let auth = format!("Bearer {token}");
    let a = auth.as_str();
    refused(predict_png(addr, image, None), 401, "Bearer");
    refused(
        predict_png(addr, image, Some("wrong-token-of-16+")),
        401,
        "Bearer",
    );
    refused(
        http(addr, "GET", "/nothing", &[("Authorization", a)], b""),
        404,
        "no `/nothing` here",
    );
    let r = http(addr, "GET", "/predict", &[("Authorization", a)], b"").unwrap();
    assert_eq!((r.status, r.header("allow")), (405, Some("POST")));
    refused(
        http(addr, "DELETE", "/model", &[("Authorization", a)], b""),
        405,
        "takes GET",
    );
    let big = vec![0u8; 65 * 1024];
    refused(
        http(
            addr,
            "POST",
            "/predict",
            &[("Authorization", a), ("Content-Type", "image/png")],
            &big,
        ),
        413,
        "65536-byte limit",
    );
    refused(
        http(
            addr,
            "POST",
            "/predict",
            &[("Authorization", a), ("Content-Type", "image/png")],
            b"not a png at all",
        ),
        400,
        "cannot decode the image",
    );
    refused(
        http(
            addr,
            "POST",
            "/predict",
            &[("Authorization", a), ("Content-Type", "text/plain")],
            b"a text",
        ),
        415,
        "reads images, not texts",
    );
    refused(
        http(
            addr,
            "POST",
            "/predict",
            &[("Authorization", a), ("Content-Type", "application/json")],
            b"{\"images\": [\"!!\"]}",
        ),
        400,
        "not base64",
    );
    refused(
        http(
            addr,
            "POST",
            "/predict",
            &[("Authorization", a), ("Content-Type", "application/json")],
            b"{\"images\": []}",
        ),
        400,
        "no input",
    );
    refused(
        http(
            addr,
            "POST",
            "/predict",
            &[("Authorization", a), ("Content-Type", "video/mp4")],
            b"x",
        ),
        415,
        "content type `video/mp4`",
    );
    // JSON with base64 images: two at once.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(image);
    let body = serde_json::json!({"images": [b64, b64], "top_k": 2}).to_string();
    let r = http(
        addr,
        "POST",
        "/predict",
        &[("Authorization", a), ("Content-Type", "application/json")],
        body.as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let preds = r.json()["predictions"].as_array().unwrap().clone();
    assert_eq!(preds.len(), 2);
    assert_eq!(preds[0], preds[1]);
    assert_eq!(preds[0]["top"].as_array().unwrap().len(), 2);
}

/// A newer adapter file that is corrupt is refused (counted, its reason shown by `GET /model`)
/// and the server keeps answering with the round it had.
fn corrupt_adapter_is_refused(out: &Path, addr: &str, token: &str, image: &[u8], rounds: u32) {
    let auth = format!("Bearer {token}");
    let index_path = out.join("globals/index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let last = std::fs::read(out.join(format!("globals/round-{rounds:04}.bin"))).unwrap();
    let next = rounds + 1;
    let file = format!("globals/round-{next:04}.bin");
    std::fs::write(out.join(&file), &last[..last.len() / 2]).unwrap();
    index["rounds"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "round": next, "file": file, "bytes": last.len() / 2,
            "eval_accuracy": null, "eval_loss": null
        }));
    index["last"] = next.into();
    let tmp = out.join("globals/index.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::rename(&tmp, &index_path).unwrap();
    let start = Instant::now();
    let status = loop {
        let m = http(addr, "GET", "/model", &[("Authorization", &auth)], b"")
            .unwrap()
            .json();
        if m["status"]["refused_adapters"].as_u64() == Some(1) {
            break m["status"].clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not refused: {m}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let reason = status["last_refusal"].as_str().unwrap();
    assert!(reason.contains(&file), "{reason}");
    assert_eq!(status["round"], u64::from(rounds), "{status}");
    let r = predict_png(addr, image, Some(token)).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["round"], u64::from(rounds));
}
