//! Session outbound messages → packets: Status (and the last will), Join and updates, sealed
//! (signed when this client has a key) and chunked under the packet limit. Updates are encoded
//! in the round's dtype with top-k and error feedback: what a round does not send is carried
//! into the next.

use fedpeft_protocol::mqtt::{MqttVersion, publish_wire_size};
use fedpeft_protocol::{
    ClientState, ClientUpdate, Codec, DType, Envelope, Join, SplitMix64, Status,
    Tensor as WireTensor, TopicKind, TrainMetrics,
};

use super::{Packet, Wire, WireError, fnv1a};
use crate::session::Outbound;
use crate::types::{Metrics, Round, TrainPlan, TrainedUpdate, WireDtype};

/// Training metrics as an update (plain or masked) carries them.
pub fn metrics_to_wire(m: &Metrics) -> TrainMetrics {
    TrainMetrics {
        loss: m.loss,
        accuracy: m.accuracy,
        steps: m.steps,
        elapsed_ms: m.elapsed_ms,
        epsilon: m.epsilon,
    }
}

/// Converts our dtype to the protocol's.
pub fn dtype_to_wire(d: WireDtype) -> DType {
    match d {
        WireDtype::F32 => DType::F32,
        WireDtype::F16 => DType::F16,
        WireDtype::Int8 => DType::I8,
    }
}

impl Wire {
    /// Encodes an outgoing envelope, signed when this client has a key.
    fn seal(&self, what: &'static str, envelope: Envelope) -> Result<Vec<u8>, WireError> {
        match &self.signing_key {
            Some(key) => envelope.encode_signed(&self.fleet, key),
            None => envelope.encode(),
        }
        .map_err(|e| WireError::Encode {
            what,
            reason: e.to_string(),
        })
    }

    /// The last will registered at CONNECT: Status offline, retained, on our status topic.
    pub fn last_will(&self) -> Result<Packet, WireError> {
        self.status(ClientState::Offline)
    }

    fn status(&self, state: ClientState) -> Result<Packet, WireError> {
        let status = Status {
            client: self.client.clone(),
            state,
        };
        let payload = self.seal("status", Envelope::new(self.run_id, 0, status))?;
        Ok(Packet {
            topic: self.status_topic(),
            payload,
            retain: true,
        })
    }

    /// Largest payload that still fits one packet on `topic` after MQTT framing.
    fn payload_budget(&self, topic: &str) -> usize {
        let framing = publish_wire_size(
            topic.len(),
            0,
            fedpeft_protocol::QoS::AtLeastOnce,
            MqttVersion::V311,
        )
        .unwrap_or(0);
        // The remaining-length varint grows with the payload: reserve its largest form.
        self.max_packet_bytes.saturating_sub(framing + 3)
    }

    /// Encodes one outbound message into the packets to publish (several when chunked).
    pub fn encode(&mut self, out: &Outbound) -> Result<Vec<Packet>, WireError> {
        match out {
            Outbound::StatusOnline => Ok(vec![self.status(ClientState::Online)?]),
            Outbound::StatusOffline => Ok(vec![self.status(ClientState::Offline)?]),
            Outbound::Join => {
                let join = Join {
                    client: self.client.clone(),
                    capabilities: self.join.capabilities.clone(),
                    num_examples: self.join.num_examples,
                };
                let payload = self.seal("join", Envelope::new(self.run_id, 0, join))?;
                self.split("join", self.topic(TopicKind::Join), payload, 0, false)
            }
            Outbound::Update {
                round,
                sequence,
                update,
                plan,
            } => {
                let payload = self.encode_update(*round, *sequence, update, plan)?;
                self.split("update", self.update_topic(), payload, *round, false)
            }
            Outbound::SecAgg(message) => {
                let message = (**message).clone();
                let round = message.body_round().unwrap_or(0);
                let payload = self.seal(
                    "secure aggregation message",
                    Envelope::new(self.run_id, round, message),
                )?;
                self.split(
                    "secure aggregation message",
                    self.update_topic(),
                    payload,
                    round,
                    false,
                )
            }
        }
    }

    /// The encoded ClientUpdate envelope (before chunking).
    pub fn encode_update(
        &mut self,
        round: Round,
        sequence: u32,
        update: &TrainedUpdate,
        plan: &TrainPlan,
    ) -> Result<Vec<u8>, WireError> {
        let codec = Codec {
            dtype: dtype_to_wire(plan.dtype),
            top_k_fraction: plan.top_k,
        };
        let lossy = plan.dtype != WireDtype::F32 || plan.top_k.is_some();
        // Stochastic rounding differs per client and round, but is reproducible.
        let mut rng = SplitMix64::new(
            plan.seed ^ u64::from(round).rotate_left(32) ^ fnv1a(self.client.as_str()),
        );
        let mut tensors = Vec::with_capacity(update.deltas.len());
        for t in &update.deltas {
            let shape = shape_to_wire(&t.name, &t.shape)?;
            let encoded = match self.residuals.get_mut(&t.name) {
                // Error feedback: what earlier rounds did not send is added to this delta.
                Some(residual) if residual.len() == t.values.len() => {
                    WireTensor::encode_with_feedback(
                        &t.name, &shape, &t.values, residual, codec, &mut rng,
                    )
                }
                _ if lossy => {
                    let mut residual = vec![0.0; t.values.len()];
                    let enc = WireTensor::encode_with_feedback(
                        &t.name,
                        &shape,
                        &t.values,
                        &mut residual,
                        codec,
                        &mut rng,
                    );
                    self.residuals.insert(t.name.clone(), residual);
                    enc
                }
                _ => WireTensor::encode(&t.name, &shape, &t.values, codec, &mut rng),
            }
            .map_err(|e| WireError::Encode {
                what: "update",
                reason: e.to_string(),
            })?;
            tensors.push(encoded);
        }
        let m = &update.metrics;
        let msg = ClientUpdate {
            client: self.client.clone(),
            round,
            sequence,
            num_examples: m.num_examples,
            metrics: metrics_to_wire(m),
            tensors,
        };
        self.seal("update", Envelope::new(self.run_id, round, msg))
    }

    /// The error-feedback residual kept for `tensor` (what was not sent yet).
    pub fn residual(&self, tensor: &str) -> Option<&[f32]> {
        self.residuals.get(tensor).map(Vec::as_slice)
    }

    fn split(
        &mut self,
        what: &'static str,
        topic: String,
        payload: Vec<u8>,
        round: Round,
        retain: bool,
    ) -> Result<Vec<Packet>, WireError> {
        let budget = self.payload_budget(&topic);
        if payload.len() <= budget {
            return Ok(vec![Packet {
                topic,
                payload,
                retain,
            }]);
        }
        let id = self.next_message_id;
        self.next_message_id = self.next_message_id.wrapping_add(1);
        let parts = fedpeft_protocol::chunk::split(&payload, budget, self.run_id, round, id)
            .map_err(|e| WireError::Encode {
                what,
                reason: e.to_string(),
            })?;
        Ok(parts
            .into_iter()
            .map(|payload| Packet {
                topic: topic.clone(),
                payload,
                retain,
            })
            .collect())
    }
}

fn shape_to_wire(name: &str, shape: &[usize]) -> Result<Vec<u32>, WireError> {
    shape
        .iter()
        .map(|&d| {
            u32::try_from(d).map_err(|_| WireError::Encode {
                what: "update",
                reason: format!("tensor `{name}` dimension {d} does not fit u32"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use fedpeft_protocol::Message;

    use super::super::fixtures::{caps, config, decode_update, update, wire};
    use super::*;
    use crate::wire::plan_from_wire;

    #[test]
    fn a_small_f32_update_is_one_packet_that_decodes_exactly() {
        let mut w = wire(4096);
        let u = update(100);
        let plan = plan_from_wire(&config(DType::F32, None));
        let packets = w
            .encode(&Outbound::Update {
                round: 2,
                sequence: 5,
                update: u.clone(),
                plan,
            })
            .unwrap();
        assert_eq!(packets.len(), 1);
        assert!(!packets[0].retain);
        assert_eq!(packets[0].topic, "fedpeft/v1/lab/update/c1");
        let back = decode_update(&packets);
        assert_eq!((back.round, back.sequence, back.num_examples), (2, 5, 50));
        assert_eq!(back.client.as_str(), "c1");
        assert_eq!(back.tensors[0].to_f32(), u.deltas[0].values);
        assert!(
            w.residual("head.weight").is_none(),
            "exact f32 keeps no residual"
        );
    }

    #[test]
    fn a_large_update_is_chunked_below_the_packet_limit_and_reassembles() {
        let max = 2048;
        let mut w = wire(max);
        let u = update(3000);
        let plan = plan_from_wire(&config(DType::F32, None));
        let packets = w
            .encode(&Outbound::Update {
                round: 1,
                sequence: 0,
                update: u.clone(),
                plan,
            })
            .unwrap();
        assert!(packets.len() >= 6, "{} packets", packets.len());
        for p in &packets {
            assert!(p.wire_size() <= max, "packet of {} bytes", p.wire_size());
        }
        assert_eq!(
            decode_update(&packets).tensors[0].to_f32(),
            u.deltas[0].values
        );
    }

    #[test]
    fn top_k_keeps_what_it_did_not_send_and_sends_it_later() {
        let mut w = wire(1 << 20);
        let plan = plan_from_wire(&config(DType::F32, Some(0.1)));
        let u = update(200);
        let first = w.encode_update(0, 0, &u, &plan).unwrap();
        let Message::ClientUpdate(first) = Envelope::decode(&first).unwrap().message else {
            panic!()
        };
        let sent = first.tensors[0].to_f32();
        assert_eq!(sent.iter().filter(|v| **v != 0.0).count(), 20);
        // sent + residual == the delta: nothing is lost, only delayed.
        let residual = w.residual("head.weight").unwrap().to_vec();
        for i in 0..200 {
            assert!((sent[i] + residual[i] - u.deltas[0].values[i]).abs() < 1e-6);
        }
        // A zero delta next round still sends the largest leftovers.
        let mut zero = u.clone();
        zero.deltas[0].values.iter_mut().for_each(|v| *v = 0.0);
        let second = w.encode_update(1, 1, &zero, &plan).unwrap();
        let Message::ClientUpdate(second) = Envelope::decode(&second).unwrap().message else {
            panic!()
        };
        let leftovers = second.tensors[0].to_f32();
        assert_eq!(leftovers.iter().filter(|v| **v != 0.0).count(), 20);
        for (i, v) in leftovers.iter().enumerate() {
            if *v != 0.0 {
                assert!((v - residual[i]).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn int8_updates_are_about_a_quarter_of_f32() {
        let mut w = wire(1 << 20);
        let u = update(4000);
        let f32_len = w
            .encode_update(0, 0, &u, &plan_from_wire(&config(DType::F32, None)))
            .unwrap()
            .len();
        let i8_len = w
            .encode_update(0, 1, &u, &plan_from_wire(&config(DType::I8, None)))
            .unwrap()
            .len();
        assert!(i8_len * 3 < f32_len, "int8 {i8_len} vs f32 {f32_len}");
    }

    #[test]
    fn join_carries_capabilities_and_examples() {
        let mut w = wire(4096);
        let packets = w.encode(&Outbound::Join).unwrap();
        assert_eq!(packets[0].topic, "fedpeft/v1/lab/join");
        let Message::Join(j) = Envelope::decode(&packets[0].payload).unwrap().message else {
            panic!()
        };
        assert_eq!(j.num_examples, 50);
        assert_eq!(j.capabilities, caps());
    }
}
