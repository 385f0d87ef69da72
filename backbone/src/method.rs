//! Where the wire meets the tail, one mapping each for the edge client and the aggregator:
//! the wire's name for a PEFT method ([`PeftMethod`], what a client announces in its Join and
//! what the aggregator is configured with) as the tail's [`Method`] to build, so both sides
//! build the same tail from the same name; and a decoded wire tensor (f32, f16, int8 or top-k)
//! as the tail's dense [`NamedTensor`].

use fedpeft_peft::{AdapterConfig, LoraConfig, Method, NamedTensor, PromptConfig};
use fedpeft_protocol::PeftMethod;

/// A wire tensor as a dense f32 tensor (sparse and quantised values expanded).
pub fn dense(t: &fedpeft_protocol::Tensor) -> NamedTensor {
    NamedTensor {
        name: t.name().to_string(),
        shape: t.shape().iter().map(|&d| d as usize).collect(),
        values: t.to_f32(),
    }
}

/// The peft crate's method (with its hyper-parameters) for the protocol's method.
pub fn peft_method(p: PeftMethod) -> Method {
    match p {
        PeftMethod::Head => Method::Head,
        PeftMethod::Bias => Method::Bias,
        PeftMethod::Lora { rank, alpha } => Method::Lora(LoraConfig {
            rank: usize::from(rank),
            alpha: f64::from(alpha),
            ..LoraConfig::default()
        }),
        PeftMethod::Adapter { bottleneck } => Method::Adapter(AdapterConfig {
            bottleneck: usize::from(bottleneck),
        }),
        PeftMethod::Prompt { tokens } => Method::Prompt(PromptConfig {
            tokens: usize::from(tokens),
        }),
        PeftMethod::FullTail => Method::FullTail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyper_parameters_carry_over_and_lora_keeps_its_other_defaults() {
        let cases = [
            (PeftMethod::Head, Method::Head),
            (PeftMethod::Bias, Method::Bias),
            (
                PeftMethod::Lora {
                    rank: 4,
                    alpha: 8.0,
                },
                Method::Lora(LoraConfig {
                    rank: 4,
                    alpha: 8.0,
                    ..LoraConfig::default()
                }),
            ),
            (
                PeftMethod::Adapter { bottleneck: 16 },
                Method::Adapter(AdapterConfig { bottleneck: 16 }),
            ),
            (
                PeftMethod::Prompt { tokens: 4 },
                Method::Prompt(PromptConfig { tokens: 4 }),
            ),
            (PeftMethod::FullTail, Method::FullTail),
        ];
        for (wire, method) in cases {
            assert_eq!(peft_method(wire), method, "{wire:?}");
        }
    }
}
