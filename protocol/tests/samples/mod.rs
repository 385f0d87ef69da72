//! One fixed example of every message, shared by the golden-byte tests and the docs check.
#![allow(dead_code)]

use fedpeft_protocol::*;

pub fn client() -> ClientId {
    ClientId::new("pi-01").unwrap()
}

pub fn update_tensors() -> Vec<Tensor> {
    vec![
        Tensor::dense("head.bias", &[2], Values::F32(vec![0.5, -1.0])).unwrap(),
        Tensor::dense(
            "lora.a",
            &[2, 2],
            Values::F16(vec![0x3c00, 0xb800, 0x0000, 0x7bff]),
        )
        .unwrap(),
        Tensor::sparse(
            "lora.b",
            &[10],
            vec![1, 7],
            Values::I8 {
                scale: 0.5,
                values: vec![127, -3],
            },
        )
        .unwrap(),
    ]
}

pub const RUN_ID: u64 = 0x1234;

/// `(name, envelope)` for every message kind.
pub fn all() -> Vec<(&'static str, Envelope)> {
    let join = Join {
        client: client(),
        capabilities: Capabilities {
            backbone_id: "minilm-l6".try_into().unwrap(),
            backbone_sha256: [0xab; 32],
            peft: PeftMethod::Lora {
                rank: 4,
                alpha: 8.0,
            },
            accepted_dtypes: heapless::Vec::from_slice(&[DType::F32, DType::I8]).unwrap(),
            max_packet_size: 10_240,
        },
        num_examples: 600,
    };
    let announce = RoundAnnounce {
        round: 5,
        deadline_unix_ms: 1_764_000_000_000,
        sampling: Sampling::Clients(vec![client(), ClientId::new("jetson").unwrap()]),
        config: LocalConfig {
            epochs: 2,
            batch_size: 32,
            learning_rate: 0.01,
            optimizer: Optimizer::Sgd {
                momentum: 0.9,
                weight_decay: 0.0,
            },
            fedprox_mu: 0.0,
            dp_sgd: None,
            update_dtype: DType::I8,
            top_k_fraction: Some(0.1),
            seed: 99,
        },
    };
    let global = GlobalAdapter {
        round: 5,
        tensors: vec![Tensor::dense("head.bias", &[2], Values::F32(vec![0.25, 0.0])).unwrap()],
    };
    let update = ClientUpdate {
        client: client(),
        round: 5,
        sequence: 9,
        num_examples: 600,
        metrics: TrainMetrics {
            loss: 0.5,
            accuracy: 0.75,
            steps: 38,
            elapsed_ms: 1500,
            epsilon: Some(2.0),
        },
        tensors: update_tensors(),
    };
    let eval = EvalResult {
        client: client(),
        round: 5,
        num_examples: 100,
        loss: 0.25,
        accuracy: 0.875,
    };
    let status = Status {
        client: client(),
        state: ClientState::Offline,
    };
    let chunk = Chunk {
        message_id: 3,
        index: 1,
        count: 2,
        total_len: 7,
        crc32: 0xdeadbeef,
        data: vec![1, 2, 3],
    };
    let peer = || ClientId::new("jetson").unwrap();
    let secure = SecureRoundAnnounce {
        announce: announce.clone(),
        setup: SecAggSetup {
            neighbours: 4,
            threshold: 3,
            modulus_bits: 16,
            clip: 0.5,
            norm_bound: 0.0,
            reference_examples: 1200,
            max_clients: 2,
            dp: Some(SecAggDp {
                clip_norm: 1.0,
                value_clip: 0.25,
                noise_steps: 512.0,
            }),
        },
    };
    let keys = SecAggKeys {
        client: client(),
        round: 5,
        enc_pk: [0x11; 32],
        mask_pk: [0x22; 32],
        commitment: [0x33; 32],
    };
    let roster = SecAggRoster {
        round: 5,
        deadline_unix_ms: 1_764_000_000_000,
        graph_seed: [0x44; 32],
        entries: vec![RosterEntry {
            client: client(),
            enc_pk: [0x11; 32],
            mask_pk: [0x22; 32],
            commitment: [0x33; 32],
        }],
    };
    let shares = SecAggShares {
        client: client(),
        round: 5,
        shares: vec![PeerBytes {
            peer: peer(),
            bytes: vec![0xc0, 0xff, 0xee],
        }],
    };
    let relay = SecAggRelay {
        round: 5,
        deadline_unix_ms: 1_764_000_000_000,
        survivors: vec![client(), peer()],
        shares: vec![PeerBytes {
            peer: peer(),
            bytes: vec![0xc0, 0xff, 0xee],
        }],
    };
    let masked = SecAggMasked {
        client: client(),
        round: 5,
        sequence: 9,
        num_examples: 600,
        metrics: TrainMetrics {
            loss: 0.5,
            accuracy: 0.75,
            steps: 38,
            elapsed_ms: 1500,
            epsilon: None,
        },
        len: 2,
        values: vec![0x58, 0x02, 0xff, 0x7f],
    };
    let unmask = SecAggUnmask {
        round: 5,
        deadline_unix_ms: 1_764_000_000_000,
        survivors: vec![client()],
        dropped: vec![peer()],
    };
    let reveal = SecAggReveal {
        client: client(),
        round: 5,
        shares: vec![
            RevealedShare {
                peer: peer(),
                kind: RevealKind::MaskKey,
                share: vec![1, 2],
            },
            RevealedShare {
                peer: client(),
                kind: RevealKind::SelfMask,
                share: vec![3],
            },
        ],
    };
    let buffered = AsyncRoundAnnounce {
        announce: announce.clone(),
        max_staleness: 4,
    };
    let site = SiteAggregate {
        site: ClientId::new("site-a").unwrap(),
        round: 5,
        sequence: 5,
        updates: 2,
        weight: 900,
        train_loss_sum: 450.0,
        train_accuracy_sum: 675.0,
        train_weight: 900.0,
        tensors: vec![ExactSum {
            name: "head.bias".into(),
            sum: vec![0.5, -1.0],
            error: vec![
                0.0,
                1.0 / 1024.0 / 1024.0 / 1024.0 / 1024.0 / 1024.0 / 1024.0,
            ],
        }],
    };
    vec![
        ("join", Envelope::new(RUN_ID, 0, join)),
        ("round_announce", Envelope::new(RUN_ID, 5, announce)),
        ("global_adapter", Envelope::new(RUN_ID, 5, global)),
        ("client_update", Envelope::new(RUN_ID, 5, update)),
        ("eval_result", Envelope::new(RUN_ID, 5, eval)),
        ("status", Envelope::new(RUN_ID, 5, status)),
        ("chunk", Envelope::new(RUN_ID, 5, chunk)),
        ("secure_round_announce", Envelope::new(RUN_ID, 5, secure)),
        ("secagg_keys", Envelope::new(RUN_ID, 5, keys)),
        ("secagg_roster", Envelope::new(RUN_ID, 5, roster)),
        ("secagg_shares", Envelope::new(RUN_ID, 5, shares)),
        ("secagg_relay", Envelope::new(RUN_ID, 5, relay)),
        ("secagg_masked", Envelope::new(RUN_ID, 5, masked)),
        ("secagg_unmask", Envelope::new(RUN_ID, 5, unmask)),
        ("secagg_reveal", Envelope::new(RUN_ID, 5, reveal)),
        ("site_aggregate", Envelope::new(RUN_ID, 5, site)),
        ("async_round_announce", Envelope::new(RUN_ID, 5, buffered)),
    ]
}
