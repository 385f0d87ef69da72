//! The `[data]` table: which data set, how to read it, and which part of it this client trains
//! on (a shard of the fleet's partition, or all of it).

use std::path::PathBuf;

use fedpeft_backbone::data::{OwnData, TextColumns};
use fedpeft_config::data::{Column, check_classes, idx_labels, text_columns};
use fedpeft_config::edge::{DataTable, PartitionKind};
use fedpeft_config::{ConfigError, DatasetKind, invalid};

use super::Cli;

/// Where the client's examples come from.
#[derive(Debug, Clone, PartialEq)]
pub enum DataSource {
    /// A named data set (`fashion-mnist`, `spam-assassin`) from `root`, else its usual place.
    Named { root: Option<PathBuf> },
    /// The device's own files, labelled with the fleet's class list.
    Own { data: OwnData, classes: Vec<String> },
}

/// Which data set, read how, and which slice of it this client trains on.
#[derive(Debug, Clone, PartialEq)]
pub struct DataSpec {
    pub dataset: DatasetKind,
    pub source: DataSource,
    pub partition: PartitionKind,
    pub alpha: f64,
    pub num_clients: usize,
    pub index: usize,
    pub seed: u64,
    pub max_examples: Option<usize>,
}

impl DataSpec {
    /// The fleet's class list, for own data (a named set's classes are its own).
    pub fn classes(&self) -> Option<&[String]> {
        match &self.source {
            DataSource::Own { classes, .. } => Some(classes),
            DataSource::Named { .. } => None,
        }
    }
}

/// Flags over `[data]` over the defaults (all of Fashion-MNIST on one client, Dirichlet(0.5),
/// seed 42; own data: all of it), validated.
pub(super) fn resolve(table: DataTable, cli: &Cli) -> Result<DataSpec, ConfigError> {
    let name = cli
        .dataset
        .clone()
        .or(table.dataset.clone())
        .unwrap_or_else(|| DatasetKind::FashionMnist.name().to_string());
    let dataset = DatasetKind::parse(&name).ok_or_else(|| {
        invalid(
            "data.dataset",
            format!("`{name}` is not one of {}", DatasetKind::names()),
        )
    })?;
    let root = cli.data_root.clone().or(table.root.clone());
    let source = if dataset.is_own() {
        own(dataset, root, &table, cli)?
    } else {
        for (field, set) in [
            (
                "data.classes",
                table.classes.is_some() || cli.classes.is_some(),
            ),
            ("data.labels", table.labels.is_some()),
            ("data.text_column", table.text_column.is_some()),
            ("data.label_column", table.label_column.is_some()),
        ] {
            if set {
                return Err(invalid(
                    field,
                    format!("is for a device's own data; {dataset} is read as it ships"),
                ));
            }
        }
        DataSource::Named { root }
    };
    let default_partition = if dataset.is_own() {
        PartitionKind::Whole
    } else {
        PartitionKind::Dirichlet
    };
    let partition = cli
        .partition
        .or(table.partition)
        .unwrap_or(default_partition);
    if partition == PartitionKind::Natural && dataset != DatasetKind::SpamAssassin {
        return Err(invalid(
            "data.partition",
            format!(
                "natural needs a data set with a natural client key (spam-assassin: its \
                 mailing lists); `{dataset}` has none: use none, iid or dirichlet"
            ),
        ));
    }
    let alpha = cli.alpha.or(table.alpha).unwrap_or(0.5);
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(invalid(
            "data.alpha",
            format!("{alpha} must be finite and > 0"),
        ));
    }
    let num_clients = cli.num_clients.or(table.num_clients).unwrap_or(1);
    if num_clients == 0 {
        return Err(invalid("data.num_clients", "must be at least 1"));
    }
    let index = cli.client_index.or(table.index).unwrap_or(0);
    if index >= num_clients {
        return Err(invalid(
            "data.index",
            format!("{index} is out of range for num_clients = {num_clients} (0..{num_clients})"),
        ));
    }
    let max_examples = cli.max_examples.or(table.max_examples);
    if max_examples == Some(0) {
        return Err(invalid("data.max_examples", "must be at least 1 when set"));
    }
    Ok(DataSpec {
        dataset,
        source,
        partition,
        alpha,
        num_clients,
        index,
        seed: cli.seed.or(table.seed).unwrap_or(42),
        max_examples,
    })
}

/// A device's own data: its path, how to read it, and the fleet's class list (required: a
/// device never guesses it from what it happens to hold).
fn own(
    dataset: DatasetKind,
    root: Option<PathBuf>,
    table: &DataTable,
    cli: &Cli,
) -> Result<DataSource, ConfigError> {
    let what = match dataset {
        DatasetKind::ImageFolder => "the folder holding one sub-folder of images per class",
        DatasetKind::Idx => "the IDX images file",
        DatasetKind::Csv => "the CSV file",
        _ => "the JSONL file",
    };
    let root = root.ok_or_else(|| {
        invalid(
            "data.root",
            format!("is required with dataset = {dataset}: {what} (or --data-root)"),
        )
    })?;
    let classes = cli
        .classes
        .clone()
        .or(table.classes.clone())
        .ok_or_else(|| {
            invalid(
                "data.classes",
                format!(
                    "is required with dataset = {dataset}: the fleet's class list, in label-id \
                     order, as the aggregator's model.classes (or --classes a,b,c), so every \
                     device numbers its labels the same way"
                ),
            )
        })?;
    check_classes(&classes).map_err(|m| invalid("data.classes", m))?;
    if dataset != DatasetKind::Idx && table.labels.is_some() {
        return Err(invalid("data.labels", "is for dataset = idx"));
    }
    let columns = columns(
        dataset,
        table.text_column.as_deref(),
        table.label_column.as_deref(),
    )?;
    let data = match dataset {
        DatasetKind::ImageFolder => OwnData::ImageFolder { root },
        DatasetKind::Idx => {
            let labels = idx_labels(&root, table.labels.clone())
                .map_err(|why| invalid("data.labels", why))?;
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
    Ok(DataSource::Own { data, classes })
}

/// The text and label columns of CSV / JSONL data (set only for those).
fn columns(
    dataset: DatasetKind,
    text: Option<&str>,
    label: Option<&str>,
) -> Result<TextColumns, ConfigError> {
    let (text, label) = text_columns(dataset, text, label).map_err(|(column, why)| {
        let field = match column {
            Column::Text => "data.text_column",
            Column::Label => "data.label_column",
        };
        invalid(field, why)
    })?;
    Ok(TextColumns { text, label })
}
