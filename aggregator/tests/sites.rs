//! Sites and a root, machine against machine (no broker): the root's global adapter equals a
//! flat federation's over the same updates bit for bit, and what a root refuses from a site.

use fedpeft_aggregator::adapter::Adapter;
use fedpeft_aggregator::checkpoint::{self, Saved};
use fedpeft_aggregator::outbox::{OutboxState, Outgoing};
use fedpeft_aggregator::round::{
    Action, Event, JoinInfo, Phase, QuorumFailure, RejectReason, RoundMachine, RoundStatus, Rules,
    RunSettings, SiteSettings, UpstreamMessage,
};
use fedpeft_aggregator::strategy::{self, StrategyKind};
use fedpeft_peft::NamedTensor;
use fedpeft_protocol::{
    ClientId, ClientUpdate, Codec, DType, FleetName, LocalConfig, Optimizer, PeftMethod,
    RoundAnnounce, SiteAggregate, SplitMix64, TrainMetrics,
};

const T0: u64 = 1_700_000_000_000;
const TIMEOUT: u64 = 10_000;
const VALUES: usize = 64;

fn rules(fleet: &str, min_clients: usize, site: Option<&str>) -> Rules {
    Rules {
        run: RunSettings {
            run_id: 7,
            fleet: FleetName::new(fleet).unwrap(),
            rounds: 3,
            min_clients,
            start_clients: min_clients,
            fraction: 1.0,
            quorum: min_clients,
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
            max_update_bytes: 1 << 20,
            max_update_norm: None,
            adaptive_norm_multiple: None,
            global_dtype: DType::F32,
            secure: None,
            site: site.map(|id| SiteSettings {
                upstream_fleet: FleetName::new("plant").unwrap(),
                upstream_run_id: 7,
                id: ClientId::new(id).unwrap(),
                margin_ms: 1_000,
                max_packet_bytes: 1 << 20,
            }),
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
        NamedTensor::new("w", vec![VALUES], vec![0.25; VALUES]).unwrap(),
        NamedTensor::new("b", vec![1], vec![0.5]).unwrap(),
    ])
}

fn machine(rules: Rules, kind: &StrategyKind) -> RoundMachine {
    RoundMachine::new(rules, strategy::build(kind), initial())
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

/// Device `c`'s update in `round`: values of every magnitude, so sums round.
fn update(c: &str, round: u32, n: u64) -> Event {
    let mut rng = SplitMix64::new(
        u64::from(round) * 1000 + c.len() as u64 * 7 + c.bytes().map(u64::from).sum::<u64>(),
    );
    let w: Vec<f32> = (0..VALUES)
        .map(|i| {
            let u = rng.next_f32() - 0.5;
            u * 10f32.powi((i % 7) as i32 - 4)
        })
        .collect();
    let b = rng.next_f32() * 1e-3;
    let enc = |name: &str, shape: &[u32], v: &[f32], rng: &mut SplitMix64| {
        fedpeft_protocol::Tensor::encode(name, shape, v, Codec::dense(DType::F32), rng).unwrap()
    };
    let tensors = vec![
        enc("w", &[VALUES as u32], &w, &mut rng),
        enc("b", &[1], &[b], &mut rng),
    ];
    Event::Update {
        topic_client: id(c),
        update: Box::new(Ok(ClientUpdate {
            client: id(c),
            round,
            sequence: round,
            num_examples: n,
            metrics: TrainMetrics {
                loss: 1.0,
                accuracy: 0.5,
                steps: 1,
                elapsed_ms: 1,
                epsilon: None,
            },
            tensors,
        })),
        wire_bytes: 100,
        signed: false,
    }
}

fn partial(site: &str, a: SiteAggregate) -> Event {
    Event::Partial {
        topic_client: id(site),
        partial: Box::new(Ok(a)),
        wire_bytes: 1000,
        signed: false,
    }
}

/// What the actions publish to the machine's own clients.
fn published(actions: &[Action]) -> Vec<Outgoing> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Publish { message, .. } => Some(message.clone()),
            _ => None,
        })
        .collect()
}

/// What the actions send to the root.
fn upstream(actions: &[Action]) -> Vec<Outgoing> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Upstream(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

/// The root's messages as a site hears them (global first, then the announcement).
fn to_site(actions: &[Action]) -> Vec<Event> {
    published(actions)
        .into_iter()
        .filter_map(|m| match m {
            Outgoing::Global(g) => Some(UpstreamMessage::Global(g)),
            Outgoing::Announce(a) | Outgoing::RunDone(a) => Some(UpstreamMessage::Announce(a)),
            _ => None,
        })
        .map(|m| Event::Upstream(Box::new(m)))
        .collect()
}

/// The devices of each site, with their example counts.
const SITE_A: [(&str, u64); 3] = [("d1", 600), ("d2", 37), ("d3", 1)];
const SITE_B: [(&str, u64); 2] = [("d4", 250), ("d5", 9_999)];

fn flat_globals(rounds: u32) -> Vec<Adapter> {
    let mut m = machine(
        rules("plant", 5, None),
        &StrategyKind::FedAdam(Default::default()),
    );
    m.on_event(Event::Start, T0);
    for (c, n) in SITE_A.iter().chain(&SITE_B) {
        m.on_event(join(c, *n), T0);
    }
    let mut globals = Vec::new();
    for round in 1..=rounds {
        // Arrival order differs from the sites' run: the exact sum does not care.
        for (c, n) in SITE_B.iter().chain(&SITE_A).rev() {
            m.on_event(update(c, round, *n), T0 + 1);
        }
        assert_eq!(m.state().global_round, round);
        globals.push(m.state().global.clone());
    }
    globals
}

struct Tree {
    root: RoundMachine,
    sites: Vec<(RoundMachine, &'static [(&'static str, u64)])>,
}

impl Tree {
    fn new() -> Tree {
        let root = machine(
            rules("plant", 2, None),
            &StrategyKind::FedAdam(Default::default()),
        );
        let sites = vec![
            (
                machine(rules("site-a", 3, Some("site-a")), &StrategyKind::FedAvg),
                &SITE_A[..],
            ),
            (
                machine(rules("site-b", 2, Some("site-b")), &StrategyKind::FedAvg),
                &SITE_B[..],
            ),
        ];
        Tree { root, sites }
    }

    /// Starts everyone; the sites join the root, the root opens round 1.
    fn start(&mut self) -> Vec<Action> {
        let mut root_actions = self.root.on_event(Event::Start, T0);
        for (site, devices) in &mut self.sites {
            let acts = site.on_event(Event::Start, T0);
            for m in upstream(&acts) {
                if let Outgoing::Join(j) = m {
                    root_actions.extend(self.root.on_event(
                        Event::Joined {
                            client: j.client.clone(),
                            info: JoinInfo {
                                num_examples: j.num_examples,
                                backbone_id: j.capabilities.backbone_id.to_string(),
                                backbone_sha256: j.capabilities.backbone_sha256,
                                peft: j.capabilities.peft,
                            },
                            wire_bytes: 50,
                        },
                        T0,
                    ));
                }
            }
            for (c, n) in devices.iter() {
                site.on_event(join(c, *n), T0);
            }
        }
        root_actions
    }

    /// Delivers the root's actions to the sites, runs their devices' round and delivers the
    /// sites' aggregates to the root; the root's actions after the last one.
    fn round(&mut self, root_actions: &[Action], round: u32) -> Vec<Action> {
        let mut aggregates = Vec::new();
        for (site, devices) in &mut self.sites {
            let mut acts = Vec::new();
            for ev in to_site(root_actions) {
                acts.extend(site.on_event(ev, T0 + 2));
            }
            let announced: Vec<RoundAnnounce> = published(&acts)
                .into_iter()
                .filter_map(|m| match m {
                    Outgoing::Announce(a) => Some(a),
                    _ => None,
                })
                .collect();
            assert_eq!(announced.len(), 1, "the site announces the root's round");
            assert_eq!(announced[0].round, round);
            for (c, n) in devices.iter() {
                acts.extend(site.on_event(update(c, round, *n), T0 + 3));
            }
            aggregates.extend(upstream(&acts).into_iter().filter_map(|m| match m {
                Outgoing::Aggregate(a) => Some(a),
                _ => None,
            }));
        }
        assert_eq!(aggregates.len(), 2, "one aggregate per site");
        let mut out = Vec::new();
        for a in aggregates {
            let site = a.site.as_str().to_string();
            out = self.root.on_event(partial(&site, a), T0 + 4);
        }
        out
    }
}

#[test]
fn a_root_over_two_sites_publishes_the_flat_federations_globals_bit_for_bit() {
    let flat = flat_globals(3);
    let mut tree = Tree::new();
    let mut actions = tree.start();
    for round in 1..=3u32 {
        actions = tree.round(&actions, round);
        let global = &tree.root.state().global;
        assert_eq!(tree.root.state().global_round, round);
        for (a, b) in global.tensors.iter().zip(&flat[round as usize - 1].tensors) {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&a.values),
                bits(&b.values),
                "round {round}, tensor {}",
                a.name
            );
        }
        let record = tree.root.state().records.last().unwrap();
        assert_eq!(record.status, RoundStatus::Ok);
        assert_eq!(record.clients_ok, 2);
        // The devices' training metrics reach the root's record, weighted by examples.
        assert!((record.train_loss.unwrap() - 1.0).abs() < 1e-12);
    }
    // The root is done: the sites see its marker and finish.
    for (site, _) in &mut tree.sites {
        let mut finished = false;
        for ev in to_site(&actions) {
            finished |= site
                .on_event(ev, T0 + 5)
                .iter()
                .any(|a| matches!(a, Action::Finished));
        }
        assert!(finished);
        assert!(matches!(site.state().phase, Phase::Done));
    }
}

#[test]
fn a_site_republishes_the_roots_adapter_verbatim_and_announces_with_the_roots_config() {
    let mut tree = Tree::new();
    let root_actions = tree.start();
    let root_global = published(&root_actions)
        .into_iter()
        .find_map(|m| match m {
            Outgoing::Global(g) => Some(g),
            _ => None,
        })
        .unwrap();
    let root_announce = published(&root_actions)
        .into_iter()
        .find_map(|m| match m {
            Outgoing::Announce(a) => Some(a),
            _ => None,
        })
        .unwrap();
    let (site, devices) = &mut tree.sites[0];
    let mut acts = Vec::new();
    for ev in to_site(&root_actions) {
        acts.extend(site.on_event(ev, T0 + 2));
    }
    let out = published(&acts);
    assert!(out.contains(&Outgoing::Global(root_global)));
    let announce = out
        .iter()
        .find_map(|m| match m {
            Outgoing::Announce(a) => Some(a.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(announce.config, root_announce.config);
    assert!(announce.deadline_unix_ms <= root_announce.deadline_unix_ms - 1_000);
    let sampled: Vec<&str> = match &announce.sampling {
        fedpeft_protocol::Sampling::Clients(c) => c.iter().map(ClientId::as_str).collect(),
        other => panic!("{other:?}"),
    };
    assert_eq!(sampled, devices.iter().map(|(c, _)| *c).collect::<Vec<_>>());
}

#[test]
fn a_site_whose_devices_miss_the_quorum_tells_the_root_which_closes_without_waiting() {
    let mut tree = Tree::new();
    let root_actions = tree.start();
    let (site_a, _) = &mut tree.sites[0];
    let mut acts = Vec::new();
    for ev in to_site(&root_actions) {
        acts.extend(site_a.on_event(ev, T0 + 2));
    }
    // Only one of three devices replies; the site's deadline passes.
    acts.extend(site_a.on_event(update("d1", 1, 600), T0 + 3));
    let deadline = site_a_deadline(site_a);
    acts.extend(site_a.on_event(Event::Tick, deadline));
    let sent = upstream(&acts);
    let empty = sent
        .iter()
        .find_map(|m| match m {
            Outgoing::Aggregate(a) => Some(a.clone()),
            _ => None,
        })
        .expect("an aggregate, empty");
    assert_eq!((empty.updates, empty.weight), (0, 0));
    assert!(empty.tensors.is_empty());
    tree.root.on_event(partial("site-a", empty), T0 + 4);
    let Phase::Collecting(open) = &tree.root.state().phase else {
        panic!("round 1 still open for site-b")
    };
    assert!(open.failed.contains_key("site-a"));
}

fn site_a_deadline(m: &RoundMachine) -> u64 {
    m.deadline().expect("a round is open")
}

#[test]
fn a_root_refuses_what_a_site_aggregate_cannot_stand_for() {
    let mut tree = Tree::new();
    let root_actions = tree.start();
    let mut aggregates = Vec::new();
    for (site, devices) in &mut tree.sites {
        let mut acts = Vec::new();
        for ev in to_site(&root_actions) {
            acts.extend(site.on_event(ev, T0 + 2));
        }
        for (c, n) in devices.iter() {
            acts.extend(site.on_event(update(c, 1, *n), T0 + 3));
        }
        aggregates.extend(upstream(&acts).into_iter().filter_map(|m| match m {
            Outgoing::Aggregate(a) => Some(a),
            _ => None,
        }));
    }
    let good = aggregates[0].clone();
    let refused = |root: &RoundMachine, r: RejectReason| {
        root.state().rejected_total.get(&r).copied().unwrap_or(0)
    };
    // Wrong layout, non-finite values, another site's body, a stranger.
    let mut wrong = good.clone();
    wrong.tensors[0].sum.pop();
    wrong.tensors[0].error.pop();
    tree.root.on_event(partial("site-a", wrong), T0 + 4);
    assert_eq!(refused(&tree.root, RejectReason::WrongShape), 1);
    let mut nan = good.clone();
    nan.tensors[1].error[0] = f64::NAN;
    tree.root.on_event(partial("site-a", nan), T0 + 4);
    assert_eq!(refused(&tree.root, RejectReason::NonFinite), 1);
    tree.root.on_event(partial("site-b", good.clone()), T0 + 4);
    assert_eq!(refused(&tree.root, RejectReason::ClientMismatch), 1);
    let mut stranger = good.clone();
    stranger.site = id("site-z");
    tree.root.on_event(partial("site-z", stranger), T0 + 4);
    assert_eq!(refused(&tree.root, RejectReason::UnknownClient), 1);
    // The real one, then its redelivery.
    tree.root.on_event(partial("site-a", good.clone()), T0 + 4);
    tree.root.on_event(partial("site-a", good), T0 + 4);
    assert_eq!(refused(&tree.root, RejectReason::Duplicate), 1);
    let Phase::Collecting(open) = &tree.root.state().phase else {
        panic!("round 1 open")
    };
    assert_eq!(open.accepted.len(), 1);

    // A root whose strategy needs each update refuses sums.
    let mut median = machine(rules("plant", 1, None), &StrategyKind::Median);
    median.on_event(Event::Start, T0);
    median.on_event(join("site-b", 1), T0);
    median.on_event(partial("site-b", aggregates[1].clone()), T0 + 1);
    assert_eq!(refused(&median, RejectReason::Incompatible), 1);
}

#[test]
fn a_restarted_site_resumes_the_roots_round_from_its_checkpoint() {
    let mut tree = Tree::new();
    let root_actions = tree.start();
    let (site, devices) = &mut tree.sites[1];
    for ev in to_site(&root_actions) {
        site.on_event(ev, T0 + 2);
    }
    site.on_event(update(devices[0].0, 1, devices[0].1), T0 + 3);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("site.ckpt");
    checkpoint::save(
        &Saved {
            machine: site.state().clone(),
            outbox: OutboxState::default(),
        },
        &path,
    )
    .unwrap();
    let saved: Saved = checkpoint::load(&path).unwrap().expect("a checkpoint");
    let mut resumed = RoundMachine::restore(
        rules("site-b", 2, Some("site-b")),
        strategy::build(&StrategyKind::FedAvg),
        saved.machine,
    )
    .unwrap();
    let acts = resumed.on_event(Event::Start, T0 + 10);
    // It joins the root again, re-announces the same round with the root's adapter.
    assert!(
        upstream(&acts)
            .iter()
            .any(|m| matches!(m, Outgoing::Join(_)))
    );
    assert!(
        published(&acts)
            .iter()
            .any(|m| matches!(m, Outgoing::Global(g) if g.round == 0))
    );
    let acts = resumed.on_event(update(devices[1].0, 1, devices[1].1), T0 + 11);
    let sent = upstream(&acts);
    let Some(Outgoing::Aggregate(a)) = sent.first() else {
        panic!("the round closes and forwards: {sent:?}")
    };
    assert_eq!((a.round, a.updates, a.weight), (1, 2, 250 + 9_999));
}
