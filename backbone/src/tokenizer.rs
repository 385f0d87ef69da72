//! BERT WordPiece tokenization in Rust (what `BertTokenizer` / `tokenizers`' BertWordPiece do
//! for an uncased model): clean-up, CJK spacing, lower-casing, accent stripping, punctuation
//! split, greedy longest-match WordPiece with `##` continuations, `[CLS] ... [SEP]`, truncation
//! and padding, attention mask.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ndarray::Array2;
use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

use crate::error::{BackboneError, Result};

/// Words longer than this many characters become `[UNK]`, as in BERT.
const MAX_WORD_CHARS: usize = 100;

/// One tokenized text: ids and mask of the same length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoding {
    pub ids: Vec<i64>,
    pub mask: Vec<i64>,
}

/// A WordPiece tokenizer loaded from a `vocab.txt` (one token per line, id = line number).
#[derive(Debug, Clone)]
pub struct WordPiece {
    vocab: HashMap<String, i64>,
    lowercase: bool,
    strip_accents: bool,
    cls: i64,
    sep: i64,
    pad: i64,
    unk: i64,
    path: PathBuf,
}

impl WordPiece {
    pub fn from_vocab_file(path: &Path, lowercase: bool, strip_accents: bool) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| BackboneError::io(path, e))?;
        let vocab: HashMap<String, i64> = text
            .lines()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as i64))
            .collect();
        let special = |t: &str| {
            vocab
                .get(t)
                .copied()
                .ok_or_else(|| BackboneError::Tokenizer {
                    path: path.to_path_buf(),
                    reason: format!("vocabulary lacks {t}"),
                })
        };
        Ok(Self {
            cls: special("[CLS]")?,
            sep: special("[SEP]")?,
            pad: special("[PAD]")?,
            unk: special("[UNK]")?,
            vocab,
            lowercase,
            strip_accents,
            path: path.to_path_buf(),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    pub fn pad_id(&self) -> i64 {
        self.pad
    }

    /// A stable description, part of activation-cache keys.
    pub fn fingerprint(&self) -> String {
        format!(
            "wordpiece vocab={} size={} lower={} strip={}",
            self.path.display(),
            self.vocab.len(),
            self.lowercase,
            self.strip_accents
        )
    }

    /// The word pieces of a text, without special tokens.
    pub fn tokenize(&self, text: &str) -> Vec<i64> {
        let mut ids = Vec::new();
        for word in self.basic_tokens(text) {
            self.wordpiece(&word, &mut ids);
        }
        ids
    }

    /// `[CLS] pieces [SEP]`, truncated to `max_len` (keeping `[SEP]`), no padding.
    pub fn encode(&self, text: &str, max_len: usize) -> Encoding {
        let max_len = max_len.max(2);
        let want = max_len - 2;
        let mut ids = Vec::with_capacity(max_len);
        ids.push(self.cls);
        // Only the first `want` pieces are kept, so a long text (an e-mail body) is tokenized
        // in chunks cut at ASCII whitespace until enough pieces are there. Whitespace separates
        // words and is dropped, so the pieces are exactly those of the whole text.
        let chunk = (4 * want).max(64);
        let mut rest = text;
        while !rest.is_empty() && ids.len() < want + 1 {
            let cut = rest
                .bytes()
                .enumerate()
                .skip(chunk)
                .find(|(_, b)| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
                .map_or(rest.len(), |(i, _)| i);
            let (head, tail) = rest.split_at(cut);
            for word in self.basic_tokens(head) {
                self.wordpiece(&word, &mut ids);
            }
            rest = tail;
        }
        ids.truncate(want + 1);
        ids.push(self.sep);
        Encoding {
            mask: vec![1; ids.len()],
            ids,
        }
    }

    /// Encodes a batch padded to its longest member (at most `max_len`): `(ids, mask)`.
    pub fn encode_batch(&self, texts: &[&str], max_len: usize) -> (Array2<i64>, Array2<i64>) {
        let encs: Vec<Encoding> = texts.iter().map(|t| self.encode(t, max_len)).collect();
        let s = encs.iter().map(|e| e.ids.len()).max().unwrap_or(2);
        let mut ids = Array2::from_elem((texts.len(), s), self.pad);
        let mut mask = Array2::zeros((texts.len(), s));
        for (b, e) in encs.iter().enumerate() {
            for (j, (&id, &m)) in e.ids.iter().zip(&e.mask).enumerate() {
                ids[[b, j]] = id;
                mask[[b, j]] = m;
            }
        }
        (ids, mask)
    }

    /// BERT's BasicTokenizer: words and punctuation marks.
    fn basic_tokens(&self, text: &str) -> Vec<String> {
        let mut cleaned = String::with_capacity(text.len());
        for c in text.chars() {
            if c == '\0' || c == '\u{fffd}' || (is_control(c)) {
                continue;
            }
            if is_whitespace(c) {
                cleaned.push(' ');
            } else if is_cjk(c) {
                cleaned.push(' ');
                cleaned.push(c);
                cleaned.push(' ');
            } else {
                cleaned.push(c);
            }
        }
        let mut out = Vec::new();
        for word in cleaned.split(' ').filter(|w| !w.is_empty()) {
            let mut w: String = if self.lowercase {
                word.to_lowercase()
            } else {
                word.to_string()
            };
            if self.strip_accents {
                w = w.nfd().filter(|&c| !is_combining_mark(c)).collect();
            }
            let mut cur = String::new();
            for c in w.chars() {
                if is_punctuation(c) {
                    if !cur.is_empty() {
                        out.push(std::mem::take(&mut cur));
                    }
                    out.push(c.to_string());
                } else {
                    cur.push(c);
                }
            }
            if !cur.is_empty() {
                out.push(cur);
            }
        }
        out
    }

    /// Greedy longest-match-first; a word with an unmatchable rest becomes one `[UNK]`.
    fn wordpiece(&self, word: &str, out: &mut Vec<i64>) {
        let chars: Vec<char> = word.chars().collect();
        if chars.len() > MAX_WORD_CHARS {
            out.push(self.unk);
            return;
        }
        let mark = out.len();
        let mut start = 0;
        while start < chars.len() {
            let mut end = chars.len();
            let mut found = None;
            while start < end {
                let mut piece: String = chars[start..end].iter().collect();
                if start > 0 {
                    piece.insert_str(0, "##");
                }
                if let Some(&id) = self.vocab.get(&piece) {
                    found = Some(id);
                    break;
                }
                end -= 1;
            }
            match found {
                Some(id) => {
                    out.push(id);
                    start = end;
                }
                None => {
                    out.truncate(mark);
                    out.push(self.unk);
                    return;
                }
            }
        }
    }
}

fn is_whitespace(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r') || (c.is_whitespace() && !c.is_control())
}

fn is_control(c: char) -> bool {
    if matches!(c, '\t' | '\n' | '\r') {
        return false;
    }
    // Cc, plus the common Cf format characters (zero-width joiners, BOM, bidi marks).
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2064}' | '\u{feff}' | '\u{00ad}')
}

/// ASCII symbols count as punctuation (as in BERT), plus the Unicode punctuation blocks.
fn is_punctuation(c: char) -> bool {
    c.is_ascii_punctuation()
        || matches!(c,
            '\u{00a1}' | '\u{00a7}' | '\u{00ab}' | '\u{00b6}' | '\u{00b7}' | '\u{00bb}' | '\u{00bf}'
            | '\u{037e}' | '\u{0387}'
            | '\u{055a}'..='\u{055f}' | '\u{0589}' | '\u{058a}'
            | '\u{05be}' | '\u{05c0}' | '\u{05c3}' | '\u{05c6}' | '\u{05f3}' | '\u{05f4}'
            | '\u{0609}' | '\u{060a}' | '\u{060c}' | '\u{060d}' | '\u{061b}' | '\u{061e}' | '\u{061f}'
            | '\u{066a}'..='\u{066d}' | '\u{06d4}'
            | '\u{0964}' | '\u{0965}' | '\u{0970}'
            | '\u{0e4f}' | '\u{0e5a}' | '\u{0e5b}'
            | '\u{2010}'..='\u{2027}' | '\u{2030}'..='\u{2043}' | '\u{2045}'..='\u{2051}'
            | '\u{2053}'..='\u{205e}' | '\u{207d}' | '\u{207e}' | '\u{208d}' | '\u{208e}'
            | '\u{2308}'..='\u{230b}' | '\u{2329}' | '\u{232a}' | '\u{2768}'..='\u{2775}'
            | '\u{27c5}' | '\u{27c6}' | '\u{27e6}'..='\u{27ef}' | '\u{2983}'..='\u{2998}'
            | '\u{29d8}'..='\u{29db}' | '\u{29fc}' | '\u{29fd}'
            | '\u{2cf9}'..='\u{2cfc}' | '\u{2cfe}' | '\u{2cff}' | '\u{2e00}'..='\u{2e4f}'
            | '\u{3001}'..='\u{3003}' | '\u{3008}'..='\u{3011}' | '\u{3014}'..='\u{301f}'
            | '\u{3030}' | '\u{303d}' | '\u{30a0}' | '\u{30fb}'
            | '\u{fe10}'..='\u{fe19}' | '\u{fe30}'..='\u{fe52}' | '\u{fe54}'..='\u{fe61}'
            | '\u{fe63}' | '\u{fe68}' | '\u{fe6a}' | '\u{fe6b}'
            | '\u{ff01}'..='\u{ff03}' | '\u{ff05}'..='\u{ff0a}' | '\u{ff0c}'..='\u{ff0f}'
            | '\u{ff1a}' | '\u{ff1b}' | '\u{ff1f}' | '\u{ff20}' | '\u{ff3b}'..='\u{ff3d}'
            | '\u{ff3f}' | '\u{ff5b}' | '\u{ff5d}' | '\u{ff5f}'..='\u{ff65}')
}

fn is_cjk(c: char) -> bool {
    matches!(c,
        '\u{4e00}'..='\u{9fff}' | '\u{3400}'..='\u{4dbf}' | '\u{20000}'..='\u{2a6df}'
        | '\u{2a700}'..='\u{2b73f}' | '\u{2b740}'..='\u{2b81f}' | '\u{2b820}'..='\u{2ceaf}'
        | '\u{f900}'..='\u{faff}' | '\u{2f800}'..='\u{2fa1f}')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (tempfile::TempDir, WordPiece) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vocab.txt");
        let vocab = [
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "world", "un", "##aff", "##able", ",",
            "!", "cafe",
        ];
        std::fs::write(&p, vocab.join("\n")).unwrap();
        let wp = WordPiece::from_vocab_file(&p, true, true).unwrap();
        (dir, wp)
    }

    #[test]
    fn lowercases_strips_accents_splits_punctuation_and_wordpieces() {
        let (_d, wp) = tiny();
        let e = wp.encode("Hello, WORLD! Unaffable café xyz", 32);
        assert_eq!(e.ids, vec![2, 4, 9, 5, 10, 6, 7, 8, 11, 1, 3]);
        assert_eq!(e.mask, vec![1; 11]);
    }

    #[test]
    fn truncation_keeps_sep_and_padding_masks_the_tail() {
        let (_d, wp) = tiny();
        let (ids, mask) = wp.encode_batch(&["hello world hello world", "hello"], 4);
        assert_eq!(ids.row(0).to_vec(), vec![2, 4, 5, 3]);
        assert_eq!(ids.row(1).to_vec(), vec![2, 4, 3, 0]);
        assert_eq!(mask.row(1).to_vec(), vec![1, 1, 1, 0]);
    }

    #[test]
    fn a_long_text_encodes_as_its_whole_tokenization_truncated() {
        let (_d, wp) = tiny();
        let words = [
            "Hello,",
            "world!",
            "unaffable",
            "café",
            "xyz",
            "hello\tworld\n",
            "un",
        ];
        let text: String = (0..2000)
            .map(|i| words[i * 7 % words.len()])
            .collect::<Vec<_>>()
            .join(" ");
        for max_len in [2, 3, 16, 128, 512, 5000] {
            let e = wp.encode(&text, max_len);
            let mut want = vec![2];
            want.extend(wp.tokenize(&text).into_iter().take(max_len - 2));
            want.push(3);
            assert_eq!(e.ids, want, "max_len {max_len}");
        }
    }

    #[test]
    fn a_vocabulary_without_special_tokens_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vocab.txt");
        std::fs::write(&p, "a\nb\n").unwrap();
        let e = WordPiece::from_vocab_file(&p, true, true).unwrap_err();
        assert!(e.to_string().contains("[CLS]"), "{e}");
    }
}
