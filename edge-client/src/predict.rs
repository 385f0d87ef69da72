//! `edge-client predict`: the federation's model on the device's inputs.
//!
//! Without `--evaluate`: every image (files, or folders read recursively) or text (a file of
//! lines, CSV or JSONL) gets a line on stdout: its label and the top-k probabilities, as JSON
//! lines or CSV. With `--evaluate`: labelled data (a class-folder tree, IDX files, CSV or JSONL
//! with a label column, or a named set's held-out part) gives accuracy, mean cross-entropy
//! and the confusion matrix, as one JSON object on stdout and a table on stderr. The examples
//! `--max-examples` keeps are the ones the aggregator evaluates, so the accuracy of a round's
//! adapter here is the accuracy the aggregator reported for it.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;
use fedpeft_backbone::data::{
    ImageDataset, OwnData, TextColumns, TextDataset, fashion_mnist, fashion_mnist_at,
    held_out_subset, load_image_files, load_spam_assassin, load_texts_unlabelled,
    spam_assassin_dir, spam_assassin_split,
};
use ndarray::Array2;

use crate::config::cli::PredictArgs;
use crate::model::{Model, probabilities};

/// What is predicted on.
enum Inputs {
    Images(ImageDataset, Vec<String>),
    Texts(TextDataset, Vec<String>),
}

impl Inputs {
    fn len(&self) -> usize {
        match self {
            Inputs::Images(ds, _) => ds.len(),
            Inputs::Texts(ds, _) => ds.len(),
        }
    }
}

/// Runs the command; the predictions go to `out`.
pub fn run(
    cli: &crate::config::Cli,
    args: &PredictArgs,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let (model, adapter) = crate::model::open_model(
        cli,
        &args.source,
        crate::config::runtime(args.runtime),
        args.threads,
    )?;
    if let Some(adapter) = &adapter {
        tracing::info!(
            adapter = %adapter.file.display(),
            round = adapter.round,
            reported_accuracy = adapter.eval_accuracy,
            backbone = %model.backbone.manifest.id,
            method = %adapter.index.model.peft,
            "model ready"
        );
    }
    let (inputs, idx) = if args.evaluate {
        labelled(args, &model)?
    } else {
        let i = unlabelled(args, &model)?;
        let n = i.len();
        (i, (0..n).collect())
    };
    let logits = logits(&model, &inputs, &idx, args.batch)?;
    let probs = probabilities(&logits);
    if args.evaluate {
        let labels: Vec<usize> = match &inputs {
            Inputs::Images(ds, _) => idx.iter().map(|&i| ds.labels[i] as usize).collect(),
            Inputs::Texts(ds, _) => idx.iter().map(|&i| ds.labels[i] as usize).collect(),
        };
        report_evaluation(&model.classes, &probs, &labels, model.round, out)
    } else {
        let names = match &inputs {
            Inputs::Images(_, n) | Inputs::Texts(_, n) => n,
        };
        write_predictions(&model.classes, &probs, names, args, out)
    }
}

/// The inputs to predict on, as given.
fn unlabelled(args: &PredictArgs, model: &Model) -> anyhow::Result<Inputs> {
    if let Some(path) = &args.texts {
        if !args.inputs.is_empty() {
            bail!("give texts (--texts) or images, not both");
        }
        let ds = load_texts_unlabelled(path, &args.text_column)?;
        let names = (1..=ds.len())
            .map(|i| format!("{}#{i}", path.display()))
            .collect();
        return text_model(model, Inputs::Texts(ds, names));
    }
    if args.inputs.is_empty() {
        bail!("nothing to predict on: name image files or folders, or --texts FILE");
    }
    let side = image_side(model)?;
    let (ds, files) = load_image_files(&args.inputs, side as u32)?;
    let names = files.iter().map(|f| f.display().to_string()).collect();
    Ok(Inputs::Images(ds, names))
}

fn image_side(model: &Model) -> anyhow::Result<usize> {
    model.image_size().ok_or_else(|| {
        anyhow::anyhow!(
            "backbone `{}` reads texts: give --texts FILE",
            model.backbone.manifest.id
        )
    })
}

fn text_model(model: &Model, inputs: Inputs) -> anyhow::Result<Inputs> {
    if !model.is_text() {
        bail!(
            "backbone `{}` reads images, not texts",
            model.backbone.manifest.id
        );
    }
    Ok(inputs)
}

/// Labelled data for `--evaluate`, and the examples evaluated.
fn labelled(args: &PredictArgs, model: &Model) -> anyhow::Result<(Inputs, Vec<usize>)> {
    let classes = &model.classes;
    let columns = TextColumns {
        text: args.text_column.clone(),
        label: args.label_column.clone(),
    };
    let one_input = || -> anyhow::Result<Option<PathBuf>> {
        match args.inputs.as_slice() {
            [] => Ok(None),
            [p] => Ok(Some(p.clone())),
            _ => bail!("--evaluate reads one labelled folder or file"),
        }
    };
    let names = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>();
    let (inputs, idx) = match args.dataset.as_deref() {
        Some("fashion-mnist") => {
            let ds = match one_input()? {
                Some(dir) => fashion_mnist_at(&dir, false)?,
                None => fashion_mnist(false)?,
            };
            let n = args.max_examples.unwrap_or(ds.len()).min(ds.len());
            // As the aggregator: the first N of the test split.
            let len = ds.len();
            (Inputs::Images(ds, names(len)), (0..n).collect())
        }
        Some("spam-assassin") => {
            let dir = one_input()?.unwrap_or_else(spam_assassin_dir);
            let ds = load_spam_assassin(&dir)?;
            let (_, test) = spam_assassin_split(&ds)?;
            let n = args.max_examples.unwrap_or(test.len()).min(test.len());
            let len = ds.len();
            (
                text_model(model, Inputs::Texts(ds, names(len)))?,
                test[..n].to_vec(),
            )
        }
        Some(other) => bail!("--dataset `{other}`: fashion-mnist or spam-assassin"),
        None => {
            let (data, text) = match (&args.texts, one_input()?) {
                (Some(path), None) => {
                    let is_csv = path
                        .extension()
                        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
                    let d = if is_csv {
                        OwnData::Csv {
                            path: path.clone(),
                            columns: columns.clone(),
                        }
                    } else {
                        OwnData::Jsonl {
                            path: path.clone(),
                            columns: columns.clone(),
                        }
                    };
                    (d, true)
                }
                (None, Some(p)) if p.is_dir() => (OwnData::ImageFolder { root: p }, false),
                (None, Some(p)) => {
                    let labels = args.labels.clone().ok_or_else(|| {
                        anyhow::anyhow!(
                            "{}: an IDX images file needs --labels (or give an image folder)",
                            p.display()
                        )
                    })?;
                    (OwnData::Idx { images: p, labels }, false)
                }
                (Some(_), Some(_)) => bail!("give --texts or a labelled folder/file, not both"),
                (None, None) => bail!(
                    "--evaluate needs labelled data: a class-folder tree, an IDX file with \
                     --labels, --texts with a label column, or --dataset"
                ),
            };
            if text {
                let ds = data.load_texts(classes)?;
                let idx = held_out_subset(ds.len(), args.max_examples.unwrap_or(ds.len()));
                let len = ds.len();
                (text_model(model, Inputs::Texts(ds, names(len)))?, idx)
            } else {
                let ds = data.load_images(classes, image_side(model)?)?;
                let idx = held_out_subset(ds.len(), args.max_examples.unwrap_or(ds.len()));
                let len = ds.len();
                (Inputs::Images(ds, names(len)), idx)
            }
        }
    };
    if idx.is_empty() {
        bail!("no labelled example to evaluate");
    }
    Ok((inputs, idx))
}

/// Logits of `idx`, `batch` at a time, with progress on long inputs.
fn logits(
    model: &Model,
    inputs: &Inputs,
    idx: &[usize],
    batch: usize,
) -> anyhow::Result<Array2<f32>> {
    let mut all = Array2::<f32>::zeros((idx.len(), model.classes.len()));
    let (start, mut last_note) = (Instant::now(), Instant::now());
    for (k, chunk) in idx.chunks(batch).enumerate() {
        let l = match inputs {
            Inputs::Images(ds, _) => model.image_logits(ds, chunk)?,
            Inputs::Texts(ds, _) => model.text_logits(ds, chunk)?,
        };
        let row = k * batch;
        all.slice_mut(ndarray::s![row..row + chunk.len(), ..])
            .assign(&l);
        if last_note.elapsed().as_secs() >= 5 {
            last_note = Instant::now();
            let done = row + chunk.len();
            let rate = done as f64 / start.elapsed().as_secs_f64();
            tracing::info!(
                done,
                total = idx.len(),
                per_s = format!("{rate:.1}"),
                "predicting"
            );
        }
    }
    tracing::info!(
        examples = idx.len(),
        ms = start.elapsed().as_millis() as u64,
        "predicted"
    );
    Ok(all)
}

/// The `k` most probable classes of a row, most probable first.
fn top_k(row: ndarray::ArrayView1<'_, f64>, k: usize) -> Vec<(usize, f64)> {
    let mut order: Vec<(usize, f64)> = row.iter().copied().enumerate().collect();
    order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    order.truncate(k.max(1));
    order
}

fn write_predictions(
    classes: &[String],
    probs: &Array2<f64>,
    names: &[String],
    args: &PredictArgs,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let k = args.top_k.clamp(1, classes.len());
    if args.format == "csv" {
        let mut header = vec!["input".to_string(), "label".into()];
        for i in 1..=k {
            header.push(format!("top{i}"));
            header.push(format!("p{i}"));
        }
        writeln!(out, "{}", header.join(","))?;
    }
    for (row, name) in probs.rows().into_iter().zip(names) {
        let top = top_k(row, k);
        if args.format == "csv" {
            let mut fields = vec![csv_field(name), csv_field(&classes[top[0].0])];
            for &(c, p) in &top {
                fields.push(csv_field(&classes[c]));
                fields.push(format!("{p:.6}"));
            }
            writeln!(out, "{}", fields.join(","))?;
        } else {
            let mut line = prediction_json(classes, row, k);
            line["input"] = serde_json::Value::from(name.as_str());
            writeln!(out, "{line}")?;
        }
    }
    Ok(())
}

/// One input's prediction as JSON: `{"label", "id", "top": [{"label", "id", "p"}, ..]}`
/// with the `k` most probable classes (as `predict` prints it and `serve` answers).
pub fn prediction_json(
    classes: &[String],
    row: ndarray::ArrayView1<'_, f64>,
    k: usize,
) -> serde_json::Value {
    let top = top_k(row, k);
    let top_json: Vec<serde_json::Value> = top
        .iter()
        .map(|&(c, p)| serde_json::json!({"label": classes[c], "id": c, "p": p}))
        .collect();
    serde_json::json!({
        "label": classes[top[0].0],
        "id": top[0].0,
        "top": top_json,
    })
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn report_evaluation(
    classes: &[String],
    probs: &Array2<f64>,
    labels: &[usize],
    round: u32,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let c = classes.len();
    let mut confusion = vec![vec![0usize; c]; c];
    let (mut correct, mut loss) = (0usize, 0.0f64);
    for (row, &y) in probs.rows().into_iter().zip(labels) {
        let pred = top_k(row, 1)[0].0;
        confusion[y][pred] += 1;
        correct += usize::from(pred == y);
        loss -= row[y].max(f64::MIN_POSITIVE).ln();
    }
    let n = labels.len();
    let accuracy = correct as f64 / n as f64;
    let summary = serde_json::json!({
        "round": round,
        "examples": n,
        "correct": correct,
        "accuracy": accuracy,
        "loss": loss / n as f64,
        "classes": classes,
        "confusion": confusion,
    });
    writeln!(out, "{summary}")?;
    // The table, for people: rows are the true classes, columns the predicted ones.
    let w = classes
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(1)
        .clamp(5, 16);
    let mut t = format!(
        "accuracy {:.2} % ({correct}/{n}), loss {:.4}, round {round}\n{:>w$} | predicted\n",
        100.0 * accuracy,
        loss / n as f64,
        ""
    );
    t += &format!("{:>w$} |", "true");
    for i in 0..c {
        t += &format!(" {i:>6}");
    }
    t.push('\n');
    for (i, row) in confusion.iter().enumerate() {
        let name: String = classes[i].chars().take(w).collect();
        t += &format!("{name:>w$} |");
        for v in row {
            t += &format!(" {v:>6}");
        }
        t += &format!("   ({i})\n");
    }
    eprint!("{t}");
    Ok(())
}
