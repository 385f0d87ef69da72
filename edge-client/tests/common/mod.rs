//! What the edge client's broker tests share: a free loopback port and an in-process rumqttd.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts rumqttd on 127.0.0.1:`port` in a background thread (it lives until the test process
/// exits) and waits up to `patience` until it accepts connections. A client that connects must
/// send its CONNECT within `connect_timeout` (generous under qemu).
pub fn start_broker(port: u16, connect_timeout: Duration, patience: Duration) {
    let listen: SocketAddr = ([127, 0, 0, 1], port).into();
    let server = rumqttd::ServerSettings {
        name: "v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: connect_timeout.as_millis() as u16,
            max_payload_size: 1 << 20,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 64,
            max_outgoing_packet_count: 200,
            max_segment_size: 1 << 20,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some(HashMap::from([("v4".to_string(), server)])),
        ..Default::default()
    };
    std::thread::spawn(move || {
        let _ = rumqttd::Broker::new(config).start();
    });
    let start = Instant::now();
    while TcpStream::connect(listen).is_err() {
        assert!(
            start.elapsed() < patience,
            "rumqttd did not listen on {listen}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
