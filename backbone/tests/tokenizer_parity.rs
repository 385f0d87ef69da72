//! The Rust WordPiece tokenizer against the reference `tokenizers` output for the model's own
//! tokenizer.json (fixture from models/make_fixtures.py).

mod common;

use fedpeft_backbone::{Backbone, WordPiece};

#[test]
fn wordpiece_ids_match_the_reference_tokenizer_on_every_fixture_sentence() {
    let bb = Backbone::by_id("all-minilm-l6-v2").unwrap();
    let wp = WordPiece::from_vocab_file(&bb.vocab_path().unwrap(), true, true).unwrap();
    assert_eq!(wp.vocab_size(), 30522);
    let text = std::fs::read_to_string(common::fixture_path("tokenizer.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let s = case["text"].as_str().unwrap();
        let max_len = case["max_len"].as_u64().unwrap_or(512) as usize;
        let want: Vec<i64> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let got = wp.encode(s, max_len);
        assert_eq!(got.ids, want, "sentence {s:?}");
    }
}
