//! PEFT method and tail-family configuration.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

use crate::error::PeftError;

/// A projection LoRA can adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoraTarget {
    /// The conv head's 1×1 conv (`conv_head` family).
    ConvHead,
    /// Attention query (`transformer` family).
    Q,
    /// Attention key.
    K,
    /// Attention value.
    V,
    /// Attention output projection.
    O,
    /// FFN up-projection (`intermediate.dense`).
    Up,
    /// FFN down-projection (`output.dense`).
    Down,
}

impl LoraTarget {
    /// Every linear layer of a transformer block (`q, k, v, o, up, down`), as PEFT's
    /// `target_modules="all-linear"` (which also leaves out the classifier, here always trained
    /// in full).
    pub const ALL_LINEAR: [LoraTarget; 6] =
        [Self::Q, Self::K, Self::V, Self::O, Self::Up, Self::Down];

    /// Parses a comma-separated list of targets (`"q, v"`); `all-linear` stands for
    /// [`Self::ALL_LINEAR`].
    pub fn parse_list(s: &str) -> Result<Vec<Self>, PeftError> {
        let mut out = Vec::new();
        for t in s.split(',').map(str::trim) {
            if t == "all-linear" {
                out.extend(Self::ALL_LINEAR);
            } else {
                out.push(t.parse()?);
            }
        }
        Ok(out)
    }

    /// The name used in configs and tensor names.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConvHead => "conv_head",
            Self::Q => "q",
            Self::K => "k",
            Self::V => "v",
            Self::O => "o",
            Self::Up => "up",
            Self::Down => "down",
        }
    }
}

impl FromStr for LoraTarget {
    type Err = PeftError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "conv_head" => Self::ConvHead,
            "q" => Self::Q,
            "k" => Self::K,
            "v" => Self::V,
            "o" => Self::O,
            "up" => Self::Up,
            "down" => Self::Down,
            other => {
                return Err(PeftError::Config {
                    field: "lora.targets".into(),
                    why: format!(
                        "unknown target `{other}` (expected conv_head, q, k, v, o, up, down \
                         or all-linear in a list)"
                    ),
                });
            }
        })
    }
}

/// LoRA hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` (≥ 1).
    pub rank: usize,
    /// `alpha`; the LoRA branch is scaled by `alpha / r`.
    pub alpha: f64,
    /// Dropout on the LoRA branch input during training, in `[0, 1)`.
    pub dropout: f64,
    /// Adapted projections; empty means the family default (`conv_head`; `q, v` as PEFT does
    /// for BERT and ViT). [`LoraTarget::ALL_LINEAR`] adapts every linear layer of the blocks.
    pub targets: Vec<LoraTarget>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: Vec::new(),
        }
    }
}

/// Houlsby adapter hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// Bottleneck width `m` (down-projection `D → m`, GELU, up-projection `m → D`).
    pub bottleneck: usize,
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self { bottleneck: 64 }
    }
}

/// Prompt-tuning hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptConfig {
    /// Number of learned tokens prepended at the tail input.
    pub tokens: usize,
}

impl Default for PromptConfig {
    fn default() -> Self {
        Self { tokens: 8 }
    }
}

/// Which parameters are trained. Every method also trains the task head.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    /// Only the classifier head.
    Head,
    /// BitFit: every bias of the tail (linear biases, LayerNorm biases — a vit's `final_ln`
    /// included —, BatchNorm shift) + head.
    Bias,
    /// LoRA on chosen projections + head.
    Lora(LoraConfig),
    /// Houlsby adapters after attention and after the MLP of every tail block + head: on the
    /// sublayer's output, before the residual sum (and, in a vit block, before the layer scale).
    Adapter(AdapterConfig),
    /// Learned prompt tokens joining the sequence at the tail's first block + head (transformer:
    /// in front of every token; vit: right after the CLS token, as VPT).
    Prompt(PromptConfig),
    /// Every tail weight (a vit's layer scales included) + head (the accuracy baseline).
    FullTail,
}

impl Method {
    /// The method's name as used in configs: `head`, `bias`, `lora`, `adapter`, `prompt`,
    /// `full-tail`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Head => "head",
            Self::Bias => "bias",
            Self::Lora(_) => "lora",
            Self::Adapter(_) => "adapter",
            Self::Prompt(_) => "prompt",
            Self::FullTail => "full-tail",
        }
    }

    /// The method with default hyper-parameters, by name.
    pub fn from_name(name: &str) -> Result<Self, PeftError> {
        Ok(match name {
            "head" => Self::Head,
            "bias" => Self::Bias,
            "lora" => Self::Lora(LoraConfig::default()),
            "adapter" => Self::Adapter(AdapterConfig::default()),
            "prompt" => Self::Prompt(PromptConfig::default()),
            "full-tail" => Self::FullTail,
            other => {
                return Err(PeftError::Config {
                    field: "method".into(),
                    why: format!(
                        "unknown PEFT method `{other}` (expected head, bias, lora, adapter, prompt, full-tail)"
                    ),
                });
            }
        })
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the classifier head is created.
#[derive(Debug, Clone, PartialEq)]
pub enum HeadInit {
    /// A fresh `head.weight [num_classes, D]`, `head.bias`, initialised as PyTorch's
    /// `nn.Linear` (uniform ±1/√D) from the config seed.
    Fresh {
        /// Number of task classes.
        num_classes: usize,
    },
    /// Reuse the backbone's pretrained `classifier.weight` / `classifier.bias` (parity checks).
    Pretrained,
}

/// Everything that decides a tail's trainable parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftConfig {
    /// The PEFT method.
    pub method: Method,
    /// The task head.
    pub head: HeadInit,
    /// Seed for every random initialisation and for dropout.
    pub seed: u64,
}

impl PeftConfig {
    /// A config with a fresh head of `num_classes` classes.
    pub fn new(method: Method, num_classes: usize, seed: u64) -> Self {
        Self {
            method,
            head: HeadInit::Fresh { num_classes },
            seed,
        }
    }
}

/// The tail family and the hyper-parameters not visible in weight shapes.
#[derive(Debug, Clone, PartialEq)]
pub enum Family {
    /// EfficientNet-Lite0-style conv head: 1×1 conv, folded BN, ReLU6, GAP, classifier.
    ConvHead,
    /// `k` post-LN BERT encoder blocks + masked mean pooling + classifier.
    Transformer(TransformerSpec),
    /// `k` pre-LN ViT blocks with layer scale (DINOv2) + final LayerNorm + CLS-token
    /// classifier.
    Vit(VitSpec),
}

impl Family {
    /// `conv_head`, `transformer` or `vit`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::ConvHead => "conv_head",
            Self::Transformer(_) => "transformer",
            Self::Vit(_) => "vit",
        }
    }
}

/// Transformer hyper-parameters that the weight shapes don't carry.
#[derive(Debug, Clone, PartialEq)]
pub struct TransformerSpec {
    /// Attention heads (12 for MiniLM-L6).
    pub heads: usize,
    /// LayerNorm epsilon (1e-12 for BERT).
    pub ln_eps: f64,
}

impl Default for TransformerSpec {
    fn default() -> Self {
        Self {
            heads: 12,
            ln_eps: 1e-12,
        }
    }
}

/// The GELU form a tail's MLP uses (manifest `tail.hyper.gelu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Gelu {
    /// `0.5·x·(1 + erf(x/√2))`, PyTorch's `nn.GELU()` (BERT, DINOv2). The only form
    /// implemented: a manifest naming another (`tanh`) is refused rather than computed wrong.
    Erf,
}

/// What the classifier reads (manifest `tail.hyper.pool`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pool {
    /// The CLS token (position 0 of the trunk's tokens), as DINOv2's linear classifier.
    Cls,
    /// The mean over the real tokens (sentence-transformers); learned prompt tokens are left
    /// out. The `transformer` family always pools so.
    MaskedMean,
}

/// ViT (DINOv2) tail hyper-parameters that the weight shapes don't carry. Deserialises from
/// a backbone manifest's `tail.hyper` object (keys `heads`, `layer_norm_eps`, `gelu`, `k`,
/// `pool`, all required; other keys such as `hidden` or `intermediate` are ignored, since the
/// weight shapes give them), e.g. with `serde_json::from_value(serde_json::json!(hyper))`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VitSpec {
    /// Attention heads (6 for ViT-S/14).
    pub heads: usize,
    /// LayerNorm epsilon of every LayerNorm of the tail, the final one included (1e-6 for
    /// DINOv2).
    #[serde(rename = "layer_norm_eps")]
    pub ln_eps: f64,
    /// The MLP's GELU.
    pub gelu: Gelu,
    /// Blocks in the tail; `tail.safetensors` must hold exactly `blocks.0` to `blocks.{k-1}`.
    pub k: usize,
    /// What the classifier reads.
    pub pool: Pool,
}

impl Default for VitSpec {
    /// DINOv2 ViT-S/14 split after block 10 of 12.
    fn default() -> Self {
        Self {
            heads: 6,
            ln_eps: 1e-6,
            gelu: Gelu::Erf,
            k: 2,
            pool: Pool::Cls,
        }
    }
}
