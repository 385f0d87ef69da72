//! The fleet's global adapter from the broker, for `predict --from-broker` and
//! `serve --from-broker`: an observer session that subscribes to the fleet's global adapter
//! topics (the retained one arrives at once, chunks reassembled) and never joins, trains or
//! publishes. It connects as `<client id>-observer` with a clean session and no last will, so
//! it neither takes over nor disturbs the device's own training session; the broker's ACL must
//! let it read `fedpeft/<fleet>/global/#` (as it lets the client).
//!
//! What it accepts is what the training client accepts: the configured run, the aggregator's
//! signature when `--aggregator-key` is set, whole reassembled adapters; everything else is
//! logged and skipped.

use std::time::Duration;

use anyhow::Context;
use fedpeft_protocol::{Capabilities, ClientId, FleetName, PeftMethod};
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet as MqttPacket, QoS};

use crate::config::EdgeConfig;
use crate::session::Event;
use crate::tls::failover::Failover;
use crate::types::SharedAdapter;
use crate::wire::{JoinInfo, Wire};

/// The observer's MQTT client id for `client_id`.
pub fn observer_id(client_id: &str) -> String {
    let suffix = "-observer";
    let keep = crate::config::MAX_NAME_LEN.saturating_sub(suffix.len());
    let base: String = client_id.chars().take(keep).collect();
    format!("{base}{suffix}")
}

/// A connection following the fleet's global adapters.
pub struct Observer {
    client: AsyncClient,
    events: rumqttc::EventLoop,
    /// The brokers of the list; a failed connection moves on to the next.
    failover: Failover,
    wire: Wire,
    newest: Option<(u64, u32)>,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer")
            .field("broker", &self.failover.current())
            .field("newest", &self.newest)
            .finish_non_exhaustive()
    }
}

impl Observer {
    /// Connects (lazily: the first [`Observer::next`] does) and subscribes.
    pub fn new(cfg: &EdgeConfig) -> anyhow::Result<Observer> {
        let id = observer_id(&cfg.client_id);
        let fleet = FleetName::new(&cfg.fleet).map_err(|e| anyhow::anyhow!("fleet: {e}"))?;
        let client_id = ClientId::new(&id).map_err(|e| anyhow::anyhow!("client id: {e}"))?;
        // The observer never joins; Join's capabilities are never sent.
        let join = JoinInfo {
            capabilities: Capabilities {
                backbone_id: heapless::String::new(),
                backbone_sha256: [0; 32],
                peft: PeftMethod::Head,
                accepted_dtypes: heapless::Vec::new(),
                max_packet_size: cfg.max_packet_bytes as u32,
            },
            num_examples: 0,
        };
        let mut wire = Wire::new(fleet, client_id, cfg.run_id, join, cfg.max_packet_bytes);
        if let Some(key) = cfg.aggregator_key {
            wire = wire.with_aggregator_key(key);
        }
        let failover = Failover::new(cfg.brokers.clone(), |broker| {
            let mut opts = MqttOptions::new(&id, &broker.host, broker.port);
            opts.set_keep_alive(cfg.keep_alive)
                .set_clean_session(true)
                .set_max_packet_size(cfg.max_packet_bytes, cfg.max_packet_bytes);
            if let Some((user, pass)) = &cfg.credentials {
                opts.set_credentials(user, pass);
            }
            if let Some(files) = &cfg.tls {
                opts.set_transport(crate::tls::transport(files)?);
            }
            Ok::<_, anyhow::Error>(opts)
        })?;
        let (client, events) = AsyncClient::new(failover.options(), 16);
        Ok(Observer {
            client,
            events,
            failover,
            wire,
            newest: None,
        })
    }

    /// Where the adapters come from, for logs and refusals.
    pub fn origin(&self, round: u32) -> String {
        format!("round {round} from {}", self.failover.current())
    }

    /// The next global adapter newer than the last one returned (the retained one first).
    /// Connection errors are retried after a second; `Err` only when the subscription fails.
    pub async fn next(&mut self) -> anyhow::Result<SharedAdapter> {
        loop {
            let event = match self.events.poll().await {
                Ok(e) => e,
                Err(e) => {
                    let broker = self.failover.current().clone();
                    let next = self.failover.advance(&mut self.events);
                    tracing::warn!(%broker, error = %e, %next, "observer: connection; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            match event {
                MqttEvent::Incoming(MqttPacket::ConnAck(_)) => {
                    for filter in self.wire.subscriptions().into_iter().take(1) {
                        self.client
                            .subscribe(filter, QoS::AtLeastOnce)
                            .await
                            .context("subscribing to the global adapter")?;
                    }
                }
                MqttEvent::Incoming(MqttPacket::Publish(p)) => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0);
                    match self.wire.decode(&p.topic, &p.payload, now) {
                        Ok(Some(Event::Adapter(g))) => {
                            let key = (g.run_id, g.round);
                            if self.newest.is_some_and(|n| n >= key) {
                                continue;
                            }
                            self.newest = Some(key);
                            return Ok(std::sync::Arc::new(g));
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "observer: message refused"),
                    }
                }
                _ => {}
            }
        }
    }

    /// The retained global adapter, waiting at most `timeout` for it.
    pub async fn retained(&mut self, timeout: Duration) -> anyhow::Result<SharedAdapter> {
        tokio::time::timeout(timeout, self.next())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "no global adapter of fleet `{}` run {} on {} within {timeout:?} (is the \
                     aggregator running, and the run id right?)",
                    self.wire_fleet(),
                    self.wire.run_id(),
                    self.failover.current()
                )
            })?
    }

    fn wire_fleet(&self) -> String {
        self.wire
            .subscriptions()
            .first()
            .and_then(|f| f.split('/').nth(1).map(str::to_string))
            .unwrap_or_default()
    }
}

/// The class names of the configured data set, in label-id order.
pub fn class_names(cfg: &EdgeConfig) -> Vec<String> {
    if let Some(c) = cfg.data.classes() {
        return c.to_vec();
    }
    match cfg.data.dataset {
        fedpeft_config::DatasetKind::SpamAssassin => fedpeft_backbone::data::SPAM_ASSASSIN_CLASSES
            .iter()
            .map(|s| s.to_string())
            .collect(),
        _ => fedpeft_backbone::data::FASHION_MNIST_CLASSES
            .iter()
            .map(|s| s.to_string())
            .collect(),
    }
}
