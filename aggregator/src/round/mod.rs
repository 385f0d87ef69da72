//! The round state machine: pure, no I/O, no clock.
//!
//! [`RoundMachine::on_event`] takes one [`Event`] (a client joined, a status / last will, an
//! update arrived, an evaluation finished, a deadline tick) and the current Unix time in ms, and
//! returns the [`Action`]s the async shell carries out in order (publish, checkpoint, evaluate,
//! finish). Round lifecycle:
//!
//! ```text
//! wait for min_clients ─► sample (fraction, minimum, seeded) ─► publish global (retained)
//!   ─► announce (retained) ─► collect until every sampled client replied,
//!      or the deadline passed with at least `quorum` accepted updates
//!   ─► aggregate (strategy) ─► publish new global ─► checkpoint ─► evaluate ─► next round
//! ```
//!
//! Every update is validated (run, version, checksum and structure by the decoder; here: client
//! known and sampled, round current, not a duplicate or stale sequence, size, layout, finite
//! values) and either folded into the strategy's accumulator or rejected with a log line naming
//! client, round and reason, and counted per reason. The whole machine state is serializable:
//! a [`MachineState`] checkpoint restores a machine that behaves exactly like the original.

use std::collections::{BTreeMap, BTreeSet};

use fedpeft_protocol::{
    ClientId, ClientState, ClientUpdate, Codec, DType, GlobalAdapter, RoundAnnounce, Sampling,
    SplitMix64,
};
use tracing::{info, warn};

pub use fedpeft_config::report::{
    FailReason, RejectReason, RobustRecord, RoundRecord, RoundStatus,
};

mod admission;
mod sampling;
pub mod secure;
mod site;
mod types;

use sampling::GLOBAL_ROUNDING_STREAM;
pub use sampling::{round_seed, sample_clients};
pub use types::*;

use crate::accounting::{Traffic, full_model_round_bytes};
use crate::adapter::Adapter;
use crate::outbox::Outgoing;
use crate::strategy::{Strategy, bound_norm, median_of};

/// The round state machine.
#[derive(Debug)]
pub struct RoundMachine {
    rules: Rules,
    strategy: Box<dyn Strategy>,
    s: MachineState,
    /// The open secure round's protocol state (never checkpointed; see [`secure`]).
    live: Option<secure::Live>,
    /// The record of a secure round that failed before its protocol state existed.
    secure_failure: Option<secure::SecureRecord>,
}

/// Who an update's topic names, and whether its signature proves it.
struct Sender {
    client: ClientId,
    signed: bool,
}

impl RoundMachine {
    /// A fresh run starting from `initial` (the round-0 global adapter; with a lossy
    /// `global_dtype`, its decoded wire form).
    pub fn new(rules: Rules, strategy: Box<dyn Strategy>, initial: Adapter) -> RoundMachine {
        let s = MachineState {
            run_id: rules.run_id,
            strategy: strategy.name().to_string(),
            global: initial,
            global_round: 0,
            phase: Phase::Waiting { next_round: 1 },
            clients: BTreeMap::new(),
            accepted_updates: BTreeSet::new(),
            strategy_state: strategy.state(),
            rejected_total: BTreeMap::new(),
            rejected_by_client: BTreeMap::new(),
            records: Vec::new(),
            last_median_norm: None,
            clipped_total: 0,
            upstream: UpstreamState::default(),
        };
        let mut m = RoundMachine {
            rules,
            strategy,
            s,
            live: None,
            secure_failure: None,
        };
        if let Err(e) = m.encode_global() {
            warn!(error = %e, "initial global adapter cannot be encoded");
        }
        m
    }

    /// A machine resuming from a checkpoint. Clients keep the state the checkpoint recorded:
    /// behind an external broker they stayed connected while the aggregator was away (their
    /// last wills, if any, wait in the aggregator's session), and clients of an embedded broker
    /// join again when they reconnect; one that never comes back is counted failed at the
    /// deadline of a round it was sampled for. An open round keeps its sample and accepted
    /// updates and gets a fresh deadline when [`Event::Start`] re-announces it.
    pub fn restore(
        rules: Rules,
        mut strategy: Box<dyn Strategy>,
        state: MachineState,
    ) -> Result<RoundMachine, RestoreError> {
        if state.run_id != rules.run_id {
            return Err(RestoreError::RunMismatch {
                expected: rules.run_id,
                found: state.run_id,
            });
        }
        if state.strategy != strategy.name() {
            return Err(RestoreError::StrategyMismatch {
                expected: strategy.name().into(),
                found: state.strategy,
            });
        }
        strategy.restore(state.strategy_state.clone())?;
        Ok(RoundMachine {
            rules,
            strategy,
            s: state,
            live: None,
            secure_failure: None,
        })
    }

    /// The current state (what a checkpoint would hold).
    pub fn state(&self) -> &MachineState {
        &self.s
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Whether all rounds are done.
    pub fn is_done(&self) -> bool {
        matches!(self.s.phase, Phase::Done)
    }

    /// The open round's deadline, if a round is open (the shell's next tick).
    pub fn deadline(&self) -> Option<u64> {
        if let Some(live) = &self.live {
            return Some(live.deadline_unix_ms);
        }
        match &self.s.phase {
            Phase::Collecting(open) => Some(open.deadline_unix_ms),
            _ => None,
        }
    }

    /// Feeds one event; returns what to do.
    pub fn on_event(&mut self, event: Event, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Start => self.on_start(now, &mut out),
            Event::Reconnected => self.on_reconnected(&mut out),
            // The shell has counted each message's `wire_bytes` (`Event::sender`).
            Event::Joined { client, info, .. } => {
                self.on_join(client, info, now, &mut out);
                // Who has joined decides the next sample: a restart must not forget a join the
                // broker will not deliver again.
                self.persist(&mut out);
            }
            Event::Status { client, state, .. } => {
                let online = |m: &Self| m.s.clients.get(client.as_str()).map(|c| c.online);
                let before = online(self);
                self.on_status(client.clone(), state, now, &mut out);
                if online(self) != before {
                    self.persist(&mut out);
                }
            }
            Event::Update {
                topic_client,
                update,
                wire_bytes,
                signed,
            } => {
                let sender = Sender {
                    client: topic_client,
                    signed,
                };
                self.on_update(sender, *update, wire_bytes, now, &mut out);
            }
            Event::SecAgg {
                topic_client,
                message,
                wire_bytes,
                signed,
            } => {
                let sender = Sender {
                    client: topic_client,
                    signed,
                };
                self.on_secure(sender, *message, wire_bytes, now, &mut out);
                self.persist(&mut out);
            }
            Event::Refused {
                client,
                kind,
                reason,
                detail,
                ..
            } => {
                warn!(client = %client, kind, reason = %reason, detail = %detail, "message rejected");
                self.count_rejection(reason, &client);
                if let Phase::Collecting(open) = &mut self.s.phase {
                    *open.rejected.entry(reason).or_default() += 1;
                }
            }
            Event::Evaluated {
                round,
                loss,
                accuracy,
            } => {
                if let Some(r) = self.s.records.iter_mut().rev().find(|r| r.round == round) {
                    r.eval_loss = Some(loss);
                    r.eval_accuracy = Some(accuracy);
                }
                info!(round, loss, accuracy, "evaluated global adapter");
            }
            Event::Partial {
                topic_client,
                partial,
                wire_bytes,
                signed,
            } => {
                let sender = Sender {
                    client: topic_client,
                    signed,
                };
                self.on_partial(sender, *partial, wire_bytes, now, &mut out);
            }
            Event::Upstream(msg) => self.on_upstream(*msg, now, &mut out),
            Event::Tick => {}
        }
        self.check_deadline(now, &mut out);
        out
    }

    fn on_start(&mut self, now: u64, out: &mut Vec<Action>) {
        if self.s.records.is_empty() {
            // Round 0: the initial adapter, evaluated so later rounds have a baseline.
            self.s.records.push(RoundRecord {
                round: 0,
                status: RoundStatus::Initial,
                sampled: vec![],
                clients_ok: 0,
                clients_failed: 0,
                failed_clients: BTreeMap::new(),
                rejected: BTreeMap::new(),
                train_loss: None,
                train_accuracy: None,
                eval_loss: None,
                eval_accuracy: None,
                traffic: Traffic::default(),
                full_model_fedavg_bytes: 0,
                started_unix_ms: now,
                duration_ms: 0,
                robust: RobustRecord::default(),
                local_dp_epsilon: BTreeMap::new(),
                secure: None,
                staleness: Vec::new(),
            });
            out.push(Action::Evaluate {
                round: 0,
                adapter: self.s.global.clone(),
            });
        }
        self.join_root(out);
        match self.s.phase.clone() {
            Phase::Waiting { .. } => {
                self.publish_global(self.accounting_round(), out);
                self.maybe_start_round(now, out);
            }
            Phase::Collecting(open) if open.secure => {
                // A secure round's secrets and running sum are gone with the old process: the
                // round fails (nothing of it is aggregated) and the next one opens.
                warn!(
                    round = open.round,
                    "round resumed mid secure aggregation: it fails"
                );
                self.secure_failure = Some(secure::SecureRecord {
                    failure: Some("the aggregator restarted during the round".into()),
                    ..Default::default()
                });
                self.publish_global(self.accounting_round(), out);
                if let Phase::Collecting(o) = &mut self.s.phase {
                    o.accepted.clear();
                }
                self.close_round(now, out);
            }
            Phase::Collecting(mut open) => {
                // Resumed mid-round: same round, same sample, fresh deadline.
                info!(round = open.round, sampled = ?open.sampled, accepted = open.accepted.len(),
                      "round resumed");
                open.deadline_unix_ms = self.round_deadline(now);
                self.s.phase = Phase::Collecting(open);
                self.publish_global(self.accounting_round(), out);
                self.publish_announce(out);
            }
            Phase::Done => {
                self.publish_done(out);
                out.push(Action::Finished);
            }
        }
    }

    /// Checkpoints the state unless `out` already does (in durable mode).
    fn persist(&self, out: &mut Vec<Action>) {
        if self.rules.checkpoint_every_update
            && !out.iter().any(|a| matches!(a, Action::Checkpoint))
        {
            out.push(Action::Checkpoint);
        }
    }

    fn on_reconnected(&mut self, out: &mut Vec<Action>) {
        self.join_root(out);
        match self.s.phase {
            Phase::Waiting { .. } => self.publish_global(self.accounting_round(), out),
            Phase::Collecting(_) => {
                self.publish_global(self.accounting_round(), out);
                self.publish_announce(out);
                self.secure_republish(out);
            }
            Phase::Done => self.publish_done(out),
        }
    }

    fn on_join(&mut self, client: ClientId, info: JoinInfo, now: u64, out: &mut Vec<Action>) {
        let name = client.as_str().to_string();
        if let Some(why) = self.incompatibility(&info) {
            warn!(client = %name, reason = %RejectReason::Incompatible, detail = %why, "join rejected");
            self.count_rejection(RejectReason::Incompatible, name.as_str());
            return;
        }
        let entry = self.s.clients.entry(name.clone()).or_insert(ClientInfo {
            num_examples: info.num_examples,
            online: true,
            last_sequence: None,
        });
        entry.num_examples = info.num_examples;
        entry.online = true;
        info!(client = %name, num_examples = info.num_examples, available = self.available().len(), "client joined");
        if matches!(self.s.phase, Phase::Waiting { .. }) {
            self.maybe_start_round(now, out);
        }
    }

    fn incompatibility(&self, info: &JoinInfo) -> Option<String> {
        if let Some(id) = &self.rules.backbone_id
            && *id != info.backbone_id
        {
            return Some(format!(
                "backbone `{}`, the run uses `{id}`",
                info.backbone_id
            ));
        }
        if let Some(sha) = &self.rules.backbone_sha256
            && *sha != info.backbone_sha256
        {
            return Some(format!(
                "backbone sha256 {}, the run's is {}",
                hex::encode(info.backbone_sha256),
                hex::encode(sha)
            ));
        }
        if let Some(peft) = &self.rules.peft
            && *peft != info.peft
        {
            return Some(format!(
                "PEFT method {:?}, the run uses {peft:?}",
                info.peft
            ));
        }
        None
    }

    fn on_status(&mut self, client: ClientId, state: ClientState, now: u64, out: &mut Vec<Action>) {
        let name = client.as_str();
        let Some(info) = self.s.clients.get_mut(name) else {
            // Online status before the Join: nothing to do until it joins.
            return;
        };
        match state {
            ClientState::Offline => {
                info.online = false;
                if let Phase::Collecting(open) = &mut self.s.phase
                    && open.sampled.contains(name)
                    && !open.accepted.contains_key(name)
                    && !open.failed.contains_key(name)
                {
                    warn!(client = %name, round = open.round, "sampled client went offline; counted as failed");
                    open.failed.insert(name.to_string(), FailReason::Offline);
                    self.maybe_close(now, out);
                }
            }
            ClientState::Online | ClientState::Idle | ClientState::Training => {
                info.online = true;
                if matches!(self.s.phase, Phase::Waiting { .. }) {
                    self.maybe_start_round(now, out);
                }
            }
        }
    }

    fn on_update(
        &mut self,
        sender: Sender,
        update: Result<ClientUpdate, DecodeFailure>,
        wire_bytes: u64,
        now: u64,
        out: &mut Vec<Action>,
    ) {
        let client = sender.client.as_str().to_string();
        let update = match update {
            Ok(u) => u,
            Err(f) => {
                let (open_round, last_closed) =
                    admission::current_round(&self.s, self.rules.rounds);
                let round = f.round.or(open_round).unwrap_or(last_closed);
                self.reject(&sender, round, f.reason, &f.detail, now, out);
                return;
            }
        };
        if self.live.is_some() || self.rules.secure.is_some() {
            let detail = "a plain update in a secure-aggregation run";
            self.reject(
                &sender,
                update.round,
                RejectReason::SecAgg,
                detail,
                now,
                out,
            );
            return;
        }
        let mut delta =
            match admission::admit(&self.s, &self.rules, &sender.client, &update, wire_bytes) {
                Ok(delta) => delta,
                Err(r) => {
                    self.reject(&sender, r.round, r.reason, &r.detail, now, out);
                    return;
                }
            };
        let round = update.round;
        let key = (client.clone(), round, update.sequence);
        let Phase::Collecting(o) = &mut self.s.phase else {
            return;
        };
        let norm = match o.norm_bound {
            Some(max) => {
                let norm = bound_norm(&mut delta, max);
                if norm > max {
                    info!(client = %client, round, norm, bound = max, "update norm bounded");
                    o.clipped.push(client.clone());
                    self.s.clipped_total += 1;
                }
                norm
            }
            None => crate::adapter::l2_norm(&delta),
        };
        let weight = if self.strategy.weighs_by_examples() {
            update.num_examples
        } else {
            1
        };
        if let Some(b) = &self.rules.buffered {
            // FedBuff: an update τ versions behind counts (1 + τ)^-a of a fresh one.
            let staleness = o.round - round;
            if staleness > 0 {
                let factor = b.weight(staleness) as f32;
                for t in &mut delta {
                    t.values.iter_mut().for_each(|v| *v *= factor);
                }
            }
            o.staleness.push((client.clone(), staleness));
        }
        if !o.acc.fold(weight, &delta) {
            self.reject(
                &sender,
                round,
                RejectReason::Duplicate,
                "accumulator full",
                now,
                out,
            );
            return;
        }
        o.arrival.push((client.clone(), norm));
        o.accepted
            .insert(client.clone(), (update.sequence, update.num_examples));
        // A client counted failed (it went offline, say) whose update then arrives in time
        // is a client that replied: accepted and failed never both hold one client, so the
        // replies never outnumber the sample.
        o.failed.remove(&client);
        let w = update.num_examples as f64;
        if update.metrics.loss.is_finite() && update.metrics.accuracy.is_finite() {
            o.train_loss_sum += w * f64::from(update.metrics.loss);
            o.train_acc_sum += w * f64::from(update.metrics.accuracy);
            o.train_weight += w;
        }
        match update.metrics.epsilon.map(f64::from) {
            Some(eps) if eps.is_finite() && eps >= 0.0 => {
                o.local_dp_epsilon.insert(client.clone(), eps);
            }
            // The update itself is sound; only the figure it states is not one.
            Some(eps) => warn!(client = %client, round, epsilon = eps,
                "update states a DP-SGD epsilon that is not a finite non-negative number; \
                 not recorded"),
            None => {}
        }
        let (accepted, sampled) = (o.accepted.len(), o.sampled.len());
        self.s.accepted_updates.insert(key);
        if let Some(info) = self.s.clients.get_mut(&client) {
            info.last_sequence = Some(update.sequence);
        }
        info!(client = %client, round, sequence = update.sequence, num_examples = update.num_examples,
              wire_bytes, accepted, sampled, "update accepted");
        self.maybe_close(now, out);
        // Closing the round checkpoints anyway; otherwise persist the accepted update now.
        self.persist(out);
    }

    /// Counts a refusal by reason, and by the client its topic names when that client has
    /// joined (a message naming an unknown id cannot grow the table).
    fn count_rejection(&mut self, reason: RejectReason, client: &str) {
        *self.s.rejected_total.entry(reason).or_default() += 1;
        if self.s.clients.contains_key(client) {
            *self
                .s
                .rejected_by_client
                .entry(client.to_string())
                .or_default() += 1;
        }
    }

    /// Counts a refused update. A refusal changes nobody's state, with one exception: a
    /// signed update for the open round from a sampled client that is refused for what it
    /// carries (wrong layout, non-finite values, too large). Its signature proves the client
    /// sent it, so that client will not send a better one: it counts as failed and the round
    /// need not wait for it. Anything unsigned may come from anybody who can publish on the
    /// broker (a forged, truncated, replayed or copied message), so it says nothing about the
    /// client its topic names: that client's round goes on, at worst until the deadline.
    fn reject(
        &mut self,
        sender: &Sender,
        round: u32,
        reason: RejectReason,
        detail: &str,
        now: u64,
        out: &mut Vec<Action>,
    ) {
        let client = sender.client.as_str();
        warn!(client = %client, round, reason = %reason, detail = %detail, signed = sender.signed,
              "update rejected");
        self.count_rejection(reason, client);
        if let Phase::Collecting(open) = &mut self.s.phase {
            *open.rejected.entry(reason).or_default() += 1;
            if sender.signed
                && reason.is_about_the_content()
                && round == open.round
                && open.sampled.contains(client)
                && !open.accepted.contains_key(client)
            {
                open.failed
                    .entry(client.to_string())
                    .or_insert(FailReason::Rejected(reason));
                self.maybe_close(now, out);
            }
        }
    }

    /// Clients that have joined and are online, sorted (so sampling is reproducible).
    fn available(&self) -> Vec<String> {
        self.s
            .clients
            .iter()
            .filter(|(_, c)| c.online)
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn maybe_start_round(&mut self, now: u64, out: &mut Vec<Action>) {
        let Phase::Waiting { next_round } = self.s.phase else {
            return;
        };
        if !self.root_allows(next_round) {
            return;
        }
        let available = self.available();
        let needed = if next_round == 1 {
            self.rules.start_clients.max(self.rules.min_clients)
        } else {
            self.rules.min_clients
        };
        if available.len() < needed.max(1) {
            return;
        }
        let sampled = sample_clients(
            &available,
            self.rules.fraction,
            self.rules.min_clients,
            self.rules.seed,
            next_round,
        );
        let acc =
            self.strategy
                .configure_round(u64::from(next_round), &self.s.global, sampled.len());
        info!(round = next_round, sampled = ?sampled, available = available.len(), "round started");
        if let Some(q) = self.rules.dp_sample_rate
            && sampled.len() as f64 > q * available.len() as f64 + 1e-9
        {
            warn!(
                round = next_round,
                sampled = sampled.len(),
                available = available.len(),
                q,
                "client-level DP: this round samples more than q of the available clients; \
                   the reported epsilon assumes q = dp.expected_clients / dp.fleet_size"
            );
        }
        let norm_bound = match (self.rules.adaptive_norm_multiple, self.s.last_median_norm) {
            (Some(m), Some(median)) if median > 0.0 => Some(m * median),
            _ => self.rules.max_update_norm,
        };
        let deadline = self.round_deadline(now);
        let sampled: BTreeSet<String> = sampled.into_iter().collect();
        let secure = self.rules.secure.is_some();
        if secure {
            match self.secure_open(next_round, &sampled, now, deadline) {
                Ok(live) => self.live = Some(live),
                Err(why) => {
                    warn!(round = next_round, reason = %why, "secure round cannot run");
                    self.secure_failure = Some(secure::SecureRecord {
                        failure: Some(why),
                        ..Default::default()
                    });
                }
            }
        }
        self.s.phase = Phase::Collecting(OpenRound {
            round: next_round,
            started_unix_ms: now,
            deadline_unix_ms: deadline,
            secure,
            extensions: 0,
            sampled,
            accepted: BTreeMap::new(),
            failed: BTreeMap::new(),
            rejected: BTreeMap::new(),
            acc,
            norm_bound,
            arrival: Vec::new(),
            clipped: Vec::new(),
            train_loss_sum: 0.0,
            train_acc_sum: 0.0,
            train_weight: 0.0,
            local_dp_epsilon: BTreeMap::new(),
            staleness: Vec::new(),
        });
        // Persist the open round (its sample) before announcing it: a restarted aggregator
        // resumes this round with the same clients, so updates the broker redelivers to it, or
        // clients send again, still belong to an open round.
        out.push(Action::Checkpoint);
        if secure && self.live.is_none() {
            self.close_round(now, out);
            return;
        }
        self.publish_announce(out);
    }

    fn check_deadline(&mut self, now: u64, out: &mut Vec<Action>) {
        if self.live.is_some() {
            self.secure_deadline(now, out);
            return;
        }
        let Phase::Collecting(open) = &mut self.s.phase else {
            return;
        };
        if now < open.deadline_unix_ms {
            return;
        }
        if contributions(self.rules.buffered.is_some(), open)
            >= self.rules.quorum.min(open.sampled.len())
        {
            self.close_round(now, out);
            return;
        }
        // A site cannot extend: the root's deadline does not move.
        if let QuorumFailure::Extend { max_extensions } = self.rules.on_quorum_failure
            && self.rules.site.is_none()
            && open.extensions < max_extensions
        {
            open.extensions += 1;
            open.deadline_unix_ms = now + self.rules.round_timeout_ms;
            warn!(
                round = open.round,
                accepted = open.accepted.len(),
                quorum = self.rules.quorum,
                extension = open.extensions,
                "quorum not reached at the deadline; extending"
            );
            self.publish_announce(out);
            return;
        }
        self.close_round(now, out);
    }

    /// Closes the round early once every sampled client has replied (accepted or failed).
    fn maybe_close(&mut self, now: u64, out: &mut Vec<Action>) {
        if self.live.is_some() {
            self.secure_progress(now, out);
            return;
        }
        let Phase::Collecting(open) = &self.s.phase else {
            return;
        };
        if let Some(b) = &self.rules.buffered {
            // Asynchronous: the buffer is full, whoever is still training.
            if open.acc.count() >= b.buffer {
                self.close_round(now, out);
            }
            return;
        }
        let replied = open.accepted.len() + open.failed.len();
        if replied < open.sampled.len() {
            return;
        }
        // Nobody left to wait for: with or without quorum, waiting longer changes nothing.
        self.close_round(now, out);
    }

    fn close_round(&mut self, now: u64, out: &mut Vec<Action>) {
        let Phase::Collecting(open) = std::mem::replace(&mut self.s.phase, Phase::Done) else {
            return;
        };
        let round = open.round;
        let quorum = self.rules.quorum.min(open.sampled.len()).max(1);
        let mut failed_clients = open.failed.clone();
        // Without a round barrier a sampled client that has not replied is still training.
        if self.rules.buffered.is_none() {
            for c in &open.sampled {
                if !open.accepted.contains_key(c) && !failed_clients.contains_key(c) {
                    failed_clients.insert(c.clone(), FailReason::NoReply);
                }
            }
        }
        let norms: Vec<f64> = open.arrival.iter().map(|(_, n)| *n).collect();
        let median = median_of(&norms);
        if median.is_some() {
            self.s.last_median_norm = median;
        }
        let mut robust = RobustRecord {
            norm_bound: open.norm_bound,
            median_norm: median,
            clipped: open.clipped.len(),
            clipped_clients: open.clipped.clone(),
            ..RobustRecord::default()
        };
        let site = self.rules.site.clone();
        let status = if let Some(site) = &site {
            self.forward(site, &open, quorum, out)
        } else if contributions(self.rules.buffered.is_some(), &open) >= quorum {
            self.aggregate(&open, &mut robust)
        } else {
            warn!(
                round,
                accepted = open.accepted.len(),
                quorum,
                "round failed: quorum not reached; global adapter unchanged"
            );
            RoundStatus::Failed
        };
        let next_round = round + 1;
        self.s.phase = if round >= self.rules.rounds && site.is_none() {
            Phase::Done
        } else {
            Phase::Waiting { next_round }
        };
        // The new global's bytes count in the round that produced it. A site's comes from its
        // root.
        if site.is_none() {
            self.publish_global(round, out);
        }
        let w = open.train_weight;
        let record = RoundRecord {
            round,
            status,
            sampled: open.sampled.iter().cloned().collect(),
            clients_ok: open.accepted.len(),
            clients_failed: failed_clients.len(),
            failed_clients,
            rejected: open.rejected.clone(),
            train_loss: (w > 0.0).then(|| open.train_loss_sum / w),
            train_accuracy: (w > 0.0).then(|| open.train_acc_sum / w),
            eval_loss: None,
            eval_accuracy: None,
            traffic: Traffic::default(),
            full_model_fedavg_bytes: full_model_round_bytes(
                self.rules.backbone_params,
                open.sampled.len(),
            ),
            started_unix_ms: open.started_unix_ms,
            duration_ms: now.saturating_sub(open.started_unix_ms),
            robust,
            local_dp_epsilon: open.local_dp_epsilon.clone(),
            secure: self
                .live
                .take()
                .map(|l| l.record)
                .or_else(|| self.secure_failure.take()),
            staleness: open.staleness.clone(),
        };
        info!(
            round,
            status = %status,
            ok = record.clients_ok,
            failed = record.clients_failed,
            duration_ms = record.duration_ms,
            clipped = record.robust.clipped,
            "round closed"
        );
        self.s.records.push(record.clone());
        out.push(Action::Checkpoint);
        // The held-out evaluation runs after the next round is announced, while the clients
        // train: it is not on the path from this round's last update to the next round.
        let evaluate = (status == RoundStatus::Ok && site.is_none()).then(|| Action::Evaluate {
            round,
            adapter: self.s.global.clone(),
        });
        if self.is_done() {
            out.extend(evaluate);
            out.push(Action::RoundClosed(Box::new(record)));
            info!(rounds = self.rules.rounds, "all rounds done");
            self.publish_done(out);
            out.push(Action::Finished);
        } else {
            self.maybe_start_round(now, out);
            out.extend(evaluate);
            out.push(Action::RoundClosed(Box::new(record)));
        }
    }

    /// The round being collected, if one is open.
    pub fn open_round(&self) -> Option<u32> {
        match &self.s.phase {
            Phase::Collecting(open) => Some(open.round),
            _ => None,
        }
    }

    /// Publishes `message`, its bytes counted in `round`, to every available client.
    fn publish(&mut self, message: Outgoing, round: u32, out: &mut Vec<Action>) {
        out.push(Action::Publish {
            message,
            round,
            receivers: self.available(),
        });
    }

    /// The round a client's message arriving now counts in: the open round, or the next one
    /// between rounds.
    pub fn accounting_round(&self) -> u32 {
        match &self.s.phase {
            Phase::Collecting(open) => open.round,
            Phase::Waiting { next_round } => *next_round,
            Phase::Done => self.rules.rounds + 1,
        }
    }

    /// Encodes the global adapter in `global_dtype`. With a lossy dtype (f16, int8: stochastic
    /// rounding seeded by the run's seed and the adapter's round, so a run replays) the decoded
    /// values become the aggregator's global: it aggregates, evaluates and checkpoints exactly
    /// the adapter its clients decode, and the rounding error of one round is not carried into
    /// the next (each global is rounded once, from the exact aggregate).
    fn encode_global(&mut self) -> Result<Vec<fedpeft_protocol::Tensor>, String> {
        let dtype = self.rules.global_dtype;
        let mut rng = SplitMix64::new(
            round_seed(self.rules.seed, self.s.global_round) ^ GLOBAL_ROUNDING_STREAM,
        );
        let tensors = self
            .s
            .global
            .tensors
            .iter()
            .map(|t| {
                // The wire carries u32 dimensions.
                let shape = t
                    .shape
                    .iter()
                    .map(|&d| u32::try_from(d))
                    .collect::<Result<Vec<u32>, _>>()
                    .map_err(|_| format!("tensor `{}`: shape {:?} exceeds u32", t.name, t.shape))?;
                fedpeft_protocol::Tensor::encode(
                    &t.name,
                    &shape,
                    &t.values,
                    Codec::dense(dtype),
                    &mut rng,
                )
                .map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        if dtype != DType::F32 {
            for (held, sent) in self.s.global.tensors.iter_mut().zip(&tensors) {
                held.values = sent.to_f32();
            }
        }
        Ok(tensors)
    }

    /// Aggregates the open round's updates into the new global; `Ok`, or `Failed` (logged)
    /// when the strategy cannot. Fills in what trimming and DP did.
    fn aggregate(&mut self, open: &OpenRound, robust: &mut RobustRecord) -> RoundStatus {
        let round = open.round;
        match self
            .strategy
            .aggregate(u64::from(round), &self.s.global, &open.acc)
        {
            Ok(next) => {
                self.s.global = next;
                self.s.global_round = round;
                self.s.strategy_state = self.strategy.state();
                let stats = self.strategy.last_stats();
                robust.values_trimmed_per_coordinate = stats.values_trimmed_per_coordinate;
                robust.trimmed_share = open
                    .arrival
                    .iter()
                    .zip(&stats.trimmed_share)
                    .map(|((c, _), &share)| (c.clone(), share))
                    .collect();
                robust.dp_noise_std = stats.dp_noise_std;
                robust.dp_epsilon = stats.dp_epsilon;
                robust.dp_delta = stats.dp_delta;
                if let Some(eps) = stats.dp_epsilon {
                    info!(
                        round,
                        epsilon = eps,
                        delta = stats.dp_delta.unwrap_or(0.0),
                        noise_std = stats.dp_noise_std.unwrap_or(0.0),
                        "client-level DP"
                    );
                }
                RoundStatus::Ok
            }
            Err(e) => {
                warn!(round, error = %e, "aggregation failed; global adapter unchanged");
                RoundStatus::Failed
            }
        }
    }

    /// Publishes the global adapter (retained), its bytes counted in `account`: the round that
    /// produced it when a round closes, else (the initial adapter, a re-publication) the round
    /// that is open or next.
    fn publish_global(&mut self, account: u32, out: &mut Vec<Action>) {
        if self.rules.site.is_some() {
            // A site passes its root's adapter on as the root encoded it, once it has one.
            if let Some(g) = self.s.upstream.global.clone() {
                self.publish(Outgoing::Global(g), account, out);
            }
            return;
        }
        let round = self.s.global_round;
        match self.encode_global() {
            Ok(tensors) => {
                self.publish(
                    Outgoing::Global(GlobalAdapter { round, tensors }),
                    account,
                    out,
                );
            }
            // The global adapter is built by strategies that refuse non-finite values, so this
            // means a tensor is too large for the wire format: nothing sensible to send.
            Err(e) => warn!(round, error = %e, "global adapter cannot be encoded"),
        }
    }

    fn announce_message(&self, round: u32, deadline: u64, sampled: Vec<ClientId>) -> RoundAnnounce {
        let config = self.root_config(round).unwrap_or_else(|| {
            let mut config = self.rules.local.clone();
            config.seed = round_seed(self.rules.seed, round);
            config
        });
        RoundAnnounce {
            round,
            deadline_unix_ms: deadline,
            sampling: Sampling::Clients(sampled),
            config,
        }
    }

    fn publish_announce(&mut self, out: &mut Vec<Action>) {
        let Phase::Collecting(open) = &self.s.phase else {
            return;
        };
        let sampled = open
            .sampled
            .iter()
            .filter_map(|c| ClientId::new(c).ok())
            .collect();
        let round = open.round;
        let msg = self.announce_message(round, open.deadline_unix_ms, sampled);
        let message = match (self.secure_setup(), &self.rules.buffered) {
            (Some(setup), _) => Outgoing::SecureAnnounce(fedpeft_protocol::SecureRoundAnnounce {
                announce: msg,
                setup,
            }),
            (None, Some(b)) => Outgoing::AsyncAnnounce(fedpeft_protocol::AsyncRoundAnnounce {
                announce: msg,
                max_staleness: b.max_staleness,
            }),
            (None, None) => Outgoing::Announce(msg),
        };
        self.publish(message, round, out);
    }

    /// The run is over: see [`RoundAnnounce::is_run_done`].
    fn publish_done(&mut self, out: &mut Vec<Action>) {
        let round = match (&self.rules.site, &self.s.upstream.announce) {
            (Some(_), Some(a)) => a.round,
            _ => self.rules.rounds + 1,
        };
        let msg = self.announce_message(round, 0, Vec::new());
        self.publish(Outgoing::RunDone(msg), round, out);
    }
}

/// What counts towards a round's quorum: its accepted clients (a secure round's too, whose sum
/// is not in the accumulator), or in an asynchronous run the updates in the buffer (a client
/// may have two there).
fn contributions(buffered: bool, open: &OpenRound) -> usize {
    if buffered {
        open.acc.count()
    } else {
        open.accepted.len()
    }
}
