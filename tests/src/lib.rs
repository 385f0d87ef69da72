//! Helpers for fedpeft's end-to-end tests (`tests/tests/*.rs`).
//!
//! The end-to-end tests run the real binaries (`aggregator`, `edge-client`) as separate
//! processes against a real MQTT broker on loopback: the aggregator's embedded rumqttd, or a
//! Mosquitto started here on a free port, or a NATS cluster ([`nats`]). Every process is owned
//! by a guard that kills it when the test ends, pass or fail.

pub mod e2e;
pub mod nats;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The workspace root (the folder holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Where cargo put this build's binaries (honours `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => workspace_root().join("target"),
    }
}

/// Path of a workspace binary built in the same profile as this test. The Makefile builds the
/// binaries before the tests run; a missing binary is a clear failure, not a skip.
pub fn binary(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps; binaries in target/<profile>.
    let exe = std::env::current_exe().expect("current test executable");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| target_dir().join("debug"));
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "binary `{name}` not found at {}: build it first with `cargo build --bins` (make test does)",
        path.display()
    );
    path
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    // Not an ephemeral port (the kernel's `ip_local_port_range`, 32768-60999 by default): a
    // port the kernel hands out for `bind(0)` is released again here, and the next outgoing
    // connection of any test (each client opens several) may take it as its source port before
    // the broker meant for it binds. Candidates below that range are handed out by nobody else;
    // the start is spread by process id and time so parallel test processes rarely meet, and
    // each candidate is checked by binding it.
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let seed = std::process::id().wrapping_mul(7919) ^ nanos;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + seed.wrapping_add(n.wrapping_mul(101)) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral loopback port")
}

/// Waits until something accepts TCP connections on `127.0.0.1:port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let start = Instant::now();
    while start.elapsed() < timeout {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A child process that is killed when dropped, with its output captured line by line.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    output: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr captured (and echoed to the test's stderr, prefixed
    /// with `name`, so a failing test shows what each process said).
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({cmd:?}): {e}"));
        let output = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        Self::pump(name, out, output.clone());
        Self::pump(name, err, output.clone());
        Proc {
            name: name.to_string(),
            child: Some(child),
            output,
        }
    }

    fn pump(name: &str, stream: impl Read + Send + 'static, sink: Arc<Mutex<Vec<String>>>) {
        let name = name.to_string();
        thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                eprintln!("[{name}] {line}");
                sink.lock().expect("output lock").push(line);
            }
        });
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> Vec<String> {
        self.output.lock().expect("output lock").clone()
    }

    /// Waits for a printed line containing `needle`; returns it.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> Option<String> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(line) = self.output().into_iter().find(|l| l.contains(needle)) {
                return Some(line);
            }
            thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Waits for the process to exit by itself; `None` on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The operating-system process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// SIGKILL: the process gets no chance to clean up (crash testing).
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let pid = self.pid();
        if pid == 0 {
            return None;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        let status = self.wait_exit(grace);
        if status.is_none() {
            self.kill_hard();
        }
        self.child = None;
        status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_hard();
    }
}

/// A client update as the scripted clients of the end-to-end tests send it: `tensors` are the
/// delta, the training metrics are placeholders the aggregator only reports.
pub fn client_update(
    client: &str,
    round: u32,
    sequence: u32,
    num_examples: u64,
    tensors: Vec<fedpeft_protocol::Tensor>,
) -> fedpeft_protocol::ClientUpdate {
    fedpeft_protocol::ClientUpdate {
        client: fedpeft_protocol::ClientId::new(client).expect("a valid client id"),
        round,
        sequence,
        num_examples,
        metrics: fedpeft_protocol::TrainMetrics {
            loss: 1.0,
            accuracy: 0.5,
            steps: 3,
            elapsed_ms: 10,
            epsilon: None,
        },
        tensors,
    }
}

/// A Mosquitto broker on a free loopback port, stopped when dropped.
#[derive(Debug)]
pub struct Mosquitto {
    pub port: u16,
    proc: Proc,
    conf: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts `mosquitto` (Debian package `mosquitto`, installed by `scripts/setup.sh`) with
    /// anonymous access on 127.0.0.1 only and an explicit packet size limit. It keeps nothing
    /// on disk: a restart loses every session and retained message.
    pub fn start(max_packet_bytes: u32) -> Mosquitto {
        Self::start_with(max_packet_bytes, "")
    }

    /// [`Mosquitto::start`] with `extra` lines at the end of its configuration (a bridge's
    /// `connection` stanza, say).
    pub fn start_with(max_packet_bytes: u32, extra: &str) -> Mosquitto {
        let dir = tempfile::tempdir().expect("temp dir for mosquitto");
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_packet_size {max_packet_bytes}\nlog_dest stderr\nlog_type error\nlog_type warning\n{extra}"
            ),
        )
        .expect("write mosquitto.conf");
        let proc = Self::spawn(&conf, port);
        Mosquitto {
            port,
            proc,
            conf,
            _dir: dir,
        }
    }

    fn spawn(conf: &Path, port: u16) -> Proc {
        let exe = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .expect("mosquitto not installed: run scripts/setup.sh (apt package `mosquitto`)");
        let mut cmd = Command::new(exe);
        cmd.arg("-c").arg(conf);
        let proc = Proc::spawn("mosquitto", cmd);
        assert!(
            wait_for_port(port, Duration::from_secs(10)),
            "mosquitto did not listen on 127.0.0.1:{port}"
        );
        proc
    }

    /// SIGKILLs the broker: every connection drops, sessions and retained messages are lost.
    pub fn kill(&mut self) {
        self.proc.kill_hard();
    }

    /// Starts the broker again on the same port and config (after [`Mosquitto::kill`]).
    pub fn restart(&mut self) {
        self.proc.kill_hard();
        self.proc = Self::spawn(&self.conf, self.port);
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

/// Everything published under one fleet's topics, as the broker delivered it to an observer
/// that subscribed to `fedpeft/v1/{fleet}/#` (QoS 1). The end-to-end tests use it to check what
/// the aggregator and the clients really sent, independently of their own logs and reports.
/// Messages as (topic, payload), in delivery order.
pub type Recorded = Vec<(String, Vec<u8>)>;

pub struct Sniffer {
    messages: Arc<Mutex<Recorded>>,
    client: rumqttc::Client,
}

impl Sniffer {
    /// Connects to `127.0.0.1:port` and records every message under `fedpeft/v1/{fleet}/`,
    /// reconnecting (and subscribing again) if the broker goes away. Returns once the first
    /// subscription is acknowledged.
    pub fn start(port: u16, fleet: &str, max_packet_bytes: usize) -> Sniffer {
        let mut opts = rumqttc::MqttOptions::new(format!("sniffer-{port}"), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(max_packet_bytes + 1024, max_packet_bytes + 1024);
        let (client, mut connection) = rumqttc::Client::new(opts, 1024);
        let filter = format!("fedpeft/v1/{fleet}/#");
        let resubscribe = client.clone();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = messages.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    // Every (re)connection is a clean session: subscribe again, so the record
                    // goes on across a broker restart.
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        let _ =
                            resubscribe.try_subscribe(filter.clone(), rumqttc::QoS::AtLeastOnce);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        sink.lock()
                            .expect("sniffer lock")
                            .push((p.topic.clone(), p.payload.to_vec()));
                    }
                    Ok(_) => {}
                    Err(_) => thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the sniffer's subscription was not acknowledged within 20 s");
        Sniffer { messages, client }
    }

    /// A copy of everything recorded so far, in delivery order.
    pub fn messages(&self) -> Recorded {
        self.messages.lock().expect("sniffer lock").clone()
    }
}

impl std::fmt::Debug for Sniffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sniffer")
            .field("messages", &self.messages.lock().map(|m| m.len()))
            .finish_non_exhaustive()
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
    }
}

/// An HTTP/1.1 response: status code, headers (lower-case names) and body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`), the response read to
/// its end; `None` when nothing accepts the connection.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<HttpResponse> {
    use std::io::Write;
    let addr: SocketAddr = addr
        .trim_start_matches("http://")
        .parse()
        .expect("an ip:port address");
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes()).ok()?;
    // The server may answer (413) and close before the whole body is sent.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(HttpResponse {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    })
}
