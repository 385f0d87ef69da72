//! Failover over a [`BrokerList`] for rumqttc's event loop.
//!
//! After a failed `poll`, rumqttc connects again on the next one, to the broker its public
//! `mqtt_options` name. [`Failover::advance`] puts the next broker's options there first, so
//! each attempt after a refused, reset or timed-out connection goes to the next broker of the
//! list, round-robin, with whatever wait the caller keeps between attempts. Nothing else of the
//! event loop changes: its unacknowledged QoS 1 publishes go out again on the new connection
//! when the broker reports the session present (a cluster that shares sessions, as NATS with
//! JetStream does, reports it on any node).

use rumqttc::{EventLoop, MqttOptions};

use crate::broker::{BrokerAddr, BrokerList};

/// The connect options of every broker of a list, and the one the event loop is on.
#[derive(Debug)]
pub struct Failover {
    brokers: BrokerList,
    /// One per broker, in list order; they differ in the address only (and so in the TLS
    /// server name).
    options: Vec<MqttOptions>,
    current: usize,
}

impl Failover {
    /// `options` builds the connect options for one broker of `brokers`.
    pub fn new<E>(
        brokers: BrokerList,
        options: impl FnMut(&BrokerAddr) -> Result<MqttOptions, E>,
    ) -> Result<Failover, E> {
        let options = brokers.iter().map(options).collect::<Result<Vec<_>, E>>()?;
        Ok(Failover {
            brokers,
            options,
            current: 0,
        })
    }

    /// The options to build the event loop with: the first broker's.
    pub fn options(&self) -> MqttOptions {
        self.options[self.current].clone()
    }

    /// The broker the event loop is connected to, or tries next.
    pub fn current(&self) -> &BrokerAddr {
        self.brokers.get(self.current)
    }

    /// After a failed poll: `eventloop` tries the next broker of the list (round-robin) on its
    /// next attempt, keeping the clean-session flag it had (a caller may have set it for the
    /// next connection). Returns that broker; with one broker nothing changes.
    pub fn advance(&mut self, eventloop: &mut EventLoop) -> &BrokerAddr {
        if self.options.len() > 1 {
            let clean = eventloop.mqtt_options.clean_session();
            self.current = (self.current + 1) % self.options.len();
            eventloop.mqtt_options = self.options[self.current].clone();
            eventloop.mqtt_options.set_clean_session(clean);
        }
        self.current()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn failover(urls: &str) -> Failover {
        Failover::new(BrokerList::parse(urls).unwrap(), |addr| {
            let mut opts = MqttOptions::new("pi-07", &addr.host, addr.port);
            opts.set_keep_alive(Duration::from_secs(7))
                .set_clean_session(false);
            Ok::<_, std::convert::Infallible>(opts)
        })
        .unwrap()
    }

    #[test]
    fn each_failure_moves_the_next_attempt_to_the_next_broker_round_robin() {
        let mut f = failover("mqtt://a:1,mqtt://b:2,mqtt://c:3");
        let (_client, mut eventloop) = rumqttc::AsyncClient::new(f.options(), 8);
        assert_eq!(eventloop.mqtt_options.broker_address(), ("a".into(), 1));
        let mut seen = Vec::new();
        for _ in 0..4 {
            let next = f.advance(&mut eventloop).to_string();
            assert_eq!(
                eventloop.mqtt_options.broker_address(),
                (f.current().host.clone(), f.current().port)
            );
            seen.push(next);
        }
        assert_eq!(
            seen,
            ["mqtt://b:2", "mqtt://c:3", "mqtt://a:1", "mqtt://b:2"]
        );
        // The rest of the options come along.
        assert_eq!(eventloop.mqtt_options.keep_alive(), Duration::from_secs(7));
        assert_eq!(eventloop.mqtt_options.client_id(), "pi-07");
    }

    #[test]
    fn the_clean_session_flag_of_the_event_loop_is_kept() {
        let mut f = failover("mqtt://a:1,mqtt://b:2");
        let (_client, mut eventloop) = rumqttc::AsyncClient::new(f.options(), 8);
        assert!(!eventloop.mqtt_options.clean_session());
        eventloop.mqtt_options.set_clean_session(true);
        f.advance(&mut eventloop);
        assert!(eventloop.mqtt_options.clean_session());
        eventloop.mqtt_options.set_clean_session(false);
        f.advance(&mut eventloop);
        assert!(!eventloop.mqtt_options.clean_session());
    }

    #[test]
    fn a_single_broker_is_left_alone() {
        let mut f = failover("mqtt://a:1");
        let (_client, mut eventloop) = rumqttc::AsyncClient::new(f.options(), 8);
        eventloop.mqtt_options.set_clean_session(true);
        assert_eq!(f.advance(&mut eventloop).to_string(), "mqtt://a:1");
        assert!(eventloop.mqtt_options.clean_session());
    }
}
