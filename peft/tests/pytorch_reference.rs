//! Reference tests against PyTorch: fixtures written by `scripts/peft/make_fixtures.py`
//! (Debian's torch, float64). The f64 path must match to 1e-9 and the f32 path to 1e-5,
//! both relative to each tensor's largest magnitude.

use std::collections::HashMap;
use std::sync::Arc;

use fedpeft_peft::layers::*;
use fedpeft_peft::params::{Grads, ParamStore};
use fedpeft_peft::*;
use ndarray::{Array2, ArrayD, IxDyn};
use safetensors::{Dtype, SafeTensors};

type Fixture = HashMap<String, (Vec<usize>, Vec<f64>)>;

fn load(name: &str) -> Fixture {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let data: Vec<f64> = match v.dtype() {
                Dtype::F32 => v
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::F64 => v
                    .data()
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                d => panic!("{n}: unexpected dtype {d:?}"),
            };
            (n, (v.shape().to_vec(), data))
        })
        .collect()
}

fn arr<T: Real>(f: &Fixture, name: &str) -> ArrayD<T> {
    let (shape, data) = f
        .get(name)
        .unwrap_or_else(|| panic!("fixture lacks {name}"));
    ArrayD::from_shape_vec(IxDyn(shape), data.iter().map(|&x| T::lit(x)).collect()).unwrap()
}

fn a2<T: Real>(f: &Fixture, name: &str) -> Array2<T> {
    let a = arr::<T>(f, name);
    let n = a.shape()[0];
    let m = a.len() / n;
    a.into_shape_with_order((n, m)).unwrap()
}

/// `max|got − want| ≤ tol · max(max|want|, 1e-6)`. The floor covers gradients that are
/// analytically zero (e.g. the attention key bias: softmax ignores a per-row constant), where
/// both sides hold only rounding noise.
fn assert_close<T: Real>(what: &str, got: impl IntoIterator<Item = T>, want: &[f64], tol: f64) {
    let got: Vec<f64> = got.into_iter().map(|x| x.wide()).collect();
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f64, |a, &b| a.max(b.abs())).max(1e-6);
    let err = got
        .iter()
        .zip(want)
        .fold(0.0f64, |a, (g, w)| a.max((g - w).abs()));
    assert!(
        err <= tol * scale,
        "{what}: max abs error {err:e} vs scale {scale:e} (tol {tol:e})"
    );
}

fn tol<T: Real>() -> f64 {
    if std::mem::size_of::<T>() == 8 {
        1e-9
    } else {
        1e-5
    }
}

fn want<'a>(f: &'a Fixture, name: &str) -> &'a [f64] {
    &f.get(name)
        .unwrap_or_else(|| panic!("fixture lacks {name}"))
        .1
}

fn layers_match<T: Real>() {
    let f = load("layers.safetensors");
    let t = tol::<T>();
    // linear + LoRA
    let mut st = ParamStore::<T>::new();
    let w = st.add("w", arr(&f, "linear.w"), true).unwrap();
    let b = st.add("b", arr(&f, "linear.b"), true).unwrap();
    let a = st.add("a", arr(&f, "linear.a"), true).unwrap();
    let bb = st.add("bb", arr(&f, "linear.bb"), true).unwrap();
    let lin = Linear {
        w,
        b: Some(b),
        lora: Some(LoraParams {
            a,
            b: bb,
            scaling: 1.5,
            dropout: 0.0,
        }),
    };
    let (y, c) = lin.forward(&st, &Arc::new(a2(&f, "linear.x")), None);
    assert_close("linear y", y.iter().copied(), want(&f, "linear.y"), t);
    let mut g = Grads::zeros_like(&st);
    let dx = lin
        .backward(&st, c, a2::<T>(&f, "linear.r").view(), &mut g, true)
        .unwrap();
    assert_close("linear dx", dx.iter().copied(), want(&f, "linear.dx"), t);
    for (id, n) in [(w, "dw"), (b, "db"), (a, "da"), (bb, "dbb")] {
        assert_close(
            &format!("linear {n}"),
            g.get(id).unwrap().iter().copied(),
            want(&f, &format!("linear.{n}")),
            t,
        );
    }
    // folded BN + ReLU6
    let mut st = ParamStore::<T>::new();
    let scale = st.add("s", arr(&f, "bn.scale"), true).unwrap();
    let shift = st.add("h", arr(&f, "bn.shift"), true).unwrap();
    let bn = FoldedBn { scale, shift };
    let (z, keep) = bn.forward(&st, a2(&f, "bn.x"));
    let y = relu6_forward(z);
    assert_close("bn+relu6 y", y.iter().copied(), want(&f, "bn.y"), t);
    let dz = relu6_backward(y.view(), a2(&f, "bn.r"));
    let mut g = Grads::zeros_like(&st);
    let dx = bn.backward(&st, keep, dz.view(), &mut g, true).unwrap();
    assert_close("bn dx", dx.iter().copied(), want(&f, "bn.dx"), t);
    assert_close(
        "bn dscale",
        g.get(scale).unwrap().iter().copied(),
        want(&f, "bn.dscale"),
        t,
    );
    assert_close(
        "bn dshift",
        g.get(shift).unwrap().iter().copied(),
        want(&f, "bn.dshift"),
        t,
    );
    // GELU
    let x = a2::<T>(&f, "gelu.x");
    assert_close(
        "gelu y",
        gelu_forward(x.view()).iter().copied(),
        want(&f, "gelu.y"),
        t,
    );
    let dx = gelu_backward(x.view(), a2(&f, "gelu.r"));
    assert_close("gelu dx", dx.iter().copied(), want(&f, "gelu.dx"), t);
    // LayerNorm
    let mut st = ParamStore::<T>::new();
    let weight = st.add("w", arr(&f, "ln.w"), true).unwrap();
    let bias = st.add("b", arr(&f, "ln.b"), true).unwrap();
    let ln = LayerNorm {
        weight,
        bias,
        eps: 1e-12,
    };
    let (y, c) = ln.forward(&st, a2::<T>(&f, "ln.x").view());
    assert_close("ln y", y.iter().copied(), want(&f, "ln.y"), t);
    let mut g = Grads::zeros_like(&st);
    let dx = ln.backward(&st, c, a2::<T>(&f, "ln.r").view(), &mut g);
    assert_close("ln dx", dx.iter().copied(), want(&f, "ln.dx"), t);
    assert_close(
        "ln dw",
        g.get(weight).unwrap().iter().copied(),
        want(&f, "ln.dw"),
        t,
    );
    assert_close(
        "ln db",
        g.get(bias).unwrap().iter().copied(),
        want(&f, "ln.db"),
        t,
    );
    // attention: [2, 5, 8] as rows [10, 8], 2 heads
    let rows = |n: &str| a2::<T>(&f, n).into_shape_with_order((10, 8)).unwrap();
    let mask = a2::<T>(&f, "attn.mask");
    let key_bias = mask.mapv(|m| (T::one() - m) * T::mask_bias());
    let core = AttentionCore { heads: 2 };
    let (y, c) = core.forward(
        rows("attn.q"),
        rows("attn.k"),
        rows("attn.v"),
        key_bias.view(),
    );
    assert_close("attn y", y.iter().copied(), want(&f, "attn.y"), t);
    let (dq, dk, dv) = core.backward(c, rows("attn.r").view());
    assert_close("attn dq", dq.iter().copied(), want(&f, "attn.dq"), t);
    assert_close("attn dk", dk.iter().copied(), want(&f, "attn.dk"), t);
    assert_close("attn dv", dv.iter().copied(), want(&f, "attn.dv"), t);
    // poolings
    let x = rows("pool.x");
    let mask = a2::<T>(&f, "pool.mask");
    assert_close(
        "pool y",
        masked_mean_forward(x.view(), mask.view()).iter().copied(),
        want(&f, "pool.y"),
        t,
    );
    let dx = masked_mean_backward(a2::<T>(&f, "pool.r").view(), mask.view());
    assert_close("pool dx", dx.iter().copied(), want(&f, "pool.dx"), t);
    let x4 = arr::<T>(&f, "gap.x")
        .into_dimensionality::<ndarray::Ix4>()
        .unwrap();
    let rows4 = nchw_to_rows(x4.view());
    assert_close(
        "gap y",
        gap_forward(rows4.view(), 2).iter().copied(),
        want(&f, "gap.y"),
        t,
    );
    let dxr = gap_backward(a2::<T>(&f, "gap.r").view(), 4);
    assert_close(
        "gap dx",
        rows_to_nchw(dxr.view(), 2, 2, 2).iter().copied(),
        want(&f, "gap.dx"),
        t,
    );
    // cross-entropy
    let labels: Vec<usize> = want(&f, "ce.labels").iter().map(|&l| l as usize).collect();
    let (loss, dl, _) = cross_entropy(a2::<T>(&f, "ce.logits").view(), &labels);
    assert_close("ce loss", [T::lit(loss)], want(&f, "ce.loss"), t);
    assert_close("ce dlogits", dl.iter().copied(), want(&f, "ce.dlogits"), t);
}

#[test]
fn every_layer_matches_pytorch_in_f64() {
    layers_match::<f64>();
}

#[test]
fn every_layer_matches_pytorch_in_f32() {
    layers_match::<f32>();
}

fn weights(f: &Fixture) -> FrozenWeights {
    let m = f
        .iter()
        .filter_map(|(n, (s, v))| {
            n.strip_prefix("w.").map(|n| {
                (
                    n.to_string(),
                    (s.clone(), v.iter().map(|&x| x as f32).collect()),
                )
            })
        })
        .collect();
    FrozenWeights::from_map(m).unwrap()
}

fn batch<T: Real>(f: &Fixture) -> (Batch<T>, Vec<usize>) {
    let mask = f.contains_key("in.mask").then(|| a2::<T>(f, "in.mask"));
    let labels = want(f, "in.labels").iter().map(|&l| l as usize).collect();
    (Batch::new(arr(f, "in.x"), mask), labels)
}

/// Builds the tail, loads the case's initial trainable tensors (`{case}.init.*`, or for a
/// pretrained tensor with no such entry its weight `w.*`), then checks logits, loss and
/// gradients (f64 and f32) and the tensors after one SGD step (f32, through the `Tail` trait).
fn check_case(file: &str, family: Family, case: &str, method: Method, classes: usize) {
    let f = load(file);
    let w = weights(&f);
    let prefix = format!("{case}.init.");
    let cfg = PeftConfig::new(method, classes, 0);
    let mut t64 = PeftTail::<f64>::build(family.clone(), &w, cfg.clone()).unwrap();
    let mut names: Vec<String> = t64
        .params()
        .iter()
        .filter(|(_, p)| p.trainable)
        .map(|(_, p)| p.name.clone())
        .collect();
    names.sort();
    for n in f.keys().filter_map(|n| n.strip_prefix(&prefix)) {
        assert!(
            names.iter().any(|t| t == n),
            "{file} {case}: the fixture starts `{n}`, which the tail does not train"
        );
    }
    // (fixture key of the initial value, the value as it goes on the wire)
    let init: Vec<(String, NamedTensor)> = names
        .iter()
        .map(|n| {
            let key = [format!("{prefix}{n}"), format!("w.{n}")]
                .into_iter()
                .find(|k| f.contains_key(k))
                .unwrap_or_else(|| panic!("{file} {case}: no initial value of `{n}`"));
            let (s, v) = &f[&key];
            let t = NamedTensor::new(n, s.clone(), v.iter().map(|&x| x as f32).collect());
            (key, t.unwrap())
        })
        .collect();
    for (key, t) in &init {
        let id = t64.params().id(&t.name).unwrap();
        t64.params_mut().param_mut(id).value = arr(&f, key);
    }
    let init: Vec<NamedTensor> = init.into_iter().map(|(_, t)| t).collect();

    // f64: forward and gradients to 1e-9
    let (b64, labels) = batch::<f64>(&f);
    let logits = t64.logits(&b64).unwrap();
    assert_close(
        &format!("{case} logits f64"),
        logits.iter().copied(),
        want(&f, &format!("{case}.logits")),
        1e-9,
    );
    let (loss, _, grads) = t64.loss_and_grads(&b64, &labels, true).unwrap();
    assert_close(
        &format!("{case} loss f64"),
        [loss],
        want(&f, &format!("{case}.loss")),
        1e-9,
    );
    for t in &init {
        let g = grads.get(t64.params().id(&t.name).unwrap()).unwrap();
        assert_close(
            &format!("{case} grad {} f64", t.name),
            g.iter().copied(),
            want(&f, &format!("{case}.grad.{}", t.name)),
            1e-9,
        );
    }

    // f32 through the Tail trait: forward, one SGD step (momentum 0.9, weight decay 0.01)
    let mut t32: Box<dyn Tail> = build_tail(family, &w, cfg).unwrap();
    t32.set_trainable(&init).unwrap();
    let (b32, _) = batch::<f32>(&f);
    let logits = t32.forward(&b32).unwrap();
    assert_close(
        &format!("{case} logits f32"),
        logits.iter().copied(),
        want(&f, &format!("{case}.logits")),
        1e-5,
    );
    let stats = t32
        .train_step(&b32, &labels, &mut Sgd::with(0.1, 0.9, 0.01))
        .unwrap();
    assert_close(
        &format!("{case} loss f32"),
        [stats.loss],
        want(&f, &format!("{case}.loss")),
        1e-5,
    );
    for t in t32.trainable() {
        assert_close(
            &format!("{case} after step {} f32", t.name),
            t.values.iter().copied(),
            want(&f, &format!("{case}.after.{}", t.name)),
            1e-5,
        );
    }
}

fn lora(rank: usize, alpha: f64, targets: Vec<LoraTarget>) -> Method {
    Method::Lora(LoraConfig {
        rank,
        alpha,
        dropout: 0.0,
        targets,
    })
}

#[test]
fn conv_head_lora_step_matches_pytorch() {
    check_case(
        "conv_head.safetensors",
        Family::ConvHead,
        "lora",
        lora(4, 8.0, vec![]),
        5,
    );
}

#[test]
fn conv_head_bias_step_matches_pytorch() {
    check_case(
        "conv_head.safetensors",
        Family::ConvHead,
        "bias",
        Method::Bias,
        5,
    );
}

fn tf() -> Family {
    Family::Transformer(TransformerSpec {
        heads: 4,
        ln_eps: 1e-12,
    })
}

#[test]
fn transformer_lora_step_matches_pytorch() {
    check_case(
        "transformer.safetensors",
        tf(),
        "lora",
        lora(2, 4.0, vec![LoraTarget::Q, LoraTarget::V, LoraTarget::Up]),
        4,
    );
}

#[test]
fn transformer_bias_step_matches_pytorch() {
    check_case("transformer.safetensors", tf(), "bias", Method::Bias, 4);
}

#[test]
fn transformer_adapter_step_matches_pytorch() {
    check_case(
        "transformer.safetensors",
        tf(),
        "adapter",
        Method::Adapter(AdapterConfig { bottleneck: 8 }),
        4,
    );
}

#[test]
fn transformer_prompt_step_matches_pytorch() {
    check_case(
        "transformer.safetensors",
        tf(),
        "prompt",
        Method::Prompt(PromptConfig { tokens: 3 }),
        4,
    );
}

fn vit() -> Family {
    Family::Vit(VitSpec {
        heads: 4,
        ln_eps: 1e-6,
        gelu: Gelu::Erf,
        k: 2,
        pool: Pool::Cls,
    })
}

#[test]
fn vit_head_step_matches_pytorch() {
    check_case("vit.safetensors", vit(), "head", Method::Head, 4);
}

#[test]
fn vit_bias_step_matches_pytorch() {
    check_case("vit.safetensors", vit(), "bias", Method::Bias, 4);
}

#[test]
fn vit_lora_on_q_and_v_step_matches_pytorch() {
    check_case("vit.safetensors", vit(), "lora", lora(2, 4.0, vec![]), 4);
}

#[test]
fn vit_lora_on_every_linear_layer_step_matches_pytorch() {
    let all = LoraTarget::parse_list("all-linear").unwrap();
    check_case("vit.safetensors", vit(), "lora_all", lora(2, 4.0, all), 4);
}

#[test]
fn vit_adapter_step_matches_pytorch() {
    let adapter = Method::Adapter(AdapterConfig { bottleneck: 8 });
    check_case("vit.safetensors", vit(), "adapter", adapter, 4);
}

#[test]
fn vit_prompt_step_matches_pytorch() {
    let prompt = Method::Prompt(PromptConfig { tokens: 3 });
    check_case("vit.safetensors", vit(), "prompt", prompt, 4);
}

#[test]
fn vit_full_tail_step_matches_pytorch() {
    check_case("vit.safetensors", vit(), "full_tail", Method::FullTail, 4);
}
