//! The device's side of a secure-aggregation (SecAgg+) round: `fedpeft-secagg` driven by the
//! session's [`SecureStep`]s.
//!
//! When training of a secure round ends, the update (`local − global`, ordered as the global
//! adapter's tensors) is bounded to the announced norm, clipped, scaled by the client's share of
//! the round's examples and quantized into Z_{2^m} with the example count in front; the client
//! then advertises fresh X25519 keys. The aggregator's roster, relay and unmask request each
//! get one answer: encrypted Shamir shares for the neighbours, the masked vector, the shares
//! it is asked to reveal. Nothing of the update leaves the device unmasked. A new round, or an
//! error, ends the round's state (its secrets are zeroized on drop).

use std::str::FromStr;

use fedpeft_protocol::{
    ClientId, Message, PeerBytes, RevealKind, RevealedShare, SecAggKeys, SecAggMasked,
    SecAggReveal, SecAggSetup, SecAggShares, TrainMetrics,
};
use fedpeft_secagg as sa;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::session::{SecureDown, SecureStep};
use crate::types::{GlobalAdapter, Round, TrainedUpdate};

/// Emulated mid-protocol dropout (`[faults] secagg_drop_after`): silent after `stage`
/// (answers sent: 0 keys, 1 shares, 2 masked input), in every secure round or in `round` only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropAfter {
    pub stage: u8,
    pub round: Option<Round>,
}

impl FromStr for DropAfter {
    type Err = String;
    /// `keys`, `shares` or `masked`, optionally `@ROUND`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (stage, round) = match s.split_once('@') {
            Some((stage, round)) => (
                stage,
                Some(
                    round
                        .parse::<Round>()
                        .map_err(|_| format!("`{round}` is not a round number"))?,
                ),
            ),
            None => (s, None),
        };
        let stage = match stage {
            "keys" => 0,
            "shares" => 1,
            "masked" => 2,
            other => {
                return Err(format!(
                    "`{other}` is not one of keys, shares, masked (optionally @ROUND)"
                ));
            }
        };
        Ok(DropAfter { stage, round })
    }
}

/// One secure round in progress.
#[derive(Debug)]
struct RoundState {
    round: Round,
    sequence: u32,
    params: sa::Params,
    client: sa::ClientRound,
    /// The quantized input, `[num_examples, q(Δ)…]`.
    input: Vec<u32>,
    num_examples: u64,
    metrics: TrainMetrics,
    /// Stages answered so far (0 = keys sent).
    answered: u8,
}

/// The secure rounds of one client.
#[derive(Debug)]
pub struct SecureClient {
    me: ClientId,
    drop_after: Option<DropAfter>,
    rng: StdRng,
    state: Option<RoundState>,
}

/// Why a step of a secure round failed (logged; the round goes on without this client).
pub type SecureError = String;

impl SecureClient {
    pub fn new(me: ClientId, drop_after: Option<DropAfter>) -> Result<SecureClient, SecureError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| format!("no OS randomness: {e}"))?;
        Ok(SecureClient {
            me,
            drop_after,
            rng: StdRng::from_seed(seed),
            state: None,
        })
    }

    /// The message to send for `step`, if any.
    pub fn step(&mut self, step: SecureStep) -> Result<Option<Message>, SecureError> {
        match step {
            SecureStep::Start {
                round,
                sequence,
                update,
                adapter,
                setup,
            } => self
                .start(round, sequence, &update, &adapter, setup)
                .map(Some),
            SecureStep::Stage(down) => self.stage(down),
        }
    }

    fn start(
        &mut self,
        round: Round,
        sequence: u32,
        update: &TrainedUpdate,
        adapter: &GlobalAdapter,
        setup: SecAggSetup,
    ) -> Result<Message, SecureError> {
        self.state = None;
        let params = sa::Params {
            neighbours: setup.neighbours,
            threshold: setup.threshold,
            modulus_bits: setup.modulus_bits,
            clip: setup.clip,
        };
        let max_clients = setup.max_clients as usize;
        params
            .check(max_clients)
            .map_err(|e| format!("round {round}: the announced parameters: {e}"))?;
        let mut values = flatten(update, adapter)?;
        // Distributed DP: the bound leaves room for the rounding, so the rounded contribution
        // stays within S (see `fedpeft_protocol::SecAggDp`).
        let norm_bound = match setup.dp {
            Some(dp) => {
                let rounding = setup.reference_examples as f64
                    * params.step(max_clients)
                    * (values.len() as f64).sqrt();
                let bound = f64::from(dp.clip_norm) - rounding;
                if bound.is_nan() || bound <= 0.0 {
                    return Err(format!(
                        "round {round}: the announced DP clip norm {} is below the rounding \
                         error {rounding}",
                        dp.clip_norm
                    ));
                }
                Some(bound)
            }
            None => (setup.norm_bound > 0.0).then_some(f64::from(setup.norm_bound)),
        };
        if let Some(bound) = norm_bound {
            let norm = values
                .iter()
                .map(|v| f64::from(*v).powi(2))
                .sum::<f64>()
                .sqrt();
            if norm > bound {
                let scale = (bound / norm) as f32;
                values.iter_mut().for_each(|v| *v *= scale);
                tracing::info!(round, norm, bound, "update norm bounded on the device");
            }
        }
        let m = &update.metrics;
        // Under distributed DP every client weighs the same.
        let (examples, value_clip) = match setup.dp {
            Some(dp) => (1, dp.value_clip),
            None => (m.num_examples, setup.clip),
        };
        values
            .iter_mut()
            .for_each(|v| *v = v.clamp(-value_clip, value_clip));
        let mut input = sa::quantize(
            &params,
            max_clients,
            &values,
            examples,
            setup.reference_examples,
            &mut self.rng,
        )
        .map_err(|e| format!("round {round}: quantizing the update: {e}"))?;
        let dump = std::env::var_os("FEDPEFT_SECAGG_DUMP_DIR");
        if let Some(dp) = setup.dp {
            if let Some(dir) = &dump {
                // Audits and tests only: the input before the device's noise.
                dump_u32s(dir, &format!("{}-r{round}.clean", self.me), &input);
            }
            sa::add_discrete_gaussian(
                &mut input[1..],
                dp.noise_steps,
                params.modulus_bits,
                &mut self.rng,
            );
            tracing::info!(
                round,
                noise_steps = dp.noise_steps,
                "distributed DP: noise added on the device"
            );
        }
        if let Some(dir) = &dump {
            // Audits and tests only: the device's own quantized input, never sent.
            dump_u32s(dir, &format!("{}-r{round}.input", self.me), &input);
        }
        let (client, advertise) =
            sa::ClientRound::new(params, round, self.me.as_str(), &mut self.rng);
        self.state = Some(RoundState {
            round,
            sequence,
            params,
            client,
            input,
            num_examples: m.num_examples,
            metrics: crate::wire::metrics_to_wire(m),
            answered: 0,
        });
        tracing::info!(
            round,
            values = values.len(),
            bits = params.modulus_bits,
            "secure round: keys advertised"
        );
        Ok(Message::SecAggKeys(SecAggKeys {
            client: self.me.clone(),
            round,
            enc_pk: advertise.enc_pk,
            mask_pk: advertise.mask_pk,
            commitment: advertise.self_mask_commitment,
        }))
    }

    /// Whether the emulated dropout silences this client at answer `next` of `round`.
    fn silent(&self, round: Round, next: u8) -> bool {
        self.drop_after
            .is_some_and(|d| d.round.is_none_or(|r| r == round) && next > d.stage)
    }

    fn stage(&mut self, down: SecureDown) -> Result<Option<Message>, SecureError> {
        let round = down.round();
        let Some(state) = self.state.as_mut().filter(|s| s.round == round) else {
            tracing::debug!(
                round,
                "secure-aggregation message for a round this client is not in"
            );
            return Ok(None);
        };
        let expected = match &down {
            SecureDown::Roster(_) => 1,
            SecureDown::Relay(_) => 2,
            SecureDown::Unmask(_) => 3,
        };
        if state.answered >= expected {
            // A retained copy delivered again (after a reconnect): already answered.
            return Ok(None);
        }
        let me = self.me.clone();
        let answered = state.answered;
        if self.silent(round, expected) {
            if answered + 1 == expected {
                tracing::warn!(
                    round,
                    stage = expected,
                    "emulated secure-aggregation dropout: not answering"
                );
            }
            return Ok(None);
        }
        let state = self.state.as_mut().expect("checked above");
        let message = match down {
            SecureDown::Roster(r) => {
                let roster: Vec<sa::RosterEntry> = r
                    .entries
                    .iter()
                    .map(|e| sa::RosterEntry {
                        client: e.client.as_str().to_string(),
                        enc_pk: e.enc_pk,
                        mask_pk: e.mask_pk,
                        self_mask_commitment: e.commitment,
                    })
                    .collect();
                let shares = state
                    .client
                    .share(&roster, &r.graph_seed, &mut self.rng)
                    .map_err(|e| format!("round {round}: dealing shares: {e}"))?;
                Message::SecAggShares(SecAggShares {
                    client: me,
                    round,
                    shares: peers(shares)?,
                })
            }
            SecureDown::Relay(r) => {
                let received: Vec<(String, Vec<u8>)> = r
                    .shares
                    .into_iter()
                    .map(|p| (p.peer.as_str().to_string(), p.bytes))
                    .collect();
                let u2: Vec<String> = r.survivors.iter().map(|c| c.as_str().to_string()).collect();
                let masked = state
                    .client
                    .masked_input(&received, &u2, &state.input)
                    .map_err(|e| format!("round {round}: masking: {e}"))?;
                Message::SecAggMasked(SecAggMasked {
                    client: me,
                    round,
                    sequence: state.sequence,
                    num_examples: state.num_examples,
                    metrics: state.metrics,
                    len: masked.len() as u32,
                    values: sa::pack(&masked, state.params.modulus_bits),
                })
            }
            SecureDown::Unmask(u) => {
                let u3: Vec<String> = u.survivors.iter().map(|c| c.as_str().to_string()).collect();
                let dropped: Vec<String> =
                    u.dropped.iter().map(|c| c.as_str().to_string()).collect();
                let reveals = state
                    .client
                    .unmask(&u3, &dropped)
                    .map_err(|e| format!("round {round}: unmasking: {e}"))?;
                let shares = reveals
                    .into_iter()
                    .map(|r| {
                        Ok(RevealedShare {
                            peer: ClientId::new(&r.of)
                                .map_err(|e| format!("peer `{}`: {e}", r.of))?,
                            kind: match r.kind {
                                sa::RevealKind::SelfMask => RevealKind::SelfMask,
                                sa::RevealKind::MaskKey => RevealKind::MaskKey,
                            },
                            share: r.share,
                        })
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                Message::SecAggReveal(SecAggReveal {
                    client: me,
                    round,
                    shares,
                })
            }
        };
        state.answered = expected;
        tracing::info!(round, stage = expected, "secure round: stage answered");
        Ok(Some(message))
    }
}

fn peers(items: Vec<(String, Vec<u8>)>) -> Result<Vec<PeerBytes>, SecureError> {
    items
        .into_iter()
        .map(|(peer, bytes)| {
            Ok(PeerBytes {
                peer: ClientId::new(&peer).map_err(|e| format!("peer `{peer}`: {e}"))?,
                bytes,
            })
        })
        .collect()
}

/// The update's values in the global adapter's tensor order (the aggregator's layout).
fn flatten(update: &TrainedUpdate, adapter: &GlobalAdapter) -> Result<Vec<f32>, SecureError> {
    let mut out = Vec::with_capacity(adapter.tensors.iter().map(|t| t.values.len()).sum());
    for t in &adapter.tensors {
        let d = update
            .deltas
            .iter()
            .find(|d| d.name == t.name)
            .ok_or_else(|| format!("the update has no tensor `{}`", t.name))?;
        if d.values.len() != t.values.len() {
            return Err(format!(
                "tensor `{}`: {} values, the global adapter has {}",
                t.name,
                d.values.len(),
                t.values.len()
            ));
        }
        out.extend_from_slice(&d.values);
    }
    if update.deltas.len() != adapter.tensors.len() {
        return Err(format!(
            "the update has {} tensors, the global adapter {}",
            update.deltas.len(),
            adapter.tensors.len()
        ));
    }
    Ok(out)
}

/// Writes `values` (little-endian u32s) to `dir/name`: the secure-aggregation audit files.
fn dump_u32s(dir: &std::ffi::OsStr, name: &str, values: &[u32]) {
    let path = std::path::Path::new(dir).join(name);
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    if let Err(e) = std::fs::write(&path, bytes) {
        tracing::warn!(path = %path.display(), error = %e, "could not write a secure-aggregation audit file");
    }
}
