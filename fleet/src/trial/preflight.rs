//! Checks of a trial against this machine, after parsing and before anything starts: the
//! backbone is built and fits the data set and method; the user's own data is where the trial
//! says (and an image folder's class list is read from the held-out folder); kernel links can be
//! made here.

use std::path::Path;

use fedpeft_config::DatasetKind;
use fedpeft_config::data::check_classes;
use serde::Deserialize;

use super::{Trial, TrialError};
use crate::links::Mechanism;

impl Trial {
    /// Checks what parsing cannot: that the model exists and fits the data set, that the user's
    /// own data is there, and that kernel links can be made here. Resolves `auto` to the mechanism that will run. Nothing has started yet.
    pub fn preflight(&mut self) -> Result<(), TrialError> {
        let path = self.path.clone();
        let bad = |field: &str, reason: String| TrialError::Invalid {
            path: path.clone(),
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
        // (reads texts, has transformer blocks for adapters and prompts)
        let (text, blocks) = match family.as_deref() {
            Some("conv_head") => (false, false),
            Some("transformer") => (true, true),
            Some("vit") => (false, true),
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
        let kind = DatasetKind::parse(&self.data.dataset).ok_or_else(|| {
            bad(
                "data.dataset",
                format!("{:?} is not {}", self.data.dataset, DatasetKind::names()),
            )
        })?;
        if kind.is_text() != text {
            let reads: Vec<&str> = DatasetKind::ALL
                .into_iter()
                .filter(|k| k.is_text() == text)
                .map(DatasetKind::name)
                .collect();
            return Err(bad(
                "data.dataset",
                format!(
                    "{:?} cannot feed {} (a {} backbone): use {}",
                    self.data.dataset,
                    self.model.backbone.display(),
                    family.unwrap_or_default(),
                    reads.join(", ")
                ),
            ));
        }
        if kind.is_own() {
            self.own_data_preflight(kind)?;
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

impl Trial {
    /// The user's own data: every client's root and the held-out data are there, and an image
    /// folder's class list, when the trial gives none, is the held-out folder's sub-folders
    /// (sorted, hidden ones skipped: as the aggregator would read them), handed to everyone.
    fn own_data_preflight(&mut self, kind: DatasetKind) -> Result<(), TrialError> {
        let bad = |field: &str, reason: String| TrialError::Invalid {
            path: self.path.clone(),
            field: field.into(),
            reason,
        };
        let field = if self.data.client_roots.is_some() {
            "data.client_roots"
        } else {
            "data.root"
        };
        let mut seen = std::collections::BTreeSet::new();
        for index in 0..self.clients {
            let Some(root) = self.client_root(index) else {
                return Err(bad(field, format!("names no data for client {index}")));
            };
            if seen.insert(root.clone()) && !root.exists() {
                return Err(bad(
                    field,
                    format!("{} (client {index}'s data) does not exist", root.display()),
                ));
            }
        }
        let Some(eval) = self.eval_root() else {
            return Err(bad("data.eval_root", "is required with own data".into()));
        };
        if !eval.exists() {
            return Err(bad(
                "data.eval_root",
                format!("{} does not exist", eval.display()),
            ));
        }
        if kind == DatasetKind::ImageFolder && self.data.classes.is_none() {
            let classes = folder_classes(&eval)
                .map_err(|why| bad("data.classes", format!("from {}: {why}", eval.display())))?;
            check_classes(&classes).map_err(|why| {
                bad(
                    "data.classes",
                    format!("the sub-folders of {}: {why}", eval.display()),
                )
            })?;
            self.data.classes = Some(classes);
        }
        Ok(())
    }
}

/// The sub-folder names of an image folder, sorted, without hidden ones: the class list its
/// images imply (`fedpeft_backbone::data::image_folder_classes` reads it the same way).
fn folder_classes(root: &Path) -> Result<Vec<String>, String> {
    let rd = std::fs::read_dir(root).map_err(|e| e.to_string())?;
    let mut classes = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| e.to_string())?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && entry.path().is_dir() {
            classes.push(name);
        }
    }
    classes.sort();
    Ok(classes)
}

/// The one field of a backbone's `manifest.json` the runner reads: which kind of trunk it is.
#[derive(Deserialize)]
struct ManifestFamily {
    family: Option<String>,
}
