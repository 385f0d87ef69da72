//! The book's reference pages (`docs/src/reference/`) against the shipped files and the real
//! parsers, so the documentation of every file format stays honest:
//!
//! - every key of every shipped config, trial and sweep file appears in the key table of its
//!   page, under the heading that names its TOML table;
//! - every documented key, with the example value its page gives, parses with the real parser
//!   (which refuses unknown keys), and so do the pages' annotated example files;
//! - every refusal reason the aggregator counts has a row on the refusal page, and every flag
//!   of the edge client is on the command-line page;
//! - every relative link in the book and the README points at a file (and heading) that exists.
//!
//! A key table is a markdown table whose header starts `| key | example |`, under a heading that
//! names its TOML table in backticks (`` `[broker]` ``, `` `[[extra]]` ``, or
//! `` `[links.profiles.NAME]` ``, where an all-capitals segment stands for any name) or reads
//! "Top-level keys". Its first column is the key in backticks, its second an example value in
//! TOML, in backticks. A heading with the word "variant" holds keys that exclude the table's
//! other keys: they are parsed in a document of their own, with the `key = value` the heading
//! gives in backticks. An example file is a ```` ```toml ```` block right after a
//! `<!-- parsed: KIND -->` line. Parsing only: no model is loaded.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// The real parsers, in one place: the file types of `fedpeft-config`, the fleet's trial and
// sweep parsers, and the report schema's refusal reasons.

/// The aggregator's config file, as `aggregator --config` reads it (unknown keys refused).
fn parse_aggregator(text: &str) -> Result<(), String> {
    fedpeft_config::aggregator::AggregatorFile::parse(text, Path::new("aggregator.toml"))
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The edge client's config file, as `edge-client --config` reads it (unknown keys refused).
fn parse_edge(text: &str) -> Result<(), String> {
    fedpeft_config::edge::EdgeFile::parse(text, Path::new("edge.toml"))
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A trial file, parsed and validated as `fedpeft-fleet run` does before its preflight.
fn parse_trial(text: &str) -> Result<(), String> {
    fedpeft_fleet::Trial::parse(text, Path::new("trial.toml"))
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A sweep file, expanded and every trial validated, as `fedpeft-fleet sweep` does.
fn parse_sweep(text: &str) -> Result<(), String> {
    fedpeft_fleet::sweep::Sweep::parse(text)
        .map(drop)
        .map_err(|e| format!("{e:#}"))
}

/// The report keys of every reason the aggregator refuses a message for.
fn refusal_reasons() -> Vec<&'static str> {
    fedpeft_config::report::RejectReason::ALL
        .iter()
        .map(|r| r.as_str())
        .collect()
}

/// The long flags of `edge-client`.
fn edge_flags() -> Vec<String> {
    use clap::CommandFactory;
    fedpeft_edge::config::Cli::command()
        .get_arguments()
        .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
        .collect()
}

// ---------------------------------------------------------------------------------------------

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn book_src() -> PathBuf {
    root().join("docs/src")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The file formats, each with its reference page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Aggregator,
    Edge,
    Trial,
    Sweep,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Aggregator, Kind::Edge, Kind::Trial, Kind::Sweep];

    fn page(self) -> &'static str {
        match self {
            Kind::Aggregator => "reference/aggregator-config.md",
            Kind::Edge => "reference/edge-config.md",
            Kind::Trial => "reference/trial-file.md",
            Kind::Sweep => "reference/sweep-file.md",
        }
    }

    fn marker(self) -> &'static str {
        match self {
            Kind::Aggregator => "aggregator",
            Kind::Edge => "edge",
            Kind::Trial => "trial",
            Kind::Sweep => "sweep",
        }
    }

    fn parse(self, text: &str) -> Result<(), String> {
        match self {
            Kind::Aggregator => parse_aggregator(text),
            Kind::Edge => parse_edge(text),
            Kind::Trial => parse_trial(text),
            Kind::Sweep => parse_sweep(text),
        }
    }
}

/// Which format a shipped `*.toml` file (path relative to the repository) is in: `Ok(None)` for
/// files that are not fedpeft's (cargo's, the book's, the fuzzers', test fixtures).
fn classify(path: &str) -> Result<Option<Kind>, String> {
    let name = path.rsplit('/').next().unwrap_or(path);
    let not_ours = matches!(
        name,
        "Cargo.toml" | "book.toml" | "rust-toolchain.toml" | "rust-toolchain"
    ) || path.starts_with("fuzz/")
        || path == "cross/config.toml" // cargo's `--config` file for the board targets
        || path.ends_with(".cargo/config.toml")
        || path.contains("/tests/")
        || path.contains("fixtures/");
    if not_ours {
        return Ok(None);
    }
    let kind = if path.starts_with("trials/") {
        Kind::Trial
    } else if path.starts_with("sweeps/") {
        Kind::Sweep
    } else if path.starts_with("aggregator/configs/") {
        Kind::Aggregator
    } else if path.starts_with("edge-client/configs/")
        || ((path.starts_with("cross/") || path.starts_with("deploy/")) && name.starts_with("edge"))
    {
        Kind::Edge
    } else {
        return Err(format!(
            "{path}: a shipped TOML file this test does not know: tell `classify` in \
             tests/tests/book.rs which reference page documents it"
        ));
    };
    Ok(Some(kind))
}

/// The repository's `*.toml` files, from git (or, without git, by walking the tree).
fn shipped_toml_files() -> Vec<String> {
    let out = std::process::Command::new("git")
        .args(["ls-files", "-z", "--", "*.toml"])
        .current_dir(root())
        .output();
    if let Ok(out) = out
        && out.status.success()
    {
        return String::from_utf8_lossy(&out.stdout)
            .split('\0')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
    }
    let mut files = Vec::new();
    walk(&root(), &mut files);
    files
}

fn walk(dir: &Path, files: &mut Vec<String>) {
    const SKIP: [&str; 9] = [
        ".git",
        "target",
        "book",
        "runs",
        "data",
        "dist",
        "build",
        "node_modules",
        "corpus",
    ];
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if path.is_dir() {
            if !SKIP.contains(&name.as_str()) && !name.starts_with(".venv") {
                walk(&path, files);
            }
        } else if name.ends_with(".toml") {
            let rel = path.strip_prefix(root()).unwrap_or(&path);
            files.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading a reference page.

#[derive(Debug, Clone)]
struct Row {
    key: String,
    example: String,
    line: usize,
}

/// The key table(s) under one heading.
#[derive(Debug, Clone)]
struct Group {
    /// Dotted TOML table path; "" for the top level.
    table: String,
    /// `[[table]]`: an array of tables.
    array: bool,
    /// A variant: its keys exclude the table's other keys.
    variant: bool,
    /// The `key = value` a variant heading gives.
    assignment: Option<String>,
    rows: Vec<Row>,
    line: usize,
}

#[derive(Debug)]
struct Page {
    path: PathBuf,
    groups: Vec<Group>,
    /// `(kind marker, TOML text)` of the annotated example files.
    examples: Vec<(String, String)>,
}

/// Backticked spans of a line, in order.
fn code_spans(line: &str) -> Vec<&str> {
    line.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s)
        .collect()
}

/// Table cells of a markdown table line.
fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split('|').map(|c| c.trim().to_string()).collect()
}

fn unquote(cell: &str) -> Option<String> {
    cell.strip_prefix('`')?
        .strip_suffix('`')
        .map(str::to_string)
}

fn parse_page(path: &Path) -> Page {
    let text = read(path);
    let mut groups: Vec<Group> = Vec::new();
    let mut current: Option<usize> = None;
    let mut examples = Vec::new();
    let mut in_fence = false;
    let mut fence_kind: Option<String> = None;
    let mut fence_text = String::new();
    let mut pending_marker: Option<String> = None;
    let mut in_key_table = false;
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") {
            if in_fence {
                if let Some(kind) = fence_kind.take() {
                    examples.push((kind, std::mem::take(&mut fence_text)));
                }
                in_fence = false;
            } else {
                in_fence = true;
                if trimmed.trim_start_matches('`').trim() == "toml" {
                    fence_kind = pending_marker.take();
                }
            }
            continue;
        }
        if in_fence {
            if fence_kind.is_some() {
                fence_text.push_str(line);
                fence_text.push('\n');
            }
            continue;
        }
        if let Some(kind) = trimmed
            .strip_prefix("<!-- parsed:")
            .and_then(|s| s.strip_suffix("-->"))
        {
            pending_marker = Some(kind.trim().to_string());
            continue;
        }
        if trimmed.starts_with('#') {
            in_key_table = false;
            current = None;
            let spans = code_spans(trimmed);
            let table = spans.iter().find_map(|s| {
                if let Some(t) = s.strip_prefix("[[").and_then(|s| s.strip_suffix("]]")) {
                    Some((t.to_string(), true))
                } else {
                    s.strip_prefix('[')
                        .and_then(|s| s.strip_suffix(']'))
                        .map(|t| (t.to_string(), false))
                }
            });
            let table = table.or_else(|| {
                trimmed
                    .to_lowercase()
                    .contains("top-level keys")
                    .then(|| (String::new(), false))
            });
            if let Some((table, array)) = table {
                let variant = trimmed.to_lowercase().contains("variant");
                let assignment = if variant {
                    spans
                        .iter()
                        .find(|s| s.contains(" = "))
                        .map(|s| s.to_string())
                } else {
                    None
                };
                groups.push(Group {
                    table,
                    array,
                    variant,
                    assignment,
                    rows: Vec::new(),
                    line: n,
                });
                current = Some(groups.len() - 1);
            }
            continue;
        }
        if !trimmed.starts_with('|') {
            in_key_table = false;
            continue;
        }
        let c = cells(trimmed);
        if c.first().map(String::as_str) == Some("key")
            && c.get(1).map(String::as_str) == Some("example")
        {
            assert!(
                current.is_some(),
                "{}:{n}: a key table under a heading that names no TOML table",
                path.display()
            );
            in_key_table = true;
            continue;
        }
        if !in_key_table
            || c.iter()
                .all(|c| c.chars().all(|ch| matches!(ch, '-' | ':')))
        {
            continue;
        }
        let (Some(key), Some(example)) = (
            c.first().and_then(|k| unquote(k)),
            c.get(1).and_then(|e| unquote(e)),
        ) else {
            panic!(
                "{}:{n}: a key table row needs the key and an example value, each in backticks: {line}",
                path.display()
            );
        };
        groups[current.expect("in a key table")].rows.push(Row {
            key,
            example,
            line: n,
        });
    }
    Page {
        path: path.to_path_buf(),
        groups,
        examples,
    }
}

/// Whether a table pattern segment is a placeholder for any name (all capitals: `NAME`).
fn is_placeholder(segment: &str) -> bool {
    !segment.is_empty() && segment.chars().all(|c| c.is_ascii_uppercase() || c == '_')
}

/// Whether a table pattern segment matches a TOML key.
fn segment_matches(pattern: &str, key: &str) -> bool {
    pattern == key || is_placeholder(pattern)
}

fn segments(path: &str) -> Vec<&str> {
    if path.is_empty() {
        Vec::new()
    } else {
        path.split('.').collect()
    }
}

impl Page {
    fn name(&self) -> String {
        self.path
            .strip_prefix(root())
            .unwrap_or(&self.path)
            .display()
            .to_string()
    }

    fn groups_for<'a>(&'a self, table: &'a str) -> impl Iterator<Item = &'a Group> + 'a {
        self.groups.iter().filter(move |g| {
            let (p, t) = (segments(&g.table), segments(table));
            p.len() == t.len() && p.iter().zip(&t).all(|(p, t)| segment_matches(p, t))
        })
    }

    /// Whether `path` is a documented table, or a table that holds one.
    fn is_table(&self, path: &str) -> bool {
        let t = segments(path);
        self.groups.iter().any(|g| {
            let p = segments(&g.table);
            p.len() >= t.len() && p.iter().zip(&t).all(|(p, t)| segment_matches(p, t))
        })
    }

    /// Whether `key` is documented in the table `table`.
    fn documents(&self, table: &str, key: &str) -> bool {
        self.groups_for(table).any(|g| {
            g.rows.iter().any(|r| r.key == key)
                || g.assignment
                    .as_deref()
                    .and_then(|a| a.split(" = ").next())
                    .is_some_and(|k| k.trim() == key)
        })
    }

    fn has_heading(&self, table: &str) -> bool {
        self.groups.iter().any(|g| g.table == table)
    }
}

// ---------------------------------------------------------------------------------------------
// Shipped files against the pages.

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Every key of `table` (at `prefix`) must be documented on `page`; records what is not.
fn check_table(
    page: &Page,
    table: &toml::Table,
    prefix: &str,
    shown: &str,
    errors: &mut Vec<String>,
) {
    for (key, value) in table {
        let path = join(prefix, key);
        if let toml::Value::Table(inner) = value
            && page.is_table(&path)
        {
            check_table(page, inner, &path, &join(shown, key), errors);
        } else if !page.documents(prefix, key) {
            errors.push(format!(
                "`{}` is not documented in {} (no row `{key}` under the heading of `[{prefix}]`)",
                join(shown, key),
                page.name()
            ));
        }
    }
}

/// A dotted trial field, as a sweep's `[grid]` and `[[extra]]` write it.
fn check_dotted(page: &Page, dotted: &str, shown: &str, errors: &mut Vec<String>) {
    let parts: Vec<&str> = dotted.split('.').collect();
    let (last, tables) = parts.split_last().expect("split gives one part at least");
    let mut prefix = String::new();
    for t in tables {
        let next = join(&prefix, t);
        if !page.is_table(&next) {
            errors.push(format!(
                "`{shown}`: `{next}` is not a documented table of {}",
                page.name()
            ));
            return;
        }
        prefix = next;
    }
    if !page.documents(&prefix, last) {
        errors.push(format!("`{shown}` is not documented in {}", page.name()));
    }
}

fn pages() -> BTreeMap<Kind, Page> {
    Kind::ALL
        .iter()
        .map(|&k| (k, parse_page(&book_src().join(k.page()))))
        .collect()
}

fn check_file(kind: Kind, file: &str, pages: &BTreeMap<Kind, Page>, errors: &mut Vec<String>) {
    let text = read(&root().join(file));
    let doc: toml::Table = match toml::from_str(&text) {
        Ok(d) => d,
        Err(e) => {
            errors.push(format!("{file}: not TOML: {e}"));
            return;
        }
    };
    let mut errs = Vec::new();
    match kind {
        Kind::Sweep => {
            let (sweep, trial) = (&pages[&Kind::Sweep], &pages[&Kind::Trial]);
            for (key, value) in &doc {
                match (key.as_str(), value) {
                    ("base", toml::Value::Table(base)) => {
                        check_table(trial, base, "", "base", &mut errs)
                    }
                    ("grid", toml::Value::Table(grid)) => {
                        for field in grid.keys() {
                            check_dotted(trial, field, &format!("grid.\"{field}\""), &mut errs);
                        }
                    }
                    ("extra", toml::Value::Array(extras)) => {
                        for (i, e) in extras.iter().enumerate() {
                            let Some(e) = e.as_table() else { continue };
                            for field in e.keys() {
                                if sweep.documents("extra", field) {
                                    continue;
                                }
                                check_dotted(
                                    trial,
                                    field,
                                    &format!("extra[{i}].\"{field}\""),
                                    &mut errs,
                                );
                            }
                        }
                    }
                    _ if sweep.documents("", key) => {}
                    _ => errs.push(format!("`{key}` is not documented in {}", sweep.name())),
                }
            }
        }
        _ => check_table(&pages[&kind], &doc, "", "", &mut errs),
    }
    errors.extend(errs.into_iter().map(|e| format!("{file}: {e}")));
}

#[test]
fn every_key_of_every_shipped_file_is_documented() {
    let pages = pages();
    let mut errors = Vec::new();
    let mut checked: BTreeMap<Kind, Vec<String>> = BTreeMap::new();
    for file in shipped_toml_files() {
        match classify(&file) {
            Ok(None) => {}
            Ok(Some(kind)) => {
                check_file(kind, &file, &pages, &mut errors);
                checked.entry(kind).or_default().push(file);
            }
            Err(e) => errors.push(e),
        }
    }
    assert!(
        errors.is_empty(),
        "undocumented keys:\n{}",
        errors.join("\n")
    );
    // The classification must keep finding the files it is there for.
    for kind in Kind::ALL {
        assert!(
            checked.get(&kind).is_some_and(|f| !f.is_empty()),
            "no shipped {kind:?} file found: {checked:?}"
        );
    }
    assert!(
        checked[&Kind::Trial]
            .iter()
            .any(|f| f == "trials/quickstart.toml"),
        "{checked:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Documented keys against the parsers.

/// Sets `key = example` (one TOML value) in the table at `table`, creating tables on the way;
/// an all-capitals segment becomes its lower-case self (`NAME` → `name`).
fn set(doc: &mut toml::Table, table: &str, array: bool, key: &str, example: &str, at: &str) {
    let value: toml::Table = toml::from_str(&format!("{key} = {example}"))
        .unwrap_or_else(|e| panic!("{at}: `{key} = {example}` is not TOML: {e}"));
    let mut t = doc;
    for seg in segments(table) {
        let seg = if is_placeholder(seg) {
            seg.to_lowercase()
        } else {
            seg.to_string()
        };
        let entry = t.entry(seg).or_insert_with(|| {
            if array {
                toml::Value::Array(vec![toml::Value::Table(toml::Table::new())])
            } else {
                toml::Value::Table(toml::Table::new())
            }
        });
        t = match entry {
            toml::Value::Table(t) => t,
            toml::Value::Array(a) => a
                .last_mut()
                .and_then(toml::Value::as_table_mut)
                .unwrap_or_else(|| panic!("{at}: `{table}` is not an array of tables")),
            _ => panic!("{at}: `{table}` is a value, not a table"),
        };
    }
    t.extend(value);
}

fn table_at<'a>(doc: &'a mut toml::Table, table: &str) -> Option<&'a mut toml::Table> {
    let mut t = doc;
    for seg in segments(table) {
        t = t.get_mut(seg)?.as_table_mut()?;
    }
    Some(t)
}

/// The page's keys with their examples, one document without the variants, and one per variant
/// (the main document with the variant's table's own keys replaced by the variant's).
fn documents(page: &Page) -> Vec<(String, toml::Table)> {
    let mut main = toml::Table::new();
    for g in page.groups.iter().filter(|g| !g.variant) {
        for r in &g.rows {
            let at = format!("{}:{}", page.name(), r.line);
            set(&mut main, &g.table, g.array, &r.key, &r.example, &at);
        }
    }
    let mut docs = vec![("all keys but the variants'".to_string(), main.clone())];
    for g in page.groups.iter().filter(|g| g.variant) {
        let mut doc = main.clone();
        let own: Vec<&str> = page
            .groups
            .iter()
            .filter(|o| !o.variant && o.table == g.table)
            .flat_map(|o| o.rows.iter().map(|r| r.key.as_str()))
            .collect();
        if let Some(t) = table_at(&mut doc, &g.table) {
            for k in own {
                t.remove(k);
            }
        }
        let at = format!("{}:{}", page.name(), g.line);
        if let Some(a) = &g.assignment {
            let (k, v) = a.split_once(" = ").expect("an assignment");
            set(&mut doc, &g.table, g.array, k.trim(), v.trim(), &at);
        }
        for r in &g.rows {
            let at = format!("{}:{}", page.name(), r.line);
            set(&mut doc, &g.table, g.array, &r.key, &r.example, &at);
        }
        docs.push((format!("the variant at line {}", g.line), doc));
    }
    docs
}

#[test]
fn every_documented_key_parses_with_its_example_value() {
    let pages = pages();
    let mut errors = Vec::new();
    for (&kind, page) in &pages {
        assert!(
            page.groups.iter().any(|g| !g.rows.is_empty()),
            "{}: no key tables found",
            page.name()
        );
        let docs = match kind {
            Kind::Sweep => {
                // name, a [base] that is the trial page's document without `name`, one extra.
                let trial = &pages[&Kind::Trial];
                for t in ["base", "grid", "extra"] {
                    assert!(
                        page.has_heading(t),
                        "{}: no heading for `[{t}]`",
                        page.name()
                    );
                }
                let mut base = documents(trial).remove(0).1;
                base.remove("name");
                documents(page)
                    .into_iter()
                    .map(|(what, mut doc)| {
                        doc.insert("base".into(), toml::Value::Table(base.clone()));
                        (what, doc)
                    })
                    .collect()
            }
            _ => documents(page),
        };
        for (what, doc) in docs {
            let text = toml::to_string(&doc).expect("a TOML table serialises");
            if let Err(e) = kind.parse(&text) {
                errors.push(format!(
                    "{} ({what}) does not parse:\n{e}\n--- the document:\n{text}",
                    page.name()
                ));
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n\n"));
}

#[test]
fn the_example_files_in_the_book_parse() {
    let mut seen = BTreeSet::new();
    for kind in Kind::ALL {
        let page = parse_page(&book_src().join(kind.page()));
        for (marker, text) in &page.examples {
            let kind = Kind::ALL
                .into_iter()
                .find(|k| k.marker() == marker)
                .unwrap_or_else(|| panic!("{}: unknown example kind `{marker}`", page.name()));
            if let Err(e) = kind.parse(text) {
                panic!(
                    "{}: the {marker} example does not parse: {e}\n{text}",
                    page.name()
                );
            }
            seen.insert(kind);
        }
    }
    assert_eq!(
        seen.len(),
        Kind::ALL.len(),
        "an example per format: {seen:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Refusal reasons and flags.

#[test]
fn every_refusal_reason_has_a_row() {
    let page = read(&book_src().join("reference/refusals.md"));
    let documented: BTreeSet<String> = page
        .lines()
        .filter(|l| l.trim_start().starts_with('|'))
        .filter_map(|l| cells(l).first().and_then(|c| unquote(c)))
        .collect();
    let reasons: BTreeSet<String> = refusal_reasons().into_iter().map(String::from).collect();
    let missing: Vec<_> = reasons.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&reasons).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "reference/refusals.md: missing {missing:?}, not a reason {extra:?}"
    );
}

#[test]
fn every_edge_client_flag_is_on_the_command_line_page() {
    let page = read(&book_src().join("reference/cli.md"));
    let missing: Vec<String> = edge_flags()
        .into_iter()
        .filter(|f| f != "--help" && f != "--version")
        .filter(|f| {
            !page.match_indices(f.as_str()).any(|(i, _)| {
                !page[i + f.len()..].starts_with(|c: char| c == '-' || c.is_alphanumeric())
            })
        })
        .collect();
    assert!(missing.is_empty(), "reference/cli.md lacks {missing:?}");
}

// ---------------------------------------------------------------------------------------------
// Links.

/// mdbook's id for a heading: its text lower-cased, spaces to `-`, only letters, digits, `_`
/// and `-` kept.
fn heading_id(text: &str) -> String {
    text.chars()
        .filter_map(|c| {
            if c.is_alphanumeric() || c == '_' || c == '-' {
                Some(c.to_lowercase().next().unwrap_or(c))
            } else if c.is_whitespace() {
                Some('-')
            } else {
                None
            }
        })
        .collect()
}

/// The heading ids of a markdown file (and of the files it `{{#include}}`s).
fn anchors(path: &Path) -> BTreeSet<String> {
    let text = read(path);
    let mut ids = BTreeSet::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut lines: Vec<String> = Vec::new();
    for line in text.lines() {
        if let Some(inc) = line
            .trim()
            .strip_prefix("{{#include ")
            .and_then(|s| s.strip_suffix("}}"))
        {
            let inc = path.parent().expect("a page's folder").join(inc.trim());
            lines.extend(read(&inc).lines().map(str::to_string));
        } else {
            lines.push(line.to_string());
        }
    }
    let mut in_fence = false;
    for line in &lines {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence || !line.starts_with('#') {
            continue;
        }
        let text = line.trim_start_matches('#').trim();
        // Rendered text: code spans and emphasis marks dropped, links reduced to their text.
        let mut plain = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '`' | '*' => {}
                '[' => {}
                ']' if chars.peek() == Some(&'(') => {
                    for c in chars.by_ref() {
                        if c == ')' {
                            break;
                        }
                    }
                }
                c => plain.push(c),
            }
        }
        let id = heading_id(&plain);
        let n = counts.entry(id.clone()).or_default();
        ids.insert(if *n == 0 {
            id.clone()
        } else {
            format!("{id}-{n}")
        });
        *n += 1;
    }
    ids
}

/// Markdown link targets of a file, outside code: `](target)`.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_fence = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        // Drop inline code spans.
        let prose: String = line
            .split('`')
            .enumerate()
            .filter(|(i, _)| i % 2 == 0)
            .map(|(_, s)| s)
            .collect();
        let mut rest = prose.as_str();
        while let Some(i) = rest.find("](") {
            rest = &rest[i + 2..];
            if let Some(end) = rest.find(')') {
                out.push(rest[..end].to_string());
                rest = &rest[end..];
            }
        }
    }
    out
}

fn markdown_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("a readable folder").flatten() {
        let p = e.path();
        if p.is_dir() {
            markdown_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "md") {
            out.push(p);
        }
    }
}

#[test]
fn every_relative_link_in_the_book_and_the_readme_resolves() {
    let mut files = vec![root().join("README.md")];
    markdown_files(&book_src(), &mut files);
    let summary = read(&book_src().join("SUMMARY.md"));
    let mut errors = Vec::new();
    for file in &files {
        for target in links(&read(file)) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, fragment) = match target.split_once('#') {
                Some((p, f)) => (p, Some(f)),
                None => (target.as_str(), None),
            };
            let resolved = if path.is_empty() {
                file.clone()
            } else {
                file.parent().expect("a file's folder").join(path)
            };
            if !resolved.exists() {
                errors.push(format!("{}: `{target}` does not exist", file.display()));
                continue;
            }
            if let Some(f) = fragment
                && resolved.extension().is_some_and(|x| x == "md")
                && !anchors(&resolved).contains(f)
            {
                errors.push(format!(
                    "{}: `{target}`: no heading with id `{f}` in {}",
                    file.display(),
                    resolved.display()
                ));
            }
        }
    }
    // Every page is in the book.
    for file in files.iter().filter(|f| f.starts_with(book_src())) {
        let rel = file
            .strip_prefix(book_src())
            .expect("under docs/src")
            .to_string_lossy()
            .replace('\\', "/");
        if rel != "SUMMARY.md" && !summary.contains(&format!("({rel})")) {
            errors.push(format!("docs/src/{rel} is not in SUMMARY.md"));
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}
