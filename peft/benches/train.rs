//! Training-throughput benchmark of the Rust tail, printing one JSON object per line.
//!
//!     cargo bench -p fedpeft-peft --bench train            # every configuration
//!     cargo bench -p fedpeft-peft --bench train -- conv-lora [steps]
//!
//! Configurations (batch 64, SGD momentum 0.9, random weights with the real shapes):
//! `conv-lora`, `conv-bias`: EfficientNet-Lite0 conv head at 96 px (input [64, 320, 3, 3],
//! 320 → 1280, 10 classes; LoRA r = 8 on the 1×1 conv). `minilm-lora`, `minilm-bias`: two
//! MiniLM blocks (hidden 384, 12 heads, intermediate 1536, sequence 64 with padding, 2 classes;
//! LoRA r = 8 on q and v). `vit-lora`, `vit-bias`: the DINOv2 ViT-S/14 tail at 112 px (two
//! pre-LN blocks with layer scale, hidden 384, 6 heads, 65 tokens, final LayerNorm, the CLS
//! token under a 10-class head; LoRA r = 8 on q and v). `conv-lora-frozen`, `conv-bias-frozen`: the same steps with the
//! batch's frozen prefix (the conv's `x·Wᵀ`) computed once beforehand, as the edge client does;
//! their GEMM figure counts only the GEMMs that remain. `scripts/peft/bench_torch.py` runs the identical computation in
//! PyTorch. Each configuration runs in its own child process so that peak RSS (VmHWM) is its
//! own; a counting allocator also reports the peak of live heap bytes during training. Memory
//! deltas are measured from just before the first (warm-up) step.
// A global allocator needs `unsafe impl GlobalAlloc`; it only forwards to the system
// allocator and counts bytes.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use fedpeft_peft::*;
use ndarray::{Array2, ArrayD, IxDyn};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn rand_vec(rng: &mut StdRng, n: usize, s: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-s..s)).collect()
}

fn conv_weights(rng: &mut StdRng) -> FrozenWeights {
    let mut m = HashMap::new();
    m.insert(
        "conv_head.weight".into(),
        (vec![1280, 320], rand_vec(rng, 1280 * 320, 0.05)),
    );
    m.insert("bn_head.scale".into(), (vec![1280], vec![1.0; 1280]));
    m.insert(
        "bn_head.shift".into(),
        (vec![1280], rand_vec(rng, 1280, 0.1)),
    );
    FrozenWeights::from_map(m).unwrap()
}

fn minilm_weights(rng: &mut StdRng) -> FrozenWeights {
    FrozenWeights::from_map(block_weights(rng, false)).unwrap()
}

/// Two ViT-S/14 blocks: the MiniLM shapes plus layer scales and the final LayerNorm.
fn vit_weights(rng: &mut StdRng) -> FrozenWeights {
    FrozenWeights::from_map(block_weights(rng, true)).unwrap()
}

type WeightMap = HashMap<String, (Vec<usize>, Vec<f32>)>;

fn block_weights(rng: &mut StdRng, vit: bool) -> WeightMap {
    let (d, i) = (384usize, 1536usize);
    let mut m = HashMap::new();
    if vit {
        m.insert("final_ln.weight".into(), (vec![d], vec![1.0; d]));
        m.insert("final_ln.bias".into(), (vec![d], vec![0.0; d]));
        for j in 0..2 {
            for n in ["ls1", "ls2"] {
                m.insert(format!("blocks.{j}.{n}"), (vec![d], vec![0.1; d]));
            }
        }
    }
    for j in 0..2 {
        for n in ["q", "k", "v", "o"] {
            m.insert(
                format!("blocks.{j}.attn.{n}.weight"),
                (vec![d, d], rand_vec(rng, d * d, 0.05)),
            );
            m.insert(
                format!("blocks.{j}.attn.{n}.bias"),
                (vec![d], rand_vec(rng, d, 0.05)),
            );
        }
        for n in ["ln1", "ln2"] {
            m.insert(format!("blocks.{j}.{n}.weight"), (vec![d], vec![1.0; d]));
            m.insert(format!("blocks.{j}.{n}.bias"), (vec![d], vec![0.0; d]));
        }
        m.insert(
            format!("blocks.{j}.ffn.up.weight"),
            (vec![i, d], rand_vec(rng, i * d, 0.05)),
        );
        m.insert(
            format!("blocks.{j}.ffn.up.bias"),
            (vec![i], rand_vec(rng, i, 0.05)),
        );
        m.insert(
            format!("blocks.{j}.ffn.down.weight"),
            (vec![d, i], rand_vec(rng, d * i, 0.025)),
        );
        m.insert(
            format!("blocks.{j}.ffn.down.bias"),
            (vec![d], rand_vec(rng, d, 0.05)),
        );
    }
    m
}

/// Forward + backward FLOPs of one step (multiply-add = 2), counting only the GEMMs.
fn step_flops(name: &str) -> f64 {
    let b = 64.0;
    if name.starts_with("conv") {
        let rows = b * 9.0;
        // With the frozen prefix the conv's own x·Wᵀ was computed once, before the steps.
        let fwd = if name.ends_with("-frozen") {
            0.0
        } else {
            2.0 * rows * 320.0 * 1280.0
        };
        let lora = if name.contains("lora") {
            2.0 * 2.0 * rows * 8.0 * (320.0 + 1280.0)
        } else {
            0.0
        };
        fwd + lora
    } else if name.starts_with("vit") {
        // Block 1 on all 65 tokens; block 2 computes keys and values for all of them and the
        // rest for the CLS token only.
        let (s, d, i, h) = (65.0, 384.0, 1536.0, 6.0);
        let full = 2.0 * b * s * (4.0 * d * d + 2.0 * d * i);
        let last = 2.0 * b * (s * 2.0 * d * d + 2.0 * d * d + 2.0 * d * i);
        let attn = 2.0 * b * h * 2.0 * (s * s + s) * (d / h);
        2.0 * (full + last + attn) + (full + last + 2.0 * attn)
    } else {
        // Every token, padding too: the step as PyTorch computes it. The Rust tail runs the
        // projections and the MLP on the real tokens alone (3 059 of 4 096 here; attention
        // still on the padded layout): see `executed_flops`.
        let (n, d, i, s, h) = (b * 64.0, 384.0, 1536.0, 64.0, 12.0);
        let proj = 2.0 * n * (4.0 * d * d + 2.0 * d * i);
        let attn = 2.0 * b * h * 2.0 * s * s * (d / h);
        // backward: input gradients through every GEMM (2 blocks) + attention's two extra GEMMs
        2.0 * (proj + attn) + 2.0 * (proj + 2.0 * attn)
    }
}

/// Like [`step_flops`], but for MiniLM counting the row-wise GEMMs on the real tokens only
/// (`real` rows), as the tail executes them.
fn executed_flops(name: &str, real: f64) -> f64 {
    if !name.starts_with("minilm") {
        return step_flops(name);
    }
    let (b, d, i, s, h) = (64.0, 384.0, 1536.0, 64.0, 12.0);
    let proj = 2.0 * real * (4.0 * d * d + 2.0 * d * i);
    let attn = 2.0 * b * h * 2.0 * s * s * (d / h);
    2.0 * (proj + attn) + 2.0 * (proj + 2.0 * attn)
}

fn run_one(name: &str, steps: usize) {
    let mut rng = StdRng::seed_from_u64(1);
    let lora = Method::Lora(LoraConfig {
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: vec![],
    });
    let method = if name.contains("lora") {
        lora
    } else {
        Method::Bias
    };
    let (family, weights, mut batch, classes) = if name.starts_with("conv") {
        let x =
            ArrayD::from_shape_simple_fn(IxDyn(&[64, 320, 3, 3]), || rng.random_range(0.0f32..6.0));
        (
            Family::ConvHead,
            conv_weights(&mut rng),
            Batch::new(x, None),
            10,
        )
    } else if name.starts_with("vit") {
        let x =
            ArrayD::from_shape_simple_fn(IxDyn(&[64, 65, 384]), || rng.random_range(-1.0f32..1.0));
        (
            Family::Vit(VitSpec::default()),
            vit_weights(&mut rng),
            Batch::new(x, None),
            10,
        )
    } else {
        let x =
            ArrayD::from_shape_simple_fn(IxDyn(&[64, 64, 384]), || rng.random_range(-1.0f32..1.0));
        // lengths 32..=64: a quarter to none of each sequence is padding
        let mask = Array2::from_shape_fn(
            (64, 64),
            |(b, s)| if s < 32 + (b * 7) % 33 { 1.0 } else { 0.0 },
        );
        let w = minilm_weights(&mut rng);
        (
            Family::Transformer(TransformerSpec::default()),
            w,
            Batch::new(x, Some(mask)),
            2,
        )
    };
    let real_tokens = batch.mask.as_ref().map_or(0.0, |m| m.sum() as f64);
    let labels: Vec<usize> = (0..64).map(|i| i % classes).collect();
    let mut tail = build_tail(family, &weights, PeftConfig::new(method, classes, 0)).unwrap();
    drop(weights);
    if name.ends_with("-frozen") {
        // As the edge client does once per shard: the part of the forward pass that no
        // trained tensor affects, kept and reused by every step.
        batch.frozen = Some(
            tail.frozen_prefix(&batch)
                .unwrap()
                .expect("conv head has one"),
        );
    }
    let mut opt = Sgd::with(0.01, 0.9, 0.0);
    // Baseline before the first step: memory that training itself needs (activations kept for
    // backward, gradients, optimizer state) counts, including what allocators keep cached.
    let rss_before = status_kib("VmRSS:");
    let heap_before = LIVE.load(Ordering::Relaxed);
    PEAK.store(heap_before, Ordering::Relaxed);
    tail.train_step(&batch, &labels, &mut opt).unwrap(); // warm-up (thread pool)
    let t = Instant::now();
    for _ in 0..steps {
        tail.train_step(&batch, &labels, &mut opt).unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    let sps = (steps * 64) as f64 / secs;
    let gflops = step_flops(name) * steps as f64 / secs / 1e9;
    let executed = executed_flops(name, real_tokens) * steps as f64 / secs / 1e9;
    println!(
        "{{\"impl\":\"rust\",\"config\":\"{name}\",\"batch\":64,\"steps\":{steps},\"samples_per_s\":{sps:.1},\
\"gemm_gflops\":{gflops:.1},\"executed_gflops\":{executed:.1},\"trainable\":{},\"peak_rss_mib\":{:.1},\"rss_before_train_mib\":{:.1},\
\"peak_rss_delta_mib\":{:.1},\"peak_heap_delta_mib\":{:.1},\"threads\":{}}}",
        tail.num_trainable(),
        status_kib("VmHWM:") as f64 / 1024.0,
        rss_before as f64 / 1024.0,
        (status_kib("VmHWM:").saturating_sub(rss_before)) as f64 / 1024.0,
        (PEAK.load(Ordering::Relaxed) - heap_before) as f64 / (1024.0 * 1024.0),
        std::env::var("MATMUL_NUM_THREADS").unwrap_or_else(|_| "2".into()),
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let configs = [
        "conv-lora",
        "conv-lora-frozen",
        "conv-bias",
        "conv-bias-frozen",
        "minilm-lora",
        "minilm-bias",
        "vit-lora",
        "vit-bias",
    ];
    if args.first().map(String::as_str) == Some("gemm") {
        // The hot GEMM shapes: MiniLM's MLP up-projection [4096, 384] x [384, 1536] and the
        // conv head's 1x1 conv [576, 320] x [320, 1280], on matrixmultiply (ndarray's `dot`)
        // and on the GEMM the tail uses (`fedpeft_peft::gemm`).
        let mut rng = StdRng::seed_from_u64(0);
        for (m, k, n, reps) in [(4096, 384, 1536, 20), (576, 320, 1280, 200)] {
            let a = Array2::from_shape_simple_fn((m, k), || rng.random_range(-1.0f32..1.0));
            let b = Array2::from_shape_simple_fn((n, k), || rng.random_range(-1.0f32..1.0));
            let flop = reps as f64 * 2.0 * (m * k * n) as f64;
            let _ = a.dot(&b.t());
            let t = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(a.dot(&b.t()));
            }
            let gf = flop / t.elapsed().as_secs_f64() / 1e9;
            println!(
                "{{\"impl\":\"rust-matrixmultiply\",\"gemm\":\"{m}x{k}x{n}\",\"gflops\":{gf:.1}}}"
            );
            let _ = gemm::matmul(&a.view(), &b.t());
            let t = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(gemm::matmul(&a.view(), &b.t()));
            }
            let gf = flop / t.elapsed().as_secs_f64() / 1e9;
            println!("{{\"impl\":\"rust-gemm\",\"gemm\":\"{m}x{k}x{n}\",\"gflops\":{gf:.1}}}");
        }
        return;
    }
    if let Some(name) = args.first() {
        let steps = args.get(1).and_then(|s| s.parse().ok());
        let steps = steps.unwrap_or(if name.starts_with("conv") { 200 } else { 10 });
        run_one(name, steps);
        return;
    }
    let exe = std::env::current_exe().unwrap();
    for c in configs {
        let status = std::process::Command::new(&exe)
            .arg(c)
            .env(
                "MATMUL_NUM_THREADS",
                std::env::var("MATMUL_NUM_THREADS").unwrap_or_else(|_| "2".into()),
            )
            .status()
            .unwrap();
        assert!(status.success(), "{c} failed");
    }
}
