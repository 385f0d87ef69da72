//! `Tail::merged`: the tail as trained, as one set of weights. A tail built from them with only
//! a (pretrained) classifier gives the trained tail's logits: LoRA folded into its weights,
//! trained biases and LayerNorm shifts in place, the classifier as `classifier.*`.

mod common;

use std::collections::HashMap;

use common::*;
use fedpeft_peft::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

/// Every trainable tensor set to random values (LoRA's B is zero at init, which would hide a
/// wrong fold).
fn trained(mut tail: Box<dyn Tail>, seed: u64) -> Box<dyn Tail> {
    let mut rng = StdRng::seed_from_u64(seed);
    let t: Vec<NamedTensor> = tail
        .trainable()
        .into_iter()
        .map(|mut t| {
            t.values = rand_vec(&mut rng, t.values.len(), 0.3);
            t
        })
        .collect();
    tail.set_trainable(&t).unwrap();
    tail
}

fn weights_of(tensors: &[NamedTensor]) -> FrozenWeights {
    let m: HashMap<String, (Vec<usize>, Vec<f32>)> = tensors
        .iter()
        .map(|t| (t.name.clone(), (t.shape.clone(), t.values.clone())))
        .collect();
    FrozenWeights::from_map(m).unwrap()
}

fn check(family: Family, weights: &FrozenWeights, method: Method, batch: &Batch) {
    let name = method.name();
    let tail = trained(
        build_tail(family.clone(), weights, PeftConfig::new(method, 3, 1)).unwrap(),
        9,
    );
    let merged = tail.merged();
    assert!(
        merged.iter().all(|t| !t.name.contains("lora")),
        "{name}: LoRA factors left"
    );
    let plain = build_tail(
        family,
        &weights_of(&merged),
        PeftConfig {
            method: Method::Head,
            head: HeadInit::Pretrained,
            seed: 0,
        },
    )
    .unwrap();
    let (a, b) = (tail.forward(batch).unwrap(), plain.forward(batch).unwrap());
    let diff = (&a - &b).mapv(f32::abs).fold(0.0f32, |m, &v| m.max(v));
    assert!(diff < 1e-4, "{name}: merged logits differ by {diff}");
}

fn lora(targets: Vec<LoraTarget>) -> Method {
    Method::Lora(LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets,
    })
}

#[test]
fn a_merged_tail_gives_the_trained_tails_logits() {
    let conv = conv_weights(6, 10, 1);
    let conv_batch = conv_batch::<f32>(4, 6, 3, 2);
    for m in [Method::Head, Method::Bias, lora(vec![]), Method::FullTail] {
        check(Family::ConvHead, &conv, m, &conv_batch);
    }
    let vit_family = Family::Vit(VitSpec {
        heads: 2,
        ln_eps: 1e-6,
        gelu: Gelu::Erf,
        k: 2,
        pool: Pool::Cls,
    });
    let vit = vit_weights(2, 8, 12, 3);
    let vit_batch = vit_batch::<f32>(3, 5, 8, 4);
    for m in [
        Method::Head,
        Method::Bias,
        lora(vec![]),
        lora(LoraTarget::ALL_LINEAR.to_vec()),
        Method::FullTail,
    ] {
        check(vit_family.clone(), &vit, m, &vit_batch);
    }
    let text = transformer_weights(2, 8, 12, 5);
    let tokens = token_batch::<f32>(3, 4, 8, 6);
    for m in [Method::Bias, lora(vec![])] {
        check(
            Family::Transformer(TransformerSpec {
                heads: 2,
                ..TransformerSpec::default()
            }),
            &text,
            m,
            &tokens,
        );
    }
}

#[test]
fn adapters_and_prompts_are_kept_under_their_names() {
    let vit = vit_weights(2, 8, 12, 3);
    let family = Family::Vit(VitSpec {
        heads: 2,
        ln_eps: 1e-6,
        gelu: Gelu::Erf,
        k: 2,
        pool: Pool::Cls,
    });
    for m in [
        Method::Adapter(AdapterConfig { bottleneck: 3 }),
        Method::Prompt(PromptConfig { tokens: 2 }),
    ] {
        let tail = trained(
            build_tail(family.clone(), &vit, PeftConfig::new(m, 3, 1)).unwrap(),
            11,
        );
        let merged: HashMap<String, NamedTensor> = tail
            .merged()
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        for t in tail.trainable() {
            let name = t.name.replace("head.", "classifier.");
            assert_eq!(merged[&name].values, t.values, "{name}");
        }
    }
}
