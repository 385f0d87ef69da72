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

/// The TLS files for a connection to `addr`: a CA file is required for `mqtts://` and refused
/// without it, and a client certificate comes with its key. `ca_hint` follows the message when
/// the CA file is missing (as where else it can be given, ` (--ca-file)`).
pub fn tls_files(
    addr: &BrokerAddr,
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
    match (addr.tls, ca_file) {
        (true, Some(ca_file)) => Ok(Some(TlsFiles {
            ca_file,
            client_cert,
        })),
        (true, None) => Err(SettingError::new(
            "broker.ca_file",
            format!(
                "`{addr}` is TLS: name the CA certificate (PEM) the broker's certificate chains \
                 to{ca_hint}"
            ),
        )),
        (false, ca) if ca.is_some() || client_cert.is_some() => Err(SettingError::new(
            "broker.ca_file",
            format!("TLS files are set but `{addr}` is not an mqtts:// URL"),
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
    fn tls_files_go_with_mqtts_only_and_a_certificate_with_its_key() {
        let tls = BrokerAddr::parse("mqtts://h").unwrap();
        let plain = BrokerAddr::parse("mqtt://h").unwrap();
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
