//! A conv-head training step (what the edge client trains on a board) allocates per batch,
//! never per sample: the number of heap allocations of one `train_step` is the same at batch 64
//! and batch 256, for LoRA, bias and head tuning. Global average pooling and its backward used
//! to allocate a row per sample (44 allocations per LoRA step at batch 4, 164 at batch 64).
//! The GEMM (`gemm`) decides by a product's size whether to pack an operand into a buffer of
//! its own and whether to split it over threads, a few allocations per product, so small
//! batches (4, 16) allocate slightly fewer times per step (38, 40 for LoRA against 42): the
//! two batches compared are both past those sizes.
//!
//! The transformer and vit tails are not held to this: their attention runs one GEMM per sample
//! and head (with matrixmultiply, which allocated packing buffers for each: 376 allocations per
//! LoRA step at batch 4, 3256 at batch 64, with 2 blocks of 4 heads).
//!
//! Only the calling thread's allocations are counted, and a step's count is the least of three
//! steps: another thread of the process (the test harness's, or a GEMM worker starting up) may
//! allocate at any moment, and once-per-process or once-per-thread allocations are not per
//! sample either. The GEMM allocates its packing buffers on the calling thread, so they are
//! counted.
// Counting allocations needs `unsafe impl GlobalAlloc`; it only forwards to the system
// allocator and counts calls.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;

use fedpeft_peft::*;
use ndarray::{ArrayD, IxDyn};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

struct Counting;

thread_local! {
    // Const-initialised and without a destructor: reading it never allocates.
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn count_one() {
    ALLOCATIONS.with(|n| n.set(n.get() + 1));
}

fn allocations_so_far() -> usize {
    ALLOCATIONS.with(Cell::get)
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn rand_vec(rng: &mut StdRng, n: usize, s: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-s..s)).collect()
}

/// EfficientNet-Lite0's head shapes (320 → 1280). At full width the frozen 1×1 conv's product
/// is split over the GEMM's threads at both batch sizes (see the module docs).
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

fn lora() -> Method {
    Method::Lora(LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: vec![],
    })
}

/// Allocations of one `train_step` on a batch of `b` on this thread: the least of the second,
/// third and fourth steps (the first warms up optimizer state and any lazily built caches).
fn allocations_per_step(method: Method, b: usize) -> usize {
    let mut rng = StdRng::seed_from_u64(3);
    let features =
        ArrayD::from_shape_simple_fn(IxDyn(&[b, 320, 3, 3]), || rng.random_range(0.0f32..6.0));
    let batch = Batch::new(features, None);
    let classes = 10;
    let weights = conv_weights(&mut rng);
    let family = Family::ConvHead;
    let labels: Vec<usize> = (0..b).map(|i| i % classes).collect();
    let mut tail = build_tail(family, &weights, PeftConfig::new(method, classes, 0)).unwrap();
    let mut opt = AdamW::new(0.01);
    tail.train_step(&batch, &labels, &mut opt).unwrap();
    (0..3)
        .map(|_| {
            let before = allocations_so_far();
            tail.train_step(&batch, &labels, &mut opt).unwrap();
            allocations_so_far() - before
        })
        .min()
        .expect("three steps")
}

#[test]
fn a_conv_head_training_step_allocates_the_same_at_batch_64_and_batch_256() {
    for (name, method) in [
        ("lora", lora()),
        ("bias", Method::Bias),
        ("head", Method::Head),
    ] {
        let small = allocations_per_step(method.clone(), 64);
        let large = allocations_per_step(method, 256);
        println!("{name}: {small} allocations per step at batch 64, {large} at batch 256");
        assert_eq!(
            small, large,
            "{name}: a step at batch 256 allocates {large} times, at batch 64 {small} times"
        );
    }
}
