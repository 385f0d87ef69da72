//! Whether an update may enter the open round: a pure function from the machine's state and one
//! decoded update to the update's dense delta or a typed refusal.
//!
//! The checks, in order: size on the wire, the body names the client of its topic, the client
//! joined, not a redelivery of an accepted (client, round, sequence), the round is the open
//! one (else late, stale or future), the sequence is after the client's last accepted one, the
//! client is sampled and has no accepted update this round, the tensors' layout matches the
//! global adapter's, every value is finite.

use fedpeft_peft::NamedTensor;
use fedpeft_protocol::{ClientId, ClientUpdate};

use super::{MachineState, Phase, RejectReason, Rules};
use crate::adapter::first_non_finite;

/// Why an update was refused, for the round it names.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub reason: RejectReason,
    /// The round the update (or, when undecodable, the machine) names.
    pub round: u32,
    pub detail: String,
}

pub(super) fn refuse(reason: RejectReason, round: u32, detail: impl Into<String>) -> Refusal {
    Refusal {
        reason,
        round,
        detail: detail.into(),
    }
}

/// The open round (if any) and the last closed one.
pub fn current_round(s: &MachineState, rounds: u32) -> (Option<u32>, u32) {
    match &s.phase {
        Phase::Collecting(open) => (Some(open.round), open.round.saturating_sub(1)),
        Phase::Waiting { next_round } => (None, next_round.saturating_sub(1)),
        Phase::Done => (None, rounds),
    }
}

/// Checks `update`, which arrived on `topic_client`'s update topic with `wire_bytes` on the
/// wire, against the state; the delta as dense f32 tensors when it may be folded in.
pub fn admit(
    s: &MachineState,
    rules: &Rules,
    topic_client: &ClientId,
    update: &ClientUpdate,
    wire_bytes: u64,
) -> Result<Vec<NamedTensor>, Refusal> {
    let round = update.round;
    let sender = Submission {
        topic_client,
        body_client: &update.client,
        round,
        sequence: update.sequence,
        wire_bytes,
    };
    admit_sender(s, rules, &sender)?;
    let delta: Vec<NamedTensor> = update.tensors.iter().map(fedpeft_backbone::dense).collect();
    if let Err(e) = s.global.check_layout(&delta) {
        return Err(refuse(RejectReason::WrongShape, round, e.to_string()));
    }
    if let Some((tensor, index)) = first_non_finite(&delta) {
        let detail = format!("tensor `{tensor}` value #{index}");
        return Err(refuse(RejectReason::NonFinite, round, detail));
    }
    Ok(delta)
}

/// Who sent a contribution to the open round, and which one it is: an update's or a site
/// aggregate's header.
pub struct Submission<'a> {
    pub topic_client: &'a ClientId,
    /// The client (or site) its body names.
    pub body_client: &'a ClientId,
    pub round: u32,
    pub sequence: u32,
    pub wire_bytes: u64,
}

/// The checks that do not look at the values, in the order of the module's list: size, the
/// body names the topic's client, joined, not a redelivery, the open round, a newer
/// sequence, sampled, first this round.
pub fn admit_sender(s: &MachineState, rules: &Rules, sub: &Submission<'_>) -> Result<(), Refusal> {
    let client = sub.topic_client.as_str();
    let round = sub.round;
    if sub.wire_bytes > rules.max_update_bytes {
        let detail = format!(
            "{} bytes on the wire, limit {}",
            sub.wire_bytes, rules.max_update_bytes
        );
        return Err(refuse(RejectReason::Oversized, round, detail));
    }
    if sub.body_client != sub.topic_client {
        let detail = format!("body names client `{}`", sub.body_client);
        return Err(refuse(RejectReason::ClientMismatch, round, detail));
    }
    let Some(info) = s.clients.get(client) else {
        return Err(refuse(RejectReason::UnknownClient, round, "never joined"));
    };
    let key = (client.to_string(), round, sub.sequence);
    if s.accepted_updates.contains(&key) {
        let detail = format!("sequence {} already accepted (redelivery)", sub.sequence);
        return Err(refuse(RejectReason::Duplicate, round, detail));
    }
    check_round(s, rules, round)?;
    if let Some(last) = info.last_sequence
        && sub.sequence <= last
    {
        let detail = format!(
            "sequence {} not after the last accepted {last}",
            sub.sequence
        );
        return Err(refuse(RejectReason::Stale, round, detail));
    }
    let Phase::Collecting(open) = &s.phase else {
        unreachable!("check_round refuses updates while no round is open")
    };
    if rules.buffered.is_some() && round < open.round {
        // A stale update of an asynchronous run: its client was sampled for its own round
        // and may send again for this one; the sequence check above keeps it to one each.
        return Ok(());
    }
    if !open.sampled.contains(client) {
        return Err(refuse(RejectReason::NotSampled, round, ""));
    }
    if let Some((seq, _)) = open.accepted.get(client)
        && rules.buffered.is_none()
    {
        let detail = format!("already accepted sequence {seq} this round");
        return Err(refuse(RejectReason::Duplicate, round, detail));
    }
    Ok(())
}

/// The update's round must be the open one.
fn check_round(s: &MachineState, rules: &Rules, round: u32) -> Result<(), Refusal> {
    let (open_round, last_closed) = current_round(s, rules.rounds);
    let Some(open) = open_round else {
        let reason = if round == last_closed && round > 0 {
            RejectReason::Late
        } else if round <= last_closed {
            RejectReason::Stale
        } else {
            RejectReason::FutureRound
        };
        return Err(refuse(reason, round, "no round open"));
    };
    if round == open {
        return Ok(());
    }
    if let Some(b) = &rules.buffered
        && round < open
        && open - round <= b.max_staleness
    {
        return Ok(());
    }
    let (reason, detail) = if round > open {
        (RejectReason::FutureRound, format!("round {open} is open"))
    } else if round + 1 == open {
        (
            RejectReason::Late,
            format!("round {round} closed; round {open} is open"),
        )
    } else {
        (RejectReason::Stale, format!("round {open} is open"))
    };
    Err(refuse(reason, round, detail))
}
