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
    vec![
        ("join", Envelope::new(RUN_ID, 0, join)),
        ("round_announce", Envelope::new(RUN_ID, 5, announce)),
        ("global_adapter", Envelope::new(RUN_ID, 5, global)),
        ("client_update", Envelope::new(RUN_ID, 5, update)),
        ("eval_result", Envelope::new(RUN_ID, 5, eval)),
        ("status", Envelope::new(RUN_ID, 5, status)),
        ("chunk", Envelope::new(RUN_ID, 5, chunk)),
    ]
}
