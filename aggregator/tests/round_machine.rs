//! The round state machine driven event by event: no broker, no models, no clock.

use fedpeft_aggregator::adapter::Adapter;
use fedpeft_aggregator::checkpoint;
use fedpeft_aggregator::outbox::{Outbox, Outgoing, Packet};
use fedpeft_aggregator::round::{
    Action, DecodeFailure, Event, JoinInfo, MachineState, Phase, QuorumFailure, RejectReason,
    RoundMachine, Rules, RunSettings,
};
use fedpeft_aggregator::strategy::{self, StrategyKind};
use fedpeft_peft::NamedTensor;
use fedpeft_protocol::{
    ClientId, ClientState, ClientUpdate, Codec, DType, Envelope, FleetName, LocalConfig, Message,
    Optimizer, PeftMethod, SplitMix64, TrainMetrics,
};

const T0: u64 = 1_700_000_000_000;
const TIMEOUT: u64 = 10_000;

fn rules(rounds: u32, min_clients: usize, quorum: usize) -> Rules {
    Rules {
        run: RunSettings {
            run_id: 7,
            fleet: FleetName::new("test").unwrap(),
            rounds,
            min_clients,
            start_clients: min_clients,
            fraction: 1.0,
            quorum,
            round_timeout_ms: TIMEOUT,
            on_quorum_failure: QuorumFailure::Skip,
            seed: 42,
            local: LocalConfig {
                epochs: 1,
                batch_size: 32,
                learning_rate: 0.1,
                optimizer: Optimizer::Sgd {
                    momentum: 0.0,
                    weight_decay: 0.0,
                },
                fedprox_mu: 0.0,
                dp_sgd: None,
                update_dtype: DType::F32,
                top_k_fraction: None,
                seed: 0,
            },
            max_update_bytes: 10_000,
            max_update_norm: None,
            adaptive_norm_multiple: None,
            global_dtype: DType::F32,
            secure: None,
            site: None,
            buffered: None,
        },
        dp_sample_rate: None,
        backbone_params: 1000,
        checkpoint_every_update: false,
        backbone_id: Some("bb".into()),
        backbone_sha256: None,
        peft: Some(PeftMethod::Head),
    }
}

fn initial() -> Adapter {
    Adapter::new(vec![
        NamedTensor::new("w", vec![2], vec![1.0, -1.0]).unwrap(),
        NamedTensor::new("b", vec![1], vec![0.5]).unwrap(),
    ])
}

fn machine(rounds: u32, min_clients: usize, quorum: usize) -> RoundMachine {
    RoundMachine::new(
        rules(rounds, min_clients, quorum),
        strategy::build(&StrategyKind::FedAvg),
        initial(),
    )
}

fn id(c: &str) -> ClientId {
    ClientId::new(c).unwrap()
}

fn join(c: &str, n: u64) -> Event {
    Event::Joined {
        client: id(c),
        info: JoinInfo {
            num_examples: n,
            backbone_id: "bb".into(),
            backbone_sha256: [0; 32],
            peft: PeftMethod::Head,
        },
        wire_bytes: 50,
    }
}

fn update_msg(c: &str, round: u32, seq: u32, n: u64, w: [f32; 2], b: f32) -> ClientUpdate {
    let mut rng = SplitMix64::new(1);
    let enc = |name: &str, shape: &[u32], v: &[f32], rng: &mut SplitMix64| {
        fedpeft_protocol::Tensor::encode(name, shape, v, Codec::dense(DType::F32), rng).unwrap()
    };
    ClientUpdate {
        client: id(c),
        round,
        sequence: seq,
        num_examples: n,
        metrics: TrainMetrics {
            loss: 1.0,
            accuracy: 0.5,
            steps: 1,
            elapsed_ms: 1,
            epsilon: None,
        },
        tensors: vec![enc("w", &[2], &w, &mut rng), enc("b", &[1], &[b], &mut rng)],
    }
}

fn update(c: &str, round: u32, seq: u32, n: u64, w: [f32; 2], b: f32) -> Event {
    raw_update(c, update_msg(c, round, seq, n, w, b))
}

fn raw_update(topic_client: &str, u: ClientUpdate) -> Event {
    Event::Update {
        topic_client: id(topic_client),
        update: Box::new(Ok(u)),
        wire_bytes: 100,
        signed: false,
    }
}

/// The same update, its signature checked by the inbox (a signed fleet).
fn signed(ev: Event) -> Event {
    match ev {
        Event::Update {
            topic_client,
            update,
            wire_bytes,
            ..
        } => Event::Update {
            topic_client,
            update,
            wire_bytes,
            signed: true,
        },
        other => other,
    }
}

fn offline(c: &str) -> Event {
    Event::Status {
        client: id(c),
        state: ClientState::Offline,
        wire_bytes: 10,
    }
}

/// The packets the actions publish, as the shell's outbox seals them (unchunked, unsigned).
fn packets(actions: &[Action]) -> Vec<Packet> {
    let mut outbox = Outbox::new(FleetName::new("test").unwrap(), 7, None, 1 << 20);
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Publish {
                message,
                round,
                receivers,
            } => outbox.send(message.clone(), *round, receivers),
            _ => None,
        })
        .flat_map(|sealed| sealed.packets)
        .collect()
}

fn decoded(actions: &[Action]) -> Vec<(String, Message)> {
    packets(actions)
        .into_iter()
        .map(|p| (p.topic, Envelope::decode(&p.payload).unwrap().message))
        .collect()
}

/// Feeds `ev` as the shell does: its bytes counted in the machine's accounting round first.
fn fed(m: &mut RoundMachine, outbox: &mut Outbox, ev: Event, now: u64) -> Vec<Action> {
    if let Some((client, bytes)) = ev.sender() {
        let kind = ev.kind().unwrap_or("other");
        outbox.count_incoming(m.accounting_round(), client, kind, bytes);
    }
    m.on_event(ev, now)
}

fn rejected(m: &RoundMachine, reason: RejectReason) -> u64 {
    m.state().rejected_total.get(&reason).copied().unwrap_or(0)
}

/// Starts a 3-client machine and opens round 1.
fn started(rounds: u32, quorum: usize) -> RoundMachine {
    let mut m = machine(rounds, 3, quorum);
    m.on_event(Event::Start, T0);
    for c in ["a", "b", "c"] {
        m.on_event(join(c, 10), T0);
    }
    assert!(matches!(m.state().phase, Phase::Collecting(ref o) if o.round == 1));
    m
}

#[test]
fn round_starts_once_min_clients_joined_with_global_then_announce() {
    let mut m = machine(2, 2, 2);
    let start = m.on_event(Event::Start, T0);
    assert!(
        start
            .iter()
            .any(|a| matches!(a, Action::Evaluate { round: 0, .. }))
    );
    let msgs = decoded(&start);
    assert_eq!(msgs.len(), 1);
    assert!(msgs[0].0.ends_with("/global"));
    assert!(matches!(&msgs[0].1, Message::GlobalAdapter(g) if g.round == 0));
    assert!(decoded(&m.on_event(join("a", 10), T0)).is_empty());
    let msgs = decoded(&m.on_event(join("b", 10), T0 + 5));
    assert_eq!(msgs.len(), 1);
    let Message::RoundAnnounce(a) = &msgs[0].1 else {
        panic!("expected an announcement, got {:?}", msgs[0].1)
    };
    assert!(msgs[0].0.ends_with("/round"));
    assert_eq!(a.round, 1);
    assert_eq!(a.deadline_unix_ms, T0 + 5 + TIMEOUT);
    assert!(!a.is_run_done());
}

#[test]
fn round_closes_when_all_sampled_replied_with_weighted_fedavg() {
    let mut m = machine(1, 3, 3);
    let mut outbox = Outbox::new(FleetName::new("test").unwrap(), 7, None, 1 << 20);
    fed(&mut m, &mut outbox, Event::Start, T0);
    for c in ["a", "b", "c"] {
        fed(&mut m, &mut outbox, join(c, 10), T0);
    }
    fed(
        &mut m,
        &mut outbox,
        update("a", 1, 0, 10, [1.0, 0.0], 0.0),
        T0 + 1,
    );
    fed(
        &mut m,
        &mut outbox,
        update("b", 1, 0, 30, [0.0, 4.0], 1.0),
        T0 + 2,
    );
    let acts = fed(
        &mut m,
        &mut outbox,
        update("c", 1, 0, 60, [0.0, 0.0], -1.0),
        T0 + 3,
    );
    // w = [1, -1] + (10·[1,0] + 30·[0,4]) / 100 = [1.1, 0.2]; b = 0.5 + (30 − 60)/100 = 0.2.
    let g = &m.state().global;
    assert_eq!(
        g.tensors[0].values,
        vec![(1.0f64 + 0.1) as f32, (-1.0f64 + 1.2) as f32]
    );
    assert_eq!(g.tensors[1].values, vec![(0.5f64 - 0.3) as f32]);
    let msgs = decoded(&acts);
    assert!(matches!(&msgs[0].1, Message::GlobalAdapter(ga) if ga.round == 1));
    assert!(acts.iter().any(|a| matches!(a, Action::Checkpoint)));
    assert!(
        acts.iter()
            .any(|a| matches!(a, Action::Evaluate { round: 1, .. }))
    );
    assert!(matches!(acts.last(), Some(Action::Finished)));
    let Message::RoundAnnounce(done) = &msgs.last().unwrap().1 else {
        panic!("last publish is not the final announcement")
    };
    assert!(done.is_run_done());
    let rec = &m.state().records[1];
    assert_eq!(
        (rec.status.as_str(), rec.clients_ok, rec.clients_failed),
        ("ok", 3, 0)
    );
    // The joins before round 1 and the updates count in round 1.
    assert_eq!(outbox.ledger().round(1).up_bytes, 3 * 50 + 3 * 100);
    assert_eq!(rec.full_model_fedavg_bytes, 1000 * 4 * 2 * 3);
    assert_eq!(rec.train_loss, Some(1.0));
    assert!(m.is_done());
}

#[test]
fn deadline_with_quorum_closes_the_round_and_counts_silent_clients_as_failed() {
    let mut m = started(2, 2);
    m.on_event(update("a", 1, 0, 10, [1.0, 1.0], 1.0), T0 + 1);
    m.on_event(update("b", 1, 0, 10, [3.0, 3.0], 3.0), T0 + 2);
    assert!(m.on_event(Event::Tick, T0 + TIMEOUT - 1).is_empty());
    m.on_event(Event::Tick, T0 + TIMEOUT);
    let rec = &m.state().records[1];
    assert_eq!(rec.status, "ok");
    assert_eq!(rec.clients_failed, 1);
    assert_eq!(rec.failed_clients["c"], "no reply by the deadline");
    assert_eq!(m.state().global.tensors[0].values, vec![3.0, 1.0]);
    // Round 2 opened right away.
    assert!(matches!(m.state().phase, Phase::Collecting(ref o) if o.round == 2));
}

#[test]
fn deadline_without_quorum_fails_the_round_and_keeps_the_global_adapter() {
    let mut m = started(2, 2);
    m.on_event(update("a", 1, 0, 10, [1.0, 1.0], 1.0), T0 + 1);
    m.on_event(Event::Tick, T0 + TIMEOUT);
    let rec = &m.state().records[1];
    assert_eq!(rec.status, "failed");
    assert_eq!(rec.clients_ok, 1);
    assert_eq!(m.state().global, initial());
    assert!(matches!(m.state().phase, Phase::Collecting(ref o) if o.round == 2));
}

#[test]
fn extend_policy_keeps_accepted_updates_and_moves_the_deadline() {
    let mut r = rules(1, 3, 2);
    r.on_quorum_failure = QuorumFailure::Extend { max_extensions: 1 };
    let mut m = RoundMachine::new(r, strategy::build(&StrategyKind::FedAvg), initial());
    m.on_event(Event::Start, T0);
    for c in ["a", "b", "c"] {
        m.on_event(join(c, 10), T0);
    }
    m.on_event(update("a", 1, 0, 10, [1.0, 1.0], 1.0), T0 + 1);
    let acts = m.on_event(Event::Tick, T0 + TIMEOUT);
    let msgs = decoded(&acts);
    assert!(
        matches!(&msgs[0].1, Message::RoundAnnounce(a) if a.deadline_unix_ms == T0 + 2 * TIMEOUT)
    );
    m.on_event(update("b", 1, 0, 10, [3.0, 3.0], 3.0), T0 + TIMEOUT + 1);
    m.on_event(Event::Tick, T0 + 2 * TIMEOUT);
    assert_eq!(m.state().records[1].status, "ok");
    assert_eq!(m.state().global.tensors[1].values, vec![2.5]);
}

#[test]
fn last_will_of_a_sampled_client_counts_as_failure_and_closes_the_round_early() {
    let mut m = started(1, 2);
    m.on_event(update("a", 1, 0, 10, [1.0, 1.0], 1.0), T0 + 1);
    m.on_event(update("b", 1, 0, 10, [1.0, 1.0], 1.0), T0 + 2);
    let acts = m.on_event(offline("c"), T0 + 3);
    assert!(acts.iter().any(|a| matches!(a, Action::Finished)));
    let rec = &m.state().records[1];
    assert_eq!(rec.failed_clients["c"], "offline");
    assert_eq!((rec.clients_ok, rec.clients_failed), (2, 1));
}

#[test]
fn redelivered_update_is_idempotent_and_counted_as_duplicate() {
    let mut m = started(1, 3);
    let u = update("a", 1, 0, 10, [1.0, 1.0], 1.0);
    m.on_event(u.clone(), T0 + 1);
    m.on_event(u.clone(), T0 + 2);
    // A second, different update in the same round is a duplicate too.
    m.on_event(update("a", 1, 1, 10, [9.0, 9.0], 9.0), T0 + 3);
    assert_eq!(rejected(&m, RejectReason::Duplicate), 2);
    m.on_event(update("b", 1, 0, 10, [1.0, 1.0], 1.0), T0 + 4);
    m.on_event(update("c", 1, 0, 10, [1.0, 1.0], 1.0), T0 + 5);
    assert_eq!(m.state().global.tensors[0].values, vec![2.0, 0.0]);
    // After the round closed, a redelivery is still a duplicate, not a late update.
    m.on_event(u, T0 + 6);
    assert_eq!(rejected(&m, RejectReason::Duplicate), 3);
    assert_eq!(rejected(&m, RejectReason::Late), 0);
}

#[test]
fn every_kind_of_bad_update_is_rejected_and_counted_by_reason() {
    let mut m = started(2, 3);
    let good = [0.0, 0.0];
    // Unknown client.
    m.on_event(update("zed", 1, 0, 10, good, 0.0), T0);
    // Body names another client than the topic.
    m.on_event(raw_update("a", update_msg("b", 1, 0, 10, good, 0.0)), T0);
    // Future round.
    m.on_event(update("a", 5, 0, 10, good, 0.0), T0);
    // Wrong shape: tensor `b` missing.
    let mut short = update_msg("a", 1, 0, 10, good, 0.0);
    short.tensors.pop();
    m.on_event(raw_update("a", short), T0);
    // Non-finite values.
    m.on_event(update("b", 1, 0, 10, [f32::NAN, 0.0], 0.0), T0);
    // Oversized on the wire.
    m.on_event(
        Event::Update {
            topic_client: id("c"),
            update: Box::new(Ok(update_msg("c", 1, 0, 10, good, 0.0))),
            wire_bytes: 10_001,
            signed: false,
        },
        T0,
    );
    // Failures found by the decoder.
    for reason in [
        RejectReason::Malformed,
        RejectReason::BadChecksum,
        RejectReason::WrongVersion,
    ] {
        m.on_event(
            Event::Update {
                topic_client: id("c"),
                update: Box::new(Err(DecodeFailure {
                    reason,
                    round: Some(1),
                    detail: "from the decoder".into(),
                })),
                wire_bytes: 30,
                signed: false,
            },
            T0,
        );
    }
    for reason in [
        RejectReason::UnknownClient,
        RejectReason::ClientMismatch,
        RejectReason::FutureRound,
        RejectReason::WrongShape,
        RejectReason::NonFinite,
        RejectReason::Oversized,
        RejectReason::Malformed,
        RejectReason::BadChecksum,
        RejectReason::WrongVersion,
    ] {
        assert_eq!(rejected(&m, reason), 1, "{reason}");
    }
    // None of them was signed: they may come from anybody, so a, b and c are still waited
    // for; at the deadline they count as silent, global unchanged.
    assert!(
        matches!(m.state().phase, Phase::Collecting(ref o) if o.round == 1 && o.failed.is_empty())
    );
    m.on_event(Event::Tick, T0 + TIMEOUT);
    let rec = &m.state().records[1];
    assert_eq!(rec.status, "failed");
    assert_eq!(rec.clients_failed, 3);
    assert_eq!(rec.failed_clients["a"], "no reply by the deadline");
    assert_eq!(rec.rejected[&RejectReason::NonFinite], 1);
    assert_eq!(m.state().global, initial());
    // Round 2 is open: a round-1 update is late, a round-0 one stale.
    m.on_event(update("a", 1, 3, 10, good, 0.0), T0 + TIMEOUT + 1);
    m.on_event(update("a", 0, 4, 10, good, 0.0), T0 + TIMEOUT + 1);
    assert_eq!(rejected(&m, RejectReason::Late), 1);
    assert_eq!(rejected(&m, RejectReason::Stale), 1);
}

#[test]
fn round_one_waits_for_start_clients_then_samples_from_all_of_them() {
    let mut r = rules(2, 2, 2);
    r.start_clients = 4;
    r.fraction = 0.0; // sample exactly min_clients = 2
    let mut m = RoundMachine::new(r, strategy::build(&StrategyKind::FedAvg), initial());
    m.on_event(Event::Start, T0);
    for c in ["a", "b", "c"] {
        assert!(
            decoded(&m.on_event(join(c, 1), T0)).is_empty(),
            "{c} started round 1"
        );
    }
    assert!(matches!(m.state().phase, Phase::Waiting { next_round: 1 }));
    let msgs = decoded(&m.on_event(join("d", 1), T0));
    assert!(matches!(&msgs[..], [(_, Message::RoundAnnounce(a))] if a.round == 1));
    let Phase::Collecting(open) = &m.state().phase else {
        panic!("round 1 should be open")
    };
    assert_eq!(open.sampled.len(), 2);
    let sampled: Vec<String> = open.sampled.iter().cloned().collect();
    // Later rounds need only min_clients: the two unsampled clients go offline, and round 2
    // still opens when round 1 closes.
    for c in ["a", "b", "c", "d"]
        .iter()
        .filter(|c| !sampled.iter().any(|s| s == *c))
    {
        m.on_event(offline(c), T0 + 1);
    }
    for c in &sampled {
        m.on_event(update(c, 1, 0, 1, [0.0, 0.0], 0.0), T0 + 1);
    }
    let Phase::Collecting(open) = &m.state().phase else {
        panic!("round 2 should be open after round 1 closed")
    };
    assert_eq!(open.round, 2);
}

#[test]
fn unsampled_client_and_older_sequence_are_rejected() {
    let mut r = rules(2, 2, 1);
    r.fraction = 0.0; // sample exactly min_clients = 2 of 3
    let mut m = RoundMachine::new(r, strategy::build(&StrategyKind::FedAvg), initial());
    m.on_event(Event::Start, T0);
    m.on_event(join("a", 1), T0);
    m.on_event(join("b", 1), T0);
    // Round 1 starts with a and b; c joins later and is not sampled.
    m.on_event(join("c", 1), T0);
    m.on_event(update("c", 1, 0, 1, [0.0, 0.0], 0.0), T0 + 1);
    assert_eq!(rejected(&m, RejectReason::NotSampled), 1);
    m.on_event(update("a", 1, 5, 1, [0.0, 0.0], 0.0), T0 + 1);
    m.on_event(update("b", 1, 5, 1, [0.0, 0.0], 0.0), T0 + 1);
    let Phase::Collecting(open) = &m.state().phase else {
        panic!("round 2 should be open")
    };
    let client = open.sampled.iter().find(|c| *c != "c").unwrap().clone();
    // A sequence at or before the last accepted one is stale.
    m.on_event(update(&client, 2, 5, 1, [0.0, 0.0], 0.0), T0 + 2);
    assert_eq!(rejected(&m, RejectReason::Stale), 1);
}

#[test]
fn incompatible_join_is_refused() {
    let mut m = machine(1, 1, 1);
    m.on_event(Event::Start, T0);
    m.on_event(
        Event::Joined {
            client: id("x"),
            info: JoinInfo {
                num_examples: 1,
                backbone_id: "other".into(),
                backbone_sha256: [0; 32],
                peft: PeftMethod::Head,
            },
            wire_bytes: 10,
        },
        T0,
    );
    assert_eq!(rejected(&m, RejectReason::Incompatible), 1);
    assert!(matches!(m.state().phase, Phase::Waiting { .. }));
}

#[test]
fn sampling_is_seeded_and_respects_fraction_and_minimum() {
    use fedpeft_aggregator::round::sample_clients;
    let all: Vec<String> = (0..20).map(|i| format!("c{i:02}")).collect();
    let a = sample_clients(&all, 0.25, 2, 9, 3);
    assert_eq!(a.len(), 5);
    assert_eq!(a, sample_clients(&all, 0.25, 2, 9, 3));
    assert_ne!(a, sample_clients(&all, 0.25, 2, 9, 4));
    assert_eq!(sample_clients(&all, 0.01, 4, 9, 3).len(), 4);
    assert_eq!(sample_clients(&all[..3], 0.5, 8, 9, 3).len(), 3);
}

/// Feeds a fixed script of events, optionally checkpointing and restoring after `split` events.
fn scripted(split: Option<usize>) -> (RoundMachine, Vec<Action>) {
    let script: Vec<(Event, u64)> = vec![
        (join("a", 10), T0),
        (join("b", 20), T0),
        (join("c", 30), T0),
        (update("a", 1, 0, 10, [1.0, 2.0], 0.5), T0 + 1),
        (update("b", 1, 0, 20, [-1.0, 0.5], 0.25), T0 + 2),
        // (restore happens here when split = Some(5))
        (update("c", 1, 0, 30, [0.1, 0.2], 0.3), T0 + 3),
        // Redelivery of a's round-1 update after the restart: must stay a duplicate.
        (update("a", 1, 0, 10, [1.0, 2.0], 0.5), T0 + 4),
        (update("a", 2, 1, 10, [0.5, 0.5], 0.5), T0 + 5),
        (update("b", 2, 1, 20, [0.25, -0.5], 0.0), T0 + 6),
        (Event::Tick, T0 + 4 + TIMEOUT + 100_000),
    ];
    let mut r = rules(2, 3, 2);
    r.on_quorum_failure = QuorumFailure::Skip;
    let kind = StrategyKind::FedAdam(Default::default());
    let mut m = RoundMachine::new(r.clone(), strategy::build(&kind), initial());
    let mut last = m.on_event(Event::Start, T0);
    for (i, (e, now)) in script.into_iter().enumerate() {
        if Some(i) == split {
            let path = std::path::Path::new("ck");
            let bytes = checkpoint::to_bytes(m.state(), path).unwrap();
            drop(m);
            let state: MachineState = checkpoint::from_bytes(&bytes, path).unwrap();
            m = RoundMachine::restore(r.clone(), strategy::build(&kind), state).unwrap();
            m.on_event(Event::Start, now);
            for c in ["a", "b", "c"] {
                m.on_event(join(c, 10 * (c.as_bytes()[0] - b'a' + 1) as u64), now);
            }
        }
        last = m.on_event(e, now);
    }
    (m, last)
}

#[test]
fn resume_from_a_mid_round_checkpoint_equals_the_uninterrupted_run() {
    let (a, _) = scripted(None);
    let (b, _) = scripted(Some(5));
    assert!(a.is_done() && b.is_done());
    assert_eq!(a.state().global, b.state().global);
    assert_eq!(a.state().strategy_state, b.state().strategy_state);
    assert_eq!(a.state().accepted_updates, b.state().accepted_updates);
    assert_eq!(a.state().rejected_total, b.state().rejected_total);
    assert_eq!(a.state().accepted_updates.len(), 5);
    assert_eq!(a.state().rejected_total[&RejectReason::Duplicate], 1);
    let ok = |m: &RoundMachine| {
        m.state()
            .records
            .iter()
            .map(|r| (r.round, r.status, r.clients_ok, r.clients_failed))
            .collect::<Vec<_>>()
    };
    assert_eq!(ok(&a), ok(&b));
    // And the global really moved (FedAdam), so the comparison is not vacuous.
    assert_ne!(a.state().global, initial());
}

#[test]
fn restore_refuses_a_checkpoint_of_another_run_or_strategy() {
    let m = started(1, 3);
    let state = m.state().clone();
    let mut other = rules(1, 3, 3);
    other.run_id = 8;
    let err = RoundMachine::restore(other, strategy::build(&StrategyKind::FedAvg), state.clone())
        .unwrap_err();
    assert!(err.to_string().contains("run 7"), "{err}");
    let err = RoundMachine::restore(
        rules(1, 3, 3),
        strategy::build(&StrategyKind::Median),
        state,
    )
    .unwrap_err();
    assert!(err.to_string().contains("fedavg"), "{err}");
}

#[test]
fn corrupt_checkpoint_is_an_error_naming_the_file_and_keeps_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agg.ckpt");
    let m = started(1, 3);
    checkpoint::save(m.state(), &path).unwrap();
    let good = std::fs::read(&path).unwrap();
    assert_eq!(checkpoint::load(&path).unwrap().as_ref(), Some(m.state()));
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x40;
    let err = checkpoint::from_bytes::<MachineState>(&bad, &path).unwrap_err();
    assert!(err.to_string().contains("agg.ckpt"), "{err}");
    assert!(err.to_string().contains("corrupt"), "{err}");
    std::fs::write(&path, &good[..20]).unwrap();
    assert!(
        checkpoint::load::<MachineState>(&path)
            .unwrap_err()
            .to_string()
            .contains("agg.ckpt")
    );
    assert!(
        checkpoint::load::<MachineState>(&dir.path().join("none"))
            .unwrap()
            .is_none()
    );
}

/// Runs `rounds` rounds of a, b, c with the given updates per round, restoring from a
/// checkpoint after round `restore_after` (if any).
fn robust_run(
    r: Rules,
    dp: Option<&strategy::ClientDp>,
    rounds: &[[([f32; 2], f32); 3]],
    restore_after: Option<u32>,
) -> RoundMachine {
    let build = || strategy::build_with(&StrategyKind::FedAvg, dp).unwrap();
    let mut m = RoundMachine::new(r.clone(), build(), initial());
    let mut now = T0;
    m.on_event(Event::Start, now);
    for c in ["a", "b", "c"] {
        m.on_event(join(c, 10), now);
    }
    for (i, ups) in rounds.iter().enumerate() {
        let round = i as u32 + 1;
        for (c, (w, b)) in ["a", "b", "c"].iter().zip(ups) {
            now += 1;
            m.on_event(update(c, round, round, 10, *w, *b), now);
        }
        assert_eq!(m.state().records.last().unwrap().round, round);
        if Some(round) == restore_after {
            let path = std::path::Path::new("ck");
            let bytes = checkpoint::to_bytes(m.state(), path).unwrap();
            let state = checkpoint::from_bytes(&bytes, path).unwrap();
            m = RoundMachine::restore(r.clone(), build(), state).unwrap();
            m.on_event(Event::Start, now);
            for c in ["a", "b", "c"] {
                m.on_event(join(c, 10), now);
            }
        }
    }
    m
}

#[test]
fn adaptive_norm_bound_clips_an_outsized_update_and_counts_it_per_round() {
    let mut r = rules(2, 3, 3);
    r.adaptive_norm_multiple = Some(2.0);
    // Round 1 has no bound (no reference yet); norms 5, 5, 500 → median 5 → round 2 bound 10.
    let honest = ([3.0, 4.0], 0.0);
    let attack = ([-300.0, -400.0], 0.0);
    let m = robust_run(
        r,
        None,
        &[[honest, honest, attack], [honest, attack, honest]],
        Some(1),
    );
    let recs = &m.state().records;
    assert_eq!(recs[1].robust.norm_bound, None);
    assert_eq!(recs[1].robust.clipped, 0);
    assert_eq!(recs[1].robust.median_norm, Some(5.0));
    assert_eq!(recs[2].robust.norm_bound, Some(10.0));
    assert_eq!(recs[2].robust.clipped, 1);
    assert_eq!(recs[2].robust.clipped_clients, vec!["b".to_string()]);
    assert_eq!(m.state().clipped_total, 1);
    // Round 2: a = c = [3, 4], b clipped to [−6, −8]: mean [0, 0] added to round 1's global.
    let g1 = [
        1.0 + (3.0 + 3.0 - 300.0) / 3.0,
        -1.0 + (4.0 + 4.0 - 400.0) / 3.0,
    ];
    let g = &m.state().global.tensors[0].values;
    assert!(
        (f64::from(g[0]) - g1[0]).abs() < 1e-4 && (f64::from(g[1]) - g1[1]).abs() < 1e-4,
        "{g:?}"
    );
}

#[test]
fn client_level_dp_through_the_machine_reports_epsilon_and_a_restart_keeps_it() {
    let dp = strategy::ClientDp {
        clip_norm: 1.0,
        noise_multiplier: 1.0,
        expected_clients: 3,
        fleet_size: 30,
        delta: 1e-5,
        noise_seed: Some(3),
        on_devices: false,
    };
    let mut r = rules(3, 3, 3);
    r.max_update_norm = Some(dp.clip_norm);
    r.dp_sample_rate = Some(dp.sample_rate());
    let u = ([3.0, 4.0], 0.0);
    let rounds = [[u, u, u], [u, u, u], [u, u, u]];
    let straight = robust_run(r.clone(), Some(&dp), &rounds, None);
    let resumed = robust_run(r, Some(&dp), &rounds, Some(2));
    let eps: Vec<f64> = straight.state().records[1..]
        .iter()
        .map(|rec| rec.robust.dp_epsilon.unwrap())
        .collect();
    assert!(eps[0] < eps[1] && eps[1] < eps[2], "{eps:?}");
    assert!((eps[2] - dp.epsilon_after(3)).abs() < 1e-12);
    for rec in &straight.state().records[1..] {
        assert_eq!(
            rec.robust.clipped, 3,
            "every update (norm 5) is clipped to S = 1"
        );
        assert_eq!(rec.robust.dp_noise_std, Some(1.0 / 3.0));
        assert_eq!(rec.robust.dp_delta, Some(1e-5));
    }
    // The restarted machine continues the accountant, the clip counts and the noise.
    assert_eq!(
        resumed.state().records,
        straight
            .state()
            .records
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r.duration_ms = resumed.state().records[r.round as usize].duration_ms;
                r.started_unix_ms = resumed.state().records[r.round as usize].started_unix_ms;
                r
            })
            .collect::<Vec<_>>()
    );
    assert_eq!(resumed.state().clipped_total, 9);
    assert_eq!(resumed.state().global, straight.state().global);
}

fn with_epsilon(c: &str, round: u32, seq: u32, eps: Option<f32>) -> Event {
    let mut u = update_msg(c, round, seq, 10, [0.0, 0.0], 0.0);
    u.metrics.epsilon = eps;
    raw_update(c, u)
}

/// Clients training with DP-SGD state their own ε with each update: each round records what
/// its accepted clients stated, a restart keeps it, and the report gives each client's latest
/// (its whole-run ε), their median and largest. A figure that is not one is not recorded, and
/// the update still counts.
#[test]
fn the_dp_sgd_epsilon_clients_state_is_recorded_per_round_and_reported_per_client() {
    let mut m = started(2, 3);
    m.on_event(with_epsilon("a", 1, 0, Some(1.0)), T0 + 1);
    m.on_event(with_epsilon("b", 1, 0, Some(2.0)), T0 + 2);
    m.on_event(with_epsilon("c", 1, 0, Some(f32::NAN)), T0 + 3);
    let r1 = &m.state().records[1];
    assert_eq!(r1.clients_ok, 3, "a NaN epsilon does not cost the update");
    assert_eq!(
        r1.local_dp_epsilon
            .iter()
            .map(|(k, &v)| (k.as_str(), v))
            .collect::<Vec<_>>(),
        [("a", 1.0), ("b", 2.0)]
    );
    m.on_event(with_epsilon("a", 2, 1, Some(1.5)), T0 + 4);
    // Round 2 is still open when the aggregator restarts: the stated ε is in the checkpoint.
    let path = std::path::Path::new("ck");
    let bytes = checkpoint::to_bytes(m.state(), path).unwrap();
    let state: MachineState = checkpoint::from_bytes(&bytes, path).unwrap();
    let Phase::Collecting(open) = &state.phase else {
        panic!("round 2 is open")
    };
    assert_eq!(open.local_dp_epsilon.get("a"), Some(&1.5));
    let mut m = RoundMachine::restore(
        rules(2, 3, 3),
        strategy::build(&StrategyKind::FedAvg),
        state,
    )
    .unwrap();
    m.on_event(Event::Start, T0 + 5);
    for c in ["a", "b", "c"] {
        m.on_event(join(c, 10), T0 + 5);
    }
    m.on_event(with_epsilon("b", 2, 1, None), T0 + 6);
    m.on_event(with_epsilon("c", 2, 1, Some(3.0)), T0 + 7);
    assert!(m.is_done());
    let info = fedpeft_aggregator::report::RunInfo {
        fleet: "test".into(),
        peft: "head".into(),
        rounds_planned: 2,
        backbone_params: 1000,
    };
    let report = fedpeft_aggregator::report::build(m.state(), &Default::default(), &info, true);
    let local = report.local_dp.as_ref().expect("clients stated an epsilon");
    assert_eq!(
        local
            .clients
            .iter()
            .map(|(k, &v)| (k.as_str(), v))
            .collect::<Vec<_>>(),
        [("a", 1.5), ("b", 2.0), ("c", 3.0)]
    );
    assert_eq!((local.median, local.max), (2.0, 3.0));
    let csv = fedpeft_aggregator::report::csv(&report);
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let round2: Vec<&str> = csv.lines().nth(3).unwrap().split(',').collect();
    assert_eq!(round2[col("local_dp_epsilon_median")], "2.250000");
    assert_eq!(round2[col("local_dp_epsilon_max")], "3.000000");
    assert!(
        fedpeft_aggregator::report::summary(&report)
            .contains("ε median 2.000, largest 3.000, over 3 clients")
    );
    // Without DP-SGD there is nothing to report.
    let plain =
        fedpeft_aggregator::report::build(started(1, 3).state(), &Default::default(), &info, false);
    assert!(plain.local_dp.is_none());
}

/// What the durable mode persists, and in which order: every join, a client going offline, a
/// round's start before its announcement; a reconnect publishes the same state again.
#[test]
fn durable_mode_checkpoints_joins_and_round_starts_before_announcing_and_republishes_on_reconnect()
{
    let mut r = rules(2, 2, 2);
    r.checkpoint_every_update = true;
    let mut m = RoundMachine::new(r.clone(), strategy::build(&StrategyKind::FedAvg), initial());
    m.on_event(Event::Start, T0);
    let first = m.on_event(join("a", 10), T0);
    let saved = first
        .iter()
        .filter(|a| matches!(a, Action::Checkpoint))
        .count();
    assert_eq!(saved, 1, "one checkpoint per join");
    // The shell writes the machine's state as it is after the event.
    assert!(m.state().clients.contains_key("a"));

    // The join that completes min_clients starts round 1: one checkpoint, holding the open
    // round, and it comes before the announcement.
    let second = m.on_event(join("b", 10), T0 + 1);
    let ckpt = second
        .iter()
        .position(|a| matches!(a, Action::Checkpoint))
        .expect("round start checkpointed");
    let announce = second
        .iter()
        .position(|a| {
            matches!(
                a,
                Action::Publish {
                    message: Outgoing::Announce(_),
                    ..
                }
            )
        })
        .expect("round announced");
    assert!(
        ckpt < announce,
        "the checkpoint must precede the announcement"
    );
    assert_eq!(
        second
            .iter()
            .filter(|a| matches!(a, Action::Checkpoint))
            .count(),
        1
    );
    assert!(matches!(m.state().phase, Phase::Collecting(ref o) if o.round == 1));

    // The broker came back: the same global and announcement again, deadline unchanged,
    // nothing to persist.
    let again = m.on_event(Event::Reconnected, T0 + 5_000);
    assert!(!again.iter().any(|a| matches!(a, Action::Checkpoint)));
    let msgs = decoded(&again);
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert!(matches!(&msgs[0].1, Message::GlobalAdapter(g) if g.round == 0));
    let Message::RoundAnnounce(a) = &msgs[1].1 else {
        panic!("expected the announcement again, got {:?}", msgs[1].1)
    };
    assert_eq!((a.round, a.deadline_unix_ms), (1, T0 + 1 + TIMEOUT));

    // Going offline is persisted; a restored machine keeps who is online.
    let gone = m.on_event(offline("b"), T0 + 6_000);
    assert!(gone.iter().any(|a| matches!(a, Action::Checkpoint)));
    let restored =
        RoundMachine::restore(r, strategy::build(&StrategyKind::FedAvg), m.state().clone())
            .unwrap();
    assert!(restored.state().clients["a"].online);
    assert!(!restored.state().clients["b"].online);
}

/// The global adapters a list of actions published, decoded to f32.
fn published_globals(actions: &[Action]) -> Vec<(u32, Vec<Vec<f32>>, usize)> {
    packets(actions)
        .iter()
        .filter_map(|p| {
            let payload = &p.payload;
            match Envelope::decode(payload).unwrap().message {
                Message::GlobalAdapter(g) => Some((
                    g.round,
                    g.tensors.iter().map(|t| t.to_f32()).collect(),
                    payload.len(),
                )),
                _ => None,
            }
        })
        .collect()
}

#[test]
fn an_int8_global_is_what_the_aggregator_itself_holds_evaluates_and_builds_on() {
    let mut r = rules(2, 3, 1);
    r.global_dtype = DType::I8;
    // A wider adapter, so int8 rounding is visible and the payload shrinks.
    let values: Vec<f32> = (0..400).map(|i| ((i as f32) * 0.37).sin()).collect();
    let wide = Adapter::new(vec![
        NamedTensor::new("w", vec![400], values.clone()).unwrap(),
    ]);
    let mut m = RoundMachine::new(
        r.clone(),
        strategy::build(&StrategyKind::FedAvg),
        wide.clone(),
    );
    let mut f32_rules = r;
    f32_rules.global_dtype = DType::F32;
    let reference = RoundMachine::new(f32_rules, strategy::build(&StrategyKind::FedAvg), wide);
    // The initial adapter is adopted in its int8 form; the f32 machine keeps it exactly.
    assert_eq!(reference.state().global.tensors[0].values, values);
    let held = m.state().global.tensors[0].values.clone();
    assert_ne!(held, values, "int8 rounding changed some values");
    let step = values.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
    assert!(
        held.iter()
            .zip(&values)
            .all(|(h, v)| (h - v).abs() <= step * 1.0001)
    );

    let start = m.on_event(Event::Start, T0);
    let globals = published_globals(&start);
    assert_eq!(globals.len(), 1);
    assert_eq!(globals[0].1[0], held, "published = held, bit for bit");
    assert!(
        globals[0].2 < 400 * 2,
        "{} bytes for 400 int8 values",
        globals[0].2
    );
    let evaluated = start.iter().find_map(|a| match a {
        Action::Evaluate { round: 0, adapter } => Some(adapter.tensors[0].values.clone()),
        _ => None,
    });
    assert_eq!(evaluated.as_deref(), Some(held.as_slice()));

    for c in ["a", "b", "c"] {
        m.on_event(join(c, 10), T0);
    }
    let delta = |k: f32| -> Event {
        let d: Vec<f32> = (0..400)
            .map(|i| k * ((i as f32) * 0.11).cos() * 0.01)
            .collect();
        let mut rng = SplitMix64::new(1);
        raw_update(
            "a",
            ClientUpdate {
                client: id("a"),
                round: 1,
                sequence: 0,
                num_examples: 10,
                metrics: TrainMetrics {
                    loss: 1.0,
                    accuracy: 0.5,
                    steps: 1,
                    elapsed_ms: 1,
                    epsilon: None,
                },
                tensors: vec![
                    fedpeft_protocol::Tensor::encode(
                        "w",
                        &[400],
                        &d,
                        Codec::dense(DType::F32),
                        &mut rng,
                    )
                    .unwrap(),
                ],
            },
        )
    };
    let before = m.state().global.tensors[0].values.clone();
    m.on_event(delta(1.0), T0 + 1);
    m.on_event(offline("b"), T0 + 2);
    let acts = m.on_event(offline("c"), T0 + 3);
    let globals = published_globals(&acts);
    assert_eq!(globals[0].0, 1);
    let after = m.state().global.tensors[0].values.clone();
    assert_eq!(
        globals[0].1[0], after,
        "round 1's published global = held, bit for bit"
    );
    // The held adapter is the int8 rounding of (previous held + the average delta): within
    // one step of it, and never the rounding error carried from the round before.
    let step1 = after.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
    for i in 0..400 {
        let exact = before[i] + 0.01 * ((i as f32) * 0.11).cos();
        assert!(
            (after[i] - exact).abs() <= step1 * 1.001,
            "value {i}: held {} exact {exact}",
            after[i]
        );
    }
    let evaluated = acts.iter().find_map(|a| match a {
        Action::Evaluate { round: 1, adapter } => Some(adapter.tensors[0].values.clone()),
        _ => None,
    });
    assert_eq!(evaluated.as_deref(), Some(after.as_slice()));
}

#[test]
fn a_refused_unsigned_message_changes_no_client_and_the_honest_update_still_counts() {
    let honest = |m: &mut RoundMachine| {
        m.on_event(update("a", 1, 0, 10, [1.0, 1.0], 1.0), T0 + 10);
        m.on_event(update("b", 1, 0, 10, [3.0, 3.0], 3.0), T0 + 20);
        m.on_event(update("c", 1, 0, 20, [5.0, 5.0], 5.0), T0 + 30);
    };
    let mut clean = started(2, 3);
    honest(&mut clean);
    let mut attacked = started(2, 3);
    // Before b's and c's genuine updates: every kind of refusal naming them.
    let mut short = update_msg("c", 1, 7, 10, [0.0, 0.0], 0.0);
    short.tensors.pop();
    let forged = [
        raw_update("b", update_msg("a", 1, 0, 10, [9.0, 9.0], 9.0)), // client mismatch
        update("b", 1, 0, 10, [f32::NAN, 0.0], 0.0),                 // non-finite
        raw_update("c", short),                                      // wrong shape
        update("c", 0, 0, 10, [0.0, 0.0], 0.0),                      // stale replay
        update("b", 2, 0, 10, [0.0, 0.0], 0.0),                      // future round
    ];
    for ev in forged {
        attacked.on_event(ev, T0 + 5);
    }
    let Phase::Collecting(open) = &attacked.state().phase else {
        panic!("the round closed on refusals alone");
    };
    assert!(open.failed.is_empty(), "{:?}", open.failed);
    honest(&mut attacked);
    assert_eq!(attacked.state().global, clean.state().global);
    let (a, c) = (&attacked.state().records[1], &clean.state().records[1]);
    assert_eq!((a.clients_ok, a.clients_failed), (3, 0));
    assert_eq!(
        (a.clients_ok, a.clients_failed),
        (c.clients_ok, c.clients_failed)
    );
}

#[test]
fn a_signed_update_refused_for_its_content_counts_its_client_failed() {
    let mut m = started(2, 2);
    m.on_event(update("a", 1, 0, 10, [1.0, 1.0], 1.0), T0 + 1);
    m.on_event(update("b", 1, 0, 10, [3.0, 3.0], 3.0), T0 + 2);
    // Signed and non-finite: c sent it, and will not send another.
    m.on_event(signed(update("c", 1, 0, 10, [f32::NAN, 0.0], 0.0)), T0 + 3);
    let rec = &m.state().records[1];
    assert_eq!(rec.status, "ok");
    assert_eq!(rec.failed_clients["c"], "rejected: non_finite");
    // A signed replay of an old round is about its delivery, not its content: nobody fails.
    m.on_event(signed(update("a", 1, 1, 10, [1.0, 1.0], 1.0)), T0 + 4);
    let Phase::Collecting(open) = &m.state().phase else {
        panic!("round 2 should be open");
    };
    assert!(open.failed.is_empty());
}

#[test]
fn an_update_after_a_last_will_counts_the_client_once_as_accepted() {
    let mut m = started(2, 3);
    m.on_event(offline("c"), T0 + 1);
    m.on_event(update("a", 1, 0, 10, [1.0, 1.0], 1.0), T0 + 2);
    // c's update was already on its way: it arrives and is accepted.
    m.on_event(update("c", 1, 0, 10, [5.0, 5.0], 5.0), T0 + 3);
    let Phase::Collecting(open) = &m.state().phase else {
        panic!("b has not replied: the round must still be open");
    };
    assert_eq!(open.accepted.len() + open.failed.len(), 2);
    m.on_event(update("b", 1, 0, 10, [3.0, 3.0], 3.0), T0 + 4);
    let rec = &m.state().records[1];
    assert_eq!((rec.clients_ok, rec.clients_failed), (3, 0));
}

#[test]
fn a_checkpoint_written_by_reference_reads_back_as_the_saved_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agg.ckpt");
    let m = started(1, 3);
    let outbox = Outbox::new(FleetName::new("test").unwrap(), 7, None, 1 << 20);
    checkpoint::save(
        &checkpoint::SavedRef {
            machine: m.state(),
            outbox: outbox.state(),
        },
        &path,
    )
    .unwrap();
    let owned = checkpoint::Saved {
        machine: m.state().clone(),
        outbox: outbox.state().clone(),
    };
    assert_eq!(
        std::fs::read(&path).unwrap(),
        checkpoint::to_bytes(&owned, &path).unwrap(),
        "the same bytes as the owned form"
    );
    assert_eq!(
        checkpoint::load::<checkpoint::Saved>(&path).unwrap(),
        Some(owned)
    );
}
