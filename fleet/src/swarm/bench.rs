//! The swarm benchmark's summary (`fedpeft-fleet swarm --summarize DIR`): one row per run
//! folder (`DIR/*/bench.json`, written by `scripts/swarm/bench.sh`, beside the swarm's
//! `swarm.json`), as `results.md`, `results.csv` and `results.json`, and two plots (SVG and
//! PNG): round time and ingest rate against the number of clients, and the aggregator's peak
//! memory and CPU per round.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, bail};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What `bench.sh` says about one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchMeta {
    /// `embedded` or `mosquitto`.
    pub broker: String,
    /// `int8` or `f32`.
    pub dtype: String,
    pub clients: u64,
    #[serde(default)]
    pub bad_fraction: f64,
    /// Chunk size of the updates (bytes).
    #[serde(default)]
    pub chunk_bytes: u64,
    /// The aggregator's strategy.
    #[serde(default = "fedavg")]
    pub strategy: String,
    /// Mosquitto's `max_inflight_messages` (0: unlimited).
    #[serde(default)]
    pub mosquitto_inflight: Option<u64>,
    /// The swarm's `--train-ms` (0: every update at once).
    #[serde(default)]
    pub train_ms: u64,
}

fn fedavg() -> String {
    "fedavg".into()
}

/// One run's results: medians over its rounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchRow {
    #[serde(flatten)]
    pub meta: BenchMeta,
    pub rounds: usize,
    pub ok: bool,
    /// Announcement to global adapter, as the swarm saw it (median of the rounds), s.
    pub round_s: Option<f64>,
    /// The aggregator's own record of the round (announcement to close), s.
    pub aggregator_round_s: Option<f64>,
    pub updates_per_second: Option<f64>,
    /// CPU seconds the aggregator process used per round (median), and as a share of one core.
    pub aggregator_cpu_s: Option<f64>,
    pub aggregator_cpu_share: Option<f64>,
    /// VmHWM of the aggregator over the whole run (joins included).
    pub aggregator_peak_rss_mb: Option<f64>,
    /// The broker's CPU seconds per round (Mosquitto only: the embedded broker's are part of
    /// the aggregator's).
    pub broker_cpu_s: Option<f64>,
    pub broker_cpu_share: Option<f64>,
    pub broker_peak_rss_mb: Option<f64>,
    pub swarm_cpu_s: Option<f64>,
    pub swarm_per_session_kb: Option<f64>,
    pub seconds_to_connect_all: Option<f64>,
    pub refused: u64,
    pub disconnects: u64,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn per_round(rounds: &[Value], f: impl Fn(&Value) -> Option<f64>) -> Option<f64> {
    median(rounds.iter().filter_map(f).collect())
}

/// The row of one run folder (its `bench.json` and `swarm.json`).
pub fn row(dir: &Path) -> anyhow::Result<BenchRow> {
    let meta: BenchMeta = serde_json::from_str(
        &std::fs::read_to_string(dir.join("bench.json"))
            .with_context(|| format!("reading {}/bench.json", dir.display()))?,
    )
    .with_context(|| format!("{}/bench.json", dir.display()))?;
    let path = dir.join("swarm.json");
    let report: Value = match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).with_context(|| path.display().to_string())?,
        // A run that never produced a report (the swarm crashed, or was killed): a failed row.
        Err(_) => Value::Null,
    };
    let rounds: Vec<Value> = report["rounds"].as_array().cloned().unwrap_or_default();
    let proc_round = |name: &'static str, key: &'static str| {
        per_round(&rounds, move |r| r["processes"][name][key].as_f64())
    };
    let mb = |v: Option<f64>| v.map(|b| b / (1 << 20) as f64);
    let totals = &report["processes"];
    Ok(BenchRow {
        rounds: rounds.len(),
        ok: report["ok"] == true,
        round_s: per_round(&rounds, |r| r["round_ms"].as_f64()).map(|ms| ms / 1e3),
        aggregator_round_s: per_round(&rounds, |r| r["aggregator"]["duration_ms"].as_f64())
            .map(|ms| ms / 1e3),
        updates_per_second: per_round(&rounds, |r| r["updates_per_second"].as_f64()),
        aggregator_cpu_s: proc_round("aggregator", "cpu_seconds"),
        aggregator_cpu_share: proc_round("aggregator", "cpu_share"),
        aggregator_peak_rss_mb: mb(totals["aggregator"]["vm_hwm_bytes"].as_f64()),
        broker_cpu_s: proc_round("mosquitto", "cpu_seconds"),
        broker_cpu_share: proc_round("mosquitto", "cpu_share"),
        broker_peak_rss_mb: mb(totals["mosquitto"]["vm_hwm_bytes"].as_f64()),
        swarm_cpu_s: proc_round("swarm", "cpu_seconds"),
        swarm_per_session_kb: report["memory"]["per_session_bytes"]
            .as_f64()
            .map(|b| b / 1024.0),
        seconds_to_connect_all: report["sessions"]["seconds_to_connect_all"].as_f64(),
        refused: rounds
            .iter()
            .filter_map(|r| r["aggregator"]["rejected"].as_object())
            .flat_map(|m| m.values().filter_map(Value::as_u64))
            .sum(),
        disconnects: report["sessions"]["disconnects"].as_u64().unwrap_or(0),
        meta,
    })
}

/// Every run folder's row, sorted by broker, dtype, bad fraction and clients.
pub fn rows(dir: &Path) -> anyhow::Result<Vec<BenchRow>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.join("bench.json").is_file() {
            out.push(row(&path)?);
        }
    }
    out.sort_by(|a, b| {
        (&a.meta.broker, &a.meta.dtype)
            .cmp(&(&b.meta.broker, &b.meta.dtype))
            .then(a.meta.bad_fraction.total_cmp(&b.meta.bad_fraction))
            .then(a.meta.clients.cmp(&b.meta.clients))
    });
    if out.is_empty() {
        bail!(
            "{}: no run folders (with bench.json) to summarize",
            dir.display()
        );
    }
    Ok(out)
}

fn f(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "—".into(), |x| format!("{x:.digits$}"))
}

/// The Markdown table of `rows`.
pub fn markdown(rows: &[BenchRow]) -> String {
    let mut s = String::from(
        "| broker | dtype | bad | clients | round (s) | aggregator's round (s) | updates/s | \
         aggregator CPU s/round (share of a core) | aggregator peak RSS (MB) | broker CPU \
         s/round (share) | swarm CPU s/round | checks |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n",
    );
    for r in rows {
        let broker_cpu = if r.meta.broker == "embedded" {
            "in the aggregator".to_string()
        } else {
            format!("{} ({})", f(r.broker_cpu_s, 2), f(r.broker_cpu_share, 2))
        };
        s += &format!(
            "| {} | {} | {:.0} % | {} | {} | {} | {} | {} ({}) | {} | {} | {} | {} |\n",
            r.meta.broker,
            r.meta.dtype,
            100.0 * r.meta.bad_fraction,
            r.meta.clients,
            f(r.round_s, 2),
            f(r.aggregator_round_s, 2),
            f(r.updates_per_second, 0),
            f(r.aggregator_cpu_s, 2),
            f(r.aggregator_cpu_share, 2),
            f(r.aggregator_peak_rss_mb, 0),
            broker_cpu,
            f(r.swarm_cpu_s, 2),
            if r.ok {
                "ok".to_string()
            } else {
                format!("FAILED ({} rounds)", r.rounds)
            },
        );
    }
    s
}

/// Writes `results.md`, `results.csv`, `results.json` and the plots into `dir`.
pub fn summarize(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let rows = rows(dir)?;
    let mut written = Vec::new();
    let md = dir.join("results.md");
    std::fs::write(&md, markdown(&rows))?;
    written.push(md);
    let json = dir.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(&rows)? + "\n")?;
    written.push(json);
    let csv = dir.join("results.csv");
    let mut text = String::from(
        "broker,dtype,bad_fraction,clients,rounds,ok,round_s,aggregator_round_s,updates_per_second,aggregator_cpu_s,aggregator_cpu_share,aggregator_peak_rss_mb,broker_cpu_s,broker_cpu_share,swarm_cpu_s,swarm_per_session_kb\n",
    );
    let c = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x:.4}"));
    for r in &rows {
        text += &format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            r.meta.broker,
            r.meta.dtype,
            r.meta.bad_fraction,
            r.meta.clients,
            r.rounds,
            r.ok,
            c(r.round_s),
            c(r.aggregator_round_s),
            c(r.updates_per_second),
            c(r.aggregator_cpu_s),
            c(r.aggregator_cpu_share),
            c(r.aggregator_peak_rss_mb),
            c(r.broker_cpu_s),
            c(r.broker_cpu_share),
            c(r.swarm_cpu_s),
            c(r.swarm_per_session_kb),
        );
    }
    std::fs::write(&csv, text)?;
    written.push(csv);
    written.extend(plot(&rows, dir)?);
    Ok(written)
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("{e:?}")
}

fn font() -> anyhow::Result<()> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let candidates: Vec<PathBuf> = std::env::var_os("FEDPEFT_PLOT_FONT")
                .map(PathBuf::from)
                .into_iter()
                .chain(crate::plot::FONT_PATHS.iter().map(PathBuf::from))
                .collect();
            let path = candidates.iter().find(|p| p.is_file()).ok_or(
                "no font for plot text (install fonts-dejavu-core or set FEDPEFT_PLOT_FONT)",
            )?;
            let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{} is not a font plotters can read", path.display()))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// The series of the plots: one per (broker, dtype, bad fraction), points by clients.
fn series(
    rows: &[BenchRow],
    y: impl Fn(&BenchRow) -> Option<f64>,
) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut out: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for r in rows {
        let mut name = format!("{} {}", r.meta.broker, r.meta.dtype);
        if r.meta.strategy != "fedavg" {
            name += &format!(" {}", r.meta.strategy);
        }
        if r.meta.bad_fraction > 0.0 {
            name += &format!(" {:.0} % bad", 100.0 * r.meta.bad_fraction);
        }
        if r.meta.train_ms > 0 {
            name += &format!(" over {:.0} s", r.meta.train_ms as f64 / 1e3);
        }
        let Some(v) = y(r).filter(|v| *v > 0.0) else {
            continue;
        };
        let point = ((r.meta.clients as f64).log10(), v.log10());
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, pts)) => pts.push(point),
            None => out.push((name, vec![point])),
        }
    }
    out
}

/// A log-log panel: x = clients, y = `what`.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    y_desc: &str,
    lines: &[(String, Vec<(f64, f64)>)],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let pts = lines.iter().flat_map(|(_, p)| p.iter());
    let (mut xl, mut xh, mut yl, mut yh) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        (xl, xh, yl, yh) = (xl.min(x), xh.max(x), yl.min(y), yh.max(y));
    }
    if xl > xh {
        (xl, xh, yl, yh) = (2.0, 4.0, 0.0, 1.0);
    }
    let (xl, xh) = (xl.floor(), xh.ceil().max(xl.floor() + 1.0));
    let (yl, yh) = (yl.floor(), yh.ceil().max(yl.floor() + 1.0));
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .margin_right(32)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(xl - 0.1..xh + 0.1, yl..yh)
        .map_err(err)?;
    let fmt = |v: &f64| {
        let x = 10f64.powf(*v);
        if x >= 1000.0 {
            format!("{:.0}k", x / 1000.0)
        } else if x >= 1.0 {
            format!("{x:.0}")
        } else {
            format!("{x:.2}")
        }
    };
    chart
        .configure_mesh()
        .x_labels((xh - xl) as usize + 1)
        .y_labels((yh - yl) as usize + 1)
        .x_label_formatter(&fmt)
        .y_label_formatter(&fmt)
        .x_desc("clients sampled per round (log scale)")
        .y_desc(y_desc)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    for (i, (name, points)) in lines.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let style = ShapeStyle::from(&color).stroke_width(2);
        chart
            .draw_series(LineSeries::new(points.clone(), style))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    Ok(())
}

/// The plots' names (each as `.svg` and `.png`).
pub const PLOTS: [&str; 2] = ["swarm_round_time", "swarm_aggregator"];

fn draw<DB: DrawingBackend>(
    name: &str,
    rows: &[BenchRow],
    root: &DrawingArea<DB, Shift>,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(err)?;
    let (title, left, right) = match name {
        "swarm_round_time" => (
            "Swarm: round time and ingest rate (announcement to new global adapter)",
            (
                "round wall time",
                "seconds (log scale)",
                series(rows, |r| r.round_s),
            ),
            (
                "updates ingested per second",
                "updates/s (log scale)",
                series(rows, |r| r.updates_per_second),
            ),
        ),
        _ => (
            "Swarm: the aggregator process (embedded broker included when embedded)",
            (
                "peak RSS over the run (VmHWM)",
                "MB (log scale)",
                series(rows, |r| r.aggregator_peak_rss_mb),
            ),
            (
                "CPU per round",
                "CPU seconds (log scale)",
                series(rows, |r| r.aggregator_cpu_s),
            ),
        ),
    };
    let root = root.titled(title, ("sans-serif", 22)).map_err(err)?;
    let areas = root.split_evenly((1, 2));
    panel(&areas[0], left.0, left.1, &left.2)?;
    panel(&areas[1], right.0, right.1, &right.2)?;
    Ok(())
}

/// Draws [`PLOTS`] for `rows` into `dir`.
pub fn plot(rows: &[BenchRow], dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    font()?;
    let mut written = Vec::new();
    for name in PLOTS {
        let svg = dir.join(format!("{name}.svg"));
        let png = dir.join(format!("{name}.png"));
        {
            let root = SVGBackend::new(&svg, (1200, 520)).into_drawing_area();
            draw(name, rows, &root)?;
            root.present().map_err(err)?;
        }
        {
            let root = BitMapBackend::new(&png, (1200, 520)).into_drawing_area();
            draw(name, rows, &root)?;
            root.present().map_err(err)?;
        }
        written.push(svg);
        written.push(png);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bench_folder_summarizes_into_a_table_and_plots() {
        let dir = tempfile::tempdir().unwrap();
        for (n, ms) in [(100u64, 500.0), (1000, 4000.0)] {
            let run = dir.path().join(format!("embedded-int8-n{n}"));
            std::fs::create_dir_all(&run).unwrap();
            std::fs::write(
                run.join("bench.json"),
                format!(
                    r#"{{"broker":"embedded","dtype":"int8","clients":{n},"bad_fraction":0.0}}"#
                ),
            )
            .unwrap();
            let swarm = serde_json::json!({
                "ok": true,
                "rounds": [
                    {"round_ms": ms, "updates_per_second": n as f64 / ms * 1e3,
                     "aggregator": {"duration_ms": ms, "rejected": {}},
                     "processes": {"aggregator": {"cpu_seconds": 0.5, "cpu_share": 0.9}}},
                    {"round_ms": ms * 1.2, "updates_per_second": n as f64 / ms * 1e3,
                     "aggregator": {"duration_ms": ms, "rejected": {"bad_checksum": 2}},
                     "processes": {"aggregator": {"cpu_seconds": 0.7, "cpu_share": 0.8}}}
                ],
                "processes": {"aggregator": {"vm_hwm_bytes": 50 << 20}},
                "memory": {"per_session_bytes": 9000},
                "sessions": {"disconnects": 0}
            });
            std::fs::write(run.join("swarm.json"), swarm.to_string()).unwrap();
        }
        let rows = rows(dir.path()).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].meta.clients, 100);
        assert_eq!(rows[0].round_s, Some(0.55));
        assert_eq!(rows[1].aggregator_cpu_s, Some(0.6));
        assert_eq!(rows[1].refused, 2);
        assert_eq!(rows[0].aggregator_peak_rss_mb, Some(50.0));
        let md = markdown(&rows);
        assert!(
            md.contains("| embedded | int8 | 0 % | 1000 | 4.40 |"),
            "{md}"
        );
        if crate::plot::FONT_PATHS
            .iter()
            .any(|p| Path::new(p).is_file())
        {
            let files = summarize(dir.path()).unwrap();
            assert!(files.iter().any(|f| f.ends_with("swarm_round_time.svg")));
        }
    }
}
