//! A NATS cluster on loopback for the end-to-end tests: `nats-server` (Debian package
//! `nats-server`, 2.9.10 on Debian 12, installed by `scripts/setup.sh`) nodes routed to each
//! other, each with JetStream (where NATS keeps MQTT sessions, QoS 1 messages and retained
//! messages, replicated over the cluster) and an MQTT listener.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{Proc, free_port};

/// One node: its MQTT and monitoring ports and its process.
#[derive(Debug)]
pub struct NatsNode {
    /// `server_name`: `n1`, `n2`, ...
    pub name: String,
    /// The MQTT listener.
    pub mqtt_port: u16,
    /// The HTTP monitoring endpoint (`/jsz` and friends).
    pub monitor_port: u16,
    proc: Proc,
}

/// A cluster of `nats-server` nodes on free loopback ports, stopped when dropped.
#[derive(Debug)]
pub struct NatsCluster {
    pub nodes: Vec<NatsNode>,
    _dir: tempfile::TempDir,
}

/// The nats-server executable (Debian installs it in /usr/sbin).
fn executable() -> PathBuf {
    ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("nats-server not installed: run scripts/setup.sh (apt package `nats-server`)")
}

/// The ports of one node: NATS clients, routes, MQTT, HTTP monitoring.
#[derive(Debug, Clone, Copy)]
struct Ports {
    client: u16,
    route: u16,
    mqtt: u16,
    monitor: u16,
}

/// The config file of node `name`: its ports, routes to every node (itself included: the
/// server skips its own), a JetStream store of its own, MQTT on loopback.
fn config(
    name: &str,
    Ports {
        client,
        route,
        mqtt,
        monitor,
    }: Ports,
    routes: &[u16],
    store: &Path,
) -> String {
    let replicas = routes.len().min(3);
    let routes = routes
        .iter()
        .map(|p| format!("nats-route://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"server_name: {name}
listen: 127.0.0.1:{client}
http: 127.0.0.1:{monitor}
# No `max_payload`: 2.9 does not apply it to MQTT packets (QoS 1 publishes of 4 MiB cross the
# cluster with the default 1 MB), so the fleet's packet limit is the only one.
cluster {{
  name: fedpeft
  listen: 127.0.0.1:{route}
  routes: [{routes}]
}}
jetstream {{
  store_dir: "{store}"
}}
mqtt {{
  listen: 127.0.0.1:{mqtt}
  # Sessions, QoS 1 messages and retained messages live in JetStream streams that the first
  # MQTT connection creates. Left unset, 2.9 counts the routes in this file to size them (a
  # node that lists only the others makes 2 replicas in a 3-node cluster, and a 2-replica
  # stream stops when either holder dies); with 3, a stream keeps its quorum (2 of 3) when
  # one node dies.
  stream_replicas: {replicas}
}}
"#,
        store = store.display(),
    )
}

impl NatsCluster {
    /// Starts `nodes` routed nodes and returns once the cluster has a JetStream meta leader
    /// and every node accepts MQTT connections (the first one creates the MQTT streams, which
    /// needs JetStream up on enough nodes to place their replicas; connections are refused
    /// until then). A node that cannot bind one of its ports (free when drawn, taken since by
    /// another test process: `free_port` checks, it cannot reserve) stops the attempt, and the
    /// cluster starts again on other ports.
    pub fn start(nodes: usize) -> NatsCluster {
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            let cluster = Self::spawn(nodes);
            match cluster.wait_ready(Duration::from_secs(60)) {
                Ok(()) => return cluster,
                Err(fatal) if attempt < ATTEMPTS && fatal.contains("address already in use") => {
                    eprintln!(
                        "NATS cluster, attempt {attempt}: {fatal}; starting again on other ports"
                    );
                }
                Err(e) => panic!("{e}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn spawn(nodes: usize) -> NatsCluster {
        let dir = tempfile::tempdir().expect("temp dir for the NATS cluster");
        let ports: Vec<Ports> = (0..nodes)
            .map(|_| Ports {
                client: free_port(),
                route: free_port(),
                mqtt: free_port(),
                monitor: free_port(),
            })
            .collect();
        let routes: Vec<u16> = ports.iter().map(|p| p.route).collect();
        let exe = executable();
        let nodes: Vec<NatsNode> = ports
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let name = format!("n{}", i + 1);
                let conf = dir.path().join(format!("{name}.conf"));
                let store = dir.path().join(&name);
                std::fs::write(&conf, config(&name, p, &routes, &store))
                    .expect("write the NATS config");
                let mut cmd = Command::new(&exe);
                cmd.arg("-c").arg(&conf);
                NatsNode {
                    proc: Proc::spawn(&format!("nats-{name}"), cmd),
                    name,
                    mqtt_port: p.mqtt,
                    monitor_port: p.monitor,
                }
            })
            .collect();
        NatsCluster { nodes, _dir: dir }
    }

    /// Waits for the meta leader on every node, then for MQTT on every node; a node's fatal
    /// error (`[FTL]`, after which it exits) ends the wait at once.
    fn wait_ready(&self, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            let mut led = 0;
            for node in &self.nodes {
                let log = node.proc.output();
                if let Some(fatal) = log.iter().find(|l| l.contains("[FTL]")) {
                    return Err(format!("{}: {fatal}", node.name));
                }
                // "Self is new JetStream cluster metadata leader" on the leader, "JetStream
                // cluster new metadata leader: n2/fedpeft" on the others.
                if log.iter().any(|l| l.contains("metadata leader")) {
                    led += 1;
                }
            }
            if led == self.nodes.len() {
                break;
            }
            if start.elapsed() >= limit {
                return Err(format!(
                    "{} of {} nodes saw a JetStream meta leader within {limit:?}",
                    led,
                    self.nodes.len()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for node in &self.nodes {
            while !mqtt_accepts(node.mqtt_port) {
                if start.elapsed() >= limit {
                    return Err(format!(
                        "{}: MQTT on 127.0.0.1:{} did not accept a session within {limit:?}",
                        node.name, node.mqtt_port
                    ));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(())
    }

    /// `mqtt://127.0.0.1:<port>` of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("mqtt://127.0.0.1:{}", self.nodes[i].mqtt_port)
    }

    /// The URLs of `nodes`, in that order, as a `broker.url` list.
    pub fn urls(&self, nodes: impl IntoIterator<Item = usize>) -> String {
        nodes
            .into_iter()
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node leading each JetStream stream (`$MQTT_msgs` → `1`), as node `alive` reports
    /// them on its monitoring endpoint (`/jsz`).
    pub fn stream_leaders(&self, alive: usize) -> BTreeMap<String, usize> {
        let addr = format!("127.0.0.1:{}", self.nodes[alive].monitor_port);
        let response = crate::http(&addr, "GET", "/jsz?accounts=true&streams=true", &[], b"")
            .unwrap_or_else(|| {
                panic!("{}: no answer on http://{addr}/jsz", self.nodes[alive].name)
            });
        // Go's HTTP server sends a long answer in chunks.
        let body = if response.header("transfer-encoding") == Some("chunked") {
            dechunk(&response.body)
        } else {
            response.body
        };
        let jsz: serde_json::Value = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("http://{addr}/jsz: not JSON ({e})"));
        let mut leaders = BTreeMap::new();
        for account in jsz["account_details"].as_array().into_iter().flatten() {
            for stream in account["stream_detail"].as_array().into_iter().flatten() {
                let (Some(name), Some(leader)) = (
                    stream["name"].as_str(),
                    stream["cluster"]["leader"].as_str(),
                ) else {
                    continue;
                };
                if let Some(node) = self.nodes.iter().position(|n| n.name == leader) {
                    leaders.insert(name.to_string(), node);
                }
            }
        }
        leaders
    }

    /// SIGKILLs node `i`: its connections drop, and the rest of the cluster carries on with
    /// the replicas of what it stored.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].proc.kill_hard();
    }

    /// What node `i` printed (its log).
    pub fn log(&self, i: usize) -> Vec<String> {
        self.nodes[i].proc.output()
    }
}

/// Whether an MQTT client gets a CONNACK that accepts it from `127.0.0.1:port` (a clean
/// session, so nothing stays behind).
fn mqtt_accepts(port: u16) -> bool {
    let mut opts = rumqttc::MqttOptions::new(format!("probe-{port}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10))
        .set_clean_session(true);
    let (client, mut connection) = rumqttc::Client::new(opts, 8);
    let accepted = matches!(
        connection.recv_timeout(Duration::from_secs(10)),
        Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))))
            if ack.code == rumqttc::ConnectReturnCode::Success
    );
    if accepted {
        let _ = client.disconnect();
        // Let the DISCONNECT go out.
        let _ = connection.recv_timeout(Duration::from_millis(500));
    }
    accepted
}

/// The body of a `Transfer-Encoding: chunked` answer: hex size, CRLF, data, CRLF, ... up to
/// the empty chunk.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return body;
        };
        let line = String::from_utf8_lossy(&raw[..eol]);
        let size =
            usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        let data = eol + 2;
        if size == 0 || raw.len() < data + size {
            return body;
        }
        body.extend_from_slice(&raw[data..data + size]);
        raw = &raw[(data + size + 2).min(raw.len())..];
    }
}
