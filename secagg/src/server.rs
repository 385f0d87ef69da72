//! The aggregator side of a round: [`ServerRound`].

use core::fmt;
use std::collections::{BTreeMap, BTreeSet};

use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::client::Reveal;
use crate::client::{RosterEntry, share_x};
use crate::crypto::{
    self, REVEAL_SHARE_LEN, SHARE_CIPHERTEXT_LEN, ShareBytes, apply_mask, pairwise_seed,
    self_mask_commitment,
};
use crate::error::{Failure, RevealKind, SecAggError, Stage};
use crate::graph::neighbourhoods;
use crate::params::Params;

/// Work bound of [`ServerRound::finish`] per secret: at most this many threshold-sized subsets
/// of its shares are tried to reconstruct it, and about as many reconstructions spent on
/// telling which shares are wrong.
pub const MAX_RECONSTRUCTION_TRIES: usize = 1024;

/// The end of stage 2: who stays in the masks, and what to relay to each of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relay {
    /// u2: the clients whose shares were accepted, sorted.
    pub u2: Vec<String>,
    /// For every client in u2: the ciphertexts addressed to it by members of u2, as
    /// `(from, ciphertext)`, sorted by sender.
    pub inbox: BTreeMap<String, Vec<(String, Vec<u8>)>>,
}

/// The end of stage 3: whose self masks and whose mask keys the survivors must reveal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmaskRequest {
    /// u3: the clients whose masked input was accepted, sorted.
    pub u3: Vec<String>,
    /// `u2 \ u3`: the clients that shared their keys but sent no masked input, sorted.
    pub dropped: Vec<String>,
}

/// The result of a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unmasked {
    /// `Σ_{u ∈ u3} x_u mod 2^m`: `1 + d` values (read it with [`crate::dequantize`]).
    pub sum: Vec<u32>,
    /// The clients whose inputs are in the sum, sorted.
    pub u3: Vec<String>,
    /// Clients that revealed a wrong share (sorted): tolerated as long as a `t`-subset still
    /// reconstructed each secret. A client is named only when the dealt polynomial could be
    /// identified (see [`ServerRound::finish`]).
    pub bad_shares: Vec<String>,
    /// Clients whose secret was reconstructed although some of its revealed shares disagree,
    /// but too many of them for the wrong ones to be told apart (nobody is named for these).
    pub unattributed: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Sharing,
    Masking,
    Unmasking,
    Failed,
}

impl Phase {
    fn describe(self) -> &'static str {
        match self {
            Phase::Sharing => "the round is in stage 2 (share keys)",
            Phase::Masking => "the round is in stage 3 (masked input)",
            Phase::Unmasking => "the round is in stage 4 (unmask)",
            Phase::Failed => "the round has failed",
        }
    }
}

/// The aggregator's side of one SecAgg+ round.
///
/// Drive it with [`ServerRound::accept_shares`] then [`ServerRound::close_sharing`] (stage 2),
/// [`ServerRound::accept_masked`] then [`ServerRound::close_masking`] (stage 3),
/// [`ServerRound::accept_reveals`] then [`ServerRound::finish`] (stage 4). Each `accept_*`
/// validates one client's message completely before changing anything, so a refused message
/// leaves the round as it was; each `close_*` returns a [`Failure`] when the round cannot go on
/// (and the round is dead after it).
///
/// Memory: the running masked sum (`O(d)`), plus `O(n·k)` small items (ciphertexts until the
/// relay, then revealed shares); masked vectors are added in as they arrive, never kept.
pub struct ServerRound {
    params: Params,
    round: u32,
    input_len: usize,
    threshold: usize,
    roster: BTreeMap<String, RosterEntry>,
    graph: BTreeMap<String, Vec<String>>,
    phase: Phase,
    shares: BTreeMap<String, Vec<(String, Vec<u8>)>>,
    u2: BTreeSet<String>,
    sum: Vec<u32>,
    masked: BTreeSet<String>,
    u3: BTreeSet<String>,
    dropped: BTreeSet<String>,
    revealed: BTreeSet<String>,
    self_shares: BTreeMap<String, Vec<(String, ShareBytes)>>,
    key_shares: BTreeMap<String, Vec<(String, ShareBytes)>>,
}

impl fmt::Debug for ServerRound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerRound")
            .field("round", &self.round)
            .field("params", &self.params)
            .field("phase", &self.phase)
            .field("roster", &self.roster.len())
            .field("input_len", &self.input_len)
            .field("shared", &self.shares.len().max(self.u2.len()))
            .field("masked", &self.masked.len())
            .field("revealed", &self.revealed.len())
            .finish_non_exhaustive()
    }
}

impl ServerRound {
    /// Opens stage 2 of round `round` over the `advertised` clients.
    ///
    /// `max_clients` is the most contributions the sum may hold (it fixes the quantization step,
    /// see [`Params::check`]); `input_len` is the length `1 + d` of every masked vector (fixed
    /// here rather than by the first vector to arrive, so that one bad client cannot set it for
    /// everyone); `graph_seed` seeds the neighbour graph ([`neighbourhoods`]) and is sent to the
    /// clients with the roster.
    ///
    /// Refuses: parameters failing [`Params::check`]`(max_clients)`, `input_len == 0`,
    /// duplicate ids, small-order keys ([`RosterEntry::check_keys`]), fewer than
    /// `threshold + 1` or more than `max_clients` clients.
    pub fn new(
        params: Params,
        round: u32,
        max_clients: usize,
        input_len: usize,
        graph_seed: [u8; 32],
        advertised: Vec<RosterEntry>,
    ) -> Result<ServerRound, SecAggError> {
        let stage = Stage::Advertise;
        params
            .check(max_clients)
            .map_err(|source| SecAggError::Params { round, source })?;
        if input_len == 0 {
            return Err(SecAggError::WrongLength {
                round,
                stage,
                client: "aggregator".to_owned(),
                what: "input length",
                got: 0,
                expected: 1,
            });
        }
        let mut roster = BTreeMap::new();
        for entry in advertised {
            entry.check_keys(round)?;
            let id = entry.client.clone();
            if roster.insert(id.clone(), entry).is_some() {
                return Err(SecAggError::Duplicate {
                    round,
                    stage,
                    client: id,
                    list: "advertised clients",
                });
            }
        }
        let need = usize::from(params.threshold) + 1;
        if roster.len() < need {
            return Err(SecAggError::TooFewMembers {
                round,
                stage,
                have: roster.len(),
                need,
            });
        }
        if roster.len() > max_clients {
            return Err(SecAggError::TooManyMembers {
                round,
                stage,
                have: roster.len(),
                max: max_clients,
            });
        }
        let ids: Vec<String> = roster.keys().cloned().collect();
        let graph = neighbourhoods(&graph_seed, &ids, params.neighbours);
        let (_, threshold) = params.effective(roster.len());
        Ok(ServerRound {
            params,
            round,
            input_len,
            threshold,
            roster,
            graph,
            phase: Phase::Sharing,
            shares: BTreeMap::new(),
            u2: BTreeSet::new(),
            sum: vec![0; input_len],
            masked: BTreeSet::new(),
            u3: BTreeSet::new(),
            dropped: BTreeSet::new(),
            revealed: BTreeSet::new(),
            self_shares: BTreeMap::new(),
            key_shares: BTreeMap::new(),
        })
    }

    /// The round.
    pub fn round(&self) -> u32 {
        self.round
    }

    /// The threshold in force (`t'` of [`Params::effective`]).
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// The roster (sorted by id), to send to the clients with the graph seed.
    pub fn roster(&self) -> Vec<RosterEntry> {
        self.roster.values().cloned().collect()
    }

    /// The neighbours of `client` (sorted), or `None` if it is not in the roster.
    pub fn neighbours(&self, client: &str) -> Option<&[String]> {
        self.graph.get(client).map(Vec::as_slice)
    }

    fn out_of_order(&self, who: &str, call: &'static str) -> SecAggError {
        SecAggError::OutOfOrder {
            round: self.round,
            who: who.to_owned(),
            call,
            state: self.phase.describe(),
        }
    }

    fn known(&self, stage: Stage, client: &str) -> Result<(), SecAggError> {
        if self.roster.contains_key(client) {
            Ok(())
        } else {
            Err(SecAggError::UnknownClient {
                round: self.round,
                stage,
                client: client.to_owned(),
            })
        }
    }

    /// Stage 2 input: the encrypted shares `from` deals, as `(to, ciphertext)`.
    ///
    /// `from` must be in the roster and not have shared yet; the recipients must be exactly
    /// its neighbourhood, each once; every ciphertext must be [`SHARE_CIPHERTEXT_LEN`] bytes.
    /// The error names the client and what is wrong.
    pub fn accept_shares(
        &mut self,
        from: &str,
        shares: Vec<(String, Vec<u8>)>,
    ) -> Result<(), SecAggError> {
        let round = self.round;
        let stage = Stage::Share;
        if self.phase != Phase::Sharing {
            return Err(self.out_of_order(from, "accept_shares"));
        }
        self.known(stage, from)?;
        if self.shares.contains_key(from) {
            return Err(SecAggError::Replay {
                round,
                stage,
                client: from.to_owned(),
            });
        }
        let hood = self.graph.get(from).map(Vec::as_slice).unwrap_or_default();
        let mut seen = BTreeSet::new();
        for (to, ct) in &shares {
            if hood.binary_search(to).is_err() {
                return Err(SecAggError::WrongRecipients {
                    round,
                    stage,
                    from: from.to_owned(),
                    to: to.clone(),
                    problem: "are addressed to a non-neighbour",
                });
            }
            if !seen.insert(to.as_str()) {
                return Err(SecAggError::WrongRecipients {
                    round,
                    stage,
                    from: from.to_owned(),
                    to: to.clone(),
                    problem: "hold more than one for",
                });
            }
            if ct.len() != SHARE_CIPHERTEXT_LEN {
                return Err(SecAggError::WrongLength {
                    round,
                    stage,
                    client: from.to_owned(),
                    what: "share ciphertext",
                    got: ct.len(),
                    expected: SHARE_CIPHERTEXT_LEN,
                });
            }
        }
        if let Some(missing) = hood.iter().find(|v| !seen.contains(v.as_str())) {
            return Err(SecAggError::WrongRecipients {
                round,
                stage,
                from: from.to_owned(),
                to: missing.clone(),
                problem: "hold none for",
            });
        }
        self.shares.insert(from.to_owned(), shares);
        Ok(())
    }

    fn neighbours_in(&self, client: &str, set: &BTreeSet<String>) -> usize {
        self.graph
            .get(client)
            .map_or(0, |h| h.iter().filter(|v| set.contains(*v)).count())
    }

    /// Closes stage 2: u2 = the clients whose shares were accepted. Fails if u2 is empty or
    /// some client in u2 has fewer than `t` neighbours in u2
    /// ([`Failure::TooFewSurvivors`]). Returns u2 and, for every client in u2, the
    /// ciphertexts addressed to it by members of u2 (the relay; ciphertexts to clients outside
    /// u2 are dropped).
    pub fn close_sharing(&mut self) -> Result<Relay, Failure> {
        let round = self.round;
        let stage = Stage::Share;
        if self.phase != Phase::Sharing {
            return Err(Failure::OutOfOrder {
                round,
                call: "close_sharing",
                state: self.phase.describe(),
            });
        }
        let u2: BTreeSet<String> = self.shares.keys().cloned().collect();
        let need = self.threshold;
        if u2.len() < need.max(1) {
            self.phase = Phase::Failed;
            return Err(Failure::TooFewClients {
                round,
                stage,
                have: u2.len(),
                need,
            });
        }
        for u in &u2 {
            let have = self.neighbours_in(u, &u2);
            if have < need {
                self.phase = Phase::Failed;
                return Err(Failure::TooFewSurvivors {
                    round,
                    stage,
                    client: u.clone(),
                    have,
                    need,
                });
            }
        }
        let mut inbox: BTreeMap<String, Vec<(String, Vec<u8>)>> =
            u2.iter().map(|u| (u.clone(), Vec::new())).collect();
        for (from, list) in core::mem::take(&mut self.shares) {
            for (to, ct) in list {
                if let Some(slot) = inbox.get_mut(&to) {
                    slot.push((from.clone(), ct));
                }
            }
        }
        self.u2 = u2;
        self.phase = Phase::Masking;
        Ok(Relay {
            u2: self.u2.iter().cloned().collect(),
            inbox,
        })
    }

    /// Stage 3 input: the masked vector of `from`, added into the running sum mod 2^m at once.
    ///
    /// `from` must be in u2 and send once; the vector must have the `input_len` given to
    /// [`ServerRound::new`], every value below `2^m`.
    pub fn accept_masked(&mut self, from: &str, masked: &[u32]) -> Result<(), SecAggError> {
        let round = self.round;
        let stage = Stage::MaskedInput;
        if self.phase != Phase::Masking {
            return Err(self.out_of_order(from, "accept_masked"));
        }
        self.known(stage, from)?;
        if !self.u2.contains(from) {
            return Err(SecAggError::NotInSet {
                round,
                stage,
                client: from.to_owned(),
                set: "in u2 (its shares were not accepted)",
            });
        }
        if self.masked.contains(from) {
            return Err(SecAggError::Replay {
                round,
                stage,
                client: from.to_owned(),
            });
        }
        if masked.len() != self.input_len {
            return Err(SecAggError::WrongLength {
                round,
                stage,
                client: from.to_owned(),
                what: "masked vector",
                got: masked.len(),
                expected: self.input_len,
            });
        }
        let mask = self.params.mask();
        if let Some((index, &value)) = masked.iter().enumerate().find(|(_, v)| **v & !mask != 0) {
            return Err(SecAggError::OutOfRange {
                round,
                stage,
                client: from.to_owned(),
                index,
                value,
                modulus_bits: self.params.modulus_bits,
            });
        }
        for (s, &y) in self.sum.iter_mut().zip(masked) {
            *s = s.wrapping_add(y) & mask;
        }
        self.masked.insert(from.to_owned());
        Ok(())
    }

    /// Closes stage 3: u3 = the clients whose masked input was accepted, dropped = u2 \ u3.
    /// Fails if `|u3| < t`, if some client in u3 has fewer than `t` neighbours in u3 (its
    /// self mask could not be recovered), or if some dropped client with neighbours in u3 has
    /// fewer than `t` of them (its mask key could not be recovered).
    pub fn close_masking(&mut self) -> Result<UnmaskRequest, Failure> {
        let round = self.round;
        let stage = Stage::MaskedInput;
        if self.phase != Phase::Masking {
            return Err(Failure::OutOfOrder {
                round,
                call: "close_masking",
                state: self.phase.describe(),
            });
        }
        let u3 = core::mem::take(&mut self.masked);
        let dropped: BTreeSet<String> = self.u2.difference(&u3).cloned().collect();
        let need = self.threshold;
        if u3.len() < need.max(1) {
            self.phase = Phase::Failed;
            return Err(Failure::TooFewClients {
                round,
                stage,
                have: u3.len(),
                need,
            });
        }
        for u in u3.iter().chain(&dropped) {
            let have = self.neighbours_in(u, &u3);
            let matters = u3.contains(u) || have > 0;
            if matters && have < need {
                self.phase = Phase::Failed;
                return Err(Failure::TooFewSurvivors {
                    round,
                    stage,
                    client: u.clone(),
                    have,
                    need,
                });
            }
        }
        self.u3 = u3;
        self.dropped = dropped;
        self.phase = Phase::Unmasking;
        Ok(UnmaskRequest {
            u3: self.u3.iter().cloned().collect(),
            dropped: self.dropped.iter().cloned().collect(),
        })
    }

    /// Stage 4 input: the shares `from` reveals.
    ///
    /// `from` must be in u3 and send once; each reveal's `of` must be a neighbour of `from`,
    /// appear once, and have the kind the request asked for (`of` ∈ u3 ⇒
    /// [`RevealKind::SelfMask`], `of` ∈ dropped ⇒ [`RevealKind::MaskKey`]); each share must be
    /// [`REVEAL_SHARE_LEN`] bytes with the x-coordinate `from` was dealt. A malformed reveal
    /// refuses the whole message (naming the client) without changing anything. A message may
    /// leave out some shares (they just do not count).
    pub fn accept_reveals(&mut self, from: &str, reveals: Vec<Reveal>) -> Result<(), SecAggError> {
        let round = self.round;
        let stage = Stage::Unmask;
        if self.phase != Phase::Unmasking {
            return Err(self.out_of_order(from, "accept_reveals"));
        }
        self.known(stage, from)?;
        if !self.u3.contains(from) {
            return Err(SecAggError::NotInSet {
                round,
                stage,
                client: from.to_owned(),
                set: "in u3 (its masked input was not accepted)",
            });
        }
        if self.revealed.contains(from) {
            return Err(SecAggError::Replay {
                round,
                stage,
                client: from.to_owned(),
            });
        }
        let bad = |of: &str, problem: &'static str| SecAggError::BadReveal {
            round,
            from: from.to_owned(),
            of: of.to_owned(),
            problem,
        };
        let mut seen = BTreeSet::new();
        for r in &reveals {
            let Some(of_hood) = self.graph.get(&r.of) else {
                return Err(bad(&r.of, "not in the roster"));
            };
            let Ok(index) = of_hood.binary_search_by(|w| w.as_str().cmp(from)) else {
                return Err(bad(&r.of, "not a neighbour of the sender"));
            };
            let expected = if self.u3.contains(&r.of) {
                RevealKind::SelfMask
            } else if self.dropped.contains(&r.of) {
                RevealKind::MaskKey
            } else {
                return Err(bad(&r.of, "neither a survivor (u3) nor dropped"));
            };
            if r.kind != expected {
                return Err(bad(
                    &r.of,
                    match expected {
                        RevealKind::SelfMask => {
                            "a mask-key share of a survivor (only its self-mask share may be revealed)"
                        }
                        RevealKind::MaskKey => {
                            "a self-mask share of a dropped client (only its mask-key share may be revealed)"
                        }
                    },
                ));
            }
            if !seen.insert(r.of.as_str()) {
                return Err(bad(&r.of, "more than one reveal for this client"));
            }
            if r.share.len() != REVEAL_SHARE_LEN {
                return Err(SecAggError::WrongLength {
                    round,
                    stage,
                    client: from.to_owned(),
                    what: "revealed share",
                    got: r.share.len(),
                    expected: REVEAL_SHARE_LEN,
                });
            }
            if r.share.first() != Some(&share_x(index)) {
                return Err(bad(
                    &r.of,
                    "wrong x-coordinate (not the share dealt to the sender)",
                ));
            }
        }
        for r in reveals {
            let mut share = Zeroizing::new([0u8; REVEAL_SHARE_LEN]);
            share.copy_from_slice(&r.share);
            let target = match r.kind {
                RevealKind::SelfMask => &mut self.self_shares,
                RevealKind::MaskKey => &mut self.key_shares,
            };
            target
                .entry(r.of)
                .or_default()
                .push((from.to_owned(), share));
        }
        self.revealed.insert(from.to_owned());
        Ok(())
    }

    /// The secrets to reconstruct: `(client, kind)` for every client in u3 (self mask) and
    /// every dropped client with neighbours in u3 (mask key).
    fn targets(&self) -> Vec<(&String, RevealKind)> {
        let mut out: Vec<(&String, RevealKind)> =
            self.u3.iter().map(|u| (u, RevealKind::SelfMask)).collect();
        out.extend(
            self.dropped
                .iter()
                .filter(|v| self.neighbours_in(v, &self.u3) > 0)
                .map(|v| (v, RevealKind::MaskKey)),
        );
        out
    }

    fn shares_of(&self, client: &str, kind: RevealKind) -> usize {
        let map = match kind {
            RevealKind::SelfMask => &self.self_shares,
            RevealKind::MaskKey => &self.key_shares,
        };
        map.get(client).map_or(0, Vec::len)
    }

    /// Whether every secret to reconstruct already has at least `t` shares (so the driver can
    /// finish before the deadline). False outside stage 4.
    pub fn can_finish(&self) -> bool {
        self.phase == Phase::Unmasking
            && self
                .targets()
                .into_iter()
                .all(|(c, kind)| self.shares_of(c, kind) >= self.threshold)
    }

    /// Reconstructs `b_u` of every client in u3 (checked against its commitment) and
    /// `mask_sk_v` of every dropped client v with neighbours in u3 (checked: clamped, and its
    /// X25519 public key is the advertised `mask_pk`), removes the self masks of u3 and the
    /// pairwise masks between each dropped v and its neighbours in u3, and returns the unmasked
    /// sum.
    ///
    /// Shares are tried in order of holder id: if the first `t` do not reconstruct a secret
    /// that passes its check, other `t`-subsets are tried (at most
    /// [`MAX_RECONSTRUCTION_TRIES`]). The check makes every secret used exact, whatever the
    /// shares. Wrong shares are then attributed: with N shares of a secret, if at most
    /// `⌊(N − t + 1) / 2⌋` are wrong their holders are named exactly in
    /// [`Unmasked::bad_shares`]; with more, either they are still named or the secret is listed
    /// in [`Unmasked::unattributed`] and nobody is — except that a coalition of
    /// `N − ⌊(N − t + 1) / 2⌋ − t + 2` or more liars about one secret could have honest holders
    /// named (shares are not verifiable one by one; that would take verifiable secret sharing).
    ///
    /// Fails with the reason if a secret has fewer than `t` shares
    /// ([`Failure::NotEnoughShares`]) or no tried subset passes ([`Failure::Unrecoverable`]).
    /// Consumes the round: an unmasking is never reused.
    pub fn finish(mut self) -> Result<Unmasked, Failure> {
        let round = self.round;
        if self.phase != Phase::Unmasking {
            return Err(Failure::OutOfOrder {
                round,
                call: "finish",
                state: self.phase.describe(),
            });
        }
        let t = self.threshold;
        let mask = self.params.mask();
        let mut bad = BTreeSet::new();
        let mut unattributed = Vec::new();
        let mut self_masks = Vec::new();
        let mut mask_keys = Vec::new();
        for (client, kind) in self.targets() {
            let (shares, check): (&[(String, ShareBytes)], &'static str) = match kind {
                RevealKind::SelfMask => (
                    self.self_shares.get(client).map_or(&[], Vec::as_slice),
                    "commitment",
                ),
                RevealKind::MaskKey => (
                    self.key_shares.get(client).map_or(&[], Vec::as_slice),
                    "public key",
                ),
            };
            let Some(entry) = self.roster.get(client) else {
                continue; // not reached: targets are roster members
            };
            let verify = |secret: &[u8; 32]| match kind {
                RevealKind::SelfMask => {
                    self_mask_commitment(round, secret) == entry.self_mask_commitment
                }
                RevealKind::MaskKey => {
                    crypto::is_clamped(secret)
                        && PublicKey::from(&StaticSecret::from(*secret)).to_bytes() == entry.mask_pk
                }
            };
            let got = reconstruct(shares, t, verify).map_err(|why| match why {
                Why::TooFew => Failure::NotEnoughShares {
                    round,
                    stage: Stage::Finish,
                    client: client.clone(),
                    kind,
                    have: shares.len(),
                    need: t,
                },
                Why::NoneAgree { tried } => Failure::Unrecoverable {
                    round,
                    stage: Stage::Finish,
                    client: client.clone(),
                    kind,
                    have: shares.len(),
                    need: t,
                    check,
                    tried,
                },
            })?;
            bad.extend(got.wrong);
            if got.unattributed {
                unattributed.push(client.clone());
            }
            match kind {
                RevealKind::SelfMask => self_masks.push(got.secret),
                RevealKind::MaskKey => mask_keys.push((client.clone(), got.secret)),
            }
        }
        let mut sum = core::mem::take(&mut self.sum);
        for b in &self_masks {
            apply_mask(&mut sum, b, mask, true);
        }
        for (v, sk_bytes) in &mask_keys {
            let sk = StaticSecret::from(**sk_bytes);
            for w in self.graph.get(v).into_iter().flatten() {
                if !self.u3.contains(w) {
                    continue;
                }
                let w_pk = self.roster.get(w).map(|e| e.mask_pk).unwrap_or_default();
                let seed = pairwise_seed(&sk, &w_pk, round, v, w);
                // w added PRG(s_wv) if w < v and subtracted it if w > v: undo that.
                apply_mask(&mut sum, &seed, mask, w < v);
            }
        }
        Ok(Unmasked {
            sum,
            u3: self.u3.iter().cloned().collect(),
            bad_shares: bad.into_iter().collect(),
            unattributed,
        })
    }
}

/// Why [`reconstruct`] failed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Why {
    TooFew,
    NoneAgree { tried: usize },
}

/// A reconstructed secret and what is known of the shares (`Debug` hides the secret).
#[derive(Debug)]
pub(crate) struct Reconstructed {
    pub(crate) secret: Zeroizing<[u8; 32]>,
    /// Holders whose shares are off the dealt polynomial (when it could be identified).
    pub(crate) wrong: Vec<String>,
    /// Some shares disagree, but too many to tell which (nobody is named).
    pub(crate) unattributed: bool,
}

/// Reconstructs a 32-byte secret from `(holder, share)` pairs (distinct x-coordinates) with
/// threshold `t`, and names the holders of wrong shares when that can be done soundly.
///
/// 1. The secret: the first `t`-subset (lexicographic over the holders' sorted order, at most
///    [`MAX_RECONSTRUCTION_TRIES`] tried) whose secret `s` passes `verify`.
/// 2. The culprits. With `s` known, a share j lies on the polynomial through `(0, s)` and a set
///    C of `t − 1` shares exactly when C ∪ {j} reconstructs `s` (t points determine a
///    polynomial of degree < t; it passes through `(0, s)` iff all t + 1 points lie on one).
///    Over the N shares this is a Reed–Solomon code of dimension `t − 1`, uniquely decodable up
///    to `r = ⌊(N − t + 1) / 2⌋` errors: at most one such polynomial has `N − r` shares on it.
///    If one is found (within [`MAX_RECONSTRUCTION_TRIES`] more reconstructions, and at least
///    one set C: t − 1 shares of the subset that gave `s`, then all sets in order), the shares off it
///    are named; it is the dealt polynomial whenever at most `r` shares are wrong. Otherwise
///    nobody is named. (Shares are not verifiable on their own: `N − r − t + 2` or more
///    colluding liars could make a false polynomial look like the dealt one.)
pub(crate) fn reconstruct(
    shares: &[(String, ShareBytes)],
    t: usize,
    verify: impl Fn(&[u8; 32]) -> bool,
) -> Result<Reconstructed, Why> {
    let mut order: Vec<&(String, ShareBytes)> = shares.iter().collect();
    order.sort_by(|a, b| a.0.cmp(&b.0));
    let n = order.len();
    let t8 = u8::try_from(t).unwrap_or(u8::MAX);
    if t == 0 || n < t {
        return Err(Why::TooFew);
    }
    let pick = |idx: &[usize]| -> Vec<&[u8; REVEAL_SHARE_LEN]> {
        idx.iter().map(|&i| &*order[i].1).collect()
    };
    let mut combo: Vec<usize> = (0..t).collect();
    let mut tried = 0;
    let secret = loop {
        if tried >= MAX_RECONSTRUCTION_TRIES {
            return Err(Why::NoneAgree { tried });
        }
        tried += 1;
        if let Some(secret) = crypto::recover(t8, &pick(&combo)) {
            if verify(&secret) {
                break secret;
            }
        }
        if !next_combination(&mut combo, n) {
            return Err(Why::NoneAgree { tried });
        }
    };
    // Attribution: look for the polynomial through (0, s) with at least n - r shares on it,
    // starting from t - 1 shares of the subset that gave s.
    let radius = (n + 1 - t) / 2;
    let need = n - radius;
    let on_curve = |base: &[usize]| -> Vec<bool> {
        let core = pick(base);
        (0..n)
            .map(|j| {
                if base.contains(&j) {
                    return true;
                }
                let mut with = core.clone();
                with.push(&*order[j].1);
                crypto::recover(t8, &with).is_some_and(|s| *s == *secret)
            })
            .collect()
    };
    // Each candidate costs n - t + 1 reconstructions: the same budget as for the secret.
    let max_candidates = (MAX_RECONSTRUCTION_TRIES / (n + 1 - t)).max(1);
    let mut base: Vec<usize> = (0..t - 1).collect();
    let mut base_fresh = true;
    let mut current = combo[..t - 1].to_vec();
    let mut tries = 0;
    let found = loop {
        tries += 1;
        let on = on_curve(&current);
        if on.iter().filter(|&&b| b).count() >= need {
            break Some(on);
        }
        if tries >= max_candidates {
            break None;
        }
        if !base_fresh && !next_combination(&mut base, n) {
            break None;
        }
        base_fresh = false;
        current = base.clone();
    };
    Ok(match found {
        Some(on) => Reconstructed {
            secret,
            wrong: order
                .iter()
                .zip(on)
                .filter(|(_, on)| !on)
                .map(|(h, _)| h.0.clone())
                .collect(),
            unattributed: false,
        },
        None => Reconstructed {
            secret,
            wrong: Vec::new(),
            unattributed: true,
        },
    })
}

/// Advances `combo` (strictly increasing indices below `n`) to the next combination in
/// lexicographic order; false after the last.
fn next_combination(combo: &mut [usize], n: usize) -> bool {
    let k = combo.len();
    let mut i = k;
    while i > 0 {
        i -= 1;
        if combo[i] < n - k + i {
            combo[i] += 1;
            for j in i + 1..k {
                combo[j] = combo[j - 1] + 1;
            }
            return true;
        }
    }
    false
}
