//! Golden bytes: the exact encoding of one example of every message. If one of these changes,
//! the wire format changed: bump `PROTOCOL_VERSION` and update docs/protocol.md.

mod samples;

use fedpeft_protocol::*;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

const GOLDEN: [(&str, &str); 17] = [
    (
        "join",
        "01b42400010570692d3031096d696e696c6d2d6c36abababababababababababababababababababababababababababababababab0204000000410200028050d80448d6c23f",
    ),
    (
        "round_announce",
        "01b42405020580d0dfb4ab3301020570692d3031066a6574736f6e02200ad7233c006666663f0000000000000000000201cdcccc3d631da76178",
    ),
    (
        "global_adapter",
        "01b4240503050109686561642e62696173010200080000803e000000000074c62b7c",
    ),
    (
        "client_update",
        "01b42405040570692d30310509d8040000003f0000403f26dc0b01000000400309686561642e62696173010200080000003f000080bf00066c6f72612e610202020108003c00b80000ff7b00066c6f72612e62010a020000003f027ffd010201067340bf83",
    ),
    (
        "eval_result",
        "01b42405050570692d303105640000803e0000603f1a51cdbd",
    ),
    ("status", "01b42405060570692d303103429b3321"),
    ("chunk", "01b424050703010207effdb6f50d03010203651067b6"),
    (
        "secure_round_announce",
        "01b42405080580d0dfb4ab3301020570692d3031066a6574736f6e02200ad7233c006666663f0000000000000000000201cdcccc3d630403100000003f00000000b00902010000803f0000803e00000000000080400631fdfd",
    ),
    (
        "secagg_keys",
        "01b42405090570692d303105111111111111111111111111111111111111111111111111111111111111111122222222222222222222222222222222222222222222222222222222222222223333333333333333333333333333333333333333333333333333333333333333e2c6aa91",
    ),
    (
        "secagg_roster",
        "01b424050a0580d0dfb4ab334444444444444444444444444444444444444444444444444444444444444444010570692d30311111111111111111111111111111111111111111111111111111111111111111222222222222222222222222222222222222222222222222222222222222222233333333333333333333333333333333333333333333333333333333333333337011aae7",
    ),
    (
        "secagg_shares",
        "01b424050b0570692d30310501066a6574736f6e03c0ffee1913d683",
    ),
    (
        "secagg_relay",
        "01b424050c0580d0dfb4ab33020570692d3031066a6574736f6e01066a6574736f6e03c0ffeeb645514f",
    ),
    (
        "secagg_masked",
        "01b424050d0570692d30310509d8040000003f0000403f26dc0b0002045802ff7f4400bedd",
    ),
    (
        "secagg_unmask",
        "01b424050e0580d0dfb4ab33010570692d303101066a6574736f6e2673258b",
    ),
    (
        "secagg_reveal",
        "01b424050f0570692d30310502066a6574736f6e010201020570692d30310001039eb8ce68",
    ),
    (
        "site_aggregate",
        "01b424051006736974652d6105050284070000000000207c4000000000001885400000000000208c400109686561642e6269617302000000000000e03f000000000000f0bf020000000000000000000000000000303c5786f76d",
    ),
    (
        "async_round_announce",
        "01b42405110580d0dfb4ab3301020570692d3031066a6574736f6e02200ad7233c006666663f0000000000000000000201cdcccc3d6304e535d726",
    ),
];

#[test]
fn every_message_kind_encodes_to_its_golden_bytes() {
    let samples = samples::all();
    assert_eq!(samples.len(), MessageKind::ALL.len(), "one sample per kind");
    for ((name, env), (golden_name, golden_hex)) in samples.iter().zip(GOLDEN) {
        assert_eq!(*name, golden_name);
        assert_eq!(env.kind().as_str(), *name);
        assert_eq!(
            hex(&env.encode().unwrap()),
            golden_hex,
            "{name} encoding changed"
        );
    }
}

#[test]
fn every_golden_payload_decodes_to_its_message() {
    for ((name, env), (_, golden_hex)) in samples::all().iter().zip(GOLDEN) {
        let decoded = Envelope::decode(&unhex(golden_hex)).unwrap();
        assert_eq!(&decoded, env, "{name}");
        let header = peek_header(&unhex(golden_hex)).unwrap();
        assert_eq!(header.kind, env.kind());
        assert_eq!((header.run_id, header.round), (samples::RUN_ID, env.round));
    }
}

fn with_crc(mut body: Vec<u8>) -> Vec<u8> {
    let crc = crc32(&body);
    body.extend_from_slice(&crc.to_le_bytes());
    body
}

#[test]
fn an_unknown_version_is_rejected_before_anything_else() {
    let mut bytes = unhex(GOLDEN[5].1);
    bytes[0] = 3;
    assert_eq!(
        Envelope::decode(&bytes),
        Err(DecodeError::UnsupportedVersion {
            found: 3,
            supported: SIGNED_VERSION
        })
    );
    // Even a bare version byte names the version problem rather than the length.
    assert_eq!(
        Envelope::decode(&[9]),
        Err(DecodeError::UnsupportedVersion {
            found: 9,
            supported: 2
        })
    );
}

#[test]
fn an_unknown_kind_is_a_typed_error() {
    for code in [0u8, 18, 255] {
        let bytes = with_crc(vec![1, 0, 0, code]);
        assert_eq!(
            Envelope::decode(&bytes),
            Err(DecodeError::UnknownKind { code })
        );
    }
}

#[test]
fn a_flipped_bit_is_caught_by_the_checksum() {
    let good = unhex(GOLDEN[3].1);
    for i in 1..good.len() - 4 {
        let mut bad = good.clone();
        bad[i] ^= 0x10;
        assert!(
            matches!(Envelope::decode(&bad), Err(DecodeError::CrcMismatch { .. })),
            "flip at byte {i} not caught"
        );
    }
}

#[test]
fn truncated_and_padded_payloads_are_rejected() {
    let good = unhex(GOLDEN[4].1);
    assert_eq!(
        Envelope::decode(&good[..5]),
        Err(DecodeError::TooShort { len: 5 })
    );
    // Re-signed so only the structural problem remains.
    let body = &good[..good.len() - 4];
    let truncated = with_crc(body[..body.len() - 2].to_vec());
    assert!(matches!(
        Envelope::decode(&truncated),
        Err(DecodeError::Body {
            kind: MessageKind::EvalResult,
            error: postcard::Error::DeserializeUnexpectedEnd
        })
    ));
    let mut padded = body.to_vec();
    padded.push(0);
    assert_eq!(
        Envelope::decode(&with_crc(padded)),
        Err(DecodeError::TrailingBytes {
            kind: MessageKind::EvalResult,
            count: 1
        })
    );
}

#[test]
fn a_body_round_that_disagrees_with_the_header_is_rejected() {
    let mut bytes = unhex(GOLDEN[4].1);
    bytes.truncate(bytes.len() - 4);
    bytes[3] = 6; // header round 5 -> 6; the body still says 5
    assert_eq!(
        Envelope::decode(&with_crc(bytes)),
        Err(DecodeError::RoundMismatch {
            kind: MessageKind::EvalResult,
            header: 6,
            body: 5
        })
    );
    let mut env = samples::all().remove(4).1;
    env.round = 6;
    assert!(matches!(
        env.encode(),
        Err(EncodeError::RoundMismatch { .. })
    ));
}

#[test]
fn a_huge_length_prefix_is_rejected_without_allocating_it() {
    // GlobalAdapter whose single tensor's f32 byte string claims 4 GiB.
    let mut bytes = vec![1, 0, 0, 3, 0, 1, 1, b'w', 1, 1, 0];
    bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
    bytes.extend_from_slice(&[0; 8]);
    assert!(matches!(
        Envelope::decode(&with_crc(bytes)),
        Err(DecodeError::Body {
            kind: MessageKind::GlobalAdapter,
            ..
        })
    ));
    // A sparse tensor whose shape claims 2^32 * 2^32 elements is refused, not expanded.
    let mut bytes = vec![1, 0, 0, 3, 0, 1, 1, b'w', 2, 0xff, 0xff, 0xff, 0xff, 0x0f];
    bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0, 1, 0]);
    assert!(matches!(
        Envelope::decode(&with_crc(bytes)),
        Err(DecodeError::Tensor {
            error: TensorError::TooManyElements { .. },
            ..
        })
    ));
}

#[test]
fn inconsistent_tensors_are_rejected_naming_the_tensor() {
    // Dense f32 tensor "w" of shape [3] carrying 2 values.
    let mut bytes = vec![1, 0, 0, 3, 0, 1, 1, b'w', 1, 3, 0, 8];
    bytes.extend_from_slice(&[0; 8]);
    bytes.push(0);
    assert_eq!(
        Envelope::decode(&with_crc(bytes)),
        Err(DecodeError::Tensor {
            kind: MessageKind::GlobalAdapter,
            error: TensorError::LengthMismatch {
                name: "w".into(),
                expected: 3,
                found: 2
            }
        })
    );
    let t = Tensor::dense("w", &[1], Values::F32(vec![1.0])).unwrap();
    let dup = GlobalAdapter {
        round: 0,
        tensors: vec![t.clone(), t],
    };
    assert_eq!(
        Envelope::new(0, 0, dup).encode(),
        Err(EncodeError::Tensor(TensorError::DuplicateName {
            name: "w".into()
        }))
    );
}

#[test]
fn client_ids_with_wildcards_do_not_decode() {
    let mut bytes = unhex(GOLDEN[5].1);
    bytes.truncate(bytes.len() - 4);
    let at = bytes.iter().position(|&b| b == b'-').unwrap();
    bytes[at] = b'+';
    assert_eq!(
        Envelope::decode(&with_crc(bytes)),
        Err(DecodeError::Body {
            kind: MessageKind::Status,
            error: postcard::Error::SerdeDeCustom
        })
    );
}

#[test]
fn non_finite_values_decode_but_fail_validation_with_the_tensor_name() {
    let t = Tensor::dense("lora.a", &[3], Values::F32(vec![1.0, f32::NAN, 0.0])).unwrap();
    let u = GlobalAdapter {
        round: 1,
        tensors: vec![t],
    };
    let bytes = Envelope::new(1, 1, u).encode().unwrap();
    let back = Envelope::decode(&bytes).unwrap();
    let err = back.message.validate().unwrap_err();
    assert_eq!((err.tensor.as_str(), err.position), ("lora.a", Some(1)));
    assert!(err.value.is_nan());
    let scale = Tensor::dense(
        "s",
        &[1],
        Values::I8 {
            scale: f32::INFINITY,
            values: vec![1],
        },
    )
    .unwrap();
    assert_eq!(scale.validate().unwrap_err().position, None);
}

#[test]
fn error_messages_name_what_and_where() {
    let mut bytes = unhex(GOLDEN[3].1);
    bytes.truncate(bytes.len() - 4);
    bytes.push(0);
    let err = Envelope::decode(&with_crc(bytes)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "1 unexpected bytes after the client_update body"
    );
    let err = Envelope::decode(&with_crc(vec![1, 0, 0, 42])).unwrap_err();
    assert_eq!(err.to_string(), "unknown message kind code 42");
    let err = Envelope::decode(&[3, 0, 0, 1, 0, 0, 0, 0]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "unsupported protocol version 3 (this build speaks versions 1 to 2)"
    );
}
