//! One federated round with the real EfficientNet-Lite0 trunk on tract, as a board runs it:
//! the client is prepared from its config (`setup::build_trainer`: manifest, Fashion-MNIST
//! shard, trunk activations, LoRA tail), joins an in-process rumqttd on loopback, trains the
//! round it is sampled in and publishes its update. `make test-cross` runs this test on
//! aarch64 and armv7 under qemu user-mode, so it is kept small: a handful of images, one epoch.
//!
//! Needs `make models` (models/build/efficientnet-lite0) and Fashion-MNIST (scripts/setup.sh);
//! without them it fails rather than skips.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use fedpeft_edge::client::{ClientSettings, run};
use fedpeft_edge::config::{Cli, EdgeConfig};
use fedpeft_edge::setup::{LocalSetup, build_trainer};
use fedpeft_edge::trainer::LocalTrainer;
use fedpeft_edge::types::GlobalAdapter;
use fedpeft_edge::wire::plan_from_wire;
use fedpeft_peft::NamedTensor;
use fedpeft_protocol::{
    ClientState, ClientUpdate, Codec, DType, Envelope, FleetName, LocalConfig, Message, Optimizer,
    RoundAnnounce, Sampling, SplitMix64, Topic, TopicKind,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

mod common;
use common::{free_port, start_broker};

const FLEET: &str = "board";
const RUN: u64 = 7;
const CLIENT: &str = "pi-01";
/// Images this client trains on: enough for a real round, few enough for qemu.
const EXAMPLES: usize = 8;

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/build/efficientnet-lite0")
}

/// The client's config, as flags: LoRA on the real trunk with tract, a small Fashion-MNIST
/// shard, the activation cache in `cache`.
fn config(port: u16, cache: &Path) -> EdgeConfig {
    let port = port.to_string();
    let dir = model_dir();
    let args = [
        "edge-client",
        "--broker",
        &format!("mqtt://127.0.0.1:{port}"),
        "--fleet",
        FLEET,
        "--client-id",
        CLIENT,
        "--run-id",
        &RUN.to_string(),
        "--model-dir",
        dir.to_str().unwrap(),
        "--runtime",
        "tract",
        "--peft",
        "lora",
        "--partition",
        "iid",
        "--num-clients",
        "100",
        "--client-index",
        "3",
        "--max-examples",
        &EXAMPLES.to_string(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ];
    let mut cfg = EdgeConfig::from_cli(&Cli::try_parse_from(args).unwrap()).unwrap();
    // One trunk thread: qemu user-mode emulates each thread on its own host thread, and CI has
    // two cores for everything.
    cfg.threads = 1;
    cfg
}

fn topic(kind: TopicKind) -> String {
    Topic::new(FleetName::new(FLEET).unwrap(), kind).to_string()
}

fn local_config() -> LocalConfig {
    LocalConfig {
        epochs: 3,
        batch_size: 4,
        learning_rate: 0.01,
        optimizer: Optimizer::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.0,
        },
        fedprox_mu: 0.0,
        dp_sgd: None,
        update_dtype: DType::F32,
        top_k_fraction: None,
        seed: 11,
    }
}

fn envelope<M: Into<Message>>(round: u32, m: M) -> Vec<u8> {
    Envelope::new(RUN, round, m).encode().unwrap()
}

/// The test's aggregator side: a plain MQTT client on the same broker.
async fn connect_aggregator(
    port: u16,
) -> (AsyncClient, tokio::sync::mpsc::UnboundedReceiver<Message>) {
    let mut opts = MqttOptions::new("test-aggregator", "127.0.0.1", port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    opts.set_keep_alive(Duration::from_secs(60));
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (acked_tx, mut acked) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) if !p.payload.is_empty() => {
                    let env = Envelope::decode(&p.payload)
                        .unwrap_or_else(|e| panic!("bad payload on {}: {e}", p.topic));
                    let _ = tx.send(env.message);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = acked_tx.send(());
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let filters = ["join", "update/+", "status/+"];
    for f in filters {
        client
            .subscribe(format!("fedpeft/v1/{FLEET}/{f}"), QoS::AtLeastOnce)
            .await
            .unwrap();
    }
    for _ in filters {
        tokio::time::timeout(Duration::from_secs(60), acked.recv())
            .await
            .expect("subscriptions acknowledged")
            .unwrap();
    }
    (client, rx)
}

/// The next message `pick` accepts; others are skipped. Generous: qemu is slow.
async fn wait_for<T>(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Message>,
    what: &str,
    mut pick: impl FnMut(Message) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        let m = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("aggregator event loop alive");
        if let Some(t) = pick(m) {
            return t;
        }
    }
}

fn wire_adapter(adapter: &GlobalAdapter) -> fedpeft_protocol::GlobalAdapter {
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
    fedpeft_protocol::GlobalAdapter {
        round: adapter.round,
        tensors,
    }
}

fn plus(global: &GlobalAdapter, delta: &[NamedTensor]) -> GlobalAdapter {
    let mut g = global.clone();
    for (t, d) in g.tensors.iter_mut().zip(delta) {
        assert_eq!(t.name, d.name);
        for (v, dv) in t.values.iter_mut().zip(&d.values) {
            *v += dv;
        }
    }
    g
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_on_the_real_tract_trunk_joins_trains_a_round_and_publishes_its_update() {
    let cache = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = config(port, cache.path());

    // Trunk activations for the shard, computed by tract and persisted in the cache.
    let t0 = Instant::now();
    let LocalSetup {
        trainer,
        capabilities,
        per_class,
        ..
    } = tokio::task::spawn_blocking({
        let cfg = cfg.clone();
        move || build_trainer(&cfg)
    })
    .await
    .unwrap()
    .unwrap();
    println!("setup with the trunk: {:?}", t0.elapsed());
    assert_eq!(per_class.iter().sum::<usize>(), EXAMPLES);
    assert_eq!(trainer.num_examples(), EXAMPLES as u64);
    assert_eq!(capabilities.backbone_id.as_str(), "efficientnet-lite0");
    assert_ne!(capabilities.backbone_sha256, [0; 32]);
    let global = GlobalAdapter {
        run_id: RUN,
        round: 0,
        tensors: trainer.trainable(),
    };
    assert!(
        global.tensors.iter().any(|t| t.name.contains("lora")),
        "{:?}",
        global.tensors.iter().map(|t| &t.name).collect::<Vec<_>>()
    );

    start_broker(port, Duration::from_secs(60), Duration::from_secs(30));
    let (agg, mut rx) = connect_aggregator(port).await;
    let settings = ClientSettings::from_config(&cfg, capabilities).unwrap();
    let client = tokio::spawn(run(settings, trainer, std::future::pending::<()>()));

    let join = wait_for(&mut rx, "join", |m| match m {
        Message::Join(j) => Some(j),
        _ => None,
    })
    .await;
    assert_eq!(
        (join.client.as_str(), join.num_examples),
        (CLIENT, EXAMPLES as u64)
    );

    agg.publish(
        topic(TopicKind::Global),
        QoS::AtLeastOnce,
        true,
        envelope(0, wire_adapter(&global)),
    )
    .await
    .unwrap();
    let announce = RoundAnnounce {
        round: 1,
        deadline_unix_ms: u64::MAX,
        sampling: Sampling::Clients(vec![fedpeft_protocol::ClientId::new(CLIENT).unwrap()]),
        config: local_config(),
    };
    agg.publish(
        topic(TopicKind::Round),
        QoS::AtLeastOnce,
        true,
        envelope(1, announce),
    )
    .await
    .unwrap();

    let update: ClientUpdate = wait_for(&mut rx, "the round-1 update", |m| match m {
        Message::ClientUpdate(u) => Some(u),
        _ => None,
    })
    .await;
    update.validate().unwrap();
    assert_eq!(
        (update.client.as_str(), update.round, update.num_examples),
        (CLIENT, 1, EXAMPLES as u64)
    );
    let delta: Vec<NamedTensor> = update
        .tensors
        .iter()
        .zip(&global.tensors)
        .map(|(got, g)| {
            assert_eq!(got.name(), g.name);
            NamedTensor {
                name: g.name.clone(),
                shape: g.shape.clone(),
                values: got.to_f32(),
            }
        })
        .collect();
    assert_eq!(delta.len(), global.tensors.len());
    for d in &delta {
        assert!(d.values.iter().all(|v| v.is_finite()), "{}", d.name);
        // LoRA's B starts at zero and its gradient is zero unless the trunk's activations are
        // not: every tensor moving means the trunk produced a real signal.
        assert!(
            d.values.iter().any(|&v| v != 0.0),
            "{} did not move",
            d.name
        );
    }

    // A second start of the same client finds its activations in the cache (no trunk run);
    // training it the same way gives exactly the published update.
    let t1 = Instant::now();
    let mut again = build_trainer(&cfg).unwrap().trainer;
    println!("setup from the cache: {:?}", t1.elapsed());
    let expected = again
        .train(&global, &plan_from_wire(&local_config()))
        .unwrap();
    for (got, want) in delta.iter().zip(&expected.deltas) {
        assert_eq!(got.values, want.values, "{}", want.name);
    }
    // ...and the round learned something: lower loss on its own examples than the adapter
    // it started from.
    let before = again.evaluate(&global).unwrap();
    let after = again.evaluate(&plus(&global, &delta)).unwrap();
    println!("local loss {} -> {}", before.loss, after.loss);
    assert!(after.loss < before.loss, "{before:?} -> {after:?}");

    // End of run: no deadline, nobody sampled. The client goes offline and exits.
    let done = RoundAnnounce {
        round: 2,
        deadline_unix_ms: 0,
        sampling: Sampling::Clients(Vec::new()),
        config: local_config(),
    };
    agg.publish(
        topic(TopicKind::Round),
        QoS::AtLeastOnce,
        true,
        envelope(2, done),
    )
    .await
    .unwrap();
    wait_for(&mut rx, "status offline", |m| match m {
        Message::Status(s) if s.state == ClientState::Offline => Some(()),
        _ => None,
    })
    .await;
    let summary = tokio::time::timeout(Duration::from_secs(60), client)
        .await
        .expect("client exits after run done")
        .unwrap()
        .unwrap();
    assert_eq!(
        (summary.exit, summary.rounds_trained, summary.updates_sent),
        ("run_done", 1, 1)
    );
}
