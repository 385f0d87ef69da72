//! Plots of a trial's or a sweep's results, each as SVG and PNG: accuracy against round (one
//! line per trial), accuracy against cumulative bytes (log x), and a round's communication time
//! per link preset (bars, log y; computed from the bytes per client-round and the preset's
//! rates and latency, as the sweep table does, not measured).
//!
//! Text is laid out with `ab_glyph` from a TrueType font read at run time: DejaVu Sans from
//! Debian's `fonts-dejavu-core` (`scripts/setup.sh` installs it), or the file named by
//! `FEDPEFT_PLOT_FONT`. No fontconfig or freetype is involved.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, bail};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::report::TrialReport;
use crate::summary::Row;
use crate::table::Results;

/// Where the font is looked for, in order (after `FEDPEFT_PLOT_FONT`).
pub const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// The plot files [`plot_rows`] writes into a folder (each as `.svg` and `.png`).
pub const PLOTS: [&str; 3] = [
    "accuracy_vs_round",
    "accuracy_vs_bytes",
    "round_time_per_preset",
];

const SIZE: (u32, u32) = (960, 600);

/// Reads and registers the font once per process.
fn font() -> anyhow::Result<()> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let candidates: Vec<PathBuf> = std::env::var_os("FEDPEFT_PLOT_FONT")
                .map(PathBuf::from)
                .into_iter()
                .chain(FONT_PATHS.iter().map(PathBuf::from))
                .collect();
            let Some(path) = candidates.iter().find(|p| p.is_file()) else {
                return Err(format!(
                    "no font for plot text: none of {} exists (install Debian's \
                     fonts-dejavu-core, or set FEDPEFT_PLOT_FONT to a .ttf file)",
                    candidates
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            };
            let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            // plotters keeps fonts for the whole process: the bytes live as long.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| {
                format!(
                    "{} is not a TrueType font plotters can read",
                    path.display()
                )
            })
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Writes every plot for `rows` (one line or bar per trial) into `dir`; returns the files.
pub fn plot_rows(rows: &[Row], dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if rows.is_empty() {
        bail!("nothing to plot: no trial results");
    }
    font()?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    for name in PLOTS {
        let svg = dir.join(format!("{name}.svg"));
        let png = dir.join(format!("{name}.png"));
        let size = size(name, rows);
        {
            let root = SVGBackend::new(&svg, size).into_drawing_area();
            draw(name, rows, &root).with_context(|| format!("drawing {}", svg.display()))?;
            root.present()
                .map_err(|e| anyhow::anyhow!("writing {}: {e}", svg.display()))?;
        }
        {
            let root = BitMapBackend::new(&png, size).into_drawing_area();
            draw(name, rows, &root).with_context(|| format!("drawing {}", png.display()))?;
            root.present()
                .map_err(|e| anyhow::anyhow!("writing {}: {e}", png.display()))?;
        }
        written.push(svg);
        written.push(png);
    }
    Ok(written)
}

/// Re-plots a results folder: a sweep's (`results.json`) or a trial's (`report.json` with the
/// `summary` row the runner adds). Returns the files written.
pub fn plot_dir(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let rows = rows_in(dir)?;
    plot_rows(&rows, dir)
}

/// The result rows of a sweep or trial folder.
pub fn rows_in(dir: &Path) -> anyhow::Result<Vec<Row>> {
    if let Some(results) = Results::read(dir)? {
        return Ok(results.trials);
    }
    let path = TrialReport::path(dir);
    if path.is_file() {
        let report = TrialReport::read(dir)?;
        let row = report.summary.with_context(|| {
            format!(
                "{} has no `summary` (written by fedpeft-fleet at the end of a run)",
                path.display()
            )
        })?;
        return Ok(vec![row]);
    }
    bail!(
        "{} holds neither results.json (a sweep) nor report.json (a trial)",
        dir.display()
    )
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("{e:?}")
}

/// Trial names without the prefix every one of them shares up to a `-` (the sweep's name), so
/// legends say what differs; a lone trial keeps its whole name.
fn short_labels(rows: &[Row]) -> Vec<String> {
    let names: Vec<&str> = rows.iter().map(|r| r.trial.as_str()).collect();
    if names.len() < 2 {
        return names.iter().map(|n| n.to_string()).collect();
    }
    let first = names[0];
    let common = names[1..].iter().fold(first.len(), |n, other| {
        first
            .bytes()
            .zip(other.bytes())
            .take(n)
            .take_while(|(a, b)| a == b)
            .count()
    });
    let common = (0..=common)
        .rev()
        .find(|&i| first.is_char_boundary(i))
        .unwrap_or(0);
    let cut = first[..common].rfind('-').map_or(0, |i| i + 1);
    names
        .iter()
        .map(|n| {
            let rest = &n[cut..];
            if rest.is_empty() { n } else { rest }.to_string()
        })
        .collect()
}

/// What the trials of one accuracy panel share: data set, split and the setting that changes
/// the curves' meaning (DP-SGD, dropout, stragglers).
fn panel_title(r: &Row) -> String {
    let data = match r.dataset.as_str() {
        "fashion-mnist" => "Fashion-MNIST",
        "spam-assassin" => "SpamAssassin",
        other => other,
    };
    let mut title = format!("{data}, {}", r.split());
    if r.dp_noise_multiplier.is_some() {
        title.push_str(", DP-SGD");
    }
    if r.dropout > 0.0 {
        title.push_str(&format!(", {:.0} % dropout", 100.0 * r.dropout));
    }
    if r.stragglers > 0 {
        title.push_str(", stragglers");
    }
    title
}

/// Trials grouped into panels by [`panel_title`], in order of first appearance, each with its
/// legend label.
fn panels(rows: &[Row]) -> Vec<(String, Vec<(&Row, String)>)> {
    let mut out: Vec<(String, Vec<(&Row, String)>)> = Vec::new();
    for (row, label) in rows.iter().zip(short_labels(rows)) {
        let title = panel_title(row);
        match out.iter_mut().find(|(t, _)| *t == title) {
            Some((_, members)) => members.push((row, label)),
            None => out.push((title, vec![(row, label)])),
        }
    }
    out
}

/// Panels in two columns when there is more than one.
fn grid(panels: usize) -> (usize, usize) {
    if panels <= 1 {
        (1, 1)
    } else {
        (panels.div_ceil(2), 2)
    }
}

/// The picture size of plot `name` for `rows`: the accuracy plots grow with their panels.
fn size(name: &str, rows: &[Row]) -> (u32, u32) {
    if name == "round_time_per_preset" {
        return SIZE;
    }
    match grid(panels(rows).len()) {
        (1, 1) => SIZE,
        (lines, _) => (1200, 60 + 400 * lines as u32),
    }
}

fn draw<DB: DrawingBackend>(
    name: &str,
    rows: &[Row],
    root: &DrawingArea<DB, Shift>,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(err)?;
    match name {
        "accuracy_vs_round" => accuracy_panels(rows, root, XAxis::Round),
        "accuracy_vs_bytes" => accuracy_panels(rows, root, XAxis::Bytes),
        "round_time_per_preset" => round_time_per_preset(rows, root),
        other => bail!("unknown plot {other}"),
    }
}

/// What the accuracy plots put on x.
#[derive(Clone, Copy, PartialEq)]
enum XAxis {
    Round,
    /// Cumulative bytes, drawn as log10 on a linear axis (labelled in bytes).
    Bytes,
}

/// Held-out accuracy against round or cumulative bytes: one panel per [`panel_title`], one
/// line per trial.
fn accuracy_panels<DB: DrawingBackend>(
    rows: &[Row],
    root: &DrawingArea<DB, Shift>,
    x: XAxis,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let caption = match x {
        XAxis::Round => "Held-out accuracy by round",
        XAxis::Bytes => "Held-out accuracy by cumulative bytes (up + down)",
    };
    let groups = panels(rows);
    let root = root.titled(caption, ("sans-serif", 24)).map_err(err)?;
    let areas = root.split_evenly(grid(groups.len()));
    let titled = groups.len() > 1;
    for ((title, members), area) in groups.iter().zip(&areas) {
        accuracy_panel(area, titled.then_some(title.as_str()), members, x)?;
    }
    Ok(())
}

fn accuracy_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: Option<&str>,
    members: &[(&Row, String)],
    x: XAxis,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let lines: Vec<Vec<(f64, f64)>> = members
        .iter()
        .map(|(row, _)| match x {
            XAxis::Round => row
                .accuracy_by_round
                .iter()
                .enumerate()
                .filter_map(|(r, a)| a.map(|a| (r as f64, 100.0 * a)))
                .collect(),
            XAxis::Bytes => row
                .accuracy_by_round
                .iter()
                .zip(&row.cumulative_bytes_by_round)
                .filter_map(|(a, &b)| a.filter(|_| b > 0).map(|a| ((b as f64).log10(), 100.0 * a)))
                .collect(),
        })
        .collect();
    let xs = lines.iter().flatten().map(|p| p.0);
    let (lo, hi) = xs.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = match x {
        XAxis::Round => (0.0, hi.max(1.0)),
        // Whole decades, at least one.
        XAxis::Bytes if hi >= lo => (lo.floor(), hi.ceil().max(lo.floor() + 1.0)),
        XAxis::Bytes => (0.0, 1.0),
    };
    let mut chart = ChartBuilder::on(area);
    if let Some(t) = title {
        chart.caption(t, ("sans-serif", 18));
    }
    let mut chart = chart
        .margin(12)
        // Room for the last x label, centred on the right edge.
        .margin_right(32)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(lo..hi, 0f64..100f64)
        .map_err(err)?;
    let x_desc = match x {
        XAxis::Round => "round",
        XAxis::Bytes => "cumulative bytes (log scale)",
    };
    let x_labels = match x {
        XAxis::Round => (hi as usize).min(15) + 1,
        XAxis::Bytes => (hi - lo) as usize + 1,
    };
    let format_x = move |v: &f64| match x {
        XAxis::Round => format!("{v:.0}"),
        XAxis::Bytes => human_bytes(10f64.powf(*v)),
    };
    chart
        .configure_mesh()
        .x_labels(x_labels)
        .x_label_formatter(&format_x)
        .x_desc(x_desc)
        .y_desc("accuracy (%)")
        .draw()
        .map_err(err)?;
    for (i, ((_, label), points)) in members.iter().zip(lines).enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(err)?
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)
}

fn round_time_per_preset<DB: DrawingBackend>(
    rows: &[Row],
    root: &DrawingArea<DB, Shift>,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let presets: Vec<String> = rows
        .first()
        .map(|r| {
            r.computed_round_comm
                .iter()
                .map(|c| c.preset.clone())
                .collect()
        })
        .unwrap_or_default();
    let secs = rows
        .iter()
        .flat_map(|r| r.computed_round_comm.iter().map(|c| c.comm_secs))
        .filter(|s| *s > 0.0);
    let (lo, hi) = secs.fold((f64::MAX, 0f64), |(lo, hi), s| (lo.min(s), hi.max(s)));
    let (lo, hi) = if hi == 0.0 {
        (0.001, 1.0)
    } else {
        (lo / 2.0, hi * 2.0)
    };
    let groups = presets.len().max(1) as f64;
    let mut chart = ChartBuilder::on(root)
        .caption(
            "Communication time of one client-round per link preset (computed from bytes)",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..groups, (lo..hi).log_scale())
        .map_err(err)?;
    let names = presets.clone();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(presets.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 1e-6 {
                names.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_desc("link preset")
        .y_desc("seconds per client-round (log scale)")
        .draw()
        .map_err(err)?;
    let n = rows.len() as f64;
    let width = 0.8 / n;
    for (i, (row, label)) in rows.iter().zip(short_labels(rows)).enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let bars: Vec<Rectangle<(f64, f64)>> = row
            .computed_round_comm
            .iter()
            .enumerate()
            .filter(|(_, c)| c.comm_secs > 0.0)
            .map(|(g, c)| {
                let x0 = g as f64 + 0.1 + i as f64 * width;
                Rectangle::new([(x0, lo), (x0 + width * 0.9, c.comm_secs)], color.filled())
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)
}

/// The chart's legend, boxed on a translucent white, at `position`.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(position)
        .draw()
        .map_err(err)
}

/// Bytes with a unit, to at most three decimals and without trailing zeros (`10 kB`, `1.5 MB`).
fn human_bytes(b: f64) -> String {
    let (v, unit) = match b {
        b if b >= 1e9 => (b / 1e9, "GB"),
        b if b >= 1e6 => (b / 1e6, "MB"),
        b if b >= 1e3 => (b / 1e3, "kB"),
        b => (b.round(), "B"),
    };
    let text = format!("{v:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summary::ComputedRoundTime;

    fn row(name: &str, acc: &[f64], scale: u64) -> Row {
        Row {
            trial: name.into(),
            method: "head".into(),
            dataset: "fashion-mnist".into(),
            partition: "dirichlet".into(),
            alpha: 0.5,
            clients: 4,
            fraction: 1.0,
            rounds: (acc.len() - 1) as u32,
            epochs: Some(1),
            learning_rate: Some(0.1),
            update_dtype: "int8".into(),
            global_dtype: "int8".into(),
            dp_clip_norm: None,
            dp_noise_multiplier: None,
            dp_epsilon_median: None,
            dp_epsilon_max: None,
            dropout: 0.0,
            stragglers: 0,
            dropped_client_rounds: 0,
            late_client_rounds: 0,
            final_accuracy: acc.last().copied(),
            best_accuracy: acc.iter().copied().reduce(f64::max),
            trainable_params: 12_810,
            backbone_params: 4_652_008,
            client_rounds: 8,
            up_bytes_per_client_round: 13_448.0 * scale as f64,
            down_bytes_per_client_round: 13_500.0 * scale as f64,
            total_bytes: 1000,
            full_model_fedavg_bytes: 10,
            times_less_than_full_model: Some(1380.0),
            mean_round_ms: 900.0,
            computed_round_comm: ["nb-iot", "lte-m", "3g", "wifi"]
                .iter()
                .zip([5.0, 0.6, 0.2, 0.004])
                .map(|(p, s)| ComputedRoundTime {
                    preset: p.to_string(),
                    comm_secs: s * scale as f64,
                })
                .collect(),
            accuracy_by_round: acc.iter().map(|&a| Some(a)).collect(),
            cumulative_bytes_by_round: (0..acc.len() as u64).map(|r| r * 27_000 * scale).collect(),
        }
    }

    #[test]
    fn every_plot_is_written_as_valid_svg_and_png_with_a_series_per_trial() {
        let dir = tempfile::tempdir().unwrap();
        let rows = vec![
            row("sweep-head", &[0.1, 0.6, 0.7, 0.75], 1),
            row("sweep-lora", &[0.1, 0.65, 0.72, 0.78], 2),
            row("sweep-bias", &[0.1, 0.5, 0.6, 0.66], 3),
        ];
        let files = plot_rows(&rows, dir.path()).unwrap();
        assert_eq!(files.len(), 2 * PLOTS.len());
        for name in PLOTS {
            let png = std::fs::read(dir.path().join(format!("{name}.png"))).unwrap();
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{name}.png signature");
            assert!(png.len() > 5_000, "{name}.png is {} bytes", png.len());
            let svg = std::fs::read_to_string(dir.path().join(format!("{name}.svg"))).unwrap();
            let doc = roxmltree::Document::parse(&svg)
                .unwrap_or_else(|e| panic!("{name}.svg is not XML: {e}"));
            assert_eq!(doc.root_element().tag_name().name(), "svg");
            // Each trial is named once, in the legend, without the sweep's name.
            for label in ["head", "lora", "bias"] {
                assert_eq!(
                    texts(&doc, label),
                    1,
                    "{name}.svg: legend entries for {label}"
                );
            }
            let series = match name {
                // Filled bars: one per trial and preset, and the legend's swatches.
                "round_time_per_preset" => doc
                    .descendants()
                    .filter(|n| n.tag_name().name() == "rect")
                    .filter(|n| {
                        n.attribute("fill")
                            .is_some_and(|f| f != "#FFFFFF" && f != "none")
                    })
                    .count(),
                // One 2-px line per trial, and the legend's samples (axes and grid are 1 px).
                _ => doc
                    .descendants()
                    .filter(|n| n.tag_name().name() == "polyline")
                    .filter(|n| n.attribute("stroke-width") == Some("2"))
                    .count(),
            };
            let expected = match name {
                // 4 presets x 3 trials, and 3 legend swatches.
                "round_time_per_preset" => 4 * 3 + 3,
                _ => 2 * 3,
            };
            assert_eq!(series, expected, "{name}.svg series elements");
        }
        // The folder re-plots from its results file.
        crate::table::write_table(dir.path(), &rows).unwrap();
        std::fs::remove_file(dir.path().join("accuracy_vs_round.png")).unwrap();
        assert_eq!(plot_dir(dir.path()).unwrap().len(), 6);
        assert!(dir.path().join("accuracy_vs_round.png").is_file());
    }

    fn texts(doc: &roxmltree::Document, text: &str) -> usize {
        doc.descendants()
            .filter(|n| n.tag_name().name() == "text")
            .filter(|n| n.text().map(str::trim) == Some(text))
            .count()
    }

    /// Trials of other data, splits or settings get panels of their own, titled, two to a line.
    #[test]
    fn accuracy_plots_put_each_data_set_split_and_setting_in_its_own_panel() {
        let dir = tempfile::tempdir().unwrap();
        let mut dp = row("fedpeft-lora-dp", &[0.1, 0.5, 0.6], 1);
        dp.dp_noise_multiplier = Some(1.0);
        let mut text = row("fedpeft-text-head", &[0.7, 0.9], 1);
        text.dataset = "spam-assassin".into();
        text.partition = "natural".into();
        let mut a01 = row("fedpeft-a0.1-head", &[0.1, 0.4, 0.5], 1);
        a01.alpha = 0.1;
        let rows = vec![
            row("fedpeft-a0.5-head", &[0.1, 0.6, 0.7], 1),
            a01,
            row("fedpeft-a0.5-bias", &[0.1, 0.5, 0.65], 1),
            dp,
            text,
        ];
        let groups = panels(&rows);
        let titles: Vec<&str> = groups.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            titles,
            [
                "Fashion-MNIST, Dirichlet α 0.5",
                "Fashion-MNIST, Dirichlet α 0.1",
                "Fashion-MNIST, Dirichlet α 0.5, DP-SGD",
                "SpamAssassin, natural"
            ]
        );
        assert_eq!(groups[0].1.len(), 2);
        assert_eq!(size("accuracy_vs_round", &rows), (1200, 60 + 2 * 400));
        plot_rows(&rows, dir.path()).unwrap();
        for name in ["accuracy_vs_round", "accuracy_vs_bytes"] {
            let svg = std::fs::read_to_string(dir.path().join(format!("{name}.svg"))).unwrap();
            let doc = roxmltree::Document::parse(&svg).unwrap();
            for t in &titles {
                assert_eq!(texts(&doc, t), 1, "{name}.svg: panel title {t}");
            }
            for label in [
                "a0.5-head",
                "a0.1-head",
                "a0.5-bias",
                "lora-dp",
                "text-head",
            ] {
                assert_eq!(texts(&doc, label), 1, "{name}.svg: legend entry {label}");
            }
            let lines = doc
                .descendants()
                .filter(|n| n.tag_name().name() == "polyline")
                .filter(|n| n.attribute("stroke-width") == Some("2"))
                .count();
            assert_eq!(
                lines,
                2 * rows.len(),
                "{name}.svg: a line and a legend sample per trial"
            );
        }
    }

    #[test]
    fn labels_drop_the_shared_name_and_bytes_read_plainly() {
        let names = |v: &[&str]| {
            let rows: Vec<Row> = v.iter().map(|n| row(n, &[0.1, 0.2], 1)).collect();
            short_labels(&rows)
        };
        assert_eq!(
            names(&["s-a0.1-lora", "s-a0.5-lora"]),
            ["a0.1-lora", "a0.5-lora"]
        );
        assert_eq!(names(&["quickstart"]), ["quickstart"]);
        assert_eq!(names(&["head", "headx"]), ["head", "headx"]);
        assert_eq!(names(&["s-α", "s-β"]), ["α", "β"]);
        assert_eq!(human_bytes(10_000.0), "10 kB");
        assert_eq!(human_bytes(1_500_000.0), "1.5 MB");
        assert_eq!(human_bytes(999.4), "999 B");
    }

    #[test]
    fn a_folder_without_results_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let e = plot_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("neither results.json"), "{e}");
    }
}
