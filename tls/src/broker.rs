//! What the aggregator and the edge client both need to reach an external broker, read and
//! checked the same way on both ends: its URL, the TLS files that go with it, and where the
//! password comes from. Each error names the config key it is about; the caller wraps it in its
//! own config error.

use std::path::PathBuf;

use crate::TlsFiles;

/// A broker setting that cannot be used: the config key it is under, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingError {
    /// The key, as `broker.url`.
    pub key: &'static str,
    pub message: String,
}

impl SettingError {
    fn new(key: &'static str, message: impl Into<String>) -> SettingError {
        SettingError {
            key,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for SettingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

impl std::error::Error for SettingError {}

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    /// Host name or address (an IPv6 address without its brackets).
    pub host: String,
    pub port: u16,
    /// `mqtts://`: TLS.
    pub tls: bool,
}

impl BrokerAddr {
    /// Parses `mqtt://host[:port]` (port 1883 by default) or `mqtts://host[:port]` (TLS, port
    /// 8883 by default); `tcp://` and `ssl://` are read as their MQTT names, and an IPv6 host is
    /// written in brackets (`mqtt://[::1]:1883`). No path, query or user info: credentials have
    /// keys of their own.
    pub fn parse(url: &str) -> Result<BrokerAddr, SettingError> {
        let bad = |message: String| SettingError::new("broker.url", message);
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad(format!("`{url}` has no scheme; expected mqtt://host:port")))?;
        let tls = match scheme {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            other => {
                return Err(bad(format!(
                    "`{url}`: unknown scheme `{other}`; expected mqtt:// or mqtts://"
                )));
            }
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') || rest.contains('?') || rest.contains('@') {
            return Err(bad(format!(
                "`{url}`: only mqtt://host[:port] is accepted (no path, query or user info)"
            )));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad(format!("`{url}`: unclosed `[` in IPv6 host")))?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(bad(format!("`{url}`: junk after IPv6 host"))),
            };
            (host.to_string(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (rest.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(bad(format!("`{url}`: empty host")));
        }
        let port = match port {
            None if tls => 8883,
            None => 1883,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad(format!("`{url}`: port `{p}` is not in 1..=65535")))?,
        };
        Ok(BrokerAddr { host, port, tls })
    }
}

impl std::fmt::Display for BrokerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// The brokers to connect to, in the order they are tried: one URL, or the nodes of one
/// cluster as a comma-separated list (`mqtt://n1:1883,mqtt://n2:1883`). The first is tried
/// first; a connection that fails or is lost moves on to the next, round-robin. Never empty, no
/// URL twice, and one scheme for all (the TLS files and credentials are one setting for every
/// node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerList(Vec<BrokerAddr>);

impl BrokerList {
    /// Parses `broker.url`: a URL as [`BrokerAddr::parse`] reads it, or several separated by
    /// commas (spaces around them are ignored). A URL has no commas of its own, so the split
    /// is unambiguous.
    pub fn parse(urls: &str) -> Result<BrokerList, SettingError> {
        let bad = |message: String| SettingError::new("broker.url", message);
        let mut list: Vec<BrokerAddr> = Vec::new();
        for (i, url) in urls.split(',').map(str::trim).enumerate() {
            if url.is_empty() {
                return Err(bad(format!(
                    "`{urls}`: entry {} of the list is empty; separate URLs with single commas",
                    i + 1
                )));
            }
            let addr = BrokerAddr::parse(url).map_err(|e| {
                if urls.contains(',') {
                    bad(format!("entry {} of the list: {}", i + 1, e.message))
                } else {
                    e
                }
            })?;
            if let Some(first) = list.first()
                && first.tls != addr.tls
            {
                return Err(bad(format!(
                    "`{urls}` mixes plain and TLS brokers (`{first}` and `{addr}`): every URL \
                     of the list takes the same TLS files, so all are mqtt:// or all mqtts://"
                )));
            }
            if list.contains(&addr) {
                return Err(bad(format!("`{urls}` names `{addr}` twice")));
            }
            list.push(addr);
        }
        Ok(BrokerList(list))
    }

    /// The broker tried first.
    pub fn first(&self) -> &BrokerAddr {
        &self.0[0]
    }

    /// Broker `i` of the list, counting round: `i` past the end starts over.
    pub fn get(&self, i: usize) -> &BrokerAddr {
        &self.0[i % self.0.len()]
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: a list has at least one broker (clippy wants the method beside `len`).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, BrokerAddr> {
        self.0.iter()
    }

    /// `mqtts://`: TLS to every broker of the list.
    pub fn tls(&self) -> bool {
        self.first().tls
    }
}

impl From<BrokerAddr> for BrokerList {
    fn from(addr: BrokerAddr) -> BrokerList {
        BrokerList(vec![addr])
    }
}

/// The list as `broker.url` writes it: the URLs, separated by commas.
impl std::fmt::Display for BrokerList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, addr) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{addr}")?;
        }
        Ok(())
    }
}

/// The TLS files for connections to `brokers`: a CA file is required for `mqtts://` and
/// refused without it, and a client certificate comes with its key. `ca_hint` follows the
/// message when the CA file is missing (as where else it can be given, ` (--ca-file)`).
pub fn tls_files(
    brokers: &BrokerList,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    ca_hint: &str,
) -> Result<Option<TlsFiles>, SettingError> {
    let client_cert = match (client_cert, client_key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => {
            return Err(SettingError::new(
                "broker.client_cert",
                "client_cert and client_key go together",
            ));
        }
    };
    match (brokers.tls(), ca_file) {
        (true, Some(ca_file)) => Ok(Some(TlsFiles {
            ca_file,
            client_cert,
        })),
        (true, None) => Err(SettingError::new(
            "broker.ca_file",
            format!(
                "`{brokers}` is TLS: name the CA certificate (PEM) the broker's certificate \
                 chains to{ca_hint}"
            ),
        )),
        (false, ca) if ca.is_some() || client_cert.is_some() => Err(SettingError::new(
            "broker.ca_file",
            format!("TLS files are set but `{brokers}` is not an mqtts:// URL"),
        )),
        (false, _) => Ok(None),
    }
}

/// Where the broker password comes from: at most one of `inline` (the config text, where a
/// program allows it), a file (its first line) or an environment variable.
pub fn password(
    inline: Option<String>,
    file: Option<PathBuf>,
    env: Option<String>,
) -> Result<Option<String>, SettingError> {
    match (inline, file, env) {
        (None, None, None) => Ok(None),
        (Some(p), None, None) => Ok(Some(p)),
        (None, Some(path), None) => {
            let text = std::fs::read_to_string(&path).map_err(|e| {
                SettingError::new(
                    "broker.password_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            Ok(Some(text.lines().next().unwrap_or("").to_string()))
        }
        (None, None, Some(var)) => std::env::var(&var).map(Some).map_err(|_| {
            SettingError::new(
                "broker.password_env",
                format!("environment variable `{var}` is not set (or not UTF-8)"),
            )
        }),
        (inline, file, env) => {
            let given: Vec<&str> = [
                (inline.is_some(), "password"),
                (file.is_some(), "password_file"),
                (env.is_some(), "password_env"),
            ]
            .into_iter()
            .filter_map(|(set, key)| set.then_some(key))
            .collect();
            Err(SettingError::new(
                if given[0] == "password" {
                    "broker.password"
                } else {
                    "broker.password_file"
                },
                format!(
                    "{} are {} set: set one",
                    given.join(" and "),
                    if given.len() == 2 { "both" } else { "all" }
                ),
            ))
        }
    }
}

/// Username and password together: a password without a username is refused; a username
/// without a password logs in with an empty one.
pub fn credentials(
    username: Option<String>,
    password: Option<String>,
) -> Result<Option<(String, String)>, SettingError> {
    match (username, password) {
        (Some(user), password) => Ok(Some((user, password.unwrap_or_default()))),
        (None, Some(_)) => Err(SettingError::new(
            "broker.username",
            "a password is set but no username",
        )),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_are_parsed_or_refused_naming_the_key() {
        assert_eq!(
            BrokerAddr::parse("mqtt://[::1]:1999").unwrap(),
            BrokerAddr {
                host: "::1".into(),
                port: 1999,
                tls: false,
            }
        );
        assert_eq!(BrokerAddr::parse("tcp://h").unwrap().port, 1883);
        let tls = BrokerAddr::parse("mqtts://h").unwrap();
        assert_eq!((tls.port, tls.tls), (8883, true));
        assert_eq!(tls.to_string(), "mqtts://h:8883");
        assert_eq!(
            BrokerAddr::parse("mqtt://[::1]").unwrap().to_string(),
            "mqtt://[::1]:1883"
        );
        for bad in [
            "http://h",
            "h:1883",
            "mqtt://h:0",
            "mqtt://h:99999",
            "mqtt://:1883",
            "mqtt://h/path",
            "mqtt://user@h",
            "mqtt://[::1",
            "mqtt://[::1]x",
        ] {
            let e = BrokerAddr::parse(bad).unwrap_err();
            assert_eq!(e.key, "broker.url", "{bad}");
            assert!(e.message.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn a_list_of_brokers_shares_one_scheme_and_names_each_broker_once() {
        let one = BrokerList::parse("mqtt://h:1999").unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one.first(), &BrokerAddr::parse("mqtt://h:1999").unwrap());
        let three = BrokerList::parse("mqtt://a:1, tcp://[::1]:2 ,mqtt://c").unwrap();
        assert_eq!(three.to_string(), "mqtt://a:1,mqtt://[::1]:2,mqtt://c:1883");
        assert_eq!(
            three.iter().map(|a| a.port).collect::<Vec<_>>(),
            [1, 2, 1883]
        );
        // Round-robin: past the end starts over.
        assert_eq!(three.get(3), three.first());
        assert_eq!(three.get(4).host, "::1");
        assert!(BrokerList::parse("mqtts://a,ssl://b:8884").unwrap().tls());
        assert_eq!(BrokerList::parse(&three.to_string()).unwrap(), three);
        for (bad, says) in [
            ("", "entry 1 of the list is empty"),
            ("mqtt://a,", "entry 2 of the list is empty"),
            ("mqtt://a,,mqtt://b", "entry 2 of the list is empty"),
            ("mqtt://a,mqtts://b", "mixes plain and TLS"),
            ("mqtts://a,tcp://b", "mixes plain and TLS"),
            ("mqtt://a:1883,mqtt://a", "names `mqtt://a:1883` twice"),
            (
                "mqtt://a,http://b",
                "entry 2 of the list: `http://b`: unknown scheme",
            ),
            (
                "mqtt://a,b:1883",
                "entry 2 of the list: `b:1883` has no scheme",
            ),
        ] {
            let e = BrokerList::parse(bad).unwrap_err();
            assert_eq!(e.key, "broker.url", "{bad}");
            assert!(e.message.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn tls_files_go_with_mqtts_only_and_a_certificate_with_its_key() {
        let tls = BrokerList::parse("mqtts://h").unwrap();
        let plain = BrokerList::parse("mqtt://h").unwrap();
        let p = |s: &str| Some(PathBuf::from(s));
        let files = tls_files(&tls, p("ca"), p("c"), p("k"), "")
            .unwrap()
            .unwrap();
        assert_eq!(files.client_cert, Some(("c".into(), "k".into())));
        assert_eq!(tls_files(&plain, None, None, None, "").unwrap(), None);
        let e = tls_files(&tls, None, None, None, " (--ca-file)").unwrap_err();
        assert_eq!(e.key, "broker.ca_file");
        assert!(e.message.ends_with("chains to (--ca-file)"), "{e}");
        let e = tls_files(&plain, p("ca"), None, None, "").unwrap_err();
        assert!(e.message.contains("not an mqtts:// URL"), "{e}");
        let e = tls_files(&tls, p("ca"), p("c"), None, "").unwrap_err();
        assert_eq!(e.key, "broker.client_cert");
    }

    #[test]
    fn the_password_has_one_source_and_needs_a_username() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\nignored\n").unwrap();
        assert_eq!(
            password(None, Some(file.clone()), None).unwrap().as_deref(),
            Some("s3cret")
        );
        assert_eq!(
            password(Some("x".into()), None, None).unwrap().as_deref(),
            Some("x")
        );
        let e = password(None, Some(file.clone()), Some("V".into())).unwrap_err();
        assert_eq!(e.key, "broker.password_file");
        assert!(e.message.contains("password_file and password_env"), "{e}");
        let e = password(Some("x".into()), Some(file), None).unwrap_err();
        assert_eq!(e.key, "broker.password");
        let e = password(None, None, Some("FEDPEFT_SURELY_UNSET_VAR".into())).unwrap_err();
        assert_eq!(e.key, "broker.password_env");
        let e = password(None, Some(dir.path().join("missing")), None).unwrap_err();
        assert_eq!(e.key, "broker.password_file");
        assert_eq!(
            credentials(Some("u".into()), None).unwrap(),
            Some(("u".into(), String::new()))
        );
        assert_eq!(
            credentials(None, Some("p".into())).unwrap_err().key,
            "broker.username"
        );
    }
}
