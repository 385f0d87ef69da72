//! The gate's rules, apart from its sockets: what becomes of a client's CONNECT, and of every
//! packet the client sends after it. [`super::proxy`] moves the bytes; everything decided here
//! is a pure function of the packet, the [`Access`] and the connection's [`Session`].
//!
//! - CONNECT: the username and password must verify against the password file, and a last
//!   will must be a topic the user may write; else CONNACK 4 (bad username or password) or 5
//!   (not authorised) and the connection closes. An admitted CONNECT goes on to rumqttd
//!   rewritten in two ways: the password becomes the broker's per-process token (rumqttd
//!   listens on loopback only and admits nobody without it), and a non-empty client id is
//!   prefixed with its username, so that no user can take over another user's session (and
//!   with it the subscriptions that session was granted).
//! - PUBLISH on a topic the user may not write: kept from the broker, and answered as the
//!   broker would have (QoS 1: PUBACK; QoS 2: PUBREC, then PUBCOMP for its PUBREL), so the
//!   client's session goes on; the caller logs it.
//! - SUBSCRIBE with a filter the user may not read: kept from the broker whole, and answered
//!   with SUBACK failure (0x80) for every filter, so no client is ever half-subscribed.
//! - Anything else passes unchanged, byte for byte.

use std::collections::HashSet;
use std::fmt;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Login, Packet, PubAck, PubComp, PubRec, PubRel, Publish,
    SubAck, Subscribe, SubscribeReasonCode,
};
use rumqttc::mqttbytes::{self, FixedHeader, PacketType, Protocol, QoS};

use super::Access;
use super::acl::{check_filter, check_topic};

/// A client's bytes that are not MQTT 3.1.1 as the gate reads it: the connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("malformed {kind:?} packet: {source}")]
    Malformed {
        kind: PacketType,
        #[source]
        source: mqttbytes::Error,
    },
    #[error("the first packet is {0:?}, not CONNECT")]
    NotConnect(PacketType),
    #[error("a second CONNECT")]
    SecondConnect,
    #[error("PUBLISH on `{0}`: not a valid topic name")]
    BadTopic(String),
    #[error("SUBSCRIBE to `{filter}`: {message}")]
    BadFilter { filter: String, message: String },
}

/// Why a CONNECT was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not MQTT 3.1.1 (the only protocol the embedded broker speaks).
    Protocol,
    /// No username, an unknown one, or the wrong password.
    BadLogin,
    /// The last will is on a topic the user may not publish on.
    WillDenied { topic: String },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Protocol => f.write_str("not MQTT 3.1.1"),
            Refusal::BadLogin => f.write_str("unknown user or wrong password"),
            Refusal::WillDenied { topic } => {
                write!(
                    f,
                    "last will on `{topic}`, which the ACL does not let it publish on"
                )
            }
        }
    }
}

/// The outcome of a CONNECT.
#[derive(Debug)]
pub enum Admission {
    /// Connect to the broker and send it `upstream` (the rewritten CONNECT).
    Admitted { session: Session, upstream: Bytes },
    /// Send `connack` to the client and close.
    Refused {
        connack: Bytes,
        refusal: Refusal,
        client_id: String,
        user: Option<String>,
    },
}

/// An admitted connection: who it is, and the QoS 2 publishes it had refused.
#[derive(Debug)]
pub struct Session {
    /// The username it authenticated as.
    pub user: String,
    /// The client id it gave (not the prefixed one the broker sees).
    pub client_id: String,
    /// Packet ids of refused QoS 2 publishes whose PUBREL the gate answers itself.
    refused_qos2: HashSet<u16>,
}

/// What a refused packet was, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    Publish { topic: String },
    Subscribe { filters: Vec<String> },
}

/// What to do with one packet from an admitted client.
#[derive(Debug, PartialEq, Eq)]
pub enum Judged {
    /// Pass it to the broker unchanged.
    Forward,
    /// Keep it from the broker; send `reply` (if any) to the client; log `denied`.
    Deny {
        reply: Option<Bytes>,
        denied: Denied,
    },
    /// Keep it from the broker and send this to the client (PUBCOMP for a refused QoS 2).
    Answer(Bytes),
}

/// The client id the broker sees for `client_id` logged in as `user`: unique per user, so two
/// users never share a session. The length prefix keeps `a:b` + `c` apart from `a` + `b:c`.
pub fn broker_client_id(user: &str, client_id: &str) -> String {
    if client_id.is_empty() {
        // rumqttd refuses an empty id with a persistent session and handles a clean one.
        return String::new();
    }
    format!("{}:{user}:{client_id}", user.len())
}

/// Decides on a client's first packet. `token` is the password rumqttd admits.
pub fn admit(
    access: &Access,
    header: FixedHeader,
    frame: Bytes,
    token: &str,
) -> Result<Admission, GateError> {
    let kind = packet_type(&header)?;
    if kind != PacketType::Connect {
        return Err(GateError::NotConnect(kind));
    }
    let connect =
        Connect::read(header, frame).map_err(|source| GateError::Malformed { kind, source })?;
    let refuse = |code, refusal, user: Option<&str>| Admission::Refused {
        connack: encode(Packet::ConnAck(ConnAck::new(code, false))),
        refusal,
        client_id: connect.client_id.clone(),
        user: user.map(str::to_string),
    };
    if connect.protocol != Protocol::V4 {
        return Ok(refuse(
            ConnectReturnCode::RefusedProtocolVersion,
            Refusal::Protocol,
            None,
        ));
    }
    let user = match &connect.login {
        Some(login)
            if access
                .passwords
                .verify(&login.username, login.password.as_bytes()) =>
        {
            login.username.clone()
        }
        login => {
            return Ok(refuse(
                ConnectReturnCode::BadUserNamePassword,
                Refusal::BadLogin,
                login.as_ref().map(|l| l.username.as_str()),
            ));
        }
    };
    if let Some(will) = &connect.last_will
        && !(check_topic(&will.topic)
            && access
                .acl
                .may_publish(&user, &connect.client_id, &will.topic))
    {
        return Ok(refuse(
            ConnectReturnCode::NotAuthorized,
            Refusal::WillDenied {
                topic: will.topic.clone(),
            },
            Some(&user),
        ));
    }
    let mut upstream = connect.clone();
    upstream.client_id = broker_client_id(&user, &connect.client_id);
    upstream.login = Some(Login {
        username: user.clone(),
        password: token.to_string(),
    });
    Ok(Admission::Admitted {
        session: Session {
            user,
            client_id: connect.client_id,
            refused_qos2: HashSet::new(),
        },
        upstream: encode(Packet::Connect(upstream)),
    })
}

impl Session {
    /// Decides on one packet (`frame`: its whole bytes, `header` its fixed header).
    pub fn judge(
        &mut self,
        access: &Access,
        header: FixedHeader,
        frame: Bytes,
    ) -> Result<Judged, GateError> {
        let kind = packet_type(&header)?;
        let malformed = |source| GateError::Malformed { kind, source };
        match kind {
            PacketType::Connect => Err(GateError::SecondConnect),
            PacketType::Publish => {
                let publish = Publish::read(header, frame).map_err(malformed)?;
                if !check_topic(&publish.topic) {
                    return Err(GateError::BadTopic(publish.topic));
                }
                if access
                    .acl
                    .may_publish(&self.user, &self.client_id, &publish.topic)
                {
                    return Ok(Judged::Forward);
                }
                let reply = match publish.qos {
                    QoS::AtMostOnce => None,
                    QoS::AtLeastOnce => Some(encode(Packet::PubAck(PubAck::new(publish.pkid)))),
                    QoS::ExactlyOnce => {
                        self.refused_qos2.insert(publish.pkid);
                        Some(encode(Packet::PubRec(PubRec::new(publish.pkid))))
                    }
                };
                Ok(Judged::Deny {
                    reply,
                    denied: Denied::Publish {
                        topic: publish.topic,
                    },
                })
            }
            PacketType::PubRel => {
                let pubrel = PubRel::read(header, frame).map_err(malformed)?;
                if self.refused_qos2.remove(&pubrel.pkid) {
                    Ok(Judged::Answer(encode(Packet::PubComp(PubComp::new(
                        pubrel.pkid,
                    )))))
                } else {
                    Ok(Judged::Forward)
                }
            }
            PacketType::Subscribe => {
                let subscribe = Subscribe::read(header, frame).map_err(malformed)?;
                for f in &subscribe.filters {
                    check_filter(&f.path).map_err(|message| GateError::BadFilter {
                        filter: f.path.clone(),
                        message,
                    })?;
                }
                if subscribe.filters.iter().all(|f| {
                    access
                        .acl
                        .may_subscribe(&self.user, &self.client_id, &f.path)
                }) {
                    return Ok(Judged::Forward);
                }
                let codes = vec![SubscribeReasonCode::Failure; subscribe.filters.len()];
                Ok(Judged::Deny {
                    reply: Some(encode(Packet::SubAck(SubAck::new(subscribe.pkid, codes)))),
                    denied: Denied::Subscribe {
                        filters: subscribe.filters.into_iter().map(|f| f.path).collect(),
                    },
                })
            }
            _ => Ok(Judged::Forward),
        }
    }
}

fn packet_type(header: &FixedHeader) -> Result<PacketType, GateError> {
    header.packet_type().map_err(|source| GateError::Malformed {
        kind: PacketType::Connect,
        source,
    })
}

/// A packet the gate writes itself (small: acknowledgements and the rewritten CONNECT).
fn encode(packet: Packet) -> Bytes {
    let mut buf = BytesMut::with_capacity(packet.size());
    packet
        .write(&mut buf, usize::MAX)
        .expect("a CONNECT or an acknowledgement always encodes");
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{Acl, PasswordFile};
    use rumqttc::mqttbytes::v4::{LastWill, PubRel};
    use std::path::Path;

    /// `mosquitto_passwd -U` of `a:pw-a` (Mosquitto 2.0.11).
    const PASSWD: &str = "\
a:$7$101$KAxb8yh5b9eoru1F$pIkusLvP6z+IR60YR4GNfpeKpuGIi25OqeEOXf4glEDR5XDT5HKnlnJJagU9D2NTj7831AMleVQ8H6U+xfdnVA==
";

    fn access() -> Access {
        Access {
            passwords: PasswordFile::parse(PASSWD, Path::new("passwd")).unwrap(),
            acl: Acl::fedpeft(),
        }
    }

    fn frame(packet: Packet) -> (FixedHeader, Bytes) {
        let mut buf = BytesMut::from(&encode(packet)[..]);
        let header = mqttbytes::check(buf.iter(), 1 << 20).unwrap();
        (header, buf.split_to(header.frame_length()).freeze())
    }

    fn connect(user: &str, password: &str, will: Option<&str>) -> (FixedHeader, Bytes) {
        let mut c = Connect::new("a");
        c.set_login(user, password);
        c.last_will = will.map(|t| LastWill::new(t, "offline", QoS::AtLeastOnce, true));
        frame(Packet::Connect(c))
    }

    fn admitted(user: &str, password: &str) -> (Session, Connect) {
        let (h, f) = connect(user, password, Some("fedpeft/v1/lab/status/a"));
        match admit(&access(), h, f, "tok").unwrap() {
            Admission::Admitted { session, upstream } => {
                let mut buf = BytesMut::from(&upstream[..]);
                let Packet::Connect(c) = Packet::read(&mut buf, 1 << 20).unwrap() else {
                    panic!("not a CONNECT")
                };
                (session, c)
            }
            other => panic!("{other:?}"),
        }
    }

    fn code(admission: Admission) -> (ConnectReturnCode, Refusal) {
        let Admission::Refused {
            connack, refusal, ..
        } = admission
        else {
            panic!("admitted")
        };
        let mut buf = BytesMut::from(&connack[..]);
        let Packet::ConnAck(ack) = Packet::read(&mut buf, 64).unwrap() else {
            panic!("not a CONNACK")
        };
        (ack.code, refusal)
    }

    #[test]
    fn a_verified_login_reaches_the_broker_with_its_token_and_a_per_user_client_id() {
        let (session, upstream) = admitted("a", "pw-a");
        assert_eq!(
            (session.user.as_str(), session.client_id.as_str()),
            ("a", "a")
        );
        assert_eq!(upstream.client_id, "1:a:a");
        assert_eq!(
            upstream.login,
            Some(Login {
                username: "a".into(),
                password: "tok".into()
            })
        );
        assert_eq!(upstream.last_will.unwrap().topic, "fedpeft/v1/lab/status/a");
        assert_ne!(broker_client_id("a:b", "c"), broker_client_id("a", "b:c"));
    }

    #[test]
    fn a_bad_login_or_a_will_on_someone_elses_topic_is_refused_at_connect() {
        let a = access();
        for (user, pw) in [("a", "nope"), ("b", "pw-a"), ("", "")] {
            let (h, f) = connect(user, pw, None);
            assert_eq!(
                code(admit(&a, h, f, "t").unwrap()),
                (ConnectReturnCode::BadUserNamePassword, Refusal::BadLogin)
            );
        }
        let (h, f) = frame(Packet::Connect(Connect::new("a")));
        assert_eq!(
            code(admit(&a, h, f, "t").unwrap()).0,
            ConnectReturnCode::BadUserNamePassword
        );
        let (h, f) = connect("a", "pw-a", Some("fedpeft/v1/lab/status/b"));
        assert_eq!(
            code(admit(&a, h, f, "t").unwrap()).0,
            ConnectReturnCode::NotAuthorized
        );
        let (h, f) = frame(Packet::PingReq);
        assert!(matches!(
            admit(&a, h, f, "t"),
            Err(GateError::NotConnect(_))
        ));
    }

    #[test]
    fn a_publish_outside_the_acl_is_acknowledged_and_kept_from_the_broker() {
        let a = access();
        let (mut s, _) = admitted("a", "pw-a");
        let publish = |topic: &str, qos, pkid| {
            let mut p = Publish::new(topic, qos, vec![1, 2, 3]);
            p.pkid = pkid;
            frame(Packet::Publish(p))
        };
        let (h, f) = publish("fedpeft/v1/lab/update/a", QoS::AtLeastOnce, 7);
        assert_eq!(s.judge(&a, h, f).unwrap(), Judged::Forward);
        let (h, f) = publish("fedpeft/v1/lab/update/b", QoS::AtLeastOnce, 8);
        assert_eq!(
            s.judge(&a, h, f).unwrap(),
            Judged::Deny {
                reply: Some(encode(Packet::PubAck(PubAck::new(8)))),
                denied: Denied::Publish {
                    topic: "fedpeft/v1/lab/update/b".into()
                }
            }
        );
        let (h, f) = publish("fedpeft/v1/lab/round", QoS::AtMostOnce, 0);
        assert!(matches!(
            s.judge(&a, h, f).unwrap(),
            Judged::Deny { reply: None, .. }
        ));
        // QoS 2: PUBREC now, PUBCOMP for its PUBREL; another PUBREL is the broker's.
        let (h, f) = publish("fedpeft/v1/lab/global", QoS::ExactlyOnce, 9);
        assert!(matches!(
            s.judge(&a, h, f).unwrap(),
            Judged::Deny { reply: Some(_), .. }
        ));
        let (h, f) = frame(Packet::PubRel(PubRel::new(9)));
        assert_eq!(
            s.judge(&a, h, f).unwrap(),
            Judged::Answer(encode(Packet::PubComp(PubComp::new(9))))
        );
        let (h, f) = frame(Packet::PubRel(PubRel::new(9)));
        assert_eq!(s.judge(&a, h, f).unwrap(), Judged::Forward);
        let (h, f) = publish("fedpeft/v1/lab/update/+", QoS::AtLeastOnce, 3);
        assert!(matches!(s.judge(&a, h, f), Err(GateError::BadTopic(_))));
        let (h, f) = connect("a", "pw-a", None);
        assert!(matches!(s.judge(&a, h, f), Err(GateError::SecondConnect)));
    }

    #[test]
    fn a_subscribe_with_any_filter_outside_the_acl_fails_whole() {
        let a = access();
        let (mut s, _) = admitted("a", "pw-a");
        let subscribe = |filters: &[&str]| {
            let mut sub = Subscribe::new_many(
                filters
                    .iter()
                    .map(|f| rumqttc::SubscribeFilter::new(f.to_string(), QoS::AtLeastOnce)),
            );
            sub.pkid = 5;
            frame(Packet::Subscribe(sub))
        };
        let (h, f) = subscribe(&["fedpeft/v1/lab/round", "fedpeft/v1/lab/global/#"]);
        assert_eq!(s.judge(&a, h, f).unwrap(), Judged::Forward);
        let (h, f) = subscribe(&["fedpeft/v1/lab/round", "fedpeft/v1/lab/update/+"]);
        let Judged::Deny {
            reply: Some(reply),
            denied,
        } = s.judge(&a, h, f).unwrap()
        else {
            panic!("allowed")
        };
        assert_eq!(
            reply,
            encode(Packet::SubAck(SubAck::new(
                5,
                vec![SubscribeReasonCode::Failure; 2]
            )))
        );
        assert_eq!(&reply[..], &[0x90, 4, 0, 5, 0x80, 0x80]);
        assert!(matches!(denied, Denied::Subscribe { filters } if filters.len() == 2));
        let (h, f) = subscribe(&["fedpeft/v1/lab/global#"]);
        assert!(matches!(
            s.judge(&a, h, f),
            Err(GateError::BadFilter { .. })
        ));
    }
}
