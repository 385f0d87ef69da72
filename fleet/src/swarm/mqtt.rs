//! The swarm's MQTT 3.1.1 sessions at the socket level: a TCP connection from a chosen source
//! address, packets framed and parsed by rumqttc's codec (`rumqttc::mqttbytes::v4`, the code
//! rumqttc itself runs), one writer task per session that also sends the keep-alive pings.
//!
//! Not rumqttc's `EventLoop`: that owns its socket (no source address to bind, so no way past
//! one loopback address's ephemeral ports) and keeps buffers sized for one busy client, where
//! the swarm needs ten thousand idle ones.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, LastWill, Packet, PubAck, Publish};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
}

/// Parses `mqtt://host[:port]` (`tcp://` is read as `mqtt://`; port 1883 by default; an IPv6
/// host in brackets) or a bare `host:port`. TLS (`mqtts://`) is refused: the swarm measures
/// the broker and the aggregator, not TLS handshakes.
pub fn parse_broker(url: &str) -> anyhow::Result<BrokerUrl> {
    let rest = if let Some(r) = url.strip_prefix("mqtt://").or(url.strip_prefix("tcp://")) {
        r
    } else if url.starts_with("mqtts://") || url.starts_with("ssl://") {
        bail!("--broker {url}: the swarm speaks plain MQTT only (mqtt://host:port)");
    } else if url.contains("://") {
        bail!("--broker {url}: expected mqtt://host[:port]");
    } else {
        url
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') || rest.contains('@') {
        bail!("--broker {url}: expected mqtt://host[:port] (no user, path or query)");
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, tail) = v6
            .split_once(']')
            .with_context(|| format!("--broker {url}: unclosed `[`"))?;
        let port = match tail.strip_prefix(':') {
            Some(p) => Some(p),
            None if tail.is_empty() => None,
            None => bail!("--broker {url}: unexpected `{tail}` after the IPv6 address"),
        };
        (h.to_string(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (rest.to_string(), None),
        }
    };
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .with_context(|| format!("--broker {url}: `{p}` is not a port"))?,
        None => 1883,
    };
    if host.is_empty() {
        bail!("--broker {url}: no host");
    }
    Ok(BrokerUrl { host, port })
}

/// Resolves the broker's address once (every session connects to the same one).
pub async fn resolve(url: &BrokerUrl) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .with_context(|| format!("resolving {}:{}", url.host, url.port))?
        .next()
        .with_context(|| format!("{} has no address", url.host))
}

/// Opens a TCP connection to `broker`, from `bind` (port chosen by the kernel) when given.
pub async fn dial(
    broker: SocketAddr,
    bind: Option<IpAddr>,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let socket = if broker.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = bind {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = tokio::time::timeout(timeout, socket.connect(broker))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Checks that every address in `binds` can be bound here (a clear error before ten thousand
/// sessions fail one by one).
pub fn check_binds(binds: &[IpAddr], broker: SocketAddr) -> anyhow::Result<()> {
    for ip in binds {
        if ip.is_ipv4() != broker.is_ipv4() {
            bail!("--bind {ip}: the broker's address {broker} is of the other IP version");
        }
        std::net::TcpListener::bind(SocketAddr::new(*ip, 0)).with_context(|| {
            format!(
                "--bind {ip}: not an address of this machine (on Linux every 127.x.y.z is \
                 loopback; others need `ip addr add`)"
            )
        })?;
    }
    Ok(())
}

/// The bytes of one packet.
pub fn frame(packet: &Packet) -> Bytes {
    let mut buf = BytesMut::with_capacity(packet.size());
    // Writing fails only for a packet id of 0 or sizes MQTT cannot frame; the callers build
    // neither (their publishes are under the packet limit).
    let _ = packet.write(&mut buf, usize::MAX);
    buf.freeze()
}

/// CONNECT: client id, keep-alive, session kind and the last will (Status offline, retained,
/// QoS 1), as the edge client sends it.
pub fn connect(
    client_id: &str,
    keep_alive: Duration,
    clean_session: bool,
    will_topic: &str,
    will: &[u8],
) -> Bytes {
    let mut c = Connect::new(client_id);
    c.keep_alive = keep_alive.as_secs().clamp(5, u64::from(u16::MAX)) as u16;
    c.clean_session = clean_session;
    c.last_will = Some(LastWill::new(
        will_topic,
        will.to_vec(),
        QoS::AtLeastOnce,
        true,
    ));
    frame(&Packet::Connect(c))
}

/// A QoS 1 PUBLISH.
pub fn publish(topic: &str, payload: Bytes, retain: bool, pkid: u16) -> Bytes {
    let mut p = Publish::from_bytes(topic, QoS::AtLeastOnce, payload);
    p.retain = retain;
    p.pkid = pkid;
    frame(&Packet::Publish(p))
}

/// PUBACK for an incoming QoS 1 publish.
pub fn puback(pkid: u16) -> Bytes {
    frame(&Packet::PubAck(PubAck::new(pkid)))
}

/// What a session hands its writer task.
#[derive(Debug)]
pub enum Out {
    Frame(Bytes),
    /// Send DISCONNECT and close the socket (after everything queued before it).
    Disconnect,
}

/// Writes queued frames in order; sends PINGREQ when nothing was written for half the
/// keep-alive. Ends when the channel closes, on DISCONNECT, or when the socket fails.
pub async fn writer(
    mut w: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Out>,
    keep_alive: Duration,
) {
    let idle = (keep_alive / 2).max(Duration::from_secs(1));
    let ping = frame(&Packet::PingReq);
    loop {
        let frame = match tokio::time::timeout(idle, rx.recv()).await {
            Ok(Some(Out::Frame(b))) => b,
            Ok(Some(Out::Disconnect)) => {
                let _ = w.write_all(&frame(&Packet::Disconnect)).await;
                let _ = w.shutdown().await;
                return;
            }
            Ok(None) => return,
            Err(_) => ping.clone(),
        };
        if w.write_all(&frame).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse_like_the_aggregators() {
        let p = |s| parse_broker(s).map(|b| (b.host, b.port));
        assert_eq!(
            p("mqtt://127.0.0.1:1884").unwrap(),
            ("127.0.0.1".into(), 1884)
        );
        assert_eq!(p("tcp://broker").unwrap(), ("broker".into(), 1883));
        assert_eq!(p("localhost:99").unwrap(), ("localhost".into(), 99));
        assert_eq!(p("mqtt://[::1]:7").unwrap(), ("::1".into(), 7));
        for bad in [
            "mqtts://h:1",
            "http://h",
            "mqtt://h:0",
            "mqtt://h:x",
            "mqtt://u@h",
            "mqtt://h/p",
            "",
        ] {
            assert!(parse_broker(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn frames_parse_back_with_rumqttcs_reader() {
        let bytes = publish("a/b", Bytes::from_static(b"xyz"), true, 7);
        let mut buf = BytesMut::from(&bytes[..]);
        match Packet::read(&mut buf, 1024).unwrap() {
            Packet::Publish(p) => {
                assert_eq!((p.topic.as_str(), p.pkid, p.retain), ("a/b", 7, true));
                assert_eq!(&p.payload[..], b"xyz");
            }
            other => panic!("{other:?}"),
        }
        let c = connect("c1", Duration::from_secs(60), false, "w", b"will");
        let mut buf = BytesMut::from(&c[..]);
        match Packet::read(&mut buf, 1024).unwrap() {
            Packet::Connect(c) => {
                assert_eq!(
                    (c.client_id.as_str(), c.keep_alive, c.clean_session),
                    ("c1", 60, false)
                );
                let will = c.last_will.unwrap();
                assert!(will.retain);
                assert_eq!(&will.message[..], b"will");
            }
            other => panic!("{other:?}"),
        }
    }
}
