//! The `[client]` table: fleet, client id and run, which name this client on the wire.

use fedpeft_config::edge::ClientTable;
use fedpeft_config::{ConfigError, invalid};

use super::Cli;

/// Longest client id / fleet name accepted. They become MQTT topic levels and are carried as
/// fixed-capacity strings on the wire, so they are short and topic-safe.
pub const MAX_NAME_LEN: usize = 32;

/// Who this client is.
pub(super) struct Identity {
    pub fleet: String,
    pub client_id: String,
    pub run_id: u64,
}

/// Checks that `name` can be one MQTT topic level and a fixed-capacity wire string.
pub fn validate_name(field: &'static str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(
            field,
            format!(
                "`{name}` is {} bytes long; at most {MAX_NAME_LEN}",
                name.len()
            ),
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_' || *c == '.'))
    {
        return Err(invalid(
            field,
            format!("`{name}` contains `{bad}`; use ASCII letters, digits, `-`, `_` or `.`"),
        ));
    }
    Ok(())
}

/// Flags over `[client]`; the id is required, the fleet defaults to `fedpeft`, the run to 1.
pub(super) fn resolve(table: ClientTable, cli: &Cli) -> Result<Identity, ConfigError> {
    let fleet = cli
        .fleet
        .clone()
        .or(table.fleet)
        .unwrap_or_else(|| "fedpeft".to_string());
    validate_name("client.fleet", &fleet)?;
    let client_id = cli
        .client_id
        .clone()
        .or(table.id)
        .ok_or(ConfigError::Missing {
            field: "client.id",
            flag: "client-id",
        })?;
    validate_name("client.id", &client_id)?;
    Ok(Identity {
        fleet,
        client_id,
        run_id: cli.run_id.or(table.run_id).unwrap_or(1),
    })
}
