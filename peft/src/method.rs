//! PEFT method and tail-family configuration.

use std::fmt;
use std::str::FromStr;

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
                        "unknown target `{other}` (expected conv_head, q, k, v, o, up, down)"
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
    /// for BERT).
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
    /// BitFit: every bias of the tail (linear biases, LayerNorm biases, BatchNorm shift) + head.
    Bias,
    /// LoRA on chosen projections + head.
    Lora(LoraConfig),
    /// Houlsby adapters after attention and after the MLP of every tail block + head.
    Adapter(AdapterConfig),
    /// Learned prompt tokens prepended at the tail input + head (transformer only).
    Prompt(PromptConfig),
    /// Every tail weight + head (the accuracy baseline).
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
}

impl Family {
    /// `conv_head` or `transformer`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::ConvHead => "conv_head",
            Self::Transformer(_) => "transformer",
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
