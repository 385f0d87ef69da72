//! The `[cache]` table: where trunk activations are kept, and how much of them in memory.

use std::path::PathBuf;

use fedpeft_config::edge::CacheTable;

use super::Cli;

/// The cache settings (nothing to refuse: every value is usable).
pub(super) struct Cache {
    pub dir: PathBuf,
    pub memory_bytes: usize,
    pub persist: bool,
    pub shared: bool,
    pub frozen_budget_bytes: usize,
}

/// Flags over `[cache]` over the defaults (`data/cache`, 256 MiB, persisted, per shard,
/// 128 MiB of frozen prefix).
pub(super) fn resolve(table: CacheTable, cli: &Cli) -> Cache {
    Cache {
        dir: cli
            .cache_dir
            .clone()
            .or(table.dir)
            .unwrap_or_else(|| PathBuf::from("data/cache")),
        memory_bytes: table.memory_mb.unwrap_or(256).saturating_mul(1 << 20),
        persist: table.persist.unwrap_or(true),
        shared: cli.cache_shared || table.shared.unwrap_or(false),
        frozen_budget_bytes: table.frozen_mb.unwrap_or(128).saturating_mul(1 << 20),
    }
}
