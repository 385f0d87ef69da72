//! The embedded MQTT broker: rumqttd in-process, on loopback by default, with packet limits set
//! explicitly (rumqttd's own default payload limit is 20 KB, far below a global adapter).
//!
//! By default anyone who can connect may publish and subscribe anywhere. With an [`Access`]
//! (`[embedded_broker] password_file`, and `acl_file` or the shipped ACL) rumqttd listens on a
//! loopback port of its own and a gate takes the configured address: it checks every login
//! against a Mosquitto password file and every publish and subscription against a Mosquitto
//! ACL, as the shipped `deploy/mosquitto/` broker does, and passes the rest through unchanged.
//! rumqttd 0.20 can check a login but has no topic ACL, hence the gate in front of it rather
//! than a patched rumqttd.
//!
//! - [`passwd`]: the password file (`mosquitto_passwd`'s PBKDF2-SHA512 `$7$` hashes);
//! - [`acl`]: the ACL file (`user`, `topic`, `pattern` lines; `%u`, `%c`);
//! - [`gate`]: what becomes of a CONNECT and of each packet after it (pure);
//! - [`proxy`]: the gate's sockets.

pub mod acl;
pub mod gate;
pub mod passwd;
mod proxy;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

pub use acl::{Acl, FEDPEFT_ACL};
pub use passwd::PasswordFile;

/// Who may use the embedded broker, and for what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// Every client logs in as one of these users.
    pub passwords: PasswordFile,
    /// What each user may publish and subscribe to.
    pub acl: Acl,
}

impl Access {
    /// Reads the password file and the ACL file (default: the shipped fedpeft ACL).
    pub fn read(password_file: &Path, acl_file: Option<&Path>) -> Result<Access, AccessError> {
        Ok(Access {
            passwords: PasswordFile::read(password_file)?,
            acl: match acl_file {
                Some(path) => Acl::read(path)?,
                None => Acl::fedpeft(),
            },
        })
    }

    /// Whether the ACL gives the aggregator, as `user` with `client_id`, what it needs in
    /// `fleet`: subscriptions to what clients send, publishing the announcements and the global
    /// adapter. The message names the first topic it lacks.
    pub fn check_aggregator(&self, user: &str, client_id: &str, fleet: &str) -> Result<(), String> {
        let topic = |kind: &str| format!("{}/{fleet}/{kind}", fedpeft_protocol::topic::ROOT);
        for kind in ["join", "update/+", "status/+", "eval/+"] {
            let filter = topic(kind);
            if !self.acl.may_subscribe(user, client_id, &filter) {
                return Err(format!(
                    "the ACL does not let `{user}` subscribe to `{filter}`"
                ));
            }
        }
        for kind in ["round", "global", "global/0"] {
            let name = topic(kind);
            if !self.acl.may_publish(user, client_id, &name) {
                return Err(format!("the ACL does not let `{user}` publish on `{name}`"));
            }
        }
        Ok(())
    }
}

/// A password or ACL file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}", path = path.display())]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// The broker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("embedded broker: `{host}` is not an IP address")]
    Host { host: String },
    #[error("embedded broker: cannot find a free port on {host}: {source}")]
    Port {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("embedded broker on {addr} did not accept connections within {secs} s")]
    NotListening { addr: SocketAddr, secs: u64 },
    #[error("embedded broker: cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running embedded broker. rumqttd has no stop handle: the broker thread ends with the
/// process.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedBroker {
    pub addr: SocketAddr,
}

/// rumqttd settings for one v4 (MQTT 3.1.1) listener on `addr`.
pub fn broker_config(addr: SocketAddr, max_packet_bytes: usize) -> Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: max_packet_bytes,
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "fedpeft-v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 200,
            // A commit-log segment must hold the largest packet several times over.
            max_segment_size: (max_packet_bytes * 8).max(100 << 20),
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    }
}

/// Starts rumqttd on `host:port` (port 0 = a free port) and waits until it accepts connections.
/// Anyone who can connect may publish and subscribe anywhere: see [`start_with`].
pub fn start(
    host: &str,
    port: u16,
    max_packet_bytes: usize,
) -> Result<EmbeddedBroker, BrokerError> {
    start_with(host, port, max_packet_bytes, None)
}

/// [`start`], and with `access`: clients log in and are held to the ACL. rumqttd then listens
/// on a free loopback port and admits only the gate, which takes `host:port`.
pub fn start_with(
    host: &str,
    port: u16,
    max_packet_bytes: usize,
    access: Option<Access>,
) -> Result<EmbeddedBroker, BrokerError> {
    let ip: IpAddr = host.parse().map_err(|_| BrokerError::Host {
        host: host.to_string(),
    })?;
    let Some(access) = access else {
        let addr = SocketAddr::new(ip, free_port(ip, port)?);
        run_rumqttd(broker_config(addr, max_packet_bytes))?;
        return Ok(EmbeddedBroker { addr });
    };
    let addr = SocketAddr::new(ip, port);
    let listener =
        TcpListener::bind(addr).map_err(|source| BrokerError::Listen { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| BrokerError::Listen { addr, source })?;
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let inner = SocketAddr::new(loopback, free_port(loopback, 0)?);
    let token = random_token().map_err(|source| BrokerError::Listen {
        addr: inner,
        source,
    })?;
    let mut config = broker_config(inner, max_packet_bytes);
    let expected = token.clone();
    for server in config
        .v4
        .iter_mut()
        .flat_map(|servers| servers.values_mut())
    {
        let expected = expected.clone();
        server.set_auth_handler(move |_client, _user, password: String| {
            let ok: bool =
                subtle::ConstantTimeEq::ct_eq(password.as_bytes(), expected.as_bytes()).into();
            std::future::ready(ok)
        });
    }
    run_rumqttd(config)?;
    let gate = proxy::Gate {
        access,
        broker: inner,
        token,
        max_packet_bytes,
    };
    proxy::announce(addr, &gate);
    proxy::spawn(listener, gate).map_err(|source| BrokerError::Listen { addr, source })?;
    Ok(EmbeddedBroker { addr })
}

/// `port`, or (0) a free one: rumqttd binds by itself and does not report the port.
fn free_port(ip: IpAddr, port: u16) -> Result<u16, BrokerError> {
    if port != 0 {
        return Ok(port);
    }
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| BrokerError::Port {
            host: ip.to_string(),
            source,
        })
}

/// The password only the gate knows: 32 random bytes, hex.
fn random_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(hex::encode(bytes))
}

/// Starts rumqttd on a thread of its own and waits until it accepts connections.
fn run_rumqttd(config: Config) -> Result<(), BrokerError> {
    let addr = config
        .v4
        .as_ref()
        .and_then(|servers| servers.values().next())
        .map(|server| server.listen)
        .expect("broker_config sets one v4 listener");
    let mut broker = Broker::new(config);
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|source| BrokerError::Port {
            host: addr.ip().to_string(),
            source,
        })?;
    let start = Instant::now();
    let limit = Duration::from_secs(10);
    while start.elapsed() < limit {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NotListening {
        addr,
        secs: limit.as_secs(),
    })
}
