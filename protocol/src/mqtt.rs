//! Bytes an MQTT PUBLISH really puts on the wire, so accounting includes framing.
//!
//! MQTT 3.1.1 §3.3: fixed header (1 byte) + Remaining Length (1–4 byte varint) + topic
//! (2-byte length + UTF-8) + packet identifier (2 bytes, QoS 1 and 2 only) + payload.
//! MQTT 5 adds a properties length varint (1 byte when there are no properties) after the
//! packet identifier.

use crate::topic::QoS;

/// MQTT protocol level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttVersion {
    /// 3.1.1 (protocol level 4).
    V311,
    /// 5.0, publishing with no properties.
    V5,
}

/// Length of MQTT's Remaining Length varint for `n` (7 bits per byte).
pub fn remaining_length_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Largest Remaining Length MQTT can express (256 MiB - 1).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Total bytes of a PUBLISH packet with a `topic_len`-byte topic and `payload_len`-byte
/// payload, or `None` if it exceeds what MQTT can frame.
pub fn publish_wire_size(
    topic_len: usize,
    payload_len: usize,
    qos: QoS,
    version: MqttVersion,
) -> Option<usize> {
    let packet_id = if qos == QoS::AtMostOnce { 0 } else { 2 };
    let properties = match version {
        MqttVersion::V311 => 0,
        MqttVersion::V5 => 1,
    };
    let remaining = 2 + topic_len + packet_id + properties + payload_len;
    if remaining > MAX_REMAINING_LENGTH {
        return None;
    }
    Some(1 + remaining_length_len(remaining) + remaining)
}

/// Bytes of the acknowledgement flow a publish triggers from the receiver: PUBACK (4) for
/// QoS 1, PUBREC + PUBREL + PUBCOMP (12) for QoS 2 (MQTT 3.1.1 sizes).
pub fn ack_wire_size(qos: QoS) -> usize {
    match qos {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 4,
        QoS::ExactlyOnce => 12,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_size_counts_fixed_header_varint_topic_and_packet_id() {
        // 10-byte topic, 100-byte payload, QoS 1: remaining = 2 + 10 + 2 + 100 = 114 (1-byte
        // varint), total 116.
        assert_eq!(
            publish_wire_size(10, 100, QoS::AtLeastOnce, MqttVersion::V311),
            Some(116)
        );
        assert_eq!(
            publish_wire_size(10, 100, QoS::AtMostOnce, MqttVersion::V311),
            Some(114)
        );
        assert_eq!(
            publish_wire_size(10, 100, QoS::AtLeastOnce, MqttVersion::V5),
            Some(117)
        );
        // Remaining length 128 needs a 2-byte varint.
        assert_eq!(
            publish_wire_size(0, 124, QoS::AtLeastOnce, MqttVersion::V311),
            Some(131)
        );
        assert_eq!(
            publish_wire_size(0, MAX_REMAINING_LENGTH, QoS::AtMostOnce, MqttVersion::V311),
            None
        );
    }

    #[test]
    fn remaining_length_varint_boundaries_match_the_spec() {
        for (n, len) in [
            (127, 1),
            (128, 2),
            (16_383, 2),
            (16_384, 3),
            (2_097_151, 3),
            (2_097_152, 4),
        ] {
            assert_eq!(remaining_length_len(n), len, "{n}");
        }
    }
}
