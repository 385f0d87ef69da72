//! Mosquitto's ACL file (`acl_file`), the part of its syntax fedpeft ships, so that one file
//! (`deploy/mosquitto/acl`) serves Mosquitto and the embedded broker alike.
//!
//! ```text
//! # a comment                   lines starting with `#`, and blank lines, are skipped
//! user NAME                     the topic lines below apply to NAME (until the next user line)
//! topic [ACCESS] FILTER         ACCESS: read, write, readwrite (the default) or deny
//! pattern [ACCESS] FILTER       applies to every user; `%u` (username) and `%c` (client id)
//!                               stand for whole topic levels
//! ```
//!
//! As in Mosquitto: anything not granted is denied; a `deny` that applies wins over any grant;
//! `topic` lines before the first `user` line are for anonymous clients (which the embedded
//! broker never admits); pattern lines are skipped for a client whose username or client id
//! holds `+`, `#` or `/`, which could otherwise widen a pattern. Any other line is refused
//! naming the file and the line, so a file Mosquitto would read differently never loads.
//!
//! A subscription is granted when one read rule covers every topic its filter can match (so
//! `update/+` needs a rule that reads every client's updates): the check happens once, at
//! SUBSCRIBE, and the broker delivers whatever the filter matches afterwards.

use std::collections::HashMap;
use std::path::Path;

use super::AccessError;

/// What a rule grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Grant {
    fn reads(self) -> bool {
        matches!(self, Grant::Read | Grant::ReadWrite)
    }

    fn writes(self) -> bool {
        matches!(self, Grant::Write | Grant::ReadWrite)
    }
}

/// One `topic` or `pattern` line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    grant: Grant,
    filter: String,
}

/// A parsed ACL file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    /// `topic` lines before any `user` line: anonymous clients only.
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    patterns: Vec<Rule>,
}

/// The ACL shipped in `deploy/mosquitto/acl`, compiled in: the embedded broker's default when
/// it authenticates clients and no `acl_file` is given.
pub const FEDPEFT_ACL: &str = include_str!("../../../deploy/mosquitto/acl");

impl Acl {
    /// The shipped fedpeft ACL ([`FEDPEFT_ACL`]).
    pub fn fedpeft() -> Acl {
        Acl::parse(FEDPEFT_ACL, Path::new("deploy/mosquitto/acl"))
            .expect("the shipped ACL parses (tested)")
    }

    /// Reads and parses an ACL file.
    pub fn read(path: &Path) -> Result<Acl, AccessError> {
        let text = std::fs::read_to_string(path).map_err(|source| AccessError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Acl::parse(&text, path)
    }

    /// Parses ACL text; `path` names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Acl, AccessError> {
        let mut acl = Acl::default();
        let mut user: Option<String> = None;
        for (n, raw) in text.lines().enumerate() {
            let bad = |message: String| AccessError::Line {
                path: path.to_path_buf(),
                line: n + 1,
                message,
            };
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (keyword, rest) = split_word(line);
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        return Err(bad("`user` without a username".into()));
                    }
                    user = Some(rest.to_string());
                    acl.users.entry(rest.to_string()).or_default();
                }
                "topic" | "pattern" => {
                    let rule = parse_rule(rest).map_err(bad)?;
                    let substitutes = rule
                        .filter
                        .split('/')
                        .any(|level| level.contains("%u") || level.contains("%c"));
                    if keyword == "pattern" {
                        if let Some(level) = rule.filter.split('/').find(|level| {
                            (level.contains("%u") || level.contains("%c"))
                                && *level != "%u"
                                && *level != "%c"
                        }) {
                            return Err(bad(format!(
                                "`{level}`: %u and %c must be a whole topic level"
                            )));
                        }
                        acl.patterns.push(rule);
                    } else if substitutes {
                        return Err(bad(format!(
                            "`{}`: %u and %c are substituted in `pattern` lines only",
                            rule.filter
                        )));
                    } else {
                        match &user {
                            Some(u) => acl.users.entry(u.clone()).or_default().push(rule),
                            None => acl.anonymous.push(rule),
                        }
                    }
                }
                other => {
                    return Err(bad(format!(
                        "unknown directive `{other}`: expected user, topic or pattern"
                    )));
                }
            }
        }
        Ok(acl)
    }

    /// Whether `user` (connected as `client_id`) may publish on `topic`.
    pub fn may_publish(&self, user: &str, client_id: &str, topic: &str) -> bool {
        let topic: Vec<&str> = topic.split('/').collect();
        let rules = self.rules_for(user, client_id);
        if rules
            .iter()
            .any(|r| r.grant == Grant::Deny && covers(&levels(&r.filter), &topic))
        {
            return false;
        }
        rules
            .iter()
            .any(|r| r.grant.writes() && covers(&levels(&r.filter), &topic))
    }

    /// Whether `user` (connected as `client_id`) may subscribe to `filter`: one read rule
    /// covers every topic it can match, and no deny rule meets any of them.
    pub fn may_subscribe(&self, user: &str, client_id: &str, filter: &str) -> bool {
        let filter: Vec<&str> = filter.split('/').collect();
        let rules = self.rules_for(user, client_id);
        if rules
            .iter()
            .any(|r| r.grant == Grant::Deny && intersects(&levels(&r.filter), &filter))
        {
            return false;
        }
        rules
            .iter()
            .any(|r| r.grant.reads() && covers(&levels(&r.filter), &filter))
    }

    /// The user's own rules, then the patterns with %u and %c substituted.
    fn rules_for(&self, user: &str, client_id: &str) -> Vec<Rule> {
        let mut rules: Vec<Rule> = self.users.get(user).cloned().unwrap_or_default();
        let dangerous = |s: &str| s.contains(['+', '#', '/']);
        if dangerous(user) || dangerous(client_id) {
            return rules;
        }
        rules.extend(self.patterns.iter().map(|p| {
            Rule {
                grant: p.grant,
                filter: p
                    .filter
                    .split('/')
                    .map(|level| match level {
                        "%u" => user,
                        "%c" => client_id,
                        other => other,
                    })
                    .collect::<Vec<_>>()
                    .join("/"),
            }
        }));
        rules
    }
}

/// The first word of `line` and the rest, with the spaces between them skipped.
fn split_word(line: &str) -> (&str, &str) {
    match line.split_once(char::is_whitespace) {
        Some((word, rest)) => (word, rest.trim_start()),
        None => (line, ""),
    }
}

/// `[ACCESS] FILTER` of a topic or pattern line.
fn parse_rule(rest: &str) -> Result<Rule, String> {
    let (first, after) = split_word(rest);
    let access = match first {
        "read" => Some(Grant::Read),
        "write" => Some(Grant::Write),
        "readwrite" => Some(Grant::ReadWrite),
        "deny" => Some(Grant::Deny),
        _ => None,
    };
    let (grant, filter) = match access {
        Some(grant) if !after.is_empty() => (grant, after),
        Some(_) => return Err(format!("`{first}` without a topic")),
        None if rest.is_empty() => return Err("no topic".into()),
        None if !after.is_empty() => {
            return Err(format!(
                "unknown access `{first}`: expected read, write, readwrite or deny"
            ));
        }
        None => (Grant::ReadWrite, first),
    };
    check_filter(filter)?;
    Ok(Rule {
        grant,
        filter: filter.to_string(),
    })
}

/// Whether `filter` is a valid MQTT topic filter: `+` and `#` only as whole levels, `#` last.
pub fn check_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("empty topic filter".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let wild = level.contains(['+', '#']);
        if wild && *level != "+" && *level != "#" {
            return Err(format!(
                "`{filter}`: a wildcard must be a whole topic level"
            ));
        }
        if *level == "#" && i + 1 != levels.len() {
            return Err(format!("`{filter}`: `#` must be the last level"));
        }
    }
    Ok(())
}

/// Whether `topic` is a valid topic name to publish on: not empty, no wildcards.
pub fn check_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#'])
}

fn levels(filter: &str) -> Vec<&str> {
    filter.split('/').collect()
}

/// Whether every topic `filter` can match is matched by `rule` (for a topic name: whether
/// `rule` matches it). A topic starting with `$` is matched by no wildcard in the first level.
fn covers(rule: &[&str], filter: &[&str]) -> bool {
    if let (Some(r), Some(f)) = (rule.first(), filter.first())
        && (*r == "+" || *r == "#")
        && f.starts_with('$')
    {
        return false;
    }
    covers_from(rule, filter)
}

fn covers_from(rule: &[&str], filter: &[&str]) -> bool {
    match (rule.first(), filter.first()) {
        // `a/#` matches `a` and everything below it.
        (Some(&"#"), _) => true,
        (None, None) => true,
        (None, Some(_)) | (Some(_), None) => false,
        // Nothing but `#` covers a `#`, which matches any depth.
        (Some(_), Some(&"#")) => false,
        (Some(&"+"), Some(_)) => covers_from(&rule[1..], &filter[1..]),
        (Some(_), Some(&"+")) => false,
        (Some(r), Some(f)) => r == f && covers_from(&rule[1..], &filter[1..]),
    }
}

/// Whether some topic is matched by both filters.
fn intersects(a: &[&str], b: &[&str]) -> bool {
    if let (Some(x), Some(y)) = (a.first(), b.first()) {
        let wild = |s: &str| s == "+" || s == "#";
        if (wild(x) && y.starts_with('$')) || (wild(y) && x.starts_with('$')) {
            return false;
        }
    }
    intersects_from(a, b)
}

fn intersects_from(a: &[&str], b: &[&str]) -> bool {
    match (a.first(), b.first()) {
        (Some(&"#"), _) | (_, Some(&"#")) => true,
        (None, None) => true,
        (None, Some(_)) | (Some(_), None) => false,
        (Some(x), Some(y)) => {
            (*x == "+" || *y == "+" || x == y) && intersects_from(&a[1..], &b[1..])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGG: &str = "fedpeft-aggregator";

    fn t(kind: &str) -> String {
        format!("fedpeft/v1/lab/{kind}")
    }

    #[test]
    fn the_shipped_acl_pins_each_client_to_its_own_topics() {
        let acl = Acl::fedpeft();
        for kind in ["join", "update/a", "status/a", "eval/a"] {
            assert!(acl.may_publish("a", "a", &t(kind)), "{kind}");
        }
        for kind in [
            "update/b", "status/b", "eval/b", "round", "global", "global/3",
        ] {
            assert!(!acl.may_publish("a", "a", &t(kind)), "{kind}");
        }
        for filter in ["round", "global/#", "global", "global/2"] {
            assert!(acl.may_subscribe("a", "a", &t(filter)), "{filter}");
        }
        for filter in [
            "update/+", "update/b", "update/a", "#", "+/+", "status/+", "join",
        ] {
            assert!(!acl.may_subscribe("a", "a", &t(filter)), "{filter}");
        }
        assert!(!acl.may_subscribe("a", "a", "#"));
        assert!(!acl.may_subscribe("a", "a", "fedpeft/v1/+/#"));
    }

    #[test]
    fn the_shipped_acl_lets_the_aggregator_read_clients_and_write_the_adapter() {
        let acl = Acl::fedpeft();
        for filter in ["join", "update/+", "status/+", "eval/+", "update/a"] {
            assert!(acl.may_subscribe(AGG, AGG, &t(filter)), "{filter}");
        }
        for kind in ["global", "global/0", "round"] {
            assert!(acl.may_publish(AGG, AGG, &t(kind)), "{kind}");
        }
        assert!(!acl.may_subscribe(AGG, AGG, &t("#")));
        assert!(!acl.may_publish("someone", "x", &t("round")));
    }

    #[test]
    fn dangerous_names_get_no_pattern_rules() {
        let acl = Acl::fedpeft();
        // `+` as a username would otherwise turn `update/%u` into `update/+`.
        assert!(!acl.may_publish("+", "c", &t("update/b")));
        assert!(!acl.may_publish("a", "c/d", &t("update/a")));
        assert!(!acl.may_publish("#", "c", &t("join")));
    }

    #[test]
    fn deny_wins_and_client_ids_substitute() {
        let text = "user boss\ntopic readwrite x/#\ntopic deny x/secret\npattern read in/%c/+\n\
                    pattern write out/%u\n";
        let acl = Acl::parse(text, Path::new("t.acl")).unwrap();
        assert!(acl.may_publish("boss", "c", "x/open"));
        assert!(!acl.may_publish("boss", "c", "x/secret"));
        assert!(!acl.may_subscribe("boss", "c", "x/#"));
        assert!(!acl.may_subscribe("boss", "c", "x/+"));
        assert!(acl.may_subscribe("boss", "c", "x/open/+"));
        assert!(acl.may_subscribe("u", "c9", "in/c9/+"));
        assert!(acl.may_subscribe("u", "c9", "in/c9/z"));
        assert!(!acl.may_subscribe("u", "c9", "in/c9/#"));
        assert!(!acl.may_subscribe("u", "c9", "in/c8/z"));
        assert!(acl.may_publish("u", "c9", "out/u"));
        assert!(!acl.may_publish("u", "c9", "out/v"));
        // Topic lines before any user line are for anonymous clients: nobody we admit.
        let acl = Acl::parse("topic readwrite #\n", Path::new("t.acl")).unwrap();
        assert!(!acl.may_publish("u", "c", "x"));
    }

    #[test]
    fn wildcards_match_as_mqtt_says() {
        let l = |s| levels(s);
        assert!(covers(&l("a/#"), &l("a")));
        assert!(covers(&l("a/#"), &l("a/#")));
        assert!(covers(&l("a/+/c"), &l("a/+/c")));
        assert!(!covers(&l("a/+"), &l("a/#")));
        assert!(!covers(&l("a/b"), &l("a/b/#")));
        assert!(!covers(&l("a/b"), &l("a/+")));
        assert!(!covers(&l("#"), &l("$SYS/x")));
        assert!(covers(&l("$SYS/#"), &l("$SYS/x")));
        assert!(intersects(&l("a/+"), &l("a/b")));
        assert!(intersects(&l("a/#"), &l("a")));
        assert!(intersects(&l("a"), &l("a/#")));
        assert!(!intersects(&l("a/+"), &l("a")));
        assert!(!intersects(&l("a/b"), &l("a/c")));
        assert!(!intersects(&l("+/x"), &l("$SYS/x")));
    }

    #[test]
    fn a_line_mosquitto_would_read_otherwise_is_refused_naming_file_and_line() {
        for (text, line, word) in [
            ("user a\ntopci read x\n", 2, "topci"),
            ("topic maybe x/y\n", 1, "maybe"),
            ("\n\ntopic write\n", 3, "without a topic"),
            ("user\n", 1, "username"),
            ("topic read a/b#\n", 1, "whole topic level"),
            ("topic read a/#/b\n", 1, "last level"),
            ("pattern write update/x%u\n", 1, "whole topic level"),
            ("user a\ntopic write update/%u\n", 2, "pattern"),
        ] {
            let err = Acl::parse(text, Path::new("etc/acl"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("etc/acl:{line}:")) && err.contains(word),
                "{text:?}: {err}"
            );
        }
        // Spacing, comments and CRLF are read as Mosquitto reads them.
        let acl = Acl::parse(
            "# c\r\n\r\nuser  agg\r\ntopic   read  a/+\r\n",
            Path::new("x"),
        )
        .unwrap();
        assert!(acl.may_subscribe("agg", "c", "a/+"));
    }
}
