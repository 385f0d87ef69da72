//! The client side of a round: [`ClientRound`].

use core::fmt;
use std::collections::{BTreeMap, BTreeSet};

use rand::CryptoRng;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{ZeroizeOnDrop, Zeroizing};

use crate::crypto::{
    self, REVEAL_SHARE_LEN, SHARE_PLAINTEXT_LEN, ShareBytes, apply_mask, open_shares,
    pairwise_seed, seal_shares, self_mask_commitment,
};
use crate::error::{RevealKind, SecAggError, Stage};
use crate::graph::neighbourhoods;
use crate::params::Params;

/// Stage 1, client → aggregator: this client's public keys for the round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advertise {
    /// X25519 public key for the encryption of shares.
    pub enc_pk: [u8; 32],
    /// X25519 public key for the pairwise masks.
    pub mask_pk: [u8; 32],
    /// `SHA-256("fedpeft-secagg-v1 self-mask" ‖ round (u32 LE) ‖ b_u)`: lets the aggregator
    /// check the self-mask seed it reconstructs.
    pub self_mask_commitment: [u8; 32],
}

impl Advertise {
    /// The roster entry of `client` with these keys.
    pub fn entry(&self, client: impl Into<String>) -> RosterEntry {
        RosterEntry {
            client: client.into(),
            enc_pk: self.enc_pk,
            mask_pk: self.mask_pk,
            self_mask_commitment: self.self_mask_commitment,
        }
    }
}

/// One advertised client, as the aggregator lists it in the roster of stage 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RosterEntry {
    /// The client's id.
    pub client: String,
    /// See [`Advertise::enc_pk`].
    pub enc_pk: [u8; 32],
    /// See [`Advertise::mask_pk`].
    pub mask_pk: [u8; 32],
    /// See [`Advertise::self_mask_commitment`].
    pub self_mask_commitment: [u8; 32],
}

impl RosterEntry {
    /// Refuses small-order public keys (with which the X25519 "shared" secret is all zeros,
    /// known to anyone). [`crate::ServerRound::new`] calls it on every entry and
    /// [`ClientRound::share`] on the client's neighbours (the only keys it uses); the aggregator
    /// can call it on each advertisement as it arrives.
    pub fn check_keys(&self, round: u32) -> Result<(), SecAggError> {
        for (pk, key) in [(&self.enc_pk, "encryption"), (&self.mask_pk, "mask")] {
            if crypto::is_weak_public_key(pk) {
                return Err(SecAggError::WeakKey {
                    round,
                    client: self.client.clone(),
                    key,
                });
            }
        }
        Ok(())
    }
}

/// One share a client reveals in stage 4.
#[derive(Clone, PartialEq, Eq)]
pub struct Reveal {
    /// The client whose secret this is a share of.
    pub of: String,
    /// Which secret.
    pub kind: RevealKind,
    /// The share: [`REVEAL_SHARE_LEN`] bytes, x-coordinate then 32 bytes.
    pub share: Vec<u8>,
}

impl fmt::Debug for Reveal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reveal")
            .field("of", &self.of)
            .field("kind", &self.kind)
            .field("share", &format_args!("<{} bytes>", self.share.len()))
            .finish()
    }
}

/// The two shares a neighbour dealt this client.
struct Held {
    self_mask: ShareBytes,
    mask_key: ShareBytes,
}

/// After stage 2: what the client knows of the round.
struct Shared {
    /// Public keys of every roster member.
    roster: BTreeMap<String, RosterEntry>,
    /// N(me), sorted.
    neighbours: Vec<String>,
    /// For each neighbour v: the x-coordinate of the shares v dealt me (my index in N(v) + 1).
    my_x: BTreeMap<String, u8>,
    /// Threshold in force (t').
    threshold: usize,
}

/// After stage 3.
struct Masked {
    u2: BTreeSet<String>,
    held: BTreeMap<String, Held>,
    /// The first unmask request answered: (u3, dropped).
    answered: Option<(BTreeSet<String>, BTreeSet<String>)>,
}

enum State {
    Advertised,
    Shared(Shared),
    Masked(Shared, Masked),
}

/// One client's side of one SecAgg+ round.
///
/// Call [`ClientRound::new`] (stage 1), [`ClientRound::share`] (stage 2),
/// [`ClientRound::masked_input`] (stage 3) and [`ClientRound::unmask`] (stage 4) in order;
/// each refuses to run out of order. The secrets (`enc_sk`, `mask_sk`, `b_u` and the shares
/// received from neighbours) are zeroed when the value is dropped, and `Debug` prints none of
/// them.
pub struct ClientRound {
    params: Params,
    round: u32,
    me: String,
    enc_sk: StaticSecret,
    mask_sk: StaticSecret,
    self_mask: Zeroizing<[u8; 32]>,
    advertise: Advertise,
    state: State,
}

// Every secret field zeroes itself on drop (StaticSecret, Zeroizing, and the blahaj shares).
impl ZeroizeOnDrop for ClientRound {}

impl fmt::Debug for ClientRound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (stage, neighbours) = match &self.state {
            State::Advertised => ("advertised", 0),
            State::Shared(s) => ("shared", s.neighbours.len()),
            State::Masked(s, _) => ("masked", s.neighbours.len()),
        };
        f.debug_struct("ClientRound")
            .field("round", &self.round)
            .field("me", &self.me)
            .field("params", &self.params)
            .field("state", &stage)
            .field("neighbours", &neighbours)
            .field("secrets", &"<redacted>")
            .finish()
    }
}

impl ClientRound {
    /// Stage 1: draws this round's secrets from `rng` — 32 bytes of `enc_sk`, 32 of
    /// `mask_sk` (clamped), 32 of the self-mask seed `b_u`, in that order — and returns the
    /// advertisement to send.
    pub fn new(
        params: Params,
        round: u32,
        me: &str,
        rng: &mut impl CryptoRng,
    ) -> (ClientRound, Advertise) {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut bytes[..]);
        let enc_sk = StaticSecret::from(*bytes);
        rng.fill_bytes(&mut bytes[..]);
        crypto::clamp(&mut bytes);
        let mask_sk = StaticSecret::from(*bytes);
        let mut self_mask = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut self_mask[..]);
        let advertise = Advertise {
            enc_pk: PublicKey::from(&enc_sk).to_bytes(),
            mask_pk: PublicKey::from(&mask_sk).to_bytes(),
            self_mask_commitment: self_mask_commitment(round, &self_mask),
        };
        let client = ClientRound {
            params,
            round,
            me: me.to_owned(),
            enc_sk,
            mask_sk,
            self_mask,
            advertise,
            state: State::Advertised,
        };
        (client, advertise)
    }

    /// The round.
    pub fn round(&self) -> u32 {
        self.round
    }

    /// This client's id.
    pub fn id(&self) -> &str {
        &self.me
    }

    /// What [`ClientRound::new`] returned for advertising.
    pub fn advertise(&self) -> Advertise {
        self.advertise
    }

    /// This client's neighbours (sorted), once [`ClientRound::share`] has run.
    pub fn neighbours(&self) -> Option<&[String]> {
        match &self.state {
            State::Advertised => None,
            State::Shared(s) | State::Masked(s, _) => Some(&s.neighbours),
        }
    }

    fn out_of_order(&self, call: &'static str, state: &'static str) -> SecAggError {
        SecAggError::OutOfOrder {
            round: self.round,
            who: self.me.clone(),
            call,
            state,
        }
    }

    /// Stage 2. `roster` = every advertised client (it must hold this client with its own
    /// keys), `graph_seed` from the aggregator.
    ///
    /// Builds the neighbour graph ([`neighbourhoods`]), deals Shamir `t'`-of-`k'` shares of
    /// `b_u` and of `mask_sk_u` (`k'`, `t'` from [`Params::effective`]; the share with
    /// x-coordinate `i + 1` goes to the `i`-th neighbour in sorted order) and encrypts, for each
    /// neighbour v, the pair (share of `b_u` ‖ share of `mask_sk_u`) with ChaCha20-Poly1305
    /// under key = HKDF-SHA256(X25519(enc_sk_u, enc_pk_v), salt `fedpeft-secagg-v1 share`,
    /// info = round ‖ from ‖ to), nonce all-zero (each key encrypts one message), AAD =
    /// round ‖ from ‖ to. Returns `(to, ciphertext)` per neighbour, sorted by `to`, each
    /// ciphertext [`crate::SHARE_CIPHERTEXT_LEN`] bytes.
    ///
    /// Refuses: duplicate roster ids, a roster without this client or with other keys for it,
    /// small-order keys of its neighbours, fewer than `threshold + 1` members, parameters that break the rules of
    /// [`Params::check`] (the headroom aside), and a second call.
    pub fn share(
        &mut self,
        roster: &[RosterEntry],
        graph_seed: &[u8; 32],
        rng: &mut impl CryptoRng,
    ) -> Result<Vec<(String, Vec<u8>)>, SecAggError> {
        let round = self.round;
        if !matches!(self.state, State::Advertised) {
            return Err(self.out_of_order("share", "shares were already dealt"));
        }
        self.params
            .check_shape()
            .map_err(|source| SecAggError::Params { round, source })?;
        let mut members = BTreeMap::new();
        for entry in roster {
            if members
                .insert(entry.client.clone(), entry.clone())
                .is_some()
            {
                return Err(SecAggError::Duplicate {
                    round,
                    stage: Stage::Share,
                    client: entry.client.clone(),
                    list: "roster",
                });
            }
        }
        match members.get(&self.me) {
            None => {
                return Err(SecAggError::RosterMismatch {
                    round,
                    stage: Stage::Share,
                    client: self.me.clone(),
                    problem: "has no entry",
                });
            }
            Some(mine) if *mine != self.advertise.entry(self.me.clone()) => {
                return Err(SecAggError::RosterMismatch {
                    round,
                    stage: Stage::Share,
                    client: self.me.clone(),
                    problem: "has other keys",
                });
            }
            Some(_) => {}
        }
        let need = usize::from(self.params.threshold) + 1;
        if members.len() < need {
            return Err(SecAggError::TooFewMembers {
                round,
                stage: Stage::Share,
                have: members.len(),
                need,
            });
        }
        let ids: Vec<String> = members.keys().cloned().collect();
        let mut graph = neighbourhoods(graph_seed, &ids, self.params.neighbours);
        let neighbours = graph.remove(&self.me).unwrap_or_default();
        // Only the neighbours' keys are ever used here; checking all 2n would make a device's
        // work grow with the roster (the aggregator checks every key as it arrives).
        for v in &neighbours {
            if let Some(entry) = members.get(v) {
                entry.check_keys(round)?;
            }
        }
        let (_, threshold) = self.params.effective(members.len());
        let mut my_x = BTreeMap::new();
        for v in &neighbours {
            let index = graph
                .get(v)
                .and_then(|nv| nv.iter().position(|w| *w == self.me))
                .unwrap_or(0);
            my_x.insert(v.clone(), share_x(index));
        }
        // threshold <= k' <= 254 (Params::check_shape and the graph's degree).
        let t = u8::try_from(threshold).unwrap_or(u8::MAX);
        let mask_sk_bytes = Zeroizing::new(self.mask_sk.to_bytes());
        let b_shares = crypto::deal(&self.self_mask, t, neighbours.len(), rng);
        let sk_shares = crypto::deal(&mask_sk_bytes, t, neighbours.len(), rng);
        let mut out = Vec::with_capacity(neighbours.len());
        for ((v, b), sk) in neighbours.iter().zip(&b_shares).zip(&sk_shares) {
            let mut plain = Zeroizing::new([0u8; SHARE_PLAINTEXT_LEN]);
            plain[..REVEAL_SHARE_LEN].copy_from_slice(&b[..]);
            plain[REVEAL_SHARE_LEN..].copy_from_slice(&sk[..]);
            let to_pk = members.get(v).map(|e| e.enc_pk).unwrap_or_default();
            let ct = seal_shares(&self.enc_sk, &to_pk, round, &self.me, v, &plain);
            out.push((v.clone(), ct));
        }
        self.state = State::Shared(Shared {
            roster: members,
            neighbours,
            my_x,
            threshold,
        });
        Ok(out)
    }

    /// Stage 3. `received` = the ciphertexts neighbours sent this client (relayed by the
    /// aggregator), `(from, ciphertext)`; `u2` = the clients whose shares the aggregator
    /// accepted; `input` = this client's quantized vector `x_u` ([`crate::quantize`]), every
    /// value below `2^m`.
    ///
    /// Decrypts and checks every share: the sender must be a neighbour in `u2`, sent once, and
    /// the ciphertext must authenticate for (round, sender, me) and hold two shares at this
    /// client's x-coordinate. A bad one is an error naming the sender
    /// ([`SecAggError::BadShareCiphertext`], [`SecAggError::BadShare`]). A share must have come
    /// from every neighbour in `u2` ([`SecAggError::MissingShare`]), this client must be in
    /// `u2`, and at least `t` of its neighbours must be ([`SecAggError::TooFewNeighbours`]).
    ///
    /// Returns `y_u = x_u + PRG(b_u) + Σ_{v ∈ N(u) ∩ u2} ±PRG(s_uv) mod 2^m` (`+` when
    /// `u < v`, `−` when `u > v`, by byte order of the ids). On error nothing changes.
    pub fn masked_input(
        &mut self,
        received: &[(String, Vec<u8>)],
        u2: &[String],
        input: &[u32],
    ) -> Result<Vec<u32>, SecAggError> {
        let round = self.round;
        let stage = Stage::MaskedInput;
        let shared = match &self.state {
            State::Shared(s) => s,
            State::Advertised => {
                return Err(self.out_of_order("masked_input", "shares not dealt yet"));
            }
            State::Masked(..) => {
                return Err(self.out_of_order("masked_input", "masked input already made"));
            }
        };
        let mask = self.params.mask();
        if input.is_empty() {
            return Err(SecAggError::WrongLength {
                round,
                stage,
                client: self.me.clone(),
                what: "input vector",
                got: 0,
                expected: 1,
            });
        }
        if let Some((index, &value)) = input.iter().enumerate().find(|(_, v)| **v & !mask != 0) {
            return Err(SecAggError::OutOfRange {
                round,
                stage,
                client: self.me.clone(),
                index,
                value,
                modulus_bits: self.params.modulus_bits,
            });
        }
        let u2_set = checked_set(round, stage, u2, "u2 (clients whose shares were accepted)")?;
        for c in &u2_set {
            if !shared.roster.contains_key(c) {
                return Err(SecAggError::UnknownClient {
                    round,
                    stage,
                    client: c.clone(),
                });
            }
        }
        if !u2_set.contains(&self.me) {
            return Err(SecAggError::NotInSet {
                round,
                stage,
                client: self.me.clone(),
                set: "in u2 (its shares were not accepted)",
            });
        }
        let live: Vec<&String> = shared
            .neighbours
            .iter()
            .filter(|v| u2_set.contains(*v))
            .collect();
        if live.len() < shared.threshold {
            return Err(SecAggError::TooFewNeighbours {
                round,
                stage,
                client: self.me.clone(),
                have: live.len(),
                need: shared.threshold,
            });
        }
        let mut held = BTreeMap::new();
        for (from, ct) in received {
            let Some(&x) = shared.my_x.get(from) else {
                return Err(SecAggError::BadShare {
                    round,
                    stage,
                    from: from.clone(),
                    of: from.clone(),
                    problem: format!("{from:?} is not a neighbour of {:?}", self.me),
                });
            };
            if !u2_set.contains(from) {
                return Err(SecAggError::BadShare {
                    round,
                    stage,
                    from: from.clone(),
                    of: from.clone(),
                    problem: "the sender is not in u2".to_owned(),
                });
            }
            if held.contains_key(from) {
                return Err(SecAggError::Duplicate {
                    round,
                    stage,
                    client: from.clone(),
                    list: "received shares",
                });
            }
            let from_pk = shared
                .roster
                .get(from)
                .map(|e| e.enc_pk)
                .unwrap_or_default();
            let Some((self_mask, mask_key)) =
                open_shares(&self.enc_sk, &from_pk, round, from, &self.me, ct)
            else {
                return Err(SecAggError::BadShareCiphertext {
                    round,
                    from: from.clone(),
                    to: self.me.clone(),
                });
            };
            if self_mask[0] != x || mask_key[0] != x {
                return Err(SecAggError::BadShare {
                    round,
                    stage,
                    from: from.clone(),
                    of: from.clone(),
                    problem: format!(
                        "x-coordinates {} and {}, expected {x} (my place in its neighbourhood)",
                        self_mask[0], mask_key[0]
                    ),
                });
            }
            held.insert(
                from.clone(),
                Held {
                    self_mask,
                    mask_key,
                },
            );
        }
        if let Some(missing) = live.iter().find(|v| !held.contains_key(**v)) {
            return Err(SecAggError::MissingShare {
                round,
                stage,
                from: (*missing).clone(),
                to: self.me.clone(),
            });
        }
        let mut y = input.to_vec();
        apply_mask(&mut y, &self.self_mask, mask, false);
        for v in &live {
            let v_pk = shared.roster.get(*v).map(|e| e.mask_pk).unwrap_or_default();
            let seed = pairwise_seed(&self.mask_sk, &v_pk, round, &self.me, v);
            apply_mask(&mut y, &seed, mask, self.me.as_str() > v.as_str());
        }
        let masked = Masked {
            u2: u2_set,
            held,
            answered: None,
        };
        self.state = match core::mem::replace(&mut self.state, State::Advertised) {
            State::Shared(shared) => State::Masked(shared, masked),
            other => other, // not reached: the state was checked above
        };
        Ok(y)
    }

    /// Stage 4. `u3` = clients whose masked input the aggregator accepted, `dropped` = `u2 \ u3`
    /// (the aggregator says both).
    ///
    /// Refuses: an id in both lists or twice in one, `u3 ∪ dropped ≠ u2`, this client not in
    /// `u3`, fewer than `t` of its neighbours in `u3`, and a request different from one already
    /// answered (answering two different requests could reveal both secrets of a neighbour; the
    /// same request again gets the same answer).
    ///
    /// For each neighbour v in `u3` reveals its share of `b_v`; for each neighbour v in
    /// `dropped` its share of `mask_sk_v`; never both for one v.
    pub fn unmask(
        &mut self,
        u3: &[String],
        dropped: &[String],
    ) -> Result<Vec<Reveal>, SecAggError> {
        let round = self.round;
        let stage = Stage::Unmask;
        let me = self.me.clone();
        let (shared, masked) = match &mut self.state {
            State::Masked(s, m) => (&*s, m),
            _ => {
                return Err(SecAggError::OutOfOrder {
                    round,
                    who: me,
                    call: "unmask",
                    state: "no masked input made yet",
                });
            }
        };
        let u3_set = checked_set(round, stage, u3, "u3 (survivors)")?;
        let dropped_set = checked_set(round, stage, dropped, "dropped list")?;
        match &masked.answered {
            Some((a3, ad)) if *a3 != u3_set || *ad != dropped_set => {
                return Err(SecAggError::ConflictingUnmask { round, client: me });
            }
            _ => {}
        }
        if let Some(both) = u3_set.intersection(&dropped_set).next() {
            return Err(SecAggError::InconsistentSets {
                round,
                stage,
                client: both.clone(),
                problem: "listed both as a survivor (u3) and as dropped",
            });
        }
        for c in u3_set.iter().chain(&dropped_set) {
            if !masked.u2.contains(c) {
                return Err(SecAggError::InconsistentSets {
                    round,
                    stage,
                    client: c.clone(),
                    problem: "listed in u3 or dropped but not in u2",
                });
            }
        }
        if let Some(c) = masked
            .u2
            .iter()
            .find(|c| !u3_set.contains(*c) && !dropped_set.contains(*c))
        {
            return Err(SecAggError::InconsistentSets {
                round,
                stage,
                client: c.clone(),
                problem: "in u2 but neither in u3 nor dropped",
            });
        }
        if !u3_set.contains(&me) {
            return Err(SecAggError::NotInSet {
                round,
                stage,
                client: me,
                set: "in u3 (its masked input was not accepted)",
            });
        }
        let alive = shared
            .neighbours
            .iter()
            .filter(|v| u3_set.contains(*v))
            .count();
        if alive < shared.threshold {
            return Err(SecAggError::TooFewNeighbours {
                round,
                stage,
                client: me,
                have: alive,
                need: shared.threshold,
            });
        }
        let mut out = Vec::new();
        for (v, held) in &masked.held {
            if u3_set.contains(v) {
                out.push(Reveal {
                    of: v.clone(),
                    kind: RevealKind::SelfMask,
                    share: held.self_mask.to_vec(),
                });
            } else if dropped_set.contains(v) {
                out.push(Reveal {
                    of: v.clone(),
                    kind: RevealKind::MaskKey,
                    share: held.mask_key.to_vec(),
                });
            }
        }
        masked.answered = Some((u3_set, dropped_set));
        Ok(out)
    }
}

/// The x-coordinate of the share dealt to the neighbour at `index` in the sorted neighbourhood.
pub(crate) fn share_x(index: usize) -> u8 {
    u8::try_from(index + 1).unwrap_or(u8::MAX)
}

/// A list of ids as a set, refusing duplicates.
pub(crate) fn checked_set(
    round: u32,
    stage: Stage,
    ids: &[String],
    list: &'static str,
) -> Result<BTreeSet<String>, SecAggError> {
    let mut set = BTreeSet::new();
    for id in ids {
        if !set.insert(id.clone()) {
            return Err(SecAggError::Duplicate {
                round,
                stage,
                client: id.clone(),
                list,
            });
        }
    }
    Ok(set)
}
