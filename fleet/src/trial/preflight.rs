//! Checks of a trial against this machine, after parsing and before anything starts: the
//! backbone is built and fits the data set and method; kernel links can be made here.

use serde::Deserialize;

use super::{Trial, TrialError};
use crate::links::Mechanism;

impl Trial {
    /// Checks what parsing cannot: that the model exists, and that kernel links can be made
    /// here. Resolves `auto` to the mechanism that will run. Nothing has started yet.
    pub fn preflight(&mut self) -> Result<(), TrialError> {
        let bad = |field: &str, reason: String| TrialError::Invalid {
            path: self.path.clone(),
            field: field.into(),
            reason,
        };
        let manifest = self.model.backbone.join("manifest.json");
        if !manifest.is_file() {
            return Err(bad(
                "model.backbone",
                format!(
                    "{} has no manifest.json: build the backbones first (`make models`)",
                    self.model.backbone.display()
                ),
            ));
        }
        let family = std::fs::read_to_string(&manifest)
            .ok()
            .and_then(|t| serde_json::from_str::<ManifestFamily>(&t).ok())
            .and_then(|m| m.family);
        let (wanted, blocks) = match family.as_deref() {
            Some("conv_head") => ("fashion-mnist", false),
            Some("transformer") => ("spam-assassin", true),
            Some("vit") => ("fashion-mnist", true),
            _ => {
                return Err(bad(
                    "model.backbone",
                    format!(
                        "{} names no known family (conv_head, transformer or vit)",
                        manifest.display()
                    ),
                ));
            }
        };
        if self.data.dataset != wanted {
            return Err(bad(
                "data.dataset",
                format!(
                    "{:?} cannot feed {} (a {} backbone): use {wanted:?}",
                    self.data.dataset,
                    self.model.backbone.display(),
                    family.unwrap_or_default()
                ),
            ));
        }
        if !blocks && matches!(self.model.peft.as_str(), "adapter" | "prompt") {
            return Err(bad(
                "model.peft",
                format!(
                    "{:?} needs transformer blocks; {} is a conv head: use head, bias, lora or \
                     full-tail",
                    self.model.peft,
                    self.model.backbone.display()
                ),
            ));
        }
        if let Some(plan) = &mut self.links {
            let why = crate::netns::unavailable();
            match (plan.mechanism, why) {
                (Mechanism::Kernel, Some(why)) => {
                    return Err(bad(
                        "links.mechanism",
                        format!(
                            "= kernel: {why}; use mechanism = \"userspace\" (or --links userspace) \
                     for the in-process shaper"
                        ),
                    ));
                }
                (Mechanism::Auto, None) => plan.mechanism = Mechanism::Kernel,
                (Mechanism::Auto, Some(_)) => plan.mechanism = Mechanism::Userspace,
                _ => {}
            }
        }
        Ok(())
    }
}

/// The one field of a backbone's `manifest.json` the runner reads: which kind of trunk it is.
#[derive(Deserialize)]
struct ManifestFamily {
    family: Option<String>,
}
