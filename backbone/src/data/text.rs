//! A user's labelled text: CSV with a header row, or JSONL with one object per line. The text
//! and label columns (fields) are named by [`TextColumns`] (default `text` and `label`); an
//! optional `key` column (field) is a natural client key. JSONL labels are strings or
//! non-negative integers (read as their decimal text, so class `"3"` is the label `3`).
//!
//! Loading is all or nothing: a missing column, a row with the wrong number of fields, a line
//! that is not a JSON object, an empty text or label, or a label outside the fleet's class list
//! is an error naming the file and the line (from 1, the header being line 1 of a CSV).

use std::io::{BufRead, BufReader};
use std::path::Path;

use super::{LabelMap, TextDataset};
use crate::error::{BackboneError, Result};

/// Which CSV columns (JSONL fields) hold the text and the label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextColumns {
    pub text: String,
    pub label: String,
}

impl Default for TextColumns {
    fn default() -> Self {
        TextColumns {
            text: "text".into(),
            label: "label".into(),
        }
    }
}

/// The natural client key's column (field), optional.
const KEY_COLUMN: &str = "key";

fn label_map(classes: Option<&[String]>) -> LabelMap {
    classes.map(LabelMap::fixed).unwrap_or_default()
}

fn check_text(path: &Path, line: u64, column: &str, text: &str) -> Result<()> {
    if text.trim().is_empty() {
        return Err(BackboneError::line(
            path,
            line,
            format!("empty text in `{column}`"),
        ));
    }
    Ok(())
}

/// A CSV error as a refusal naming the file and, where the reader knows it, the line.
fn csv_error(path: &Path, e: csv::Error) -> BackboneError {
    match e.kind() {
        csv::ErrorKind::Io(io) => {
            BackboneError::io(path, std::io::Error::new(io.kind(), io.to_string()))
        }
        csv::ErrorKind::UnequalLengths {
            pos: Some(pos),
            expected_len,
            len,
        } => BackboneError::line(
            path,
            pos.line(),
            format!("{len} fields, the header has {expected_len} (a quote left open?)"),
        ),
        csv::ErrorKind::Utf8 {
            pos: Some(pos),
            err,
        } => BackboneError::line(path, pos.line(), format!("not UTF-8 text: {err}")),
        _ => match e.position() {
            Some(pos) => BackboneError::line(path, pos.line(), e.to_string()),
            None => BackboneError::data(path, None, e.to_string()),
        },
    }
}

/// Loads a CSV file (a header row, then one record per row; quoted fields may hold commas and
/// line breaks). `classes` fixes the label set (others are errors); without it labels are
/// numbered in first-seen order.
pub fn load_csv(
    path: &Path,
    classes: Option<&[String]>,
    columns: &TextColumns,
) -> Result<TextDataset> {
    let file = std::fs::File::open(path).map_err(|e| BackboneError::io(path, e))?;
    let mut rdr = csv::Reader::from_reader(file);
    let hdr = rdr.headers().map_err(|e| csv_error(path, e))?.clone();
    let col = |name: &str| hdr.iter().position(|h| h.trim() == name);
    let missing = |name: &str| {
        BackboneError::line(
            path,
            1,
            format!(
                "the header {:?} has no `{name}` column",
                hdr.iter().collect::<Vec<_>>()
            ),
        )
    };
    let ti = col(&columns.text).ok_or_else(|| missing(&columns.text))?;
    let li = col(&columns.label).ok_or_else(|| missing(&columns.label))?;
    let ki = col(KEY_COLUMN);
    let mut labels = label_map(classes);
    let mut ds = empty(path);
    let mut rec = csv::StringRecord::new();
    loop {
        match rdr.read_record(&mut rec) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => return Err(csv_error(path, e)),
        }
        let line = rec.position().map_or(0, |p| p.line());
        let text = rec.get(ti).unwrap_or_default();
        let label = rec.get(li).unwrap_or_default().trim();
        check_text(path, line, &columns.text, text)?;
        if label.is_empty() {
            return Err(BackboneError::line(
                path,
                line,
                format!("empty label in `{}`", columns.label),
            ));
        }
        ds.labels.push(labels.id(label, path, line)?);
        ds.texts.push(text.to_string());
        ds.keys.push(
            ki.and_then(|k| rec.get(k))
                .filter(|k| !k.is_empty())
                .map(str::to_string),
        );
    }
    finish(ds, labels, path)
}

/// Loads a JSONL file: one JSON object per line; blank lines are skipped.
pub fn load_jsonl(
    path: &Path,
    classes: Option<&[String]>,
    columns: &TextColumns,
) -> Result<TextDataset> {
    let f = std::fs::File::open(path).map_err(|e| BackboneError::io(path, e))?;
    let mut labels = label_map(classes);
    let mut ds = empty(path);
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let n = i as u64 + 1;
        let line = line.map_err(|e| BackboneError::line(path, n, e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| {
            // serde_json counts lines within the text it was given: here always line 1.
            let what = e.to_string();
            let what = what
                .strip_suffix(&format!(" at line {} column {}", e.line(), e.column()))
                .unwrap_or(&what);
            BackboneError::line(path, n, format!("not JSON: {what} (column {})", e.column()))
        })?;
        if !v.is_object() {
            return Err(BackboneError::line(path, n, "not a JSON object"));
        }
        let text = v
            .get(&columns.text)
            .and_then(|t| t.as_str())
            .ok_or_else(|| {
                BackboneError::line(path, n, format!("no string field `{}`", columns.text))
            })?;
        check_text(path, n, &columns.text, text)?;
        let label = match v.get(&columns.label) {
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
            Some(serde_json::Value::Number(x)) if x.is_u64() => x.to_string(),
            other => {
                return Err(BackboneError::line(
                    path,
                    n,
                    format!(
                        "`{}` must be a non-empty string or a non-negative integer, got {}",
                        columns.label,
                        other.map_or("nothing".to_string(), |o| o.to_string())
                    ),
                ));
            }
        };
        ds.labels.push(labels.id(&label, path, n)?);
        ds.texts.push(text.to_string());
        ds.keys.push(
            v.get(KEY_COLUMN)
                .and_then(|k| k.as_str())
                .map(str::to_string),
        );
    }
    finish(ds, labels, path)
}

/// Unlabelled texts to predict on, by the file's extension: `.csv` (a header row; the text
/// column `text_column`), `.jsonl` (the string field `text_column` of each object), anything
/// else one text per line. Blank lines of a text or JSONL file are skipped; an empty text in a
/// CSV row, a line that is not a JSON object with the field, and a file with no text are errors
/// naming the file and line. Every label is 0.
pub fn load_texts_unlabelled(path: &Path, text_column: &str) -> Result<TextDataset> {
    let mut ds = empty(path);
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("csv") => {
            let file = std::fs::File::open(path).map_err(|e| BackboneError::io(path, e))?;
            let mut rdr = csv::Reader::from_reader(file);
            let hdr = rdr.headers().map_err(|e| csv_error(path, e))?.clone();
            let ti = hdr
                .iter()
                .position(|h| h.trim() == text_column)
                .ok_or_else(|| {
                    BackboneError::line(
                        path,
                        1,
                        format!(
                            "the header {:?} has no `{text_column}` column",
                            hdr.iter().collect::<Vec<_>>()
                        ),
                    )
                })?;
            let mut rec = csv::StringRecord::new();
            while rdr.read_record(&mut rec).map_err(|e| csv_error(path, e))? {
                let line = rec.position().map_or(0, |p| p.line());
                let text = rec.get(ti).unwrap_or_default();
                check_text(path, line, text_column, text)?;
                ds.texts.push(text.to_string());
            }
        }
        Some("jsonl") => {
            let f = std::fs::File::open(path).map_err(|e| BackboneError::io(path, e))?;
            for (i, line) in BufReader::new(f).lines().enumerate() {
                let n = i as u64 + 1;
                let line = line.map_err(|e| BackboneError::line(path, n, e.to_string()))?;
                if line.trim().is_empty() {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(&line)
                    .map_err(|e| BackboneError::line(path, n, format!("not JSON: {e}")))?;
                let text = v.get(text_column).and_then(|t| t.as_str()).ok_or_else(|| {
                    BackboneError::line(path, n, format!("no string field `{text_column}`"))
                })?;
                check_text(path, n, text_column, text)?;
                ds.texts.push(text.to_string());
            }
        }
        _ => {
            let f = std::fs::File::open(path).map_err(|e| BackboneError::io(path, e))?;
            for (i, line) in BufReader::new(f).lines().enumerate() {
                let line =
                    line.map_err(|e| BackboneError::line(path, i as u64 + 1, e.to_string()))?;
                if !line.trim().is_empty() {
                    ds.texts.push(line);
                }
            }
        }
    }
    if ds.texts.is_empty() {
        return Err(BackboneError::data(path, None, "no text in it"));
    }
    ds.labels = vec![0; ds.texts.len()];
    ds.keys = vec![None; ds.texts.len()];
    Ok(ds)
}

fn empty(path: &Path) -> TextDataset {
    TextDataset {
        texts: Vec::new(),
        labels: Vec::new(),
        classes: Vec::new(),
        keys: Vec::new(),
        source: path.to_path_buf(),
    }
}

fn finish(mut ds: TextDataset, labels: LabelMap, path: &Path) -> Result<TextDataset> {
    if ds.is_empty() {
        return Err(BackboneError::data(path, None, "no records"));
    }
    ds.classes = labels.into_names();
    Ok(ds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    fn fleet() -> Vec<String> {
        vec!["neg".into(), "pos".into()]
    }

    fn line_of(e: &BackboneError) -> Option<u64> {
        match e {
            BackboneError::DataLine { line, .. } => Some(*line),
            _ => None,
        }
    }

    #[test]
    fn csv_with_named_columns_maps_labels_to_the_fleet_list() {
        let dir = tempfile::tempdir().unwrap();
        let p = file(
            dir.path(),
            "reviews.csv",
            "id,review,stars\n1,\"great, really\nloved it\",pos\n2,meh,neg\n",
        );
        let cols = TextColumns {
            text: "review".into(),
            label: "stars".into(),
        };
        let ds = load_csv(&p, Some(&fleet()), &cols).unwrap();
        assert_eq!(ds.texts[0], "great, really\nloved it");
        assert_eq!(ds.labels, vec![1, 0]);
        assert_eq!(ds.classes, fleet());
    }

    #[test]
    fn csv_errors_name_the_file_and_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let cols = TextColumns::default();
        let list = fleet();
        for (body, line, words) in [
            (
                "text,label\nok,pos\nfine,maybe\n",
                3,
                "`maybe` is not one of",
            ),
            (
                "text,label\nok,pos\nshort\n",
                3,
                "1 fields, the header has 2",
            ),
            ("text,label\nok,pos\n,neg\n", 3, "empty text"),
            ("text,label\n\"a\nb\",pos\nc,\n", 4, "empty label"),
            ("body,label\nx,pos\n", 1, "no `text` column"),
        ] {
            let p = file(dir.path(), "bad.csv", body);
            let e = load_csv(&p, Some(&list), &cols).unwrap_err();
            let msg = e.to_string();
            assert_eq!(line_of(&e), Some(line), "{body:?}: {msg}");
            assert!(
                msg.contains("bad.csv") && msg.contains(words),
                "{body:?}: {msg}"
            );
            assert!(msg.contains(&format!("line {line}")), "{msg}");
        }
        let p = file(dir.path(), "empty.csv", "text,label\n");
        assert!(
            load_csv(&p, None, &cols)
                .unwrap_err()
                .to_string()
                .contains("no records")
        );
        let e = load_csv(&dir.path().join("absent.csv"), None, &cols).unwrap_err();
        assert!(matches!(e, BackboneError::Io { .. }) && e.to_string().contains("absent.csv"));
    }

    #[test]
    fn jsonl_reads_named_fields_and_integer_labels_as_their_text() {
        let dir = tempfile::tempdir().unwrap();
        let p = file(
            dir.path(),
            "t.jsonl",
            "{\"body\":\"a\",\"y\":1}\n\n{\"body\":\"b\",\"y\":\"0\",\"key\":\"k\"}\n",
        );
        let cols = TextColumns {
            text: "body".into(),
            label: "y".into(),
        };
        let list = vec!["0".to_string(), "1".to_string()];
        let ds = load_jsonl(&p, Some(&list), &cols).unwrap();
        assert_eq!(ds.labels, vec![1, 0]);
        assert_eq!(ds.keys, vec![None, Some("k".to_string())]);
    }

    #[test]
    fn jsonl_errors_name_the_file_and_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let cols = TextColumns::default();
        let list = fleet();
        for (body, line, words) in [
            (
                "{\"text\":\"a\",\"label\":\"pos\"}\n{\"text\": \"oops\"\n",
                2,
                "not JSON",
            ),
            ("\n\n[1, 2]\n", 3, "not a JSON object"),
            ("{\"text\":\"a\"}\n", 1, "got nothing"),
            ("{\"text\":\"a\",\"label\":-1}\n", 1, "non-negative integer"),
            (
                "{\"text\":5,\"label\":\"pos\"}\n",
                1,
                "no string field `text`",
            ),
            (
                "{\"text\":\"a\",\"label\":\"cat\"}\n",
                1,
                "`cat` is not one of",
            ),
        ] {
            let p = file(dir.path(), "bad.jsonl", body);
            let e = load_jsonl(&p, Some(&list), &cols).unwrap_err();
            let msg = e.to_string();
            assert_eq!(line_of(&e), Some(line), "{body:?}: {msg}");
            assert!(
                msg.contains("bad.jsonl") && msg.contains(words),
                "{body:?}: {msg}"
            );
        }
    }
}
