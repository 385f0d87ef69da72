//! Watching a fleet live: a real trial (`fedpeft-fleet run`, the aggregator with its embedded
//! broker, edge clients on the real backbone) with `[monitor]` on and a bearer token.
//! - `/metrics` passes `promtool check metrics` (Debian's prometheus package) and agrees with
//!   the report;
//! - the dashboard, opened in headless Chromium (Debian's chromium), shows every finished
//!   round in its chart and rounds table, and its client table matches the report;
//! - stalled dashboard connections (they never read) do not hold the run back, while a live one
//!   keeps receiving snapshots;
//! - bad requests get 404, 405, 413 and 401, and the run goes on.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fedpeft_tests::e2e::small_trial;
use fedpeft_tests::{Proc, binary, free_port, http};

const TOKEN: &str = "monitor-token-0123456789";
const ROUNDS: u32 = 3;
const CLIENTS: usize = 3;

fn auth() -> String {
    format!("Bearer {TOKEN}")
}

fn get(addr: &str, path: &str) -> fedpeft_tests::HttpResponse {
    let a = auth();
    http(addr, "GET", path, &[("Authorization", &a)], b"")
        .unwrap_or_else(|| panic!("GET {path}: no answer"))
}

/// An SSE connection that sends its request and then never reads.
fn stalled(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let req = format!(
        "GET /api/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {}\r\n\r\n",
        auth()
    );
    s.write_all(req.as_bytes()).unwrap();
    s
}

/// Reads server-sent events from `/api/events` on a thread; returns the count of `state`
/// events seen (shared).
fn live_reader(addr: &str) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (addr, n) = (addr.to_string(), seen.clone());
    std::thread::spawn(move || {
        let mut s = stalled(&addr);
        s.set_read_timeout(Some(Duration::from_secs(600))).ok();
        let mut buf = [0u8; 65536];
        let mut text = String::new();
        while let Ok(k) = s.read(&mut buf) {
            if k == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&buf[..k]));
            while let Some(i) = text.find("\n\n") {
                if text[..i].contains("event: state") {
                    n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                text.drain(..i + 2);
            }
        }
    });
    seen
}

fn chromium() -> PathBuf {
    for c in ["chromium", "chromium-browser"] {
        if let Ok(o) = Command::new("which").arg(c).output()
            && o.status.success()
        {
            return PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        }
    }
    panic!("chromium is not installed (scripts/setup.sh installs Debian's chromium)");
}

fn chromium_cmd(profile: &Path) -> Command {
    let mut c = Command::new(chromium());
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
        "--virtual-time-budget=4000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}

#[test]
fn a_trial_is_watched_live_in_metrics_and_in_a_browser() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let top = format!(
        "round_timeout_secs = 240\n\n[monitor]\nlisten = \"{addr}\"\ntoken_file = \"{}\"\n\
         linger_secs = 300\nlabels = {{ \"client-00\" = \"wifi\" }}\n",
        token_file.display()
    );
    let trial = small_trial(dir.path(), "monitor", CLIENTS, ROUNDS, &top, "");
    let out = dir.path().join("out");
    let mut cmd = Command::new(binary("fedpeft-fleet"));
    cmd.arg("run").arg(&trial).arg("--out").arg(&out);
    let mut fleet = Proc::spawn("fedpeft-fleet", cmd);

    // As soon as the monitor answers: stalled dashboards, and a live one.
    let start = Instant::now();
    while http(&addr, "GET", "/", &[], b"").is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "the monitor never answered:\n{}",
            fleet.output().join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let stalls: Vec<TcpStream> = (0..16).map(|_| stalled(&addr)).collect();
    let live = live_reader(&addr);

    // Bad requests while the run goes on.
    let r = http(&addr, "GET", "/metrics", &[], b"").unwrap();
    assert_eq!(r.status, 401, "no token");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = http(
        &addr,
        "GET",
        "/metrics",
        &[("Authorization", "Bearer wrong-token-xxxxx")],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 401, "wrong token");
    assert_eq!(get(&addr, "/nothing").status, 404);
    let r = http(
        &addr,
        "POST",
        "/metrics",
        &[("Authorization", &auth())],
        b"x",
    )
    .unwrap();
    assert_eq!((r.status, r.header("allow")), (405, Some("GET, HEAD")));
    let big = vec![b'x'; 4096];
    let r = http(
        &addr,
        "GET",
        "/api/state",
        &[("Authorization", &auth())],
        &big,
    )
    .unwrap();
    assert_eq!(r.status, 413);
    // The page itself is public (it holds no data).
    assert_eq!(http(&addr, "GET", "/", &[], b"").unwrap().status, 200);

    // The run ends; the monitor lingers with the final state.
    let report_path = out.join("report.json");
    let report = loop {
        if let Ok(b) = std::fs::read(&report_path)
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b)
            && v["finished"] == true
        {
            let s = get(&addr, "/api/state").json();
            if s["finished"] == true {
                break v;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(900),
            "the trial did not finish:\n{}",
            fleet.output().join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    drop(stalls);
    let events = live.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!("a live dashboard connection received {events} snapshots");
    assert!(
        events > ROUNDS as usize,
        "the live connection got {events} snapshots for {ROUNDS} rounds"
    );

    metrics_agree_with_the_report(&addr, &report, dir.path());
    the_browser_shows_the_run(&addr, &report, dir.path());

    fleet.terminate(Duration::from_secs(30));
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no `{line_start}` in\n{text}"))
}

fn metrics_agree_with_the_report(addr: &str, report: &serde_json::Value, dir: &Path) {
    let m = get(addr, "/metrics");
    assert_eq!(m.status, 200);
    assert!(
        m.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        m.header("content-type")
    );
    let text = String::from_utf8(m.body).unwrap();
    let file = dir.join("metrics.txt");
    std::fs::write(&file, &text).unwrap();
    let check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .expect("promtool (scripts/setup.sh installs Debian's prometheus)");
    assert!(
        check.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let rounds = report["rounds"].as_array().unwrap();
    let ok = rounds.iter().filter(|r| r["status"] == "ok").count();
    assert_eq!(
        metric(&text, "fedpeft_rounds_total{status=\"ok\"}"),
        ok as f64
    );
    let accepted: u64 = rounds
        .iter()
        .map(|r| r["clients_ok"].as_u64().unwrap())
        .sum();
    assert_eq!(
        metric(&text, "fedpeft_updates_accepted_total"),
        accepted as f64
    );
    assert_eq!(metric(&text, "fedpeft_run_finished"), 1.0);
    assert_eq!(metric(&text, "fedpeft_clients_joined"), CLIENTS as f64);
    assert_eq!(
        metric(&text, "fedpeft_round_duration_seconds_count"),
        (rounds.len() - 1) as f64
    );
    let up: f64 = text
        .lines()
        .filter(|l| l.starts_with("fedpeft_bytes_total{direction=\"up\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(up, report["totals"]["up_bytes"].as_f64().unwrap(), "{text}");
    let last = rounds.last().unwrap()["eval_accuracy"].as_f64().unwrap();
    assert!((metric(&text, "fedpeft_eval_accuracy_ratio") - last).abs() < 1e-12);
}

/// Headless Chromium renders the page (with the token in its fragment); its DOM shows every
/// finished round and one client row per client with the report's traffic. A screenshot goes
/// to `target/monitor-dashboard.png` for the book.
fn the_browser_shows_the_run(addr: &str, report: &serde_json::Value, dir: &Path) {
    let url = format!("http://{addr}/#token={TOKEN}");
    let o = chromium_cmd(&dir.join("profile"))
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        dom.contains("data-points"),
        "chromium: {}\n{dom}",
        String::from_utf8_lossy(&o.stderr)
    );
    let rounds = report["rounds"].as_array().unwrap();
    let evaluated: Vec<String> = rounds
        .iter()
        .filter(|r| r["eval_accuracy"].is_number())
        .map(|r| r["round"].to_string())
        .collect();
    let want = format!(
        "id=\"chart-round\" data-points=\"{}\" data-rounds=\"{}\"",
        evaluated.len(),
        evaluated.join(",")
    );
    assert!(dom.contains(&want), "`{want}` not in the DOM:\n{dom}");
    for r in rounds {
        let needle = format!("<tr data-round=\"{}\"", r["round"]);
        assert!(
            dom.contains(&needle),
            "no rounds-table row {needle}:\n{dom}"
        );
    }
    for (id, traffic) in report["clients"].as_object().unwrap() {
        let needle = format!(
            "<tr data-client=\"{id}\" data-trained=\"{}\" data-up=\"{}\" data-down=\"{}\"",
            rounds
                .iter()
                .filter(|r| r["round"] != 0
                    && r["sampled"].as_array().unwrap().iter().any(|c| c == id)
                    && !r["failed_clients"].as_object().unwrap().contains_key(id))
                .count(),
            traffic["up_bytes"],
            traffic["down_bytes"],
        );
        assert!(dom.contains(&needle), "no client row `{needle}`:\n{dom}");
    }
    assert!(dom.contains(">wifi<"), "client-00's label is not shown");
    assert!(dom.contains("finished: 3 of 3 rounds"), "{dom}");

    let shot = fedpeft_tests::target_dir().join("monitor-dashboard.png");
    let o = chromium_cmd(&dir.join("profile"))
        .arg(format!("--screenshot={}", shot.display()))
        .arg("--window-size=1280,1500")
        .arg(&url)
        .output()
        .unwrap();
    assert!(
        shot.is_file(),
        "no screenshot: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("screenshot: {}", shot.display());
}
