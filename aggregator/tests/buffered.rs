//! Asynchronous buffered aggregation (FedBuff), event by event: no broker, no clock.

use fedpeft_aggregator::adapter::Adapter;
use fedpeft_aggregator::checkpoint::{self, Saved};
use fedpeft_aggregator::config::{AggregatorFile, validate};
use fedpeft_aggregator::outbox::{OutboxState, Outgoing};
use fedpeft_aggregator::round::{
    Action, BufferedSettings, Event, JoinInfo, Phase, QuorumFailure, RejectReason, RoundMachine,
    Rules, RunSettings,
};
use fedpeft_aggregator::strategy::{self, StrategyKind};
use fedpeft_peft::NamedTensor;
use fedpeft_protocol::{
    ClientId, ClientUpdate, Codec, DType, FleetName, LocalConfig, Optimizer, PeftMethod,
    SplitMix64, TrainMetrics,
};

const T0: u64 = 1_700_000_000_000;

fn rules() -> Rules {
    Rules {
        run: RunSettings {
            run_id: 7,
            fleet: FleetName::new("test").unwrap(),
            rounds: 5,
            min_clients: 4,
            start_clients: 4,
            fraction: 1.0,
            quorum: 2,
            round_timeout_ms: 10_000,
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
            max_update_bytes: 1 << 20,
            max_update_norm: None,
            adaptive_norm_multiple: None,
            global_dtype: DType::F32,
            secure: None,
            site: None,
            buffered: Some(BufferedSettings {
                buffer: 2,
                max_staleness: 2,
                exponent: 0.5,
            }),
        },
        dp_sample_rate: None,
        backbone_params: 1000,
        checkpoint_every_update: true,
        backbone_id: Some("bb".into()),
        backbone_sha256: None,
        peft: Some(PeftMethod::Head),
    }
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

fn update(c: &str, round: u32, seq: u32, n: u64, w: f32) -> Event {
    let mut rng = SplitMix64::new(1);
    let tensor =
        fedpeft_protocol::Tensor::encode("w", &[1], &[w], Codec::dense(DType::F32), &mut rng)
            .unwrap();
    Event::Update {
        topic_client: id(c),
        update: Box::new(Ok(ClientUpdate {
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
            tensors: vec![tensor],
        })),
        wire_bytes: 100,
        signed: false,
    }
}

fn started() -> RoundMachine {
    let mut m = RoundMachine::new(
        rules(),
        strategy::build(&StrategyKind::FedAvg),
        Adapter::new(vec![NamedTensor::new("w", vec![1], vec![1.0]).unwrap()]),
    );
    m.on_event(Event::Start, T0);
    for c in ["a", "b", "c", "d"] {
        m.on_event(join(c, 10), T0);
    }
    m
}

fn w(m: &RoundMachine) -> f32 {
    m.state().global.tensors[0].values[0]
}

fn open_round(m: &RoundMachine) -> u32 {
    match &m.state().phase {
        Phase::Collecting(o) => o.round,
        other => panic!("no open round: {other:?}"),
    }
}

fn refused(m: &RoundMachine, r: RejectReason) -> u64 {
    m.state().rejected_total.get(&r).copied().unwrap_or(0)
}

#[test]
fn every_buffer_of_updates_makes_a_version_and_stale_ones_weigh_less() {
    let mut m = started();
    assert_eq!(open_round(&m), 1);
    // Round 1 is announced as asynchronous, to everyone.
    m.on_event(update("a", 1, 1, 10, 0.5), T0 + 1);
    let acts = m.on_event(update("b", 1, 1, 30, 1.0), T0 + 2);
    // The buffer is full: version 1 = 1 + (10·0.5 + 30·1.0) / 40, and round 2 opens at once.
    assert_eq!(w(&m), (1.0f64 + (10.0 * 0.5 + 30.0) / 40.0) as f32);
    assert_eq!(open_round(&m), 2);
    let announced = acts.iter().find_map(|a| match a {
        Action::Publish {
            message: Outgoing::AsyncAnnounce(a),
            ..
        } => Some(a.clone()),
        _ => None,
    });
    let announced = announced.expect("round 2 announced asynchronously");
    assert_eq!((announced.announce.round, announced.max_staleness), (2, 2));

    // c trained on version 0 (round 1): one version behind, weight 1/√2.
    let v1 = f64::from(w(&m));
    m.on_event(update("c", 1, 1, 10, 2.0), T0 + 3);
    // a's fresh update for round 2 (a has no update in this buffer yet: sent anyway).
    m.on_event(update("a", 2, 2, 10, -1.0), T0 + 4);
    let scaled = f64::from(2.0f32 * (2.0f64.powf(-0.5) as f32));
    let expected = (v1 + (10.0 * scaled - 10.0) / 20.0) as f32;
    assert_eq!(w(&m), expected);
    let record = m.state().records.last().unwrap();
    assert_eq!(record.round, 2);
    assert_eq!(record.staleness, vec![("c".into(), 1), ("a".into(), 0)]);
    // Nobody counts as failed for still training.
    assert!(record.failed_clients.is_empty(), "{record:?}");

    // Round 3: d's update trained for round 1 is two versions behind: still taken.
    assert_eq!(open_round(&m), 3);
    m.on_event(update("d", 1, 1, 10, 0.0), T0 + 5);
    // c sends twice into the same buffer: a stale one and a fresh one.
    m.on_event(update("c", 3, 2, 10, 0.0), T0 + 6);
    assert_eq!(open_round(&m), 4, "d (stale) and c filled buffer 3");
    // b's round-1 update is three versions behind at round 4: refused.
    m.on_event(update("b", 1, 5, 10, 0.0), T0 + 7);
    assert_eq!(refused(&m, RejectReason::Stale), 1);
    // A redelivery of an accepted update stays a duplicate.
    m.on_event(update("c", 3, 2, 10, 0.0), T0 + 8);
    assert_eq!(refused(&m, RejectReason::Duplicate), 1);
    // A future round is refused.
    m.on_event(update("a", 9, 9, 10, 0.0), T0 + 9);
    assert_eq!(refused(&m, RejectReason::FutureRound), 1);
}

#[test]
fn an_asynchronous_run_resumes_mid_buffer_from_its_checkpoint() {
    let mut m = started();
    m.on_event(update("a", 1, 1, 10, 0.5), T0 + 1);
    m.on_event(update("b", 1, 1, 10, 0.5), T0 + 2);
    m.on_event(update("c", 1, 1, 10, 1.0), T0 + 3);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.ckpt");
    checkpoint::save(
        &Saved {
            machine: m.state().clone(),
            outbox: OutboxState::default(),
        },
        &path,
    )
    .unwrap();
    let saved: Saved = checkpoint::load(&path).unwrap().unwrap();
    let mut resumed = RoundMachine::restore(
        rules(),
        strategy::build(&StrategyKind::FedAvg),
        saved.machine,
    )
    .unwrap();
    resumed.on_event(Event::Start, T0 + 10);
    assert_eq!(open_round(&resumed), 2);
    // c's stale update survived the restart; a redelivery of it is a duplicate.
    resumed.on_event(update("c", 1, 1, 10, 1.0), T0 + 11);
    assert_eq!(refused(&resumed, RejectReason::Duplicate), 1);
    resumed.on_event(update("d", 2, 1, 10, 0.0), T0 + 12);
    m.on_event(update("d", 2, 1, 10, 0.0), T0 + 12);
    assert_eq!(open_round(&resumed), 3);
    assert_eq!(w(&resumed), w(&m));
}

fn config(extra: &str) -> Result<(), String> {
    let text = format!(
        "min_clients = 4\n{extra}\n[model]\ntensors = [{{ name = \"w\", shape = [2, 3] }}]\n"
    );
    let file =
        AggregatorFile::parse(&text, std::path::Path::new("a.toml")).map_err(|e| e.to_string())?;
    validate(file).map(|_| ()).map_err(|e| e.to_string())
}

#[test]
fn the_config_refuses_what_cannot_run_without_a_round_barrier() {
    assert_eq!(config("[async]\nbuffer = 2\n"), Ok(()));
    for (extra, key) in [
        ("[async]\n", "async.buffer"),
        ("[async]\nbuffer = 5\n", "async.buffer"),
        ("quorum = 3\n[async]\nbuffer = 2\n", "quorum"),
        ("strategy = \"median\"\n[async]\nbuffer = 2\n", "strategy"),
        (
            "secure_aggregation = true\n[async]\nbuffer = 2\n",
            "secure_aggregation",
        ),
        (
            "[async]\nbuffer = 2\nstaleness_exponent = -1.0\n",
            "async.staleness_exponent",
        ),
    ] {
        let e = config(extra).expect_err(extra);
        assert!(e.contains(key), "{extra}: {e}");
    }
}
