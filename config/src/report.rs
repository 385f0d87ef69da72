//! `report.json`, the aggregator's run report, as a type: the aggregator writes it, the fleet
//! runner and tests read it back.
//!
//! JSON schema (`schema = "fedpeft-aggregator-report/1"`):
//! ```text
//! { schema, run_id, fleet, strategy, peft, rounds_planned, trainable_params, backbone_params,
//!   finished: bool,
//!   totals: { up_bytes, down_bytes, up_messages, down_messages, aggregator_published_bytes,
//!             full_model_fedavg_bytes, ratio_to_full_model },   // ratio = (up+down)/full
//!   rejected: { reason: count },                    // whole run, reasons as in RejectReason
//!   clients: { id: { up_bytes, up_messages, down_bytes, down_messages } },
//!   rounds: [ { round, status: "initial"|"ok"|"failed", sampled: [id], clients_ok,
//!               clients_failed, failed_clients: { id: why }, rejected: { reason: count },
//!               train_loss, train_accuracy,       // example-weighted client metrics, or null
//!               eval_loss, eval_accuracy,         // server-side held-out evaluation, or null
//!               traffic: { up_bytes, up_messages, down_bytes, down_messages },
//!               full_model_fedavg_bytes, started_unix_ms, duration_ms,
//!               robust: { norm_bound, median_norm,   // L2 bound applied; median pre-bound norm
//!                         clipped, clipped_clients,  // deltas scaled down to the bound, whose
//!                         values_trimmed_per_coordinate,  // trimmed mean / median, else null
//!                         trimmed_share: { id: share },   // share of coordinates discarded
//!                         dp_noise_std, dp_epsilon, dp_delta },     // client-level DP, else null
//!               local_dp_epsilon: { id: ε } } ],  // DP-SGD on the clients: ε each one stated
//!   robust: { clipped_total, dp_epsilon, dp_delta },   // whole run (ε after the last round)
//!   local_dp: { clients: { id: ε }, median, max } | null,  // each client's latest stated ε
//!   round_timing: [ { round, handover_ms, close_ms, evaluation_ms } ] }  // aggregator's own time
//! ```
//! The book's "Report schema" and "Robust aggregation and client-level DP" pages explain each figure.
//! Byte counts are MQTT PUBLISH packets including framing (the aggregator's `accounting` module).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The schema name `report.json` carries.
pub const SCHEMA: &str = "fedpeft-aggregator-report/1";

/// Whole-run traffic against full-model FedAvg.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub up_bytes: u64,
    pub down_bytes: u64,
    pub up_messages: u64,
    pub down_messages: u64,
    pub aggregator_published_bytes: u64,
    pub full_model_fedavg_bytes: u64,
    pub ratio_to_full_model: Option<f64>,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// [`SCHEMA`].
    pub schema: String,
    pub run_id: u64,
    pub fleet: String,
    pub strategy: String,
    pub peft: String,
    pub rounds_planned: u32,
    pub trainable_params: usize,
    pub backbone_params: u64,
    pub finished: bool,
    pub totals: Totals,
    /// Refusals over the whole run, by reason.
    pub rejected: BTreeMap<RejectReason, u64>,
    /// Each client's traffic over the whole run.
    pub clients: BTreeMap<String, Traffic>,
    pub rounds: Vec<RoundRecord>,
    pub robust: RobustTotals,
    pub local_dp: Option<LocalDp>,
    /// Every round's global adapter the aggregator kept (`globals/index.json`); absent in
    /// reports of older versions and of runs that published none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub globals: Option<GlobalIndex>,
    /// The aggregator's own time between rounds, for each round this process closed (absent in
    /// reports of older versions; rounds closed before a restart have none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub round_timing: Vec<RoundTiming>,
}

/// What the aggregator spent between one round and the next, measured on its clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundTiming {
    pub round: u32,
    /// From the arrival of the message that closed the round (its last accepted update, or
    /// the deadline's tick) to the next round's announcement handed to the broker; `None` for
    /// the last round, or while the next round waits for clients.
    pub handover_ms: Option<f64>,
    /// Closing the round: aggregation, the new global's encoding and the checkpoint's state.
    pub close_ms: f64,
    /// The held-out evaluation of the new global (after the announcement), if it ran.
    pub evaluation_ms: Option<f64>,
}

/// The schema name `globals/index.json` carries.
pub const GLOBALS_SCHEMA: &str = "fedpeft-globals/1";

/// `globals/index.json`: what the global adapters a run kept are, and how to use them. Each
/// file is the global adapter exactly as the aggregator published it (a protocol envelope,
/// signed when the aggregator signs), so its signature can still be checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GlobalIndex {
    /// [`GLOBALS_SCHEMA`].
    pub schema: String,
    pub fleet: String,
    pub run_id: u64,
    /// What the adapters fit.
    pub model: AdapterModel,
    /// `keep_globals` as configured ("all", "best", "last N").
    pub keep: String,
    /// One entry per published global adapter, by round (round 0: the initial adapter).
    pub rounds: Vec<GlobalEntry>,
    /// The round with the highest held-out accuracy (the earliest among equals), if any
    /// round was evaluated.
    pub best: Option<u32>,
    /// The newest round.
    pub last: Option<u32>,
}

impl GlobalIndex {
    /// The entry of `round`.
    pub fn entry(&self, round: u32) -> Option<&GlobalEntry> {
        self.rounds.iter().find(|e| e.round == round)
    }
}

/// The model a run's adapters belong to: enough to rebuild the tail they fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterModel {
    /// The backbone folder as the aggregator was given it, if it had one.
    pub backbone: Option<String>,
    /// The backbone's identity (with the class-list digest for own data) and its trunk's
    /// sha256: an adapter is refused on another backbone.
    pub backbone_id: Option<String>,
    pub backbone_sha256: Option<String>,
    /// head | bias | lora | adapter | prompt | full-tail, with the method's settings.
    pub peft: String,
    pub lora_rank: Option<u16>,
    pub lora_alpha: Option<f32>,
    pub bottleneck: Option<u16>,
    pub prompt_tokens: Option<u16>,
    /// The class names in label-id order (empty without a backbone).
    pub classes: Vec<String>,
    pub image_size: Option<usize>,
    pub max_seq_len: Option<usize>,
    /// The adapter's tensors, in wire order.
    pub tensors: Vec<TensorLayout>,
}

/// A tensor's name and shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorLayout {
    pub name: String,
    pub shape: Vec<usize>,
}

/// One round's global adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GlobalEntry {
    pub round: u32,
    /// The file, relative to the run's output folder (`globals/round-0007.bin`); `None` once
    /// the retention policy removed it.
    pub file: Option<String>,
    pub bytes: u64,
    pub eval_accuracy: Option<f64>,
    pub eval_loss: Option<f64>,
}

/// Sample-level DP-SGD run on the clients, as they stated it: each client's accountant covers
/// every step it has taken, so its latest stated ε is its whole-run ε (at its own δ; fedpeft's
/// edge client uses δ = 1e-5). Clients that never stated one (no DP-SGD) are not listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalDp {
    pub clients: BTreeMap<String, f64>,
    /// Median and largest over `clients`: the privacy of the typical and of the least
    /// protected client's data.
    pub median: f64,
    pub max: f64,
}

/// Whole-run norm bounding and DP figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RobustTotals {
    pub clipped_total: u64,
    /// ε at `dp_delta` after the last aggregated round (client-level DP only).
    pub dp_epsilon: Option<f64>,
    pub dp_delta: Option<f64>,
}

/// One round of the report (round 0 is the initial adapter).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u32,
    pub status: RoundStatus,
    pub sampled: Vec<String>,
    pub clients_ok: usize,
    pub clients_failed: usize,
    /// Sampled clients that did not contribute, and why.
    pub failed_clients: BTreeMap<String, FailReason>,
    /// Messages refused while the round was open, by reason.
    pub rejected: BTreeMap<RejectReason, u64>,
    pub train_loss: Option<f64>,
    pub train_accuracy: Option<f64>,
    pub eval_loss: Option<f64>,
    pub eval_accuracy: Option<f64>,
    pub traffic: Traffic,
    pub full_model_fedavg_bytes: u64,
    pub started_unix_ms: u64,
    pub duration_ms: u64,
    /// Norm bounding, trimming and DP figures of the round.
    pub robust: RobustRecord,
    /// Sample-level DP-SGD run on the clients: the ε each accepted client stated with its
    /// update (its own accountant, every step it has taken so far, at its δ; fedpeft's edge
    /// client uses δ = 1e-5). Empty when no client trains with DP-SGD.
    pub local_dp_epsilon: BTreeMap<String, f64>,
    /// Secure aggregation's stages, in a secure round (null otherwise). Always written: the
    /// checkpoint's encoding is positional.
    #[serde(default)]
    pub secure: Option<SecureRecord>,
    /// Asynchronous runs: (client, versions behind) of each accepted update, in arrival order.
    #[serde(default)]
    pub staleness: Vec<(String, u32)>,
}

/// One secure-aggregation round (report field `secure`): who reached each stage, how long
/// each took, and why the round failed if it did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SecureRecord {
    /// Neighbourhood size k and threshold t used.
    pub neighbours: u16,
    pub threshold: u16,
    /// Bits per masked value.
    pub modulus_bits: u8,
    /// Clients whose keys were accepted (stage 1), whose shares were accepted (stage 2), whose
    /// masked input was accepted (stage 3) and who revealed their shares (stage 4).
    pub advertised: Vec<String>,
    pub shared: Vec<String>,
    pub masked: Vec<String>,
    pub revealed: Vec<String>,
    /// Wall time of each stage, ms: keys (from the announcement: includes local training),
    /// shares, masked input, unmasking.
    pub stage_ms: [u64; 4],
    /// Clients whose revealed shares did not reconstruct their peer's secret.
    pub bad_shares: Vec<String>,
    /// Why the round failed, when it did.
    pub failure: Option<String>,
}

/// What norm bounding, order statistics and client-level DP did in one round (report field
/// `robust`; the book's "Robust aggregation and DP" guide).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RobustRecord {
    /// L2 bound applied to each delta, if any.
    pub norm_bound: Option<f64>,
    /// Median L2 norm of the accepted deltas before bounding.
    pub median_norm: Option<f64>,
    /// Accepted deltas scaled down to the bound, and whose.
    pub clipped: usize,
    pub clipped_clients: Vec<String>,
    /// Trimmed mean / median: values discarded at each coordinate (the same at every one).
    pub values_trimmed_per_coordinate: Option<usize>,
    /// Trimmed mean / median: per client, the share of coordinates where its value was discarded.
    pub trimmed_share: BTreeMap<String, f64>,
    /// Client-level DP: per-coordinate noise std on the average, ε so far at δ.
    pub dp_noise_std: Option<f64>,
    pub dp_epsilon: Option<f64>,
    pub dp_delta: Option<f64>,
}

/// Bytes and messages in one direction pair. A chunked payload counts as one message whose
/// bytes are those of all its chunks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub up_bytes: u64,
    pub up_messages: u64,
    pub down_bytes: u64,
    pub down_messages: u64,
}

impl Traffic {
    pub fn add_up(&mut self, bytes: u64) {
        self.up_bytes += bytes;
        self.up_messages += 1;
    }
    pub fn add_down(&mut self, bytes: u64) {
        self.down_bytes += bytes;
        self.down_messages += 1;
    }
}

/// How a round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoundStatus {
    /// Round 0: the initial adapter, evaluated as the baseline.
    Initial,
    /// Aggregated: a new global adapter.
    Ok,
    /// Quorum not reached: the global adapter is unchanged.
    Failed,
}

impl RoundStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RoundStatus::Initial => "initial",
            RoundStatus::Ok => "ok",
            RoundStatus::Failed => "failed",
        }
    }
}

impl std::fmt::Display for RoundStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// Compares with the text the report writes (`status == "ok"`).
impl PartialEq<&str> for RoundStatus {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Why a sampled client did not contribute to a round (`failed_clients` in the report).
/// Written as text: `offline`, `no reply by the deadline`, `rejected: <reason>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FailReason {
    /// Its last will (or an offline status) arrived while the round waited for it.
    Offline,
    /// Nothing accepted from it before the deadline.
    NoReply,
    /// Its update for the round was refused.
    Rejected(RejectReason),
}

impl std::fmt::Display for FailReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailReason::Offline => f.write_str("offline"),
            FailReason::NoReply => f.write_str("no reply by the deadline"),
            FailReason::Rejected(r) => write!(f, "rejected: {r}"),
        }
    }
}

/// Compares with the text the report writes (`reason == "offline"`).
impl PartialEq<&str> for FailReason {
    fn eq(&self, other: &&str) -> bool {
        other.parse::<FailReason>().is_ok_and(|o| o == *self)
    }
}

impl std::str::FromStr for FailReason {
    type Err = String;
    fn from_str(s: &str) -> Result<FailReason, String> {
        match s {
            "offline" => Ok(FailReason::Offline),
            "no reply by the deadline" => Ok(FailReason::NoReply),
            _ => s
                .strip_prefix("rejected: ")
                .and_then(RejectReason::from_name)
                .map(FailReason::Rejected)
                .ok_or_else(|| format!("`{s}` is not a reason a client failed a round")),
        }
    }
}

impl Serialize for FailReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for FailReason {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<FailReason, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a message (an update, a join or a status) was refused. The [`RejectReason::as_str`]
/// names are the report's keys; reasons sort by that name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// Not decodable as a fedpeft envelope (truncated, bad varint, wrong kind on the topic, …).
    Malformed,
    /// Envelope of a protocol version this aggregator does not speak.
    WrongVersion,
    /// Envelope or chunk CRC-32 mismatch.
    BadChecksum,
    /// Envelope of another run (e.g. a retained leftover on an external broker).
    WrongRun,
    /// Larger than `max_update_bytes` on the wire.
    Oversized,
    /// Chunks that never completed within the reassembly timeout.
    Incomplete,
    /// The client never joined (or its join was refused).
    UnknownClient,
    /// The client id in the body differs from the one in the topic.
    ClientMismatch,
    /// The client is not sampled in this round.
    NotSampled,
    /// For the round that just closed: arrived after its deadline.
    Late,
    /// For an older round, or a sequence number older than one already accepted.
    Stale,
    /// For a round that has not been announced.
    FutureRound,
    /// Same client already has an accepted update this round (a redelivery is idempotent).
    Duplicate,
    /// Tensor names, order or shapes differ from the global adapter.
    WrongShape,
    /// A NaN or infinity in a tensor.
    NonFinite,
    /// A join whose backbone or PEFT method does not match the run's.
    Incompatible,
    /// Enrolment is configured and the message is not signed.
    Unsigned,
    /// The signature does not verify with the client's enrolled key (forged or altered).
    BadSignature,
    /// Enrolment is configured and the client id has no enrolled key.
    NotEnrolled,
    /// A secure-aggregation message refused: for a stage that is not open, from a client not
    /// in that stage, a repeat, or shares, keys or a masked vector that do not check out.
    #[serde(rename = "secagg")]
    SecAgg,
}

impl RejectReason {
    pub const ALL: [RejectReason; 20] = [
        RejectReason::Malformed,
        RejectReason::WrongVersion,
        RejectReason::BadChecksum,
        RejectReason::WrongRun,
        RejectReason::Oversized,
        RejectReason::Incomplete,
        RejectReason::UnknownClient,
        RejectReason::ClientMismatch,
        RejectReason::NotSampled,
        RejectReason::Late,
        RejectReason::Stale,
        RejectReason::FutureRound,
        RejectReason::Duplicate,
        RejectReason::WrongShape,
        RejectReason::NonFinite,
        RejectReason::Incompatible,
        RejectReason::Unsigned,
        RejectReason::BadSignature,
        RejectReason::NotEnrolled,
        RejectReason::SecAgg,
    ];

    /// Whether the reason is about what a well-formed update of the open round carries (its
    /// layout, its values, its size, the client its body names), rather than about its
    /// delivery (duplicate, late, stale, not sampled, from an unknown client) or its decoding.
    pub fn is_about_the_content(self) -> bool {
        matches!(
            self,
            RejectReason::WrongShape
                | RejectReason::NonFinite
                | RejectReason::Oversized
                | RejectReason::ClientMismatch
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::WrongVersion => "wrong_version",
            RejectReason::BadChecksum => "bad_checksum",
            RejectReason::WrongRun => "wrong_run",
            RejectReason::Oversized => "oversized",
            RejectReason::Incomplete => "incomplete",
            RejectReason::UnknownClient => "unknown_client",
            RejectReason::ClientMismatch => "client_mismatch",
            RejectReason::NotSampled => "not_sampled",
            RejectReason::Late => "late",
            RejectReason::Stale => "stale",
            RejectReason::FutureRound => "future_round",
            RejectReason::Duplicate => "duplicate",
            RejectReason::WrongShape => "wrong_shape",
            RejectReason::NonFinite => "non_finite",
            RejectReason::Incompatible => "incompatible",
            RejectReason::Unsigned => "unsigned",
            RejectReason::BadSignature => "bad_signature",
            RejectReason::NotEnrolled => "not_enrolled",
            RejectReason::SecAgg => "secagg",
        }
    }
}

impl RejectReason {
    /// The reason named `name` (its report key), if there is one.
    pub fn from_name(name: &str) -> Option<RejectReason> {
        RejectReason::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl Ord for RejectReason {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl PartialOrd for RejectReason {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_a_distinct_name_that_reads_back() {
        let mut names: Vec<&str> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        for r in RejectReason::ALL {
            assert_eq!(RejectReason::from_name(r.as_str()), Some(r));
            let json = format!("\"{}\"", r.as_str());
            assert_eq!(toml::Value::String(r.as_str().into()).to_string(), json);
            // The report's keys are serde's names: the same as `as_str`'s.
            let table: BTreeMap<RejectReason, u64> = [(r, 1)].into();
            let text = toml::to_string(&table).unwrap();
            assert_eq!(text.trim(), format!("{} = 1", r.as_str()), "{r:?}");
        }
        names.sort();
        names.dedup();
        assert_eq!(names.len(), RejectReason::ALL.len());
    }

    #[test]
    fn fail_reasons_are_written_as_the_text_the_report_has_always_had() {
        for (reason, text) in [
            (FailReason::Offline, "offline"),
            (FailReason::NoReply, "no reply by the deadline"),
            (
                FailReason::Rejected(RejectReason::WrongShape),
                "rejected: wrong_shape",
            ),
        ] {
            assert_eq!(reason.to_string(), text);
            assert_eq!(text.parse::<FailReason>(), Ok(reason));
        }
        assert!("asleep".parse::<FailReason>().is_err());
        assert!("rejected: tired".parse::<FailReason>().is_err());
    }

    #[test]
    fn reasons_sort_by_their_report_names() {
        let mut v = vec![
            RejectReason::WrongShape,
            RejectReason::BadChecksum,
            RejectReason::Late,
        ];
        v.sort();
        assert_eq!(
            v,
            [
                RejectReason::BadChecksum,
                RejectReason::Late,
                RejectReason::WrongShape
            ]
        );
    }
}
