//! The aggregator's held-out evaluation on the real EfficientNet-Lite0 backbone and
//! Fashion-MNIST: keeping the tail's frozen prefix between evaluations (the default) gives the
//! same loss and accuracy as computing the whole tail every time, for every conv-head method.
//! Needs `make models`.

use std::path::PathBuf;

use fedpeft_aggregator::adapter::Adapter;
use fedpeft_aggregator::host::ModelHost;
use fedpeft_aggregator::model::{BackboneHost, BackboneHostConfig, DEFAULT_FROZEN_BUDGET};
use fedpeft_protocol::PeftMethod;

fn host(peft: PeftMethod, frozen_budget: usize, cache: &std::path::Path) -> BackboneHost {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/build/efficientnet-lite0");
    assert!(
        dir.join("trunk.onnx").is_file(),
        "{} is missing: run `make models`",
        dir.display()
    );
    BackboneHost::open(&BackboneHostConfig {
        dir,
        peft,
        seed: 7,
        eval_examples: 300,
        dataset: "fashion-mnist".into(),
        image_size: 96,
        max_seq_len: None,
        threads: 1,
        cache_dir: cache.to_path_buf(),
        frozen_budget,
    })
    .expect("backbone host")
}

/// The initial adapter with every value nudged, so LoRA's zero `B` and the head both matter.
fn nudged(a: &Adapter) -> Adapter {
    let mut a = a.clone();
    for t in &mut a.tensors {
        for (i, v) in t.values.iter_mut().enumerate() {
            *v += 0.01 * ((i % 7) as f32 - 3.0);
        }
    }
    a
}

#[test]
fn keeping_the_frozen_prefix_gives_the_same_evaluation() {
    let cache = tempfile::tempdir().unwrap();
    for peft in [
        PeftMethod::Head,
        PeftMethod::Bias,
        PeftMethod::Lora {
            rank: 8,
            alpha: 16.0,
        },
        PeftMethod::FullTail,
    ] {
        let mut kept = host(peft, DEFAULT_FROZEN_BUDGET, cache.path());
        let mut every_time = host(peft, 0, cache.path());
        let first = kept.initial_adapter().unwrap();
        let second = nudged(&first);
        for adapter in [&first, &second, &first] {
            let a = kept.evaluate(adapter).unwrap().unwrap();
            let b = every_time.evaluate(adapter).unwrap().unwrap();
            assert_eq!(a.examples, 300);
            assert!(
                (a.loss - b.loss).abs() < 1e-5 && a.accuracy == b.accuracy,
                "{peft:?}: {a:?} vs {b:?}"
            );
        }
        // The nudge changes the result, so the comparison above can fail.
        let a = kept.evaluate(&first).unwrap().unwrap();
        let b = kept.evaluate(&second).unwrap().unwrap();
        assert!(
            (a.loss - b.loss).abs() > 1e-4,
            "{peft:?}: nudge changed nothing"
        );
    }
}
