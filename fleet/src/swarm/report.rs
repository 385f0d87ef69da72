//! The swarm's report: per round what was sampled, sent, acknowledged and refused, the round's
//! wall time as the swarm saw it, the check of the published global adapter against the exact
//! FedAvg of the honest updates, and the CPU and memory of the processes it watched (read from
//! `/proc`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedpeft_protocol::{DType, Envelope, GlobalAdapter, Tensor, Values};
use serde_json::{Value, json};

use super::shared::{BadKind, Global, RoundStats};
use super::template::{Named, Variants, expected_fedavg};

/// CPU seconds (user + system) and memory of a process, from `/proc/PID/stat` and `status`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcSample {
    pub cpu_s: f64,
    pub rss_bytes: u64,
    pub hwm_bytes: u64,
}

/// Clock ticks per second of `/proc/PID/stat` (`getconf CLK_TCK`; 100 on Linux).
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// Reads one sample of process `pid` (`self` for this process); `None` once it is gone.
pub fn sample(pid: &str, ticks: f64) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3 (state) on.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    Some(ProcSample {
        cpu_s: (utime + stime) / ticks,
        rss_bytes: kb("VmRSS:"),
        hwm_bytes: kb("VmHWM:"),
    })
}

/// Samples of the watched processes (and the swarm itself, as `swarm`) every 100 ms.
#[derive(Debug, Default)]
pub struct Watch {
    /// name → (ms since the swarm started, sample).
    pub series: BTreeMap<String, Vec<(f64, ProcSample)>>,
}

impl Watch {
    /// Samples `procs` (name, pid) until `stop` is set; `now_ms` is the swarm's clock.
    pub async fn run(
        watch: Arc<Mutex<Watch>>,
        procs: Vec<(String, String)>,
        now_ms: impl Fn() -> f64,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let ticks = clock_ticks();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let t = now_ms();
            let samples: Vec<(String, ProcSample)> = procs
                .iter()
                .filter_map(|(name, pid)| Some((name.clone(), sample(pid, ticks)?)))
                .collect();
            if let Ok(mut w) = watch.lock() {
                for (name, s) in samples {
                    w.series.entry(name).or_default().push((t, s));
                }
            }
        }
    }

    /// The last sample at or before `t` (or the first one).
    fn at(series: &[(f64, ProcSample)], t: f64) -> Option<ProcSample> {
        let i = series.partition_point(|(x, _)| *x <= t);
        series.get(i.saturating_sub(1)).map(|(_, s)| *s)
    }

    /// Per process: CPU seconds used between `from` and `to` (ms), and the largest RSS sampled
    /// in between.
    pub fn window(&self, from: f64, to: f64) -> BTreeMap<String, Value> {
        self.series
            .iter()
            .filter_map(|(name, s)| {
                let a = Self::at(s, from)?;
                let b = Self::at(s, to)?;
                let peak = s
                    .iter()
                    .filter(|(t, _)| *t >= from && *t <= to)
                    .map(|(_, x)| x.rss_bytes)
                    .max()
                    .unwrap_or(b.rss_bytes);
                let secs = ((to - from) / 1e3).max(1e-9);
                Some((
                    name.clone(),
                    json!({
                        "cpu_seconds": round3(b.cpu_s - a.cpu_s),
                        "cpu_share": round3((b.cpu_s - a.cpu_s) / secs),
                        "peak_rss_bytes": peak,
                    }),
                ))
            })
            .collect()
    }

    /// Per process: the last sample (total CPU, RSS, VmHWM).
    pub fn totals(&self) -> BTreeMap<String, Value> {
        self.series
            .iter()
            .filter_map(|(name, s)| {
                let last = s.last()?.1;
                let first = s.first()?.1;
                Some((
                    name.clone(),
                    json!({
                        "cpu_seconds_total": round3(last.cpu_s),
                        "cpu_seconds_while_watched": round3(last.cpu_s - first.cpu_s),
                        "rss_bytes": last.rss_bytes,
                        "vm_hwm_bytes": s.iter().map(|(_, x)| x.hwm_bytes).max().unwrap_or(0),
                    }),
                ))
            })
            .collect()
    }
}

pub fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

/// How a published global adapter compares with the expected one.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub values: usize,
    pub bit_equal: usize,
    pub max_abs_diff: f64,
    pub max_rel_diff: f64,
    /// Bit-equal with an f32 global; within one quantization step with a lossy one.
    pub ok: bool,
}

/// Compares `got` (the published adapter, in `dtype`) with `expected`.
pub fn compare(expected: &Named, got: &Named, dtype: DType) -> Comparison {
    let mut c = Comparison {
        values: 0,
        bit_equal: 0,
        max_abs_diff: 0.0,
        max_rel_diff: 0.0,
        ok: expected.len() == got.len(),
    };
    for ((en, e), (gn, g)) in expected.iter().zip(got) {
        if en != gn || e.len() != g.len() {
            c.ok = false;
            continue;
        }
        let max = e.iter().fold(0f32, |m, x| m.max(x.abs()));
        let step = match dtype {
            DType::F32 => 0.0,
            DType::F16 => f64::from(max) * 2f64.powi(-10),
            DType::I8 => f64::from(max) / 127.0 * 1.001,
        };
        for (&x, &y) in e.iter().zip(g) {
            c.values += 1;
            if x.to_bits() == y.to_bits() {
                c.bit_equal += 1;
                continue;
            }
            let d = (f64::from(x) - f64::from(y)).abs();
            c.max_abs_diff = c.max_abs_diff.max(d);
            if x != 0.0 {
                c.max_rel_diff = c.max_rel_diff.max(d / f64::from(x.abs()));
            }
            if dtype == DType::F32 || d > step {
                c.ok = false;
            }
        }
    }
    c
}

/// The aggregator's `report.json`, if given and readable.
pub fn aggregator_report(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// The refusals a round's bad inputs should cause, by the aggregator's reason names.
pub fn expected_refusals(stats: &RoundStats) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (kind, n) in &stats.bad {
        *out.entry(kind.reason().to_string()).or_default() += *n as u64;
    }
    out
}

/// Everything needed to write one round's entry.
#[derive(Debug)]
pub struct RoundInput<'a> {
    pub round: u32,
    pub stats: &'a RoundStats,
    pub previous: Option<&'a Arc<Global>>,
    pub global: Option<&'a Arc<Global>>,
    pub variants: &'a [Variants],
    pub aggregator: Option<&'a Value>,
    pub watch: &'a Watch,
    pub expected_dir: Option<&'a Path>,
    pub run_id: u64,
}

/// One round's entry, and whether its checks passed.
pub fn round_entry(input: RoundInput<'_>) -> (Value, bool) {
    let s = input.stats;
    let round_ms = match (s.announce_first_ms, s.global_first_ms) {
        (Some(a), Some(g)) if g >= a => Some(g - a),
        _ => None,
    };
    let updates_per_s = round_ms
        .filter(|ms| *ms > 0.0)
        .map(|ms| round3(s.acknowledged as f64 / (ms / 1e3)));
    let mut ok = true;
    let check = match (input.previous, input.global) {
        (Some(prev), Some(got)) => {
            match expected_fedavg(&prev.tensors, &s.contributions, input.variants) {
                Some(expected) => {
                    let c = compare(&expected, &got.tensors, got.dtype);
                    ok &= c.ok;
                    let file = input.expected_dir.and_then(|dir| {
                        write_expected(dir, input.round, input.run_id, &expected).ok()
                    });
                    let mean_update_l2: f64 = expected
                        .iter()
                        .zip(&prev.tensors)
                        .flat_map(|((_, e), (_, p))| e.iter().zip(p))
                        .map(|(e, p)| (f64::from(*e) - f64::from(*p)).powi(2))
                        .sum::<f64>()
                        .sqrt();
                    json!({
                        "global_dtype": got.dtype.as_str(),
                        "values": c.values,
                        "bit_equal": c.bit_equal,
                        "max_abs_diff": c.max_abs_diff,
                        "max_rel_diff": c.max_rel_diff,
                        "ok": c.ok,
                        "expected_fedavg": {
                            "clients": s.acknowledged,
                            "examples": s.contributions.values().sum::<u64>(),
                            "mean_update_l2": mean_update_l2,
                            "file": file.map(|p| p.display().to_string()),
                        },
                    })
                }
                None => {
                    ok = false;
                    json!({ "ok": false, "why": "no acknowledged honest update" })
                }
            }
        }
        _ => {
            ok = false;
            json!({ "ok": false, "why": "the global adapter of this round or the previous one was not received" })
        }
    };
    let bad: BTreeMap<&str, usize> = BadKind::ALL
        .iter()
        .map(|k| (k.name(), s.bad.get(k).copied().unwrap_or(0)))
        .collect();
    let expected_refusals = expected_refusals(s);
    let aggregator = input.aggregator.and_then(|rep| {
        let rec = rep["rounds"]
            .as_array()?
            .iter()
            .find(|r| r["round"] == input.round)?
            .clone();
        let timing = rep["round_timing"]
            .as_array()
            .and_then(|t| t.iter().find(|r| r["round"] == input.round).cloned());
        let refused: BTreeMap<String, u64> = rec["rejected"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                    .filter(|(_, v)| *v > 0)
                    .collect()
            })
            .unwrap_or_default();
        let matches = refused == expected_refusals;
        Some(json!({
            "status": rec["status"],
            "duration_ms": rec["duration_ms"],
            "clients_ok": rec["clients_ok"],
            "clients_failed": rec["clients_failed"],
            "rejected": refused,
            "refusals_match": matches,
            "timing": timing,
        }))
    });
    if let Some(a) = &aggregator {
        ok &= a["refusals_match"] == true && a["status"] == "ok";
    }
    let window = match (s.announce_first_ms, s.global_first_ms) {
        (Some(a), Some(g)) if g >= a => input.watch.window(a, g),
        _ => BTreeMap::new(),
    };
    let entry = json!({
        "round": input.round,
        "sampled": s.sampled,
        "sampled_here": s.sampled_here,
        "sent": s.sent,
        "acknowledged": s.acknowledged,
        "bad_sent": bad,
        "expected_refusals": expected_refusals,
        "round_ms": round_ms.map(round3),
        "updates_per_second": updates_per_s,
        "announce_fanout_ms": s.announce_first_ms.zip(s.announce_last_ms).map(|(a, b)| round3(b - a)),
        "first_update_ms": s.announce_first_ms.zip(s.first_sent_ms).map(|(a, b)| round3(b - a)),
        "last_ack_ms": s.announce_first_ms.zip(s.last_acked_ms).map(|(a, b)| round3(b - a)),
        "global_fanout_ms": s.global_first_ms.zip(s.global_last_ms).map(|(a, b)| round3(b - a)),
        "announce_received_by": s.announce_seen,
        "global_received_by": s.global_seen,
        "global_check": check,
        "aggregator": aggregator,
        "processes": window,
    });
    (entry, ok)
}

/// Writes the expected global adapter of `round` as the envelope an aggregator would publish
/// (`fedpeft-decode` reads it).
fn write_expected(
    dir: &Path,
    round: u32,
    run_id: u64,
    expected: &Named,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let tensors = expected
        .iter()
        .map(|(name, v)| {
            Tensor::dense(name, &[v.len() as u32], Values::F32(v.clone()))
                .map_err(|e| anyhow::anyhow!("{e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let bytes = Envelope::new(run_id, round, GlobalAdapter { round, tensors })
        .encode()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let path = dir.join(format!("round-{round:04}.bin"));
    std::fs::write(&path, bytes)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_can_be_sampled() {
        let s = sample("self", clock_ticks()).unwrap();
        assert!(s.rss_bytes > 0 && s.hwm_bytes >= s.rss_bytes);
        assert!(sample("999999999", 100.0).is_none());
    }

    #[test]
    fn comparison_is_exact_for_f32_and_one_step_for_int8() {
        let e: Named = vec![("w".into(), vec![1.0, -0.5, 0.25])];
        let same = compare(&e, &e, DType::F32);
        assert!(same.ok && same.bit_equal == 3);
        let off: Named = vec![("w".into(), vec![1.0, -0.5, 0.250_000_03])];
        assert!(!compare(&e, &off, DType::F32).ok);
        let q: Named = vec![("w".into(), vec![1.0, -0.5, 0.25 + 1.0 / 200.0])];
        assert!(compare(&e, &q, DType::I8).ok);
        let far: Named = vec![("w".into(), vec![1.0, -0.5, 0.3])];
        assert!(!compare(&e, &far, DType::I8).ok);
    }
}
