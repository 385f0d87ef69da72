//! The embedded MQTT broker: rumqttd in-process, on loopback by default, with packet limits set
//! explicitly (rumqttd's own default payload limit is 20 KB, far below a global adapter).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

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
pub fn start(
    host: &str,
    port: u16,
    max_packet_bytes: usize,
) -> Result<EmbeddedBroker, BrokerError> {
    let ip: std::net::IpAddr = host.parse().map_err(|_| BrokerError::Host {
        host: host.to_string(),
    })?;
    let port = if port == 0 {
        // rumqttd binds by itself and does not report the port: find a free one first.
        TcpListener::bind((ip, 0))
            .and_then(|l| l.local_addr())
            .map_err(|source| BrokerError::Port {
                host: host.to_string(),
                source,
            })?
            .port()
    } else {
        port
    };
    let addr = SocketAddr::new(ip, port);
    let mut broker = Broker::new(broker_config(addr, max_packet_bytes));
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|source| BrokerError::Port {
            host: host.to_string(),
            source,
        })?;
    let start = Instant::now();
    let limit = Duration::from_secs(10);
    while start.elapsed() < limit {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(EmbeddedBroker { addr });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NotListening {
        addr,
        secs: limit.as_secs(),
    })
}
