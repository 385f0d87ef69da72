//! The exported model against the Rust path on the held-out examples: logits of `model.onnx`
//! (trunk + merged tail, from `edge-client export --onnx`) in tract and in onnxruntime, against
//! the trunk + Rust tail with the run's adapter, on the first N of Fashion-MNIST's test images
//! or of SpamAssassin's held-out e-mails for a text run (the aggregator's held-out examples with
//! `eval_examples = N`). Prints the largest logit difference and the accuracy of each.
//!
//!     cargo run --release -p fedpeft-edge --example export_check -- RUN_DIR EXPORT_DIR [N]

use anyhow::Context;
use fedpeft_backbone::data::{
    fashion_mnist, load_spam_assassin, spam_assassin_dir, spam_assassin_split,
};
use fedpeft_backbone::{
    ImagePreprocess, Runtime, TextPreprocess, TrunkConfig, TrunkInput, open_trunk,
};
use fedpeft_edge::model::{Model, ModelOptions, RoundChoice, locate, read_adapter};
use ndarray::{Array2, s};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (run, export) = (
        args.first().context("RUN_DIR")?,
        args.get(1).context("EXPORT_DIR")?,
    );
    let n: usize = args.get(2).map_or(Ok(1000), |v| v.parse())?;
    let (file, index) = locate(std::path::Path::new(run), RoundChoice::Best)?;
    let adapter = read_adapter(&file, index, None)?;
    let model = Model::open(
        &adapter,
        &ModelOptions {
            model_dir: None,
            runtime: Some(Runtime::Ort),
            threads: 2,
        },
    )?;
    // The examples: (logits of the Rust path, the exported model's input, labels) per chunk.
    let text = model.is_text();
    let size = model.image_size().unwrap_or(0);
    let images = if text {
        None
    } else {
        Some(fashion_mnist(false)?)
    };
    let texts = if text {
        Some(load_spam_assassin(&spam_assassin_dir())?)
    } else {
        None
    };
    let idx: Vec<usize> = match &texts {
        Some(ds) => {
            let (_, test) = spam_assassin_split(ds)?;
            test[..n.min(test.len())].to_vec()
        }
        None => (0..n.min(images.as_ref().map_or(0, |d| d.len()))).collect(),
    };
    let image_pre = if text {
        None
    } else {
        Some(ImagePreprocess::from_manifest(
            &model.backbone.manifest,
            Some(size),
        )?)
    };
    let text_pre = if text {
        Some(TextPreprocess::from_backbone(
            &model.backbone,
            adapter.index.model.max_seq_len,
        )?)
    } else {
        None
    };
    // The exported file as a "trunk" whose output is the logits.
    let mut merged = model.backbone.clone();
    merged.dir = export.into();
    merged.manifest.trunk.file = "model.onnx".into();
    merged
        .manifest
        .files
        .insert("model.onnx".into(), "not checked".into());
    let classes = model.classes.len();
    let mut out = [(); 3].map(|_| Array2::<f32>::zeros((idx.len(), classes)));
    let names = [
        "rust (ort trunk + Rust tail)",
        "model.onnx in tract",
        "model.onnx in ort",
    ];
    let tract = open_trunk(
        &merged,
        &TrunkConfig::default()
            .with_runtime(Runtime::Tract)
            .with_image_size(size),
    )?;
    let ort = open_trunk(
        &merged,
        &TrunkConfig::default()
            .with_runtime(Runtime::Ort)
            .with_image_size(size)
            .with_threads(2),
    )?;
    for (k, chunk) in idx.chunks(50).enumerate() {
        let rows = s![k * 50..k * 50 + chunk.len(), ..];
        let (rust, x) = match (&images, &texts, &image_pre, &text_pre) {
            (Some(ds), _, Some(pre), _) => (
                model.image_logits(ds, chunk)?,
                TrunkInput::Image(pre.batch(ds, chunk)?),
            ),
            (_, Some(ds), _, Some(pre)) => {
                let (ids, mask) = pre.batch(ds, chunk)?;
                (
                    model.text_logits(ds, chunk)?,
                    TrunkInput::Tokens { ids, mask },
                )
            }
            _ => unreachable!("images or texts"),
        };
        out[0].slice_mut(rows).assign(&rust);
        for (slot, t) in [(1, &tract), (2, &ort)] {
            let l = t.run(&x)?.into_dimensionality::<ndarray::Ix2>()?;
            out[slot].slice_mut(rows).assign(&l);
        }
    }
    let labels: Vec<usize> = match (&images, &texts) {
        (Some(ds), _) => idx.iter().map(|&i| ds.labels[i] as usize).collect(),
        (_, Some(ds)) => idx.iter().map(|&i| ds.labels[i] as usize).collect(),
        _ => unreachable!("images or texts"),
    };
    for (name, l) in names.iter().zip(&out) {
        let correct = l
            .rows()
            .into_iter()
            .zip(&labels)
            .filter(|(r, y)| (0..classes).max_by(|&a, &b| r[a].total_cmp(&r[b])) == Some(**y))
            .count();
        let diff = (l - &out[0]).mapv(f32::abs).fold(0.0f32, |m, &v| m.max(v));
        println!(
            "{name}: accuracy {:.4} ({correct}/{}), max |logit - rust| {diff:e}",
            correct as f64 / labels.len() as f64,
            labels.len()
        );
    }
    println!(
        "reported by the aggregator for round {}: {:?}",
        adapter.round, adapter.eval_accuracy
    );
    Ok(())
}
