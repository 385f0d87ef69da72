//! Arbitrary bytes into the tensor decoder (postcard layer plus the structural check that
//! `Envelope::decode` applies), and arbitrary f32 data through every codec.
#![no_main]

use fedpeft_protocol::{Codec, DType, GlobalAdapter, SplitMix64, Tensor};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((t, _)) = postcard::take_from_bytes::<Tensor>(data) {
        // Wrap it so the structural check runs exactly as on the wire.
        let env = fedpeft_protocol::Envelope::new(0, 0, GlobalAdapter { round: 0, tensors: vec![t] });
        if let Ok(bytes) = env.encode() {
            let back = fedpeft_protocol::Envelope::decode(&bytes).expect("encoded tensors decode");
            for t in back.message.tensors() {
                let _ = t.to_f32();
                let _ = t.validate();
            }
        }
    }
    if data.len() >= 2 {
        let (ctl, rest) = data.split_at(2);
        let floats: Vec<f32> = rest
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let dtype = [DType::F32, DType::F16, DType::I8][usize::from(ctl[0] % 3)];
        let codec = match ctl[1] {
            0 => Codec::dense(dtype),
            f => Codec::top_k(dtype, f32::from(f) / 255.0),
        };
        let mut rng = SplitMix64::new(u64::from(ctl[1]));
        if let Ok(t) = Tensor::encode("w", &[floats.len() as u32], &floats, codec, &mut rng) {
            assert_eq!(t.to_f32().len(), floats.len());
        }
    }
});
