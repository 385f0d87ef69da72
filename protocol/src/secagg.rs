//! Secure aggregation (SecAgg+) messages: the aggregator learns only the sum of the updates.
//!
//! A secure round runs after local training, in four stages, each with its own deadline:
//!
//! ```text
//! aggregator                                         client (sampled)
//!  SecureRoundAnnounce (round topic, retained)  ──►   trains as in a plain round, then
//!                                               ◄──   SecAggKeys      (update/{client})
//!  SecAggRoster (secagg topic, retained)        ──►   deals Shamir shares to its neighbours
//!                                               ◄──   SecAggShares    (update/{client})
//!  SecAggRelay (inbox/{client}, one per client) ──►   masks its quantized update
//!                                               ◄──   SecAggMasked    (update/{client}, chunked)
//!  SecAggUnmask (secagg topic, retained)        ──►   reveals the shares asked for
//!                                               ◄──   SecAggReveal    (update/{client})
//! ```
//!
//! Key material and shares are opaque byte strings here: the cryptography (X25519, Shamir
//! sharing, ChaCha20-Poly1305, ChaCha20 mask expansion) lives in `fedpeft-secagg`. Every
//! message a client sends names the client and the round; signed fleets sign them like updates.

use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::ids::ClientId;
use crate::message::{RoundAnnounce, TrainMetrics};

/// Length of a public key or commitment, bytes.
pub const KEY_LEN: usize = 32;

/// The parameters of a secure round, announced with it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SecAggSetup {
    /// k: the size of each client's neighbourhood (the clients it shares its secrets with).
    pub neighbours: u16,
    /// t: shares needed to reconstruct a secret, `k/2 < t <= k`.
    pub threshold: u16,
    /// m: the masked arithmetic is in Z_{2^m}; masked vectors carry m bits per value.
    pub modulus_bits: u8,
    /// Every update value is clipped to `[-clip, clip]` before quantization.
    pub clip: f32,
    /// The L2 norm each device bounds its update to before clipping (0: none).
    pub norm_bound: f32,
    /// Total examples of the sampled clients: a client scales its update by
    /// `num_examples / reference_examples` inside the masked vector.
    pub reference_examples: u64,
    /// Most contributions the sum may hold (the sample size): fixes the quantization step.
    pub max_clients: u32,
    /// Client-level DP noise added on the devices (distributed DP), when the run has `[dp]`.
    pub dp: Option<SecAggDp>,
}

/// Distributed client-level DP in a secure round: what each device does to its update before
/// masking it. With it, every client weighs the same (a device puts 1 in the weight slot and
/// scales its update by `1 / reference_examples`), `clip` is the quantization range, wide
/// enough for the sum and its noise.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SecAggDp {
    /// S: the L2 bound on one client's contribution after rounding. A device bounds its
    /// update to S minus the largest rounding error (`reference_examples · step · √d`), so the
    /// rounded vector stays within S.
    pub clip_norm: f32,
    /// Every update value is clipped to `[-value_clip, value_clip]` (after the norm bound).
    pub value_clip: f32,
    /// Standard deviation of the discrete Gaussian noise each device adds to each value of its
    /// quantized input, in quantization steps.
    pub noise_steps: f64,
}

/// A round announcement for a secure round (on the round topic, retained, in place of a
/// [`RoundAnnounce`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecureRoundAnnounce {
    /// The round, its deadline for the advertised keys, its sample and training settings.
    pub announce: RoundAnnounce,
    /// How the sum is protected.
    pub setup: SecAggSetup,
}

/// Stage 1, client → aggregator: the client's public keys for this round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecAggKeys {
    /// Who.
    pub client: ClientId,
    /// The round.
    pub round: u32,
    /// X25519 key for the end-to-end encryption of shares.
    pub enc_pk: [u8; KEY_LEN],
    /// X25519 key for the pairwise masks.
    pub mask_pk: [u8; KEY_LEN],
    /// SHA-256 commitment to the client's self-mask seed (checked when it is reconstructed).
    pub commitment: [u8; KEY_LEN],
}

/// One advertised client, as the roster lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RosterEntry {
    /// Who.
    pub client: ClientId,
    /// See [`SecAggKeys::enc_pk`].
    pub enc_pk: [u8; KEY_LEN],
    /// See [`SecAggKeys::mask_pk`].
    pub mask_pk: [u8; KEY_LEN],
    /// See [`SecAggKeys::commitment`].
    pub commitment: [u8; KEY_LEN],
}

/// Stage 2 opens, aggregator → every client (secagg topic, retained): who advertised keys,
/// and the seed of the neighbour graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecAggRoster {
    /// The round.
    pub round: u32,
    /// Shares arriving after this instant (Unix time, ms) are late.
    pub deadline_unix_ms: u64,
    /// Seed of the k-regular neighbour graph over the roster.
    pub graph_seed: [u8; KEY_LEN],
    /// Every client whose keys were accepted, sorted by id.
    pub entries: Vec<RosterEntry>,
}

/// A ciphertext to or from one peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerBytes {
    /// The peer: the recipient in [`SecAggShares`], the sender in [`SecAggRelay`], the client
    /// whose secret it is in [`SecAggReveal`].
    pub peer: ClientId,
    /// The bytes.
    #[serde(with = "crate::bytes::field")]
    pub bytes: Vec<u8>,
}

/// Stage 2, client → aggregator: one encrypted share pair per neighbour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecAggShares {
    /// Who.
    pub client: ClientId,
    /// The round.
    pub round: u32,
    /// Encrypted shares, `peer` = the recipient.
    pub shares: Vec<PeerBytes>,
}

/// Stage 3 opens, aggregator → one client (its inbox topic): the shares its neighbours sent
/// it, and who stays in the masks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecAggRelay {
    /// The round.
    pub round: u32,
    /// Masked inputs arriving after this instant (Unix time, ms) are late.
    pub deadline_unix_ms: u64,
    /// Every client whose shares were accepted (sorted).
    pub survivors: Vec<ClientId>,
    /// Encrypted shares addressed to this client, `peer` = the sender.
    pub shares: Vec<PeerBytes>,
}

/// Stage 3, client → aggregator (chunked above the packet limit): the masked, quantized,
/// weighted update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecAggMasked {
    /// Who.
    pub client: ClientId,
    /// The round.
    pub round: u32,
    /// As in [`crate::ClientUpdate::sequence`].
    pub sequence: u32,
    /// Examples used (also inside the masked vector).
    pub num_examples: u64,
    /// Training metrics (in the clear: loss and accuracy, not the update).
    pub metrics: TrainMetrics,
    /// Values in the vector (1 + the adapter's parameter count).
    pub len: u32,
    /// The vector, `modulus_bits` bits per value, little-endian bit order.
    #[serde(with = "crate::bytes::field")]
    pub values: Vec<u8>,
}

/// Stage 4 opens, aggregator → every client (secagg topic, retained).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecAggUnmask {
    /// The round.
    pub round: u32,
    /// Reveals arriving after this instant (Unix time, ms) are late.
    pub deadline_unix_ms: u64,
    /// Clients whose masked input was accepted: reveal their self-mask shares.
    pub survivors: Vec<ClientId>,
    /// Clients that shared but sent no masked input: reveal their mask-key shares.
    pub dropped: Vec<ClientId>,
}

/// Which secret a revealed share belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RevealKind {
    /// The peer's self-mask seed (the peer survived).
    SelfMask,
    /// The peer's pairwise-mask key (the peer dropped).
    MaskKey,
}

/// One revealed share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevealedShare {
    /// Whose secret.
    pub peer: ClientId,
    /// Which secret.
    pub kind: RevealKind,
    /// The share.
    #[serde(with = "crate::bytes::field")]
    pub share: Vec<u8>,
}

/// Stage 4, client → aggregator: the shares the unmask request asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecAggReveal {
    /// Who.
    pub client: ClientId,
    /// The round.
    pub round: u32,
    /// The shares.
    pub shares: Vec<RevealedShare>,
}
