//! The link part of a trial's results: per round and client, the bytes each way, the time the
//! client's update took to cross its link (first byte to last byte out of the shaper) and the
//! global adapter's, beside what the configured rate alone predicts; the round's wall time
//! from the aggregator's report; and, with kernel shaping, the veth's own byte counters next to
//! the relay's. Added to `report.json` under `links`, written row by row to `links.csv`, and
//! printed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

use crate::links::{ClientLink, LinkPlan, Mechanism};
use crate::netns::Counters;
use crate::relay::LinkStats;
use crate::trial::Trial;

/// "2 x nb-iot, 2 x lte-m".
pub fn profile_summary(clients: &[ClientLink]) -> String {
    let mut runs: Vec<(String, usize)> = Vec::new();
    for c in clients {
        match runs.last_mut() {
            Some((p, n)) if *p == c.profile => *n += 1,
            _ => runs.push((c.profile.clone(), 1)),
        }
    }
    runs.iter()
        .map(|(p, n)| format!("{n} x {p}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A client's veth counters over the run, and the same read inside its namespace.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelCounters {
    /// Host-side veth: bytes received (= sent by the client) and sent, over the run.
    pub up_bytes: u64,
    pub down_bytes: u64,
    pub up_packets: u64,
    pub down_packets: u64,
    /// `ip -s link` inside the namespace at the end (its end's tx / rx since creation).
    pub inside_up_bytes: Option<u64>,
    pub inside_down_bytes: Option<u64>,
}

impl KernelCounters {
    pub fn between(before: Counters, after: Counters, inside: Option<(u64, u64)>) -> Self {
        KernelCounters {
            up_bytes: after.up_bytes - before.up_bytes,
            down_bytes: after.down_bytes - before.down_bytes,
            up_packets: after.up_packets - before.up_packets,
            down_packets: after.down_packets - before.down_packets,
            inside_up_bytes: inside.map(|i| i.0),
            inside_down_bytes: inside.map(|i| i.1),
        }
    }
}

/// One client's link over the whole run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientLinkReport {
    pub client: String,
    #[serde(flatten)]
    pub link: ClientLink,
    /// MQTT bytes through the relay (the runner's accounting).
    pub relay_up_bytes: u64,
    pub relay_down_bytes: u64,
    pub connections: u64,
    /// With kernel shaping: the veth's counters (Ethernet frames: payload plus TCP/IP/Ethernet
    /// headers and ACKs) and their ratio to the relay's bytes.
    pub kernel: Option<KernelCounters>,
    pub kernel_to_relay_up: Option<f64>,
    pub kernel_to_relay_down: Option<f64>,
}

/// One client in one round.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientRound {
    pub client: String,
    pub profile: String,
    pub up_bytes: u64,
    pub down_bytes: u64,
    /// The update's PUBLISH packets, and first byte to last byte out of the link.
    pub update_bytes: u64,
    pub update_send_secs: Option<f64>,
    /// (update_bytes - burst) / up rate: the rate's share of that time.
    pub update_rate_secs: f64,
    pub global_bytes: u64,
    pub global_recv_secs: Option<f64>,
    pub global_rate_secs: f64,
    pub lost_segments: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RoundLinks {
    pub round: u32,
    /// The aggregator's round duration: announcement to aggregation.
    pub wall_secs: Option<f64>,
    pub clients: Vec<ClientRound>,
}

/// Which mechanism applied each property.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Applied {
    pub rate: &'static str,
    pub latency: &'static str,
    pub jitter: &'static str,
    pub loss: &'static str,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LinkReport {
    pub schema: &'static str,
    pub mechanism: Mechanism,
    pub applied: Applied,
    pub clients: Vec<ClientLinkReport>,
    pub rounds: Vec<RoundLinks>,
}

fn rate_secs(bytes: u64, burst: u64, bytes_per_sec: f64) -> f64 {
    bytes.saturating_sub(burst) as f64 / bytes_per_sec
}

impl LinkReport {
    pub fn build(
        trial: &Trial,
        plan: &LinkPlan,
        mechanism: Mechanism,
        netem: bool,
        stats: Vec<LinkStats>,
        kernel: Option<Vec<KernelCounters>>,
        out_dir: &Path,
    ) -> anyhow::Result<LinkReport> {
        let kernel_mode = mechanism == Mechanism::Kernel;
        let shaped = if kernel_mode && netem {
            "kernel-netem"
        } else {
            "userspace-relay"
        };
        let applied = Applied {
            rate: if kernel_mode {
                "kernel-tbf"
            } else {
                "userspace-token-bucket"
            },
            latency: shaped,
            jitter: shaped,
            loss: shaped,
        };
        // Round durations from the aggregator's report (absent if it wrote none).
        let durations: BTreeMap<u32, f64> = std::fs::read_to_string(out_dir.join("report.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["rounds"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|r| {
                Some((
                    r["round"].as_u64()? as u32,
                    r["duration_ms"].as_f64()? / 1000.0,
                ))
            })
            .collect();
        let mut clients = Vec::new();
        for (i, (s, link)) in stats.iter().zip(&plan.clients).enumerate() {
            let k = kernel.as_ref().map(|k| k[i].clone());
            let ratio = |kb: u64, rb: u64| (rb > 0).then(|| kb as f64 / rb as f64);
            clients.push(ClientLinkReport {
                client: trial.client_id(i),
                link: link.clone(),
                relay_up_bytes: s.up_bytes,
                relay_down_bytes: s.down_bytes,
                connections: s.connections,
                kernel_to_relay_up: k.as_ref().and_then(|k| ratio(k.up_bytes, s.up_bytes)),
                kernel_to_relay_down: k.as_ref().and_then(|k| ratio(k.down_bytes, s.down_bytes)),
                kernel: k,
            });
        }
        let mut rounds = Vec::new();
        for round in 1..=trial.rounds {
            let mut rows = Vec::new();
            for (i, (s, link)) in stats.iter().zip(&plan.clients).enumerate() {
                let up = s.up.get(&round).cloned().unwrap_or_default();
                let down = s.down.get(&round).cloned().unwrap_or_default();
                rows.push(ClientRound {
                    client: trial.client_id(i),
                    profile: link.profile.clone(),
                    up_bytes: up.bytes,
                    down_bytes: down.bytes,
                    update_bytes: up.model_bytes,
                    update_send_secs: up.model_secs(),
                    update_rate_secs: rate_secs(
                        up.model_bytes,
                        link.burst_bytes,
                        link.link.up_bytes_per_sec(),
                    ),
                    global_bytes: down.model_bytes,
                    global_recv_secs: down.model_secs(),
                    global_rate_secs: rate_secs(
                        down.model_bytes,
                        link.burst_bytes,
                        link.link.down_bytes_per_sec(),
                    ),
                    lost_segments: up.lost_segments + down.lost_segments,
                });
            }
            rounds.push(RoundLinks {
                round,
                wall_secs: durations.get(&round).copied(),
                clients: rows,
            });
        }
        Ok(LinkReport {
            schema: "fedpeft-fleet-links/1",
            mechanism,
            applied,
            clients,
            rounds,
        })
    }

    /// Adds `links` to `report.json` (the aggregator's) and writes `links.csv`.
    pub fn write(&self, out_dir: &Path) -> anyhow::Result<()> {
        let path = out_dir.join("report.json");
        let mut report: serde_json::Value = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", path.display()))?,
            Err(_) => serde_json::json!({}),
        };
        report["links"] = serde_json::to_value(self)?;
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        let mut csv = String::from(
            "round,client,profile,round_wall_secs,update_bytes,update_send_secs,update_rate_secs,\
             global_bytes,global_recv_secs,global_rate_secs,up_bytes,down_bytes,lost_segments\n",
        );
        let opt = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_default();
        for r in &self.rounds {
            for c in &r.clients {
                let _ = writeln!(
                    csv,
                    "{},{},{},{},{},{},{:.3},{},{},{:.3},{},{},{}",
                    r.round,
                    c.client,
                    c.profile,
                    opt(r.wall_secs),
                    c.update_bytes,
                    opt(c.update_send_secs),
                    c.update_rate_secs,
                    c.global_bytes,
                    opt(c.global_recv_secs),
                    c.global_rate_secs,
                    c.up_bytes,
                    c.down_bytes,
                    c.lost_segments
                );
            }
        }
        let path = out_dir.join("links.csv");
        std::fs::write(&path, csv).with_context(|| format!("writing {}", path.display()))
    }

    /// The printed summary.
    pub fn print(&self) {
        let a = &self.applied;
        println!(
            "fleet: links ({:?}): rate by {}, latency by {}, jitter by {}, loss by {}",
            self.mechanism, a.rate, a.latency, a.jitter, a.loss
        );
        println!(
            "{:>5} {:>8} {:>10} {:>8} {:>12} {:>9} {:>9} {:>12} {:>9} {:>9}",
            "round",
            "wall s",
            "client",
            "profile",
            "update B",
            "send s",
            "rate s",
            "global B",
            "recv s",
            "rate s"
        );
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
        for r in &self.rounds {
            for c in &r.clients {
                println!(
                    "{:>5} {:>8} {:>10} {:>8} {:>12} {:>9} {:>9.3} {:>12} {:>9} {:>9.3}",
                    r.round,
                    opt(r.wall_secs),
                    c.client,
                    c.profile,
                    c.update_bytes,
                    opt(c.update_send_secs),
                    c.update_rate_secs,
                    c.global_bytes,
                    opt(c.global_recv_secs),
                    c.global_rate_secs
                );
            }
        }
        for c in &self.clients {
            let mut line = format!(
                "fleet: {} ({}): relay counted {} B up, {} B down",
                c.client, c.link.profile, c.relay_up_bytes, c.relay_down_bytes
            );
            if let Some(k) = &c.kernel {
                let _ = write!(
                    line,
                    "; veth counted {} B up, {} B down (x{:.3} / x{:.3} the relay's: TCP/IP and \
                     Ethernet headers, ACKs)",
                    k.up_bytes,
                    k.down_bytes,
                    c.kernel_to_relay_up.unwrap_or(f64::NAN),
                    c.kernel_to_relay_down.unwrap_or(f64::NAN)
                );
                if let (Some(u), Some(d)) = (k.inside_up_bytes, k.inside_down_bytes) {
                    let _ = write!(line, "; inside the namespace {u} B sent, {d} B received");
                }
            }
            println!("{line}");
        }
    }
}
