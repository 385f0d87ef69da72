//! Byte accounting: what each message costs on the wire, per client and per round, and what
//! full-model FedAvg would have cost instead.
//!
//! Sizes are MQTT PUBLISH packets including framing (fixed header, remaining-length varint,
//! topic, packet id), from [`fedpeft_protocol::mqtt::publish_wire_size`] (MQTT 3.1.1, as rumqttc
//! speaks it). Acknowledgements (PUBACK, 4 bytes per QoS 1 publish) are not included.
//! "Up" is client → broker; "down" is broker → client: a retained publish of the aggregator is
//! counted once per client that receives it (every joined, online client subscribes to the
//! global adapter and round topics), and separately as the aggregator's own upload.

use std::collections::BTreeMap;

use fedpeft_protocol::QoS;
use fedpeft_protocol::mqtt::{MqttVersion, publish_wire_size};
use serde::{Deserialize, Serialize};

pub use fedpeft_config::report::Traffic;

/// Wire size of a PUBLISH (MQTT 3.1.1) of `payload_len` bytes on `topic` at `qos`.
pub fn wire_size(topic: &str, payload_len: usize, qos: QoS) -> u64 {
    publish_wire_size(topic.len(), payload_len, qos, MqttVersion::V311)
        // Beyond MQTT's 256 MiB frame limit nothing is sent; the broker refuses it. Count the
        // payload so the figure is still an upper bound rather than zero.
        .unwrap_or(payload_len) as u64
}

/// Bytes full-model FedAvg would move in one round: every backbone parameter as f32, down to and
/// up from each sampled client (payload only, no framing).
pub fn full_model_round_bytes(backbone_params: u64, sampled_clients: usize) -> u64 {
    backbone_params * 4 * 2 * sampled_clients as u64
}

/// Running totals: whole run, per round, per client.
///
/// Bytes count in the round they belong to, as the round machine tells: a client's message in
/// the round that is open (or the next to open, between rounds), the global adapter published
/// when a round closes in that round, an announcement in its own round.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    pub total: Traffic,
    pub rounds: BTreeMap<u32, Traffic>,
    /// What the aggregator itself published (before the broker's fan-out).
    pub aggregator_published_bytes: u64,
    pub per_client: BTreeMap<String, Traffic>,
    /// By message kind (`join`, `status`, `update` up; `global`, `round` down).
    #[serde(default)]
    pub per_kind: BTreeMap<String, Traffic>,
}

impl Ledger {
    /// A client published `bytes` (one packet of `kind`), counted in `round`.
    pub fn client_up(&mut self, round: u32, client: &str, kind: &str, bytes: u64) {
        self.total.add_up(bytes);
        self.per_kind
            .entry(kind.to_string())
            .or_default()
            .add_up(bytes);
        self.rounds.entry(round).or_default().add_up(bytes);
        self.per_client
            .entry(client.to_string())
            .or_default()
            .add_up(bytes);
    }

    /// The aggregator published one packet of `bytes` that the broker delivers to `receivers`,
    /// counted in `round`.
    pub fn aggregator_publish<'a>(
        &mut self,
        round: u32,
        kind: &str,
        bytes: u64,
        receivers: impl IntoIterator<Item = &'a str>,
    ) {
        self.aggregator_published_bytes += bytes;
        let r = self.rounds.entry(round).or_default();
        let k = self.per_kind.entry(kind.to_string()).or_default();
        for client in receivers {
            self.total.add_down(bytes);
            r.add_down(bytes);
            k.add_down(bytes);
            self.per_client
                .entry(client.to_string())
                .or_default()
                .add_down(bytes);
        }
    }

    /// The traffic counted in `round`.
    pub fn round(&self, round: u32) -> Traffic {
        self.rounds.get(&round).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_size_includes_mqtt_framing() {
        // 20-byte topic, 1000-byte payload, QoS 1: remaining = 2 + 20 + 2 + 1000 = 1024, a
        // 2-byte varint, plus the 1-byte fixed header: 1027.
        let topic = "t".repeat(20);
        assert_eq!(wire_size(&topic, 1000, QoS::AtLeastOnce), 1027);
        assert_eq!(wire_size(&topic, 100, QoS::AtMostOnce), 124);
    }

    #[test]
    fn fan_out_counts_down_bytes_once_per_receiver() {
        let mut l = Ledger::default();
        l.aggregator_publish(1, "global", 100, ["a", "b"]);
        l.client_up(1, "a", "update", 40);
        l.client_up(2, "b", "status", 7);
        assert_eq!(l.aggregator_published_bytes, 100);
        assert_eq!(l.per_kind["global"].down_bytes, 200);
        assert_eq!(l.per_kind["update"].up_bytes, 40);
        assert_eq!(l.total.down_bytes, 200);
        assert_eq!(l.per_client["a"].down_bytes, 100);
        assert_eq!(l.per_client["a"].up_bytes, 40);
        let r = l.round(1);
        assert_eq!((r.up_bytes, r.down_bytes, r.down_messages), (40, 200, 2));
        assert_eq!(l.round(2).up_bytes, 7);
        assert_eq!(l.round(3), Traffic::default());
        assert_eq!(l.total.up_bytes, 47);
    }

    #[test]
    fn full_model_baseline_is_both_ways_per_sampled_client() {
        assert_eq!(full_model_round_bytes(4_650_000, 8), 4_650_000 * 4 * 2 * 8);
    }
}
