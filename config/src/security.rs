//! The `[security]` table: signed messages (the wire protocol's "Signed envelopes").

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The `[security]` table as written: every field optional.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityTable {
    /// This party's secret key file (`aggregator keygen` / `edge-client keygen`): what it
    /// publishes is signed with it. Default: unsigned.
    pub signing_key: Option<PathBuf>,
    /// Aggregator: the enrolment file (client id → public key); when set, joins, updates and
    /// statuses must be signed by the enrolled key. Default: none.
    pub enrolled_keys: Option<PathBuf>,
    /// Edge client: the aggregator's public key (64 hex digits); global adapters and round
    /// announcements must carry its signature. Default: not checked.
    pub aggregator_key: Option<String>,
}
