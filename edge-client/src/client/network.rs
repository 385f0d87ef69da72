//! The network side of the shell: the rumqttc event loop polled in a task of its own (with the
//! reconnect backoff and the emulated dropout), and the requests handed to rumqttc's channel.
//!
//! The task forwards what it sees over a channel, so the shell only ever waits on cancel-safe
//! channel receives.

use std::collections::VecDeque;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rumqttc::{
    AsyncClient, ConnAck, Event as MqttEvent, EventLoop, MqttOptions, Packet as MqttPacket, QoS,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::accounting::{ByteLedger, packet_size};
use crate::config::{Backoff, BrokerAddr};
use crate::tls::failover::Failover;
use crate::types::Round;
use crate::wire::Packet;

/// What the event-loop task forwards.
pub(super) enum Net {
    /// Connected to `broker` (of the list): its CONNACK.
    Connected {
        broker: BrokerAddr,
        ack: ConnAck,
    },
    Event(MqttEvent),
    /// A failed poll; the task sleeps `retry_in`, then tries `next`.
    Error {
        reason: String,
        retry_in: Duration,
        next: BrokerAddr,
    },
}

/// A publish or disconnect waiting for room in rumqttc's request channel.
pub(super) enum Request {
    Publish(Packet),
    Subscribe(Vec<String>),
    Disconnect,
}

/// The poller task's ends the shell holds.
pub(super) struct Poller {
    /// What the event loop saw.
    pub events: mpsc::UnboundedReceiver<Net>,
    /// Emulated dropout: drop the connection and stay away this long.
    pub vanish: mpsc::UnboundedSender<Duration>,
    pub task: JoinHandle<()>,
}

/// Polls `eventloop` (built on `failover`'s options) in a task until the shell hangs up:
/// forwards every event, sleeps the backoff (drawn from an RNG seeded with `seed`) after each
/// failed attempt and makes the next one on the next broker of the list, and on a vanish
/// request drops the connection without DISCONNECT and stays away (coming back to the same
/// broker).
pub(super) fn spawn_poller(
    mut eventloop: EventLoop,
    mut failover: Failover,
    backoff: Backoff,
    seed: u64,
) -> Poller {
    let (net_tx, events) = mpsc::unbounded_channel::<Net>();
    let (vanish, mut vanish_rx) = mpsc::unbounded_channel::<Duration>();
    let task = tokio::spawn(async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut attempt = 0u32;
        loop {
            let polled = tokio::select! {
                biased;
                Some(away) = vanish_rx.recv() => {
                    // Closing the socket without DISCONNECT: to the broker this is a device
                    // that fell off the network, so it publishes our last will.
                    eventloop.clean();
                    tokio::time::sleep(away).await;
                    continue;
                }
                polled = eventloop.poll() => polled,
            };
            let net = match polled {
                Ok(MqttEvent::Incoming(MqttPacket::ConnAck(ack))) => {
                    attempt = 0;
                    Net::Connected {
                        broker: failover.current().clone(),
                        ack,
                    }
                }
                Ok(ev) => Net::Event(ev),
                Err(e) => {
                    let retry_in = backoff.delay(attempt, rng.random::<f64>());
                    attempt = attempt.saturating_add(1);
                    let reason = e.to_string();
                    let next = failover.advance(&mut eventloop).clone();
                    if net_tx
                        .send(Net::Error {
                            reason,
                            retry_in,
                            next,
                        })
                        .is_err()
                    {
                        return;
                    }
                    tokio::time::sleep(retry_in).await;
                    continue;
                }
            };
            if net_tx.send(net).is_err() {
                return;
            }
        }
    });
    Poller {
        events,
        vanish,
        task,
    }
}

/// Hands queued requests to rumqttc while its channel has room, booking publish sizes.
pub(super) fn flush(
    mqtt: &AsyncClient,
    outbox: &mut VecDeque<Request>,
    ledger: &mut ByteLedger,
    round: Option<Round>,
) {
    while let Some(req) = outbox.pop_front() {
        let (result, size) = match &req {
            Request::Publish(p) => (
                mqtt.try_publish(
                    p.topic.clone(),
                    QoS::AtLeastOnce,
                    p.retain,
                    p.payload.clone(),
                ),
                p.wire_size(),
            ),
            Request::Subscribe(filters) => (
                mqtt.try_subscribe_many(
                    filters
                        .iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
                ),
                packet_size::subscribe(filters),
            ),
            // DISCONNECT is booked when the event loop reports it sent.
            Request::Disconnect => (mqtt.try_disconnect(), 0),
        };
        match result {
            Ok(()) => {
                if size > 0 {
                    ledger.sent(round, size);
                }
            }
            Err(_) => {
                // Channel full: keep order and retry after the event loop made progress.
                outbox.push_front(req);
                break;
            }
        }
    }
}

/// Size of our CONNECT packet (sent on every (re)connect).
pub(super) fn connect_packet_size(opts: &MqttOptions) -> usize {
    let connect = rumqttc::Connect {
        protocol: rumqttc::Protocol::V4,
        keep_alive: opts.keep_alive().as_secs() as u16,
        client_id: opts.client_id(),
        clean_session: opts.clean_session(),
        last_will: opts.last_will(),
        login: opts.credentials(),
    };
    connect.size()
}
