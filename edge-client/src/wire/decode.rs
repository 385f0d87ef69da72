//! Incoming publishes → session events: topic and run checks, the aggregator's signature, round
//! announcements, global adapters whole or reassembled from their chunks.

use fedpeft_protocol::{
    Chunk, DType, Envelope, LocalConfig, Message, Optimizer, ReassemblyError, RoundAnnounce,
    Sampling, Topic, TopicKind,
};

use super::{Wire, WireError};
use crate::session::{Event, SecureDown};
use crate::types::{Announcement, DpPlan, GlobalAdapter, OptimizerPlan, TrainPlan, WireDtype};

/// Converts a protocol dtype to ours.
pub fn dtype_from_wire(d: DType) -> WireDtype {
    match d {
        DType::F32 => WireDtype::F32,
        DType::F16 => WireDtype::F16,
        DType::I8 => WireDtype::Int8,
    }
}

/// Maps a round's local config to the trainer's plan.
pub fn plan_from_wire(c: &LocalConfig) -> TrainPlan {
    TrainPlan {
        local_epochs: u32::from(c.epochs),
        batch_size: c.batch_size,
        learning_rate: c.learning_rate,
        optimizer: match c.optimizer {
            Optimizer::Sgd {
                momentum,
                weight_decay,
            } => OptimizerPlan::Sgd {
                momentum,
                weight_decay,
            },
            Optimizer::AdamW {
                beta1,
                beta2,
                epsilon,
                weight_decay,
            } => OptimizerPlan::AdamW {
                beta1,
                beta2,
                epsilon,
                weight_decay,
            },
        },
        dp: c.dp_sgd.map(|d| DpPlan {
            clip_norm: d.clip_norm,
            noise_multiplier: d.noise_multiplier,
        }),
        proximal_mu: c.fedprox_mu,
        dtype: dtype_from_wire(c.update_dtype),
        top_k: c.top_k_fraction,
        seed: c.seed,
    }
}

impl Wire {
    /// Checks the aggregator's signature on a whole payload, when its key is configured.
    fn check_aggregator(&self, topic: &str, kind: &str, payload: &[u8]) -> Result<(), WireError> {
        match &self.aggregator_key {
            None => Ok(()),
            Some(key) => {
                fedpeft_protocol::sign::verify(payload, &self.fleet, key).map_err(|source| {
                    WireError::Signature {
                        topic: topic.to_string(),
                        kind: kind.to_string(),
                        source,
                    }
                })
            }
        }
    }

    /// Turns one incoming publish into a session event. `Ok(None)` means "nothing yet" (a
    /// chunk of an incomplete adapter, or a message this client does not act on).
    pub fn decode(
        &mut self,
        topic: &str,
        payload: &[u8],
        now_ms: u64,
    ) -> Result<Option<Event>, WireError> {
        let parsed = Topic::parse(topic).map_err(|e| WireError::Topic {
            topic: topic.to_string(),
            reason: e.to_string(),
        })?;
        if parsed.fleet != self.fleet {
            return Err(WireError::Topic {
                topic: topic.to_string(),
                reason: format!("belongs to fleet `{}`, not `{}`", parsed.fleet, self.fleet),
            });
        }
        if payload.is_empty() {
            // An empty retained publish clears a retained message; nothing to act on.
            return Ok(None);
        }
        let env = Envelope::decode(payload).map_err(|source| WireError::Decode {
            topic: topic.to_string(),
            source,
        })?;
        if env.run_id != self.run_id {
            return Err(WireError::OtherRun {
                topic: topic.to_string(),
                found: env.run_id,
                expected: self.run_id,
            });
        }
        match (&parsed.kind, env.message) {
            (TopicKind::Round, Message::RoundAnnounce(a)) => {
                self.check_aggregator(topic, "round announcement", payload)?;
                Ok(Some(self.announcement(env.run_id, a, None, None)))
            }
            (TopicKind::Round, Message::AsyncRoundAnnounce(a)) => {
                self.check_aggregator(topic, "round announcement", payload)?;
                Ok(Some(self.announcement(
                    env.run_id,
                    a.announce,
                    None,
                    Some(a.max_staleness),
                )))
            }
            (TopicKind::Round, Message::SecureRoundAnnounce(a)) => {
                self.check_aggregator(topic, "secure round announcement", payload)?;
                Ok(Some(self.announcement(
                    env.run_id,
                    a.announce,
                    Some(a.setup),
                    None,
                )))
            }
            (TopicKind::SecAgg, Message::SecAggRoster(r)) => {
                self.check_aggregator(topic, "secure aggregation roster", payload)?;
                Ok(Some(Event::SecAgg(SecureDown::Roster(r))))
            }
            (TopicKind::SecAgg, Message::SecAggUnmask(u)) => {
                self.check_aggregator(topic, "unmask request", payload)?;
                Ok(Some(Event::SecAgg(SecureDown::Unmask(u))))
            }
            (TopicKind::Inbox(to), Message::SecAggRelay(r)) if *to == self.client => {
                self.check_aggregator(topic, "relayed shares", payload)?;
                Ok(Some(Event::SecAgg(SecureDown::Relay(r))))
            }
            (TopicKind::Global, Message::GlobalAdapter(g))
            | (TopicKind::GlobalChunk(_), Message::GlobalAdapter(g)) => {
                self.check_aggregator(topic, "global adapter", payload)?;
                Ok(Some(Event::Adapter(adapter_from_wire(env.run_id, g)?)))
            }
            (TopicKind::Global | TopicKind::GlobalChunk(_), Message::Chunk(c)) => {
                self.adapter_chunk(topic, env.run_id, c, now_ms)
            }
            (_, other) => Err(unexpected(topic, &other)),
        }
    }

    /// A (checked) round announcement: the end of the run, or a round with who is sampled.
    fn announcement(
        &self,
        run_id: u64,
        a: RoundAnnounce,
        secure: Option<fedpeft_protocol::SecAggSetup>,
        max_staleness: Option<u32>,
    ) -> Event {
        if a.is_run_done() {
            return Event::RunDone;
        }
        let sampled = match &a.sampling {
            Sampling::Clients(ids) => ids.iter().map(|c| c.as_str().to_string()).collect(),
            // `All` and `Rate` are resolved by the aggregator into explicit lists; a
            // client cannot know who else is connected, so it trains when told "all".
            Sampling::All => vec![self.client.as_str().to_string()],
            Sampling::Rate(_) => Vec::new(),
        };
        Event::Announce(Announcement {
            run_id,
            round: a.round,
            sampled,
            plan: plan_from_wire(&a.config),
            deadline_unix_ms: a.deadline_unix_ms,
            secure,
            max_staleness,
        })
    }

    /// One chunk of a global adapter: `None` until the last one arrives, then the adapter,
    /// its signature checked on the reassembled payload.
    fn adapter_chunk(
        &mut self,
        topic: &str,
        run_id: u64,
        chunk: Chunk,
        now_ms: u64,
    ) -> Result<Option<Event>, WireError> {
        let whole = self
            .reassembler
            .push(format!("global/{run_id}"), chunk, now_ms)
            .map_err(|source| WireError::Chunk {
                topic: topic.to_string(),
                source,
            })?;
        let Some(bytes) = whole else {
            return Ok(None);
        };
        let inner = Envelope::decode(&bytes).map_err(|source| WireError::Decode {
            topic: topic.to_string(),
            source,
        })?;
        match inner.message {
            Message::GlobalAdapter(g) => {
                self.check_aggregator(topic, "global adapter", &bytes)?;
                Ok(Some(Event::Adapter(adapter_from_wire(inner.run_id, g)?)))
            }
            other => Err(unexpected(topic, &other)),
        }
    }

    /// Drops incomplete reassemblies older than the timeout; returns what was dropped.
    pub fn expire(&mut self, now_ms: u64) -> Vec<ReassemblyError> {
        self.reassembler
            .expire(now_ms)
            .into_iter()
            .map(|(_, e)| e)
            .collect()
    }
}

/// A message on a topic that does not carry its kind.
fn unexpected(topic: &str, m: &Message) -> WireError {
    WireError::Unexpected {
        topic: topic.to_string(),
        kind: m.kind().to_string(),
    }
}

/// Decodes a global adapter's tensors to f32, refusing NaN/Inf.
pub fn adapter_from_wire(
    run_id: u64,
    g: fedpeft_protocol::GlobalAdapter,
) -> Result<GlobalAdapter, WireError> {
    g.validate().map_err(|e| WireError::Adapter {
        round: g.round,
        reason: e.to_string(),
    })?;
    Ok(GlobalAdapter {
        run_id,
        round: g.round,
        tensors: g.tensors.iter().map(fedpeft_backbone::dense).collect(),
    })
}

#[cfg(test)]
mod tests {
    use fedpeft_protocol::{
        ClientId, Codec, DType, Envelope, RoundAnnounce, Sampling, SplitMix64, Tensor as WireTensor,
    };

    use super::super::fixtures::{announce, config, wire};
    use super::*;

    #[test]
    fn an_announcement_decodes_with_its_run_sampled_ids_and_plan() {
        let mut w = wire(4096);
        let ev = w
            .decode("fedpeft/v1/lab/round", &announce(3, &["c1", "c9"], 123), 0)
            .unwrap()
            .unwrap();
        let Event::Announce(a) = ev else {
            panic!("{ev:?}")
        };
        assert_eq!((a.run_id, a.round), (77, 3));
        assert_eq!(a.sampled, vec!["c1", "c9"]);
        assert_eq!(a.plan.dtype, WireDtype::F16);
        assert_eq!(a.plan.local_epochs, 2);
        assert_eq!(a.deadline_unix_ms, 123);
        assert_eq!(w.run_id(), 77);
    }

    #[test]
    fn no_deadline_and_nobody_sampled_means_the_run_is_done() {
        let mut w = wire(4096);
        let ev = w
            .decode("fedpeft/v1/lab/round", &announce(9, &[], 0), 0)
            .unwrap();
        assert!(matches!(ev, Some(Event::RunDone)));
        // Nobody sampled with a real deadline is just a round this client sits out.
        let ev = w
            .decode("fedpeft/v1/lab/round", &announce(9, &[], 5), 0)
            .unwrap();
        assert!(matches!(ev, Some(Event::Announce(_))));
    }

    #[test]
    fn messages_of_another_run_are_refused() {
        let mut w = wire(4096);
        let a = RoundAnnounce {
            round: 1,
            deadline_unix_ms: 5,
            sampling: Sampling::Clients(vec![ClientId::new("c1").unwrap()]),
            config: config(DType::F32, None),
        };
        let other = Envelope::new(78, 1, a).encode().unwrap();
        let err = w.decode("fedpeft/v1/lab/round", &other, 0).unwrap_err();
        assert!(
            matches!(
                err,
                WireError::OtherRun {
                    found: 78,
                    expected: 77,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_chunked_global_adapter_is_reassembled() {
        let mut w = wire(4096);
        let data: Vec<f32> = (0..3000).map(|i| i as f32 * 0.001).collect();
        let t = WireTensor::encode(
            "head.weight",
            &[3000],
            &data,
            Codec::dense(DType::F32),
            &mut SplitMix64::new(1),
        )
        .unwrap();
        let g = fedpeft_protocol::GlobalAdapter {
            round: 4,
            tensors: vec![t],
        };
        let bytes = Envelope::new(77, 4, g).encode().unwrap();
        let chunks = fedpeft_protocol::chunk::split(&bytes, 2000, 77, 4, 1).unwrap();
        assert!(chunks.len() > 3);
        let mut got = None;
        // Out of order, as retained sub-topics may be delivered.
        for (i, c) in chunks.iter().enumerate().rev() {
            let topic = format!("fedpeft/v1/lab/global/{i}");
            if let Some(ev) = w.decode(&topic, c, 0).unwrap() {
                assert!(got.is_none());
                got = Some(ev);
            }
        }
        let Some(Event::Adapter(a)) = got else {
            panic!("{got:?}")
        };
        assert_eq!((a.run_id, a.round), (77, 4));
        assert_eq!(a.tensors[0].values, data);
    }

    #[test]
    fn malformed_and_foreign_messages_are_errors_not_panics() {
        let mut w = wire(4096);
        assert!(matches!(
            w.decode("fedpeft/v1/lab/round", &[1, 2, 3], 0),
            Err(WireError::Decode { .. })
        ));
        assert!(matches!(
            w.decode("fedpeft/v1/other/round", &announce(1, &["c1"], 1), 0),
            Err(WireError::Topic { .. })
        ));
        assert!(matches!(
            w.decode("somewhere/else", &announce(1, &["c1"], 1), 0),
            Err(WireError::Topic { .. })
        ));
        // An announcement on the adapter topic.
        assert!(matches!(
            w.decode("fedpeft/v1/lab/global", &announce(1, &["c1"], 1), 0),
            Err(WireError::Unexpected { .. })
        ));
        let mut wrong_version = announce(1, &["c1"], 1);
        wrong_version[0] = 9;
        let err = w
            .decode("fedpeft/v1/lab/round", &wrong_version, 0)
            .unwrap_err();
        assert!(err.to_string().contains("version"), "{err}");
        // A retained message being cleared.
        assert!(w.decode("fedpeft/v1/lab/round", &[], 0).unwrap().is_none());
    }

    #[test]
    fn a_global_adapter_with_nan_is_refused() {
        let mut w = wire(4096);
        let t = WireTensor::encode(
            "b",
            &[2],
            &[1.0, f32::NAN],
            Codec::dense(DType::F32),
            &mut SplitMix64::new(1),
        );
        // The codec may refuse NaN itself; build the values directly if it does.
        let t = t.unwrap_or_else(|_| {
            WireTensor::dense(
                "b",
                &[2],
                fedpeft_protocol::Values::F32(vec![1.0, f32::NAN]),
            )
            .unwrap()
        });
        let g = fedpeft_protocol::GlobalAdapter {
            round: 1,
            tensors: vec![t],
        };
        let bytes = Envelope::new(77, 1, g).encode().unwrap();
        assert!(matches!(
            w.decode("fedpeft/v1/lab/global", &bytes, 0),
            Err(WireError::Adapter { round: 1, .. })
        ));
    }
}
