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
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"))
        .expect("docs/protocol.md is readable");
    let after = doc
        .split("<!-- worked-example -->")
        .nth(1)
        .expect("worked-example marker in docs/protocol.md");
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
