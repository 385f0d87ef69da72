//! Errors (a message refused, a call out of order) and failures (a round that cannot finish).

use core::fmt;

use thiserror::Error;

use crate::params::ParamError;

/// A stage of a SecAgg+ round, as named in errors and failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// Stage 1: clients advertise their public keys and self-mask commitment.
    Advertise,
    /// Stage 2: clients deal encrypted Shamir shares to their neighbours.
    Share,
    /// Stage 3: clients send their masked input.
    MaskedInput,
    /// Stage 4: survivors reveal the shares the aggregator asks for.
    Unmask,
    /// The aggregator reconstructs the secrets and removes the masks.
    Finish,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Advertise => "stage 1 (advertise keys)",
            Stage::Share => "stage 2 (share keys)",
            Stage::MaskedInput => "stage 3 (masked input)",
            Stage::Unmask => "stage 4 (unmask)",
            Stage::Finish => "finish (unmasking the sum)",
        })
    }
}

/// Which secret of a client a revealed share belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RevealKind {
    /// A share of the client's self-mask seed `b_u` (the client survived: its masked input is
    /// in the sum).
    SelfMask,
    /// A share of the client's pairwise-mask secret key (the client dropped after sharing: its
    /// pairwise masks with its surviving neighbours must be removed).
    MaskKey,
}

impl fmt::Display for RevealKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RevealKind::SelfMask => "self-mask seed",
            RevealKind::MaskKey => "mask key",
        })
    }
}

/// A refused call or message. Every variant names the round and, where there is one, the
/// client concerned; none of them changes the state of the [`crate::ClientRound`] or
/// [`crate::ServerRound`] that returned it.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SecAggError {
    /// The round's parameters break a rule of [`crate::Params::check`].
    #[error("round {round}: invalid parameters: {source}")]
    Params {
        /// The round.
        round: u32,
        /// The rule broken.
        source: ParamError,
    },
    /// A method was called out of order (or twice).
    #[error("round {round}, {who}: `{call}` is not allowed now: {state}")]
    OutOfOrder {
        /// The round.
        round: u32,
        /// The client (for a [`crate::ClientRound`]) or `aggregator`.
        who: String,
        /// The method called.
        call: &'static str,
        /// Where the round is.
        state: &'static str,
    },
    /// A client id appears twice in a list that must hold each id once.
    #[error("round {round}, {stage}: client {client:?} appears more than once in the {list}")]
    Duplicate {
        /// The round.
        round: u32,
        /// The stage.
        stage: Stage,
        /// The repeated id.
        client: String,
        /// Which list.
        list: &'static str,
    },
    /// A message or list names a client that is not in the roster of the round.
    #[error("round {round}, {stage}: client {client:?} is not in the roster")]
    UnknownClient {
        /// The round.
        round: u32,
        /// The stage.
        stage: Stage,
        /// The unknown id.
        client: String,
    },
    /// The roster does not hold this client's own advertised keys.
    #[error("round {round}, {stage}: the roster {problem} for client {client:?} (me)")]
    RosterMismatch {
        /// The round.
        round: u32,
        /// The stage.
        stage: Stage,
        /// This client.
        client: String,
        /// `has no entry` or `has other keys`.
        problem: &'static str,
    },
    /// A public key is of small order (the X25519 result with it is all zeros): anyone could
    /// compute the "shared" secret.
    #[error("round {round}: client {client:?} advertised a small-order {key} public key")]
    WeakKey {
        /// The round.
        round: u32,
        /// The client whose key it is.
        client: String,
        /// `encryption` or `mask`.
        key: &'static str,
    },
    /// Too few clients for the threshold.
    #[error("round {round}, {stage}: {have} clients, at least {need} needed (threshold + 1)")]
    TooFewMembers {
        /// The round.
        round: u32,
        /// The stage.
        stage: Stage,
        /// Clients there are.
        have: usize,
        /// Clients needed.
        need: usize,
    },
    /// More clients than the sum has headroom for (`max_clients`).
    #[error("round {round}, {stage}: {have} clients, at most {max} (max_clients) allowed")]
    TooManyMembers {
        /// The round.
        round: u32,
        /// The stage.
        stage: Stage,
        /// Clients there are.
        have: usize,
        /// max_clients.
        max: usize,
    },
    /// Too few of a client's neighbours remain for its secrets to be recoverable: the client
    /// refuses to go on (it would otherwise risk its input).
    #[error(
        "round {round}, {stage}: client {client:?} has {have} neighbours left in the set, \
         at least {need} (the threshold) needed"
    )]
    TooFewNeighbours {
        /// The round.
        round: u32,
        /// The stage.
        stage: Stage,
        /// The client.
        client: String,
        /// Neighbours left.
        have: usize,
        /// Threshold.
        need: usize,
    },
    /// A set sent by the aggregator (u2, u3, dropped) is inconsistent.
    #[error("round {round}, {stage}: client {client:?}: {problem}")]
    InconsistentSets {
        /// The round.
        round: u32,
        /// The stage.
        stage: Stage,
        /// The client the inconsistency is about.
        client: String,
        /// What is wrong.
        problem: &'static str,
    },
    /// An encrypted share does not authenticate: tampered with, or made for another round,
    /// another sender or another recipient.
    #[error(
        "round {round}: the share ciphertext from {from:?} to {to:?} does not authenticate \
         (tampered, or for another round or pair)"
    )]
    BadShareCiphertext {
        /// The round.
        round: u32,
        /// The claimed sender.
        from: String,
        /// The recipient.
        to: String,
    },
    /// A share (decrypted, or revealed) is malformed.
    #[error("round {round}, {stage}: share from {from:?} for {of:?}: {problem}")]
    BadShare {
        /// The round.
        round: u32,
        /// The stage.
        stage: Stage,
        /// The client that sent the share.
        from: String,
        /// The client whose secret the share is of.
        of: String,
        /// What is wrong.
        problem: String,
    },
    /// A share was expected from a neighbour and is not there.
    #[error("round {round}, {stage}: client {to:?} has no share from its neighbour {from:?}")]
    MissingShare {
        /// The round.
        round: u32,
        /// The stage.
        stage: Stage,
        /// The neighbour that should have sent it.
        from: String,
        /// The recipient.
        to: String,
    },
    /// A set of shares is not the sender's neighbourhood.
    #[error("round {round}, {stage}: shares from {from:?}: {problem} {to:?}")]
    WrongRecipients {
        /// The round.
        round: u32,
        /// The stage.
        stage: Stage,
        /// The sender.
        from: String,
        /// The recipient concerned.
        to: String,
        /// `are addressed to a non-neighbour`, `hold more than one for`, or `hold none for`.
        problem: &'static str,
    },
    /// A client sent the same kind of message twice.
    #[error("round {round}, {stage}: client {client:?} already sent its message (replay?)")]
    Replay {
        /// The round.
        round: u32,
        /// The stage.
        stage: Stage,
        /// The client.
        client: String,
    },
    /// A client that is not in the stage's set sent a message.
    #[error("round {round}, {stage}: client {client:?} is not {set}")]
    NotInSet {
        /// The round.
        round: u32,
        /// The stage.
        stage: Stage,
        /// The client.
        client: String,
        /// Which set, in words.
        set: &'static str,
    },
    /// A byte string or vector has the wrong length.
    #[error("round {round}, {stage}: {what} from {client:?} has length {got}, expected {expected}")]
    WrongLength {
        /// The round.
        round: u32,
        /// The stage.
        stage: Stage,
        /// The client.
        client: String,
        /// What it is.
        what: &'static str,
        /// Its length.
        got: usize,
        /// The length expected.
        expected: usize,
    },
    /// A value of a vector is not in `Z_{2^m}`.
    #[error(
        "round {round}, {stage}: value {index} from {client:?} is {value}, not below 2^{modulus_bits}"
    )]
    OutOfRange {
        /// The round.
        round: u32,
        /// The stage.
        stage: Stage,
        /// The client.
        client: String,
        /// Index in the vector.
        index: usize,
        /// The value.
        value: u32,
        /// m.
        modulus_bits: u8,
    },
    /// A reveal is malformed: not a neighbour, wrong kind, or more than one for a client.
    #[error("round {round}: reveal from {from:?} of {of:?}: {problem}")]
    BadReveal {
        /// The round.
        round: u32,
        /// The revealing client.
        from: String,
        /// Whose share.
        of: String,
        /// What is wrong.
        problem: &'static str,
    },
    /// This client already answered a different unmask request: answering this one could
    /// reveal both secrets of a neighbour.
    #[error(
        "round {round}: client {client:?} already revealed shares for another unmask request; \
         a second, different one is refused"
    )]
    ConflictingUnmask {
        /// The round.
        round: u32,
        /// This client.
        client: String,
    },
}

/// Why a round cannot go on. Returned when a stage closes (and by [`crate::ServerRound::finish`]);
/// the round is dead after it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Failure {
    /// A set has fewer members than the threshold.
    #[error("round {round}, {stage}: {have} clients left, at least {need} (the threshold) needed")]
    TooFewClients {
        /// The round.
        round: u32,
        /// The stage that closed.
        stage: Stage,
        /// Clients left.
        have: usize,
        /// Threshold.
        need: usize,
    },
    /// A client has fewer neighbours left than the threshold, so its secrets could not be
    /// recovered (or it would refuse to go on).
    #[error(
        "round {round}, {stage}: client {client:?} has {have} neighbours left, at least {need} \
         (the threshold) needed"
    )]
    TooFewSurvivors {
        /// The round.
        round: u32,
        /// The stage that closed.
        stage: Stage,
        /// The client.
        client: String,
        /// Neighbours left.
        have: usize,
        /// Threshold.
        need: usize,
    },
    /// Fewer than `need` shares of a secret were revealed.
    #[error(
        "round {round}, {stage}: {have} shares of the {kind} of {client:?} revealed, {need} needed"
    )]
    NotEnoughShares {
        /// The round.
        round: u32,
        /// The stage.
        stage: Stage,
        /// Whose secret.
        client: String,
        /// Which secret.
        kind: RevealKind,
        /// Shares revealed.
        have: usize,
        /// Threshold.
        need: usize,
    },
    /// No `need`-subset of the revealed shares reconstructs a secret that matches the
    /// client's advertised commitment (self mask) or public key (mask key).
    #[error(
        "round {round}, {stage}: the {kind} of {client:?} cannot be reconstructed: no {need} of \
         its {have} revealed shares agree with its advertised {check} ({tried} subsets tried)"
    )]
    Unrecoverable {
        /// The round.
        round: u32,
        /// The stage.
        stage: Stage,
        /// Whose secret.
        client: String,
        /// Which secret.
        kind: RevealKind,
        /// Shares revealed.
        have: usize,
        /// Threshold.
        need: usize,
        /// `commitment` or `public key`.
        check: &'static str,
        /// Subsets tried.
        tried: usize,
    },
    /// A stage was closed out of order (or the round already failed).
    #[error("round {round}: `{call}` is not allowed now: {state}")]
    OutOfOrder {
        /// The round.
        round: u32,
        /// The method called.
        call: &'static str,
        /// Where the round is.
        state: &'static str,
    },
}
