//! Secure rounds in the round machine, driven by real `fedpeft-secagg` clients: no broker, no
//! clock. The unmasked sum is the exact sum of the clients' quantized inputs and the new global
//! is their weighted mean; replays, wrong lengths, messages for a stage that is not open,
//! plain updates and unsampled senders are refused by reason; an aggregator restored from a
//! checkpoint mid-protocol fails that round and opens the next.

use fedpeft_aggregator::adapter::Adapter;
use fedpeft_aggregator::outbox::Outgoing;
use fedpeft_aggregator::round::secure::Uplink;
use fedpeft_aggregator::round::{
    Action, Event, JoinInfo, Phase, QuorumFailure, RejectReason, RoundMachine, Rules, RunSettings,
    SecureSettings,
};
use fedpeft_aggregator::strategy::{self, StrategyKind};
use fedpeft_peft::NamedTensor;
use fedpeft_protocol::{
    ClientId, ClientUpdate, FleetName, LocalConfig, Optimizer, PeerBytes, PeftMethod, RevealKind,
    RevealedShare, SecAggKeys, SecAggMasked, SecAggReveal, SecAggSetup, SecAggShares, TrainMetrics,
};
use fedpeft_secagg as sa;
use rand::SeedableRng;
use rand::rngs::StdRng;

const T0: u64 = 1_700_000_000_000;
const CLIENTS: [&str; 4] = ["a", "b", "c", "d"];
const EXAMPLES: [u64; 4] = [10, 20, 30, 40];
const DELTAS: [[f32; 3]; 4] = [
    [0.1, -0.2, 0.05],
    [0.0, 0.1, -0.1],
    [-0.05, 0.05, 0.2],
    [0.2, 0.0, 0.0],
];

fn rules() -> Rules {
    Rules {
        run: RunSettings {
            run_id: 7,
            fleet: FleetName::new("test").unwrap(),
            rounds: 3,
            min_clients: 4,
            start_clients: 4,
            fraction: 1.0,
            quorum: 2,
            round_timeout_ms: 60_000,
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
                update_dtype: fedpeft_protocol::DType::F32,
                top_k_fraction: None,
                seed: 0,
            },
            max_update_bytes: 1 << 20,
            max_update_norm: None,
            adaptive_norm_multiple: None,
            global_dtype: fedpeft_protocol::DType::F32,
            secure: Some(SecureSettings {
                neighbours: Some(2),
                threshold: Some(2),
                modulus_bits: 16,
                clip: 0.5,
                stage_timeout_ms: 5_000,
                dp: None,
            }),
            site: None,
            buffered: None,
        },
        dp_sample_rate: None,
        backbone_params: 1000,
        checkpoint_every_update: false,
        backbone_id: None,
        backbone_sha256: None,
        peft: None,
    }
}

fn initial() -> Adapter {
    Adapter::new(vec![
        NamedTensor::new("w", vec![2], vec![1.0, -1.0]).unwrap(),
        NamedTensor::new("b", vec![1], vec![0.5]).unwrap(),
    ])
}

fn id(c: &str) -> ClientId {
    ClientId::new(c).unwrap()
}

fn secagg(c: &str, message: Uplink) -> Event {
    Event::SecAgg {
        topic_client: id(c),
        message: Box::new(message),
        wire_bytes: 100,
        signed: false,
    }
}

fn published(actions: &[Action]) -> Vec<Outgoing> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Publish { message, .. } => Some(message.clone()),
            _ => None,
        })
        .collect()
}

fn rejected(m: &RoundMachine, reason: RejectReason) -> u64 {
    m.state().rejected_total.get(&reason).copied().unwrap_or(0)
}

fn metrics() -> TrainMetrics {
    TrainMetrics {
        loss: 1.0,
        accuracy: 0.5,
        steps: 1,
        elapsed_ms: 1,
        epsilon: None,
    }
}

/// One device of the round.
struct Device {
    name: &'static str,
    client: sa::ClientRound,
    input: Vec<u32>,
    n: u64,
}

/// A machine with round 1 open, and its announced setup.
fn open() -> (RoundMachine, SecAggSetup) {
    let mut m = RoundMachine::new(rules(), strategy::build(&StrategyKind::FedAvg), initial());
    m.on_event(Event::Start, T0);
    let mut actions = Vec::new();
    for (c, n) in CLIENTS.iter().zip(EXAMPLES) {
        actions.extend(m.on_event(
            Event::Joined {
                client: id(c),
                info: JoinInfo {
                    num_examples: n,
                    backbone_id: "bb".into(),
                    backbone_sha256: [0; 32],
                    peft: PeftMethod::Head,
                },
                wire_bytes: 50,
            },
            T0,
        ));
    }
    let setup = published(&actions)
        .into_iter()
        .find_map(|o| match o {
            Outgoing::SecureAnnounce(a) => Some(a.setup),
            _ => None,
        })
        .expect("a secure round announcement");
    assert_eq!(setup.reference_examples, 100);
    (m, setup)
}

fn params(setup: &SecAggSetup) -> sa::Params {
    sa::Params {
        neighbours: setup.neighbours,
        threshold: setup.threshold,
        modulus_bits: setup.modulus_bits,
        clip: setup.clip,
    }
}

/// Every client advertises its keys.
fn advertise(
    m: &mut RoundMachine,
    setup: &SecAggSetup,
    rng: &mut StdRng,
) -> (Vec<Device>, Vec<Action>) {
    let p = params(setup);
    let mut actions = Vec::new();
    let mut devices = Vec::new();
    for (i, name) in CLIENTS.iter().enumerate() {
        let input = sa::quantize(
            &p,
            setup.max_clients as usize,
            &DELTAS[i],
            EXAMPLES[i],
            setup.reference_examples,
            rng,
        )
        .unwrap();
        let (client, adv) = sa::ClientRound::new(p, 1, name, rng);
        actions.extend(m.on_event(
            secagg(
                name,
                Uplink::Keys(SecAggKeys {
                    client: id(name),
                    round: 1,
                    enc_pk: adv.enc_pk,
                    mask_pk: adv.mask_pk,
                    commitment: adv.self_mask_commitment,
                }),
            ),
            T0 + 1,
        ));
        devices.push(Device {
            name,
            client,
            input,
            n: EXAMPLES[i],
        });
    }
    (devices, actions)
}

fn share_all(
    m: &mut RoundMachine,
    devices: &mut [Device],
    actions: &[Action],
    rng: &mut StdRng,
) -> Vec<Action> {
    let roster = published(actions)
        .into_iter()
        .find_map(|o| match o {
            Outgoing::Roster(r) => Some(r),
            _ => None,
        })
        .expect("the roster");
    let entries: Vec<sa::RosterEntry> = roster
        .entries
        .iter()
        .map(|e| sa::RosterEntry {
            client: e.client.as_str().into(),
            enc_pk: e.enc_pk,
            mask_pk: e.mask_pk,
            self_mask_commitment: e.commitment,
        })
        .collect();
    let mut out = Vec::new();
    for d in devices.iter_mut() {
        let shares = d.client.share(&entries, &roster.graph_seed, rng).unwrap();
        out.extend(
            m.on_event(
                secagg(
                    d.name,
                    Uplink::Shares(SecAggShares {
                        client: id(d.name),
                        round: 1,
                        shares: shares
                            .into_iter()
                            .map(|(to, bytes)| PeerBytes {
                                peer: id(&to),
                                bytes,
                            })
                            .collect(),
                    }),
                ),
                T0 + 2,
            ),
        );
    }
    out
}

fn masked_event(d: &mut Device, actions: &[Action], sequence: u32) -> Event {
    let relay = published(actions)
        .into_iter()
        .find_map(|o| match o {
            Outgoing::Relay { to, relay } if to.as_str() == d.name => Some(relay),
            _ => None,
        })
        .expect("a relay for each client");
    let received: Vec<(String, Vec<u8>)> = relay
        .shares
        .into_iter()
        .map(|p| (p.peer.as_str().into(), p.bytes))
        .collect();
    let u2: Vec<String> = relay.survivors.iter().map(|c| c.as_str().into()).collect();
    let masked = d.client.masked_input(&received, &u2, &d.input).unwrap();
    secagg(
        d.name,
        Uplink::Masked(SecAggMasked {
            client: id(d.name),
            round: 1,
            sequence,
            num_examples: d.n,
            metrics: metrics(),
            len: masked.len() as u32,
            values: sa::pack(&masked, 16),
        }),
    )
}

#[test]
fn the_unmasked_sum_is_exact_and_the_global_is_the_weighted_mean() {
    let mut rng = StdRng::seed_from_u64(5);
    let (mut m, setup) = open();
    // A plain update in a secure run is refused, whatever it carries.
    m.on_event(
        Event::Update {
            topic_client: id("a"),
            update: Box::new(Ok(ClientUpdate {
                client: id("a"),
                round: 1,
                sequence: 0,
                num_examples: 10,
                metrics: metrics(),
                tensors: vec![],
            })),
            wire_bytes: 10,
            signed: false,
        },
        T0,
    );
    assert_eq!(rejected(&m, RejectReason::SecAgg), 1);
    // Shares before the roster: a stage that is not open.
    m.on_event(
        secagg(
            "a",
            Uplink::Shares(SecAggShares {
                client: id("a"),
                round: 1,
                shares: vec![],
            }),
        ),
        T0,
    );
    assert_eq!(rejected(&m, RejectReason::SecAgg), 2);

    let (mut devices, actions) = advertise(&mut m, &setup, &mut rng);
    let actions = share_all(&mut m, &mut devices, &actions, &mut rng);
    let mut unmask_actions = Vec::new();
    for (i, d) in devices.iter_mut().enumerate() {
        let ev = masked_event(d, &actions, 0);
        if i == 0 {
            // The wrong length is refused by its reason; the right one is then accepted.
            let Event::SecAgg { message, .. } = &ev else {
                unreachable!()
            };
            let Uplink::Masked(good) = (**message).clone() else {
                unreachable!()
            };
            let mut short = good.clone();
            short.len -= 1;
            m.on_event(secagg(d.name, Uplink::Masked(short)), T0 + 3);
            assert_eq!(rejected(&m, RejectReason::WrongShape), 1);
            unmask_actions.extend(m.on_event(ev, T0 + 3));
            // Replayed: a duplicate.
            m.on_event(secagg(d.name, Uplink::Masked(good)), T0 + 3);
            assert_eq!(rejected(&m, RejectReason::Duplicate), 1);
        } else {
            unmask_actions.extend(m.on_event(ev, T0 + 3));
        }
    }
    let request = published(&unmask_actions)
        .into_iter()
        .find_map(|o| match o {
            Outgoing::Unmask(u) => Some(u),
            _ => None,
        })
        .expect("an unmask request");
    assert!(request.dropped.is_empty());
    let u3: Vec<String> = request
        .survivors
        .iter()
        .map(|c| c.as_str().into())
        .collect();
    let mut last = Vec::new();
    for d in devices.iter_mut() {
        let reveals = d.client.unmask(&u3, &[]).unwrap();
        last.extend(
            m.on_event(
                secagg(
                    d.name,
                    Uplink::Reveal(SecAggReveal {
                        client: id(d.name),
                        round: 1,
                        shares: reveals
                            .into_iter()
                            .map(|r| RevealedShare {
                                peer: id(&r.of),
                                kind: match r.kind {
                                    sa::RevealKind::SelfMask => RevealKind::SelfMask,
                                    sa::RevealKind::MaskKey => RevealKind::MaskKey,
                                },
                                share: r.share,
                            })
                            .collect(),
                    }),
                ),
                T0 + 4,
            ),
        );
    }
    let sum = last
        .iter()
        .find_map(|a| match a {
            Action::SecureSum { round: 1, sum } => Some(sum.clone()),
            _ => None,
        })
        .expect("the round unmasked its sum");
    let mut expected = vec![0u32; sum.len()];
    for d in &devices {
        for (e, v) in expected.iter_mut().zip(&d.input) {
            *e = (*e + v) & 0xffff;
        }
    }
    assert_eq!(sum, expected, "exact sum of the quantized inputs");
    let record = m.state().records.iter().find(|r| r.round == 1).unwrap();
    assert_eq!(record.status.as_str(), "ok");
    assert_eq!(record.clients_ok, 4);
    // The new global: initial + Σ n·Δ / Σ n, up to the quantization step per client.
    let total: u64 = EXAMPLES.iter().sum();
    let step = params(&setup).step(setup.max_clients as usize) * 100.0 / total as f64;
    let base = [1.0f32, -1.0, 0.5];
    let global: Vec<f32> = m
        .state()
        .global
        .tensors
        .iter()
        .flat_map(|t| t.values.clone())
        .collect();
    for (i, g) in global.iter().enumerate() {
        let mean: f64 = (0..4)
            .map(|c| EXAMPLES[c] as f64 * f64::from(DELTAS[c][i]))
            .sum::<f64>()
            / total as f64;
        let want = f64::from(base[i]) + mean;
        assert!(
            (f64::from(*g) - want).abs() <= 4.0 * step,
            "coordinate {i}: {g} vs {want} (step {step})"
        );
    }
    assert!(matches!(m.state().phase, Phase::Collecting(ref o) if o.round == 2));
}

#[test]
fn unsampled_and_unknown_senders_and_other_rounds_are_refused() {
    let mut rng = StdRng::seed_from_u64(9);
    let (mut m, setup) = open();
    let (_, adv) = sa::ClientRound::new(params(&setup), 1, "z", &mut rng);
    let keys = |c: &str, round| {
        secagg(
            c,
            Uplink::Keys(SecAggKeys {
                client: id(c),
                round,
                enc_pk: adv.enc_pk,
                mask_pk: adv.mask_pk,
                commitment: adv.self_mask_commitment,
            }),
        )
    };
    m.on_event(keys("z", 1), T0);
    assert_eq!(rejected(&m, RejectReason::UnknownClient), 1);
    m.on_event(keys("a", 2), T0);
    assert_eq!(rejected(&m, RejectReason::FutureRound), 1);
    // The body names another client than the topic.
    let mut ev = keys("a", 1);
    if let Event::SecAgg { topic_client, .. } = &mut ev {
        *topic_client = id("b");
    }
    m.on_event(ev, T0);
    assert_eq!(rejected(&m, RejectReason::ClientMismatch), 1);
    // A small-order key (all zeros) is refused alone, by reason.
    let mut weak = keys("a", 1);
    if let Event::SecAgg { message, .. } = &mut weak
        && let Uplink::Keys(k) = &mut **message
    {
        k.mask_pk = [0; 32];
    }
    let before = rejected(&m, RejectReason::SecAgg);
    m.on_event(weak, T0);
    assert_eq!(rejected(&m, RejectReason::SecAgg), before + 1);
    // Accepted once, then a duplicate.
    m.on_event(keys("a", 1), T0);
    m.on_event(keys("a", 1), T0);
    assert_eq!(rejected(&m, RejectReason::Duplicate), 1);
}

#[test]
fn keys_from_too_few_clients_fail_the_round_with_a_reason_and_the_next_one_opens() {
    let mut rng = StdRng::seed_from_u64(3);
    let (mut m, setup) = open();
    let (mut devices, _) = advertise(&mut m, &setup, &mut rng);
    drop(devices.drain(..));
    // Nobody shares: at the stage deadline the round fails, naming the stage.
    let actions = m.on_event(Event::Tick, T0 + 10_000);
    let record = m.state().records.iter().find(|r| r.round == 1).unwrap();
    assert_eq!(record.status.as_str(), "failed");
    let why = record.secure.as_ref().unwrap().failure.clone().unwrap();
    assert!(why.contains("shares stage"), "{why}");
    assert!(
        published(&actions)
            .iter()
            .any(|o| matches!(o, Outgoing::SecureAnnounce(a) if a.announce.round == 2))
    );
}

#[test]
fn a_restart_mid_protocol_fails_the_round_and_never_reuses_it() {
    let mut rng = StdRng::seed_from_u64(4);
    let (mut m, setup) = open();
    let (mut devices, actions) = advertise(&mut m, &setup, &mut rng);
    share_all(&mut m, &mut devices, &actions, &mut rng);
    let state = m.state().clone();
    assert!(matches!(state.phase, Phase::Collecting(ref o) if o.secure));
    let mut restored =
        RoundMachine::restore(rules(), strategy::build(&StrategyKind::FedAvg), state).unwrap();
    let actions = restored.on_event(Event::Start, T0 + 5);
    let record = restored
        .state()
        .records
        .iter()
        .find(|r| r.round == 1)
        .unwrap();
    assert_eq!(record.status.as_str(), "failed");
    assert_eq!(record.clients_ok, 0);
    assert!(
        record
            .secure
            .as_ref()
            .unwrap()
            .failure
            .as_deref()
            .unwrap()
            .contains("restarted")
    );
    assert_eq!(
        restored.state().global,
        initial(),
        "nothing of round 1 aggregated"
    );
    assert!(
        published(&actions)
            .iter()
            .any(|o| matches!(o, Outgoing::SecureAnnounce(a) if a.announce.round == 2))
    );
    // A masked input for the abandoned round is refused as late.
    let late = masked_event_for_late(&mut devices[0]);
    restored.on_event(late, T0 + 6);
    assert_eq!(rejected(&restored, RejectReason::Late), 1);
}

fn masked_event_for_late(d: &mut Device) -> Event {
    secagg(
        d.name,
        Uplink::Masked(SecAggMasked {
            client: id(d.name),
            round: 1,
            sequence: 0,
            num_examples: d.n,
            metrics: metrics(),
            len: d.input.len() as u32,
            values: sa::pack(&d.input, 16),
        }),
    )
}
