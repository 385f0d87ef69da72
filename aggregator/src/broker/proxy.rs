//! The gate's sockets: it listens where the embedded broker was configured to, and for each
//! client opens a connection to rumqttd on loopback once [`gate::admit`] has let the CONNECT
//! through. Two tasks per client:
//!
//! - client → broker: reads whole packets (the size limit is checked on the fixed header,
//!   before anything is buffered), asks the [`gate::Session`] and forwards, drops or answers;
//! - broker → client: copies the broker's packets to the client, whole.
//!
//! Both write to the client through one lock, a whole packet at a time, so an answer of the
//! gate's own never lands inside one of the broker's packets. Either side closing closes both.
//! The gate runs on a thread of its own with a single-threaded tokio runtime, as rumqttd does,
//! so the embedded broker needs nothing from its caller's runtime.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self, FixedHeader};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use super::Access;
use super::gate::{self, Admission, Denied, GateError, Judged, Session};

/// How long a new connection may take to send its CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// MQTT's largest remaining length: the limit on what the broker sends (it is trusted; what it
/// sends is no larger than what it accepted).
const MQTT_MAX_REMAINING: usize = 268_435_455;

/// What the gate needs for every connection.
#[derive(Debug)]
pub struct Gate {
    pub access: Access,
    /// rumqttd's loopback listener.
    pub broker: SocketAddr,
    /// The password rumqttd admits (see [`gate`]).
    pub token: String,
    /// Largest remaining length of a client's packet.
    pub max_packet_bytes: usize,
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Frame(mqttbytes::Error),
    #[error("connection closed inside a packet")]
    Truncated,
    #[error(transparent)]
    Gate(#[from] GateError),
}

/// Serves `listener` on a thread of its own until the process ends.
pub fn spawn(listener: std::net::TcpListener, gate: Gate) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("fedpeft-gate".into())
        .spawn(move || runtime.block_on(accept(listener, Arc::new(gate))))?;
    Ok(())
}

async fn accept(listener: std::net::TcpListener, gate: Arc<Gate>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "embedded broker: the gate cannot listen");
            return;
        }
    };
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let gate = gate.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve(stream, peer, &gate).await {
                        warn!(%peer, error = %e, "embedded broker: connection closed");
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                warn!(error = %e, "embedded broker: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One client, from its CONNECT to the end of the connection.
async fn serve(client: TcpStream, peer: SocketAddr, gate: &Arc<Gate>) -> Result<(), LinkError> {
    client.set_nodelay(true)?;
    let (mut from_client, mut to_client) = client.into_split();
    let mut buf = BytesMut::with_capacity(4096);
    let first = tokio::time::timeout(
        CONNECT_TIMEOUT,
        read_frame(&mut from_client, &mut buf, gate.max_packet_bytes),
    )
    .await;
    let Some((header, frame)) = (match first {
        Ok(read) => read?,
        Err(_) => {
            debug!(%peer, "embedded broker: no CONNECT in time");
            None
        }
    }) else {
        return Ok(());
    };
    // A PBKDF2 hash per login: off the runtime's only thread.
    let shared = gate.clone();
    let admission = tokio::task::spawn_blocking(move || {
        gate::admit(&shared.access, header, frame, &shared.token)
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))??;
    let (mut session, upstream) = match admission {
        Admission::Admitted { session, upstream } => (session, upstream),
        Admission::Refused {
            connack,
            refusal,
            client_id,
            user,
        } => {
            warn!(%peer, client = %client_id, user = %user.as_deref().unwrap_or("-"), reason = %refusal,
                  "embedded broker: connection refused");
            to_client.write_all(&connack).await?;
            let _ = to_client.shutdown().await;
            return Ok(());
        }
    };
    debug!(%peer, client = %session.client_id, user = %session.user, "embedded broker: client admitted");
    let broker = TcpStream::connect(gate.broker).await?;
    broker.set_nodelay(true)?;
    let (from_broker, mut to_broker) = broker.into_split();
    to_broker.write_all(&upstream).await?;
    let to_client = Arc::new(Mutex::new(to_client));
    let mut down = tokio::spawn(broker_to_client(from_broker, to_client.clone()));
    let up = client_to_broker(from_client, buf, to_broker, &to_client, &mut session, gate);
    let outcome = tokio::select! {
        r = up => r,
        r = &mut down => r.unwrap_or(Ok(())),
    };
    down.abort();
    let _ = to_client.lock().await.shutdown().await;
    match outcome {
        Err(LinkError::Gate(e)) => {
            warn!(client = %session.client_id, user = %session.user, error = %e,
                  "embedded broker: protocol error; connection closed");
            Ok(())
        }
        other => other,
    }
}

/// Client → broker, packet by packet through the session's rules, until the client closes.
async fn client_to_broker(
    mut from_client: tokio::net::tcp::OwnedReadHalf,
    mut buf: BytesMut,
    mut to_broker: OwnedWriteHalf,
    to_client: &Mutex<OwnedWriteHalf>,
    session: &mut Session,
    gate: &Gate,
) -> Result<(), LinkError> {
    while let Some((header, frame)) =
        read_frame(&mut from_client, &mut buf, gate.max_packet_bytes).await?
    {
        match session.judge(&gate.access, header, frame.clone())? {
            Judged::Forward => to_broker.write_all(&frame).await?,
            Judged::Deny { reply, denied } => {
                match &denied {
                    Denied::Publish { topic } => warn!(
                        client = %session.client_id, user = %session.user, %topic,
                        "embedded broker: publish denied by the ACL; dropped"
                    ),
                    Denied::Subscribe { filters } => warn!(
                        client = %session.client_id, user = %session.user, filters = %filters.join(" "),
                        "embedded broker: subscription denied by the ACL"
                    ),
                }
                if let Some(reply) = reply {
                    to_client.lock().await.write_all(&reply).await?;
                }
            }
            Judged::Answer(reply) => to_client.lock().await.write_all(&reply).await?,
        }
    }
    let _ = to_broker.shutdown().await;
    Ok(())
}

/// Broker → client, whole packets, until the broker closes.
async fn broker_to_client(
    mut from_broker: tokio::net::tcp::OwnedReadHalf,
    to_client: Arc<Mutex<OwnedWriteHalf>>,
) -> Result<(), LinkError> {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    while let Some((_, first)) = read_frame(&mut from_broker, &mut buf, MQTT_MAX_REMAINING).await? {
        let mut out = to_client.lock().await;
        out.write_all(&first).await?;
        // Whatever else already arrived whole goes out under the same lock.
        while let Ok(header) = mqttbytes::check(buf.iter(), MQTT_MAX_REMAINING) {
            let frame = buf.split_to(header.frame_length());
            out.write_all(&frame).await?;
        }
    }
    Ok(())
}

/// The next whole packet: its fixed header and its bytes; `None` when the peer closed between
/// packets. A packet whose remaining length is over `max` is refused on its fixed header.
async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<(FixedHeader, Bytes)>, LinkError> {
    loop {
        match mqttbytes::check(buf.iter(), max) {
            Ok(header) => {
                return Ok(Some((header, buf.split_to(header.frame_length()).freeze())));
            }
            Err(mqttbytes::Error::InsufficientBytes(more)) => {
                buf.reserve(more);
                if r.read_buf(buf).await? == 0 {
                    return if buf.is_empty() {
                        Ok(None)
                    } else {
                        Err(LinkError::Truncated)
                    };
                }
            }
            Err(e) => return Err(LinkError::Frame(e)),
        }
    }
}

/// Logs that the gate is on, once.
pub fn announce(addr: SocketAddr, gate: &Gate) {
    info!(%addr, users = gate.access.passwords.len(),
          "embedded broker: logins checked against the password file, topics against the ACL");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_packet_over_the_limit_is_refused_on_its_fixed_header_before_it_is_buffered() {
        let (mut client, mut gate_side) = tokio::io::duplex(64);
        // PUBLISH announcing 2 MiB; only the fixed header and a few bytes are ever sent, so a
        // reader that waited for the whole packet would hang here.
        client
            .write_all(&[0x32, 0x80, 0x80, 0x80, 0x01, 0, 1, b't'])
            .await
            .unwrap();
        let mut buf = BytesMut::new();
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            read_frame(&mut gate_side, &mut buf, 1 << 20),
        )
        .await
        .expect("refused without waiting for the rest");
        assert!(
            matches!(
                read,
                Err(LinkError::Frame(mqttbytes::Error::PayloadSizeLimitExceeded(n))) if n == 2 << 20
            ),
            "{read:?}"
        );
        assert!(buf.capacity() < 4096, "buffered {} bytes", buf.capacity());
    }

    #[tokio::test]
    async fn whole_packets_are_read_across_reads_and_a_close_between_packets_ends_cleanly() {
        let (mut client, mut gate_side) = tokio::io::duplex(4);
        let writer = tokio::spawn(async move {
            // PINGREQ, then a PUBACK for packet 7, in 4-byte pieces; then close.
            client
                .write_all(&[0xc0, 0x00, 0x40, 0x02, 0x00, 0x07])
                .await
                .unwrap();
        });
        let mut buf = BytesMut::new();
        let (_, ping) = read_frame(&mut gate_side, &mut buf, 1024)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&ping[..], &[0xc0, 0x00]);
        let (_, ack) = read_frame(&mut gate_side, &mut buf, 1024)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&ack[..], &[0x40, 0x02, 0x00, 0x07]);
        writer.await.unwrap();
        assert!(
            read_frame(&mut gate_side, &mut buf, 1024)
                .await
                .unwrap()
                .is_none()
        );
    }
}
