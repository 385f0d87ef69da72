//! Sites and their root: two levels of aggregation over bridged brokers.
//!
//! A **site** aggregator (`[site]` in its config) serves the devices on its own broker but runs
//! no rounds of its own: it follows its **root**, whose topics reach the site's broker over an
//! MQTT bridge. It joins the root's fleet as one participant; when the root announces a round
//! that samples it, the site republishes the root's global adapter (verbatim) and announcement
//! (the root's round number and training config, its own sample of devices and a deadline a
//! margin before the root's) to its devices, admits their updates exactly as a root would, and
//! forwards one [`SiteAggregate`]: the exact weighted sum Σ nᵢ·Δᵢ and Σ nᵢ. The root folds it
//! into its own exact sum ([`crate::strategy::Accumulator::fold_exact`]), so its global adapter
//! is the one a flat federation over the same updates would publish.
//!
//! A site that goes dark is one participant that does not reply: the root closes the round
//! with the others at its deadline, as it does for a device.

use fedpeft_protocol::{
    Capabilities, ClientState, DType, GlobalAdapter, Join, RoundAnnounce, Sampling, SiteAggregate,
    Status,
};
use tracing::{debug, info, warn};

use super::admission::{Submission, admit_sender};
use super::{
    Action, DecodeFailure, FailReason, OpenRound, Phase, RejectReason, RoundMachine, RoundStatus,
    Sender, SiteSettings, UpstreamMessage,
};
use crate::adapter::Adapter;
use crate::outbox::Outgoing;
use crate::strategy::Accumulator;

impl RoundMachine {
    /// Root side: a site's partial aggregate for the open round.
    pub(super) fn on_partial(
        &mut self,
        sender: Sender,
        partial: Result<SiteAggregate, DecodeFailure>,
        wire_bytes: u64,
        now: u64,
        out: &mut Vec<Action>,
    ) {
        let partial = match partial {
            Ok(p) => p,
            Err(f) => {
                let round = f.round.unwrap_or_else(|| self.accounting_round());
                self.reject(&sender, round, f.reason, &f.detail, now, out);
                return;
            }
        };
        let round = partial.round;
        if let Err((reason, detail)) = self.admit_partial(&sender, &partial, wire_bytes) {
            self.reject(&sender, round, reason, &detail, now, out);
            return;
        }
        let site = sender.client.as_str().to_string();
        let Phase::Collecting(o) = &mut self.s.phase else {
            return;
        };
        if partial.updates == 0 {
            // The site's own round failed (no device quorum): it has nothing to add, and the
            // root need not wait for it.
            warn!(site = %site, round, "site aggregate carries no update; counted as failed");
            o.failed.insert(site, FailReason::NoReply);
            self.maybe_close(now, out);
            self.persist(out);
            return;
        }
        o.acc
            .fold_exact(partial.weight, partial.updates as usize, &partial.tensors);
        o.accepted
            .insert(site.clone(), (partial.sequence, partial.weight));
        o.failed.remove(&site);
        if partial.train_weight > 0.0
            && partial.train_loss_sum.is_finite()
            && partial.train_accuracy_sum.is_finite()
        {
            o.train_loss_sum += partial.train_loss_sum;
            o.train_acc_sum += partial.train_accuracy_sum;
            o.train_weight += partial.train_weight;
        }
        let (accepted, sampled) = (o.accepted.len(), o.sampled.len());
        self.s
            .accepted_updates
            .insert((site.clone(), round, partial.sequence));
        if let Some(info) = self.s.clients.get_mut(&site) {
            info.last_sequence = Some(partial.sequence);
        }
        info!(site = %site, round, sequence = partial.sequence, updates = partial.updates,
              weight = partial.weight, wire_bytes, accepted, sampled, "site aggregate accepted");
        self.maybe_close(now, out);
        self.persist(out);
    }

    /// Whether a site aggregate may be folded into the open round: the checks of an update's
    /// sender, then what a sum can and cannot stand for here.
    fn admit_partial(
        &self,
        sender: &Sender,
        partial: &SiteAggregate,
        wire_bytes: u64,
    ) -> Result<(), (RejectReason, String)> {
        if self.live.is_some() || self.rules.secure.is_some() {
            let detail = "a site aggregate in a secure-aggregation run";
            return Err((RejectReason::SecAgg, detail.into()));
        }
        if self.rules.site.is_some() {
            let detail = "a site aggregate sent to a site: only a root folds them";
            return Err((RejectReason::Incompatible, detail.into()));
        }
        let sub = Submission {
            topic_client: &sender.client,
            body_client: &partial.site,
            round: partial.round,
            sequence: partial.sequence,
            wire_bytes,
        };
        admit_sender(&self.s, &self.rules, &sub).map_err(|r| (r.reason, r.detail))?;
        let Phase::Collecting(open) = &self.s.phase else {
            unreachable!("admit_sender refuses contributions while no round is open")
        };
        if matches!(open.acc, Accumulator::Buffer { .. }) || !self.strategy.weighs_by_examples() {
            let detail = format!(
                "strategy {} needs each device's update (order statistics) or weighs every \
                 update alike (client-level DP); a site forwards a weighted sum",
                self.strategy.name()
            );
            return Err((RejectReason::Incompatible, detail));
        }
        if open.norm_bound.is_some() {
            let detail = "this root bounds each update's norm, which a sum of updates cannot \
                          honour: bound the devices' updates at their sites (max_update_norm)";
            return Err((RejectReason::Incompatible, detail.into()));
        }
        if partial.updates == 0 {
            return Ok(());
        }
        open.acc
            .check_exact_layout(&self.s.global, &partial.tensors)
            .map_err(|e| (RejectReason::WrongShape, e))?;
        if let Some((tensor, index)) = partial.first_non_finite() {
            let detail = format!("tensor `{tensor}` value #{index}");
            return Err((RejectReason::NonFinite, detail));
        }
        Ok(())
    }

    /// Site side: a message from the root.
    pub(super) fn on_upstream(&mut self, msg: UpstreamMessage, now: u64, out: &mut Vec<Action>) {
        let Some(site) = self.rules.site.clone() else {
            debug!("a root's message at an aggregator that is not a site; ignored");
            return;
        };
        match msg {
            UpstreamMessage::Global(g) => self.on_root_global(g, now, out),
            UpstreamMessage::Announce(a) => self.on_root_announce(&site, a, now, out),
        }
    }

    fn on_root_global(&mut self, g: GlobalAdapter, now: u64, out: &mut Vec<Action>) {
        if let Some(held) = &self.s.upstream.global
            && (g.round < held.round || *held == g)
        {
            debug!(
                round = g.round,
                held = held.round,
                "root's global adapter already held"
            );
            return;
        }
        if let Err(why) = fits(&self.s.global, &g) {
            warn!(round = g.round, reason = %why,
                  "the root's global adapter does not fit this site's model; ignored");
            return;
        }
        for (held, t) in self.s.global.tensors.iter_mut().zip(&g.tensors) {
            held.values = t.to_f32();
        }
        self.s.global_round = g.round;
        info!(round = g.round, "root's global adapter received");
        self.s.upstream.global = Some(g);
        self.publish_global(self.accounting_round(), out);
        out.push(Action::Checkpoint);
        self.maybe_start_round(now, out);
    }

    fn on_root_announce(
        &mut self,
        site: &SiteSettings,
        a: RoundAnnounce,
        now: u64,
        out: &mut Vec<Action>,
    ) {
        if a.is_run_done() {
            if matches!(self.s.phase, Phase::Done) {
                return;
            }
            info!(round = a.round, "the root's run is done");
            self.abandon(now, out);
            self.s.upstream.announce = Some(a);
            self.s.phase = Phase::Done;
            out.push(Action::Checkpoint);
            self.publish_done(out);
            out.push(Action::Finished);
            return;
        }
        if a.round <= self.s.upstream.last_round {
            debug!(
                round = a.round,
                last = self.s.upstream.last_round,
                "root's old announcement"
            );
            return;
        }
        let sampled = match &a.sampling {
            Sampling::All => true,
            Sampling::Clients(c) => c.contains(&site.id),
            Sampling::Rate(_) => false,
        };
        if let Phase::Collecting(open) = &mut self.s.phase {
            if open.round == a.round {
                // The root announced its round again (it restarted, or extended the deadline):
                // follow its deadline.
                let deadline = site_deadline(site, &a, self.rules.round_timeout_ms, now);
                open.deadline_unix_ms = open.deadline_unix_ms.max(deadline);
                self.s.upstream.announce = Some(a);
                self.publish_announce(out);
                return;
            }
            warn!(
                round = open.round,
                root_round = a.round,
                "the root moved on before this site's round closed; the round is abandoned"
            );
            self.abandon(now, out);
        }
        let round = a.round;
        self.s.upstream.announce = Some(a);
        if !sampled {
            info!(round, "not sampled by the root this round; waiting");
            self.s.upstream.last_round = round;
            self.s.phase = Phase::Waiting {
                next_round: round + 1,
            };
            out.push(Action::Checkpoint);
            return;
        }
        self.s.phase = Phase::Waiting { next_round: round };
        out.push(Action::Checkpoint);
        self.maybe_start_round(now, out);
    }

    /// Closes the open round without forwarding anything (the root has moved on).
    fn abandon(&mut self, now: u64, out: &mut Vec<Action>) {
        if let Phase::Collecting(o) = &mut self.s.phase {
            // Finished with at the root: `forward` sends nothing for it.
            self.s.upstream.last_round = self.s.upstream.last_round.max(o.round);
            o.accepted.clear();
            o.acc = Accumulator::sum_for(&self.s.global);
            self.close_round(now, out);
        }
    }

    /// Site side, at the close of a round: forwards the exact sum (or, below quorum, an empty
    /// aggregate so the root need not wait) when the root's round is still this one.
    pub(super) fn forward(
        &mut self,
        site: &SiteSettings,
        open: &OpenRound,
        quorum: usize,
        out: &mut Vec<Action>,
    ) -> RoundStatus {
        let current = self
            .s
            .upstream
            .announce
            .as_ref()
            .is_some_and(|a| a.round == open.round && !a.is_run_done())
            && open.round > self.s.upstream.last_round;
        self.s.upstream.last_round = self.s.upstream.last_round.max(open.round);
        if !current {
            return RoundStatus::Failed;
        }
        let ok = open.accepted.len() >= quorum;
        let tensors = if ok {
            open.acc.exact_sums(&self.s.global).unwrap_or_default()
        } else {
            Vec::new()
        };
        let sequence = self.s.upstream.next_sequence;
        self.s.upstream.next_sequence = sequence.wrapping_add(1);
        let aggregate = SiteAggregate {
            site: site.id.clone(),
            round: open.round,
            sequence,
            updates: if ok { open.accepted.len() as u32 } else { 0 },
            weight: if ok { open.acc.total_weight() } else { 0 },
            train_loss_sum: if ok { open.train_loss_sum } else { 0.0 },
            train_accuracy_sum: if ok { open.train_acc_sum } else { 0.0 },
            train_weight: if ok { open.train_weight } else { 0.0 },
            tensors,
        };
        info!(
            round = open.round,
            updates = aggregate.updates,
            weight = aggregate.weight,
            "site aggregate forwarded to the root"
        );
        out.push(Action::Upstream(Outgoing::Aggregate(aggregate)));
        if ok {
            RoundStatus::Ok
        } else {
            warn!(
                round = open.round,
                accepted = open.accepted.len(),
                quorum,
                "site round failed: quorum not reached; the root is told"
            );
            RoundStatus::Failed
        }
    }

    /// Site side: joins the root (again) and says it is online.
    pub(super) fn join_root(&self, out: &mut Vec<Action>) {
        let Some(site) = &self.rules.site else {
            return;
        };
        let mut backbone_id = heapless::String::new();
        if let Some(id) = &self.rules.backbone_id {
            // The id was checked against the same limit when the model was loaded.
            let _ = backbone_id.push_str(id);
        }
        let join = Join {
            client: site.id.clone(),
            capabilities: Capabilities {
                backbone_id,
                backbone_sha256: self.rules.backbone_sha256.unwrap_or([0; 32]),
                peft: self
                    .rules
                    .peft
                    .unwrap_or(fedpeft_protocol::PeftMethod::Head),
                accepted_dtypes: heapless::Vec::from_slice(&[DType::F32, DType::F16, DType::I8])
                    .unwrap_or_default(),
                max_packet_size: site.max_packet_bytes,
            },
            num_examples: self.s.clients.values().map(|c| c.num_examples).sum(),
        };
        out.push(Action::Upstream(Outgoing::Status(Status {
            client: site.id.clone(),
            state: ClientState::Online,
        })));
        out.push(Action::Upstream(Outgoing::Join(join)));
    }

    /// The deadline of a round opened (or resumed) now: the round timeout from now, and for a
    /// site that has the root's announcement, a margin before the root's deadline.
    pub(super) fn round_deadline(&self, now: u64) -> u64 {
        match (&self.rules.site, &self.s.upstream.announce) {
            (Some(site), Some(a)) => site_deadline(site, a, self.rules.round_timeout_ms, now),
            _ => now + self.rules.round_timeout_ms,
        }
    }

    /// Site side: whether round `next_round` may open now (the root announced it, sampling
    /// this site, and its global adapter is here). `true` for a root.
    pub(super) fn root_allows(&self, next_round: u32) -> bool {
        if self.rules.site.is_none() {
            return true;
        }
        let Some(a) = &self.s.upstream.announce else {
            return false;
        };
        if a.round != next_round || a.is_run_done() || a.round <= self.s.upstream.last_round {
            return false;
        }
        let ready = self
            .s
            .upstream
            .global
            .as_ref()
            .is_some_and(|g| g.round < a.round);
        if !ready {
            debug!(round = a.round, "waiting for the root's global adapter");
        }
        ready
    }

    /// Site side: the local training config of `round`, the root's.
    pub(super) fn root_config(&self, round: u32) -> Option<fedpeft_protocol::LocalConfig> {
        self.rules.site.as_ref()?;
        let a = self.s.upstream.announce.as_ref()?;
        (a.round == round).then(|| a.config.clone())
    }
}

/// A margin before the root's deadline, and no later than the site's own timeout from now.
fn site_deadline(site: &SiteSettings, a: &RoundAnnounce, timeout_ms: u64, now: u64) -> u64 {
    a.deadline_unix_ms
        .saturating_sub(site.margin_ms)
        .min(now + timeout_ms)
        .max(now)
}

/// Whether the root's adapter `g` has this site's layout (names, element counts, finite).
fn fits(layout: &Adapter, g: &GlobalAdapter) -> Result<(), String> {
    if g.tensors.len() != layout.tensors.len() {
        return Err(format!(
            "{} tensors, this site's model has {}",
            g.tensors.len(),
            layout.tensors.len()
        ));
    }
    for (t, l) in g.tensors.iter().zip(&layout.tensors) {
        if t.name() != l.name {
            return Err(format!("tensor `{}` where `{}` belongs", t.name(), l.name));
        }
        if t.num_elements() != l.values.len() {
            return Err(format!(
                "tensor `{}`: {} values, this site's has {}",
                l.name,
                t.num_elements(),
                l.values.len()
            ));
        }
    }
    g.validate().map_err(|e| e.to_string())
}
