//! The client side of the round protocol as a pure state machine.
//!
//! [`Session::on_event`] takes one decoded [`Event`] (a connection change, a message from the
//! aggregator, the end of local training, a shutdown request) and returns the [`Action`]s the
//! async shell must carry out. It does no I/O and reads no clock, so every protocol rule is
//! unit-tested without sockets:
//! - on every (re)connect: subscribe, publish Status online (retained) and Join;
//! - train round r only when sampled in r *and* holding a global adapter from before round r
//!   (the aggregator numbers an adapter by the round that produced it: round r starts from
//!   adapter r−1, or an older one when a round failed and left the adapter unchanged — the
//!   aggregator always publishes the adapter before the announcement, and the client
//!   subscribes to adapters before announcements so retained copies arrive in that order too),
//!   at most once per round, one training at a time;
//! - anything older than what it already has (announcement, adapter, finished training) is
//!   stale and dropped;
//! - "run done" or a signal: publish Status offline, disconnect, exit;
//! - emulated dropout ([`Faults`]): in a round whose keyed draw falls below the dropout
//!   probability, a finished training is thrown away and the client vanishes (the shell drops
//!   the connection without DISCONNECT, so the broker publishes its last will) and comes back
//!   later; the draw depends only on (seed, client index, round), so a trial's dropouts replay.

use std::sync::Arc;

use crate::types::{Announcement, GlobalAdapter, Round, SharedAdapter, TrainPlan, TrainedUpdate};

/// Something that happened, as the shell saw it.
#[derive(Debug, Clone)]
pub enum Event {
    /// The broker accepted our CONNECT.
    Connected { session_present: bool },
    /// The connection dropped; the shell reconnects with backoff.
    ConnectionLost,
    /// A (complete, decoded) round announcement.
    Announce(Announcement),
    /// A (reassembled, decoded) global adapter.
    Adapter(GlobalAdapter),
    /// The aggregator says the run is over.
    RunDone,
    /// Local training of `round` finished (or failed with a message).
    TrainingFinished {
        round: Round,
        sequence: u32,
        result: Result<TrainedUpdate, String>,
    },
    /// A secure-aggregation stage message from the aggregator.
    SecAgg(SecureDown),
    /// SIGTERM / SIGINT.
    Shutdown,
}

/// A secure-aggregation message from the aggregator (see `fedpeft_protocol::secagg`).
#[derive(Debug, Clone, PartialEq)]
pub enum SecureDown {
    Roster(fedpeft_protocol::SecAggRoster),
    Relay(fedpeft_protocol::SecAggRelay),
    Unmask(fedpeft_protocol::SecAggUnmask),
}

impl SecureDown {
    pub fn round(&self) -> Round {
        match self {
            SecureDown::Roster(m) => m.round,
            SecureDown::Relay(m) => m.round,
            SecureDown::Unmask(m) => m.round,
        }
    }
}

/// A step of a secure round for the shell's [`crate::secure::SecureClient`].
#[derive(Debug, Clone)]
pub enum SecureStep {
    /// Training of a secure round finished: quantize the update and advertise keys.
    Start {
        round: Round,
        sequence: u32,
        update: TrainedUpdate,
        adapter: SharedAdapter,
        setup: fedpeft_protocol::SecAggSetup,
    },
    /// The aggregator opened the next stage of the current round.
    Stage(SecureDown),
}

/// A message this client publishes; the wire layer picks topic, encoding and chunking.
#[derive(Debug, Clone, PartialEq)]
pub enum Outbound {
    StatusOnline,
    StatusOffline,
    Join,
    Update {
        round: Round,
        sequence: u32,
        update: TrainedUpdate,
        plan: TrainPlan,
    },
    /// A secure-aggregation message (keys, shares, masked input, revealed shares).
    SecAgg(Box<fedpeft_protocol::Message>),
}

/// Why the client exits (both are clean exits, code 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    RunDone,
    Signal,
}

/// What the shell must do.
#[derive(Debug, Clone)]
pub enum Action {
    /// Subscribe to the fleet's announcement, adapter and control topics.
    Subscribe,
    /// Publish a message.
    Send(Outbound),
    /// Train `round` locally from `adapter` following `plan`, then report
    /// [`Event::TrainingFinished`] with the same `round` and `sequence`.
    Train {
        round: Round,
        sequence: u32,
        adapter: SharedAdapter,
        plan: TrainPlan,
    },
    /// Publish again, byte for byte, the update already sent for `round` (after a reconnect
    /// while that round is still announced: the aggregator may have restarted without it; if it
    /// has it, the copy is refused as a duplicate and nothing is counted twice).
    ResendUpdate { round: Round },
    /// Send DISCONNECT (after everything queued before it).
    Disconnect,
    /// Emulated dropout: drop the connection abruptly (no DISCONNECT: the broker publishes our
    /// last will), stay away, then reconnect as after any lost connection.
    Vanish { round: Round },
    /// Stop the process.
    Exit(ExitReason),
    /// Take the next step of a secure round.
    Secure(Box<SecureStep>),
}

/// Emulated unreliability of this client (edge client `[faults]`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Faults {
    /// Probability that a round this client is sampled in and trains ends with it vanishing
    /// instead of publishing.
    pub dropout: f64,
    /// Seed of the draws (the fleet's data seed) and this client's index in the fleet.
    pub seed: u64,
    pub client_index: u64,
}

impl Faults {
    /// Whether this client vanishes in `round` (deterministic in seed, index and round).
    pub fn drops_out(&self, round: Round) -> bool {
        self.dropout > 0.0
            && fedpeft_protocol::keyed_unit(
                self.seed,
                fedpeft_protocol::rng::DROPOUT_PURPOSE,
                self.client_index,
                u64::from(round),
            ) < self.dropout
    }
}

/// Counters the client reports in its final log line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    pub connects: u32,
    pub rounds_trained: u32,
    pub updates_sent: u32,
    pub rounds_not_sampled: u32,
    pub stale_dropped: u32,
    pub training_failures: u32,
    /// Updates published again after a reconnect.
    pub updates_resent: u32,
    /// Rounds in which the client vanished instead of publishing (emulated dropout).
    pub rounds_dropped: u32,
}

/// The session state machine.
#[derive(Debug)]
pub struct Session {
    client_id: String,
    connected: bool,
    announce: Option<Announcement>,
    adapter: Option<SharedAdapter>,
    /// The round being trained right now, if any.
    training: Option<Round>,
    /// The newest round whose training was started: never train a round twice, even when a
    /// retained announcement is delivered again after a reconnect.
    last_started: Option<Round>,
    /// Rounds already counted as "not sampled" (so redeliveries don't count twice).
    last_skipped: Option<Round>,
    /// The round of the last update sent.
    last_sent: Option<Round>,
    /// Reconnected while `last_sent` was the current round: resend it when that round is
    /// announced again.
    resend_on_announce: bool,
    next_sequence: u32,
    finished: bool,
    stats: SessionStats,
    faults: Faults,
    /// Rounds it vanished in, in order.
    dropped: Vec<Round>,
}

impl Session {
    pub fn new(client_id: impl Into<String>) -> Session {
        Session {
            client_id: client_id.into(),
            connected: false,
            announce: None,
            adapter: None,
            training: None,
            last_started: None,
            last_skipped: None,
            last_sent: None,
            resend_on_announce: false,
            next_sequence: 0,
            finished: false,
            stats: SessionStats::default(),
            faults: Faults::default(),
            dropped: Vec::new(),
        }
    }

    /// The same session with emulated faults.
    pub fn with_faults(mut self, faults: Faults) -> Session {
        self.faults = faults;
        self
    }

    /// Rounds in which the client vanished (emulated dropout), in order.
    pub fn dropped_rounds(&self) -> &[Round] {
        &self.dropped
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The newest global adapter held (of the current run).
    pub fn adapter(&self) -> Option<&SharedAdapter> {
        self.adapter.as_ref()
    }

    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// The round currently announced, if any.
    pub fn current_round(&self) -> Option<Round> {
        self.announce.as_ref().map(|a| a.round)
    }

    /// Whether the session has decided to exit.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Advances the state machine by one event.
    pub fn on_event(&mut self, event: Event) -> Vec<Action> {
        if self.finished {
            return Vec::new();
        }
        match event {
            Event::Connected { .. } => {
                self.connected = true;
                self.stats.connects += 1;
                // Re-subscribing is harmless with a persistent session and brings the retained
                // announcement and adapter back; Join again so an aggregator that saw our last
                // will knows we are back.
                // The broker acknowledged our update, not the aggregator. If the round it was
                // for is still the one we know of, send it again when that round is announced
                // again (an aggregator announces only once it is subscribed): one that restarted
                // from a checkpoint taken before it folded the update in gets it back; one that
                // has it refuses the copy as a duplicate.
                self.resend_on_announce =
                    self.last_sent.is_some() && self.last_sent == self.current_round();
                vec![
                    Action::Subscribe,
                    Action::Send(Outbound::StatusOnline),
                    Action::Send(Outbound::Join),
                ]
            }
            Event::ConnectionLost => {
                self.connected = false;
                Vec::new()
            }
            Event::Announce(a) => self.on_announce(a),
            Event::Adapter(g) => self.on_adapter(g),
            Event::TrainingFinished {
                round,
                sequence,
                result,
            } => self.on_trained(round, sequence, result),
            Event::RunDone => self.finish(ExitReason::RunDone),
            Event::Shutdown => self.finish(ExitReason::Signal),
            Event::SecAgg(down) => {
                if self.current_round() == Some(down.round()) {
                    vec![Action::Secure(Box::new(SecureStep::Stage(down)))]
                } else {
                    self.stats.stale_dropped += 1;
                    tracing::debug!(
                        round = down.round(),
                        "secure-aggregation message of another round dropped"
                    );
                    Vec::new()
                }
            }
        }
    }

    fn on_announce(&mut self, a: Announcement) -> Vec<Action> {
        if let Some(current) = &self.announce
            && current.run_id != a.run_id
        {
            // A new run on the same fleet: its rounds start over.
            tracing::info!(old = current.run_id, new = a.run_id, "a new run started");
            self.last_started = None;
            self.last_skipped = None;
            self.adapter = self.adapter.take().filter(|g| g.run_id == a.run_id);
        } else if let Some(current) = &self.announce
            && a.round < current.round
        {
            self.stats.stale_dropped += 1;
            tracing::debug!(
                round = a.round,
                current = current.round,
                "stale announcement dropped"
            );
            return Vec::new();
        }
        let mut actions = Vec::new();
        if std::mem::take(&mut self.resend_on_announce) && self.last_sent == Some(a.round) {
            self.stats.updates_resent += 1;
            actions.push(Action::ResendUpdate { round: a.round });
        }
        let sampled = a.sampled.contains(&self.client_id);
        if !sampled && self.last_skipped != Some(a.round) {
            self.last_skipped = Some(a.round);
            self.stats.rounds_not_sampled += 1;
            tracing::info!(round = a.round, "not sampled this round; waiting");
        }
        self.announce = Some(a);
        actions.extend(self.maybe_train());
        actions
    }

    fn on_adapter(&mut self, g: GlobalAdapter) -> Vec<Action> {
        // Only adapters of the announced run are comparable; another run's adapter is kept
        // until an announcement says which run is current.
        let same_run = |run: u64| self.announce.as_ref().is_none_or(|a| a.run_id == run);
        if !same_run(g.run_id) {
            self.stats.stale_dropped += 1;
            tracing::debug!(run = g.run_id, "global adapter of another run dropped");
            return Vec::new();
        }
        if let Some(held) = self.adapter.as_ref().filter(|h| h.run_id == g.run_id)
            && g.round < held.round
        {
            self.stats.stale_dropped += 1;
            tracing::debug!(
                round = g.round,
                held = held.round,
                "stale global adapter dropped"
            );
            return Vec::new();
        }
        self.adapter = Some(Arc::new(g));
        self.maybe_train()
    }

    fn on_trained(
        &mut self,
        round: Round,
        sequence: u32,
        result: Result<TrainedUpdate, String>,
    ) -> Vec<Action> {
        if self.training == Some(round) {
            self.training = None;
        }
        let mut actions = Vec::new();
        match result {
            Err(reason) => {
                self.stats.training_failures += 1;
                tracing::error!(round, %reason, "local training failed; no update for this round");
            }
            Ok(update) => {
                // In an asynchronous run an update trained for an earlier round still counts,
                // weighted down, while it is at most `max_staleness` rounds behind.
                let current = self.announce.as_ref().filter(|a| {
                    a.round == round
                        || a.max_staleness.is_some_and(|s| {
                            a.round > round && a.round - round <= s && a.secure.is_none()
                        })
                });
                match current {
                    Some(_) if self.faults.drops_out(round) => {
                        // Emulated dropout: the update is lost with the connection.
                        self.stats.rounds_trained += 1;
                        self.stats.rounds_dropped += 1;
                        self.dropped.push(round);
                        self.connected = false;
                        self.resend_on_announce = false;
                        tracing::warn!(
                            round,
                            "emulated dropout: vanishing without publishing the update"
                        );
                        actions.push(Action::Vanish { round });
                    }
                    Some(a) if a.secure.is_some() => match (a.secure, self.adapter.clone()) {
                        (Some(setup), Some(adapter)) => {
                            self.stats.rounds_trained += 1;
                            self.stats.updates_sent += 1;
                            actions.push(Action::Secure(Box::new(SecureStep::Start {
                                round,
                                sequence,
                                update,
                                adapter,
                                setup,
                            })));
                        }
                        _ => tracing::error!(round, "no global adapter held; update not sent"),
                    },
                    Some(a) => {
                        self.stats.rounds_trained += 1;
                        self.stats.updates_sent += 1;
                        self.last_sent = Some(round);
                        actions.push(Action::Send(Outbound::Update {
                            round,
                            sequence,
                            update,
                            plan: a.plan.clone(),
                        }));
                    }
                    None => {
                        // The round moved on while we trained: the aggregator would reject it.
                        self.stats.stale_dropped += 1;
                        tracing::warn!(round, current = ?self.current_round(),
                            "training finished after the round moved on; update not sent");
                    }
                }
            }
        }
        actions.extend(self.maybe_train());
        actions
    }

    fn maybe_train(&mut self) -> Vec<Action> {
        if self.training.is_some() {
            return Vec::new();
        }
        let Some(a) = &self.announce else {
            return Vec::new();
        };
        if self.last_started.is_some_and(|r| r >= a.round) {
            return Vec::new();
        }
        if !a.sampled.contains(&self.client_id) {
            return Vec::new();
        }
        let Some(adapter) = self
            .adapter
            .as_ref()
            .filter(|g| g.round < a.round && g.run_id == a.run_id)
        else {
            tracing::debug!(
                round = a.round,
                "sampled; waiting for the global adapter of the previous round"
            );
            return Vec::new();
        };
        let round = a.round;
        let sequence = self.next_sequence;
        self.next_sequence = self.next_sequence.wrapping_add(1);
        self.training = Some(round);
        self.last_started = Some(round);
        vec![Action::Train {
            round,
            sequence,
            adapter: adapter.clone(),
            plan: a.plan.clone(),
        }]
    }

    fn finish(&mut self, reason: ExitReason) -> Vec<Action> {
        self.finished = true;
        let mut actions = Vec::new();
        if self.connected {
            // A clean DISCONNECT suppresses the last will, so say "offline" ourselves.
            actions.push(Action::Send(Outbound::StatusOffline));
            actions.push(Action::Disconnect);
        }
        actions.push(Action::Exit(reason));
        actions
    }
}

#[cfg(test)]
mod tests {
    use fedpeft_peft::NamedTensor;

    use super::*;
    use crate::types::{Metrics, WireDtype};

    fn plan() -> TrainPlan {
        TrainPlan {
            local_epochs: 1,
            batch_size: 32,
            learning_rate: 0.1,
            optimizer: crate::types::OptimizerPlan::Sgd {
                momentum: 0.0,
                weight_decay: 0.0,
            },
            dp: None,
            proximal_mu: 0.0,
            dtype: WireDtype::F32,
            top_k: None,
            seed: 7,
        }
    }

    fn announce(round: Round, sampled: &[&str]) -> Event {
        Event::Announce(Announcement {
            run_id: 1,
            round,
            sampled: sampled.iter().map(|s| s.to_string()).collect(),
            plan: plan(),
            deadline_unix_ms: 0,
            secure: None,
            max_staleness: None,
        })
    }

    fn adapter(round: Round) -> Event {
        Event::Adapter(GlobalAdapter {
            run_id: 1,
            round,
            tensors: vec![NamedTensor {
                name: "head.weight".into(),
                shape: vec![2],
                values: vec![round as f32, 0.0],
            }],
        })
    }

    fn update() -> TrainedUpdate {
        TrainedUpdate {
            deltas: vec![NamedTensor {
                name: "head.weight".into(),
                shape: vec![2],
                values: vec![0.5, -0.5],
            }],
            metrics: Metrics {
                loss: 0.3,
                accuracy: 0.9,
                num_examples: 10,
                ..Metrics::default()
            },
        }
    }

    fn connected(id: &str) -> Session {
        let mut s = Session::new(id);
        s.on_event(Event::Connected {
            session_present: false,
        });
        s
    }

    fn train_actions(actions: &[Action]) -> Vec<(Round, u32, Round)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Train {
                    round,
                    sequence,
                    adapter,
                    ..
                } => Some((*round, *sequence, adapter.round)),
                _ => None,
            })
            .collect()
    }

    fn sent_updates(actions: &[Action]) -> Vec<(Round, u32)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(Outbound::Update {
                    round, sequence, ..
                }) => Some((*round, *sequence)),
                _ => None,
            })
            .collect()
    }

    fn async_announce(round: Round, max_staleness: u32) -> Event {
        match announce(round, &["c1"]) {
            Event::Announce(a) => Event::Announce(Announcement {
                max_staleness: Some(max_staleness),
                ..a
            }),
            other => other,
        }
    }

    #[test]
    fn an_asynchronous_run_takes_an_update_that_finished_after_the_round_moved_on() {
        let mut s = connected("c1");
        s.on_event(adapter(0));
        assert_eq!(
            train_actions(&s.on_event(async_announce(1, 2))),
            vec![(1, 0, 0)]
        );
        // Two new versions while c1 trains on version 0.
        s.on_event(adapter(1));
        s.on_event(async_announce(2, 2));
        s.on_event(adapter(2));
        s.on_event(async_announce(3, 2));
        let acts = s.on_event(Event::TrainingFinished {
            round: 1,
            sequence: 0,
            result: Ok(update()),
        });
        // Two rounds behind: sent, and c1 starts on the newest version at once.
        assert_eq!(sent_updates(&acts), vec![(1, 0)]);
        assert_eq!(train_actions(&acts), vec![(3, 1, 2)]);
        // Three rounds behind: dropped.
        s.on_event(adapter(5));
        s.on_event(async_announce(6, 2));
        let acts = s.on_event(Event::TrainingFinished {
            round: 3,
            sequence: 1,
            result: Ok(update()),
        });
        assert!(sent_updates(&acts).is_empty());
    }

    #[test]
    fn a_synchronous_run_drops_an_update_that_finished_after_the_round_moved_on() {
        let mut s = connected("c1");
        s.on_event(adapter(0));
        s.on_event(announce(1, &["c1"]));
        s.on_event(adapter(1));
        s.on_event(announce(2, &["c1"]));
        let acts = s.on_event(Event::TrainingFinished {
            round: 1,
            sequence: 0,
            result: Ok(update()),
        });
        assert!(sent_updates(&acts).is_empty());
    }

    #[test]
    fn connecting_subscribes_and_announces_itself_online_and_joins() {
        let mut s = Session::new("c1");
        let actions = s.on_event(Event::Connected {
            session_present: false,
        });
        assert!(matches!(actions[0], Action::Subscribe));
        assert!(matches!(actions[1], Action::Send(Outbound::StatusOnline)));
        assert!(matches!(actions[2], Action::Send(Outbound::Join)));
        assert_eq!(actions.len(), 3);
        assert!(s.is_connected());
    }

    #[test]
    fn a_reconnect_joins_again() {
        let mut s = connected("c1");
        s.on_event(Event::ConnectionLost);
        assert!(!s.is_connected());
        let actions = s.on_event(Event::Connected {
            session_present: true,
        });
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Send(Outbound::Join)))
        );
        assert_eq!(s.stats().connects, 2);
    }

    #[test]
    fn a_sampled_client_trains_once_it_has_the_rounds_adapter() {
        let mut s = connected("c1");
        assert!(train_actions(&s.on_event(announce(1, &["c1", "c2"]))).is_empty());
        let actions = s.on_event(adapter(0));
        assert_eq!(train_actions(&actions), vec![(1, 0, 0)]);
    }

    #[test]
    fn the_adapter_may_arrive_before_the_announcement() {
        let mut s = connected("c1");
        assert!(s.on_event(adapter(0)).is_empty());
        assert_eq!(
            train_actions(&s.on_event(announce(1, &["c1"]))),
            vec![(1, 0, 0)]
        );
    }

    #[test]
    fn rounds_it_is_not_sampled_in_are_ignored() {
        let mut s = connected("c1");
        s.on_event(adapter(3));
        let actions = s.on_event(announce(4, &["c2", "c3"]));
        assert!(train_actions(&actions).is_empty());
        // Redelivery of the same retained announcement is counted once.
        s.on_event(announce(4, &["c2", "c3"]));
        assert_eq!(s.stats().rounds_not_sampled, 1);
        // A prefix of the id is not the id.
        let actions = s.on_event(announce(5, &["c10"]));
        assert!(train_actions(&actions).is_empty());
    }

    #[test]
    fn an_adapter_older_than_the_one_held_is_dropped() {
        let mut s = connected("c1");
        s.on_event(adapter(2));
        assert!(s.on_event(adapter(1)).is_empty());
        assert_eq!(s.stats().stale_dropped, 1);
        assert_eq!(
            train_actions(&s.on_event(announce(3, &["c1"]))),
            vec![(3, 0, 2)]
        );
    }

    #[test]
    fn an_adapter_produced_by_the_announced_round_means_that_round_is_over() {
        let mut s = connected("c1");
        s.on_event(adapter(3));
        assert!(train_actions(&s.on_event(announce(3, &["c1"]))).is_empty());
    }

    #[test]
    fn after_a_failed_round_the_next_one_starts_from_the_unchanged_adapter() {
        // Round 2 missed its quorum: adapter 1 is still the newest when round 3 opens.
        let mut s = connected("c1");
        s.on_event(adapter(1));
        assert_eq!(
            train_actions(&s.on_event(announce(3, &["c1"]))),
            vec![(3, 0, 1)]
        );
    }

    #[test]
    fn an_older_announcement_is_dropped() {
        let mut s = connected("c1");
        s.on_event(announce(5, &["c2"]));
        s.on_event(adapter(4));
        let actions = s.on_event(announce(4, &["c1"]));
        assert!(train_actions(&actions).is_empty());
        assert_eq!(s.current_round(), Some(5));
    }

    #[test]
    fn a_round_is_trained_at_most_once_even_when_redelivered() {
        let mut s = connected("c1");
        s.on_event(announce(1, &["c1"]));
        assert_eq!(train_actions(&s.on_event(adapter(0))).len(), 1);
        let finished = s.on_event(Event::TrainingFinished {
            round: 1,
            sequence: 0,
            result: Ok(update()),
        });
        assert_eq!(sent_updates(&finished), vec![(1, 0)]);
        // Reconnect: the broker hands the retained messages over again.
        s.on_event(Event::ConnectionLost);
        s.on_event(Event::Connected {
            session_present: true,
        });
        assert!(train_actions(&s.on_event(announce(1, &["c1"]))).is_empty());
        assert!(train_actions(&s.on_event(adapter(0))).is_empty());
    }

    #[test]
    fn finished_training_is_published_with_the_round_and_a_fresh_sequence() {
        let mut s = connected("c1");
        s.on_event(adapter(0));
        s.on_event(announce(1, &["c1"]));
        let sent = s.on_event(Event::TrainingFinished {
            round: 1,
            sequence: 0,
            result: Ok(update()),
        });
        assert_eq!(sent_updates(&sent), vec![(1, 0)]);
        s.on_event(adapter(1));
        let t = s.on_event(announce(2, &["c1"]));
        assert_eq!(train_actions(&t), vec![(2, 1, 1)]);
        let sent = s.on_event(Event::TrainingFinished {
            round: 2,
            sequence: 1,
            result: Ok(update()),
        });
        assert_eq!(sent_updates(&sent), vec![(2, 1)]);
        assert_eq!(s.stats().updates_sent, 2);
    }

    #[test]
    fn after_a_reconnect_the_reannounced_round_gets_its_update_again_and_is_never_retrained() {
        let resends = |actions: &[Action]| {
            actions
                .iter()
                .filter_map(|a| match a {
                    Action::ResendUpdate { round } => Some(*round),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        let mut s = connected("c1");
        s.on_event(adapter(0));
        s.on_event(announce(1, &["c1"]));
        s.on_event(Event::TrainingFinished {
            round: 1,
            sequence: 0,
            result: Ok(update()),
        });
        s.on_event(Event::ConnectionLost);
        let back = s.on_event(Event::Connected {
            session_present: false,
        });
        assert!(
            resends(&back).is_empty(),
            "not before the round is announced again"
        );
        // The announcement comes again: the update goes again, and is not trained again.
        let again = s.on_event(announce(1, &["c1"]));
        assert_eq!(resends(&again), vec![1]);
        assert!(train_actions(&again).is_empty());
        // A further redelivery of the same announcement sends nothing more.
        assert!(resends(&s.on_event(announce(1, &["c1"]))).is_empty());
        assert_eq!(s.stats().updates_resent, 1);
        // Once the round has moved on, a reconnect sends nothing old.
        s.on_event(adapter(1));
        s.on_event(announce(2, &["c2"]));
        s.on_event(Event::ConnectionLost);
        s.on_event(Event::Connected {
            session_present: false,
        });
        assert!(resends(&s.on_event(announce(2, &["c2"]))).is_empty());
        assert_eq!(s.stats().updates_resent, 1);
    }

    #[test]
    fn training_that_ends_after_the_round_moved_on_is_not_sent_and_the_new_round_starts() {
        let mut s = connected("c1");
        s.on_event(adapter(0));
        s.on_event(announce(1, &["c1"]));
        // The aggregator closes round 0 at its deadline and opens round 1 while we train.
        s.on_event(adapter(1));
        let during = s.on_event(announce(2, &["c1"]));
        assert!(train_actions(&during).is_empty(), "one training at a time");
        let after = s.on_event(Event::TrainingFinished {
            round: 1,
            sequence: 0,
            result: Ok(update()),
        });
        assert!(sent_updates(&after).is_empty());
        assert_eq!(train_actions(&after), vec![(2, 1, 1)]);
        assert_eq!(s.stats().stale_dropped, 1);
    }

    #[test]
    fn a_dropout_round_vanishes_instead_of_publishing_and_later_rounds_go_on() {
        // Find a seed whose draws drop round 1 and keep round 2 at p = 0.5.
        let faults = (0..1000)
            .map(|seed| Faults {
                dropout: 0.5,
                seed,
                client_index: 3,
            })
            .find(|f| f.drops_out(1) && !f.drops_out(2))
            .expect("a seed that drops round 1 only");
        let mut s = Session::new("c1").with_faults(faults);
        s.on_event(Event::Connected {
            session_present: false,
        });
        s.on_event(adapter(0));
        s.on_event(announce(1, &["c1"]));
        let actions = s.on_event(Event::TrainingFinished {
            round: 1,
            sequence: 0,
            result: Ok(update()),
        });
        assert!(
            sent_updates(&actions).is_empty(),
            "no update in a dropout round"
        );
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Vanish { round: 1 }))
        );
        assert!(!s.is_connected());
        // Back again: the same round is neither retrained nor resent.
        s.on_event(Event::Connected {
            session_present: true,
        });
        let again = s.on_event(announce(1, &["c1"]));
        assert!(train_actions(&again).is_empty());
        assert!(
            !again
                .iter()
                .any(|a| matches!(a, Action::ResendUpdate { .. }))
        );
        // Round 2 is trained and published.
        s.on_event(adapter(1));
        assert_eq!(train_actions(&s.on_event(announce(2, &["c1"]))).len(), 1);
        let sent = s.on_event(Event::TrainingFinished {
            round: 2,
            sequence: 1,
            result: Ok(update()),
        });
        assert_eq!(sent_updates(&sent), vec![(2, 1)]);
        assert_eq!(s.dropped_rounds(), &[1]);
        assert_eq!(s.stats().rounds_dropped, 1);
    }

    #[test]
    fn dropout_draws_are_reproducible_and_near_their_probability() {
        let f = |index| Faults {
            dropout: 0.3,
            seed: 42,
            client_index: index,
        };
        let drops = (0..64u64)
            .flat_map(|i| (1..=30u32).map(move |r| (i, r)))
            .filter(|&(i, r)| f(i).drops_out(r))
            .count();
        assert_eq!(
            drops,
            (0..64u64)
                .flat_map(|i| (1..=30u32).map(move |r| (i, r)))
                .filter(|&(i, r)| f(i).drops_out(r))
                .count()
        );
        let share = drops as f64 / (64.0 * 30.0);
        assert!((share - 0.3).abs() < 0.05, "{share}");
        assert!(!Faults::default().drops_out(1));
    }

    #[test]
    fn a_failed_training_sends_nothing_and_is_counted() {
        let mut s = connected("c1");
        s.on_event(adapter(0));
        s.on_event(announce(1, &["c1"]));
        let actions = s.on_event(Event::TrainingFinished {
            round: 1,
            sequence: 0,
            result: Err("NaN loss".into()),
        });
        assert!(sent_updates(&actions).is_empty());
        assert_eq!(s.stats().training_failures, 1);
    }

    #[test]
    fn a_new_run_starts_its_rounds_over_and_ignores_the_old_runs_adapter() {
        let mut s = connected("c1");
        s.on_event(adapter(0));
        s.on_event(announce(1, &["c1"]));
        s.on_event(Event::TrainingFinished {
            round: 1,
            sequence: 0,
            result: Ok(update()),
        });
        let new_run = Announcement {
            run_id: 2,
            round: 1,
            sampled: vec!["c1".into()],
            plan: plan(),
            deadline_unix_ms: 0,
            secure: None,
            max_staleness: None,
        };
        // The old run's round-0 adapter must not be trained on in the new run.
        assert!(train_actions(&s.on_event(Event::Announce(new_run))).is_empty());
        let old = GlobalAdapter {
            run_id: 1,
            round: 0,
            tensors: vec![],
        };
        assert!(train_actions(&s.on_event(Event::Adapter(old))).is_empty());
        let fresh = GlobalAdapter {
            run_id: 2,
            round: 0,
            tensors: vec![],
        };
        assert_eq!(
            train_actions(&s.on_event(Event::Adapter(fresh))),
            vec![(1, 1, 0)]
        );
    }

    #[test]
    fn run_done_publishes_offline_disconnects_and_exits() {
        let mut s = connected("c1");
        let actions = s.on_event(Event::RunDone);
        assert!(matches!(actions[0], Action::Send(Outbound::StatusOffline)));
        assert!(matches!(actions[1], Action::Disconnect));
        assert!(matches!(actions[2], Action::Exit(ExitReason::RunDone)));
        assert!(s.is_finished());
        // Nothing happens after the decision to exit.
        assert!(s.on_event(announce(10, &["c1"])).is_empty());
        assert!(s.on_event(adapter(9)).is_empty());
    }

    #[test]
    fn a_signal_while_disconnected_exits_without_publishing() {
        let mut s = connected("c1");
        s.on_event(Event::ConnectionLost);
        let actions = s.on_event(Event::Shutdown);
        assert_eq!(actions.len(), 1);
        assert!(matches!(actions[0], Action::Exit(ExitReason::Signal)));
    }

    #[test]
    fn a_secure_round_hands_its_update_to_the_secure_client_and_never_sends_it_plain() {
        let mut s = connected("c1");
        s.on_event(adapter(0));
        let setup = fedpeft_protocol::SecAggSetup {
            neighbours: 2,
            threshold: 2,
            modulus_bits: 16,
            clip: 0.25,
            norm_bound: 0.0,
            reference_examples: 10,
            max_clients: 3,
            dp: None,
        };
        let Event::Announce(mut a) = announce(1, &["c1"]) else {
            unreachable!()
        };
        a.secure = Some(setup);
        assert_eq!(train_actions(&s.on_event(Event::Announce(a))).len(), 1);
        let actions = s.on_event(Event::TrainingFinished {
            round: 1,
            sequence: 0,
            result: Ok(update()),
        });
        assert!(sent_updates(&actions).is_empty(), "a plain update went out");
        assert!(actions.iter().any(|a| matches!(
            a,
            Action::Secure(step) if matches!(**step, SecureStep::Start { round: 1, .. })
        )));
        // Stage messages of the current round pass through; another round's are dropped.
        let unmask = |round| {
            Event::SecAgg(SecureDown::Unmask(fedpeft_protocol::SecAggUnmask {
                round,
                deadline_unix_ms: 0,
                survivors: vec![],
                dropped: vec![],
            }))
        };
        assert_eq!(s.on_event(unmask(1)).len(), 1);
        assert!(s.on_event(unmask(2)).is_empty());
    }
}
