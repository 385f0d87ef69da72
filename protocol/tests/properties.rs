//! Property tests: arbitrary messages round-trip; arbitrary bytes never panic any decoder or the
//! reassembler.

use fedpeft_protocol::*;
use proptest::prelude::*;

fn client_id() -> impl Strategy<Value = ClientId> {
    "[A-Za-z0-9_.-]{1,32}".prop_map(|s| ClientId::new(&s).unwrap())
}

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::I8)]
}

/// Any finite or non-finite f32, by bit pattern. NaN payloads survive f32 encoding bit-exactly,
/// but NaN != NaN, so the round-trip tests compare encodings rather than values.
fn any_f32() -> impl Strategy<Value = f32> {
    any::<u32>().prop_map(f32::from_bits)
}

fn values(n: usize) -> impl Strategy<Value = Values> {
    prop_oneof![
        prop::collection::vec(any_f32(), n).prop_map(Values::F32),
        prop::collection::vec(any::<u16>(), n).prop_map(Values::F16),
        (any_f32(), prop::collection::vec(-127i8..=127, n))
            .prop_map(|(scale, values)| Values::I8 { scale, values }),
    ]
}

fn tensor(name: String) -> impl Strategy<Value = Tensor> {
    (
        prop::collection::vec(1u32..6, 0..4),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_flat_map(move |(shape, sparse, seed)| {
            let n: usize = shape.iter().map(|&d| d as usize).product();
            let name = name.clone();
            if sparse {
                // A seeded subset of positions, increasing.
                let mut rng = SplitMix64::new(seed);
                let idx: Vec<u32> = (0..n as u32).filter(|_| rng.next_u64() % 3 == 0).collect();
                let k = idx.len();
                values(k)
                    .prop_map(move |v| Tensor::sparse(&name, &shape, idx.clone(), v).unwrap())
                    .boxed()
            } else {
                values(n)
                    .prop_map(move |v| Tensor::dense(&name, &shape, v).unwrap())
                    .boxed()
            }
        })
}

fn tensors() -> impl Strategy<Value = Vec<Tensor>> {
    (0usize..4).prop_flat_map(|n| {
        (0..n)
            .map(|i| tensor(format!("layer{i}.w")))
            .collect::<Vec<_>>()
    })
}

fn message(round: u32) -> impl Strategy<Value = Message> {
    let join = (
        client_id(),
        any::<[u8; 32]>(),
        prop::collection::vec(dtype(), 0..3),
        any::<u32>(),
        any::<u64>(),
        "[a-z0-9@.-]{0,64}",
    )
        .prop_map(|(client, sha, dtypes, max_packet_size, num_examples, id)| {
            Message::Join(Join {
                client,
                capabilities: Capabilities {
                    backbone_id: heapless::String::try_from(id.as_str()).unwrap(),
                    backbone_sha256: sha,
                    peft: PeftMethod::Adapter { bottleneck: 16 },
                    accepted_dtypes: heapless::Vec::from_slice(&dtypes).unwrap(),
                    max_packet_size,
                },
                num_examples,
            })
        });
    let announce = (
        any::<u64>(),
        prop::collection::vec(client_id(), 0..5),
        dtype(),
        any::<Option<f32>>(),
        any::<u64>(),
    )
        .prop_map(
            move |(deadline_unix_ms, clients, update_dtype, top_k_fraction, seed)| {
                Message::RoundAnnounce(RoundAnnounce {
                    round,
                    deadline_unix_ms,
                    sampling: if clients.is_empty() {
                        Sampling::Rate(0.5)
                    } else {
                        Sampling::Clients(clients)
                    },
                    config: LocalConfig {
                        epochs: 1,
                        batch_size: 16,
                        learning_rate: 1e-3,
                        optimizer: Optimizer::AdamW {
                            beta1: 0.9,
                            beta2: 0.999,
                            epsilon: 1e-8,
                            weight_decay: 0.01,
                        },
                        fedprox_mu: 0.01,
                        dp_sgd: Some(DpSgd {
                            clip_norm: 1.0,
                            noise_multiplier: 1.1,
                        }),
                        update_dtype,
                        top_k_fraction,
                        seed,
                    },
                })
            },
        );
    let global =
        tensors().prop_map(move |tensors| Message::GlobalAdapter(GlobalAdapter { round, tensors }));
    let update = (
        client_id(),
        any::<u32>(),
        any::<u64>(),
        any::<f32>(),
        tensors(),
    )
        .prop_map(move |(client, sequence, num_examples, loss, tensors)| {
            Message::ClientUpdate(ClientUpdate {
                client,
                round,
                sequence,
                num_examples,
                metrics: TrainMetrics {
                    loss,
                    accuracy: 0.5,
                    steps: 3,
                    elapsed_ms: 10,
                    epsilon: None,
                },
                tensors,
            })
        });
    let eval =
        (client_id(), any::<u64>(), any::<f32>()).prop_map(move |(client, num_examples, loss)| {
            Message::EvalResult(EvalResult {
                client,
                round,
                num_examples,
                loss,
                accuracy: 1.0,
            })
        });
    let status = (
        client_id(),
        prop_oneof![
            Just(ClientState::Online),
            Just(ClientState::Idle),
            Just(ClientState::Training),
            Just(ClientState::Offline)
        ],
    )
        .prop_map(|(client, state)| Message::Status(Status { client, state }));
    let chunk = (
        any::<[u32; 5]>(),
        prop::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(f, data)| {
            Message::Chunk(Chunk {
                message_id: f[0],
                index: f[1],
                count: f[2],
                total_len: f[3],
                crc32: f[4],
                data,
            })
        });
    prop_oneof![join, announce, global, update, eval, status, chunk]
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (any::<u64>(), any::<u32>()).prop_flat_map(|(run_id, round)| {
        message(round).prop_map(move |m| Envelope::new(run_id, round, m))
    })
}

fn chunk() -> impl Strategy<Value = Chunk> {
    (
        0u32..4,
        0u32..6,
        0u32..6,
        0u32..40,
        any::<u32>(),
        prop::collection::vec(any::<u8>(), 0..20),
    )
        .prop_map(|(message_id, index, count, total_len, crc32, data)| Chunk {
            message_id,
            index,
            count,
            total_len,
            crc32,
            data,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_messages_round_trip_byte_for_byte(env in envelope()) {
        let bytes = env.encode().unwrap();
        let back = Envelope::decode(&bytes).unwrap();
        prop_assert_eq!(back.kind(), env.kind());
        prop_assert_eq!((back.run_id, back.round), (env.run_id, env.round));
        // Encoding the decoded envelope gives the same bytes (NaN-safe equality).
        prop_assert_eq!(back.encode().unwrap(), bytes);
    }

    #[test]
    fn arbitrary_tensors_round_trip_to_the_same_f32_bits(t in tensor("t".into())) {
        let env = Envelope::new(0, 0, GlobalAdapter { round: 0, tensors: vec![t.clone()] });
        let back = Envelope::decode(&env.encode().unwrap()).unwrap();
        let got = &back.message.tensors()[0];
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        prop_assert_eq!(bits(got.to_f32()), bits(t.to_f32()));
        prop_assert_eq!(got.shape(), t.shape());
        prop_assert_eq!(got.indices(), t.indices());
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoders(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Envelope::decode(&bytes);
        let _ = peek_header(&bytes);
        let _ = postcard::from_bytes::<Tensor>(&bytes);
        if let Ok(s) = core::str::from_utf8(&bytes) {
            let _ = Topic::parse(s);
        }
    }

    #[test]
    fn arbitrary_bytes_behind_a_valid_header_and_crc_never_panic(
        kind in 1u8..=7,
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        // Random bytes rarely pass the CRC, so sign them: this reaches every body decoder.
        let mut bytes = vec![1, 0, 0, kind];
        bytes.extend_from_slice(&body);
        let crc = crc32(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        if let Ok(env) = Envelope::decode(&bytes) {
            // Whatever decodes is structurally sound: these must not panic either.
            for t in env.message.tensors() {
                let _ = t.to_f32();
                let _ = t.validate();
            }
            // Re-encoding need not give the same bytes (postcard accepts overlong varints), but
            // it must succeed.
            prop_assert!(env.encode().is_ok());
        }
    }

    #[test]
    fn mutated_valid_messages_never_panic(env in envelope(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
        let mut bytes = env.encode().unwrap();
        bytes.truncate(bytes.len() - 4);
        for (i, x) in flips {
            let at = i.index(bytes.len());
            bytes[at] ^= x;
        }
        let crc = crc32(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        if let Ok(env) = Envelope::decode(&bytes) {
            for t in env.message.tensors() {
                let _ = t.to_f32();
            }
        }
    }

}

proptest! {
    // The reassembler's state space is larger than the decoders': more cases.
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_chunk_sequences_never_panic_the_reassembler(
        chunks in prop::collection::vec((0u8..3, chunk(), 0u64..3_000), 0..40),
    ) {
        let limits = ReassemblyLimits { max_in_flight: 3, max_total_bytes: 64, max_message_bytes: 32, timeout_ms: 1_000 };
        let mut r = Reassembler::new(limits);
        for (source, c, now) in chunks {
            let total_len = c.total_len as usize;
            if let Ok(Some(out)) = r.push(source, c, now) {
                prop_assert_eq!(out.len(), total_len);
            }
            prop_assert!(r.reserved_bytes() <= 64);
            prop_assert!(r.in_flight() <= 3);
            let _ = r.expire(now);
        }
    }
}
