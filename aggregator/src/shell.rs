//! The async shell: moves bytes between MQTT and the round machine, and nothing else.
//!
//! One task owns rumqttc's event loop and forwards what arrives over a channel (so publishing
//! from the main loop can never deadlock against an unpolled event loop); the main loop feeds
//! publishes, deadline ticks and evaluations to [`RoundMachine`] and carries out its actions:
//! publish, checkpoint, evaluate, report. It stops when the run is done or `shutdown` resolves.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, SubscribeFilter};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::broker::{self, BrokerError};
use crate::checkpoint::{self, CheckpointError};
use crate::config::{BrokerTarget, Config};
use crate::host::{HostError, ModelHost};
use crate::keys::{Enrolment, KeysError};
use crate::report::{Report, RunInfo};
use crate::round::{Action, Event, RestoreError, RoundMachine, Rules};
use crate::strategy;
use crate::wire::Inbox;

/// Why a run stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("initial adapter has no tensors: nothing to train")]
    EmptyAdapter,
    #[error("MQTT client: {0}")]
    Mqtt(String),
    #[error(transparent)]
    Keys(#[from] KeysError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("report in {dir}: {source}")]
    Report {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How a run ended.
#[derive(Debug)]
pub struct Outcome {
    pub report: Report,
    /// Whether every round ran (false: stopped by a signal).
    pub finished: bool,
    pub broker: SocketAddr,
}

/// Milliseconds since the Unix epoch (the machine's clock; announced deadlines use it too).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The round rules a config describes, with the host's backbone facts.
pub fn rules(config: &Config, host: &dyn ModelHost) -> Rules {
    Rules {
        run_id: config.run_id,
        fleet: config.fleet.clone(),
        rounds: config.rounds,
        min_clients: config.min_clients,
        start_clients: config.start_clients,
        fraction: config.fraction,
        quorum: config.quorum,
        round_timeout_ms: config.round_timeout_ms,
        on_quorum_failure: config.on_quorum_failure,
        seed: config.seed,
        local: config.local.clone(),
        max_update_bytes: config.max_update_bytes,
        max_payload_bytes: config.max_payload_bytes,
        max_update_norm: config
            .dp
            .as_ref()
            .map(|dp| dp.clip_norm)
            .or(config.max_update_norm),
        adaptive_norm_multiple: config.adaptive_norm_multiple,
        dp_sample_rate: config.dp.as_ref().map(|dp| dp.sample_rate()),
        backbone_params: if config.backbone_params > 0 {
            config.backbone_params
        } else {
            host.backbone_params()
        },
        checkpoint_every_update: true,
        backbone_id: host.backbone_id(),
        backbone_sha256: host.backbone_sha256(),
        peft: config.model.backbone.as_ref().map(|_| config.model.peft),
        signing_key: None,
        global_dtype: config.global_dtype,
    }
}

/// The newest global adapter of a run, in its output folder: the envelope exactly as clients
/// receive it (`fedpeft-decode` prints it).
pub const GLOBAL_ADAPTER_FILE: &str = "global-adapter.bin";

enum FromMqtt {
    Connected,
    Subscribed,
    Publish(rumqttc::Publish),
    Error(String),
}

/// Runs the aggregator until all rounds are done or `shutdown` resolves. `ready` receives the
/// broker address once the aggregator is subscribed (clients may join from then on).
pub async fn run(
    config: Config,
    mut host: Box<dyn ModelHost>,
    shutdown: impl Future<Output = ()>,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<Outcome, RunError> {
    let mut ready = ready;
    let mut rules = rules(&config, host.as_ref());
    if let Some(path) = &config.security.signing_key {
        let key = fedpeft_protocol::sign::read_signing_key(path).map_err(KeysError::from)?;
        info!(key = %path.display(), public_key = %fedpeft_protocol::sign::public_key_hex(&key.verifying_key()),
              "signing global adapters and announcements");
        rules.signing_key = Some(key);
    }
    let enrolment = match &config.security.enrolled_keys {
        Some(path) => {
            let e = Enrolment::read(path)?;
            info!(file = %path.display(), clients = e.len(), "enrolment: joins, statuses and updates must be signed");
            Some(e)
        }
        None => None,
    };
    let transport = match &config.broker.tls {
        Some(files) => Some(crate::tls::transport(files)?),
        None => None,
    };
    let ckpt_path = config.output_dir.join("aggregator.ckpt");
    let global_path = config.output_dir.join(GLOBAL_ADAPTER_FILE);
    std::fs::create_dir_all(&config.output_dir).map_err(|source| RunError::Report {
        dir: config.output_dir.clone(),
        source,
    })?;
    let kind = &config.strategy;
    let resumed = if config.resume {
        checkpoint::load(&ckpt_path)?
    } else {
        None
    };
    let mut machine = match resumed {
        Some(state) => {
            info!(checkpoint = %ckpt_path.display(), global_round = state.global_round,
                  accepted_updates = state.accepted_updates.len(), "resuming from checkpoint");
            RoundMachine::restore(
                rules.clone(),
                strategy::build_with(kind, config.dp.as_ref()).map_err(RestoreError::from)?,
                state,
            )?
        }
        None => {
            let initial = host.initial_adapter()?;
            if initial.tensors.is_empty() {
                return Err(RunError::EmptyAdapter);
            }
            RoundMachine::new(
                rules.clone(),
                strategy::build_with(kind, config.dp.as_ref()).map_err(RestoreError::from)?,
                initial,
            )
        }
    };
    let info = RunInfo {
        fleet: config.fleet.to_string(),
        peft: format!("{:?}", config.model.peft),
        rounds_planned: config.rounds,
        backbone_params: rules.backbone_params,
    };

    let (host_name, port) = match &config.broker.target {
        BrokerTarget::Embedded { host, port } => {
            let b = broker::start(host, *port, config.broker.max_packet_bytes)?;
            info!(addr = %b.addr, max_packet_bytes = config.broker.max_packet_bytes, "embedded broker listening");
            (b.addr.ip().to_string(), b.addr.port())
        }
        BrokerTarget::External { host, port } => (host.clone(), *port),
    };
    let broker_addr: SocketAddr = format!("{host_name}:{port}")
        .parse()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], port)));

    let mut opts = MqttOptions::new(config.broker.client_id.clone(), host_name.clone(), port);
    opts.set_keep_alive(Duration::from_secs(config.broker.keep_alive_secs));
    // A persistent session: QoS 1 updates published while the aggregator is briefly away are
    // kept by an external broker and delivered when it reconnects.
    opts.set_clean_session(false);
    // A message is acknowledged to the broker only once the machine has handled it and every
    // action it caused (the checkpoint among them) is done: an aggregator that dies in between
    // gets it again from an external broker's session when it restarts, instead of losing an
    // update it had logged as accepted but not yet persisted.
    opts.set_manual_acks(true);
    opts.set_max_packet_size(
        config.broker.max_packet_bytes,
        config.broker.max_packet_bytes,
    );
    opts.set_inflight(100);
    if let Some(t) = transport {
        opts.set_transport(t);
    }
    if let Some((user, password)) = &config.broker.credentials {
        opts.set_credentials(user.clone(), password.0.clone());
    }
    let scheme = if config.broker.tls.is_some() {
        "mqtts"
    } else {
        "mqtt"
    };
    let (client, mut eventloop) = AsyncClient::new(opts, 4096);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let pump = tokio::spawn(async move {
        loop {
            let msg = match eventloop.poll().await {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => FromMqtt::Connected,
                Ok(MqttEvent::Incoming(Packet::SubAck(_))) => FromMqtt::Subscribed,
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => FromMqtt::Publish(p),
                Ok(_) => continue,
                Err(e) => {
                    let _ = tx.send(FromMqtt::Error(e.to_string()));
                    // rumqttc reconnects on the next poll; don't spin while the broker is away.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            if tx.send(msg).is_err() {
                break;
            }
        }
    });

    let mut inbox = Inbox::new(
        config.fleet.clone(),
        config.run_id,
        config.max_update_bytes,
        config.round_timeout_ms,
    );
    if let Some(e) = enrolment {
        inbox = inbox.with_enrolment(e);
    }
    let filters: Vec<SubscribeFilter> = inbox
        .subscriptions()
        .into_iter()
        .map(|f| SubscribeFilter::new(f, rumqttc::QoS::AtLeastOnce))
        .collect();
    let mut started = false;
    let mut pending: Vec<Event> = Vec::new();
    // Messages handled (or queued in `pending`) but not yet acknowledged to the broker.
    let mut unacked: Vec<rumqttc::Publish> = Vec::new();
    let mut finished = false;
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);

    loop {
        let mut events: Vec<Event> = Vec::new();
        tokio::select! {
            _ = &mut shutdown => {
                info!("shutdown requested; stopping");
                break;
            }
            msg = rx.recv() => match msg {
                Some(FromMqtt::Connected) => {
                    info!(broker = %broker_addr, "connected to broker");
                    client.subscribe_many(filters.clone()).await
                        .map_err(|e| RunError::Mqtt(e.to_string()))?;
                }
                Some(FromMqtt::Subscribed) => {
                    if started {
                        // Back after a lost connection: the broker may have restarted without
                        // its retained messages, so publish the current state again.
                        events.push(Event::Reconnected);
                    } else {
                        started = true;
                        // Tests and scripts wait for this line before starting clients.
                        println!(
                            "aggregator ready: broker {scheme}://{broker_addr} fleet {} run {}",
                            config.fleet, config.run_id
                        );
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(broker_addr);
                        }
                        events.push(Event::Start);
                        events.append(&mut pending);
                    }
                }
                Some(FromMqtt::Publish(publish)) => {
                    let ev = inbox.on_publish(&publish.topic, &publish.payload, now_ms());
                    if publish.qos != rumqttc::QoS::AtMostOnce {
                        unacked.push(publish);
                    }
                    if let Some(ev) = ev {
                        if started { events.push(ev) } else { pending.push(ev) }
                    }
                }
                Some(FromMqtt::Error(e)) => warn!(error = %e, "MQTT connection error; reconnecting"),
                None => return Err(RunError::Mqtt("event loop ended".into())),
            },
            _ = ticker.tick() => {
                events.extend(inbox.expire(now_ms()));
                if started {
                    events.push(Event::Tick);
                }
            }
        }
        let mut queue: VecDeque<Action> = VecDeque::new();
        for ev in events {
            queue.extend(machine.on_event(ev, now_ms()));
            while let Some(action) = queue.pop_front() {
                match action {
                    Action::Publish {
                        topic,
                        payload,
                        retain,
                        qos: _,
                    } => {
                        client
                            .publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
                            .await
                            .map_err(|e| RunError::Mqtt(e.to_string()))?;
                    }
                    Action::Checkpoint(state) => checkpoint::save(&state, &ckpt_path)?,
                    Action::SaveGlobal { round, payload } => {
                        checkpoint::write_atomic(&global_path, &payload).map_err(|source| {
                            RunError::Report {
                                dir: config.output_dir.clone(),
                                source,
                            }
                        })?;
                        tracing::debug!(round, bytes = payload.len(), path = %global_path.display(), "global adapter saved");
                    }
                    Action::Evaluate { round, adapter } => {
                        let result = tokio::task::block_in_place(|| host.evaluate(&adapter));
                        match result {
                            Ok(Some(e)) => queue.extend(machine.on_event(
                                Event::Evaluated {
                                    round,
                                    loss: e.loss,
                                    accuracy: e.accuracy,
                                },
                                now_ms(),
                            )),
                            Ok(None) => {}
                            Err(e) => error!(round, error = %e, "evaluation failed"),
                        }
                        write_report(&machine, &info, &config, false)?;
                    }
                    Action::RoundClosed(r) => {
                        // Evaluation ran just before this action: read it from the state.
                        let acc = machine
                            .state()
                            .records
                            .iter()
                            .rev()
                            .find(|x| x.round == r.round)
                            .and_then(|x| x.eval_accuracy)
                            .map(|a| format!("{:.2}%", 100.0 * a))
                            .unwrap_or_else(|| "-".into());
                        println!(
                            "round {:>3} {:<6} acc {:>7} ok {:>3} failed {:>3} rejected {:>3} up {:>10} B down {:>10} B full-model {:>12} B {:>6.1} s",
                            r.round,
                            r.status,
                            acc,
                            r.clients_ok,
                            r.clients_failed,
                            r.rejected.values().sum::<u64>(),
                            r.traffic.up_bytes,
                            r.traffic.down_bytes,
                            r.full_model_fedavg_bytes,
                            r.duration_ms as f64 / 1000.0
                        );
                        write_report(&machine, &info, &config, false)?;
                    }
                    Action::Finished => finished = true,
                }
            }
        }
        if started {
            for publish in unacked.drain(..) {
                client
                    .ack(&publish)
                    .await
                    .map_err(|e| RunError::Mqtt(e.to_string()))?;
            }
        }
        if finished {
            break;
        }
    }
    // Let queued publishes (the final global adapter and the "done" announcement) reach the
    // broker before disconnecting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = client.disconnect().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    pump.abort();
    let report = write_report(&machine, &info, &config, finished)?;
    Ok(Outcome {
        report,
        finished,
        broker: broker_addr,
    })
}

fn write_report(
    machine: &RoundMachine,
    info: &RunInfo,
    config: &Config,
    finished: bool,
) -> Result<Report, RunError> {
    let report = crate::report::build(machine.state(), info, finished);
    crate::report::write(&report, &config.output_dir).map_err(|source| RunError::Report {
        dir: config.output_dir.clone(),
        source,
    })?;
    Ok(report)
}
