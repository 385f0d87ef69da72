//! Latency and throughput of `edge-client serve` (the figures of the book's results page
//! "Serving"): `concurrency` keep-alive connections each send `POST /predict` with one body
//! after another, for `requests` requests in all after `warmup` unmeasured ones.
//!
//! ```text
//! cargo run --release -p fedpeft-edge --example serve_load -- \
//!     http://127.0.0.1:8088 image.png [--type image/png] [--requests 200] [--concurrency 1] \
//!     [--warmup 10]
//! ```
//!
//! Prints one JSON object: latency percentiles (ms), requests/s and the rounds answered. A
//! request that gets anything but 200 is an error.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "serve_load URL BODY_FILE [--type T] [--requests N] [--concurrency C] [--warmup W]";
    let (url, body_file) = match args.as_slice() {
        [u, b, ..] => (u.clone(), b.clone()),
        _ => anyhow::bail!("usage: {usage}"),
    };
    let flag = |name: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| default.to_string())
    };
    let content_type = flag("--type", "image/png");
    let requests: usize = flag("--requests", "200").parse()?;
    let concurrency: usize = flag("--concurrency", "1").parse::<usize>()?.max(1);
    let warmup: usize = flag("--warmup", "10").parse()?;
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let body = std::fs::read(&body_file)?;
    let request = Arc::new(
        [
            format!(
                "POST /predict HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\n\
                 Content-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes(),
            body,
        ]
        .concat(),
    );

    // Warm-up on one connection: first-request costs (allocations, lazy init) stay out.
    let mut conn = Conn::open(&addr)?;
    for _ in 0..warmup {
        conn.send(&request)?;
    }

    let latencies = Arc::new(Mutex::new(Vec::with_capacity(requests)));
    let rounds = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (addr, request, latencies, rounds, next) = (
                addr.clone(),
                request.clone(),
                latencies.clone(),
                rounds.clone(),
                next.clone(),
            );
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut conn = Conn::open(&addr)?;
                while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < requests {
                    let t = Instant::now();
                    let answer = conn.send(&request)?;
                    let dt = t.elapsed();
                    latencies.lock().unwrap().push(dt);
                    if let Some(r) = answer.get("round").and_then(|r| r.as_u64()) {
                        rounds.lock().unwrap().insert(r);
                    }
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join()
            .map_err(|_| anyhow::anyhow!("a worker panicked"))??;
    }
    let wall = start.elapsed();
    let mut l = latencies.lock().unwrap().clone();
    l.sort();
    let pct = |q: f64| {
        let i = ((l.len() as f64 * q).ceil() as usize).clamp(1, l.len()) - 1;
        l[i].as_secs_f64() * 1e3
    };
    let out = serde_json::json!({
        "requests": l.len(),
        "concurrency": concurrency,
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": pct(1.0),
        "requests_per_s": l.len() as f64 / wall.as_secs_f64(),
        "rounds": *rounds.lock().unwrap(),
    });
    println!("{out}");
    Ok(())
}

/// One keep-alive connection.
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    fn open(addr: &str) -> anyhow::Result<Conn> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(300)))?;
        Ok(Conn {
            writer: s.try_clone()?,
            reader: BufReader::new(s),
        })
    }

    /// Sends one request and reads its response; anything but 200 is an error.
    fn send(&mut self, request: &[u8]) -> anyhow::Result<serde_json::Value> {
        self.writer.write_all(request)?;
        let mut status = String::new();
        self.reader.read_line(&mut status)?;
        let code: u16 = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("not an HTTP response: {status:?}"))?;
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse()?;
            }
        }
        let mut body = vec![0u8; len];
        self.reader.read_exact(&mut body)?;
        if code != 200 {
            anyhow::bail!("status {code}: {}", String::from_utf8_lossy(&body));
        }
        Ok(serde_json::from_slice(&body)?)
    }
}
