//! Turns any fedpeft payload into JSON for people and scripts: the engine of `fedpeft-decode`.
//!
//! - [`payload_to_json`]: decode one payload (an envelope or a chunk) into a JSON value, with
//!   every tensor's values or, in summary mode, their statistics.
//! - [`TensorStats`]: min / max / mean / L2 norm / NaN / Inf / zero counts of a tensor.

use fedpeft_protocol::{
    DecodeError, Envelope, Message, PeftMethod, Sampling, Tensor, Topic, Values, crc32,
};
use serde_json::{Value, json};

/// How much of each tensor to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    /// Every value (as f32; NaN and infinities as strings, since JSON has no such numbers).
    Full,
    /// Shape, dtype and statistics only.
    Summary,
}

/// Decodes `bytes` and describes it as JSON. `topic` is the MQTT topic it came from, if known:
/// it is parsed and checked against the payload.
///
/// `mosquitto_sub` appends a newline to each payload unless given `-N`; if the payload does not
/// decode but does without a final `\n`, that version is used and `"stripped_newline": true`
/// is reported.
pub fn payload_to_json(
    bytes: &[u8],
    topic: Option<&str>,
    detail: Detail,
) -> Result<Value, DecodeError> {
    let (env, stripped) = match Envelope::decode(bytes) {
        Ok(env) => (env, false),
        Err(e) => match bytes.strip_suffix(b"\n").map(Envelope::decode) {
            Some(Ok(env)) => (env, true),
            _ => return Err(e),
        },
    };
    let len = bytes.len() - usize::from(stripped);
    let mut out = json!({
        "version": fedpeft_protocol::peek_header(&bytes[..len])
            .map(|h| h.version)
            .unwrap_or(fedpeft_protocol::PROTOCOL_VERSION),
        "signed": fedpeft_protocol::sign::is_signed(&bytes[..len]),
        "run_id": env.run_id,
        "round": env.round,
        "kind": env.kind().as_str(),
        "bytes": len,
        "crc32": format!("{:#010x}", crc32(&bytes[..len - 4])),
        "body": body_json(&env.message, detail),
    });
    if stripped {
        out["stripped_newline"] = json!(true);
    }
    out["valid"] = match env.message.validate() {
        Ok(()) => json!(true),
        Err(e) => json!(e.to_string()),
    };
    if let Some(t) = topic {
        out["topic"] = topic_json(t, &env.message);
    }
    Ok(out)
}

fn topic_json(topic: &str, message: &Message) -> Value {
    match Topic::parse(topic) {
        Err(e) => json!({ "name": topic, "error": e.to_string() }),
        Ok(t) => {
            use fedpeft_protocol::{MessageKind as M, TopicKind as T};
            let kind_ok = matches!(
                (&t.kind, message.kind()),
                (T::Global, M::GlobalAdapter)
                    | (T::GlobalChunk(_), M::Chunk)
                    | (
                        T::Round,
                        M::RoundAnnounce | M::SecureRoundAnnounce | M::AsyncRoundAnnounce
                    )
                    | (T::Join, M::Join)
                    | (
                        T::Update(_),
                        M::ClientUpdate
                            | M::Chunk
                            | M::SecAggKeys
                            | M::SecAggShares
                            | M::SecAggMasked
                            | M::SecAggReveal
                            | M::SiteAggregate
                    )
                    | (T::SecAgg, M::SecAggRoster | M::SecAggUnmask)
                    | (T::Inbox(_), M::SecAggRelay | M::Chunk)
                    | (T::Status(_), M::Status)
                    | (T::Eval(_), M::EvalResult)
            );
            let client_ok = match (t.client(), message.client()) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            };
            json!({
                "name": topic,
                "fleet": t.fleet.as_str(),
                "client": t.client().map(|c| c.as_str()),
                "qos": t.qos() as u8,
                "retain": t.retain(),
                "matches_payload": kind_ok && client_ok,
            })
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// JSON has no NaN or infinity: those become the strings "NaN", "inf", "-inf".
fn num(x: f32) -> Value {
    if x.is_finite() {
        json!(x)
    } else if x.is_nan() {
        json!("NaN")
    } else if x > 0.0 {
        json!("inf")
    } else {
        json!("-inf")
    }
}

fn body_json(message: &Message, detail: Detail) -> Value {
    match message {
        Message::Join(m) => {
            let c = &m.capabilities;
            json!({
                "client": m.client.as_str(),
                "num_examples": m.num_examples,
                "capabilities": {
                    "backbone_id": c.backbone_id.as_str(),
                    "backbone_sha256": hex(&c.backbone_sha256),
                    "peft": peft_json(c.peft),
                    "accepted_dtypes": c.accepted_dtypes.iter().map(|d| d.as_str()).collect::<Vec<_>>(),
                    "max_packet_size": c.max_packet_size,
                },
            })
        }
        Message::RoundAnnounce(m) => {
            let c = &m.config;
            let sampling = match &m.sampling {
                Sampling::All => json!("all"),
                Sampling::Rate(r) => json!({ "rate": num(*r) }),
                Sampling::Clients(cs) => {
                    json!({ "clients": cs.iter().map(|c| c.as_str()).collect::<Vec<_>>() })
                }
            };
            let optimizer = match c.optimizer {
                fedpeft_protocol::Optimizer::Sgd {
                    momentum,
                    weight_decay,
                } => json!({
                    "sgd": { "momentum": num(momentum), "weight_decay": num(weight_decay) }
                }),
                fedpeft_protocol::Optimizer::AdamW {
                    beta1,
                    beta2,
                    epsilon,
                    weight_decay,
                } => json!({
                    "adamw": { "beta1": num(beta1), "beta2": num(beta2), "epsilon": num(epsilon),
                               "weight_decay": num(weight_decay) }
                }),
            };
            json!({
                "round": m.round,
                "deadline_unix_ms": m.deadline_unix_ms,
                "sampling": sampling,
                "config": {
                    "epochs": c.epochs,
                    "batch_size": c.batch_size,
                    "learning_rate": num(c.learning_rate),
                    "optimizer": optimizer,
                    "fedprox_mu": num(c.fedprox_mu),
                    "dp_sgd": c.dp_sgd.map(|d| json!({
                        "clip_norm": num(d.clip_norm), "noise_multiplier": num(d.noise_multiplier)
                    })),
                    "update_dtype": c.update_dtype.as_str(),
                    "top_k_fraction": c.top_k_fraction.map(num),
                    "seed": c.seed,
                },
            })
        }
        Message::GlobalAdapter(m) => json!({
            "round": m.round,
            "tensors": m.tensors.iter().map(|t| tensor_json(t, detail)).collect::<Vec<_>>(),
        }),
        Message::ClientUpdate(m) => json!({
            "client": m.client.as_str(),
            "round": m.round,
            "sequence": m.sequence,
            "num_examples": m.num_examples,
            "metrics": {
                "loss": num(m.metrics.loss),
                "accuracy": num(m.metrics.accuracy),
                "steps": m.metrics.steps,
                "elapsed_ms": m.metrics.elapsed_ms,
                "epsilon": m.metrics.epsilon.map(num),
            },
            "tensors": m.tensors.iter().map(|t| tensor_json(t, detail)).collect::<Vec<_>>(),
        }),
        Message::EvalResult(m) => json!({
            "client": m.client.as_str(),
            "round": m.round,
            "num_examples": m.num_examples,
            "loss": num(m.loss),
            "accuracy": num(m.accuracy),
        }),
        Message::Status(m) => json!({
            "client": m.client.as_str(),
            "state": format!("{:?}", m.state).to_lowercase(),
        }),
        Message::Chunk(c) => {
            let mut v = json!({
                "message_id": c.message_id,
                "index": c.index,
                "count": c.count,
                "total_len": c.total_len,
                "crc32": format!("{:#010x}", c.crc32),
                "data_len": c.data.len(),
            });
            if detail == Detail::Full {
                v["data_hex"] = json!(hex(&c.data));
            }
            v
        }
        Message::AsyncRoundAnnounce(m) => {
            let mut v = body_json(&Message::RoundAnnounce(m.announce.clone()), detail);
            v["max_staleness"] = json!(m.max_staleness);
            v
        }
        Message::SecureRoundAnnounce(m) => {
            let mut v = body_json(&Message::RoundAnnounce(m.announce.clone()), detail);
            let s = &m.setup;
            v["secure_aggregation"] = json!({
                "neighbours": s.neighbours,
                "threshold": s.threshold,
                "modulus_bits": s.modulus_bits,
                "clip": num(s.clip),
                "norm_bound": num(s.norm_bound),
                "reference_examples": s.reference_examples,
                "max_clients": s.max_clients,
            });
            v
        }
        Message::SecAggKeys(m) => json!({
            "client": m.client.as_str(),
            "round": m.round,
            "enc_pk": hex(&m.enc_pk),
            "mask_pk": hex(&m.mask_pk),
            "commitment": hex(&m.commitment),
        }),
        Message::SecAggRoster(m) => json!({
            "round": m.round,
            "deadline_unix_ms": m.deadline_unix_ms,
            "graph_seed": hex(&m.graph_seed),
            "entries": m.entries.iter().map(|e| json!({
                "client": e.client.as_str(),
                "enc_pk": hex(&e.enc_pk),
                "mask_pk": hex(&e.mask_pk),
                "commitment": hex(&e.commitment),
            })).collect::<Vec<_>>(),
        }),
        Message::SecAggShares(m) => json!({
            "client": m.client.as_str(),
            "round": m.round,
            "shares": peer_bytes_json(&m.shares, "to", detail),
        }),
        Message::SecAggRelay(m) => json!({
            "round": m.round,
            "deadline_unix_ms": m.deadline_unix_ms,
            "survivors": ids_json(&m.survivors),
            "shares": peer_bytes_json(&m.shares, "from", detail),
        }),
        Message::SecAggMasked(m) => {
            let mut v = json!({
                "client": m.client.as_str(),
                "round": m.round,
                "sequence": m.sequence,
                "num_examples": m.num_examples,
                "len": m.len,
                "values_bytes": m.values.len(),
            });
            if detail == Detail::Full {
                v["values_hex"] = json!(hex(&m.values));
            }
            v
        }
        Message::SecAggUnmask(m) => json!({
            "round": m.round,
            "deadline_unix_ms": m.deadline_unix_ms,
            "survivors": ids_json(&m.survivors),
            "dropped": ids_json(&m.dropped),
        }),
        Message::SecAggReveal(m) => json!({
            "client": m.client.as_str(),
            "round": m.round,
            "shares": m.shares.iter().map(|s| {
                let mut v = json!({
                    "of": s.peer.as_str(),
                    "kind": match s.kind {
                        fedpeft_protocol::RevealKind::SelfMask => "self_mask",
                        fedpeft_protocol::RevealKind::MaskKey => "mask_key",
                    },
                    "bytes": s.share.len(),
                });
                if detail == Detail::Full {
                    v["hex"] = json!(hex(&s.share));
                }
                v
            }).collect::<Vec<_>>(),
        }),
        Message::SiteAggregate(m) => {
            let tensors: Vec<_> = m
                .tensors
                .iter()
                .map(|t| {
                    let mut v = json!({ "name": t.name, "values": t.sum.len() });
                    if detail == Detail::Full {
                        // Each value is the exact pair `sum + error`.
                        v["sum"] = json!(t.sum);
                        v["error"] = json!(t.error);
                    }
                    v
                })
                .collect();
            json!({
                "site": m.site.as_str(),
                "round": m.round,
                "sequence": m.sequence,
                "updates": m.updates,
                "weight": m.weight,
                "train_loss_sum": m.train_loss_sum,
                "train_accuracy_sum": m.train_accuracy_sum,
                "train_weight": m.train_weight,
                "tensors": tensors,
            })
        }
    }
}

fn ids_json(ids: &[fedpeft_protocol::ClientId]) -> Value {
    json!(ids.iter().map(|c| c.as_str()).collect::<Vec<_>>())
}

fn peer_bytes_json(items: &[fedpeft_protocol::PeerBytes], role: &str, detail: Detail) -> Value {
    json!(
        items
            .iter()
            .map(|p| {
                let mut v = json!({ role: p.peer.as_str(), "bytes": p.bytes.len() });
                if detail == Detail::Full {
                    v["hex"] = json!(hex(&p.bytes));
                }
                v
            })
            .collect::<Vec<_>>()
    )
}

fn peft_json(p: PeftMethod) -> Value {
    match p {
        PeftMethod::Head => json!("head"),
        PeftMethod::Bias => json!("bias"),
        PeftMethod::Lora { rank, alpha } => {
            json!({ "lora": { "rank": rank, "alpha": num(alpha) } })
        }
        PeftMethod::Adapter { bottleneck } => json!({ "adapter": { "bottleneck": bottleneck } }),
        PeftMethod::Prompt { tokens } => json!({ "prompt": { "tokens": tokens } }),
        PeftMethod::FullTail => json!("full_tail"),
    }
}

/// Statistics over a tensor's dense values (zeros included where a sparse tensor sent nothing).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorStats {
    /// Elements.
    pub elements: usize,
    /// Smallest finite value.
    pub min: Option<f32>,
    /// Largest finite value.
    pub max: Option<f32>,
    /// Mean of finite values.
    pub mean: Option<f64>,
    /// L2 norm of finite values.
    pub l2: f64,
    /// NaN count.
    pub nan: usize,
    /// Infinity count.
    pub inf: usize,
    /// Exact zeros.
    pub zeros: usize,
}

impl TensorStats {
    /// Computes the statistics of `t`.
    pub fn of(t: &Tensor) -> Self {
        let dense = t.to_f32();
        let mut s = TensorStats {
            elements: dense.len(),
            min: None,
            max: None,
            mean: None,
            l2: 0.0,
            nan: 0,
            inf: 0,
            zeros: 0,
        };
        let (mut sum, mut finite) = (0.0f64, 0usize);
        for &x in &dense {
            if x.is_nan() {
                s.nan += 1;
            } else if x.is_infinite() {
                s.inf += 1;
            } else {
                s.zeros += usize::from(x == 0.0);
                s.min = Some(s.min.map_or(x, |m| m.min(x)));
                s.max = Some(s.max.map_or(x, |m| m.max(x)));
                sum += f64::from(x);
                s.l2 += f64::from(x) * f64::from(x);
                finite += 1;
            }
        }
        s.l2 = s.l2.sqrt();
        s.mean = (finite > 0).then(|| sum / finite as f64);
        s
    }
}

fn tensor_json(t: &Tensor, detail: Detail) -> Value {
    let mut v = json!({
        "name": t.name(),
        "shape": t.shape(),
        "dtype": t.dtype().as_str(),
        "layout": if t.indices().is_some() { "sparse" } else { "dense" },
        "elements": t.num_elements(),
        "sent_values": t.values().len(),
        "payload_bytes": t.payload_bytes(),
    });
    if let Values::I8 { scale, .. } = t.values() {
        v["scale"] = num(*scale);
    }
    match detail {
        Detail::Full => {
            if let Some(idx) = t.indices() {
                v["indices"] = json!(idx);
            }
            v["values"] = Value::Array(t.values().to_f32().into_iter().map(num).collect());
        }
        Detail::Summary => {
            let s = TensorStats::of(t);
            v["stats"] = json!({
                "min": s.min.map(num),
                "max": s.max.map(num),
                "mean": s.mean,
                "l2": s.l2,
                "nan": s.nan,
                "inf": s.inf,
                "zeros": s.zeros,
            });
        }
    }
    v
}
