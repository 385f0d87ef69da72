//! The worked example in docs/protocol.md must be exactly what the encoder produces.

use fedpeft_protocol::*;

/// The message the document walks through, byte by byte.
fn worked_example() -> Envelope {
    let tensor = Tensor::sparse(
        "lora.b",
        &[10],
        vec![1, 7],
        Values::I8 {
            scale: 0.5,
            values: vec![127, -3],
        },
    )
    .unwrap();
    let update = ClientUpdate {
        client: ClientId::new("pi-01").unwrap(),
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
        tensors: vec![tensor],
    };
    Envelope::new(0x1234, 5, update)
}

/// The hex inside the fenced block that follows the `worked-example` marker, whitespace removed.
fn hex_in_doc() -> String {
    hex_after("<!-- worked-example -->")
}

/// The hex inside the fenced block that follows `marker`, whitespace removed.
fn hex_after(marker: &str) -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"))
        .expect("docs/protocol.md is readable");
    let after = doc
        .split(marker)
        .nth(1)
        .unwrap_or_else(|| panic!("{marker} in docs/protocol.md"));
    let block = after
        .split("```")
        .nth(1)
        .expect("fenced block after the marker");
    let block = block.strip_prefix("text").unwrap_or(block);
    block.split_whitespace().collect()
}

#[test]
fn the_worked_example_in_the_protocol_doc_matches_the_encoder() {
    let bytes = worked_example().encode().unwrap();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex_in_doc(),
        hex,
        "update docs/protocol.md's worked example"
    );
    let decoded = Envelope::decode(&bytes).unwrap();
    assert_eq!(decoded, worked_example());
    assert_eq!(
        decoded.message.tensors()[0].to_f32(),
        [0.0, 63.5, 0.0, 0.0, 0.0, 0.0, 0.0, -1.5, 0.0, 0.0]
    );
}

/// The signed example: `pi-01`'s Status Online, run 0x1234, in fleet `lab`, signed with the
/// secret key whose 32 bytes are all 0x42.
#[test]
fn the_signed_example_in_the_protocol_doc_matches_the_encoder_and_verifies() {
    let key = SigningKey::from_bytes(&[0x42; 32]);
    let fleet = FleetName::new("lab").unwrap();
    let status = Status {
        client: ClientId::new("pi-01").unwrap(),
        state: ClientState::Online,
    };
    let bytes = Envelope::new(0x1234, 0, status)
        .encode_signed(&fleet, &key)
        .unwrap();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex_after("<!-- signed-example -->"),
        hex,
        "update docs/protocol.md's signed example"
    );
    let public: String = key
        .verifying_key()
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        hex_after("<!-- signed-example-key -->"),
        public,
        "update the public key in docs/protocol.md's signed example"
    );
    sign::verify(&bytes, &fleet, &key.verifying_key()).unwrap();
}
