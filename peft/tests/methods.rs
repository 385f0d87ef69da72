//! PEFT methods: exact trainable-parameter counts, wire names, set/get round trips, clear
//! errors for bad input, and training that actually reduces the loss.

mod common;

use common::*;
use fedpeft_peft::*;

fn lora(rank: usize, targets: Vec<LoraTarget>) -> Method {
    Method::Lora(LoraConfig {
        rank,
        alpha: 2.0 * rank as f64,
        dropout: 0.0,
        targets,
    })
}

#[test]
fn efficientnet_lite0_conv_head_counts_match_the_independent_implementation() {
    // The real tail's shapes: 320 -> 1280, 10 classes.
    let w = conv_weights(320, 1280, 1);
    let count = |m: Method| {
        build_tail(Family::ConvHead, &w, PeftConfig::new(m, 10, 0))
            .unwrap()
            .num_trainable()
    };
    assert_eq!(count(Method::Head), 12_810);
    assert_eq!(count(Method::Bias), 14_090);
    assert_eq!(count(lora(8, vec![])), 25_610);
    assert_eq!(count(Method::FullTail), 424_970);
    let t = build_tail(Family::ConvHead, &w, PeftConfig::new(Method::Head, 10, 0)).unwrap();
    assert_eq!(t.num_frozen(), 409_600 + 2_560);
}

#[test]
fn minilm_shaped_transformer_counts_are_exact() {
    let w = transformer_weights(2, 384, 1536, 2);
    let fam = Family::Transformer(TransformerSpec::default());
    let count = |m: Method| {
        build_tail(fam.clone(), &w, PeftConfig::new(m, 2, 0))
            .unwrap()
            .num_trainable()
    };
    let head = 384 * 2 + 2;
    assert_eq!(count(Method::Head), head);
    // per block: q,k,v,o biases 4·384, up 1536, down 384, two LayerNorm biases 2·384
    assert_eq!(
        count(Method::Bias),
        head + 2 * (4 * 384 + 1536 + 384 + 2 * 384)
    );
    // LoRA r=8 on q and v (the default): 2 · 8·(384+384) per block
    assert_eq!(count(lora(8, vec![])), head + 2 * 2 * 8 * 768);
    // adapters: 2 per block, each 384·m + m + m·384 + 384
    let m = 64;
    assert_eq!(
        count(Method::Adapter(AdapterConfig { bottleneck: m })),
        head + 2 * 2 * (2 * 384 * m + m + 384)
    );
    assert_eq!(
        count(Method::Prompt(PromptConfig { tokens: 10 })),
        head + 10 * 384
    );
    let block = 4 * (384 * 384 + 384) + 2 * 384 * 1536 + 1536 + 384 + 4 * 384;
    assert_eq!(count(Method::FullTail), head + 2 * block);
}

fn vit() -> Family {
    Family::Vit(VitSpec {
        heads: 2,
        ..VitSpec::default()
    })
}

#[test]
fn dinov2_vit_s_shaped_vit_counts_are_exact() {
    let w = vit_weights(2, 384, 1536, 2);
    let fam = Family::Vit(VitSpec::default());
    let count = |m: Method| {
        build_tail(fam.clone(), &w, PeftConfig::new(m, 2, 0))
            .unwrap()
            .num_trainable()
    };
    let head = 384 * 2 + 2;
    assert_eq!(count(Method::Head), head);
    // per block as the transformer's; plus final_ln's shift
    assert_eq!(
        count(Method::Bias),
        head + 2 * (4 * 384 + 1536 + 384 + 2 * 384) + 384
    );
    assert_eq!(count(lora(8, vec![])), head + 2 * 2 * 8 * 768);
    // q, k, v, o: 8·(384+384) each; up and down: 8·(384+1536) each
    assert_eq!(
        count(lora(8, LoraTarget::ALL_LINEAR.to_vec())),
        head + 2 * (4 * 8 * 768 + 2 * 8 * 1920)
    );
    let m = 64;
    assert_eq!(
        count(Method::Adapter(AdapterConfig { bottleneck: m })),
        head + 2 * 2 * (2 * 384 * m + m + 384)
    );
    assert_eq!(
        count(Method::Prompt(PromptConfig { tokens: 10 })),
        head + 10 * 384
    );
    // the transformer's block, two layer scales; the final LayerNorm
    let block = 4 * (384 * 384 + 384) + 2 * 384 * 1536 + 1536 + 384 + 4 * 384 + 2 * 384;
    let tail = 2 * block + 2 * 384;
    assert_eq!(count(Method::FullTail), head + tail);
    let t = build_tail(fam.clone(), &w, PeftConfig::new(Method::Head, 2, 0)).unwrap();
    assert_eq!(t.num_frozen(), tail);
}

#[test]
fn vit_wire_names_follow_the_transformer_s() {
    let w = vit_weights(2, 8, 12, 3);
    let names = |m: Method| -> Vec<String> {
        build_tail(vit(), &w, PeftConfig::new(m, 3, 0))
            .unwrap()
            .trainable()
            .into_iter()
            .map(|t| t.name)
            .collect()
    };
    let bias = names(Method::Bias);
    assert_eq!(
        &bias[..3],
        [
            "blocks.0.attn.q.bias",
            "blocks.0.attn.k.bias",
            "blocks.0.attn.v.bias"
        ]
    );
    assert_eq!(
        &bias[bias.len() - 3..],
        ["final_ln.bias", "head.weight", "head.bias"]
    );
    assert!(bias.iter().all(|n| !n.contains("ls")), "{bias:?}");
    let full = names(Method::FullTail);
    for n in [
        "blocks.0.ls1",
        "blocks.1.ls2",
        "final_ln.weight",
        "blocks.1.ffn.down.weight",
    ] {
        assert!(full.iter().any(|f| f == n), "{n} not in {full:?}");
    }
    assert_eq!(
        names(lora(2, vec![]))[..4],
        [
            "blocks.0.attn.q.lora_a",
            "blocks.0.attn.q.lora_b",
            "blocks.0.attn.v.lora_a",
            "blocks.0.attn.v.lora_b"
        ]
    );
    let a = names(Method::Adapter(AdapterConfig { bottleneck: 2 }));
    assert!(a.contains(&"blocks.1.adapter_attn.down.weight".to_string()));
    assert_eq!(
        names(Method::Prompt(PromptConfig { tokens: 2 }))[0],
        "prompt.tokens"
    );
}

#[test]
fn a_vit_spec_reads_a_manifest_s_tail_hyper() {
    let hyper = serde_json::json!({
        "hidden": 384, "heads": 6, "intermediate": 1536, "layer_norm_eps": 1e-6,
        "gelu": "erf", "k": 2, "pool": "cls"
    });
    let spec: VitSpec = serde_json::from_value(hyper.clone()).unwrap();
    assert_eq!(spec, VitSpec::default());
    let mut tanh = hyper.clone();
    tanh["gelu"] = "tanh".into();
    let e = serde_json::from_value::<VitSpec>(tanh).unwrap_err();
    assert!(e.to_string().contains("tanh"), "{e}");
    let mut no_k = hyper;
    no_k.as_object_mut().unwrap().remove("k");
    let e = serde_json::from_value::<VitSpec>(no_k).unwrap_err();
    assert!(e.to_string().contains("`k`"), "{e}");
}

#[test]
fn lora_target_lists_parse_with_all_linear() {
    assert_eq!(
        LoraTarget::parse_list("q, v").unwrap(),
        [LoraTarget::Q, LoraTarget::V]
    );
    assert_eq!(
        LoraTarget::parse_list("all-linear").unwrap(),
        LoraTarget::ALL_LINEAR
    );
    assert!(LoraTarget::parse_list("q,qq").is_err());
}

#[test]
fn trainable_tensors_have_stable_wire_names() {
    let w = transformer_weights(2, 8, 12, 3);
    let fam = Family::Transformer(TransformerSpec {
        heads: 2,
        ln_eps: 1e-12,
    });
    let names = |m: Method| -> Vec<String> {
        build_tail(fam.clone(), &w, PeftConfig::new(m, 3, 0))
            .unwrap()
            .trainable()
            .into_iter()
            .map(|t| t.name)
            .collect()
    };
    let l = names(lora(2, vec![LoraTarget::Q, LoraTarget::Down]));
    assert_eq!(
        l,
        [
            "blocks.0.attn.q.lora_a",
            "blocks.0.attn.q.lora_b",
            "blocks.0.ffn.down.lora_a",
            "blocks.0.ffn.down.lora_b",
            "blocks.1.attn.q.lora_a",
            "blocks.1.attn.q.lora_b",
            "blocks.1.ffn.down.lora_a",
            "blocks.1.ffn.down.lora_b",
            "head.weight",
            "head.bias"
        ]
    );
    let a = names(Method::Adapter(AdapterConfig { bottleneck: 2 }));
    assert!(a.contains(&"blocks.1.adapter_ffn.up.weight".to_string()));
    assert_eq!(
        names(Method::Prompt(PromptConfig { tokens: 2 }))[0],
        "prompt.tokens"
    );
    let c = build_tail(
        Family::ConvHead,
        &conv_weights(4, 6, 1),
        PeftConfig::new(lora(2, vec![]), 3, 0),
    )
    .unwrap();
    let ct = c.trainable();
    assert_eq!(ct[0].name, "conv_head.lora_a");
    assert_eq!(ct[0].shape, vec![2, 4]);
    assert_eq!(ct[1].shape, vec![6, 2]);
    assert!(
        ct[1].values.iter().all(|&v| v == 0.0),
        "LoRA B starts at zero"
    );
}

#[test]
fn unsupported_combinations_and_bad_configs_are_clear_errors() {
    let w = conv_weights(4, 6, 1);
    for m in [
        Method::Adapter(AdapterConfig::default()),
        Method::Prompt(PromptConfig::default()),
        lora(2, vec![LoraTarget::Q]),
    ] {
        let e = build_tail(Family::ConvHead, &w, PeftConfig::new(m, 3, 0)).unwrap_err();
        assert!(matches!(e, PeftError::Unsupported { .. }), "{e}");
    }
    let tw = transformer_weights(1, 8, 12, 3);
    let fam = Family::Transformer(TransformerSpec {
        heads: 3,
        ln_eps: 1e-12,
    });
    let e = build_tail(fam, &tw, PeftConfig::new(Method::Head, 3, 0)).unwrap_err();
    assert!(e.to_string().contains("not divisible by 3 heads"), "{e}");
    let e = build_tail(Family::ConvHead, &tw, PeftConfig::new(Method::Head, 3, 0)).unwrap_err();
    assert!(e.to_string().contains("conv_head.weight"), "{e}");
    let e = build_tail(Family::ConvHead, &w, PeftConfig::new(lora(0, vec![]), 3, 0)).unwrap_err();
    assert!(e.to_string().contains("lora.rank"), "{e}");
    assert!(Method::from_name("prefix").is_err());
    assert!("qq".parse::<LoraTarget>().is_err());
}

#[test]
fn a_vit_refuses_weights_of_another_depth_or_layout_and_masked_batches() {
    let w = vit_weights(2, 8, 12, 3);
    let three = Family::Vit(VitSpec {
        heads: 2,
        k: 3,
        ..VitSpec::default()
    });
    let e = build_tail(three, &w, PeftConfig::new(Method::Head, 3, 0)).unwrap_err();
    assert!(
        e.to_string().contains("k = 3 blocks") && e.to_string().contains("holds 2"),
        "{e}"
    );
    // BERT blocks have no layer scale
    let bert = transformer_weights(2, 8, 12, 3);
    let e = build_tail(vit(), &bert, PeftConfig::new(Method::Head, 3, 0)).unwrap_err();
    assert!(e.to_string().contains("blocks.0.ls1"), "{e}");
    let t = build_tail(vit(), &w, PeftConfig::new(Method::Head, 3, 0)).unwrap();
    let e = t.forward(&token_batch::<f32>(2, 4, 8, 1)).unwrap_err();
    assert!(e.to_string().contains("attention mask"), "{e}");
    let no_token = Batch::new(ndarray::ArrayD::zeros(vec![2, 0, 8]), None);
    assert!(matches!(t.forward(&no_token), Err(PeftError::Batch(_))));
}

#[test]
fn set_trainable_round_trips_and_rejects_bad_updates() {
    let w = conv_weights(4, 6, 1);
    let mut t = build_tail(Family::ConvHead, &w, PeftConfig::new(Method::Bias, 3, 0)).unwrap();
    let mut upd = t.trainable();
    for x in upd.iter_mut().flat_map(|t| t.values.iter_mut()) {
        *x += 1.0;
    }
    t.set_trainable(&upd).unwrap();
    assert_eq!(t.trainable(), upd);

    let mut wrong_shape = upd.clone();
    wrong_shape[0].shape = vec![3, 2];
    assert!(matches!(
        t.set_trainable(&wrong_shape),
        Err(PeftError::Shape { .. })
    ));
    let mut short = upd.clone();
    short[0].values.pop();
    assert!(matches!(
        t.set_trainable(&short),
        Err(PeftError::Length { .. })
    ));
    let missing = upd[1..].to_vec();
    assert!(matches!(
        t.set_trainable(&missing),
        Err(PeftError::MissingTensor { .. })
    ));
    let mut unknown = upd.clone();
    unknown[0].name = "conv_head.weight".into(); // frozen under `bias`
    let e = t.set_trainable(&unknown).unwrap_err();
    assert!(
        e.to_string().contains("conv_head.weight") && e.to_string().contains("bn_head.shift"),
        "{e}"
    );
    assert_eq!(t.trainable(), upd, "a rejected update changes nothing");
}

#[test]
fn bad_batches_are_typed_errors_not_panics() {
    let w = conv_weights(4, 6, 1);
    let mut t = build_tail(Family::ConvHead, &w, PeftConfig::new(Method::Head, 3, 0)).unwrap();
    let mut opt = Sgd::new(0.1);
    let b = conv_batch::<f32>(2, 4, 3, 1);
    assert!(matches!(
        t.train_step(&b, &[0, 3], &mut opt),
        Err(PeftError::Label {
            index: 1,
            label: 3,
            ..
        })
    ));
    assert!(matches!(
        t.train_step(&b, &[0], &mut opt),
        Err(PeftError::Batch(_))
    ));
    let wrong = conv_batch::<f32>(2, 5, 3, 1);
    assert!(matches!(t.forward(&wrong), Err(PeftError::Batch(_))));
}

fn train(
    tail: &mut dyn Tail,
    batch: &Batch,
    labels: &[usize],
    opt: &mut dyn Optimizer,
    steps: usize,
) -> (f64, f64) {
    let first = tail.evaluate(batch, labels).unwrap().loss_sum;
    for _ in 0..steps {
        tail.train_step(batch, labels, opt).unwrap();
    }
    (first, tail.evaluate(batch, labels).unwrap().loss_sum)
}

#[test]
fn every_method_reduces_the_training_loss_on_every_family() {
    let cw = conv_weights(6, 10, 4);
    let cb = conv_batch::<f32>(8, 6, 2, 5);
    let labels: Vec<usize> = (0..8).map(|i| i % 3).collect();
    for m in [
        Method::Head,
        Method::Bias,
        lora(2, vec![]),
        Method::FullTail,
    ] {
        let mut t = build_tail(Family::ConvHead, &cw, PeftConfig::new(m.clone(), 3, 1)).unwrap();
        let (a, b) = train(t.as_mut(), &cb, &labels, &mut AdamW::new(0.1), 60);
        assert!(b < 0.7 * a, "conv {m}: {a} -> {b}");
    }
    let tw = transformer_weights(2, 8, 12, 6);
    let tb = token_batch::<f32>(8, 5, 8, 7);
    let fam = Family::Transformer(TransformerSpec {
        heads: 2,
        ln_eps: 1e-12,
    });
    for m in [
        Method::Head,
        Method::Bias,
        lora(2, vec![]),
        Method::Adapter(AdapterConfig { bottleneck: 4 }),
        Method::Prompt(PromptConfig { tokens: 2 }),
        Method::FullTail,
    ] {
        let mut t = build_tail(fam.clone(), &tw, PeftConfig::new(m.clone(), 3, 1)).unwrap();
        let (a, b) = train(t.as_mut(), &tb, &labels, &mut Sgd::with(0.2, 0.9, 0.0), 30);
        assert!(b < 0.7 * a, "transformer {m}: {a} -> {b}");
    }
    let vw = vit_weights(2, 8, 12, 8);
    let vb = vit_batch::<f32>(8, 5, 8, 9);
    for m in [
        Method::Head,
        Method::Bias,
        lora(2, vec![]),
        Method::Adapter(AdapterConfig { bottleneck: 4 }),
        Method::Prompt(PromptConfig { tokens: 2 }),
        Method::FullTail,
    ] {
        let mut t = build_tail(vit(), &vw, PeftConfig::new(m.clone(), 3, 1)).unwrap();
        let (a, b) = train(t.as_mut(), &vb, &labels, &mut Sgd::with(0.2, 0.9, 0.0), 30);
        assert!(b < 0.7 * a, "vit {m}: {a} -> {b}");
    }
}

#[test]
fn training_is_deterministic_given_the_seed_even_with_lora_dropout() {
    let w = conv_weights(6, 10, 4);
    let b = conv_batch::<f32>(4, 6, 2, 5);
    let m = Method::Lora(LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.2,
        targets: vec![],
    });
    let run = || {
        let mut t = build_tail(Family::ConvHead, &w, PeftConfig::new(m.clone(), 3, 9)).unwrap();
        let mut opt = Sgd::with(0.1, 0.9, 1e-4);
        for _ in 0..3 {
            t.train_step(&b, &[0, 1, 2, 0], &mut opt).unwrap();
        }
        t.trainable()
    };
    assert_eq!(run(), run());
}

#[test]
fn padding_tokens_do_not_change_a_sample_s_logits() {
    let w = transformer_weights(2, 8, 12, 6);
    let fam = Family::Transformer(TransformerSpec {
        heads: 2,
        ln_eps: 1e-12,
    });
    let t = build_tail(
        fam,
        &w,
        PeftConfig::new(Method::Prompt(PromptConfig { tokens: 2 }), 3, 1),
    )
    .unwrap();
    let mut b = token_batch::<f32>(1, 5, 8, 7);
    let mut m = ndarray::Array2::ones((1, 5));
    m[[0, 3]] = 0.0;
    m[[0, 4]] = 0.0;
    b.mask = Some(m);
    let before = t.forward(&b).unwrap();
    b.features.slice_mut(ndarray::s![0, 3.., ..]).fill(123.0);
    let after = t.forward(&b).unwrap();
    for (x, y) in before.iter().zip(after.iter()) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
}
