//! What every virtual client sends: a real update (the template), a few noisy variants of it
//! encoded once in each dtype, and the exact FedAvg the aggregator must publish from any mix of
//! them.
//!
//! The template is a real client's update: the difference of two consecutive global adapters of
//! a run (`globals/round-NNNN.bin`; with one client in the run that difference *is* its update,
//! up to one f32 rounding), or an update envelope captured from the broker. Client `i` sends, in
//! round `r`, variant `k` scaled by `2^e` (`k`, `e` drawn from `(seed, i, r)`), so every value
//! it sends is exactly `2^e · Vₖ` as the aggregator decodes it, and the expected aggregate is a
//! weighted sum over at most `3K` distinct vectors, computed exactly (TwoSum) whatever the
//! number of clients.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fedpeft_config::report::GlobalIndex;
use fedpeft_protocol::{
    Codec, DType, Envelope, Message, PeftMethod, SplitMix64, Tensor, Values, keyed_unit,
};

/// One tensor of the template: the delta's values, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateTensor {
    pub name: String,
    pub shape: Vec<u32>,
    pub values: Vec<f32>,
}

/// What a joining client says about its model (checked by an aggregator that has a backbone).
#[derive(Debug, Clone, PartialEq)]
pub struct JoinFacts {
    pub backbone_id: String,
    pub backbone_sha256: [u8; 32],
    pub peft: PeftMethod,
}

/// A real update and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    /// Human-readable origin, for the report.
    pub origin: String,
    pub tensors: Vec<TemplateTensor>,
    pub join: JoinFacts,
}

impl Template {
    /// Parameters in the update.
    pub fn parameters(&self) -> usize {
        self.tensors.iter().map(|t| t.values.len()).sum()
    }

    /// The aggregator's `[model]` table for this layout: without a backbone, the round-0 adapter
    /// is zeros of these shapes and nothing is evaluated.
    pub fn model_table(&self) -> String {
        let tensors: Vec<String> = self
            .tensors
            .iter()
            .map(|t| {
                let dims: Vec<String> = t.shape.iter().map(u32::to_string).collect();
                format!("{{ name = \"{}\", shape = [{}] }}", t.name, dims.join(", "))
            })
            .collect();
        format!("[model]\ntensors = [{}]\n", tensors.join(", "))
    }
}

/// Reads a template: a run's output folder (or its `globals/` folder, or the `index.json` in
/// it), whose first two kept global adapters give the update; or an envelope file holding a
/// `ClientUpdate` (its tensors are the update).
pub fn load(path: &Path) -> anyhow::Result<Template> {
    let index = if path.is_dir() {
        [path.join("globals/index.json"), path.join("index.json")]
            .into_iter()
            .find(|p| p.is_file())
            .with_context(|| {
                format!(
                    "template {}: a folder must be a run's output folder (with globals/index.json) \
                     or its globals/ folder",
                    path.display()
                )
            })?
    } else if path.file_name().is_some_and(|n| n == "index.json") {
        path.to_path_buf()
    } else {
        return from_envelope_file(path);
    };
    from_globals(&index)
}

fn from_globals(index_path: &Path) -> anyhow::Result<Template> {
    let text = std::fs::read_to_string(index_path)
        .with_context(|| format!("reading template index {}", index_path.display()))?;
    let index: GlobalIndex = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a globals index", index_path.display()))?;
    // globals/index.json names files relative to the run's output folder.
    let globals_dir = index_path.parent().unwrap_or(Path::new("."));
    let out_dir = globals_dir.parent().unwrap_or(Path::new("."));
    let mut files: Vec<(u32, PathBuf)> = index
        .rounds
        .iter()
        .filter_map(|e| Some((e.round, out_dir.join(e.file.as_ref()?))))
        .filter(|(_, p)| p.is_file())
        .collect();
    files.sort_by_key(|(r, _)| *r);
    let [(ra, a), (rb, b), ..] = files.as_slice() else {
        bail!(
            "template {}: needs two kept global adapters (rounds 0 and 1 of a run with keep_globals = \"all\"), found {}",
            index_path.display(),
            files.len()
        );
    };
    let ga = read_global(a)?;
    let gb = read_global(b)?;
    if ga.len() != gb.len() {
        bail!(
            "template: {} and {} have different layouts",
            a.display(),
            b.display()
        );
    }
    let mut tensors = Vec::with_capacity(ga.len());
    for (x, y) in ga.iter().zip(&gb) {
        if x.name != y.name || x.shape != y.shape {
            bail!(
                "template: tensor `{}` {:?} in {} but `{}` {:?} in {}",
                x.name,
                x.shape,
                a.display(),
                y.name,
                y.shape,
                b.display()
            );
        }
        let values = y.values.iter().zip(&x.values).map(|(q, p)| q - p).collect();
        tensors.push(TemplateTensor {
            name: x.name.clone(),
            shape: x.shape.clone(),
            values,
        });
    }
    let m = &index.model;
    let peft = match m.peft.as_str() {
        "head" => PeftMethod::Head,
        "bias" => PeftMethod::Bias,
        "lora" => PeftMethod::Lora {
            rank: m.lora_rank.unwrap_or(8),
            alpha: m.lora_alpha.unwrap_or(16.0),
        },
        "adapter" => PeftMethod::Adapter {
            bottleneck: m.bottleneck.unwrap_or(16),
        },
        "prompt" => PeftMethod::Prompt {
            tokens: m.prompt_tokens.unwrap_or(4),
        },
        "full-tail" => PeftMethod::FullTail,
        other => bail!(
            "template {}: unknown PEFT method `{other}`",
            index_path.display()
        ),
    };
    let mut sha = [0u8; 32];
    if let Some(h) = &m.backbone_sha256 {
        let bytes = decode_hex(h)
            .with_context(|| format!("template {}: backbone_sha256", index_path.display()))?;
        if bytes.len() != 32 {
            bail!(
                "template {}: backbone_sha256 is not 32 bytes",
                index_path.display()
            );
        }
        sha.copy_from_slice(&bytes);
    }
    Ok(Template {
        origin: format!(
            "global adapter of round {rb} minus round {ra} in {}",
            globals_dir.display()
        ),
        tensors,
        join: JoinFacts {
            backbone_id: m.backbone_id.clone().unwrap_or_default(),
            backbone_sha256: sha,
            peft,
        },
    })
}

fn decode_hex(s: &str) -> anyhow::Result<Vec<u8>> {
    if s.len() % 2 != 0 {
        bail!("odd number of hex digits");
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).context("not hex"))
        .collect()
}

fn tensors_of(ts: &[Tensor]) -> anyhow::Result<Vec<TemplateTensor>> {
    ts.iter()
        .map(|t| {
            if t.indices().is_some() {
                bail!(
                    "template tensor `{}` is sparse; a dense update is needed",
                    t.name()
                );
            }
            Ok(TemplateTensor {
                name: t.name().to_string(),
                shape: t.shape().to_vec(),
                values: t.to_f32(),
            })
        })
        .collect()
}

fn read_global(path: &Path) -> anyhow::Result<Vec<TemplateTensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    match Envelope::decode(&bytes)
        .with_context(|| format!("{} is not a fedpeft envelope", path.display()))?
        .message
    {
        Message::GlobalAdapter(g) => tensors_of(&g.tensors),
        other => bail!(
            "{} holds a {}, not a global adapter",
            path.display(),
            other.kind()
        ),
    }
}

fn from_envelope_file(path: &Path) -> anyhow::Result<Template> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading template {}", path.display()))?;
    let env = Envelope::decode(&bytes).with_context(|| {
        format!(
            "template {}: neither a folder with globals/index.json nor a fedpeft envelope",
            path.display()
        )
    })?;
    let Message::ClientUpdate(u) = env.message else {
        bail!(
            "template {} holds a {}; an update (kind client_update) or a run's globals folder is needed",
            path.display(),
            env.message.kind()
        );
    };
    Ok(Template {
        origin: format!(
            "update of client {} (round {}) in {}",
            u.client,
            u.round,
            path.display()
        ),
        tensors: tensors_of(&u.tensors)?,
        join: JoinFacts {
            backbone_id: String::new(),
            backbone_sha256: [0; 32],
            peft: PeftMethod::Head,
        },
    })
}

/// Purposes of the keyed draws (see [`keyed_unit`]).
pub const VARIANT_PURPOSE: u64 = 0x5_7a41;
pub const SCALE_PURPOSE: u64 = 0x5_5ca1;
pub const EXAMPLES_PURPOSE: u64 = 0x5_e7a0;

/// The noisy variants of the template, encoded once in one dtype.
#[derive(Debug, Clone)]
pub struct Variants {
    pub dtype: DType,
    /// `sets[k]`: variant k's tensors at scale 1.
    pub sets: Vec<Vec<Tensor>>,
}

impl Variants {
    /// `count` variants: `Vₖ = template + noise · rms(tensor) · u`, `u` uniform in [−1, 1) from
    /// `(seed, k)`, encoded in `dtype` (int8: stochastic rounding from `(seed, k)`).
    pub fn build(
        template: &Template,
        dtype: DType,
        count: usize,
        noise: f32,
        seed: u64,
    ) -> anyhow::Result<Variants> {
        let mut sets = Vec::with_capacity(count);
        for k in 0..count as u64 {
            let mut noise_rng = SplitMix64::new(seed ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut round_rng = SplitMix64::new(!seed ^ k.wrapping_mul(0xc2b2_ae3d_27d4_eb4f));
            let mut set = Vec::with_capacity(template.tensors.len());
            for t in &template.tensors {
                let n = t.values.len().max(1) as f64;
                let rms =
                    (t.values.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / n).sqrt() as f32;
                let values: Vec<f32> = t
                    .values
                    .iter()
                    .map(|&v| v + noise * rms * (2.0 * noise_rng.next_f32() - 1.0))
                    .collect();
                let tensor = Tensor::encode(
                    &t.name,
                    &t.shape,
                    &values,
                    Codec::dense(dtype),
                    &mut round_rng,
                )
                .with_context(|| format!("encoding variant {k} of `{}`", t.name))?;
                set.push(tensor);
            }
            sets.push(set);
        }
        Ok(Variants { dtype, sets })
    }

    /// Variant `k` scaled by `2^e` (exact: a power of two), as sent.
    pub fn tensors(&self, k: usize, e: i8) -> Vec<Tensor> {
        let s = 2f32.powi(i32::from(e));
        self.sets[k]
            .iter()
            .map(|t| {
                let values = match t.values() {
                    Values::F32(v) => Values::F32(v.iter().map(|x| x * s).collect()),
                    Values::F16(v) => Values::F16(v.clone()),
                    Values::I8 { scale, values } => Values::I8 {
                        scale: scale * s,
                        values: values.clone(),
                    },
                };
                // Same name, shape and length as a tensor that was already valid.
                Tensor::dense(t.name(), t.shape(), values).unwrap_or_else(|_| t.clone())
            })
            .collect()
    }

    /// What the aggregator decodes from variant `k` at scale `2^e`.
    pub fn decoded(&self, k: usize, e: i8) -> Vec<Vec<f32>> {
        self.tensors(k, e).iter().map(Tensor::to_f32).collect()
    }

    /// Wire bytes of the tensors (what dominates an update's size).
    pub fn payload_bytes(&self) -> usize {
        self.sets
            .first()
            .map(|s| s.iter().map(Tensor::payload_bytes).sum())
            .unwrap_or(0)
    }
}

/// Client `index`'s variant and scale exponent in `round`.
pub fn pick(seed: u64, index: u64, round: u32, variants: usize) -> (usize, i8) {
    let u = keyed_unit(seed, VARIANT_PURPOSE, index, u64::from(round));
    let k = ((u * variants as f64) as usize).min(variants.saturating_sub(1));
    let v = keyed_unit(seed, SCALE_PURPOSE, index, u64::from(round));
    let e = ((v * 3.0) as i8).min(2) - 1;
    (k, e)
}

/// Client `index`'s local example count (its FedAvg weight), 20..=500.
pub fn num_examples(seed: u64, index: u64) -> u64 {
    20 + (keyed_unit(seed, EXAMPLES_PURPOSE, index, 0) * 481.0) as u64
}

/// `a + b` and its rounding error (Knuth's TwoSum).
fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    let bp = s - a;
    (s, (a - (s - bp)) + (b - bp))
}

/// Named tensors as f32 values.
pub type Named = Vec<(String, Vec<f32>)>;

/// A dtype as a small ordered key.
pub fn dtype_code(d: DType) -> u8 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::I8 => 2,
    }
}

/// Which values an update carries: (dtype code, variant, exponent of its power-of-two scale).
pub type VariantKey = (u8, usize, i8);

/// What one round's honest updates were made of: the weight (Σ num_examples) sent with each
/// [`VariantKey`].
pub type Contributions = BTreeMap<VariantKey, u64>;

/// The global adapter FedAvg must publish after `previous`, given the weight each
/// (dtype, variant, exponent) was sent with this round: per value
/// `f32(f64(previous) + (Σ w·x exact) / Σ w)`, as `docs/protocol.md` defines it. `None` without
/// any weight, or when a dtype has no variants.
pub fn expected_fedavg(
    previous: &Named,
    contributions: &Contributions,
    variants: &[Variants],
) -> Option<Named> {
    let total: u64 = contributions.values().sum();
    if total == 0 {
        return None;
    }
    let mut sums: Vec<Vec<(f64, f64)>> = previous
        .iter()
        .map(|(_, v)| vec![(0.0, 0.0); v.len()])
        .collect();
    for (&(code, k, e), &w) in contributions {
        let set = variants.iter().find(|v| dtype_code(v.dtype) == code)?;
        let decoded = set.decoded(k, e);
        if decoded.len() != sums.len() {
            return None;
        }
        for (acc, d) in sums.iter_mut().zip(&decoded) {
            for ((s, err), &x) in acc.iter_mut().zip(d) {
                let (sum, rounding) = two_sum(*s, w as f64 * f64::from(x));
                *s = sum;
                *err += rounding;
            }
        }
    }
    Some(
        previous
            .iter()
            .zip(&sums)
            .map(|((name, base), acc)| {
                let values = base
                    .iter()
                    .zip(acc)
                    .map(|(&b, &(s, e))| (f64::from(b) + (s + e) / total as f64) as f32)
                    .collect();
                (name.clone(), values)
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> Template {
        Template {
            origin: "test".into(),
            tensors: vec![
                TemplateTensor {
                    name: "a".into(),
                    shape: vec![2, 3],
                    values: vec![0.5, -0.25, 0.125, 1e-3, -2.0, 0.0],
                },
                TemplateTensor {
                    name: "b".into(),
                    shape: vec![4],
                    values: vec![0.01, 0.02, -0.03, 0.04],
                },
            ],
            join: JoinFacts {
                backbone_id: String::new(),
                backbone_sha256: [0; 32],
                peft: PeftMethod::Head,
            },
        }
    }

    #[test]
    fn scaled_variants_decode_to_exact_powers_of_two_of_the_base() {
        for dtype in [DType::F32, DType::I8] {
            let v = Variants::build(&template(), dtype, 3, 0.1, 7).unwrap();
            for k in 0..3 {
                let base = v.decoded(k, 0);
                for e in [-1i8, 1] {
                    let s = 2f32.powi(i32::from(e));
                    for (x, y) in v.decoded(k, e).iter().zip(&base) {
                        for (a, b) in x.iter().zip(y) {
                            assert_eq!(a.to_bits(), (b * s).to_bits(), "{dtype:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn expected_fedavg_is_the_exact_weighted_mean_whatever_the_grouping() {
        let v = Variants::build(&template(), DType::F32, 4, 0.2, 1).unwrap();
        let previous: Named = template()
            .tensors
            .iter()
            .map(|t| (t.name.clone(), vec![0.5; t.values.len()]))
            .collect();
        // Clients 0..40 with their own weights, grouped by (variant, exponent).
        let mut contributions = BTreeMap::new();
        let mut clients = Vec::new();
        for i in 0..40u64 {
            let (k, e) = pick(3, i, 2, 4);
            let n = num_examples(3, i);
            *contributions
                .entry((dtype_code(DType::F32), k, e))
                .or_insert(0) += n;
            clients.push((n, v.decoded(k, e)));
        }
        let got = expected_fedavg(&previous, &contributions, std::slice::from_ref(&v)).unwrap();
        let total: u64 = clients.iter().map(|(n, _)| n).sum();
        for (ti, (_, base)) in previous.iter().enumerate() {
            for (j, &b) in base.iter().enumerate() {
                let (mut s, mut err) = (0f64, 0f64);
                for (n, d) in clients.iter().rev() {
                    let (x, y) = two_sum(s, *n as f64 * f64::from(d[ti][j]));
                    s = x;
                    err += y;
                }
                let want = (f64::from(b) + (s + err) / total as f64) as f32;
                assert_eq!(want.to_bits(), got[ti].1[j].to_bits());
            }
        }
    }

    #[test]
    fn picks_cover_every_variant_and_exponent() {
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..500 {
            seen.insert(pick(9, i, 1, 4));
            let n = num_examples(9, i);
            assert!((20..=500).contains(&n));
        }
        assert_eq!(seen.len(), 12);
    }
}
