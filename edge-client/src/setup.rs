//! From a validated config to a ready [`TailTrainer`]: open the backbone, load the data set,
//! take this client's shard of the fleet's partition, run the trunk once over it (or find the
//! activations in the cache from an earlier start), and build the PEFT tail.
//!
//! Every client of a fleet computes the same partition from the same (data set, partition
//! kind, number of clients, seed), so N processes each train on their own shard without any
//! data being shipped.

use std::path::PathBuf;
use std::time::Instant;

use fedpeft_backbone::cache::hash_image_selection;
use fedpeft_backbone::data::{FASHION_MNIST_CLASSES, ImageDataset, fashion_mnist, load_idx_pair};
use fedpeft_backbone::{
    ActivationCache, Backbone, CacheConfig, CacheKey, ImagePreprocess, Partitioner, Runtime,
    TrunkConfig, TrunkInput, open_trunk, partition,
};
use fedpeft_peft::{AdapterConfig, FrozenWeights, LoraConfig, Method, PeftConfig, PromptConfig};
use fedpeft_protocol::{Capabilities, DType, PeftMethod};

use crate::config::{EdgeConfig, PartitionKind, PeftChoice, RuntimeChoice};
use crate::trainer::TailTrainer;

/// Images per trunk batch while filling the activation cache.
const TRUNK_BATCH: usize = 64;

/// Why local training could not be prepared. Each names the file, field or step.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("backbone in {dir}: {source}")]
    Backbone {
        dir: PathBuf,
        #[source]
        source: fedpeft_backbone::BackboneError,
    },
    #[error("data set `{dataset}`: {source}")]
    Data {
        dataset: String,
        #[source]
        source: fedpeft_backbone::BackboneError,
    },
    #[error("data set `{0}` is not supported by the edge client (supported: fashion-mnist)")]
    UnknownDataset(String),
    #[error(
        "backbone `{id}` is a {family} backbone; the edge client trains conv-head (image) tails"
    )]
    UnsupportedFamily { id: String, family: String },
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
}

/// The protocol's name for a PEFT method.
pub fn peft_to_wire(p: PeftChoice) -> PeftMethod {
    match p {
        PeftChoice::Head => PeftMethod::Head,
        PeftChoice::Bias => PeftMethod::Bias,
        PeftChoice::Lora { rank, alpha } => PeftMethod::Lora { rank, alpha },
        PeftChoice::Adapter { bottleneck } => PeftMethod::Adapter { bottleneck },
        PeftChoice::Prompt { tokens } => PeftMethod::Prompt { tokens },
        PeftChoice::FullTail => PeftMethod::FullTail,
    }
}

/// The peft crate's method for a configured choice.
pub fn peft_method(p: PeftChoice) -> Method {
    match p {
        PeftChoice::Head => Method::Head,
        PeftChoice::Bias => Method::Bias,
        PeftChoice::Lora { rank, alpha } => Method::Lora(LoraConfig {
            rank: usize::from(rank),
            alpha: f64::from(alpha),
            ..LoraConfig::default()
        }),
        PeftChoice::Adapter { bottleneck } => Method::Adapter(AdapterConfig {
            bottleneck: usize::from(bottleneck),
        }),
        PeftChoice::Prompt { tokens } => Method::Prompt(PromptConfig {
            tokens: usize::from(tokens),
        }),
        PeftChoice::FullTail => Method::FullTail,
    }
}

fn load_dataset(cfg: &EdgeConfig) -> Result<ImageDataset, SetupError> {
    let name = cfg.data.dataset.as_str();
    let data_err = |source| SetupError::Data {
        dataset: name.to_string(),
        source,
    };
    match name {
        "fashion-mnist" => match &cfg.data.root {
            Some(root) => load_idx_pair(
                &root.join("train-images-idx3-ubyte.gz"),
                &root.join("train-labels-idx1-ubyte.gz"),
                Some(
                    FASHION_MNIST_CLASSES
                        .iter()
                        .map(|s| s.to_string())
                        .collect(),
                ),
            )
            .map_err(data_err),
            None => fashion_mnist(true).map_err(data_err),
        },
        other => Err(SetupError::UnknownDataset(other.to_string())),
    }
}

/// This client's sample indices: the fleet-wide partition's shard `index`, capped at
/// `max_examples`.
pub fn client_shard(labels: &[u32], cfg: &EdgeConfig) -> Result<Vec<usize>, SetupError> {
    let how = match cfg.data.partition {
        PartitionKind::Iid => Partitioner::Iid,
        PartitionKind::Dirichlet => Partitioner::Dirichlet {
            alpha: cfg.data.alpha,
        },
    };
    let p = partition(labels, None, cfg.data.num_clients, &how, cfg.data.seed)
        .map_err(SetupError::Partition)?;
    let mut shard = p
        .clients
        .into_iter()
        .nth(cfg.data.index)
        .map(|c| c.indices)
        .unwrap_or_default();
    if let Some(max) = cfg.data.max_examples.filter(|&m| m < shard.len()) {
        // A random subset, not the first `max` (a shard lists its examples class by class),
        // seeded per client so every run of the trial draws the same one.
        use rand::SeedableRng;
        use rand::seq::SliceRandom;
        let seed = cfg.data.seed ^ (cfg.data.index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        shard.shuffle(&mut rng);
        shard.truncate(max);
        shard.sort_unstable();
    }
    if shard.is_empty() {
        return Err(SetupError::EmptyShard {
            index: cfg.data.index,
            num_clients: cfg.data.num_clients,
        });
    }
    Ok(shard)
}

/// Prepares local training as the config says.
pub fn build_trainer(cfg: &EdgeConfig) -> Result<LocalSetup, SetupError> {
    let backbone_err = |source| SetupError::Backbone {
        dir: cfg.model_dir.clone(),
        source,
    };
    let backbone = Backbone::open(&cfg.model_dir).map_err(backbone_err)?;
    let m = &backbone.manifest;
    if m.family != fedpeft_backbone::Family::ConvHead {
        return Err(SetupError::UnsupportedFamily {
            id: m.id.clone(),
            family: format!("{:?}", m.family),
        });
    }

    let ds = load_dataset(cfg)?;
    let shard = client_shard(&ds.labels, cfg)?;
    let mut per_class = vec![0usize; ds.num_classes()];
    for &i in &shard {
        if let Some(c) = per_class.get_mut(ds.labels[i] as usize) {
            *c += 1;
        }
    }
    tracing::info!(examples = shard.len(), ?per_class, "local shard");

    let pre = ImagePreprocess::from_manifest(m, Some(cfg.image_size)).map_err(backbone_err)?;
    // A shared cache holds every sample of the data set in one entry (filled once for the whole
    // fleet, left in its file: each process keeps only its own rows in memory); otherwise the
    // entry is this client's shard.
    let whole: Vec<usize>;
    let selection: &[usize] = if cfg.cache_shared {
        whole = (0..ds.labels.len()).collect();
        &whole
    } else {
        &shard
    };
    let key = CacheKey::new(
        backbone.trunk_sha256(),
        &hash_image_selection(&ds, selection),
        &pre.fingerprint(),
    );
    let mut cache = ActivationCache::new(CacheConfig {
        memory_budget: if cfg.cache_shared {
            0
        } else {
            cfg.cache_memory_bytes
        },
        spill_dir: cfg.cache_dir.clone(),
        persist: cfg.cache_persist || cfg.cache_shared,
    });
    let runtime = match cfg.runtime {
        RuntimeChoice::Auto => Runtime::Auto,
        RuntimeChoice::Ort => Runtime::Ort,
        RuntimeChoice::Tract => Runtime::Tract,
    };
    let trunk_cfg = TrunkConfig::default()
        .with_runtime(runtime)
        .with_image_size(cfg.image_size)
        .with_threads(cfg.threads);
    // The trunk is opened only on a cache miss: a restarted client with cached activations
    // never loads it.
    let mut trunk = None;
    let start = Instant::now();
    let features = cache
        .get_or_compute(&key, selection.len(), TRUNK_BATCH, |range| {
            if trunk.is_none() {
                let t = open_trunk(&backbone, &trunk_cfg)?;
                tracing::info!(runtime = t.runtime().name(), "trunk opened");
                trunk = Some(t);
            }
            let t = trunk.as_ref().expect("opened above");
            let x = pre.batch(&ds, &selection[range])?;
            t.run(&TrunkInput::Image(x))
        })
        .map_err(SetupError::Trunk)?;
    let features = if cfg.cache_shared {
        std::sync::Arc::new(features.select(&shard).map_err(SetupError::Trunk)?)
    } else {
        features
    };
    tracing::info!(
        examples = features.len(),
        row_shape = ?features.row_shape(),
        from_cache = trunk.is_none(),
        in_memory = features.in_memory(),
        shared = cfg.cache_shared,
        ms = start.elapsed().as_millis() as u64,
        "trunk activations ready"
    );

    let tail_path = backbone.tail_path();
    let weights =
        FrozenWeights::from_safetensors(&tail_path).map_err(|source| SetupError::Tail {
            path: tail_path.clone(),
            source,
        })?;
    let method = peft_method(cfg.peft);
    let seed = cfg.data.seed ^ (cfg.data.index as u64).rotate_left(29);
    let tail = fedpeft_peft::build_tail(
        fedpeft_peft::Family::ConvHead,
        &weights,
        PeftConfig::new(method, ds.num_classes(), seed),
    )
    .map_err(|source| SetupError::Tail {
        path: tail_path,
        source,
    })?;
    let labels: Vec<usize> = shard.iter().map(|&i| ds.labels[i] as usize).collect();
    let trainer = TailTrainer::new(tail, features, labels, seed)?;

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
    let backbone_id =
        heapless::String::try_from(m.id.as_str()).map_err(|_| SetupError::Manifest {
            dir: cfg.model_dir.clone(),
            reason: format!("backbone id `{}` is longer than 64 bytes", m.id),
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
            peft: peft_to_wire(cfg.peft),
            accepted_dtypes,
            max_packet_size: cfg.max_packet_bytes as u32,
        },
        per_class,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

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

    #[test]
    fn a_capped_shard_is_a_seeded_random_subset_not_its_first_examples() {
        // 10 classes of 100 examples each; a Dirichlet shard lists its examples class by class.
        let labels: Vec<u32> = (0..1000).map(|i| i / 100).collect();
        let full = client_shard(&labels, &cfg(None)).unwrap();
        let capped = client_shard(&labels, &cfg(Some(50))).unwrap();
        assert_eq!(capped.len(), 50);
        assert!(capped.iter().all(|i| full.contains(i)));
        let classes: std::collections::BTreeSet<u32> = capped.iter().map(|&i| labels[i]).collect();
        assert!(
            classes.len() >= 5,
            "classes in the capped shard: {classes:?}"
        );
        assert_eq!(capped, client_shard(&labels, &cfg(Some(50))).unwrap());
        // A cap at or above the shard's size keeps it whole.
        assert_eq!(client_shard(&labels, &cfg(Some(5000))).unwrap(), full);
    }
}
