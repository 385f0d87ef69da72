//! The link part of a trial's results: per round and client, the bytes each way, the time the
//! client's update took to cross its link (first byte to last byte out of the shaper) and the
//! global adapter's, beside what the configured rate alone predicts; the round's wall time
//! from the aggregator's report; and, with kernel shaping, the veth's own byte counters next to
//! the relay's. Added to `report.json` under `links` (see [`crate::report`]), written row by
//! row to `links.csv`, and printed.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use fedpeft_config::report::Report;
use serde::{Deserialize, Serialize};

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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundLinks {
    pub round: u32,
    /// The aggregator's round duration: announcement to aggregation.
    pub wall_secs: Option<f64>,
    pub clients: Vec<ClientRound>,
}

/// Which mechanism applied each property.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    pub rate: String,
    pub latency: String,
    pub jitter: String,
    pub loss: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkReport {
    /// [`LinkReport::SCHEMA`].
    pub schema: String,
    pub mechanism: Mechanism,
    pub applied: Applied,
    pub clients: Vec<ClientLinkReport>,
    pub rounds: Vec<RoundLinks>,
}

fn rate_secs(bytes: u64, burst: u64, bytes_per_sec: f64) -> f64 {
    bytes.saturating_sub(burst) as f64 / bytes_per_sec
}

impl LinkReport {
    /// The schema name the `links` section carries.
    pub const SCHEMA: &str = "fedpeft-fleet-links/1";

    /// The measurements of `stats` (one per client, in order) and `kernel`'s counters; the
    /// rounds' wall times from the aggregator's `report`, if it wrote one.
    pub fn build(
        trial: &Trial,
        plan: &LinkPlan,
        mechanism: Mechanism,
        netem: bool,
        stats: Vec<LinkStats>,
        kernel: Option<Vec<KernelCounters>>,
        report: Option<&Report>,
    ) -> LinkReport {
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
            }
            .into(),
            latency: shaped.into(),
            jitter: shaped.into(),
            loss: shaped.into(),
        };
        // A round's wall time: the aggregator's duration of it (none if it wrote no report).
        let wall_secs = |round: u32| {
            let rounds = report.map_or(&[][..], |r| &r.rounds[..]);
            let r = rounds.iter().find(|r| r.round == round)?;
            Some(r.duration_ms as f64 / 1000.0)
        };
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
                wall_secs: wall_secs(round),
                clients: rows,
            });
        }
        LinkReport {
            schema: LinkReport::SCHEMA.into(),
            mechanism,
            applied,
            clients,
            rounds,
        }
    }

    /// Writes `links.csv`, one line per round and client.
    pub fn write_csv(&self, out_dir: &Path) -> anyhow::Result<()> {
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::relay::RoundFlow;
    use crate::report::TrialReport;
    use crate::report::fixtures::{report, round};

    /// Two LTE-M clients, two rounds, user-space links.
    fn trial() -> Trial {
        Trial::parse(
            r#"
            name = "t"
            rounds = 2
            clients = 2
            [model]
            backbone = "models/build/efficientnet-lite0"
            [data]
            [broker]
            max_packet_bytes = 16384
            [links]
            profile = "lte-m"
            mechanism = "userspace"
            "#,
            Path::new("t.toml"),
        )
        .unwrap()
    }

    /// Each round's wall time comes from the aggregator's report, the bytes and times from the
    /// relays; the section reads back from `report.json` as it was built.
    #[test]
    fn the_links_section_takes_wall_times_from_the_report_and_reads_back() {
        let trial = trial();
        let plan = trial.links.clone().unwrap();
        let mut stats = vec![LinkStats::default(), LinkStats::default()];
        stats[0].up_bytes = 5000;
        stats[0].up.insert(
            1,
            RoundFlow {
                bytes: 5000,
                model_bytes: 4000,
                model_first_s: Some(1.0),
                model_last_s: Some(1.5),
                lost_segments: 0,
            },
        );
        let mut aggregator = report(vec![round(0, &[], 0), round(1, &["client-00"], 1)]);
        aggregator.rounds[1].duration_ms = 2500;
        let links = LinkReport::build(
            &trial,
            &plan,
            Mechanism::Userspace,
            false,
            stats,
            None,
            Some(&aggregator),
        );
        assert_eq!(links.rounds.len(), 2);
        assert_eq!(links.rounds[0].wall_secs, Some(2.5));
        assert_eq!(links.rounds[1].wall_secs, None, "round 2 not in the report");
        let c = &links.rounds[0].clients[0];
        assert_eq!((c.update_bytes, c.update_send_secs), (4000, Some(0.5)));
        assert_eq!(links.applied.rate, "userspace-token-bucket");

        let dir = tempfile::tempdir().unwrap();
        let mut written = TrialReport::new(aggregator);
        written.links = Some(links.clone());
        written.write(dir.path()).unwrap();
        assert_eq!(TrialReport::read(dir.path()).unwrap(), written);
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(TrialReport::path(dir.path())).unwrap()).unwrap();
        assert_eq!(json["links"]["clients"][0]["profile"], "lte-m");
        assert_eq!(
            json["links"]["clients"][0]["up_kbit"],
            plan.clients[0].link.up_kbit
        );
        assert_eq!(json["links"]["mechanism"], "userspace");

        // An aggregator that wrote no report: the section alone, and the CSV.
        let dir = tempfile::tempdir().unwrap();
        TrialReport::write_links_only(dir.path(), &links).unwrap();
        links.write_csv(dir.path()).unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(TrialReport::path(dir.path())).unwrap()).unwrap();
        assert_eq!(json.as_object().unwrap().len(), 1);
        assert_eq!(json["links"]["schema"], LinkReport::SCHEMA);
        let csv = std::fs::read_to_string(dir.path().join("links.csv")).unwrap();
        assert_eq!(csv.lines().count(), 1 + 2 * 2);
    }
}
