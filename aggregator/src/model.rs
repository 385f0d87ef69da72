//! [`BackboneHost`]: the real [`ModelHost`]: a split backbone (fedpeft-backbone) with a PEFT
//! tail (fedpeft-peft). The round-0 adapter is the tail's trainable tensors at initialization;
//! evaluation runs the tail over the trunk activations of a held-out set ([`HeldOutData`]),
//! read and checked when the host opens (a file that cannot be read stops the aggregator before
//! it starts, naming the file), run through the trunk once on a background thread and kept on
//! disk for the next run: Fashion-MNIST's test split or the user's own images for the conv head,
//! SpamAssassin's seeded held-out 20 % (`spam_assassin_split`, which no client trains on) or the
//! user's own texts for the transformer tail, tokenized at `max_seq_len` like the clients' data.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use fedpeft_backbone::cache::hash_image_selection;
use fedpeft_backbone::data::{
    ImageDataset, TextDataset, fashion_mnist, fashion_mnist_at, load_spam_assassin, model_id,
    spam_assassin_dir, spam_assassin_split,
};
use fedpeft_backbone::{
    ActivationCache, Backbone, CacheConfig, CacheKey, Features, ImagePreprocess, TextPreprocess,
    Trunk, TrunkConfig, TrunkInput, open_trunk, text_activations,
};
use fedpeft_peft::{Batch, FrozenWeights, PeftConfig, Tail};
use fedpeft_protocol::PeftMethod;

use crate::adapter::Adapter;
pub use crate::held_out::HeldOutData;
use crate::host::{Evaluation, HostError, ModelHost};

pub use fedpeft_backbone::data::HELD_OUT_SUBSET_SEED;
use fedpeft_backbone::data::held_out_subset;

/// Where the backbone host gets its model and held-out data.
#[derive(Debug, Clone)]
pub struct BackboneHostConfig {
    /// Built backbone directory (manifest.json, trunk.onnx, tail.safetensors).
    pub dir: PathBuf,
    pub peft: PeftMethod,
    /// Seed of the tail's initialization (the round-0 adapter).
    pub seed: u64,
    /// Held-out examples: the first ones of a named set's test split, a seeded random subset
    /// ([`HELD_OUT_SUBSET_SEED`]) of the user's own.
    pub eval_examples: usize,
    /// The held-out set; its modality must be the backbone's.
    pub eval: HeldOutData,
    /// Image side fed to the trunk (must match the clients').
    pub image_size: usize,
    /// Tokens per text (must match the clients'); `None`: the manifest's `max_len`.
    pub max_seq_len: Option<usize>,
    pub threads: usize,
    /// Where held-out activations are kept between runs.
    pub cache_dir: PathBuf,
    /// Largest frozen prefix of the held-out set kept between evaluations, bytes; 0 turns it
    /// off. [`DEFAULT_FROZEN_BUDGET`] unless testing.
    pub frozen_budget: usize,
    /// A Hugging Face PEFT LoRA folder the round-0 adapter is read from.
    pub initial_adapter: Option<PathBuf>,
}

/// Held-out activations and, for text, their attention masks.
type HeldOutRows = (Arc<Features>, Option<Arc<Features>>);

/// Held-out activations: being computed, ready, or failed (and why).
#[derive(Debug)]
enum HeldOut {
    Pending(JoinHandle<Result<HeldOutRows, HostError>>),
    Ready(HeldOutRows),
    Failed(String),
}

/// The work of the held-out thread: trunk activations (and masks) of the held-out set.
type HeldOutJob = Box<dyn FnOnce() -> Result<HeldOutRows, HostError> + Send>;

/// A backbone + PEFT tail + held-out activations.
#[derive(Debug)]
pub struct BackboneHost {
    tail: Box<dyn Tail>,
    features: HeldOut,
    /// The tail's frozen prefix of each 256-row chunk of the held-out set (`None` where the
    /// method has none or past the budget), kept at the first evaluation: later
    /// evaluations skip the part of the forward pass no trained tensor affects.
    frozen: Option<Vec<Option<ndarray::ArrayD<f32>>>>,
    frozen_budget: usize,
    labels: Vec<usize>,
    backbone_params: u64,
    backbone_id: String,
    backbone_sha256: [u8; 32],
    class_names: Vec<String>,
}

/// Default [`BackboneHostConfig::frozen_budget`]: 512 MiB.
pub const DEFAULT_FROZEN_BUDGET: usize = 512 << 20;

fn err(dir: &Path, what: &str, e: impl std::fmt::Display) -> HostError {
    HostError::Model(format!("backbone {}: {what}: {e}", dir.display()))
}

/// The held-out examples, read and checked: the set and the positions evaluated.
enum HeldOutSet {
    Images(ImageDataset, Vec<usize>),
    Texts(TextDataset, Vec<usize>),
}

/// Reads the held-out set `cfg.eval` names: the examples to evaluate and, for the user's own
/// data, the fleet's class list (configured, or an image folder's sub-folders).
fn read_held_out(cfg: &BackboneHostConfig) -> Result<(HeldOutSet, Option<Vec<String>>), HostError> {
    let what = format!("held-out set ({})", cfg.eval.name());
    let data_err = |e: fedpeft_backbone::BackboneError| err(&cfg.dir, &what, e);
    let start = Instant::now();
    let (set, classes) = match &cfg.eval {
        HeldOutData::FashionMnist { root } => {
            let ds = match root {
                Some(dir) => fashion_mnist_at(dir, false),
                None => fashion_mnist(false),
            }
            .map_err(data_err)?;
            let n = cfg.eval_examples.min(ds.len());
            (HeldOutSet::Images(ds, (0..n).collect()), None)
        }
        HeldOutData::SpamAssassin { root } => {
            let dir = root.clone().unwrap_or_else(spam_assassin_dir);
            let ds = load_spam_assassin(&dir).map_err(data_err)?;
            let (_, test) = spam_assassin_split(&ds).map_err(data_err)?;
            let idx = test[..cfg.eval_examples.min(test.len())].to_vec();
            (HeldOutSet::Texts(ds, idx), None)
        }
        HeldOutData::Own { data, classes } => {
            let classes = match classes {
                Some(list) => list.clone(),
                None => data.default_classes().map_err(data_err)?,
            };
            let set = if data.is_text() {
                let ds = data.load_texts(&classes).map_err(data_err)?;
                let idx = held_out_subset(ds.len(), cfg.eval_examples);
                HeldOutSet::Texts(ds, idx)
            } else {
                let ds = data
                    .load_images(&classes, cfg.image_size)
                    .map_err(data_err)?;
                let idx = held_out_subset(ds.len(), cfg.eval_examples);
                HeldOutSet::Images(ds, idx)
            };
            (set, Some(classes))
        }
    };
    let (labels, names, source) = match &set {
        HeldOutSet::Images(ds, idx) => (
            idx.iter().map(|&i| ds.labels[i]).collect::<Vec<_>>(),
            &ds.classes,
            &ds.source,
        ),
        HeldOutSet::Texts(ds, idx) => (
            idx.iter().map(|&i| ds.labels[i]).collect(),
            &ds.classes,
            &ds.source,
        ),
    };
    let mut per_class = vec![0usize; names.len()];
    for &l in &labels {
        per_class[l as usize] += 1;
    }
    let majority = per_class.iter().copied().max().unwrap_or(0) as f64 / labels.len().max(1) as f64;
    // A constant answer scores `majority_share`: the baseline a trained tail must beat.
    tracing::info!(
        dataset = cfg.eval.name(),
        source = %source.display(),
        examples = labels.len(),
        classes = ?names,
        ?per_class,
        majority_share = format!("{majority:.4}"),
        ms = start.elapsed().as_millis() as u64,
        "held-out set read"
    );
    if per_class.iter().filter(|&&n| n > 0).count() < names.len() {
        tracing::warn!(
            classes = ?names,
            ?per_class,
            "the held-out set lacks a class: its accuracy says nothing about that class"
        );
    }
    Ok((set, classes))
}

/// The job computing the held-out set's trunk activations (and masks), and its labels.
fn held_out_job(
    cfg: &BackboneHostConfig,
    set: HeldOutSet,
    backbone: Backbone,
    trunk_cfg: TrunkConfig,
    mut cache: ActivationCache,
) -> Result<(Vec<usize>, HeldOutJob), HostError> {
    let dir = &cfg.dir;
    let thread_dir = dir.clone();
    match set {
        HeldOutSet::Texts(ds, idx) => {
            let labels = idx.iter().map(|&i| ds.labels[i] as usize).collect();
            let pre = TextPreprocess::from_backbone(&backbone, cfg.max_seq_len)
                .map_err(|e| err(dir, "model.max_seq_len", e))?;
            let job: HeldOutJob = Box::new(move || {
                let mut trunk: Option<Arc<dyn Trunk>> = None;
                let acts = text_activations(
                    &mut cache,
                    backbone.trunk_sha256(),
                    &pre,
                    &ds,
                    &idx,
                    64,
                    || {
                        if trunk.is_none() {
                            trunk = Some(Arc::from(open_trunk(&backbone, &trunk_cfg)?));
                        }
                        Ok(trunk.clone().expect("opened above"))
                    },
                )
                .map_err(|e| err(&thread_dir, "held-out trunk activations", e))?;
                tracing::info!(
                    examples = idx.len(),
                    max_seq_len = pre.max_len,
                    computed = trunk.is_some(),
                    "held-out texts tokenized"
                );
                Ok((acts.features, Some(acts.masks)))
            });
            Ok((labels, job))
        }
        HeldOutSet::Images(ds, idx) => {
            let labels = idx.iter().map(|&i| ds.labels[i] as usize).collect();
            let pre = ImagePreprocess::from_manifest(&backbone.manifest, Some(cfg.image_size))
                .map_err(|e| err(dir, "preprocessing", e))?;
            let job: HeldOutJob = Box::new(move || {
                let key = CacheKey::new(
                    backbone.trunk_sha256(),
                    &hash_image_selection(&ds, &idx),
                    &pre.fingerprint(),
                );
                let mut trunk = None;
                let features = cache
                    .get_or_compute(&key, idx.len(), 64, |range| {
                        if trunk.is_none() {
                            trunk = Some(open_trunk(&backbone, &trunk_cfg)?);
                        }
                        let t = trunk.as_ref().expect("opened above");
                        let x = pre.batch(&ds, &idx[range])?;
                        t.run(&TrunkInput::Image(x))
                    })
                    .map_err(|e| err(&thread_dir, "held-out trunk activations", e))?;
                Ok((features, None))
            });
            Ok((labels, job))
        }
    }
}

/// Puts the Hugging Face PEFT LoRA adapter in `hf` into `tail` as the run's round-0 adapter:
/// its rank and alpha must be the run's, every LoRA factor the tail trains must be in it (and
/// nothing else), and a classifier beside it must fit the run's classes; the classifier is the
/// tail's fresh one otherwise.
fn start_from_hf_adapter(
    tail: &mut dyn fedpeft_peft::Tail,
    manifest: &fedpeft_backbone::Manifest,
    cfg: &BackboneHostConfig,
    hf: &std::path::Path,
) -> Result<(), HostError> {
    let bad = |why: String| err(hf, "model.initial_adapter", why);
    let PeftMethod::Lora { rank, alpha } = cfg.peft else {
        return Err(bad(
            "a Hugging Face PEFT adapter is LoRA: set peft = \"lora\"".into(),
        ));
    };
    let blocks = tail
        .trainable()
        .iter()
        .filter_map(|t| t.name.strip_prefix("blocks."))
        .filter_map(|r| r.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |b| b + 1);
    let read =
        fedpeft_backbone::hf_peft::read(hf, manifest, blocks).map_err(|e| bad(e.to_string()))?;
    if read.rank != usize::from(rank) || (read.alpha - f64::from(alpha)).abs() > 1e-6 {
        return Err(bad(format!(
            "r = {}, lora_alpha = {} in the adapter, but the run trains lora_rank = {rank}, \
             lora_alpha = {alpha}",
            read.rank, read.alpha
        )));
    }
    let mut tensors = tail.trainable();
    let mut given: std::collections::BTreeMap<&str, &fedpeft_peft::NamedTensor> = read
        .lora
        .iter()
        .chain(&read.head)
        .map(|t| (t.name.as_str(), t))
        .collect();
    for t in tensors.iter_mut() {
        match given.remove(t.name.as_str()) {
            Some(g) if g.shape == t.shape => t.values = g.values.clone(),
            Some(g) => {
                return Err(bad(format!(
                    "`{}` has shape {:?}; the run's tail needs {:?}",
                    t.name, g.shape, t.shape
                )));
            }
            None if t.name.starts_with("head.") => {}
            None => {
                return Err(bad(format!(
                    "no `{}` in the adapter: the run's LoRA trains it",
                    t.name
                )));
            }
        }
    }
    if let Some(name) = given.keys().next() {
        return Err(bad(format!(
            "the adapter has `{name}`, which the run's LoRA does not train (it trains the \
             query and value projections)"
        )));
    }
    tail.set_trainable(&tensors)
        .map_err(|e| bad(e.to_string()))?;
    tracing::info!(
        adapter = %hf.display(),
        rank,
        alpha,
        head = !read.head.is_empty(),
        "round-0 adapter from a Hugging Face PEFT folder"
    );
    Ok(())
}

impl BackboneHost {
    /// Opens the backbone, reads the held-out set and builds the tail, then starts computing
    /// the held-out activations on a thread of their own (the broker and the first round need
    /// not wait for them; the first evaluation does). Activations are kept in `cache_dir` for
    /// the next run.
    pub fn open(cfg: &BackboneHostConfig) -> Result<BackboneHost, HostError> {
        let dir = &cfg.dir;
        let backbone = Backbone::open(dir).map_err(|e| err(dir, "open", e))?;
        let m = &backbone.manifest;
        let text = m.is_text();
        if cfg.eval.is_text() != text {
            let reads = if text {
                "spam-assassin, csv or jsonl"
            } else {
                "fashion-mnist, image-folder or idx"
            };
            return Err(err(
                dir,
                "model.dataset",
                format!(
                    "`{}` cannot feed backbone `{}` ({:?}); it reads {reads}",
                    cfg.eval.name(),
                    m.id,
                    m.family
                ),
            ));
        }
        let family = m
            .tail_family()
            .map_err(|reason| err(dir, "manifest", reason))?;
        let tail_path = backbone.tail_path();
        let weights =
            FrozenWeights::from_safetensors(&tail_path).map_err(|e| err(dir, "tail weights", e))?;
        let sha = hex::decode(backbone.trunk_sha256())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| err(dir, "manifest", "trunk sha256 is not 64 hex digits"))?;
        let (set, fleet_classes) = read_held_out(cfg)?;
        let class_names = match &set {
            HeldOutSet::Images(ds, _) => ds.classes.clone(),
            HeldOutSet::Texts(ds, _) => ds.classes.clone(),
        };
        let classes = match &set {
            HeldOutSet::Images(ds, _) => ds.num_classes(),
            HeldOutSet::Texts(ds, _) => ds.num_classes(),
        };
        // Own data: the class list is part of the model's identity; a client with another list
        // joins with another id and is refused (`incompatible`).
        let backbone_id = model_id(&m.id, fleet_classes.as_deref());
        if let Some(list) = &fleet_classes {
            tracing::info!(classes = ?list, model_id = %backbone_id, "the fleet's class list");
        }
        let backbone_params = m.params.backbone;
        let trunk_cfg = TrunkConfig::default()
            .with_image_size(cfg.image_size)
            .with_threads(cfg.threads);
        let cache = ActivationCache::new(CacheConfig {
            memory_budget: 1 << 30,
            spill_dir: cfg.cache_dir.clone(),
            persist: true,
        });
        let backbone_manifest = backbone.manifest.clone();
        let (labels, job) = held_out_job(cfg, set, backbone, trunk_cfg, cache)?;
        let mut tail = fedpeft_peft::build_tail(
            family,
            &weights,
            PeftConfig::new(fedpeft_backbone::peft_method(cfg.peft), classes, cfg.seed),
        )
        .map_err(|e| err(dir, "tail", e))?;
        if let Some(hf) = &cfg.initial_adapter {
            start_from_hf_adapter(tail.as_mut(), &backbone_manifest, cfg, hf)?;
        }
        let pending = std::thread::Builder::new()
            .name("held-out-activations".into())
            .spawn(move || {
                let start = Instant::now();
                let out = job()?;
                tracing::info!(
                    examples = out.0.len(),
                    ms = start.elapsed().as_millis() as u64,
                    "held-out activations ready"
                );
                Ok(out)
            })
            .map_err(|e| err(&cfg.dir, "starting the activation thread", e))?;
        Ok(BackboneHost {
            tail,
            features: HeldOut::Pending(pending),
            frozen: None,
            frozen_budget: cfg.frozen_budget,
            labels,
            backbone_params,
            backbone_id,
            backbone_sha256: sha,
            class_names,
        })
    }

    /// The held-out activations, waiting for the thread that computes them the first time.
    fn features(&mut self) -> Result<HeldOutRows, HostError> {
        if let HeldOut::Pending(_) = self.features {
            let HeldOut::Pending(handle) =
                std::mem::replace(&mut self.features, HeldOut::Failed(String::new()))
            else {
                unreachable!("matched above")
            };
            self.features = match handle.join() {
                Ok(Ok(f)) => HeldOut::Ready(f),
                Ok(Err(e)) => HeldOut::Failed(e.to_string()),
                Err(_) => HeldOut::Failed("the activation thread panicked".into()),
            };
        }
        match &self.features {
            HeldOut::Ready(f) => Ok(f.clone()),
            HeldOut::Failed(e) => Err(HostError::Model(e.clone())),
            HeldOut::Pending(_) => unreachable!("joined above"),
        }
    }
}

impl ModelHost for BackboneHost {
    fn initial_adapter(&self) -> Result<Adapter, HostError> {
        Ok(Adapter::new(self.tail.trainable()))
    }

    fn evaluate(&mut self, adapter: &Adapter) -> Result<Option<Evaluation>, HostError> {
        let e = |what: &str, x: &dyn std::fmt::Display| HostError::Model(format!("{what}: {x}"));
        self.tail
            .set_trainable(&adapter.tensors)
            .map_err(|x| e("set adapter", &x))?;
        let (features, masks) = self.features()?;
        let (mut loss, mut correct) = (0.0f64, 0usize);
        let all: Vec<usize> = (0..self.labels.len()).collect();
        // Taken out while in use: an error below leaves it unset, to be computed again.
        let mut frozen = self.frozen.take();
        let first = frozen.is_none();
        let (mut kept, mut kept_bytes) = (Vec::new(), 0usize);
        for (k, idx) in all.chunks(256).enumerate() {
            let features = features.rows(idx).map_err(|x| e("activations", &x))?;
            let mask = match &masks {
                Some(m) => Some(
                    m.rows(idx)
                        .map_err(|x| e("attention masks", &x))?
                        .into_dimensionality::<ndarray::Ix2>()
                        .map_err(|x| e("attention masks", &x))?,
                ),
                None => None,
            };
            let mut batch = Batch::new(features, mask);
            batch.frozen = match frozen.as_mut() {
                Some(chunks) => chunks.get_mut(k).and_then(Option::take),
                None => self
                    .tail
                    .frozen_prefix(&batch)
                    .map_err(|x| e("frozen prefix", &x))?
                    .filter(|p| {
                        kept_bytes += p.len() * std::mem::size_of::<f32>();
                        kept_bytes <= self.frozen_budget
                    }),
            };
            let labels: Vec<usize> = idx.iter().map(|&i| self.labels[i]).collect();
            let s = self
                .tail
                .evaluate(&batch, &labels)
                .map_err(|x| e("evaluate", &x))?;
            loss += s.loss_sum;
            correct += s.correct;
            match frozen.as_mut() {
                Some(chunks) => {
                    if let Some(slot) = chunks.get_mut(k) {
                        *slot = batch.frozen.take();
                    }
                }
                None => kept.push(batch.frozen.take()),
            }
        }
        self.frozen = if first { Some(kept) } else { frozen };
        let n = self.labels.len().max(1) as f64;
        Ok(Some(Evaluation {
            loss: loss / n,
            accuracy: correct as f64 / n,
            examples: self.labels.len(),
        }))
    }

    fn backbone_params(&self) -> u64 {
        self.backbone_params
    }
    fn backbone_id(&self) -> Option<String> {
        Some(self.backbone_id.clone())
    }
    fn backbone_sha256(&self) -> Option<[u8; 32]> {
        Some(self.backbone_sha256)
    }
    fn classes(&self) -> Vec<String> {
        self.class_names.clone()
    }
}
