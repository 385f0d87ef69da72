//! The `[data]` table: which data set, and which shard of the fleet's partition of it.

use std::path::PathBuf;

use fedpeft_config::edge::{DataTable, PartitionKind};
use fedpeft_config::{ConfigError, invalid};

use super::Cli;

/// The data sets the edge client can load.
pub const DATASETS: [&str; 2] = ["fashion-mnist", "spam-assassin"];

/// Which slice of which data set this client trains on.
#[derive(Debug, Clone, PartialEq)]
pub struct DataSpec {
    pub dataset: String,
    pub root: Option<PathBuf>,
    pub partition: PartitionKind,
    pub alpha: f64,
    pub num_clients: usize,
    pub index: usize,
    pub seed: u64,
    pub max_examples: Option<usize>,
}

/// Flags over `[data]` over the defaults (all of Fashion-MNIST on one client, Dirichlet(0.5),
/// seed 42), validated.
pub(super) fn resolve(table: DataTable, cli: &Cli) -> Result<DataSpec, ConfigError> {
    let dataset = cli
        .dataset
        .clone()
        .or(table.dataset)
        .unwrap_or_else(|| "fashion-mnist".to_string());
    if !DATASETS.contains(&dataset.as_str()) {
        return Err(invalid(
            "data.dataset",
            format!("`{dataset}` is not one of {}", DATASETS.join(", ")),
        ));
    }
    let partition = cli
        .partition
        .or(table.partition)
        .unwrap_or(PartitionKind::Dirichlet);
    if partition == PartitionKind::Natural && dataset != "spam-assassin" {
        return Err(invalid(
            "data.partition",
            format!(
                "natural needs a data set with a natural client key (spam-assassin: its \
                 mailing lists); `{dataset}` has none: use iid or dirichlet"
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
        root: cli.data_root.clone().or(table.root),
        partition,
        alpha,
        num_clients,
        index,
        seed: cli.seed.or(table.seed).unwrap_or(42),
        max_examples,
    })
}
