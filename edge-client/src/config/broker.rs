//! The `[broker]` table: where the broker is, how to log in, the TLS files, packet limits.

use std::time::Duration;

use fedpeft_config::{BrokerTable, ConfigError, invalid};

use super::{BrokerList, Cli, MIN_PACKET_BYTES};
use crate::tls::TlsFiles;
use crate::tls::broker::SettingError;

/// The validated connection settings.
pub(super) struct Connection {
    pub brokers: BrokerList,
    pub keep_alive: Duration,
    pub max_packet_bytes: usize,
    pub credentials: Option<(String, String)>,
    pub tls: Option<TlsFiles>,
}

fn setting(e: SettingError) -> ConfigError {
    invalid(e.key, e.message)
}

/// The keys of the shared table only the aggregator reads, with what an edge client uses instead.
fn refuse_aggregator_keys(table: &BrokerTable) -> Result<(), ConfigError> {
    let embedded = "sets up the aggregator's embedded broker; an edge client connects to \
                    `broker.url`";
    for (field, set, why) in [
        ("broker.host", table.host.is_some(), embedded),
        ("broker.port", table.port.is_some(), embedded),
        (
            "broker.client_id",
            table.client_id.is_some(),
            "is the aggregator's MQTT client id; an edge client's is `client.id`",
        ),
        (
            "broker.receive_buffer_bytes",
            table.receive_buffer_bytes.is_some(),
            "bounds what the aggregator holds of a burst of updates; an edge client receives \
             one announcement and one global adapter per round",
        ),
    ] {
        if set {
            return Err(invalid(
                field,
                format!("is an aggregator setting: it {why}"),
            ));
        }
    }
    Ok(())
}

/// Flags over `[broker]` over the defaults (`mqtt://127.0.0.1:1883`, keep-alive 30 s, 1 MiB
/// packets), validated; a password file is read here. The URL may list several brokers (the
/// nodes of a cluster), as the aggregator's may.
pub(super) fn resolve(table: BrokerTable, cli: &Cli) -> Result<Connection, ConfigError> {
    refuse_aggregator_keys(&table)?;
    let url = cli
        .broker
        .clone()
        .or(table.url)
        .unwrap_or_else(|| "mqtt://127.0.0.1:1883".to_string());
    let brokers = BrokerList::parse(&url).map_err(setting)?;

    let keep_alive_secs = table.keep_alive_secs.unwrap_or(30);
    if !(1..=65_535).contains(&keep_alive_secs) {
        return Err(invalid(
            "broker.keep_alive_secs",
            format!("{keep_alive_secs} is not in 1..=65535"),
        ));
    }

    let max_packet_bytes = cli
        .max_packet_bytes
        .or(table.max_packet_bytes)
        .unwrap_or(1 << 20);
    // MQTT's remaining-length field tops out at 256 MiB.
    if !(MIN_PACKET_BYTES..=268_435_455).contains(&max_packet_bytes) {
        return Err(invalid(
            "broker.max_packet_bytes",
            format!("{max_packet_bytes} is not in {MIN_PACKET_BYTES}..=268435455"),
        ));
    }

    let password_file = cli.password_file.clone().or(table.password_file);
    let password = crate::tls::broker::password(table.password, password_file, table.password_env)
        .map_err(setting)?;
    let credentials =
        crate::tls::broker::credentials(cli.username.clone().or(table.username), password)
            .map_err(setting)?;
    let tls = crate::tls::broker::tls_files(
        &brokers,
        cli.ca_file.clone().or(table.ca_file),
        cli.client_cert.clone().or(table.client_cert),
        cli.client_key.clone().or(table.client_key),
        " (--ca-file)",
    )
    .map_err(setting)?;
    Ok(Connection {
        brokers,
        keep_alive: Duration::from_secs(keep_alive_secs),
        max_packet_bytes,
        credentials,
        tls,
    })
}
