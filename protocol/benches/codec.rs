//! Encode / decode throughput of a 300k-parameter client update in each codec, and its size on
//! the wire against raw f32. Throughput is in raw f32 bytes (1.2 MB per update) per second.
//!
//! `make bench` (= `cargo bench -p fedpeft-protocol --bench codec`).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fedpeft_protocol::*;

const PARAMS: usize = 300_000;
/// Six tensors of 50 000, like a LoRA update over a few projections.
const TENSORS: usize = 6;

fn delta() -> Vec<f32> {
    // Gaussian-ish deltas (sum of uniforms), small like real updates.
    let mut rng = SplitMix64::new(11);
    (0..PARAMS)
        .map(|_| (rng.next_f32() + rng.next_f32() + rng.next_f32() - 1.5) * 1e-3)
        .collect()
}

fn encode(data: &[f32], codec: Codec, seed: u64) -> Vec<u8> {
    let mut rng = SplitMix64::new(seed);
    let per = PARAMS / TENSORS;
    let tensors = data
        .chunks(per)
        .enumerate()
        .map(|(i, d)| {
            Tensor::encode(
                &format!("blocks.{i}.lora"),
                &[per as u32],
                d,
                codec,
                &mut rng,
            )
            .unwrap()
        })
        .collect();
    let update = ClientUpdate {
        client: ClientId::new("pi-01").unwrap(),
        round: 1,
        sequence: 1,
        num_examples: 500,
        metrics: TrainMetrics {
            loss: 0.1,
            accuracy: 0.9,
            steps: 10,
            elapsed_ms: 100,
            epsilon: None,
        },
        tensors,
    };
    Envelope::new(1, 1, update).encode().unwrap()
}

fn decode(bytes: &[u8]) -> Vec<Vec<f32>> {
    let env = Envelope::decode(bytes).unwrap();
    env.message.validate().unwrap();
    env.message.tensors().iter().map(Tensor::to_f32).collect()
}

fn codecs() -> [(&'static str, Codec); 5] {
    [
        ("f32", Codec::dense(DType::F32)),
        ("f16", Codec::dense(DType::F16)),
        ("int8", Codec::dense(DType::I8)),
        ("topk10-f32", Codec::top_k(DType::F32, 0.1)),
        ("topk10-int8", Codec::top_k(DType::I8, 0.1)),
    ]
}

fn bench(c: &mut Criterion) {
    let data = delta();
    let raw = PARAMS * 4;
    println!("encoded size of a {PARAMS}-parameter update (raw f32: {raw} bytes):");
    for (name, codec) in codecs() {
        let n = encode(&data, codec, 0).len();
        println!(
            "  {name:<12} {n:>8} bytes  {:>6.2}% of raw  ({:.2}x smaller)",
            100.0 * n as f64 / raw as f64,
            raw as f64 / n as f64
        );
    }

    let mut g = c.benchmark_group("update_300k");
    g.throughput(Throughput::Bytes(raw as u64));
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (name, codec) in codecs() {
        g.bench_function(format!("encode/{name}"), |b| {
            b.iter(|| encode(black_box(&data), codec, 1))
        });
        let bytes = encode(&data, codec, 1);
        g.bench_function(format!("decode/{name}"), |b| {
            b.iter(|| decode(black_box(&bytes)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
