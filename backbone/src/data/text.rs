//! A user's labelled text: CSV with a header (`text`, `label`, optional `key`) or JSONL with one
//! object per line (`{"text": .., "label": .., "key": ..}`; labels are strings or integers).

use std::io::{BufRead, BufReader};
use std::path::Path;

use super::{LabelMap, TextDataset};
use crate::error::{BackboneError, Result};

fn label_map(classes: Option<&[String]>) -> LabelMap {
    classes.map(LabelMap::fixed).unwrap_or_default()
}

fn check_text(path: &Path, record: usize, text: &str) -> Result<()> {
    if text.trim().is_empty() {
        return Err(BackboneError::data(path, Some(record), "empty text"));
    }
    Ok(())
}

/// Loads a CSV file. `classes` fixes the label set (others are errors); without it labels are
/// numbered in first-seen order. Records are numbered from 1 (the first data line).
pub fn load_csv(path: &Path, classes: Option<&[String]>) -> Result<TextDataset> {
    let mut rdr =
        csv::Reader::from_path(path).map_err(|e| BackboneError::data(path, None, e.to_string()))?;
    let hdr = rdr
        .headers()
        .map_err(|e| BackboneError::data(path, None, e.to_string()))?
        .clone();
    let col = |name: &str| hdr.iter().position(|h| h.trim().eq_ignore_ascii_case(name));
    let (Some(ti), Some(li)) = (col("text"), col("label")) else {
        return Err(BackboneError::data(
            path,
            None,
            format!(
                "header {:?} lacks a `text` and a `label` column",
                hdr.iter().collect::<Vec<_>>()
            ),
        ));
    };
    let ki = col("key");
    let mut labels = label_map(classes);
    let mut ds = empty(path);
    for (i, rec) in rdr.records().enumerate() {
        let record = i + 1;
        let rec = rec.map_err(|e| BackboneError::data(path, Some(record), e.to_string()))?;
        let text = rec.get(ti).unwrap_or_default();
        let label = rec.get(li).unwrap_or_default().trim();
        check_text(path, record, text)?;
        if label.is_empty() {
            return Err(BackboneError::data(path, Some(record), "empty label"));
        }
        ds.labels.push(labels.id(label, path, record)?);
        ds.texts.push(text.to_string());
        ds.keys.push(
            ki.and_then(|k| rec.get(k))
                .filter(|k| !k.is_empty())
                .map(str::to_string),
        );
    }
    finish(ds, labels, path)
}

/// Loads a JSONL file (blank lines are skipped; records are numbered by line from 1).
pub fn load_jsonl(path: &Path, classes: Option<&[String]>) -> Result<TextDataset> {
    let f = std::fs::File::open(path).map_err(|e| BackboneError::io(path, e))?;
    let mut labels = label_map(classes);
    let mut ds = empty(path);
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let record = i + 1;
        let line = line.map_err(|e| BackboneError::data(path, Some(record), e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| BackboneError::data(path, Some(record), e.to_string()))?;
        let text = v
            .get("text")
            .and_then(|t| t.as_str())
            .ok_or_else(|| BackboneError::data(path, Some(record), "no string field `text`"))?;
        check_text(path, record, text)?;
        let label = match v.get("label") {
            Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
            Some(serde_json::Value::Number(n)) if n.is_u64() => n.to_string(),
            other => {
                return Err(BackboneError::data(
                    path,
                    Some(record),
                    format!(
                        "`label` must be a non-empty string or a non-negative integer, got {other:?}"
                    ),
                ));
            }
        };
        ds.labels.push(labels.id(&label, path, record)?);
        ds.texts.push(text.to_string());
        ds.keys
            .push(v.get("key").and_then(|k| k.as_str()).map(str::to_string));
    }
    finish(ds, labels, path)
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
