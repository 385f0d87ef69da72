//! Frozen-feature check and activation-cache benchmark: head-only training of EfficientNet-Lite0's
//! conv-head tail on all of Fashion-MNIST's training set, test accuracy after each epoch.
//!
//!     cargo run --release -p fedpeft-backbone --example fmnist_head -- \
//!         [--runtime auto|ort|tract] [--size 96] [--epochs 5] [--lr 1e-3] [--batch 64] [--threads 2]
//!
//! Epoch 1 includes the trunk pass that fills the cache; later epochs read cached activations.
//! The printed "epoch-2 speed-up" is epoch 1's time (trunk + tail) over epoch 2's (tail only).

use std::time::Instant;

use anyhow::{Context, Result, bail};
use fedpeft_backbone::cache::hash_image_selection;
use fedpeft_backbone::data::{ImageDataset, fashion_mnist};
use fedpeft_backbone::{
    ActivationCache, Backbone, CacheConfig, CacheKey, Features, ImagePreprocess, Runtime, Trunk,
    TrunkConfig, TrunkInput, open_trunk,
};
use fedpeft_peft::{AdamW, Batch, Family, FrozenWeights, Method, PeftConfig, build_tail};
use rand::SeedableRng;
use rand::seq::SliceRandom;

struct Args {
    runtime: Runtime,
    size: usize,
    epochs: usize,
    lr: f32,
    batch: usize,
    threads: usize,
    limit: Option<usize>,
}

fn args() -> Result<Args> {
    let mut a = Args {
        runtime: Runtime::Auto,
        size: 96,
        epochs: 5,
        lr: 1e-3,
        batch: 64,
        threads: 2,
        limit: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--runtime" => a.runtime = v.parse()?,
            "--size" => a.size = v.parse()?,
            "--epochs" => a.epochs = v.parse()?,
            "--lr" => a.lr = v.parse()?,
            "--batch" => a.batch = v.parse()?,
            "--threads" => a.threads = v.parse()?,
            "--limit" => a.limit = Some(v.parse()?),
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

fn features(
    cache: &mut ActivationCache,
    bb: &Backbone,
    trunk: &dyn Trunk,
    pre: &ImagePreprocess,
    ds: &ImageDataset,
) -> Result<std::sync::Arc<Features>> {
    let all: Vec<usize> = (0..ds.len()).collect();
    let key = CacheKey::new(
        bb.trunk_sha256(),
        &hash_image_selection(ds, &all),
        &pre.fingerprint(),
    );
    Ok(cache.get_or_compute(&key, ds.len(), 64, |r| {
        let idx: Vec<usize> = r.collect();
        trunk.run(&TrunkInput::Image(pre.batch(ds, &idx)?))
    })?)
}

fn main() -> Result<()> {
    let a = args()?;
    let bb = Backbone::by_id("efficientnet-lite0")?;
    let mut train = fashion_mnist(true)?;
    let test = fashion_mnist(false)?;
    if let Some(n) = a.limit {
        train = train.select(&(0..n.min(train.len())).collect::<Vec<_>>());
    }
    let cfg = TrunkConfig::default()
        .with_runtime(a.runtime)
        .with_image_size(a.size)
        .with_threads(a.threads);
    let trunk = open_trunk(&bb, &cfg)?;
    let pre = ImagePreprocess::from_manifest(&bb.manifest, Some(a.size))?;
    // A fresh folder per run: an earlier run's spill files would make epoch 1 skip the trunk.
    let spill = std::env::temp_dir().join(format!("fedpeft-fmnist-cache-{}", std::process::id()));
    let mut cache = ActivationCache::new(CacheConfig {
        memory_budget: 4 << 30,
        spill_dir: spill.clone(),
        // Not kept between runs: epoch 1 must run the trunk for the speed-up figure.
        persist: false,
    });
    let weights = FrozenWeights::from_safetensors(&bb.tail_path())?;
    let mut tail = build_tail(
        Family::ConvHead,
        &weights,
        PeftConfig::new(Method::Head, 10, 0),
    )?;
    let mut opt = AdamW::new(a.lr);
    println!(
        "fmnist_head: runtime {:?}, {} px, {} train / {} test, head-only ({} trainable), AdamW lr {}, batch {}",
        trunk.runtime(),
        a.size,
        train.len(),
        test.len(),
        tail.num_trainable(),
        a.lr,
        a.batch
    );
    let t0 = Instant::now();
    let test_f = features(&mut cache, &bb, trunk.as_ref(), &pre, &test)?;
    println!("test-set trunk pass: {:.1}s", t0.elapsed().as_secs_f64());

    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut epoch_secs = Vec::new();
    for epoch in 1..=a.epochs {
        let t = Instant::now();
        let train_f = features(&mut cache, &bb, trunk.as_ref(), &pre, &train)?;
        let trunk_secs = t.elapsed().as_secs_f64();
        order.shuffle(&mut rng);
        let (mut loss, mut seen) = (0.0, 0usize);
        for chunk in order.chunks(a.batch) {
            let batch = Batch::new(train_f.rows(chunk)?, None);
            let labels: Vec<usize> = chunk.iter().map(|&i| train.labels[i] as usize).collect();
            let s = tail.train_step(&batch, &labels, &mut opt)?;
            loss += s.loss * s.samples as f64;
            seen += s.samples;
        }
        let secs = t.elapsed().as_secs_f64();
        epoch_secs.push(secs);
        let (mut correct, mut n) = (0usize, 0usize);
        let idx: Vec<usize> = (0..test.len()).collect();
        for chunk in idx.chunks(500) {
            let batch = Batch::new(test_f.rows(chunk)?, None);
            let labels: Vec<usize> = chunk.iter().map(|&i| test.labels[i] as usize).collect();
            let e = tail.evaluate(&batch, &labels)?;
            correct += e.correct;
            n += e.samples;
        }
        println!(
            "epoch {epoch}: {secs:.1}s (trunk/cache {trunk_secs:.1}s), train loss {:.4}, test accuracy {:.2}%",
            loss / seen as f64,
            100.0 * correct as f64 / n as f64
        );
    }
    drop(cache);
    let _ = std::fs::remove_dir_all(&spill);
    if epoch_secs.len() >= 2 {
        println!(
            "epoch-2 speed-up from the activation cache: {:.1}x",
            epoch_secs[0] / epoch_secs[1]
        );
    }
    Ok(())
}
