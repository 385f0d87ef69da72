//! The `[broker]` table, as both the aggregator and the edge client read it.
//!
//! One spelling for both: a key means the same wherever it is written. A few keys belong to one
//! side only (`host`, `port` and `client_id` set up the aggregator's embedded broker and its own
//! session; `password` in clear text is only accepted from an edge client's file); the other
//! side refuses them by name when it validates the table.
//!
//! `[embedded_broker]` ([`EmbeddedBrokerTable`]) is the aggregator's alone: who may use the
//! broker it runs in-process.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The `[broker]` table as written: every field optional.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerTable {
    /// `mqtt://host[:port]`, `mqtts://host[:port]` (TLS, port 8883 by default), the nodes of a
    /// cluster as a comma-separated list of such URLs (one scheme for all; the first is tried
    /// first, a failed connection moves on to the next), or, for the aggregator alone,
    /// `embedded` (rumqttd in-process). Aggregator default `embedded`; edge client default
    /// `mqtt://127.0.0.1:1883`.
    pub url: Option<String>,
    /// Aggregator, embedded broker: listen address. Default `127.0.0.1`.
    pub host: Option<String>,
    /// Aggregator, embedded broker: listen port, 0 = a free one. Default 0.
    pub port: Option<u16>,
    /// Largest MQTT packet sent or accepted, bytes; payloads above it are chunked. Default 1 MiB.
    pub max_packet_bytes: Option<usize>,
    /// Aggregator: bytes of received messages it holds before handling them; beyond this it
    /// stops reading and the broker keeps the rest of a burst. Default 16 MiB, at least
    /// `max_packet_bytes`.
    pub receive_buffer_bytes: Option<usize>,
    /// Aggregator: its MQTT client id. Default `fedpeft-aggregator`.
    pub client_id: Option<String>,
    /// MQTT keep-alive, seconds. Default 30.
    pub keep_alive_secs: Option<u64>,
    /// mqtts: PEM file of the CA the broker's certificate chains to. Required for mqtts.
    pub ca_file: Option<PathBuf>,
    /// mqtts: PEM client certificate, for brokers that authenticate by certificate.
    pub client_cert: Option<PathBuf>,
    /// mqtts: PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// MQTT username, if the broker wants one.
    pub username: Option<String>,
    /// Edge client only: the password in clear text (prefer `password_file` or `password_env`).
    pub password: Option<String>,
    /// A file whose first line is the password.
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the password.
    pub password_env: Option<String>,
}

/// The aggregator's `[embedded_broker]` table: who may use the embedded broker (`[broker] url =
/// "embedded"`). Unset, anyone who can connect to it may publish and subscribe on any topic.
/// The files are Mosquitto's own formats, so the files in `deploy/mosquitto/` serve both
/// brokers.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedBrokerTable {
    /// Mosquitto password file (`mosquitto_passwd`, PBKDF2-SHA512 `$7$` hashes). Set, every
    /// client must log in as one of its users, the aggregator included (`[broker] username`
    /// and `password_file` or `password_env`), and the ACL applies. Default none: no logins.
    pub password_file: Option<PathBuf>,
    /// Mosquitto ACL file (`user`, `topic`, `pattern` lines; `%u`, `%c`). Needs
    /// `password_file`. Default, with `password_file`: the shipped `deploy/mosquitto/acl`
    /// (compiled in).
    pub acl_file: Option<PathBuf>,
}
