//! The `[reconnect]` table: exponential backoff with jitter between connection attempts.

use std::time::Duration;

use fedpeft_config::edge::ReconnectTable;
use fedpeft_config::{ConfigError, invalid};

/// Exponential backoff with jitter between reconnect attempts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
    /// Fraction of each wait that is randomised away, in `[0, 1]`.
    pub jitter: f64,
}

impl Backoff {
    /// The wait before reconnect attempt `attempt` (0-based), given a uniform sample
    /// `u ∈ [0, 1)`. Pure, so tests pin it; the shell draws `u` from a seeded RNG.
    pub fn delay(&self, attempt: u32, u: f64) -> Duration {
        let base = self.initial.as_secs_f64() * self.multiplier.powi(attempt.min(64) as i32);
        let capped = base.min(self.max.as_secs_f64());
        // Jitter spreads the reconnects of a fleet that lost its broker at the same moment.
        let factor = 1.0 - self.jitter * u.clamp(0.0, 1.0);
        Duration::from_secs_f64((capped * factor).max(0.0))
    }
}

/// `[reconnect]` over the defaults (500 ms doubling up to 30 s, half jitter), validated.
pub(super) fn resolve(table: ReconnectTable) -> Result<Backoff, ConfigError> {
    let initial_ms = table.initial_ms.unwrap_or(500);
    let max_ms = table.max_ms.unwrap_or(30_000);
    let multiplier = table.multiplier.unwrap_or(2.0);
    let jitter = table.jitter.unwrap_or(0.5);
    if initial_ms == 0 {
        return Err(invalid("reconnect.initial_ms", "must be at least 1"));
    }
    if max_ms < initial_ms {
        return Err(invalid(
            "reconnect.max_ms",
            format!("{max_ms} is smaller than reconnect.initial_ms = {initial_ms}"),
        ));
    }
    if !(multiplier.is_finite() && multiplier >= 1.0) {
        return Err(invalid(
            "reconnect.multiplier",
            format!("{multiplier} must be finite and >= 1"),
        ));
    }
    if !(0.0..=1.0).contains(&jitter) {
        return Err(invalid(
            "reconnect.jitter",
            format!("{jitter} is not in [0, 1]"),
        ));
    }
    Ok(Backoff {
        initial: Duration::from_millis(initial_ms),
        max: Duration::from_millis(max_ms),
        multiplier,
        jitter,
    })
}
