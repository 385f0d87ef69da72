//! The edge client against a real MQTT broker: an in-process rumqttd on a free loopback port.
//! The test plays the aggregator with a plain rumqttc client: it publishes a (chunked,
//! retained) global adapter and a round announcement, receives the client's update from the
//! wire, checks it against local training done independently, then ends the run.

use std::collections::HashMap;
use std::time::Duration;

use fedpeft_edge::client::{ClientSettings, RunSummary, run};
use fedpeft_edge::config::{Backoff, BrokerAddr, BrokerList};
use fedpeft_edge::trainer::{LocalTrainer, TailTrainer};
use fedpeft_edge::types::{GlobalAdapter, TrainPlan};
use fedpeft_edge::wire::plan_from_wire;
use fedpeft_peft::{Family, FrozenWeights, Method, NamedTensor, PeftConfig, build_tail};
use fedpeft_protocol::{
    Capabilities, ClientId, ClientState, ClientUpdate, Codec, DType, Envelope, FleetName,
    LocalConfig, Message, Optimizer, PeftMethod, Reassembler, ReassemblyLimits, RoundAnnounce,
    Sampling, SplitMix64, Topic, TopicKind,
};
use ndarray::ArrayD;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

mod common;
use common::{free_port, start_broker};

const FLEET: &str = "it";
const RUN: u64 = 4242;
/// Small on purpose: the adapter and the update both have to be chunked.
const MAX_PACKET: usize = 1024;
/// Channels of the synthetic conv head: enough trainable values that messages need chunks.
const WIDTH: usize = 128;

const CLASSES: usize = 3;

fn tail() -> Box<dyn fedpeft_peft::Tail> {
    let mut rng = StdRng::seed_from_u64(1);
    let conv: Vec<f32> = (0..WIDTH * 4)
        .map(|_| rng.random_range(-0.5..0.5))
        .collect();
    let mut w = HashMap::new();
    w.insert("conv_head.weight".to_string(), (vec![WIDTH, 4], conv));
    w.insert(
        "bn_head.scale".to_string(),
        (vec![WIDTH], vec![1.0f32; WIDTH]),
    );
    w.insert(
        "bn_head.shift".to_string(),
        (vec![WIDTH], vec![0.1f32; WIDTH]),
    );
    let weights = FrozenWeights::from_map(w).unwrap();
    build_tail(
        Family::ConvHead,
        &weights,
        PeftConfig::new(Method::Bias, CLASSES, 7),
    )
    .unwrap()
}

/// Cached "trunk activations" of a client: class c lights up channel c.
fn trainer() -> TailTrainer {
    let n = 60;
    let mut rng = StdRng::seed_from_u64(5);
    let labels: Vec<usize> = (0..n).map(|i| i % CLASSES).collect();
    let mut x = ArrayD::<f32>::zeros(vec![n, 4, 2, 2]);
    for (i, &c) in labels.iter().enumerate() {
        for ch in 0..4 {
            for p in 0..4 {
                x[[i, ch, p / 2, p % 2]] =
                    if ch == c { 2.0 } else { 0.0 } + rng.random_range(-0.3..0.3);
            }
        }
    }
    TailTrainer::new(tail(), x, labels, 11).unwrap()
}

fn local_config() -> LocalConfig {
    LocalConfig {
        epochs: 2,
        batch_size: 16,
        learning_rate: 0.3,
        optimizer: Optimizer::Sgd {
            momentum: 0.0,
            weight_decay: 0.0,
        },
        fedprox_mu: 0.0,
        dp_sgd: None,
        update_dtype: DType::F32,
        top_k_fraction: None,
        seed: 3,
    }
}

fn topic(kind: TopicKind) -> String {
    Topic::new(FleetName::new(FLEET).unwrap(), kind).to_string()
}

fn settings(port: u16, id: &str) -> ClientSettings {
    let mut dtypes = heapless::Vec::new();
    dtypes.push(DType::F32).unwrap();
    ClientSettings {
        brokers: BrokerAddr {
            host: "127.0.0.1".into(),
            port,
            tls: false,
        }
        .into(),
        keep_alive: Duration::from_secs(5),
        max_packet_bytes: MAX_PACKET,
        credentials: None,
        reconnect: Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
            multiplier: 2.0,
            jitter: 0.5,
        },
        fleet: FleetName::new(FLEET).unwrap(),
        client_id: ClientId::new(id).unwrap(),
        run_id: RUN,
        capabilities: Capabilities {
            backbone_id: heapless::String::try_from("synthetic-conv-head").unwrap(),
            backbone_sha256: [0; 32],
            peft: PeftMethod::Bias,
            accepted_dtypes: dtypes,
            max_packet_size: MAX_PACKET as u32,
        },
        tls: None,
        signing_key: None,
        aggregator_key: None,
        faults: Default::default(),
        fault_seed: 0,
        client_index: 0,
        serve: None,
    }
}

/// The test's side of the broker: publishes like an aggregator, collects what clients send.
struct Aggregator {
    client: AsyncClient,
    rx: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
}

impl Aggregator {
    async fn connect(port: u16) -> Aggregator {
        let mut opts = MqttOptions::new("test-aggregator", "127.0.0.1", port);
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (subacked_tx, mut subacked) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subacked_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        let root = format!("fedpeft/v1/{FLEET}");
        let filters = ["update/+", "join", "status/+"];
        for f in filters {
            client
                .subscribe(format!("{root}/{f}"), QoS::AtLeastOnce)
                .await
                .unwrap();
        }
        // `subscribe` only queues the request: wait for the broker's acknowledgements, or a
        // client that joins quickly would publish before anyone listens.
        for _ in filters {
            tokio::time::timeout(Duration::from_secs(30), subacked.recv())
                .await
                .expect("the test aggregator's subscriptions were not acknowledged in 30 s")
                .expect("event loop alive");
        }
        Aggregator { client, rx }
    }

    async fn publish(&self, topic: String, payload: Vec<u8>, retain: bool) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .unwrap();
    }

    /// Publishes `adapter` retained, chunked onto `global/{n}` when it exceeds the limit.
    async fn publish_adapter(&self, adapter: &GlobalAdapter) {
        let tensors = adapter
            .tensors
            .iter()
            .map(|t| {
                let shape: Vec<u32> = t.shape.iter().map(|&d| d as u32).collect();
                fedpeft_protocol::Tensor::encode(
                    &t.name,
                    &shape,
                    &t.values,
                    Codec::dense(DType::F32),
                    &mut SplitMix64::new(0),
                )
                .unwrap()
            })
            .collect();
        let g = fedpeft_protocol::GlobalAdapter {
            round: adapter.round,
            tensors,
        };
        let bytes = Envelope::new(RUN, adapter.round, g).encode().unwrap();
        let parts =
            fedpeft_protocol::chunk::split(&bytes, MAX_PACKET - 64, RUN, adapter.round, 1).unwrap();
        assert!(
            parts.len() > 1,
            "the adapter should need chunking in this test"
        );
        for (i, p) in parts.into_iter().enumerate() {
            self.publish(topic(TopicKind::GlobalChunk(i as u32)), p, true)
                .await;
        }
    }

    async fn announce(&self, round: u32, sampled: &[&str], config: LocalConfig) {
        let a = RoundAnnounce {
            round,
            deadline_unix_ms: u64::MAX,
            sampling: Sampling::Clients(
                sampled.iter().map(|s| ClientId::new(s).unwrap()).collect(),
            ),
            config,
        };
        self.publish(
            topic(TopicKind::Round),
            Envelope::new(RUN, round, a).encode().unwrap(),
            true,
        )
        .await;
    }

    /// The aggregator's end-of-run marker: no deadline, nobody sampled.
    async fn done(&self, round: u32) {
        let a = RoundAnnounce {
            round,
            deadline_unix_ms: 0,
            sampling: Sampling::Clients(Vec::new()),
            config: local_config(),
        };
        self.publish(
            topic(TopicKind::Round),
            Envelope::new(RUN, round, a).encode().unwrap(),
            true,
        )
        .await;
    }

    /// Waits for the next message accepted by `pick`, reassembling chunks per topic.
    async fn wait_for<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&str, Message) -> Option<T>,
    ) -> T {
        let mut r = Reassembler::<String>::new(ReassemblyLimits::default());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (topic, payload) = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                .expect("test aggregator event loop alive");
            if payload.is_empty() {
                continue;
            }
            let env = Envelope::decode(&payload)
                .unwrap_or_else(|e| panic!("bad payload on {topic}: {e}"));
            let message = match env.message {
                Message::Chunk(c) => match r.push(topic.clone(), c, 0).unwrap() {
                    Some(whole) => Envelope::decode(&whole).unwrap().message,
                    None => continue,
                },
                m => m,
            };
            if let Some(t) = pick(&topic, message) {
                return t;
            }
        }
    }
}

fn expected_delta(global: &GlobalAdapter, plan: &TrainPlan) -> Vec<NamedTensor> {
    trainer().train(global, plan).unwrap().deltas
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sampled_client_joins_trains_on_the_chunked_adapter_publishes_its_update_and_exits_when_done()
 {
    let port = free_port();
    start_broker(port, Duration::from_secs(10), Duration::from_secs(10));
    let mut agg = Aggregator::connect(port).await;

    let t = trainer();
    let global = GlobalAdapter {
        run_id: RUN,
        round: 0,
        tensors: t.trainable(),
    };
    let client = tokio::spawn(run(
        settings(port, "edge-a"),
        t,
        std::future::pending::<()>(),
    ));

    // Join, with its capabilities and example count.
    let join = agg
        .wait_for("join", |_, m| match m {
            Message::Join(j) => Some(j),
            _ => None,
        })
        .await;
    assert_eq!(join.client.as_str(), "edge-a");
    assert_eq!(join.num_examples, 60);
    assert_eq!(join.capabilities.max_packet_size, MAX_PACKET as u32);

    // Round 1 starts from adapter 0: adapter first (retained, chunked), then the announcement.
    agg.publish_adapter(&global).await;
    agg.announce(1, &["edge-a", "someone-else"], local_config())
        .await;

    let update: ClientUpdate = agg
        .wait_for("the round-1 update", |topic, m| match m {
            Message::ClientUpdate(u) => {
                assert_eq!(topic, "fedpeft/v1/it/update/edge-a");
                Some(u)
            }
            _ => None,
        })
        .await;
    assert_eq!(
        (update.client.as_str(), update.round, update.num_examples),
        ("edge-a", 1, 60)
    );
    update.validate().unwrap();
    // Exactly what the same training computes on its own (f32 is lossless).
    let expected = expected_delta(&global, &plan_from_wire(&local_config()));
    assert_eq!(update.tensors.len(), expected.len());
    for (got, want) in update.tensors.iter().zip(&expected) {
        assert_eq!(got.name(), want.name);
        assert_eq!(got.to_f32(), want.values, "{}", want.name);
    }
    assert!(update.metrics.accuracy > 0.0 && update.metrics.loss.is_finite());

    // Round 2 without this client: it must not train.
    let mut g1 = global.clone();
    g1.round = 1;
    agg.publish_adapter(&g1).await;
    agg.announce(2, &["someone-else"], local_config()).await;

    // End of run: the client says offline (retained) and exits by itself.
    agg.done(3).await;
    let offline = agg
        .wait_for("status offline", |topic, m| match m {
            Message::Status(s) if s.state == ClientState::Offline => Some(topic.to_string()),
            _ => None,
        })
        .await;
    assert_eq!(offline, "fedpeft/v1/it/status/edge-a");
    let summary: RunSummary = tokio::time::timeout(Duration::from_secs(20), client)
        .await
        .expect("client exits after run done")
        .unwrap()
        .unwrap();
    assert_eq!(summary.exit, "run_done");
    assert_eq!(summary.rounds_trained, 1);
    assert_eq!(summary.updates_sent, 1);
    assert_eq!(summary.rounds_not_sampled, 1);
    // Bytes: the update alone is more than one packet's worth up; both adapters came down.
    let r0 = summary.bytes.round(1);
    assert!(
        r0.up.packets >= 2 && r0.up.bytes > MAX_PACKET as u64,
        "{r0:?}"
    );
    assert!(
        summary.bytes.total.down.bytes > 2 * MAX_PACKET as u64,
        "{:?}",
        summary.bytes.total
    );
    assert!(
        summary.bytes.total.up.bytes >= r0.up.bytes + summary.bytes.before_first_round.up.bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_started_before_its_broker_keeps_retrying_and_stops_on_shutdown() {
    let port = free_port();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let client = tokio::spawn(run(settings(port, "edge-b"), trainer(), async {
        let _ = stop_rx.await;
    }));
    tokio::time::sleep(Duration::from_millis(300)).await;
    start_broker(port, Duration::from_secs(10), Duration::from_secs(10));
    let mut agg = Aggregator::connect(port).await;
    // The Join may have gone out before this subscriber existed; the retained status did not.
    let online = agg
        .wait_for("status online after the broker came up", |_, m| match m {
            Message::Status(s) if s.state == ClientState::Online => Some(s.client),
            _ => None,
        })
        .await;
    assert_eq!(online.as_str(), "edge-b");
    stop_tx.send(()).unwrap();
    let summary = tokio::time::timeout(Duration::from_secs(10), client)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(summary.exit, "signal");
    assert!(summary.connection_errors >= 1, "{summary:?}");
    assert_eq!(summary.connects, 1);
    let offline = agg
        .wait_for("status offline", |_, m| match m {
            Message::Status(s) if s.state == ClientState::Offline => Some(s.client),
            _ => None,
        })
        .await;
    assert_eq!(offline.as_str(), "edge-b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_first_broker_is_down_connects_to_the_next_one_of_its_list() {
    let (dead, live) = (free_port(), free_port());
    start_broker(live, Duration::from_secs(10), Duration::from_secs(10));
    let mut agg = Aggregator::connect(live).await;
    let mut settings = settings(dead, "edge-c");
    settings.brokers =
        BrokerList::parse(&format!("mqtt://127.0.0.1:{dead},mqtt://127.0.0.1:{live}")).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let client = tokio::spawn(run(settings, trainer(), async {
        let _ = stop_rx.await;
    }));
    // Nothing listens on the first: only a move to the second brings the client here.
    let online = agg
        .wait_for("status online on the second broker", |_, m| match m {
            Message::Status(s) if s.state == ClientState::Online => Some(s.client),
            _ => None,
        })
        .await;
    assert_eq!(online.as_str(), "edge-c");
    stop_tx.send(()).unwrap();
    let summary = tokio::time::timeout(Duration::from_secs(10), client)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(summary.exit, "signal");
    assert!(summary.connection_errors >= 1, "{summary:?}");
    assert_eq!(summary.connects, 1);
}
