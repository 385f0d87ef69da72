//! What the wire tests share: a client's wire, announcements, round configs and updates, and
//! the aggregator's side of reassembling an update.

use fedpeft_protocol::{
    Capabilities, ClientId, ClientUpdate, DType, Envelope, FleetName, LocalConfig, Message,
    Optimizer, PeftMethod, Reassembler, ReassemblyLimits, RoundAnnounce, Sampling,
};

use super::{JoinInfo, Packet, Wire};
use fedpeft_peft::NamedTensor;

use crate::types::{Metrics, TrainedUpdate};

pub(super) fn caps() -> Capabilities {
    let mut dtypes = heapless::Vec::new();
    dtypes.push(DType::F32).unwrap();
    Capabilities {
        backbone_id: heapless::String::try_from("tiny").unwrap(),
        backbone_sha256: [7; 32],
        peft: PeftMethod::Head,
        accepted_dtypes: dtypes,
        max_packet_size: 4096,
    }
}

pub(super) fn wire(max_packet: usize) -> Wire {
    Wire::new(
        FleetName::new("lab").unwrap(),
        ClientId::new("c1").unwrap(),
        77,
        JoinInfo {
            capabilities: caps(),
            num_examples: 50,
        },
        max_packet,
    )
}

pub(super) fn config(dtype: DType, top_k: Option<f32>) -> LocalConfig {
    LocalConfig {
        epochs: 2,
        batch_size: 8,
        learning_rate: 0.05,
        optimizer: Optimizer::Sgd {
            momentum: 0.9,
            weight_decay: 0.0,
        },
        fedprox_mu: 0.0,
        dp_sgd: None,
        update_dtype: dtype,
        top_k_fraction: top_k,
        seed: 9,
    }
}

pub(super) fn announce(round: u32, sampled: &[&str], deadline_unix_ms: u64) -> Vec<u8> {
    let a = RoundAnnounce {
        round,
        deadline_unix_ms,
        sampling: Sampling::Clients(sampled.iter().map(|s| ClientId::new(s).unwrap()).collect()),
        config: config(DType::F16, None),
    };
    Envelope::new(77, round, a).encode().unwrap()
}

pub(super) fn update(n: usize) -> TrainedUpdate {
    TrainedUpdate {
        deltas: vec![NamedTensor {
            name: "head.weight".into(),
            shape: vec![n],
            values: (0..n).map(|i| ((i as f32) * 0.37).sin()).collect(),
        }],
        metrics: Metrics {
            loss: 0.5,
            accuracy: 0.75,
            num_examples: 50,
            steps: 4,
            elapsed_ms: 10,
            epsilon: None,
        },
    }
}

pub(super) fn decode_update(packets: &[Packet]) -> ClientUpdate {
    // Reassemble the way the aggregator does.
    let mut r = Reassembler::<String>::new(ReassemblyLimits::default());
    let mut whole = None;
    for p in packets {
        let env = Envelope::decode(&p.payload).unwrap();
        match env.message {
            Message::ClientUpdate(u) => return u,
            Message::Chunk(c) => whole = r.push(p.topic.clone(), c, 0).unwrap().or(whole),
            other => panic!("unexpected {other:?}"),
        }
    }
    match Envelope::decode(&whole.expect("complete")).unwrap().message {
        Message::ClientUpdate(u) => u,
        other => panic!("unexpected {other:?}"),
    }
}
