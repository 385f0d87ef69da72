//! MQTT topic names, built and parsed in one place.
//!
//! ```text
//! fedpeft/v1/{fleet}/global            GlobalAdapter          QoS 1, retained
//! fedpeft/v1/{fleet}/global/{n}        chunk n of it          QoS 1, retained
//! fedpeft/v1/{fleet}/round             RoundAnnounce          QoS 1, retained
//! fedpeft/v1/{fleet}/join              Join                   QoS 1
//! fedpeft/v1/{fleet}/update/{client}   ClientUpdate, chunks   QoS 1
//! fedpeft/v1/{fleet}/status/{client}   Status (+ last will)   QoS 1, retained
//! fedpeft/v1/{fleet}/eval/{client}     EvalResult             QoS 1
//! fedpeft/v1/{fleet}/secagg            SecAggRoster, SecAggUnmask   QoS 1, retained
//! fedpeft/v1/{fleet}/inbox/{client}    SecAggRelay            QoS 1
//! ```
//! One topic per client for updates and status lets a broker ACL pin each client to its own.
//! A chunked global adapter goes to numbered retained sub-topics because MQTT retains only the
//! last message per topic; a client subscribes to `global/#`, which matches both forms.

use core::fmt::{self, Write};

use crate::ids::{ClientId, FleetName, IdError};

/// Topic prefix up to the fleet.
pub const ROOT: &str = "fedpeft/v1";

/// Longest topic this module builds: root, fleet, the longest kind and a client id.
pub const MAX_TOPIC_LEN: usize =
    ROOT.len() + 1 + crate::ids::MAX_ID_LEN + "/status/".len() + crate::ids::MAX_ID_LEN;

/// A topic string, stored without allocation.
pub type TopicString = heapless::String<MAX_TOPIC_LEN>;

/// MQTT quality of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QoS {
    /// At most once.
    AtMostOnce = 0,
    /// At least once.
    AtLeastOnce = 1,
    /// Exactly once.
    ExactlyOnce = 2,
}

/// What a topic carries, with the client it belongs to where there is one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TopicKind {
    /// The current global adapter.
    Global,
    /// Chunk `n` of the current global adapter.
    GlobalChunk(u32),
    /// The current round announcement.
    Round,
    /// Join requests.
    Join,
    /// A client's updates.
    Update(ClientId),
    /// A client's status (and last will).
    Status(ClientId),
    /// A client's evaluation results.
    Eval(ClientId),
    /// The open secure round's current stage (roster, unmask request).
    SecAgg,
    /// Messages for one client from the aggregator (the shares relayed to it).
    Inbox(ClientId),
}

/// A parsed or to-be-built topic: fleet plus kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Topic {
    /// The fleet.
    pub fleet: FleetName,
    /// What the topic carries.
    pub kind: TopicKind,
}

/// Why a topic string is not a fedpeft topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicError {
    /// It does not start with `fedpeft/v1/`.
    WrongRoot,
    /// The fleet segment is invalid.
    BadFleet(IdError),
    /// The client segment is invalid.
    BadClient(IdError),
    /// The segment after the fleet is not a known kind, or the segment count is wrong for it.
    UnknownKind,
    /// A `global/{n}` chunk number is not a decimal u32.
    BadChunkNumber,
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopicError::WrongRoot => write!(f, "topic does not start with {ROOT}/"),
            TopicError::BadFleet(e) => write!(f, "topic fleet segment: {e}"),
            TopicError::BadClient(e) => write!(f, "topic client segment: {e}"),
            TopicError::UnknownKind => write!(
                f,
                "topic kind is not one of global, global/{{n}}, round, join, update/{{client}}, status/{{client}}, eval/{{client}}, secagg, inbox/{{client}}"
            ),
            TopicError::BadChunkNumber => write!(f, "global chunk number is not a decimal u32"),
        }
    }
}

impl core::error::Error for TopicError {}

impl Topic {
    /// `fleet` + `kind`.
    pub fn new(fleet: FleetName, kind: TopicKind) -> Self {
        Self { fleet, kind }
    }

    /// The client the topic belongs to, if any.
    pub fn client(&self) -> Option<&ClientId> {
        match &self.kind {
            TopicKind::Update(c)
            | TopicKind::Status(c)
            | TopicKind::Eval(c)
            | TopicKind::Inbox(c) => Some(c),
            _ => None,
        }
    }

    /// QoS to publish with: always at-least-once (updates are idempotent by sequence).
    pub fn qos(&self) -> QoS {
        QoS::AtLeastOnce
    }

    /// Whether publishes on this topic set the retain flag.
    pub fn retain(&self) -> bool {
        matches!(
            self.kind,
            TopicKind::Global
                | TopicKind::GlobalChunk(_)
                | TopicKind::Round
                | TopicKind::Status(_)
                | TopicKind::SecAgg
        )
    }

    /// The topic string.
    pub fn to_topic_string(&self) -> TopicString {
        let mut s = TopicString::new();
        // Cannot overflow: MAX_TOPIC_LEN is computed from the longest form.
        let _ = write!(s, "{self}");
        s
    }

    /// Parses a topic string.
    pub fn parse(topic: &str) -> Result<Self, TopicError> {
        let rest = topic
            .strip_prefix(ROOT)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or(TopicError::WrongRoot)?;
        let mut parts = rest.split('/');
        let fleet = FleetName::new(parts.next().unwrap_or("")).map_err(TopicError::BadFleet)?;
        let kind_seg = parts.next().ok_or(TopicError::UnknownKind)?;
        let arg = parts.next();
        if parts.next().is_some() {
            return Err(TopicError::UnknownKind);
        }
        let client = |a: Option<&str>| {
            ClientId::new(a.ok_or(TopicError::UnknownKind)?).map_err(TopicError::BadClient)
        };
        let kind = match (kind_seg, arg) {
            ("global", None) => TopicKind::Global,
            ("global", Some(n)) => {
                // Digits only: u32::from_str would also accept a leading '+'.
                if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(TopicError::BadChunkNumber);
                }
                TopicKind::GlobalChunk(n.parse().map_err(|_| TopicError::BadChunkNumber)?)
            }
            ("round", None) => TopicKind::Round,
            ("join", None) => TopicKind::Join,
            ("update", a @ Some(_)) => TopicKind::Update(client(a)?),
            ("status", a @ Some(_)) => TopicKind::Status(client(a)?),
            ("eval", a @ Some(_)) => TopicKind::Eval(client(a)?),
            ("secagg", None) => TopicKind::SecAgg,
            ("inbox", a @ Some(_)) => TopicKind::Inbox(client(a)?),
            _ => return Err(TopicError::UnknownKind),
        };
        Ok(Topic { fleet, kind })
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{ROOT}/{}/", self.fleet)?;
        match &self.kind {
            TopicKind::Global => f.write_str("global"),
            TopicKind::GlobalChunk(n) => write!(f, "global/{n}"),
            TopicKind::Round => f.write_str("round"),
            TopicKind::Join => f.write_str("join"),
            TopicKind::Update(c) => write!(f, "update/{c}"),
            TopicKind::Status(c) => write!(f, "status/{c}"),
            TopicKind::Eval(c) => write!(f, "eval/{c}"),
            TopicKind::SecAgg => f.write_str("secagg"),
            TopicKind::Inbox(c) => write!(f, "inbox/{c}"),
        }
    }
}

/// Subscription filters for a fleet.
pub mod filter {
    use super::*;

    fn build(fleet: &FleetName, tail: &str) -> TopicString {
        let mut s = TopicString::new();
        let _ = write!(s, "{ROOT}/{fleet}/{tail}");
        s
    }

    /// Every client's updates (the aggregator).
    pub fn updates(fleet: &FleetName) -> TopicString {
        build(fleet, "update/+")
    }

    /// Every client's status.
    pub fn statuses(fleet: &FleetName) -> TopicString {
        build(fleet, "status/+")
    }

    /// Every client's evaluation results.
    pub fn evals(fleet: &FleetName) -> TopicString {
        build(fleet, "eval/+")
    }

    /// The global adapter, whole or chunked (clients).
    pub fn global(fleet: &FleetName) -> TopicString {
        build(fleet, "global/#")
    }

    /// Everything in the fleet (tools such as `mosquitto_sub`).
    pub fn all(fleet: &FleetName) -> TopicString {
        build(fleet, "#")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> FleetName {
        FleetName::new("lab").unwrap()
    }

    #[test]
    fn every_topic_kind_builds_and_parses_back() {
        let c = ClientId::new("pi-07").unwrap();
        let cases = [
            (TopicKind::Global, "fedpeft/v1/lab/global", true),
            (TopicKind::GlobalChunk(3), "fedpeft/v1/lab/global/3", true),
            (TopicKind::Round, "fedpeft/v1/lab/round", true),
            (TopicKind::Join, "fedpeft/v1/lab/join", false),
            (
                TopicKind::Update(c.clone()),
                "fedpeft/v1/lab/update/pi-07",
                false,
            ),
            (
                TopicKind::Status(c.clone()),
                "fedpeft/v1/lab/status/pi-07",
                true,
            ),
            (
                TopicKind::Eval(c.clone()),
                "fedpeft/v1/lab/eval/pi-07",
                false,
            ),
            (TopicKind::SecAgg, "fedpeft/v1/lab/secagg", true),
            (
                TopicKind::Inbox(c.clone()),
                "fedpeft/v1/lab/inbox/pi-07",
                false,
            ),
        ];
        for (kind, s, retain) in cases {
            let t = Topic::new(fleet(), kind);
            assert_eq!(t.to_topic_string().as_str(), s);
            assert_eq!(Topic::parse(s).unwrap(), t);
            assert_eq!(t.retain(), retain, "{s}");
            assert_eq!(t.qos(), QoS::AtLeastOnce);
        }
    }

    #[test]
    fn the_longest_topic_fits_its_buffer() {
        let long = "x".repeat(crate::ids::MAX_ID_LEN);
        let t = Topic::new(
            FleetName::new(&long).unwrap(),
            TopicKind::Status(ClientId::new(&long).unwrap()),
        );
        assert_eq!(t.to_topic_string().len(), MAX_TOPIC_LEN);
        assert_eq!(Topic::parse(&t.to_topic_string()).unwrap(), t);
    }

    #[test]
    fn malformed_topics_are_rejected_with_the_reason() {
        assert_eq!(
            Topic::parse("fedpeft/v2/lab/round"),
            Err(TopicError::WrongRoot)
        );
        assert_eq!(
            Topic::parse("fedpeft/v1/lab/update"),
            Err(TopicError::UnknownKind)
        );
        assert_eq!(
            Topic::parse("fedpeft/v1/lab/round/x"),
            Err(TopicError::UnknownKind)
        );
        assert_eq!(
            Topic::parse("fedpeft/v1/lab/update/a/b"),
            Err(TopicError::UnknownKind)
        );
        assert_eq!(
            Topic::parse("fedpeft/v1/lab/global/+1"),
            Err(TopicError::BadChunkNumber)
        );
        assert!(matches!(
            Topic::parse("fedpeft/v1/lab/update/+"),
            Err(TopicError::BadClient(_))
        ));
        assert!(matches!(
            Topic::parse("fedpeft/v1/#/round"),
            Err(TopicError::BadFleet(_))
        ));
    }

    #[test]
    fn filters_cover_their_topics() {
        assert_eq!(
            filter::updates(&fleet()).as_str(),
            "fedpeft/v1/lab/update/+"
        );
        assert_eq!(filter::global(&fleet()).as_str(), "fedpeft/v1/lab/global/#");
        assert_eq!(filter::all(&fleet()).as_str(), "fedpeft/v1/lab/#");
    }
}
