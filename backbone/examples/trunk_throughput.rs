//! Trunk throughput of each runtime on this machine, one JSON line per measurement:
//! images/s at 96 and 224 px (EfficientNet-Lite0) and at 112 px (the DINOv2 ViT-S/14 trunk, ten
//! blocks; measured when `make models` built it), and sentences/s at 64 and 128 tokens
//! (all-MiniLM-L6-v2 trunk). The onnxruntime Python peer is scripts/models/bench_onnxruntime.py;
//! scripts/models/bench.sh runs both and prints the ratios.
//!
//!     cargo run --release -p fedpeft-backbone --features ort --example trunk_throughput -- \
//!         [--threads 2] [--batch 32] [--seconds 5] [--runtimes ort,tract]

use std::time::Instant;

use anyhow::{Context, Result, bail};
use fedpeft_backbone::{Backbone, Runtime, TrunkConfig, TrunkInput, open_trunk};
use ndarray::{Array2, Array4};

fn main() -> Result<()> {
    let (mut threads, mut batch, mut seconds) = (2usize, 32usize, 5.0f64);
    let mut runtimes = vec![Runtime::Ort, Runtime::Tract];
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--threads" => threads = v.parse()?,
            "--batch" => batch = v.parse()?,
            "--seconds" => seconds = v.parse()?,
            "--runtimes" => runtimes = v.split(',').map(str::parse).collect::<Result<_, _>>()?,
            other => bail!("unknown flag {other}"),
        }
    }
    let vision = Backbone::by_id("efficientnet-lite0")?;
    let text = Backbone::by_id("all-minilm-l6-v2")?;
    let vit = Backbone::by_id("dinov2-vits14").ok();
    for rt in runtimes {
        if let Some(vit) = &vit {
            let size = 112;
            let cfg = TrunkConfig::default()
                .with_runtime(rt)
                .with_image_size(size)
                .with_threads(threads);
            let trunk = open_trunk(vit, &cfg)?;
            let x = Array4::from_shape_fn((batch, 3, size, size), |(b, c, h, w)| {
                (((b * 7 + c * 13 + h * 31 + w * 17) % 255) as f32 / 127.5) - 1.0
            });
            let input = TrunkInput::Image(x);
            let rate = measure(seconds, batch, || trunk.run(&input).map(|_| ()))?;
            println!(
                "{{\"runtime\":\"{}\",\"model\":\"dinov2-vits14\",\"input\":\"{size}px\",\"batch\":{batch},\"threads\":{threads},\"per_second\":{rate:.1}}}",
                trunk.runtime().name()
            );
        }
        for size in [96usize, 224] {
            let cfg = TrunkConfig::default()
                .with_runtime(rt)
                .with_image_size(size)
                .with_threads(threads);
            let trunk = open_trunk(&vision, &cfg)?;
            // deterministic pseudo-random pixels: throughput does not depend on values
            let x = Array4::from_shape_fn((batch, 3, size, size), |(b, c, h, w)| {
                (((b * 7 + c * 13 + h * 31 + w * 17) % 255) as f32 / 127.5) - 1.0
            });
            let input = TrunkInput::Image(x);
            let rate = measure(seconds, batch, || trunk.run(&input).map(|_| ()))?;
            println!(
                "{{\"runtime\":\"{}\",\"model\":\"efficientnet-lite0\",\"input\":\"{size}px\",\"batch\":{batch},\"threads\":{threads},\"per_second\":{rate:.1}}}",
                trunk.runtime().name()
            );
        }
        let cfg = TrunkConfig::default()
            .with_runtime(rt)
            .with_threads(threads);
        let trunk = open_trunk(&text, &cfg)?;
        for seq in [64usize, 128] {
            let ids = Array2::from_shape_fn((batch, seq), |(b, s)| match s {
                0 => 101,
                s if s + 1 == seq => 102,
                s => 1000 + ((b * 131 + s * 17) % 28000) as i64,
            });
            let input = TrunkInput::Tokens {
                ids,
                mask: Array2::ones((batch, seq)),
            };
            let rate = measure(seconds, batch, || trunk.run(&input).map(|_| ()))?;
            println!(
                "{{\"runtime\":\"{}\",\"model\":\"all-minilm-l6-v2\",\"input\":\"{seq}tok\",\"batch\":{batch},\"threads\":{threads},\"per_second\":{rate:.1}}}",
                trunk.runtime().name()
            );
        }
    }
    Ok(())
}

/// Samples per second over at least `seconds` (after one warm-up run).
fn measure(
    seconds: f64,
    batch: usize,
    mut f: impl FnMut() -> fedpeft_backbone::Result<()>,
) -> Result<f64> {
    f()?;
    let t = Instant::now();
    let mut runs = 0usize;
    while runs < 3 || t.elapsed().as_secs_f64() < seconds {
        f()?;
        runs += 1;
    }
    Ok((runs * batch) as f64 / t.elapsed().as_secs_f64())
}
