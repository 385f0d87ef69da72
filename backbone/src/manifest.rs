//! Backbone manifests (`models/<id>/manifest.json`, copied next to the built files) and the
//! [`Backbone`] handle that resolves and checks the files they list.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{BackboneError, Result};

/// Which Rust tail family continues the trunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// EfficientNet-style 1x1 conv + folded BatchNorm + ReLU6 + pool + classifier.
    ConvHead,
    /// BERT post-LN encoder blocks + masked mean pooling + classifier.
    Transformer,
    /// ViT pre-LN blocks with layer scale + final LayerNorm + CLS classifier (DINOv2).
    Vit,
}

/// One input or output tensor of the trunk graph; dims are numbers or symbolic names.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    #[serde(default)]
    pub dtype: Option<String>,
    pub shape: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrunkSpec {
    pub file: String,
    pub inputs: Vec<TensorSpec>,
    pub output: TensorSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitSpec {
    /// Human-readable place of the cut.
    pub after: String,
    /// Name of the split tensor (the trunk's output).
    pub tensor: String,
    /// Channels (vision) or hidden size (text) at the split.
    pub channels: usize,
    /// Spatial down-sampling of the trunk (vision only).
    #[serde(default)]
    pub stride: Option<usize>,
}

/// How raw samples become trunk inputs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum InputSpec {
    Image {
        channels: usize,
        sizes: Vec<usize>,
        default_size: usize,
        resize: String,
        scale: f32,
        mean: [f32; 3],
        std: [f32; 3],
        grey_to_rgb: String,
    },
    Text {
        tokenizer: String,
        vocab: String,
        lowercase: bool,
        strip_accents: bool,
        max_len: usize,
        max_position: usize,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TailSpec {
    pub file: String,
    /// Family hyper-parameters (hidden size, heads, eps, ...), read by the tail builder.
    pub hyper: BTreeMap<String, serde_json::Value>,
}

/// Parameter counts, as PyTorch counts them (`numel` of parameters, no buffers).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamCounts {
    /// The whole pretrained backbone (what full-model FedAvg would send).
    pub backbone: u64,
    pub trunk: u64,
    /// Frozen tail including the pretrained classifier.
    pub tail: u64,
    /// The pretrained classifier alone (0 when the backbone has none).
    pub classifier: u64,
}

/// A backbone's manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub id: String,
    pub family: Family,
    pub licence: String,
    pub source: BTreeMap<String, String>,
    pub trunk: TrunkSpec,
    pub split: SplitSpec,
    pub input: InputSpec,
    pub tail: TailSpec,
    pub params: ParamCounts,
    /// sha256 (hex) of every built file, by file name.
    pub files: BTreeMap<String, String>,
}

impl Manifest {
    /// Reads and validates a manifest file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| BackboneError::io(path, e))?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| BackboneError::Manifest {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        for f in [&m.trunk.file, &m.tail.file] {
            if !m.files.contains_key(f) {
                return Err(BackboneError::Manifest {
                    path: path.to_path_buf(),
                    reason: format!("`{f}` has no sha256 under `files`"),
                });
            }
        }
        // The tail's hyper-parameters are checked here, so a bad manifest fails when it is read.
        m.tail_family().map_err(|reason| BackboneError::Manifest {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(m)
    }

    /// The peft crate's tail family with the hyper-parameters `tail.hyper` gives: one reading
    /// of the manifest for the edge client, the aggregator and the tools.
    pub fn tail_family(&self) -> std::result::Result<fedpeft_peft::Family, String> {
        let hyper = serde_json::Value::Object(
            self.tail
                .hyper
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        );
        let number = |name: &str| {
            self.tail
                .hyper
                .get(name)
                .and_then(serde_json::Value::as_f64)
                .ok_or_else(|| format!("tail.hyper.{name} is missing or not a number"))
        };
        Ok(match self.family {
            Family::ConvHead => fedpeft_peft::Family::ConvHead,
            Family::Transformer => {
                fedpeft_peft::Family::Transformer(fedpeft_peft::TransformerSpec {
                    heads: number("heads")? as usize,
                    ln_eps: number("layer_norm_eps")?,
                })
            }
            Family::Vit => fedpeft_peft::Family::Vit(
                serde_json::from_value(hyper).map_err(|e| format!("tail.hyper: {e}"))?,
            ),
        })
    }

    /// Whether the trunk reads token ids (a text backbone) rather than pixels.
    pub fn is_text(&self) -> bool {
        matches!(self.input, InputSpec::Text { .. })
    }
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| BackboneError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| BackboneError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The built models directory: `$FEDPEFT_MODELS` if set, else the workspace's `models/build`.
pub fn default_models_dir() -> PathBuf {
    std::env::var_os("FEDPEFT_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/build"))
}

/// A built backbone: its manifest and the directory holding its files.
#[derive(Debug, Clone)]
pub struct Backbone {
    pub manifest: Manifest,
    pub dir: PathBuf,
}

impl Backbone {
    /// Opens `dir/manifest.json` and checks that every listed file exists (cheap; see
    /// [`Backbone::verify`] for the checksums).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        let manifest = Manifest::load(&dir.join("manifest.json"))?;
        for name in manifest.files.keys() {
            let p = dir.join(name);
            if !p.is_file() {
                return Err(BackboneError::Manifest {
                    path: dir.join("manifest.json"),
                    reason: format!("listed file {} is missing (run `make models`)", p.display()),
                });
            }
        }
        Ok(Self { manifest, dir })
    }

    /// Opens a backbone by id under [`default_models_dir`].
    pub fn by_id(id: &str) -> Result<Self> {
        Self::open(default_models_dir().join(id))
    }

    /// Recomputes the sha256 of every listed file and compares with the manifest.
    pub fn verify(&self) -> Result<()> {
        for (name, expected) in &self.manifest.files {
            let path = self.dir.join(name);
            let actual = sha256_file(&path)?;
            if &actual != expected {
                return Err(BackboneError::Checksum {
                    path,
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        Ok(())
    }

    pub fn trunk_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.trunk.file)
    }

    pub fn tail_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.tail.file)
    }

    /// sha256 of the trunk file as recorded in the manifest: the model part of cache keys.
    pub fn trunk_sha256(&self) -> &str {
        &self.manifest.files[&self.manifest.trunk.file]
    }

    /// The vocabulary file of a text backbone.
    pub fn vocab_path(&self) -> Option<PathBuf> {
        match &self.manifest.input {
            InputSpec::Text { vocab, .. } => Some(self.dir.join(vocab)),
            InputSpec::Image { .. } => None,
        }
    }
}
