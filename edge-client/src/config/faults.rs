//! The `[faults]` table: emulated dropout and straggling, for fleet trials.

use std::time::Duration;

use fedpeft_config::edge::FaultsTable;
use fedpeft_config::{ConfigError, invalid};

use super::Cli;

/// Validated `[faults]`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct FaultsSpec {
    pub dropout: f64,
    pub dropout_offline: Duration,
    pub straggle: Duration,
    /// Go silent in secure rounds after sending this stage's message.
    pub secagg_drop_after: Option<crate::secure::DropAfter>,
}

/// A number of seconds in `0..=86400` (a day), `default` when unset.
fn secs(field: &'static str, v: Option<f64>, default: f64) -> Result<Duration, ConfigError> {
    let v = v.unwrap_or(default);
    if v.is_finite() && (0.0..=86_400.0).contains(&v) {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(invalid(field, format!("{v} is not in 0..=86400 seconds")))
    }
}

/// Flags over `[faults]` over the defaults (no dropout, 2 s away, no straggling), validated.
pub(super) fn resolve(table: FaultsTable, cli: &Cli) -> Result<FaultsSpec, ConfigError> {
    let dropout = cli.dropout.or(table.dropout).unwrap_or(0.0);
    if !(0.0..=1.0).contains(&dropout) {
        return Err(invalid(
            "faults.dropout",
            format!("{dropout} is not a probability in [0, 1]"),
        ));
    }
    Ok(FaultsSpec {
        dropout,
        dropout_offline: secs(
            "faults.dropout_offline_secs",
            cli.dropout_offline_secs.or(table.dropout_offline_secs),
            2.0,
        )?,
        straggle: secs(
            "faults.straggle_secs",
            cli.straggle_secs.or(table.straggle_secs),
            0.0,
        )?,
        secagg_drop_after: match cli
            .secagg_drop_after
            .clone()
            .or(table.secagg_drop_after)
            .as_deref()
        {
            None => None,
            Some(s) => Some(
                s.parse()
                    .map_err(|e: String| invalid("faults.secagg_drop_after", e))?,
            ),
        },
    })
}
