//! The held-out data the aggregator evaluates every global adapter on (`[model] dataset`,
//! `eval_root` and how to read it): a named set, or the user's own files with the fleet's class
//! list. Read from the config file here; loaded by [`crate::model::BackboneHost`].

use std::path::PathBuf;

use fedpeft_backbone::data::{OwnData, TextColumns};
use fedpeft_config::aggregator::ModelTable;
use fedpeft_config::data::{Column, check_classes, idx_labels, text_columns};
use fedpeft_config::{ConfigError, DatasetKind, invalid};

/// The held-out set every global adapter is evaluated on (`[model] dataset` and `eval_root`).
#[derive(Debug, Clone, PartialEq)]
pub enum HeldOutData {
    /// Fashion-MNIST's test split (`t10k-*-ubyte.gz`) from `root`; `None`:
    /// `$FEDPEFT_FASHION_MNIST`, else Debian's `/usr/share/datasets/fashion-mnist`.
    FashionMnist { root: Option<PathBuf> },
    /// SpamAssassin's seeded held-out 20 % of the corpus at `root`; `None`:
    /// `$FEDPEFT_SPAM_ASSASSIN`, else the workspace's `data/cache/spam-assassin`.
    SpamAssassin { root: Option<PathBuf> },
    /// The user's own held-out files, labelled with the fleet's class list; `classes: None`: an
    /// image folder's sub-folder names, sorted.
    Own {
        data: OwnData,
        classes: Option<Vec<String>>,
    },
}

impl HeldOutData {
    /// The data set's name in the config files.
    pub fn name(&self) -> &'static str {
        match self {
            HeldOutData::FashionMnist { .. } => "fashion-mnist",
            HeldOutData::SpamAssassin { .. } => "spam-assassin",
            HeldOutData::Own { data, .. } => data.name(),
        }
    }

    /// Texts (for a transformer backbone), not images.
    pub fn is_text(&self) -> bool {
        match self {
            HeldOutData::FashionMnist { .. } => false,
            HeldOutData::SpamAssassin { .. } => true,
            HeldOutData::Own { data, .. } => data.is_text(),
        }
    }

    /// The held-out set: `dataset`, where it is (`eval_root`), how to read it, and for the user's
    /// own data the fleet's class list. Keys that do not apply to the data set are refused.
    pub fn from_table(m: &ModelTable) -> Result<HeldOutData, ConfigError> {
        let name = m.dataset.as_deref().unwrap_or("fashion-mnist");
        let kind = DatasetKind::parse(name).ok_or_else(|| {
            invalid(
                "model.dataset",
                format!("`{name}` is not one of {}", DatasetKind::names()),
            )
        })?;
        let root = m.eval_root.clone();
        if kind != DatasetKind::Idx && m.eval_labels.is_some() {
            return Err(invalid("model.eval_labels", "is for dataset = idx"));
        }
        let (text, label) = text_columns(kind, m.text_column.as_deref(), m.label_column.as_deref())
            .map_err(|(column, why)| match column {
                Column::Text => invalid("model.text_column", why),
                Column::Label => invalid("model.label_column", why),
            })?;
        if !kind.is_own() {
            if m.classes.is_some() {
                return Err(invalid(
                    "model.classes",
                    format!("is for the user's own data; {kind}'s classes are fixed"),
                ));
            }
            return Ok(match kind {
                DatasetKind::FashionMnist => HeldOutData::FashionMnist { root },
                _ => HeldOutData::SpamAssassin { root },
            });
        }
        let root = root.ok_or_else(|| {
            invalid(
                "model.eval_root",
                format!(
                    "is required with dataset = {kind}: the held-out data the aggregator evaluates \
                     every global adapter on"
                ),
            )
        })?;
        if let Some(list) = &m.classes {
            check_classes(list).map_err(|why| invalid("model.classes", why))?;
        } else if kind != DatasetKind::ImageFolder {
            return Err(invalid(
                "model.classes",
                format!(
                    "is required with dataset = {kind}: the fleet's class list, in label-id order \
                     (an image folder's defaults to its sub-folder names)"
                ),
            ));
        }
        let columns = TextColumns { text, label };
        let data = match kind {
            DatasetKind::ImageFolder => OwnData::ImageFolder { root },
            DatasetKind::Idx => {
                let labels = idx_labels(&root, m.eval_labels.clone())
                    .map_err(|why| invalid("model.eval_labels", why))?;
                OwnData::Idx {
                    images: root,
                    labels,
                }
            }
            DatasetKind::Csv => OwnData::Csv {
                path: root,
                columns,
            },
            _ => OwnData::Jsonl {
                path: root,
                columns,
            },
        };
        Ok(HeldOutData::Own {
            data,
            classes: m.classes.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use fedpeft_config::aggregator::AggregatorFile;

    use super::*;

    /// The held-out data of a `[model]` table with these lines.
    fn held_out(lines: &str) -> Result<HeldOutData, ConfigError> {
        let file = AggregatorFile::parse(&format!("[model]\n{lines}\n"), Path::new("agg.toml"))?;
        HeldOutData::from_table(&file.model)
    }

    #[test]
    fn the_held_out_set_comes_from_the_configured_data_and_keys_that_do_not_apply_are_refused() {
        assert_eq!(
            held_out("").unwrap(),
            HeldOutData::FashionMnist { root: None }
        );
        assert_eq!(
            held_out("dataset = \"spam-assassin\"").unwrap(),
            HeldOutData::SpamAssassin { root: None }
        );
        assert_eq!(
            held_out("eval_root = \"/data/fmnist\"").unwrap(),
            HeldOutData::FashionMnist {
                root: Some(PathBuf::from("/data/fmnist"))
            }
        );
        assert_eq!(
            held_out("dataset = \"image-folder\"\neval_root = \"held-out\"").unwrap(),
            HeldOutData::Own {
                data: OwnData::ImageFolder {
                    root: PathBuf::from("held-out")
                },
                classes: None,
            }
        );
        let csv = held_out(
            "dataset = \"csv\"\neval_root = \"t.csv\"\nlabel_column = \"y\"\n\
             classes = [\"ham\", \"spam\"]",
        )
        .unwrap();
        let HeldOutData::Own {
            data: OwnData::Csv { columns, .. },
            classes,
        } = csv
        else {
            panic!("{csv:?}")
        };
        assert_eq!(
            (columns.text.as_str(), columns.label.as_str()),
            ("text", "y")
        );
        assert_eq!(classes, Some(vec!["ham".to_string(), "spam".to_string()]));
        let idx = held_out(
            "dataset = \"idx\"\neval_root = \"d/t10k-images-idx3-ubyte.gz\"\n\
             classes = [\"a\", \"b\"]",
        )
        .unwrap();
        let HeldOutData::Own {
            data: OwnData::Idx { labels, .. },
            ..
        } = idx
        else {
            panic!("{idx:?}")
        };
        assert_eq!(labels, PathBuf::from("d/t10k-labels-idx1-ubyte.gz"));
        for (lines, field, words) in [
            ("dataset = \"image-folder\"", "model.eval_root", "required"),
            (
                "dataset = \"jsonl\"\neval_root = \"t.jsonl\"",
                "model.classes",
                "required",
            ),
            (
                "dataset = \"image-folder\"\neval_root = \"p\"\nclasses = [\"a\"]",
                "model.classes",
                "at least 2",
            ),
            ("classes = [\"a\", \"b\"]", "model.classes", "fixed"),
            (
                "dataset = \"idx\"\neval_root = \"x.idx\"\nclasses = [\"a\", \"b\"]",
                "model.eval_labels",
                "images-idx3",
            ),
            ("eval_labels = \"l\"", "model.eval_labels", "idx"),
            (
                "text_column = \"body\"",
                "model.text_column",
                "csv or jsonl",
            ),
            ("dataset = \"folder\"", "model.dataset", "image-folder"),
        ] {
            let err = held_out(lines).unwrap_err().to_string();
            assert!(
                err.contains(&format!("`{field}`")) && err.contains(words),
                "{lines}: {err}"
            );
        }
    }
}
