//! What the round machine takes, decides and keeps: events, actions, rules and the
//! checkpointable state.

use std::collections::{BTreeMap, BTreeSet};

use fedpeft_protocol::{
    ClientId, ClientState, ClientUpdate, DType, FleetName, GlobalAdapter, LocalConfig, PeftMethod,
    RoundAnnounce, SiteAggregate,
};
use serde::{Deserialize, Serialize};

use super::{FailReason, RejectReason, RoundRecord};
use crate::adapter::Adapter;
use crate::outbox::Outgoing;
use crate::strategy::{Accumulator, StrategyError, StrategyState};

/// An update the decoder could not turn into a [`ClientUpdate`].
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeFailure {
    pub reason: RejectReason,
    /// The round from the envelope header, when it was readable.
    pub round: Option<u32>,
    pub detail: String,
}

/// What a joining client says about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinInfo {
    pub num_examples: u64,
    pub backbone_id: String,
    pub backbone_sha256: [u8; 32],
    pub peft: PeftMethod,
}

/// Something that happened, as the shell saw it. `wire_bytes` is the MQTT packet size(s): the
/// shell counts them in the byte ledger ([`Event::sender`]); the machine checks an update's
/// against `max_update_bytes`.
#[derive(Debug, Clone)]
pub enum Event {
    /// The shell is connected and ready: (re)publish the current state.
    Start,
    /// The shell's broker connection came back (the broker may have restarted and lost its
    /// retained messages): publish the global adapter and the open round's announcement again,
    /// unchanged; deadlines stay where they were.
    Reconnected,
    /// A Join message.
    Joined {
        client: ClientId,
        info: JoinInfo,
        wire_bytes: u64,
    },
    /// A Status message (the last will arrives as `Offline`).
    Status {
        client: ClientId,
        state: ClientState,
        wire_bytes: u64,
    },
    /// A ClientUpdate on `update/{topic_client}`, decoded, or the reason it could not be.
    Update {
        topic_client: ClientId,
        update: Box<Result<ClientUpdate, DecodeFailure>>,
        wire_bytes: u64,
        /// The payload carries a valid signature by `topic_client`'s enrolled key (signed
        /// fleets only): the one proof of who sent it. An unsigned message may come from
        /// anybody who can publish on the broker.
        signed: bool,
    },
    /// A Join or Status that was refused before it reached the machine (signature checks):
    /// logged and counted, nothing else changes.
    Refused {
        /// The client the message names (unauthenticated).
        client: String,
        /// `join` or `status`.
        kind: &'static str,
        reason: RejectReason,
        detail: String,
        wire_bytes: u64,
    },
    /// The shell evaluated the global adapter of `round` on the held-out set.
    Evaluated {
        round: u32,
        loss: f64,
        accuracy: f64,
    },
    /// A secure-aggregation message on `update/{topic_client}`, decoded.
    SecAgg {
        topic_client: ClientId,
        message: Box<super::secure::Uplink>,
        wire_bytes: u64,
        /// As for [`Event::Update`].
        signed: bool,
    },
    /// A site's partial aggregate on `update/{topic_client}` (see [`super::site`]), decoded,
    /// or the reason it could not be.
    Partial {
        topic_client: ClientId,
        partial: Box<Result<SiteAggregate, DecodeFailure>>,
        wire_bytes: u64,
        /// As for [`Event::Update`].
        signed: bool,
    },
    /// A message from this site's root (site mode only): its announcement or global adapter.
    Upstream(Box<UpstreamMessage>),
    /// Time passed (deadlines are checked on every event, this just guarantees one).
    Tick,
}

/// What a site hears from its root.
#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamMessage {
    /// The root's round announcement (or its "run done" marker).
    Announce(RoundAnnounce),
    /// The root's global adapter, as it sent it.
    Global(GlobalAdapter),
}

impl Event {
    /// The client a message event names and its size on the wire: the bytes the shell counts
    /// in the [`RoundMachine::accounting_round`]. `None` for events that are not messages.
    /// The kind of a client's message (`join`, `status`, `update`), for the byte ledger.
    pub fn kind(&self) -> Option<&'static str> {
        match self {
            Event::Joined { .. } => Some("join"),
            Event::Status { .. } => Some("status"),
            Event::Update { .. } | Event::Partial { .. } => Some("update"),
            Event::SecAgg { .. } => Some("secagg"),
            Event::Refused { kind, .. } => Some(kind),
            _ => None,
        }
    }

    pub fn sender(&self) -> Option<(&str, u64)> {
        match self {
            Event::Joined {
                client, wire_bytes, ..
            }
            | Event::Status {
                client, wire_bytes, ..
            } => Some((client.as_str(), *wire_bytes)),
            Event::Update {
                topic_client,
                wire_bytes,
                ..
            }
            | Event::Partial {
                topic_client,
                wire_bytes,
                ..
            }
            | Event::SecAgg {
                topic_client,
                wire_bytes,
                ..
            } => Some((topic_client.as_str(), *wire_bytes)),
            Event::Refused {
                client, wire_bytes, ..
            } => Some((client.as_str(), *wire_bytes)),
            _ => None,
        }
    }
}

/// What the shell must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Publish `message` (the shell's [`crate::outbox::Outbox`] seals, chunks and names it),
    /// counting its bytes in `round`, delivered by the broker to each of `receivers` (the
    /// clients subscribed: joined and online).
    Publish {
        message: Outgoing,
        round: u32,
        receivers: Vec<String>,
    },
    /// Write the machine's state atomically as the checkpoint. The shell reads it from the
    /// machine ([`super::RoundMachine::state`]) when it writes, without a copy: a copy per
    /// accepted update cost O(clients) each (the clients, the accepted updates, the records),
    /// O(clients²) a round, and held 10 000-client rounds to about 120 updates per second.
    /// The state written is the machine's newest when the next other action is carried out or
    /// the batch of events ends, which is this one's or a later one's.
    Checkpoint,
    /// Evaluate this adapter (the global after `round`) and send back [`Event::Evaluated`].
    Evaluate { round: u32, adapter: Adapter },
    /// A round closed (ok or failed): its record, for progress display.
    RoundClosed(Box<RoundRecord>),
    /// A secure round's unmasked sum (`[Σ n_u, Σ q_u…]` mod 2^m): the shell writes it to
    /// `$FEDPEFT_SECAGG_DUMP_DIR` when that is set (audits and tests), and otherwise drops it.
    SecureSum { round: u32, sum: Vec<u32> },
    /// Send `message` to this site's root (site mode only): the shell's upstream outbox seals
    /// it with the root's run and fleet.
    Upstream(Outgoing),
    /// The run is over: the shell may shut down.
    Finished,
}

/// What to do when a round's deadline passes with fewer than `quorum` accepted updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum QuorumFailure {
    /// Record the round as failed, keep the global adapter, go on with the next round.
    Skip,
    /// Keep the accepted updates and extend the deadline by one round timeout, at most
    /// `max_extensions` times; then skip.
    Extend { max_extensions: u32 },
}

/// The settings of a run's rounds, as the config file gives them (the validated config's
/// round part; [`Rules`] adds what the model host and the DP settings decide).
#[derive(Debug, Clone, PartialEq)]
pub struct RunSettings {
    pub run_id: u64,
    pub fleet: FleetName,
    /// Rounds to run (numbered 1..=rounds; the initial adapter is round 0).
    pub rounds: u32,
    /// Clients that must have joined before a round starts, and the fewest sampled.
    pub min_clients: usize,
    /// Clients that must have joined before round 1 starts (at least `min_clients`), so the
    /// first round is sampled from the whole fleet rather than from the first to connect.
    pub start_clients: usize,
    /// Fraction of available clients sampled each round (at least `min_clients`).
    pub fraction: f64,
    /// Accepted updates needed to aggregate at the deadline.
    pub quorum: usize,
    pub round_timeout_ms: u64,
    pub on_quorum_failure: QuorumFailure,
    /// Seed of client sampling (and of each round's announced seed).
    pub seed: u64,
    /// Local training instructions (the seed is replaced per round).
    pub local: LocalConfig,
    /// Largest accepted update on the wire, bytes (all chunks together).
    pub max_update_bytes: u64,
    /// Optional L2 bound on each client delta (scaled down to it). With client-level DP the
    /// rules put the DP clip norm S here. With `adaptive_norm_multiple`, the bound of round 1
    /// (or none).
    pub max_update_norm: Option<f64>,
    /// Adaptive bound: round r's bound is this multiple of the median norm of the updates
    /// accepted in the last round that had any (before bounding); see the book's "Robust
    /// aggregation and client-level DP".
    pub adaptive_norm_multiple: Option<f64>,
    /// Encoding of the published global adapter. With f16 or int8 the aggregator adopts the
    /// decoded value as its global, so it and every client hold bit-identical adapters.
    pub global_dtype: DType,
    /// Secure aggregation (SecAgg+): the aggregator learns only the sum. Default none.
    pub secure: Option<SecureSettings>,
    /// Site mode: this aggregator runs its root's rounds for the devices on its broker and
    /// forwards one exact partial aggregate per round. Default none (a root, or a flat run).
    pub site: Option<SiteSettings>,
    /// Asynchronous buffered aggregation (FedBuff): no round barrier. Default none.
    pub buffered: Option<BufferedSettings>,
}

/// `[async]`, checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BufferedSettings {
    /// K: updates per new global adapter.
    pub buffer: usize,
    /// The most versions an accepted update may be behind.
    pub max_staleness: u32,
    /// a in the staleness weight (1 + τ)^-a.
    pub exponent: f64,
}

impl BufferedSettings {
    /// The weight of an update `staleness` versions behind.
    pub fn weight(&self, staleness: u32) -> f64 {
        (1.0 + f64::from(staleness)).powf(-self.exponent)
    }
}

/// `[site]`, checked: who this site's root is and what the site is called there.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteSettings {
    /// The root's fleet (its topics reach this broker over a bridge).
    pub upstream_fleet: FleetName,
    /// The root's run id.
    pub upstream_run_id: u64,
    /// This site's client id in the root's fleet.
    pub id: ClientId,
    /// The site closes its round this long before the root's deadline, so its aggregate
    /// arrives in time.
    pub margin_ms: u64,
    /// The largest packet the site accepts (its join tells the root).
    pub max_packet_bytes: u32,
}

/// `[secure_aggregation]`, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct SecureSettings {
    /// k; `None`: 2·⌈log2 n⌉ for n sampled clients.
    pub neighbours: Option<u16>,
    /// t; `None`: ⌊k/2⌋ + 1.
    pub threshold: Option<u16>,
    pub modulus_bits: u8,
    pub clip: f32,
    /// Deadline of the key, share and unmask stages.
    pub stage_timeout_ms: u64,
    /// Distributed client-level DP (`[dp]` in a secure run): the devices add the noise.
    pub dp: Option<SecureDp>,
}

/// Client-level DP with secure aggregation: each device clips its update to S and adds its
/// share of the Gaussian noise, so the unmasked sum of at least `min_contributions` inputs
/// carries noise of standard deviation at least σ·S/W (the central mechanism's), and no one —
/// the aggregator included — sees a noise-free input or sum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SecureDp {
    /// S.
    pub clip_norm: f64,
    /// σ.
    pub noise_multiplier: f64,
    /// W: the fixed denominator of the average.
    pub expected_clients: usize,
    /// The fewest masked inputs a round's sum may hold (fewer: the round fails).
    pub min_contributions: usize,
}

/// How many standard deviations of the sum's noise the quantization range leaves above the
/// clipped values, so the sum wraps modulo 2^m with probability below 2e-9 per value.
pub const NOISE_HEADROOM_SIGMAS: f64 = 6.0;

impl SecureSettings {
    /// The protocol's parameters for a round that samples `n` clients.
    pub fn params(&self, n: usize) -> fedpeft_secagg::Params {
        // Default k: 2·⌈log2 n⌉, at most the largest even number below n (everyone else, or
        // all but one), at least 2; default t: a majority of k.
        let k = self.neighbours.unwrap_or_else(|| {
            let log2 = (usize::BITS - n.max(2).saturating_sub(1).leading_zeros()) as usize;
            let cap = n.saturating_sub(1) & !1;
            (2 * log2).min(cap).clamp(2, 254) as u16
        });
        fedpeft_secagg::Params {
            neighbours: k,
            threshold: self.threshold.unwrap_or(k / 2 + 1),
            modulus_bits: self.modulus_bits,
            clip: self.clip,
        }
    }
}

/// The rules of a run: its [`RunSettings`] (which it dereferences to) and what the model host
/// and the DP settings add.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub run: RunSettings,
    /// Client-level DP's assumed client sampling rate q: a round that samples a larger share of
    /// the available clients is logged as a warning (the reported ε would understate).
    pub dp_sample_rate: Option<f64>,
    /// Parameters of the whole backbone, for the full-model FedAvg comparison.
    pub backbone_params: u64,
    /// Also checkpoint after every accepted update (not only at round close), so a restarted
    /// aggregator loses no accepted update of the open round.
    pub checkpoint_every_update: bool,
    /// Joins must match these (when set).
    pub backbone_id: Option<String>,
    pub backbone_sha256: Option<[u8; 32]>,
    pub peft: Option<PeftMethod>,
}

impl std::ops::Deref for Rules {
    type Target = RunSettings;
    fn deref(&self) -> &RunSettings {
        &self.run
    }
}

impl std::ops::DerefMut for Rules {
    fn deref_mut(&mut self) -> &mut RunSettings {
        &mut self.run
    }
}

/// A client as the aggregator knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientInfo {
    pub num_examples: u64,
    pub online: bool,
    /// Highest sequence accepted from this client.
    pub last_sequence: Option<u32>,
}

/// Where the run is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// One Phase per aggregator: the size of its open-round variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Phase {
    /// Waiting for `min_clients` to be available before announcing `next_round`.
    Waiting { next_round: u32 },
    /// Round `round` is open.
    Collecting(OpenRound),
    /// All rounds done.
    Done,
}

/// The open round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenRound {
    pub round: u32,
    pub started_unix_ms: u64,
    pub deadline_unix_ms: u64,
    /// A secure-aggregation round (its protocol state is not checkpointed).
    #[serde(default)]
    pub secure: bool,
    pub extensions: u32,
    pub sampled: BTreeSet<String>,
    /// Sampled clients whose update was accepted, with (sequence, num_examples).
    pub accepted: BTreeMap<String, (u32, u64)>,
    /// Sampled clients that failed (went offline, or sent a rejected update).
    pub failed: BTreeMap<String, FailReason>,
    pub rejected: BTreeMap<RejectReason, u64>,
    pub acc: Accumulator,
    /// The L2 bound applied to this round's deltas (fixed, adaptive or the DP clip norm).
    pub norm_bound: Option<f64>,
    /// Accepted clients in fold order, with their delta's L2 norm before bounding.
    pub arrival: Vec<(String, f64)>,
    /// Accepted clients whose delta was scaled down to `norm_bound`.
    pub clipped: Vec<String>,
    /// Σ nᵢ·lossᵢ, Σ nᵢ·accuracyᵢ and Σ nᵢ of the clients' training metrics.
    pub train_loss_sum: f64,
    pub train_acc_sum: f64,
    pub train_weight: f64,
    /// Accepted clients' own sample-level DP-SGD ε (their accountant, over every step they have
    /// taken), as their updates stated it.
    pub local_dp_epsilon: BTreeMap<String, f64>,
    /// Asynchronous runs: (client, versions behind) of each accepted update, in arrival order.
    pub staleness: Vec<(String, u32)>,
}

/// Everything the machine knows: what a checkpoint holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineState {
    pub run_id: u64,
    pub strategy: String,
    pub global: Adapter,
    /// Round that produced `global` (0 = initial).
    pub global_round: u32,
    pub phase: Phase,
    pub clients: BTreeMap<String, ClientInfo>,
    /// Every accepted (client, round, sequence), so a redelivery after a restart stays a duplicate.
    pub accepted_updates: BTreeSet<(String, u32, u32)>,
    pub strategy_state: StrategyState,
    pub rejected_total: BTreeMap<RejectReason, u64>,
    /// Refusals naming each joined client (by its topic; unsigned ones may be forged).
    #[serde(default)]
    pub rejected_by_client: BTreeMap<String, u64>,
    /// Round rows of the report (their traffic is the outbox's ledger's).
    pub records: Vec<RoundRecord>,
    /// Median pre-bound norm of the last round with accepted updates (the adaptive bound's
    /// reference).
    pub last_median_norm: Option<f64>,
    /// Deltas scaled down to the norm bound over the whole run.
    pub clipped_total: u64,
    /// Site mode: what the site knows of its root (empty otherwise).
    pub upstream: UpstreamState,
}

/// A site's view of its root: checkpointed, so a restarted site resumes the root's round.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UpstreamState {
    /// The root's newest announcement.
    pub announce: Option<RoundAnnounce>,
    /// The root's newest global adapter, as received (republished to the devices verbatim).
    pub global: Option<GlobalAdapter>,
    /// The newest root round this site has finished with (forwarded, failed or sat out).
    pub last_round: u32,
    /// Sequence of the next aggregate sent to the root.
    pub next_sequence: u32,
}

/// A checkpoint that does not belong to this run's configuration.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("checkpoint is for run {found}, the config says run {expected}")]
    RunMismatch { expected: u64, found: u64 },
    #[error("checkpoint used strategy `{found}`, the config says `{expected}`")]
    StrategyMismatch { expected: String, found: String },
    #[error(transparent)]
    Strategy(#[from] StrategyError),
}
