//! The data sets every binary and the fleet name the same way: two named ones that ship with
//! the project's tooling, and four formats of a user's own files. Loading them is
//! `fedpeft-backbone`'s; here are only their names, which backbone family each feeds, and the
//! defaults of the keys that say how to read them.
//!
//! The book's guide "Training on your own data" shows the folder layouts and formats.

use std::path::{Path, PathBuf};

/// A data set as the config files name it (`dataset = "…"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DatasetKind {
    /// Fashion-MNIST from Debian's `dataset-fashion-mnist` (IDX, 10 classes).
    FashionMnist,
    /// The SpamAssassin corpus (ham/spam), fetched by `make models`.
    SpamAssassin,
    /// A folder per class: `root/<class>/**/*.{png,jpg,jpeg}`.
    ImageFolder,
    /// An IDX images file (`[N, H, W]` bytes) and an IDX labels file, gzip or not.
    Idx,
    /// A CSV file with a header, one text and one label column.
    Csv,
    /// One JSON object per line with a text and a label field.
    Jsonl,
}

impl DatasetKind {
    /// Every kind, in the order the documentation lists them.
    pub const ALL: [DatasetKind; 6] = [
        DatasetKind::FashionMnist,
        DatasetKind::SpamAssassin,
        DatasetKind::ImageFolder,
        DatasetKind::Idx,
        DatasetKind::Csv,
        DatasetKind::Jsonl,
    ];

    /// The name as written in a config file and on a command line.
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::FashionMnist => "fashion-mnist",
            DatasetKind::SpamAssassin => "spam-assassin",
            DatasetKind::ImageFolder => "image-folder",
            DatasetKind::Idx => "idx",
            DatasetKind::Csv => "csv",
            DatasetKind::Jsonl => "jsonl",
        }
    }

    /// The kind a name spells, if any.
    pub fn parse(name: &str) -> Option<DatasetKind> {
        DatasetKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Every name, for error messages: `fashion-mnist, spam-assassin, …, csv or jsonl`.
    pub fn names() -> String {
        let names: Vec<&str> = DatasetKind::ALL.iter().map(|k| k.name()).collect();
        let (last, rest) = names.split_last().expect("ALL is not empty");
        format!("{} or {last}", rest.join(", "))
    }

    /// Texts (for a transformer backbone), not images (for a vision one).
    pub fn is_text(self) -> bool {
        matches!(
            self,
            DatasetKind::SpamAssassin | DatasetKind::Csv | DatasetKind::Jsonl
        )
    }

    /// A user's own files: read from the configured path, labelled with the fleet's class list.
    pub fn is_own(self) -> bool {
        !matches!(self, DatasetKind::FashionMnist | DatasetKind::SpamAssassin)
    }

    /// CSV or JSONL: the text and label columns can be named.
    pub fn has_columns(self) -> bool {
        matches!(self, DatasetKind::Csv | DatasetKind::Jsonl)
    }
}

impl std::fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Default `text_column`: the CSV column or JSONL field holding the text.
pub const DEFAULT_TEXT_COLUMN: &str = "text";
/// Default `label_column`: the CSV column or JSONL field holding the label.
pub const DEFAULT_LABEL_COLUMN: &str = "label";

/// The labels file of an IDX images file, by MNIST's naming: the file name with `images-idx3`
/// replaced by `labels-idx1` (`train-images-idx3-ubyte.gz` → `train-labels-idx1-ubyte.gz`), in
/// the same folder. `None` when the name does not follow it.
pub fn idx_labels_beside(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_str()?;
    name.contains("images-idx3")
        .then(|| images.with_file_name(name.replacen("images-idx3", "labels-idx1", 1)))
}

/// The labels file of IDX images file `images`: `given`, or the one beside it by MNIST's
/// naming; why neither, for the key that names the labels.
pub fn idx_labels(images: &Path, given: Option<PathBuf>) -> Result<PathBuf, String> {
    given.or_else(|| idx_labels_beside(images)).ok_or_else(|| {
        format!(
            "is required: the name of {} has no `images-idx3` to find its labels file by",
            images.display()
        )
    })
}

/// The column a [`text_columns`] refusal is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    Text,
    Label,
}

/// The text and label columns of `kind` as set (`None`: the default): set only for CSV and
/// JSONL, non-empty, and not the same column. A refusal names the column and says why.
pub fn text_columns(
    kind: DatasetKind,
    text: Option<&str>,
    label: Option<&str>,
) -> Result<(String, String), (Column, String)> {
    if !kind.has_columns() {
        if text.is_some() {
            return Err((Column::Text, "is for dataset = csv or jsonl".into()));
        }
        if label.is_some() {
            return Err((Column::Label, "is for dataset = csv or jsonl".into()));
        }
    }
    let text = text.unwrap_or(DEFAULT_TEXT_COLUMN);
    let label = label.unwrap_or(DEFAULT_LABEL_COLUMN);
    if text.trim().is_empty() {
        return Err((Column::Text, "must not be empty".into()));
    }
    if label.trim().is_empty() {
        return Err((Column::Label, "must not be empty".into()));
    }
    if text == label {
        return Err((Column::Label, format!("`{label}` is also the text column")));
    }
    Ok((text.to_string(), label.to_string()))
}

/// Checks a class list as an operator wrote it: at least two classes (a classifier of one class
/// learns nothing), each non-empty, without surrounding spaces, and none twice. The message
/// says what is wrong; the caller names the key.
pub fn check_classes(classes: &[String]) -> Result<(), String> {
    if classes.len() < 2 {
        return Err(format!(
            "{} class(es): a classifier needs at least 2",
            classes.len()
        ));
    }
    for (i, c) in classes.iter().enumerate() {
        if c.is_empty() || c.trim() != c {
            return Err(format!(
                "class #{i} {c:?} is empty or has surrounding spaces"
            ));
        }
        if classes[..i].contains(c) {
            return Err(format!("class {c:?} is listed twice"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_reads_back_from_its_name_and_only_the_own_formats_are_own() {
        for k in DatasetKind::ALL {
            assert_eq!(DatasetKind::parse(k.name()), Some(k));
        }
        assert_eq!(DatasetKind::parse("cifar-10"), None);
        let own: Vec<_> = DatasetKind::ALL
            .into_iter()
            .filter(|k| k.is_own())
            .collect();
        assert_eq!(own.len(), 4);
        assert!(DatasetKind::Jsonl.is_text() && !DatasetKind::Idx.is_text());
        assert_eq!(
            DatasetKind::names(),
            "fashion-mnist, spam-assassin, image-folder, idx, csv or jsonl"
        );
    }

    #[test]
    fn idx_labels_are_found_beside_mnist_named_images_only() {
        assert_eq!(
            idx_labels_beside(Path::new("d/t10k-images-idx3-ubyte.gz")),
            Some(PathBuf::from("d/t10k-labels-idx1-ubyte.gz"))
        );
        assert_eq!(idx_labels_beside(Path::new("d/pictures.idx")), None);
    }

    #[test]
    fn columns_are_for_text_formats_only_and_must_differ() {
        assert_eq!(
            text_columns(DatasetKind::Csv, None, Some("y")),
            Ok(("text".into(), "y".into()))
        );
        assert_eq!(
            text_columns(DatasetKind::ImageFolder, Some("t"), None)
                .unwrap_err()
                .0,
            Column::Text
        );
        assert_eq!(
            text_columns(DatasetKind::Jsonl, Some("a"), Some("a"))
                .unwrap_err()
                .0,
            Column::Label
        );
        assert!(text_columns(DatasetKind::Csv, Some(" "), None).is_err());
    }

    #[test]
    fn a_class_list_needs_two_distinct_trimmed_names() {
        let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_classes(&list(&["cat", "dog"])).is_ok());
        for bad in [
            &["cat"][..],
            &["cat", "cat"],
            &["cat", " dog"],
            &["", "dog"],
        ] {
            assert!(check_classes(&list(bad)).is_err(), "{bad:?}");
        }
    }
}
