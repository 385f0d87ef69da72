//! From a validated config to a ready [`TailTrainer`]: open the backbone, load the data set,
//! take this client's shard of the fleet's partition (or all of it), run the trunk once over it
//! (or find the activations in the cache from an earlier start), and build the PEFT tail. One
//! log line, `local training ready`, says how long each step took.
//!
//! Fashion-MNIST is read from its decoded copy in the cache folder ([`DecodedImages`]: made once,
//! memory-mapped by every client of a fleet), so a client reads the labels and its own images,
//! not the whole gzip'd set.
//!
//! Two families: a conv head on images (Fashion-MNIST, or the device's own image folder or IDX
//! files, an image folder resized to `image_size` as it is read), and a transformer tail on
//! texts (SpamAssassin, or the device's own CSV or JSONL; WordPiece at `max_seq_len` tokens; the
//! trunk's activations and the attention masks are cached). SpamAssassin's held-out 20 %
//! ([`spam_assassin_split`]) is never in a shard. Own data is labelled with the fleet's class
//! list, and a file that cannot be read stops the client before it joins: nothing is trained on
//! half-read data.
//!
//! Every client of a fleet computes the same partition from the same (data set, partition
//! kind, number of clients, seed), so N processes each train on their own shard without any
//! data being shipped.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use fedpeft_backbone::cache::hash_image_selection;
use fedpeft_backbone::data::{
    DecodedImages, ImageDataset, TextDataset, fashion_mnist_decoded, fashion_mnist_dir,
    load_spam_assassin, model_id, spam_assassin_dir, spam_assassin_split,
};
use fedpeft_backbone::{
    ActivationCache, Backbone, CacheConfig, CacheKey, Features, ImagePreprocess, Partitioner,
    TextPreprocess, Trunk, TrunkConfig, TrunkInput, open_trunk, partition, text_activations,
};
use fedpeft_peft::{FrozenWeights, PeftConfig};
use fedpeft_protocol::{Capabilities, DType, PeftMethod};

use crate::config::{DataSource, DatasetKind, EdgeConfig, PartitionKind};
use crate::trainer::TailTrainer;

/// Why local training could not be prepared. Each names the file, field or step.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("backbone in {dir}: {source}")]
    Backbone {
        dir: PathBuf,
        #[source]
        source: fedpeft_backbone::BackboneError,
    },
    #[error("local data ({dataset}): {source}")]
    Data {
        dataset: String,
        #[source]
        source: fedpeft_backbone::BackboneError,
    },
    #[error("{field}: {reason}")]
    Incompatible { field: &'static str, reason: String },
    #[error("partition: {0}")]
    Partition(#[source] fedpeft_backbone::BackboneError),
    #[error("client {index}'s shard is empty (num_clients = {num_clients}); use fewer clients")]
    EmptyShard { index: usize, num_clients: usize },
    #[error("trunk activations: {0}")]
    Trunk(#[source] fedpeft_backbone::BackboneError),
    #[error("tail weights {path}: {source}")]
    Tail {
        path: PathBuf,
        #[source]
        source: fedpeft_peft::PeftError,
    },
    #[error("{0}")]
    Trainer(#[from] crate::trainer::TrainError),
    #[error("manifest of {dir}: {reason}")]
    Manifest { dir: PathBuf, reason: String },
}

/// A client ready to join: its trainer and what it tells the aggregator about itself.
#[derive(Debug)]
pub struct LocalSetup {
    pub trainer: TailTrainer,
    pub capabilities: Capabilities,
    /// Samples per class in this client's shard.
    pub per_class: Vec<usize>,
    /// The class names, in label-id order (what `--serve` labels its answers with).
    pub classes: Vec<String>,
}

fn data_err(cfg: &EdgeConfig) -> impl Fn(fedpeft_backbone::BackboneError) -> SetupError + '_ {
    move |source| SetupError::Data {
        dataset: cfg.data.dataset.name().to_string(),
        source,
    }
}

/// The local images: Fashion-MNIST's training split from its decoded copy in the cache folder
/// (made by the first process that needs it, then mapped by every client: each reads the labels
/// and its own images only), or every image of the device's own data labelled with the fleet's
/// classes (an image folder resized to `image_size` as it is read).
enum LocalImages {
    Decoded {
        set: DecodedImages,
        /// The whole set, read out of `set` only if the trunk must run over all of it.
        whole: Option<ImageDataset>,
    },
    Read(ImageDataset),
}

impl LocalImages {
    fn len(&self) -> usize {
        match self {
            Self::Decoded { set, .. } => set.len(),
            Self::Read(ds) => ds.len(),
        }
    }

    fn labels(&self) -> std::borrow::Cow<'_, [u32]> {
        match self {
            Self::Decoded { set, .. } => set.labels_u32().into(),
            Self::Read(ds) => ds.labels.as_slice().into(),
        }
    }

    fn classes(&self) -> &[String] {
        match self {
            Self::Decoded { set, .. } => set.classes(),
            Self::Read(ds) => &ds.classes,
        }
    }

    /// The images at `indices`, in that order (only those are read from a decoded copy).
    fn select(
        &mut self,
        indices: &[usize],
    ) -> Result<ImageDataset, fedpeft_backbone::BackboneError> {
        match self {
            Self::Decoded { set, .. } => set.select(indices),
            Self::Read(ds) => Ok(ds.select(indices)),
        }
    }

    /// sha256 of every image, in order (a decoded copy keeps it in its header).
    fn hash_all(&self) -> String {
        match self {
            Self::Decoded { set, .. } => set.hash_all(),
            Self::Read(ds) => {
                let all: Vec<usize> = (0..ds.len()).collect();
                hash_image_selection(ds, &all)
            }
        }
    }

    /// The whole set.
    fn whole(&mut self) -> Result<&ImageDataset, fedpeft_backbone::BackboneError> {
        match self {
            Self::Decoded { set, whole } => {
                if whole.is_none() {
                    *whole = Some(set.to_dataset()?);
                }
                Ok(whole.as_ref().expect("read above"))
            }
            Self::Read(ds) => Ok(ds),
        }
    }
}

fn load_images(cfg: &EdgeConfig) -> Result<LocalImages, SetupError> {
    let start = Instant::now();
    let images = match &cfg.data.source {
        DataSource::Named { root } => {
            let dir = root.clone().unwrap_or_else(fashion_mnist_dir);
            let set = fashion_mnist_decoded(&cfg.cache_dir, &dir, true).map_err(data_err(cfg))?;
            tracing::info!(
                dataset = cfg.data.dataset.name(),
                source = %set.source().display(),
                examples = set.len(),
                classes = set.classes().len(),
                copy = %set.copy_path().map(|p| p.display().to_string()).unwrap_or_else(|| "none (in memory)".into()),
                ms = start.elapsed().as_millis() as u64,
                "local images opened"
            );
            LocalImages::Decoded { set, whole: None }
        }
        DataSource::Own { data, classes } => {
            let ds = data
                .load_images(classes, cfg.image_size)
                .map_err(data_err(cfg))?;
            tracing::info!(
                dataset = cfg.data.dataset.name(),
                source = %ds.source.display(),
                examples = ds.len(),
                classes = ds.num_classes(),
                ms = start.elapsed().as_millis() as u64,
                "local images read"
            );
            LocalImages::Read(ds)
        }
    };
    Ok(images)
}

/// The local texts and the positions a client may train on: SpamAssassin's training 80 %, or
/// every record of the device's own file labelled with the fleet's classes.
fn load_texts(cfg: &EdgeConfig) -> Result<(TextDataset, Vec<usize>), SetupError> {
    match &cfg.data.source {
        DataSource::Named { root } => {
            let dir = root.clone().unwrap_or_else(spam_assassin_dir);
            let ds = load_spam_assassin(&dir).map_err(data_err(cfg))?;
            // The held-out 20 % is the aggregator's; clients split the rest.
            let (train, _) = spam_assassin_split(&ds).map_err(data_err(cfg))?;
            Ok((ds, train))
        }
        DataSource::Own { data, classes } => {
            let ds = data.load_texts(classes).map_err(data_err(cfg))?;
            tracing::info!(
                dataset = cfg.data.dataset.name(),
                source = %ds.source.display(),
                examples = ds.len(),
                "local texts read"
            );
            let all = (0..ds.len()).collect();
            Ok((ds, all))
        }
    }
}

/// Refuses a configuration the backbone cannot train, naming the key: a data set of the
/// other modality, or adapters and prompts (which need transformer blocks) on a conv head.
pub fn check_compatible(cfg: &EdgeConfig, backbone: &Backbone) -> Result<(), SetupError> {
    let m = &backbone.manifest;
    let text = m.is_text();
    if cfg.data.dataset.is_text() != text {
        let reads: Vec<&str> = DatasetKind::ALL
            .into_iter()
            .filter(|k| k.is_text() == text)
            .map(DatasetKind::name)
            .collect();
        return Err(SetupError::Incompatible {
            field: "data.dataset",
            reason: format!(
                "`{}` cannot feed backbone `{}` ({:?}); it reads {}",
                cfg.data.dataset,
                m.id,
                m.family,
                reads.join(", ")
            ),
        });
    }
    let blocks_only = match cfg.peft {
        PeftMethod::Adapter { .. } => Some("adapter"),
        PeftMethod::Prompt { .. } => Some("prompt"),
        _ => None,
    };
    if let Some(method) = blocks_only
        && m.family == fedpeft_backbone::Family::ConvHead
    {
        return Err(SetupError::Incompatible {
            field: "model.peft",
            reason: format!(
                "{method} needs transformer blocks; backbone `{}` is a conv head: use head, \
                 bias, lora or full-tail",
                m.id
            ),
        });
    }
    Ok(())
}

/// The peft crate's tail family for a backbone, with the hyper-parameters its manifest gives.
pub fn tail_family(backbone: &Backbone) -> Result<fedpeft_peft::Family, SetupError> {
    backbone
        .manifest
        .tail_family()
        .map_err(|reason| SetupError::Manifest {
            dir: backbone.dir.clone(),
            reason,
        })
}

/// This client's shard: positions in `labels` (and `keys`) of shard `index` of the
/// fleet-wide partition, capped at `max_examples`, in ascending order.
pub fn client_shard(
    labels: &[u32],
    keys: Option<&[Option<String>]>,
    cfg: &EdgeConfig,
) -> Result<Vec<usize>, SetupError> {
    let how = match cfg.data.partition {
        PartitionKind::Whole => {
            return cap(cfg, (0..labels.len()).collect(), "all of the local data");
        }
        PartitionKind::Iid => Partitioner::Iid,
        PartitionKind::Dirichlet => Partitioner::Dirichlet {
            alpha: cfg.data.alpha,
        },
        PartitionKind::Natural => Partitioner::NaturalPacked {
            alpha: cfg.data.alpha,
        },
    };
    let p = partition(labels, keys, cfg.data.num_clients, &how, cfg.data.seed)
        .map_err(SetupError::Partition)?;
    let (name, shard) = p
        .clients
        .into_iter()
        .nth(cfg.data.index)
        .map(|c| (c.name, c.indices))
        .unwrap_or_default();
    cap(cfg, shard, &name)
}

/// `shard` capped at `max_examples` and sorted; an empty one is an error.
fn cap(cfg: &EdgeConfig, mut shard: Vec<usize>, name: &str) -> Result<Vec<usize>, SetupError> {
    tracing::info!(shard = %name, examples = shard.len(), "partition");
    if let Some(max) = cfg.data.max_examples.filter(|&m| m < shard.len()) {
        // A random subset, not the first `max` (a shard lists its examples class by class),
        // seeded per client so every run of the trial draws the same one.
        use rand::SeedableRng;
        use rand::seq::SliceRandom;
        let seed = cfg.data.seed ^ (cfg.data.index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        shard.shuffle(&mut rng);
        shard.truncate(max);
    }
    shard.sort_unstable();
    if shard.is_empty() {
        return Err(SetupError::EmptyShard {
            index: cfg.data.index,
            num_clients: cfg.data.num_clients,
        });
    }
    Ok(shard)
}

fn open_cache(cfg: &EdgeConfig) -> ActivationCache {
    ActivationCache::new(CacheConfig {
        memory_budget: if cfg.cache_shared {
            0
        } else {
            cfg.cache_memory_bytes
        },
        spill_dir: cfg.cache_dir.clone(),
        persist: cfg.cache_persist || cfg.cache_shared,
    })
}

fn trunk_config(cfg: &EdgeConfig) -> TrunkConfig {
    let runtime = crate::config::runtime(cfg.runtime);
    TrunkConfig::default()
        .with_runtime(runtime)
        .with_image_size(cfg.image_size)
        .with_threads(cfg.threads)
}

fn per_class(labels: &[u32], shard: &[usize], classes: usize) -> Vec<usize> {
    let mut per_class = vec![0usize; classes];
    for &i in shard {
        if let Some(c) = per_class.get_mut(labels[i] as usize) {
            *c += 1;
        }
    }
    per_class
}

/// The local activations are there: how many, their shape, where they came from. A text
/// trunk's sequence length is logged with them.
fn log_activations_ready(
    features: &Features,
    max_seq_len: Option<usize>,
    from_cache: bool,
    shared: bool,
    start: Instant,
) {
    tracing::info!(
        examples = features.len(),
        row_shape = ?features.row_shape(),
        max_seq_len,
        from_cache,
        in_memory = features.in_memory(),
        shared,
        ms = start.elapsed().as_millis() as u64,
        "trunk activations ready"
    );
}

/// A trainer ready to run, before the tail is attached: activations, masks, labels.
struct LocalData {
    features: Arc<Features>,
    masks: Option<Arc<Features>>,
    labels: Vec<usize>,
    /// The class names, in label-id order.
    classes: Vec<String>,
    per_class: Vec<usize>,
    phases: Phases,
}

/// Where a client's start-up went, in milliseconds: logged once as `local training ready`.
#[derive(Debug, Default, Clone, Copy)]
struct Phases {
    /// Opening the backbone (its manifest; the trunk is opened only when it must run).
    backbone_ms: u64,
    /// Reading (or mapping) the local data set.
    data_ms: u64,
    /// This client's shard of the fleet's partition.
    partition_ms: u64,
    /// The shard's trunk activations: from the activation cache, or the trunk run over it.
    activations_ms: u64,
    /// Whether the trunk ran (an activation-cache miss).
    trunk_ran: bool,
    /// The PEFT tail's frozen weights and the trainer.
    tail_ms: u64,
}

/// Milliseconds since `clock`, which restarts.
fn lap(clock: &mut Instant) -> u64 {
    let ms = clock.elapsed().as_millis() as u64;
    *clock = Instant::now();
    ms
}

/// Image shard -> cached trunk activations.
fn image_data(cfg: &EdgeConfig, backbone: &Backbone) -> Result<LocalData, SetupError> {
    let backbone_err = |source| SetupError::Backbone {
        dir: cfg.model_dir.clone(),
        source,
    };
    let mut phases = Phases::default();
    let mut clock = Instant::now();
    let mut images = load_images(cfg)?;
    phases.data_ms = lap(&mut clock);
    let all_labels = images.labels();
    let shard = client_shard(&all_labels, None, cfg)?;
    let per_class = per_class(&all_labels, &shard, images.classes().len());
    let labels: Vec<usize> = shard.iter().map(|&i| all_labels[i] as usize).collect();
    drop(all_labels);
    let classes = images.classes().to_vec();
    tracing::info!(examples = shard.len(), ?per_class, "local shard");
    phases.partition_ms = lap(&mut clock);
    // A shared cache holds every sample of the data set in one entry (filled once for the whole
    // fleet, left in its file: each process keeps only its own rows in memory), keyed by the
    // whole set's hash (a decoded copy keeps it: no image is read); the set is read only if
    // the trunk must run. Otherwise the entry is this client's shard, and only the shard's
    // images are read (500 of Fashion-MNIST's 60 000 are 0.4 MB of its 47 MB).
    let (data_hash, n, mut shard_set) = if cfg.cache_shared {
        (images.hash_all(), images.len(), None)
    } else {
        let ds = images.select(&shard).map_err(data_err(cfg))?;
        let all: Vec<usize> = (0..ds.len()).collect();
        (hash_image_selection(&ds, &all), ds.len(), Some(ds))
    };
    let selection: Vec<usize> = (0..n).collect();

    let pre = ImagePreprocess::from_manifest(&backbone.manifest, Some(cfg.image_size))
        .map_err(backbone_err)?;
    let key = CacheKey::new(backbone.trunk_sha256(), &data_hash, &pre.fingerprint());
    let mut cache = open_cache(cfg);
    let trunk_cfg = trunk_config(cfg);
    // The trunk is opened only on a cache miss: a restarted client with cached activations
    // never loads it.
    let mut trunk = None;
    let start = Instant::now();
    let features = cache
        .get_or_compute(&key, selection.len(), cfg.trunk_batch, |range| {
            if trunk.is_none() {
                let t = open_trunk(backbone, &trunk_cfg)?;
                tracing::info!(runtime = t.runtime().name(), "trunk opened");
                trunk = Some(t);
            }
            let t = trunk.as_ref().expect("opened above");
            let ds = match &mut shard_set {
                Some(ds) => &*ds,
                None => images.whole()?,
            };
            let x = pre.batch(ds, &selection[range])?;
            t.run(&TrunkInput::Image(x))
        })
        .map_err(SetupError::Trunk)?;
    let features = if cfg.cache_shared {
        Arc::new(features.select(&shard).map_err(SetupError::Trunk)?)
    } else {
        features
    };
    log_activations_ready(&features, None, trunk.is_none(), cfg.cache_shared, start);
    phases.activations_ms = lap(&mut clock);
    phases.trunk_ran = trunk.is_some();
    Ok(LocalData {
        features,
        masks: None,
        labels,
        classes,
        per_class,
        phases,
    })
}

/// Text shard (SpamAssassin: of its training 80 %) -> tokens -> cached trunk activations and
/// masks.
fn text_data(cfg: &EdgeConfig, backbone: &Backbone) -> Result<LocalData, SetupError> {
    let mut phases = Phases::default();
    let mut clock = Instant::now();
    let (ds, train) = load_texts(cfg)?;
    phases.data_ms = lap(&mut clock);
    let labels: Vec<u32> = train.iter().map(|&i| ds.labels[i]).collect();
    let keys: Vec<Option<String>> = train.iter().map(|&i| ds.keys[i].clone()).collect();
    let positions = client_shard(&labels, Some(&keys), cfg)?;
    let shard: Vec<usize> = positions.iter().map(|&p| train[p]).collect();
    let per_class = per_class(&ds.labels, &shard, ds.num_classes());
    let lists = shard
        .iter()
        .filter_map(|&i| ds.keys[i].as_deref())
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    tracing::info!(examples = shard.len(), ?per_class, lists, "local shard");
    phases.partition_ms = lap(&mut clock);

    let pre = TextPreprocess::from_backbone(backbone, cfg.max_seq_len).map_err(|source| {
        SetupError::Incompatible {
            field: "model.max_seq_len",
            reason: source.to_string(),
        }
    })?;
    let selection: &[usize] = if cfg.cache_shared { &train } else { &shard };
    let mut cache = open_cache(cfg);
    let trunk_cfg = trunk_config(cfg);
    let mut trunk: Option<Arc<dyn Trunk>> = None;
    let start = Instant::now();
    let acts = text_activations(
        &mut cache,
        backbone.trunk_sha256(),
        &pre,
        &ds,
        selection,
        cfg.trunk_batch,
        || {
            if trunk.is_none() {
                let t: Arc<dyn Trunk> = Arc::from(open_trunk(backbone, &trunk_cfg)?);
                tracing::info!(runtime = t.runtime().name(), "trunk opened");
                trunk = Some(t);
            }
            Ok(trunk.clone().expect("opened above"))
        },
    )
    .map_err(SetupError::Trunk)?;
    let (features, masks) = if cfg.cache_shared {
        // `train` and the shard are both ascending, so the shard's rows in the whole-set entry
        // are its positions in `train`.
        (
            Arc::new(
                acts.features
                    .select(&positions)
                    .map_err(SetupError::Trunk)?,
            ),
            Arc::new(acts.masks.select(&positions).map_err(SetupError::Trunk)?),
        )
    } else {
        (acts.features, acts.masks)
    };
    log_activations_ready(
        &features,
        Some(pre.max_len),
        trunk.is_none(),
        cfg.cache_shared,
        start,
    );
    phases.activations_ms = lap(&mut clock);
    phases.trunk_ran = trunk.is_some();
    Ok(LocalData {
        features,
        masks: Some(masks),
        labels: shard.iter().map(|&i| ds.labels[i] as usize).collect(),
        classes: ds.classes.clone(),
        per_class,
        phases,
    })
}

/// Prepares local training as the config says.
pub fn build_trainer(cfg: &EdgeConfig) -> Result<LocalSetup, SetupError> {
    let began = Instant::now();
    let mut clock = began;
    let backbone = Backbone::open(&cfg.model_dir).map_err(|source| SetupError::Backbone {
        dir: cfg.model_dir.clone(),
        source,
    })?;
    check_compatible(cfg, &backbone)?;
    let family = tail_family(&backbone)?;
    let backbone_ms = lap(&mut clock);
    let m = &backbone.manifest;
    let mut data = match m.family {
        fedpeft_backbone::Family::ConvHead | fedpeft_backbone::Family::Vit => {
            image_data(cfg, &backbone)?
        }
        fedpeft_backbone::Family::Transformer => text_data(cfg, &backbone)?,
    };
    data.phases.backbone_ms = backbone_ms;
    clock = Instant::now();

    let tail_path = backbone.tail_path();
    let weights =
        FrozenWeights::from_safetensors(&tail_path).map_err(|source| SetupError::Tail {
            path: tail_path.clone(),
            source,
        })?;
    let method = fedpeft_backbone::peft_method(cfg.peft);
    let seed = cfg.data.seed ^ (cfg.data.index as u64).rotate_left(29);
    let tail = fedpeft_peft::build_tail(
        family,
        &weights,
        PeftConfig::new(method, data.classes.len(), seed),
    )
    .map_err(|source| SetupError::Tail {
        path: tail_path,
        source,
    })?;
    let mut trainer = TailTrainer::new(tail, data.features, data.labels, seed)?
        .with_frozen_budget(cfg.frozen_budget_bytes);
    if let Some(masks) = data.masks {
        trainer = trainer.with_masks(masks)?;
    }
    let p = Phases {
        tail_ms: lap(&mut clock),
        ..data.phases
    };
    // One line with where start-up went (the MQTT connection follows: `connected`).
    tracing::info!(
        backbone_ms = p.backbone_ms,
        data_ms = p.data_ms,
        partition_ms = p.partition_ms,
        activations_ms = p.activations_ms,
        trunk_ran = p.trunk_ran,
        tail_ms = p.tail_ms,
        total_ms = began.elapsed().as_millis() as u64,
        "local training ready"
    );

    let sha = hex::decode(backbone.trunk_sha256())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| SetupError::Manifest {
            dir: cfg.model_dir.clone(),
            reason: format!(
                "trunk sha256 `{}` is not 64 hex digits",
                backbone.trunk_sha256()
            ),
        })?;
    // Own data: the class list is part of the model's identity, so an aggregator with another
    // list refuses this client at its join (`incompatible`).
    let id = model_id(&m.id, cfg.data.classes());
    if let Some(classes) = cfg.data.classes() {
        tracing::info!(?classes, model_id = %id, "the fleet's class list");
    }
    let backbone_id =
        heapless::String::try_from(id.as_str()).map_err(|_| SetupError::Manifest {
            dir: cfg.model_dir.clone(),
            reason: format!("backbone id `{id}` is longer than 64 bytes"),
        })?;
    let mut accepted_dtypes = heapless::Vec::new();
    for d in [DType::F32, DType::F16, DType::I8] {
        let _ = accepted_dtypes.push(d);
    }
    Ok(LocalSetup {
        trainer,
        capabilities: Capabilities {
            backbone_id,
            backbone_sha256: sha,
            peft: cfg.peft,
            accepted_dtypes,
            max_packet_size: cfg.max_packet_bytes as u32,
        },
        per_class: data.per_class,
        classes: data.classes,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use fedpeft_backbone::data::fashion_mnist_at;

    use super::*;
    use crate::config::{Cli, EdgeConfig};

    fn cfg(max: Option<usize>) -> EdgeConfig {
        let mut args = vec![
            "edge-client",
            "--client-id",
            "c0",
            "--model-dir",
            "m",
            "--partition",
            "dirichlet",
            "--alpha",
            "100",
            "--num-clients",
            "2",
            "--client-index",
            "0",
        ];
        let max = max.map(|m| m.to_string());
        if let Some(m) = &max {
            args.extend(["--max-examples", m.as_str()]);
        }
        EdgeConfig::from_cli(&Cli::try_parse_from(args).unwrap()).unwrap()
    }

    fn models() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/build")
    }

    fn text_cfg(extra: &[&str]) -> EdgeConfig {
        let dir = models().join("all-minilm-l6-v2");
        let mut args = vec![
            "edge-client",
            "--client-id",
            "c0",
            "--model-dir",
            dir.to_str().unwrap(),
            "--dataset",
            "spam-assassin",
            "--partition",
            "natural",
        ];
        args.extend_from_slice(extra);
        EdgeConfig::from_cli(&Cli::try_parse_from(args).unwrap()).unwrap()
    }

    #[test]
    fn natural_spam_assassin_shards_keep_lists_whole_and_never_touch_the_held_out_mails() {
        let ds = load_spam_assassin(&spam_assassin_dir()).unwrap();
        let (train, test) = spam_assassin_split(&ds).unwrap();
        assert_eq!(train.len() + test.len(), ds.len());
        let share = test.len() as f64 / ds.len() as f64;
        assert!((share - 0.2).abs() < 0.01, "held-out share {share}");
        let labels: Vec<u32> = train.iter().map(|&i| ds.labels[i]).collect();
        let keys: Vec<Option<String>> = train.iter().map(|&i| ds.keys[i].clone()).collect();
        let clients = 8;
        let mut owner: std::collections::BTreeMap<&str, usize> = Default::default();
        let mut seen = vec![false; ds.len()];
        for index in 0..clients {
            let cfg = text_cfg(&["--num-clients", "8", "--client-index", &index.to_string()]);
            let shard = client_shard(&labels, Some(&keys), &cfg).unwrap();
            let spam = shard.iter().filter(|&&p| labels[p] == 1).count();
            assert!(!shard.is_empty() && spam > 0, "client {index}: {spam} spam");
            for p in shard {
                let i = train[p];
                assert!(!seen[i], "mail {i} in two shards");
                seen[i] = true;
                if let Some(k) = ds.keys[i].as_deref() {
                    // Every list lives on exactly one client.
                    assert_eq!(*owner.entry(k).or_insert(index), index, "list {k}");
                }
            }
        }
        assert!(
            train.iter().all(|&i| seen[i]),
            "every training mail is in a shard"
        );
        assert!(
            test.iter().all(|&i| !seen[i]),
            "no held-out mail is in a shard"
        );
        assert!(owner.len() >= 20, "{} lists", owner.len());
    }

    #[test]
    fn a_backbone_refuses_the_other_modality_and_blocks_methods_on_a_conv_head() {
        let minilm = Backbone::open(models().join("all-minilm-l6-v2")).unwrap();
        let effnet = Backbone::open(models().join("efficientnet-lite0")).unwrap();
        check_compatible(&text_cfg(&["--peft", "prompt"]), &minilm).unwrap();
        let fashion = |peft: &str| {
            let mut c = cfg(None);
            c.peft = EdgeConfig::from_cli(
                &Cli::try_parse_from(["e", "--client-id", "c", "--model-dir", "m", "--peft", peft])
                    .unwrap(),
            )
            .unwrap()
            .peft;
            c
        };
        check_compatible(&fashion("lora"), &effnet).unwrap();
        for (c, backbone, field) in [
            (fashion("prompt"), &effnet, "model.peft"),
            (fashion("adapter"), &effnet, "model.peft"),
            (fashion("lora"), &minilm, "data.dataset"),
            (text_cfg(&[]), &effnet, "data.dataset"),
        ] {
            let err = check_compatible(&c, backbone).unwrap_err();
            assert!(
                matches!(&err, SetupError::Incompatible { field: f, .. } if *f == field),
                "{err}"
            );
            assert!(err.to_string().starts_with(field), "{err}");
        }
    }

    /// A Fashion-MNIST client of a 64-client fleet, as `fedpeft-fleet` starts it.
    fn fashion_cfg(cache: &std::path::Path, extra: &[&str]) -> EdgeConfig {
        let mut args = vec![
            "edge-client",
            "--client-id",
            "c",
            "--model-dir",
            "m",
            "--num-clients",
            "64",
            "--seed",
            "42",
            "--cache-dir",
            cache.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        EdgeConfig::from_cli(&Cli::try_parse_from(args).unwrap()).unwrap()
    }

    #[test]
    fn a_shard_from_the_decoded_copy_is_byte_identical_to_one_from_the_gzip_files() {
        let reference = fashion_mnist_at(&fashion_mnist_dir(), true).unwrap();
        let all: Vec<usize> = (0..reference.len()).collect();
        let reference_hash = hash_image_selection(&reference, &all);
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        // The sweep's Dirichlet splits (alpha 0.1 and 0.5), an IID one, and the quick start's
        // capped shards.
        let splits: [&[&str]; 4] = [
            &["--partition", "dirichlet", "--alpha", "0.5"],
            &["--partition", "dirichlet", "--alpha", "0.1"],
            &["--partition", "iid"],
            &[
                "--partition",
                "dirichlet",
                "--alpha",
                "0.5",
                "--max-examples",
                "500",
            ],
        ];
        for split in splits {
            for index in ["0", "5", "37", "63"] {
                let mut args = split.to_vec();
                args.extend(["--client-index", index]);
                let cfg = fashion_cfg(&cache, &args);
                let want = client_shard(&reference.labels, None, &cfg).unwrap();
                let mut images = load_images(&cfg).unwrap();
                assert!(
                    matches!(&images, LocalImages::Decoded { set, .. } if set.is_mapped()),
                    "{args:?}"
                );
                let shard = client_shard(&images.labels(), None, &cfg).unwrap();
                assert_eq!(shard, want, "{args:?}");
                // Same images, same order, same labels, classes and source: the same
                // activation-cache keys, per shard and for the whole set.
                let got = images.select(&shard).unwrap();
                assert_eq!(got, reference.select(&want), "{args:?}");
                assert_eq!(images.hash_all(), reference_hash, "{args:?}");
            }
        }
        // One copy, made by the first client; the whole set from it is the decoded one.
        let copies = std::fs::read_dir(cache.join("datasets")).unwrap().count();
        assert_eq!(copies, 1);
        let mut images = load_images(&fashion_cfg(&cache, &[])).unwrap();
        assert_eq!(images.whole().unwrap(), &reference);
    }

    #[test]
    fn a_capped_shard_is_a_seeded_random_subset_not_its_first_examples() {
        // 10 classes of 100 examples each; a Dirichlet shard lists its examples class by class.
        let labels: Vec<u32> = (0..1000).map(|i| i / 100).collect();
        let full = client_shard(&labels, None, &cfg(None)).unwrap();
        let capped = client_shard(&labels, None, &cfg(Some(50))).unwrap();
        assert_eq!(capped.len(), 50);
        assert!(capped.iter().all(|i| full.contains(i)));
        let classes: std::collections::BTreeSet<u32> = capped.iter().map(|&i| labels[i]).collect();
        assert!(
            classes.len() >= 5,
            "classes in the capped shard: {classes:?}"
        );
        assert_eq!(capped, client_shard(&labels, None, &cfg(Some(50))).unwrap());
        // A cap at or above the shard's size keeps it whole.
        assert_eq!(client_shard(&labels, None, &cfg(Some(5000))).unwrap(), full);
    }

    #[test]
    fn a_devices_own_csv_or_jsonl_becomes_a_trainer_labelled_by_the_fleets_classes() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("local.csv");
        std::fs::write(
            &csv,
            "id,message,kind
1,win a free prize now,spam
2,lunch at noon?,ham
             3,\"cheap pills, order today\",spam
",
        )
        .unwrap();
        let jsonl = dir.path().join("local.jsonl");
        std::fs::write(&jsonl, "{\"text\":\"see you at noon\",\"label\":\"ham\"}\n").unwrap();
        let cache = dir.path().join("cache");
        let cfg = |file: &str, extra: &[&str]| {
            let minilm = models().join("all-minilm-l6-v2");
            let mut args = vec![
                "edge-client",
                "--client-id",
                "c0",
                "--model-dir",
                minilm.to_str().unwrap(),
                "--max-seq-len",
                "16",
                "--cache-dir",
                cache.to_str().unwrap(),
                "--classes",
                "unsure,ham,spam",
            ];
            args.extend_from_slice(extra);
            let file =
                crate::config::EdgeFile::parse(file, std::path::Path::new("e.toml")).unwrap();
            EdgeConfig::resolve(file, &Cli::try_parse_from(args).unwrap()).unwrap()
        };
        let csv_cfg = cfg(
            &format!(
                "[data]\ndataset = \"csv\"\nroot = \"{}\"\ntext_column = \"message\"\n\
                 label_column = \"kind\"\n",
                csv.display()
            ),
            &[],
        );
        let setup = build_trainer(&csv_cfg).unwrap();
        // All three messages (partition none), counted under the fleet's ids.
        assert_eq!(setup.per_class, vec![0, 1, 2]);
        let id = setup.capabilities.backbone_id.as_str();
        let classes: Vec<String> = ["unsure", "ham", "spam"].map(String::from).to_vec();
        assert_eq!(id, model_id("all-minilm-l6-v2", Some(&classes)), "{id}");
        let jsonl_cfg = cfg(
            "",
            &["--dataset", "jsonl", "--data-root", jsonl.to_str().unwrap()],
        );
        assert_eq!(build_trainer(&jsonl_cfg).unwrap().per_class, vec![0, 1, 0]);
        // A label outside the list stops the client, naming the file and the line.
        std::fs::write(
            &jsonl,
            "{\"text\":\"a\",\"label\":\"ham\"}\n{\"text\":\"b\",\"label\":\"eggs\"}\n",
        )
        .unwrap();
        let err = build_trainer(&jsonl_cfg).unwrap_err().to_string();
        assert!(
            err.contains("local.jsonl, line 2") && err.contains("eggs"),
            "{err}"
        );
    }
}
