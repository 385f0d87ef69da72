//! The embedded broker's logins and ACL (`[embedded_broker]`), end to end: the real `aggregator`
//! binary (layout-only model, so no trunk runs) with its embedded broker on a free loopback
//! port, the shipped `deploy/mosquitto/acl`, a password file hashed by Mosquitto's own
//! `mosquitto_passwd` (so the same two files serve both brokers), and scripted rumqttc clients.
//!
//! - A client logged in as itself publishes on its own topics and the aggregator receives them;
//!   its publish on another client's topic is acknowledged and dropped (a subscriber with the
//!   aggregator's rights never sees it), and a round completes.
//! - A wrong password, an unknown user and a login-less CONNECT are refused with CONNACK 4.
//! - A client subscribing to every client's updates gets SUBACK failure and receives nothing.
//! - A client cannot take over another user's session by reusing its client id.
//! - A broken password or ACL file stops the aggregator before it starts, naming file and line.
//! - Without `[embedded_broker]` the broker is as open as before: anyone can publish as anyone.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use fedpeft_protocol::{Capabilities, ClientId, DType, Envelope, Join, PeftMethod, Tensor, Values};
use fedpeft_tests::{Proc, binary, free_port, workspace_root};
use rumqttc::{ConnectReturnCode, QoS, SubscribeReasonCode};

const RUN: u64 = 19;
const W: usize = 16;
const AGG: &str = "fedpeft-aggregator";

fn topic(fleet: &str, kind: &str) -> String {
    format!("fedpeft/v1/{fleet}/{kind}")
}

/// What a scripted connection saw.
#[derive(Debug)]
enum Seen {
    ConnAck,
    Refused(ConnectReturnCode),
    SubAck(Vec<SubscribeReasonCode>),
    PubAck,
    Publish(String, Vec<u8>),
    Closed(String),
}

/// One MQTT connection driven by the test, with what it receives.
struct Scripted {
    mqtt: rumqttc::Client,
    seen: mpsc::Receiver<Seen>,
}

impl Scripted {
    /// Connects as `mqtt_id`, logged in as `login` (user, password) if given.
    fn connect(mqtt_id: &str, port: u16, login: Option<(&str, &str)>) -> Scripted {
        let mut opts = rumqttc::MqttOptions::new(mqtt_id, "127.0.0.1", port);
        opts.set_max_packet_size(256 * 1024, 256 * 1024);
        opts.set_keep_alive(Duration::from_secs(20));
        if let Some((user, password)) = login {
            opts.set_credentials(user, password);
        }
        let (mqtt, mut connection) = rumqttc::Client::new(opts, 64);
        let (tx, seen) = mpsc::channel();
        thread::spawn(move || {
            for event in connection.iter() {
                let s = match event {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => Seen::ConnAck,
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(a))) => {
                        Seen::SubAck(a.return_codes)
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => Seen::PubAck,
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        Seen::Publish(p.topic.clone(), p.payload.to_vec())
                    }
                    Ok(_) => continue,
                    Err(rumqttc::ConnectionError::ConnectionRefused(code)) => Seen::Refused(code),
                    Err(e) => Seen::Closed(e.to_string()),
                };
                let stop = matches!(s, Seen::Refused(_) | Seen::Closed(_));
                if tx.send(s).is_err() || stop {
                    return;
                }
            }
        });
        Scripted { mqtt, seen }
    }

    /// The first thing that happens within `wait` that `pick` accepts.
    fn wait_for<T>(&self, wait: Duration, mut pick: impl FnMut(Seen) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + wait;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.seen.recv_timeout(left) {
                Ok(s) => {
                    if let Some(t) = pick(s) {
                        return Some(t);
                    }
                }
                Err(_) => return None,
            }
        }
        None
    }

    fn connected(&self) -> Result<(), String> {
        self.wait_for(Duration::from_secs(10), |s| match s {
            Seen::ConnAck => Some(Ok(())),
            Seen::Refused(code) => Some(Err(format!("refused: {code:?}"))),
            Seen::Closed(e) => Some(Err(e)),
            _ => None,
        })
        .unwrap_or_else(|| Err("no CONNACK".into()))
    }

    fn subscribe(&self, filter: &str) -> Vec<SubscribeReasonCode> {
        self.mqtt
            .subscribe(filter, QoS::AtLeastOnce)
            .expect("queue a subscribe");
        self.wait_for(Duration::from_secs(10), |s| match s {
            Seen::SubAck(codes) => Some(codes),
            _ => None,
        })
        .expect("a SUBACK")
    }

    /// Publishes at QoS 1 and waits for the PUBACK.
    fn publish_acked(&self, topic: &str, payload: Vec<u8>) {
        self.mqtt
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .expect("queue a publish");
        self.wait_for(Duration::from_secs(10), |s| match s {
            Seen::PubAck => Some(()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no PUBACK for a publish on {topic}"));
    }

    /// The messages received within `wait`.
    fn messages(&self, wait: Duration) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let deadline = Instant::now() + wait;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.seen.recv_timeout(left) {
                Ok(Seen::Publish(t, p)) => out.push((t, p)),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        out
    }
}

/// A password file as `mosquitto_passwd -U` hashes it (PBKDF2-SHA512, `$7$`).
fn mosquitto_passwd(dir: &Path, users: &[(&str, &str)]) -> PathBuf {
    let path = dir.join("passwd");
    let text: String = users.iter().map(|(u, p)| format!("{u}:{p}\n")).collect();
    std::fs::write(&path, text).unwrap();
    let hashed = Command::new("mosquitto_passwd")
        .arg("-U")
        .arg(&path)
        .status()
        .expect("mosquitto_passwd (Debian package mosquitto, installed by scripts/setup.sh)");
    assert!(hashed.success());
    assert!(std::fs::read_to_string(&path).unwrap().contains(":$7$"));
    path
}

/// An aggregator config with the embedded broker on `port`; `embedded` is its
/// `[embedded_broker]` table's body (empty: no table), `login` the aggregator's own.
fn aggregator_config(
    dir: &Path,
    fleet: &str,
    port: u16,
    login: Option<&str>,
    embedded: &str,
) -> PathBuf {
    let login = match login {
        Some(pw) => {
            let file = dir.join("agg.pw");
            std::fs::write(&file, format!("{pw}\n")).unwrap();
            format!(
                "username = \"{AGG}\"\npassword_file = \"{}\"\n",
                file.display()
            )
        }
        None => String::new(),
    };
    let embedded = if embedded.is_empty() {
        String::new()
    } else {
        format!("[embedded_broker]\n{embedded}\n")
    };
    let text = format!(
        r#"fleet = "{fleet}"
run_id = {RUN}
rounds = 1
min_clients = 2
round_timeout_secs = 60
backbone_params = 1000000

[broker]
port = {port}
max_packet_bytes = 262144
{login}
{embedded}
[model]
tensors = [{{ name = "w", shape = [{W}] }}]

[output]
dir = "{}"
"#,
        dir.join("out").display()
    );
    let path = dir.join("aggregator.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The shipped ACL, as the embedded broker reads it.
fn shipped_acl() -> String {
    format!(
        "password_file = \"PASSWD\"\nacl_file = \"{}\"",
        workspace_root().join("deploy/mosquitto/acl").display()
    )
}

/// Starts the aggregator on `config` and waits for its ready line.
fn aggregator(config: &Path) -> Proc {
    let mut cmd = Command::new(binary("aggregator"));
    cmd.arg("--config").arg(config);
    let proc = Proc::spawn("aggregator", cmd);
    proc.wait_for_line("aggregator ready", Duration::from_secs(60))
        .expect("aggregator ready");
    proc
}

/// An aggregator whose embedded broker checks logins and the shipped ACL; users
/// `fedpeft-aggregator`, `a` and `b` (password: the name with `-pw`).
fn aggregator_with_acl(dir: &Path, fleet: &str) -> (Proc, u16) {
    let passwd = mosquitto_passwd(
        dir,
        &[(AGG, "fedpeft-aggregator-pw"), ("a", "a-pw"), ("b", "b-pw")],
    );
    let port = free_port();
    let embedded = shipped_acl().replace("PASSWD", &passwd.display().to_string());
    let config = aggregator_config(dir, fleet, port, Some("fedpeft-aggregator-pw"), &embedded);
    (aggregator(&config), port)
}

fn join(client: &str) -> Vec<u8> {
    let join = Join {
        client: ClientId::new(client).unwrap(),
        capabilities: Capabilities {
            backbone_id: heapless::String::new(),
            backbone_sha256: [0; 32],
            peft: PeftMethod::Head,
            accepted_dtypes: heapless::Vec::from_slice(&[DType::F32]).unwrap(),
            max_packet_size: 256 * 1024,
        },
        num_examples: 100,
    };
    Envelope::new(RUN, 0, join).encode().unwrap()
}

fn update(client: &str, round: u32, value: f32) -> Vec<u8> {
    let w = Tensor::dense("w", &[W as u32], Values::F32(vec![value; W])).unwrap();
    let u = fedpeft_tests::client_update(client, round, 1, 100, vec![w]);
    Envelope::new(RUN, round, u).encode().unwrap()
}

#[test]
fn with_the_acl_clients_reach_the_aggregator_on_their_own_topics_only() {
    const FLEET: &str = "acl-round";
    let dir = tempfile::tempdir().unwrap();
    let (mut agg, port) = aggregator_with_acl(dir.path(), FLEET);
    let out = agg.output();
    assert!(
        out.iter()
            .any(|l| l.contains("logins checked against the password file")),
        "{out:?}"
    );

    // A subscriber with the aggregator's rights (same user, its own client id).
    let observer = Scripted::connect("observer", port, Some((AGG, "fedpeft-aggregator-pw")));
    observer.connected().expect("the aggregator's user logs in");
    assert_eq!(
        observer.subscribe(&topic(FLEET, "update/+")),
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let a = Scripted::connect("a", port, Some(("a", "a-pw")));
    let b = Scripted::connect("b", port, Some(("b", "b-pw")));
    for c in [&a, &b] {
        c.connected().expect("a client logs in as itself");
        assert_eq!(
            c.subscribe(&topic(FLEET, "round")),
            vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
        );
    }
    a.publish_acked(&topic(FLEET, "join"), join("a"));
    b.publish_acked(&topic(FLEET, "join"), join("b"));
    agg.wait_for_line("round started round=1", Duration::from_secs(30))
        .expect("both joins reached the aggregator: round 1 started");

    // `a` on `b`'s topic: acknowledged like any publish, and dropped.
    let forged = update("b", 1, 9.0);
    a.publish_acked(&topic(FLEET, "update/b"), forged.clone());
    a.publish_acked(&topic(FLEET, "update/a"), update("a", 1, 0.1));
    b.publish_acked(&topic(FLEET, "update/b"), update("b", 1, 0.3));
    let status = agg
        .wait_exit(Duration::from_secs(30))
        .expect("the aggregator finished its round");
    assert!(status.success(), "aggregator exited with {status}");
    let out = agg.output();
    assert!(
        out.iter().any(|l| l.contains("publish denied by the ACL")
            && l.contains("client=a")
            && l.contains("fedpeft/v1/acl-round/update/b")),
        "the dropped publish is logged with client and topic: {out:?}"
    );

    let seen = observer.messages(Duration::from_millis(500));
    let topics: Vec<&str> = seen.iter().map(|(t, _)| t.as_str()).collect();
    assert!(!seen.iter().any(|(_, p)| *p == forged), "{topics:?}");
    assert!(
        topics.contains(&topic(FLEET, "update/a").as_str()),
        "{topics:?}"
    );
    assert_eq!(
        topics.iter().filter(|t| t.ends_with("update/b")).count(),
        1,
        "{topics:?}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/report.json")).unwrap())
            .unwrap();
    let r1 = &report["rounds"][1];
    assert_eq!(
        (r1["status"].as_str(), r1["clients_ok"].as_u64()),
        (Some("ok"), Some(2)),
        "{r1}"
    );
}

#[test]
fn with_the_acl_a_wrong_password_an_unknown_user_or_no_login_is_refused_at_connect() {
    let dir = tempfile::tempdir().unwrap();
    let (agg, port) = aggregator_with_acl(dir.path(), "acl-login");
    for (id, login) in [
        ("a", Some(("a", "b-pw"))),
        ("mallory", Some(("mallory", "a-pw"))),
        ("anon", None),
    ] {
        let c = Scripted::connect(id, port, login);
        assert_eq!(
            c.connected(),
            Err(format!(
                "refused: {:?}",
                ConnectReturnCode::BadUserNamePassword
            )),
            "{id}"
        );
    }
    let out = agg.output();
    assert!(
        out.iter().any(|l| l.contains("connection refused")
            && l.contains("user=mallory")
            && l.contains("unknown user or wrong password")),
        "{out:?}"
    );
}

#[test]
fn with_the_acl_a_client_subscribing_to_every_update_is_refused_and_receives_nothing() {
    const FLEET: &str = "acl-sub";
    let dir = tempfile::tempdir().unwrap();
    let (_agg, port) = aggregator_with_acl(dir.path(), FLEET);
    let a = Scripted::connect("a", port, Some(("a", "a-pw")));
    a.connected().unwrap();
    assert_eq!(
        a.subscribe(&topic(FLEET, "update/+")),
        vec![SubscribeReasonCode::Failure]
    );
    assert_eq!(a.subscribe("#"), vec![SubscribeReasonCode::Failure]);
    // Still connected, and what the ACL grants still works.
    assert_eq!(
        a.subscribe(&topic(FLEET, "global/#")),
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let b = Scripted::connect("b", port, Some(("b", "b-pw")));
    b.connected().unwrap();
    b.publish_acked(&topic(FLEET, "update/b"), update("b", 1, 0.5));
    let seen = a.messages(Duration::from_millis(800));
    assert!(
        !seen.iter().any(|(t, _)| t.contains("/update/")),
        "a read b's update: {seen:?}"
    );
}

#[test]
fn with_the_acl_a_client_cannot_take_over_another_users_session() {
    const FLEET: &str = "acl-session";
    let dir = tempfile::tempdir().unwrap();
    let (agg, port) = aggregator_with_acl(dir.path(), FLEET);
    let observer = Scripted::connect("observer", port, Some((AGG, "fedpeft-aggregator-pw")));
    observer.connected().unwrap();
    observer.subscribe(&topic(FLEET, "update/+"));
    // `a` reuses the observer's client id (and the aggregator's): it gets a session of its own,
    // and neither of them is disconnected.
    let thief = Scripted::connect("observer", port, Some(("a", "a-pw")));
    thief.connected().unwrap();
    let thief2 = Scripted::connect(AGG, port, Some(("a", "a-pw")));
    thief2.connected().unwrap();
    let b = Scripted::connect("b", port, Some(("b", "b-pw")));
    b.connected().unwrap();
    b.publish_acked(&topic(FLEET, "update/b"), update("b", 1, 0.5));
    let seen = observer.messages(Duration::from_millis(800));
    assert_eq!(seen.len(), 1, "{seen:?}");
    for t in [&thief, &thief2] {
        assert!(t.messages(Duration::from_millis(200)).is_empty());
    }
    let out = agg.output();
    assert!(
        !out.iter().any(|l| l.contains("reconnecting")),
        "the aggregator lost its connection: {out:?}"
    );
}

#[test]
fn a_broken_password_or_acl_file_stops_the_aggregator_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = mosquitto_passwd(dir.path(), &[(AGG, "pw")]);
    let bad_acl = dir.path().join("acl");
    std::fs::write(&bad_acl, "user fedpeft-aggregator\ntopic reed fedpeft/#\n").unwrap();
    let plain = dir.path().join("plain-passwd");
    std::fs::write(&plain, "fedpeft-aggregator:pw\n").unwrap();
    for (embedded, words) in [
        (
            format!(
                "password_file = \"{}\"\nacl_file = \"{}\"",
                passwd.display(),
                bad_acl.display()
            ),
            vec![
                "embedded_broker.acl_file".to_string(),
                format!("{}:2:", bad_acl.display()),
                "reed".into(),
            ],
        ),
        (
            format!("password_file = \"{}\"", plain.display()),
            vec![
                "embedded_broker.password_file".to_string(),
                format!("{}:1:", plain.display()),
                "mosquitto_passwd -U".into(),
            ],
        ),
        (
            format!("password_file = \"{}\"\nacl_fil = \"x\"", passwd.display()),
            vec!["acl_fil".to_string()],
        ),
    ] {
        let config = aggregator_config(dir.path(), "acl-bad", free_port(), Some("pw"), &embedded);
        let out = Command::new(binary("aggregator"))
            .arg("--config")
            .arg(&config)
            .output()
            .expect("run the aggregator");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{embedded}: started anyway");
        for w in &words {
            assert!(
                stderr.contains(w.as_str()),
                "{embedded}: `{w}` not in {stderr}"
            );
        }
    }
    // The aggregator's own login must be in the password file.
    let config = aggregator_config(
        dir.path(),
        "acl-bad",
        free_port(),
        Some("not-the-password"),
        &format!("password_file = \"{}\"", passwd.display()),
    );
    let out = Command::new(binary("aggregator"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("broker.password_file"),
        "{stderr}"
    );
}

#[test]
fn without_the_acl_anyone_who_connects_can_publish_as_any_client() {
    // Today's default, kept: no logins, no ACL. This is the risk the guide describes.
    const FLEET: &str = "open";
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _agg = aggregator(&aggregator_config(dir.path(), FLEET, port, None, ""));
    let observer = Scripted::connect("observer", port, None);
    observer.connected().unwrap();
    observer.subscribe(&topic(FLEET, "update/+"));
    let mallory = Scripted::connect("mallory", port, Some(("anyone", "anything")));
    mallory
        .connected()
        .expect("the open broker takes any login");
    assert_eq!(
        mallory.subscribe(&topic(FLEET, "update/+")),
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    mallory.publish_acked(&topic(FLEET, "update/b"), b"forged".to_vec());
    let seen = observer.messages(Duration::from_millis(800));
    assert!(
        seen.iter()
            .any(|(t, p)| t.ends_with("update/b") && p == b"forged"),
        "{seen:?}"
    );
}
