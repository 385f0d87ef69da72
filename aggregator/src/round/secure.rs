//! Secure rounds (SecAgg+): the round machine's side of `fedpeft-secagg`.
//!
//! A secure round opens like a plain one (sample, publish the global, announce) but with a
//! [`SecureRoundAnnounce`]; sampled clients train, then go through four stages, each closed
//! when every client still expected has answered or at its deadline:
//!
//! ```text
//! keys    (deadline: the round timeout, which covers training)  → roster on `secagg`
//! shares  (stage timeout)                                       → one relay per client, `inbox/{c}`
//! masked  (stage timeout)                                       → unmask request on `secagg`
//! reveal  (stage timeout)                                       → the sum, unmasked → strategy
//! ```
//!
//! The machine never holds an individual update: masked vectors are added into the running sum
//! as they arrive (memory O(model)), and the unmasked sum is dequantized into one weighted
//! mean delta that the strategy folds like a single update. The protocol's secrets and the
//! running sum are not checkpointed: an aggregator restarted during a secure round records
//! that round as failed and opens the next, so no partial unmasking is ever reused.

use std::collections::{BTreeMap, BTreeSet};

use fedpeft_peft::NamedTensor;
use fedpeft_protocol::{
    ClientId, PeerBytes, RevealKind, RosterEntry, SecAggDp, SecAggKeys, SecAggMasked, SecAggRelay,
    SecAggReveal, SecAggRoster, SecAggSetup, SecAggShares, SecAggUnmask, TrainMetrics,
};
use fedpeft_secagg as sa;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::{Action, NOISE_HEADROOM_SIGMAS, Phase, RejectReason, RoundMachine, SecureDp, Sender};
use crate::outbox::Outgoing;
pub use fedpeft_config::report::SecureRecord;

/// A secure-aggregation message from a client, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Uplink {
    Keys(SecAggKeys),
    Shares(SecAggShares),
    Masked(SecAggMasked),
    Reveal(SecAggReveal),
}

impl Uplink {
    fn client(&self) -> &ClientId {
        match self {
            Uplink::Keys(m) => &m.client,
            Uplink::Shares(m) => &m.client,
            Uplink::Masked(m) => &m.client,
            Uplink::Reveal(m) => &m.client,
        }
    }

    fn round(&self) -> u32 {
        match self {
            Uplink::Keys(m) => m.round,
            Uplink::Shares(m) => m.round,
            Uplink::Masked(m) => m.round,
            Uplink::Reveal(m) => m.round,
        }
    }

    fn stage(&self) -> Stage {
        match self {
            Uplink::Keys(_) => Stage::Keys,
            Uplink::Shares(_) => Stage::Shares,
            Uplink::Masked(_) => Stage::Masked,
            Uplink::Reveal(_) => Stage::Reveal,
        }
    }
}

/// The stage a secure round is in: what it waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Keys = 0,
    Shares = 1,
    Masked = 2,
    Reveal = 3,
}

impl Stage {
    fn as_str(self) -> &'static str {
        match self {
            Stage::Keys => "keys",
            Stage::Shares => "shares",
            Stage::Masked => "masked input",
            Stage::Reveal => "unmasking",
        }
    }
}

/// The open secure round's protocol state (never checkpointed).
#[derive(Debug)]
pub struct Live {
    pub round: u32,
    params: sa::Params,
    setup: SecAggSetup,
    pub stage: Stage,
    stage_started: u64,
    pub deadline_unix_ms: u64,
    keys: BTreeMap<String, sa::RosterEntry>,
    server: Option<sa::ServerRound>,
    /// Stage 2's survivors and stage 3's, as closed.
    u2: BTreeSet<String>,
    u3: BTreeSet<String>,
    /// Accepted masked inputs: (sequence, examples, metrics).
    masked: BTreeMap<String, (u32, u64, TrainMetrics)>,
    revealed: BTreeSet<String>,
    /// The stage's messages, published again after a reconnect.
    republish: Vec<(Outgoing, Vec<String>)>,
    pub record: SecureRecord,
}

impl Live {
    /// The clients the current stage still waits for.
    fn expected(&self, sampled: &BTreeSet<String>) -> BTreeSet<String> {
        match self.stage {
            Stage::Keys => sampled.clone(),
            Stage::Shares => self.keys.keys().cloned().collect(),
            Stage::Masked => self.u2.clone(),
            Stage::Reveal => self.u3.clone(),
        }
    }

    fn answered(&self, client: &str) -> bool {
        match self.stage {
            Stage::Keys => self.keys.contains_key(client),
            Stage::Shares => self.record.shared.iter().any(|c| c == client),
            Stage::Masked => self.masked.contains_key(client),
            Stage::Reveal => self.revealed.contains(client),
        }
    }
}

/// 32 bytes of the run's seed and the round: the neighbour graph's seed. Public (the roster
/// carries it); derived so that a run replays.
fn graph_seed(seed: u64, round: u32) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"fedpeft-secagg-v1 graph");
    h.update(seed.to_le_bytes());
    h.update(round.to_le_bytes());
    h.finalize().into()
}

fn ids(names: impl IntoIterator<Item = impl AsRef<str>>) -> Vec<ClientId> {
    names
        .into_iter()
        .filter_map(|n| ClientId::new(n.as_ref()).ok())
        .collect()
}

impl RoundMachine {
    /// The live state for a secure round sampling `sampled`, or the reason the round cannot run.
    pub(super) fn secure_open(
        &self,
        round: u32,
        sampled: &BTreeSet<String>,
        now: u64,
        deadline: u64,
    ) -> Result<Live, String> {
        let settings = self
            .rules
            .secure
            .as_ref()
            .ok_or("secure aggregation is not configured")?;
        let n = sampled.len();
        let mut params = settings.params(n);
        params.check(n).map_err(|e| e.to_string())?;
        let (reference_examples, dp) = match &settings.dp {
            None => {
                let examples = sampled
                    .iter()
                    .map(|c| self.s.clients.get(c).map_or(0, |i| i.num_examples))
                    .sum::<u64>()
                    .max(1);
                (examples, None)
            }
            Some(dp) => {
                let (reference, device) = self.distributed_dp(dp, &mut params, n, round)?;
                (reference, Some(device))
            }
        };
        let setup = SecAggSetup {
            neighbours: params.neighbours,
            threshold: params.threshold,
            modulus_bits: params.modulus_bits,
            clip: params.clip,
            norm_bound: self.rules.max_update_norm.unwrap_or(0.0) as f32,
            reference_examples,
            max_clients: n as u32,
            dp,
        };
        Ok(Live {
            round,
            params,
            setup,
            stage: Stage::Keys,
            stage_started: now,
            deadline_unix_ms: deadline,
            keys: BTreeMap::new(),
            server: None,
            u2: BTreeSet::new(),
            u3: BTreeSet::new(),
            masked: BTreeMap::new(),
            revealed: BTreeSet::new(),
            republish: Vec::new(),
            record: SecureRecord {
                neighbours: params.neighbours,
                threshold: params.threshold,
                modulus_bits: params.modulus_bits,
                ..SecureRecord::default()
            },
        })
    }

    /// Distributed DP for a round of `n` sampled clients: every client weighs `1 / reference`
    /// (reference = max(W, n), so the weights add up to at most 1), each device adds discrete
    /// Gaussian noise of standard deviation `σ·S / (reference·√min_contributions)`, so a sum
    /// of at least `min_contributions` inputs carries at least `σ·S / reference` — `σ·S / W`
    /// once [`RoundMachine::secure_finish`] scales it by `reference / W`. `params.clip` becomes
    /// the quantization range: the clipped values plus [`NOISE_HEADROOM_SIGMAS`] standard
    /// deviations of the noise of a sum of all `n`.
    fn distributed_dp(
        &self,
        dp: &SecureDp,
        params: &mut sa::Params,
        n: usize,
        round: u32,
    ) -> Result<(u64, SecAggDp), String> {
        if n < dp.min_contributions {
            return Err(format!(
                "{n} clients sampled, fewer than the {} contributions the devices' DP noise is \
                 calibrated for (dp.min_contributions)",
                dp.min_contributions
            ));
        }
        let reference = dp.expected_clients.max(n);
        let value_clip = f64::from(params.clip);
        let per_device = dp.noise_multiplier * dp.clip_norm
            / (reference as f64 * (dp.min_contributions as f64).sqrt());
        let range = value_clip + NOISE_HEADROOM_SIGMAS * per_device * (n as f64).sqrt();
        params.clip = range as f32;
        params
            .check(n)
            .map_err(|e| format!("the quantization range for the DP noise: {e}"))?;
        let step = params.step(n);
        // The largest rounding error of one contribution, in the update's units: each value
        // moves by less than one step of the scaled (÷ reference) vector.
        let d = self
            .s
            .global
            .tensors
            .iter()
            .map(|t| t.values.len())
            .sum::<usize>();
        let rounding = reference as f64 * step * (d as f64).sqrt();
        if rounding > dp.clip_norm / 2.0 {
            return Err(format!(
                "modulus_bits {} is too coarse for distributed DP: rounding {d} values can move \
                 a contribution by {rounding:.3}, more than half of dp.clip_norm {}; raise \
                 secure_aggregation.modulus_bits",
                params.modulus_bits, dp.clip_norm
            ));
        }
        let device = SecAggDp {
            clip_norm: dp.clip_norm as f32,
            value_clip: value_clip as f32,
            noise_steps: per_device / step,
        };
        info!(
            round,
            reference,
            min_contributions = dp.min_contributions,
            noise_std_per_device = per_device,
            noise_steps = device.noise_steps,
            range,
            device_norm_bound = dp.clip_norm - rounding,
            "distributed DP: the devices add the noise"
        );
        Ok((reference as u64, device))
    }

    pub(super) fn secure_setup(&self) -> Option<SecAggSetup> {
        self.live.as_ref().map(|l| l.setup)
    }

    /// Publishes the current stage's messages again (after a broker reconnect).
    pub(super) fn secure_republish(&mut self, out: &mut Vec<Action>) {
        let Some(live) = &self.live else { return };
        let round = live.round;
        for (message, receivers) in live.republish.clone() {
            out.push(Action::Publish {
                message,
                round,
                receivers,
            });
        }
    }

    /// One secure-aggregation message.
    pub(super) fn on_secure(
        &mut self,
        sender: Sender,
        message: Uplink,
        wire_bytes: u64,
        now: u64,
        out: &mut Vec<Action>,
    ) {
        let client = sender.client.as_str().to_string();
        let round = message.round();
        if let Err((reason, detail)) = self.secure_admit(&sender, &message, wire_bytes) {
            self.reject(&sender, round, reason, &detail, now, out);
            return;
        }
        let Some(live) = self.live.as_mut() else {
            return;
        };
        let result: Result<(), String> = match message {
            Uplink::Keys(k) => {
                let entry = sa::RosterEntry {
                    client: client.clone(),
                    enc_pk: k.enc_pk,
                    mask_pk: k.mask_pk,
                    self_mask_commitment: k.commitment,
                };
                // A weak (small-order) key is refused here, alone: in the roster it would
                // make the whole round fail.
                entry
                    .check_keys(round)
                    .map_err(|e| e.to_string())
                    .map(|()| {
                        live.keys.insert(client.clone(), entry);
                        live.record.advertised.push(client.clone());
                    })
            }
            Uplink::Shares(s) => {
                let shares = s
                    .shares
                    .into_iter()
                    .map(|p| (p.peer.as_str().to_string(), p.bytes))
                    .collect();
                match live.server.as_mut() {
                    Some(server) => server
                        .accept_shares(&client, shares)
                        .map(|()| live.record.shared.push(client.clone()))
                        .map_err(|e| e.to_string()),
                    None => Err("no roster yet".into()),
                }
            }
            Uplink::Masked(m) => {
                let bits = live.params.modulus_bits;
                match live.server.as_mut() {
                    Some(server) => sa::unpack(&m.values, bits, m.len as usize)
                        .map_err(|e| e.to_string())
                        .and_then(|v| server.accept_masked(&client, &v).map_err(|e| e.to_string()))
                        .map(|()| {
                            live.masked
                                .insert(client.clone(), (m.sequence, m.num_examples, m.metrics));
                            live.record.masked.push(client.clone());
                            self.s
                                .accepted_updates
                                .insert((client.clone(), round, m.sequence));
                            if let Some(info) = self.s.clients.get_mut(&client) {
                                info.last_sequence = Some(m.sequence);
                            }
                        }),
                    None => Err("no relay yet".into()),
                }
            }
            Uplink::Reveal(r) => {
                let reveals = r
                    .shares
                    .into_iter()
                    .map(|s| sa::Reveal {
                        of: s.peer.as_str().to_string(),
                        kind: match s.kind {
                            RevealKind::SelfMask => sa::RevealKind::SelfMask,
                            RevealKind::MaskKey => sa::RevealKind::MaskKey,
                        },
                        share: s.share,
                    })
                    .collect();
                match live.server.as_mut() {
                    Some(server) => server
                        .accept_reveals(&client, reveals)
                        .map(|()| {
                            live.revealed.insert(client.clone());
                            live.record.revealed.push(client.clone());
                        })
                        .map_err(|e| e.to_string()),
                    None => Err("no unmask request yet".into()),
                }
            }
        };
        match result {
            Ok(()) => {
                info!(client = %client, round, wire_bytes, "secure aggregation: message accepted");
                self.secure_progress(now, out);
            }
            Err(detail) => self.reject(&sender, round, RejectReason::SecAgg, &detail, now, out),
        }
    }

    /// Who may send this message now.
    fn secure_admit(
        &self,
        sender: &Sender,
        message: &Uplink,
        wire_bytes: u64,
    ) -> Result<(), (RejectReason, String)> {
        let client = sender.client.as_str();
        if wire_bytes > self.rules.max_update_bytes {
            return Err((
                RejectReason::Oversized,
                format!(
                    "{wire_bytes} bytes on the wire, limit {}",
                    self.rules.max_update_bytes
                ),
            ));
        }
        if message.client() != &sender.client {
            return Err((
                RejectReason::ClientMismatch,
                format!("body names client `{}`", message.client()),
            ));
        }
        if !self.s.clients.contains_key(client) {
            return Err((RejectReason::UnknownClient, "never joined".into()));
        }
        let Phase::Collecting(open) = &self.s.phase else {
            return Err((RejectReason::Late, "no round is open".into()));
        };
        let round = message.round();
        if round < open.round {
            return Err((RejectReason::Late, format!("round {round} is closed")));
        }
        if round > open.round {
            return Err((
                RejectReason::FutureRound,
                format!("round {round}, the open round is {}", open.round),
            ));
        }
        let Some(live) = &self.live else {
            return Err((
                RejectReason::SecAgg,
                "the open round is not a secure round".into(),
            ));
        };
        if !open.sampled.contains(client) {
            return Err((
                RejectReason::NotSampled,
                format!("not sampled in round {round}"),
            ));
        }
        let stage = message.stage();
        if stage != live.stage {
            return Err((
                RejectReason::SecAgg,
                format!(
                    "a {} message while the round is at the {} stage",
                    stage.as_str(),
                    live.stage.as_str()
                ),
            ));
        }
        if !live.expected(&open.sampled).contains(client) {
            return Err((
                RejectReason::SecAgg,
                format!("not taking part in the {} stage", stage.as_str()),
            ));
        }
        if live.answered(client) {
            return Err((
                RejectReason::Duplicate,
                format!("{} already accepted (replay or redelivery)", stage.as_str()),
            ));
        }
        if let Uplink::Masked(m) = message {
            if let Some(last) = self.s.clients[client].last_sequence
                && m.sequence <= last
            {
                return Err((
                    RejectReason::Stale,
                    format!("sequence {} after {last}", m.sequence),
                ));
            }
            let d = 1 + self
                .s
                .global
                .tensors
                .iter()
                .map(|t| t.values.len())
                .sum::<usize>();
            if m.len as usize != d {
                return Err((
                    RejectReason::WrongShape,
                    format!("{} values, the adapter needs 1 + {}", m.len, d - 1),
                ));
            }
        }
        Ok(())
    }

    /// Closes the stage when nobody it waits for is left (answered or failed).
    pub(super) fn secure_progress(&mut self, now: u64, out: &mut Vec<Action>) {
        let (Some(live), Phase::Collecting(open)) = (&self.live, &self.s.phase) else {
            return;
        };
        let waiting = live
            .expected(&open.sampled)
            .into_iter()
            .any(|c| !live.answered(&c) && !open.failed.contains_key(&c));
        if !waiting {
            self.secure_advance(now, out);
        }
    }

    /// The stage deadline passed.
    pub(super) fn secure_deadline(&mut self, now: u64, out: &mut Vec<Action>) {
        if let Some(live) = &self.live
            && now >= live.deadline_unix_ms
        {
            warn!(
                round = live.round,
                stage = live.stage.as_str(),
                "secure aggregation: stage deadline"
            );
            self.secure_advance(now, out);
        }
    }

    /// Ends the current stage and opens the next (or finishes, or fails the round).
    fn secure_advance(&mut self, now: u64, out: &mut Vec<Action>) {
        let timeout = self
            .rules
            .secure
            .as_ref()
            .map_or(30_000, |s| s.stage_timeout_ms);
        let Some(mut live) = self.live.take() else {
            return;
        };
        let round = live.round;
        live.record.stage_ms[live.stage as usize] = now.saturating_sub(live.stage_started);
        live.stage_started = now;
        live.deadline_unix_ms = now + timeout;
        let step = match live.stage {
            Stage::Keys => self.secure_open_shares(&mut live),
            Stage::Shares => self.secure_open_masked(&mut live),
            Stage::Masked => self.secure_open_reveal(&mut live),
            Stage::Reveal => {
                let result = self.secure_finish(&mut live, out);
                self.live = Some(live);
                match result {
                    Ok(()) => self.close_round(now, out),
                    Err(why) => self.secure_fail(why, now, out),
                }
                return;
            }
        };
        match step {
            Ok(messages) => {
                info!(
                    round,
                    stage = live.stage.as_str(),
                    "secure aggregation: stage opened"
                );
                live.republish = messages.clone();
                self.live = Some(live);
                for (message, receivers) in messages {
                    out.push(Action::Publish {
                        message,
                        round,
                        receivers,
                    });
                }
                // A stage nobody has to answer (everyone failed) closes at once.
                self.secure_progress(now, out);
            }
            Err(why) => {
                self.live = Some(live);
                self.secure_fail(why, now, out);
            }
        }
    }

    fn secure_open_shares(&self, live: &mut Live) -> Result<Vec<(Outgoing, Vec<String>)>, String> {
        let t = usize::from(live.params.threshold);
        if live.keys.len() < t + 1 {
            return Err(format!(
                "{} clients advertised keys, a secure round needs at least threshold + 1 = {}",
                live.keys.len(),
                t + 1
            ));
        }
        let seed = graph_seed(self.rules.seed, live.round);
        let entries: Vec<sa::RosterEntry> = live.keys.values().cloned().collect();
        let d = self
            .s
            .global
            .tensors
            .iter()
            .map(|t| t.values.len())
            .sum::<usize>();
        let server = sa::ServerRound::new(
            live.params,
            live.round,
            live.setup.max_clients as usize,
            1 + d,
            seed,
            entries.clone(),
        )
        .map_err(|e| e.to_string())?;
        live.server = Some(server);
        live.stage = Stage::Shares;
        let roster = SecAggRoster {
            round: live.round,
            deadline_unix_ms: live.deadline_unix_ms,
            graph_seed: seed,
            entries: entries
                .iter()
                .filter_map(|e| {
                    Some(RosterEntry {
                        client: ClientId::new(&e.client).ok()?,
                        enc_pk: e.enc_pk,
                        mask_pk: e.mask_pk,
                        commitment: e.self_mask_commitment,
                    })
                })
                .collect(),
        };
        Ok(vec![(Outgoing::Roster(roster), self.available())])
    }

    fn secure_open_masked(&self, live: &mut Live) -> Result<Vec<(Outgoing, Vec<String>)>, String> {
        let server = live.server.as_mut().ok_or("no roster")?;
        let relay = server.close_sharing().map_err(|f| f.to_string())?;
        live.u2 = relay.u2.iter().cloned().collect();
        live.stage = Stage::Masked;
        let survivors = ids(&relay.u2);
        let mut messages = Vec::new();
        for (to, shares) in relay.inbox {
            let Ok(id) = ClientId::new(&to) else { continue };
            let relay = SecAggRelay {
                round: live.round,
                deadline_unix_ms: live.deadline_unix_ms,
                survivors: survivors.clone(),
                shares: shares
                    .into_iter()
                    .filter_map(|(from, bytes)| {
                        Some(PeerBytes {
                            peer: ClientId::new(&from).ok()?,
                            bytes,
                        })
                    })
                    .collect(),
            };
            messages.push((Outgoing::Relay { to: id, relay }, vec![to]));
        }
        Ok(messages)
    }

    fn secure_open_reveal(&self, live: &mut Live) -> Result<Vec<(Outgoing, Vec<String>)>, String> {
        let server = live.server.as_mut().ok_or("no roster")?;
        let request = server.close_masking().map_err(|f| f.to_string())?;
        live.u3 = request.u3.iter().cloned().collect();
        live.stage = Stage::Reveal;
        let unmask = SecAggUnmask {
            round: live.round,
            deadline_unix_ms: live.deadline_unix_ms,
            survivors: ids(&request.u3),
            dropped: ids(&request.dropped),
        };
        Ok(vec![(Outgoing::Unmask(unmask), self.available())])
    }

    /// Unmasks the sum and folds the weighted mean delta into the round's accumulator.
    fn secure_finish(&mut self, live: &mut Live, out: &mut Vec<Action>) -> Result<(), String> {
        let server = live.server.take().ok_or("no roster")?;
        if !server.can_finish() {
            return Err("too few shares revealed to unmask the sum".into());
        }
        let unmasked = server.finish().map_err(|f| f.to_string())?;
        live.record.bad_shares = unmasked.bad_shares.clone();
        out.push(Action::SecureSum {
            round: live.round,
            sum: unmasked.sum.clone(),
        });
        let n = live.setup.max_clients as usize;
        let (weight_sum, values) = sa::dequantize(&live.params, n, &unmasked.sum);
        let total: u64 = live
            .u3
            .iter()
            .map(|c| live.masked.get(c).map_or(0, |m| m.1))
            .sum();
        let modulus_mask = if live.params.modulus_bits >= 64 {
            u64::MAX
        } else {
            (1u64 << live.params.modulus_bits) - 1
        };
        let dp = self.rules.secure.as_ref().and_then(|s| s.dp);
        // Under distributed DP every device puts 1 in the weight slot.
        let expected_weight = if dp.is_some() {
            live.u3.len() as u64
        } else {
            total
        };
        if weight_sum != expected_weight & modulus_mask {
            return Err(format!(
                "the masked weights sum to {weight_sum}, expected {expected_weight} ({}, mod \
                 2^{})",
                if dp.is_some() {
                    "one per surviving client"
                } else {
                    "the examples the survivors state"
                },
                live.params.modulus_bits
            ));
        }
        if total == 0 {
            return Err("the survivors state no examples".into());
        }
        let scale = match dp {
            // values = Σ v_u / reference + noise; the DP average is Σ v_u / W + noise.
            Some(dp) => {
                if live.u3.len() < dp.min_contributions {
                    return Err(format!(
                        "{} masked inputs, fewer than the {} the devices' DP noise is \
                         calibrated for",
                        live.u3.len(),
                        dp.min_contributions
                    ));
                }
                live.setup.reference_examples as f64 / dp.expected_clients as f64
            }
            // values = Σ (n_u / reference) · v_u; the weighted mean divides by Σ n_u / reference.
            None => live.setup.reference_examples as f64 / total as f64,
        };
        let mut flat = values.into_iter().map(|v| (v * scale) as f32);
        let delta: Vec<NamedTensor> = self
            .s
            .global
            .tensors
            .iter()
            .map(|t| NamedTensor {
                name: t.name.clone(),
                shape: t.shape.clone(),
                values: flat.by_ref().take(t.values.len()).collect(),
            })
            .collect();
        let Phase::Collecting(open) = &mut self.s.phase else {
            return Err("no open round".into());
        };
        if !open.acc.fold(1, &delta) {
            return Err("the accumulator refused the sum".into());
        }
        for c in &live.u3 {
            let Some(&(sequence, examples, metrics)) = live.masked.get(c) else {
                continue;
            };
            open.accepted.insert(c.clone(), (sequence, examples));
            open.failed.remove(c);
            let w = examples as f64;
            if metrics.loss.is_finite() && metrics.accuracy.is_finite() {
                open.train_loss_sum += w * f64::from(metrics.loss);
                open.train_acc_sum += w * f64::from(metrics.accuracy);
                open.train_weight += w;
            }
            if let Some(eps) = metrics.epsilon.map(f64::from)
                && eps.is_finite()
                && eps >= 0.0
            {
                open.local_dp_epsilon.insert(c.clone(), eps);
            }
        }
        info!(round = live.round, survivors = live.u3.len(), examples = total,
              bad_shares = ?live.record.bad_shares, "secure aggregation: sum unmasked");
        Ok(())
    }

    /// The secure round cannot complete: it closes failed, naming why.
    fn secure_fail(&mut self, why: String, now: u64, out: &mut Vec<Action>) {
        if let Some(live) = self.live.as_mut() {
            warn!(round = live.round, stage = live.stage.as_str(), reason = %why,
                  "secure aggregation failed; global adapter unchanged");
            live.record.failure = Some(format!("{} stage: {why}", live.stage.as_str()));
            live.server = None;
        }
        if let Phase::Collecting(open) = &mut self.s.phase {
            // Nothing of this round is aggregated.
            open.accepted.clear();
        }
        self.close_round(now, out);
    }
}
