//! The `[security]` table: the key this client signs with and the aggregator's public key.

use std::path::PathBuf;

use fedpeft_config::{ConfigError, SecurityTable, invalid};
use fedpeft_protocol::VerifyingKey;

use super::Cli;

/// The validated signing settings.
pub(super) struct Keys {
    pub signing_key: Option<PathBuf>,
    pub aggregator_key: Option<VerifyingKey>,
}

/// Flags over `[security]`; the aggregator's key must be 64 hex digits. The key file is read
/// when the client starts, not here.
pub(super) fn resolve(table: SecurityTable, cli: &Cli) -> Result<Keys, ConfigError> {
    if table.enrolled_keys.is_some() {
        return Err(invalid(
            "security.enrolled_keys",
            "is an aggregator setting (its enrolment file); an edge client gives the \
             aggregator's public key as `security.aggregator_key`",
        ));
    }
    let aggregator_key = match cli.aggregator_key.clone().or(table.aggregator_key) {
        Some(hex) => Some(
            fedpeft_protocol::sign::parse_public_key(&hex)
                .map_err(|e| invalid("security.aggregator_key", e.to_string()))?,
        ),
        None => None,
    };
    Ok(Keys {
        signing_key: cli.signing_key.clone().or(table.signing_key),
        aggregator_key,
    })
}
