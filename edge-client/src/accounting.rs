//! Bytes this client put on and took off the wire, MQTT framing included, per round and in
//! total. Sizes are those of whole MQTT packets (fixed header, remaining length, topic, packet
//! id, payload), so they compare directly with what a broker or `tcpdump` would count.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::types::Round;

/// Bytes and packets one way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Flow {
    pub bytes: u64,
    pub packets: u64,
}

impl Flow {
    fn add(&mut self, bytes: usize) {
        self.bytes += bytes as u64;
        self.packets += 1;
    }
}

/// Up and down for one round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RoundBytes {
    pub up: Flow,
    pub down: Flow,
}

/// The client's byte ledger.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ByteLedger {
    pub total: RoundBytes,
    /// Traffic before the first announcement (connect, join) is booked to no round.
    pub before_first_round: RoundBytes,
    pub per_round: BTreeMap<Round, RoundBytes>,
}

impl ByteLedger {
    fn slot(&mut self, round: Option<Round>) -> &mut RoundBytes {
        match round {
            Some(r) => self.per_round.entry(r).or_default(),
            None => &mut self.before_first_round,
        }
    }

    /// A packet sent while `round` was current.
    pub fn sent(&mut self, round: Option<Round>, bytes: usize) {
        self.total.up.add(bytes);
        self.slot(round).up.add(bytes);
    }

    /// A packet received while `round` was current.
    pub fn received(&mut self, round: Option<Round>, bytes: usize) {
        self.total.down.add(bytes);
        self.slot(round).down.add(bytes);
    }

    /// The bytes booked to `round`.
    pub fn round(&self, round: Round) -> RoundBytes {
        self.per_round.get(&round).copied().unwrap_or_default()
    }
}

/// Sizes of the MQTT 3.1.1 control packets the event loop reports without their contents.
pub mod packet_size {
    /// PUBACK / PUBREC / PUBREL / PUBCOMP / UNSUBACK: 2-byte header + packet id.
    pub const ACK: usize = 4;
    /// PINGREQ / PINGRESP / DISCONNECT: header only.
    pub const EMPTY: usize = 2;

    /// SUBSCRIBE with these filters (each with a QoS byte).
    pub fn subscribe(filters: &[String]) -> usize {
        let remaining = 2 + filters.iter().map(|f| 2 + f.len() + 1).sum::<usize>();
        1 + varint_len(remaining) + remaining
    }

    /// Bytes of MQTT's remaining-length varint for `n`.
    pub fn varint_len(n: usize) -> usize {
        fedpeft_protocol::mqtt::remaining_length_len(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_booked_to_the_round_that_was_current_and_to_the_total() {
        let mut l = ByteLedger::default();
        l.sent(None, 100);
        l.received(Some(0), 5000);
        l.sent(Some(0), 700);
        l.sent(Some(0), 300);
        l.received(Some(1), 10);
        assert_eq!(
            l.before_first_round.up,
            Flow {
                bytes: 100,
                packets: 1
            }
        );
        assert_eq!(
            l.round(0).up,
            Flow {
                bytes: 1000,
                packets: 2
            }
        );
        assert_eq!(l.round(0).down.bytes, 5000);
        assert_eq!(l.round(1).down.bytes, 10);
        assert_eq!(l.round(7), RoundBytes::default());
        assert_eq!(l.total.up.bytes, 1100);
        assert_eq!(
            l.total.down,
            Flow {
                bytes: 5010,
                packets: 2
            }
        );
    }

    #[test]
    fn subscribe_size_matches_the_mqtt_layout() {
        // 2 (packet id) + (2 + 3 + 1) + (2 + 1 + 1) = 12 remaining, 1-byte varint, 14 total.
        assert_eq!(packet_size::subscribe(&["a/b".into(), "#".into()]), 14);
    }
}
