//! Trust and resilience end to end: the real `aggregator` binary (layout-only model, so no
//! trunk runs) behind a real Mosquitto, with scripted MQTT clients.
//!
//! - The shipped `deploy/mosquitto/` config and ACL, with certificates made here: the
//!   TLS-only listeners accept TLS (password and client-certificate logins) and refuse plain
//!   TCP; a round completes over mqtts with signed messages; a client publishing on another
//!   client's update topic is dropped by the broker (a subscriber with the aggregator's rights
//!   never sees it).
//! - With a permissive broker (anonymous, no ACL), enrolment alone stops forged updates (wrong
//!   key, altered signature, unsigned, someone else's client id) and replays of accepted ones,
//!   also across an aggregator restart: each is refused, logged with client, round and reason,
//!   and counted.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use fedpeft_protocol::envelope::crc32;
use fedpeft_protocol::sign::{self, SIGNATURE_LEN};
use fedpeft_protocol::{
    Capabilities, ClientId, ClientState, DType, Envelope, FleetName, Join, Message, PeftMethod,
    SigningKey, Status, Tensor, Values, VerifyingKey,
};
use fedpeft_tests::{Mosquitto, Proc, binary, free_port, wait_for_port};

const RUN: u64 = 11;
const W: usize = 16;

fn topic(fleet: &str, kind: &str) -> String {
    format!("fedpeft/v1/{fleet}/{kind}")
}

/// A deterministic test key for `name`.
fn key_of(name: &str) -> SigningKey {
    let mut seed = [0u8; 32];
    for (i, b) in name.bytes().enumerate() {
        seed[i % 32] ^= b.wrapping_add(i as u8);
    }
    seed[31] ^= 0x5a;
    SigningKey::from_bytes(&seed)
}

/// How a scripted client reaches the broker.
#[derive(Clone)]
enum Login {
    Plain,
    /// TLS with the CA, as `username` with `password`.
    Password {
        tls: Arc<rustls::ClientConfig>,
        username: String,
        password: String,
    },
    /// TLS with a client certificate (the CA config includes it).
    Certificate {
        tls: Arc<rustls::ClientConfig>,
    },
}

/// One MQTT connection driven by the test, with what it receives.
struct Scripted {
    id: String,
    fleet: String,
    mqtt: rumqttc::Client,
    received: mpsc::Receiver<(String, Vec<u8>)>,
    /// Ok(()) once CONNACK arrived, Err(reason) if the connection failed first.
    connected: mpsc::Receiver<Result<(), String>>,
}

impl Scripted {
    fn connect(fleet: &str, id: &str, mqtt_id: &str, port: u16, login: &Login) -> Scripted {
        let mut opts = rumqttc::MqttOptions::new(mqtt_id, "localhost", port);
        opts.set_max_packet_size(256 * 1024, 256 * 1024);
        opts.set_keep_alive(Duration::from_secs(20));
        match login {
            Login::Plain => {}
            Login::Password {
                tls,
                username,
                password,
            } => {
                opts.set_transport(rumqttc::Transport::tls_with_config(
                    rumqttc::TlsConfiguration::Rustls(tls.clone()),
                ));
                opts.set_credentials(username.clone(), password.clone());
            }
            Login::Certificate { tls } => {
                opts.set_transport(rumqttc::Transport::tls_with_config(
                    rumqttc::TlsConfiguration::Rustls(tls.clone()),
                ));
            }
        }
        let (mqtt, mut connection) = rumqttc::Client::new(opts, 64);
        let (tx, received) = mpsc::channel();
        let (ctx, connected) = mpsc::channel();
        thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        let _ = ctx.send(Ok(()));
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if ctx.send(Err(e.to_string())).is_err() {
                            return;
                        }
                        thread::sleep(Duration::from_millis(200));
                    }
                }
            }
        });
        Scripted {
            id: id.to_string(),
            fleet: fleet.to_string(),
            mqtt,
            received,
            connected,
        }
    }

    /// The first connection outcome.
    fn outcome(&self, timeout: Duration) -> Result<(), String> {
        self.connected
            .recv_timeout(timeout)
            .unwrap_or_else(|_| Err("no CONNACK and no error".into()))
    }

    fn publish(&self, kind: &str, payload: Vec<u8>) {
        self.mqtt
            .publish(
                topic(&self.fleet, kind),
                rumqttc::QoS::AtLeastOnce,
                false,
                payload,
            )
            .expect("queue a publish");
    }

    fn send_update(&self, payload: Vec<u8>) {
        self.publish(&format!("update/{}", self.id), payload);
    }

    fn subscribe(&self, kind: &str) {
        self.mqtt
            .subscribe(topic(&self.fleet, kind), rumqttc::QoS::AtLeastOnce)
            .expect("queue a subscribe");
    }

    fn join(&self, key: Option<&SigningKey>) {
        let join = Join {
            client: ClientId::new(&self.id).unwrap(),
            capabilities: Capabilities {
                backbone_id: heapless::String::new(),
                backbone_sha256: [0; 32],
                peft: PeftMethod::Head,
                accepted_dtypes: heapless::Vec::from_slice(&[DType::F32]).unwrap(),
                max_packet_size: 256 * 1024,
            },
            num_examples: 100,
        };
        let env = Envelope::new(RUN, 0, join);
        self.publish("join", seal(&env, &self.fleet, key));
        let status = Envelope::new(
            RUN,
            0,
            Status {
                client: ClientId::new(&self.id).unwrap(),
                state: ClientState::Online,
            },
        );
        self.publish(
            &format!("status/{}", self.id),
            seal(&status, &self.fleet, key),
        );
    }

    /// Messages received within `wait`.
    fn drain(&self, wait: Duration) -> Vec<(String, Vec<u8>)> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.received.recv_timeout(left) {
                Ok(m) => out.push(m),
                Err(_) => break,
            }
        }
        out
    }
}

fn seal(env: &Envelope, fleet: &str, key: Option<&SigningKey>) -> Vec<u8> {
    match key {
        Some(k) => env
            .encode_signed(&FleetName::new(fleet).unwrap(), k)
            .unwrap(),
        None => env.encode().unwrap(),
    }
}

/// An update envelope of `client` (body) for `round`.
fn update(client: &str, round: u32, sequence: u32, value: f32) -> Envelope {
    let w = Tensor::dense("w", &[W as u32], Values::F32(vec![value; W])).unwrap();
    let u = fedpeft_tests::client_update(client, round, sequence, 100, vec![w]);
    Envelope::new(RUN, round, u)
}

/// The enrolment file: client id = public key.
fn enrolment(dir: &Path, clients: &[(&str, VerifyingKey)]) -> PathBuf {
    let mut text = String::from("[clients]\n");
    for (id, key) in clients {
        text.push_str(&format!("{id} = \"{}\"\n", sign::public_key_hex(key)));
    }
    let path = dir.join("enrolled.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `aggregator keygen --out FILE`: the secret key file and the printed public key.
fn aggregator_keygen(dir: &Path) -> (PathBuf, VerifyingKey) {
    let path = dir.join("aggregator.key");
    let out = Command::new(binary("aggregator"))
        .args(["keygen", "--out"])
        .arg(&path)
        .output()
        .expect("run aggregator keygen");
    assert!(out.status.success(), "{out:?}");
    let public = sign::parse_public_key(std::str::from_utf8(&out.stdout).unwrap()).unwrap();
    assert_eq!(
        sign::read_signing_key(&path).unwrap().verifying_key(),
        public
    );
    (path, public)
}

fn aggregator_config(dir: &Path, fleet: &str, body: &str) -> PathBuf {
    let text = format!(
        r#"fleet = "{fleet}"
run_id = {RUN}
backbone_params = 1000000
{body}

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

fn report(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("out/report.json")).unwrap()).unwrap()
}

fn rejected_line(lines: &[String], client: &str, round: u32, reason: &str) -> bool {
    lines.iter().any(|l| {
        l.contains("update rejected")
            && l.contains(&format!("client={client} "))
            && l.contains(&format!("round={round} "))
            && l.contains(&format!("reason={reason} "))
    })
}

/// Every round announcement and global adapter an observer saw verifies with the aggregator's
/// key; returns how many there were.
fn all_signed_by(messages: &[(String, Vec<u8>)], fleet: &str, key: &VerifyingKey) -> usize {
    let fleet_name = FleetName::new(fleet).unwrap();
    let mut n = 0;
    for (t, payload) in messages {
        if payload.is_empty() || !(t.ends_with("/round") || t.ends_with("/global")) {
            continue;
        }
        sign::verify(payload, &fleet_name, key)
            .unwrap_or_else(|e| panic!("{t}: not signed by the aggregator: {e}"));
        n += 1;
    }
    n
}

// ---------------------------------------------------------------------------------------------
// TLS, passwords, client certificates and the ACL: the shipped deploy/mosquitto files.

struct Pki {
    ca_pem: String,
    server_cert: String,
    server_key: String,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new() -> Pki {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fedpeft test CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let mut server = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        server
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        let server_key = rcgen::KeyPair::generate().unwrap();
        let server_cert = server.signed_by(&server_key, &ca, &ca_key).unwrap();
        Pki {
            ca_pem: ca.pem(),
            server_cert: server_cert.pem(),
            server_key: server_key.serialize_pem(),
            ca,
            ca_key,
        }
    }

    /// A client certificate whose CN is `cn`: (certificate PEM, key PEM).
    fn client(&self, cn: &str) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn rustls(&self, client: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut self.ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        Arc::new(match client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    rustls_pemfile::certs(&mut cert.as_bytes())
                        .map(Result::unwrap)
                        .collect(),
                    rustls_pemfile::private_key(&mut key.as_bytes())
                        .unwrap()
                        .unwrap(),
                )
                .unwrap(),
        })
    }
}

/// Mosquitto on the shipped config and ACL, with its files in `dir` and its two TLS listeners
/// on free loopback ports: (password port, certificate port).
fn shipped_mosquitto(dir: &Path, pki: &Pki, users: &[(&str, &str)]) -> (Proc, u16, u16) {
    let deploy = fedpeft_tests::workspace_root().join("deploy/mosquitto");
    let (pw_port, cert_port) = (free_port(), free_port());
    let etc = format!("{}/", dir.display());
    let conf = std::fs::read_to_string(deploy.join("mosquitto.conf"))
        .expect("deploy/mosquitto/mosquitto.conf")
        .replace("/etc/mosquitto/fedpeft/", &etc)
        .replace("/var/lib/mosquitto/", &etc)
        .replace("listener 8883", &format!("listener {pw_port} 127.0.0.1"))
        .replace("listener 8884", &format!("listener {cert_port} 127.0.0.1"));
    assert!(
        conf.contains(&format!("listener {pw_port} "))
            && conf.contains(&format!("listener {cert_port} ")),
        "the shipped config no longer has listeners 8883 and 8884"
    );
    // Test harness only: files live in a root-owned temporary folder, so the broker keeps
    // running as the user that started it, and logs to stderr.
    let conf = format!("{conf}\nuser root\nlog_dest stderr\nlog_type error\nlog_type warning\n");
    std::fs::write(dir.join("mosquitto.conf"), conf).unwrap();
    std::fs::copy(deploy.join("acl"), dir.join("acl")).expect("deploy/mosquitto/acl");
    std::fs::write(dir.join("ca.crt"), &pki.ca_pem).unwrap();
    std::fs::write(dir.join("server.crt"), &pki.server_cert).unwrap();
    std::fs::write(dir.join("server.key"), &pki.server_key).unwrap();
    let mut passwd = std::fs::File::create(dir.join("passwd")).unwrap();
    for (user, pw) in users {
        writeln!(passwd, "{user}:{pw}").unwrap();
    }
    drop(passwd);
    let hashed = Command::new("mosquitto_passwd")
        .arg("-U")
        .arg(dir.join("passwd"))
        .status()
        .expect("mosquitto_passwd (Debian package mosquitto)");
    assert!(hashed.success());
    let exe = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("mosquitto not installed: run scripts/setup.sh");
    let mut cmd = Command::new(exe);
    cmd.arg("-c").arg(dir.join("mosquitto.conf"));
    let proc = Proc::spawn("mosquitto-tls", cmd);
    for port in [pw_port, cert_port] {
        assert!(
            wait_for_port(port, Duration::from_secs(10)),
            "mosquitto did not listen on {port}"
        );
    }
    (proc, pw_port, cert_port)
}

#[test]
fn the_shipped_tls_only_broker_runs_a_signed_round_and_its_acl_pins_clients_to_their_topics() {
    const FLEET: &str = "tls";
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let pki = Pki::new();
    let (_broker, port, cert_port) = shipped_mosquitto(
        &etc,
        &pki,
        &[
            ("fedpeft-aggregator", "agg-pw"),
            ("client-a", "a-pw"),
            ("client-b", "b-pw"),
        ],
    );
    let tls = pki.rustls(None);
    let login = |user: &str, pw: &str| Login::Password {
        tls: tls.clone(),
        username: user.into(),
        password: pw.into(),
    };

    // Plain TCP to the TLS listener gets no CONNACK; neither does a wrong password over TLS.
    let plain = Scripted::connect(FLEET, "client-a", "plain", port, &Login::Plain);
    let refused = plain.outcome(Duration::from_secs(10));
    assert!(
        refused.is_err(),
        "plain MQTT was accepted on the TLS listener"
    );
    drop(plain);
    let wrong = Scripted::connect(
        FLEET,
        "client-a",
        "wrong-pw",
        port,
        &login("client-a", "nope"),
    );
    assert!(
        wrong.outcome(Duration::from_secs(10)).is_err(),
        "a wrong password was accepted"
    );
    drop(wrong);

    // The aggregator over mqtts with a password file, signing; clients enrolled.
    let (agg_key, agg_public) = aggregator_keygen(dir.path());
    let enrolled = enrolment(
        dir.path(),
        &[
            ("client-a", key_of("client-a").verifying_key()),
            ("client-b", key_of("client-b").verifying_key()),
            ("cert-client", key_of("cert-client").verifying_key()),
        ],
    );
    std::fs::write(dir.path().join("agg.pw"), "agg-pw\n").unwrap();
    let config = aggregator_config(
        dir.path(),
        FLEET,
        &format!(
            r#"rounds = 1
min_clients = 3
round_timeout_secs = 60

[broker]
url = "mqtts://localhost:{port}"
ca_file = "{ca}"
username = "fedpeft-aggregator"
password_file = "{pw}"
max_packet_bytes = 262144

[security]
signing_key = "{key}"
enrolled_keys = "{enrolled}"
"#,
            ca = etc.join("ca.crt").display(),
            pw = dir.path().join("agg.pw").display(),
            key = agg_key.display(),
            enrolled = enrolled.display(),
        ),
    );
    let mut cmd = Command::new(binary("aggregator"));
    cmd.arg("--config").arg(&config);
    let mut aggregator = Proc::spawn("aggregator", cmd);
    let ready = aggregator
        .wait_for_line("aggregator ready", Duration::from_secs(60))
        .expect("aggregator ready over mqtts");
    assert!(ready.contains("mqtts://"), "{ready}");

    // A subscriber with the aggregator's rights (same user, its own session).
    let observer = Scripted::connect(
        FLEET,
        "observer",
        "acl-observer",
        port,
        &login("fedpeft-aggregator", "agg-pw"),
    );
    observer
        .outcome(Duration::from_secs(10))
        .expect("observer connects");
    observer.subscribe("update/+");

    let a = Scripted::connect(
        FLEET,
        "client-a",
        "client-a",
        port,
        &login("client-a", "a-pw"),
    );
    let b = Scripted::connect(
        FLEET,
        "client-b",
        "client-b",
        port,
        &login("client-b", "b-pw"),
    );
    let (cert_pem, key_pem) = pki.client("cert-client");
    let c = Scripted::connect(
        FLEET,
        "cert-client",
        "cert-client",
        cert_port,
        &Login::Certificate {
            tls: pki.rustls(Some((&cert_pem, &key_pem))),
        },
    );
    for s in [&a, &b, &c] {
        s.outcome(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{} connects over TLS: {e}", s.id));
        s.subscribe("round");
        s.subscribe("global/#");
    }
    // A certificate the CA did not sign is refused on the certificate listener.
    let rogue_ca = Pki::new();
    let (rogue_cert, rogue_key) = rogue_ca.client("client-b");
    let rogue = Scripted::connect(
        FLEET,
        "client-b",
        "rogue",
        cert_port,
        &Login::Certificate {
            tls: pki.rustls(Some((&rogue_cert, &rogue_key))),
        },
    );
    assert!(
        rogue.outcome(Duration::from_secs(10)).is_err(),
        "a rogue certificate was accepted"
    );
    drop(rogue);
    thread::sleep(Duration::from_millis(300)); // SUBACKs
    for s in [&a, &b, &c] {
        s.join(Some(&key_of(&s.id)));
    }
    aggregator
        .wait_for_line("round started round=1", Duration::from_secs(60))
        .expect("round 1 started");

    // client-a publishes on client-b's topic (the ACL drops it), then on its own.
    let forged = b"forged by client-a".to_vec();
    a.publish("update/client-b", forged.clone());
    a.publish(
        "update/client-a",
        seal(
            &update("client-a", 1, 1, 0.1),
            FLEET,
            Some(&key_of("client-a")),
        ),
    );
    b.publish(
        "update/client-b",
        seal(
            &update("client-b", 1, 1, 0.2),
            FLEET,
            Some(&key_of("client-b")),
        ),
    );
    c.publish(
        "update/cert-client",
        seal(
            &update("cert-client", 1, 1, 0.3),
            FLEET,
            Some(&key_of("cert-client")),
        ),
    );
    let status = aggregator
        .wait_exit(Duration::from_secs(60))
        .expect("the aggregator finished its round over TLS");
    assert!(status.success(), "aggregator exited with {status}");

    let seen = observer.drain(Duration::from_secs(1));
    let topics: Vec<&str> = seen.iter().map(|(t, _)| t.as_str()).collect();
    for own in ["client-a", "client-b", "cert-client"] {
        assert!(
            topics.contains(&topic(FLEET, &format!("update/{own}")).as_str()),
            "{own}'s own update did not reach the aggregator's rights: {topics:?}"
        );
    }
    assert!(
        !seen.iter().any(|(_, p)| *p == forged),
        "client-a's publish on client-b's topic got through the ACL"
    );
    assert_eq!(
        topics
            .iter()
            .filter(|t| t.ends_with("update/client-b"))
            .count(),
        1,
        "{topics:?}"
    );

    let r = report(dir.path());
    let r1 = &r["rounds"][1];
    assert_eq!(r1["round"], 1, "{r}");
    assert_eq!(r1["status"], "ok", "{r1}");
    assert_eq!(r1["clients_ok"], 3, "{r1}");
    assert!(
        r["rejected"].as_object().is_none_or(|m| m.is_empty()),
        "{r}"
    );
    // The clients received the aggregator's signed announcement and adapter over TLS.
    for s in [&a, &b, &c] {
        let got = s.drain(Duration::from_millis(300));
        assert!(
            all_signed_by(&got, FLEET, &agg_public) >= 2,
            "{} received no signed announcement and adapter",
            s.id
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Forgeries and replays with a permissive broker.

#[test]
fn forged_and_replayed_updates_are_refused_named_and_counted_even_when_the_broker_lets_them_through()
 {
    const FLEET: &str = "sig";
    let broker = Mosquitto::start(300 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let (agg_key, agg_public) = aggregator_keygen(dir.path());
    let honest = [
        "good-1",
        "good-2",
        "wrong-key",
        "flipped",
        "unsigned",
        "impostor",
    ];
    let keys: Vec<(&str, VerifyingKey)> = honest
        .iter()
        .map(|id| (*id, key_of(id).verifying_key()))
        .collect();
    let enrolled = enrolment(dir.path(), &keys);
    let config = aggregator_config(
        dir.path(),
        FLEET,
        &format!(
            r#"rounds = 2
min_clients = 6
quorum = 2
round_timeout_secs = 60

[broker]
url = "mqtt://127.0.0.1:{port}"
max_packet_bytes = 262144

[security]
signing_key = "{key}"
enrolled_keys = "{enrolled}"
"#,
            port = broker.port,
            key = agg_key.display(),
            enrolled = enrolled.display(),
        ),
    );
    let start = |name: &str| {
        let mut cmd = Command::new(binary("aggregator"));
        cmd.arg("--config").arg(&config);
        let p = Proc::spawn(name, cmd);
        p.wait_for_line("aggregator ready", Duration::from_secs(60))
            .expect("aggregator ready");
        p
    };
    let mut first = start("aggregator");
    let sniffer = fedpeft_tests::Sniffer::start(broker.port, FLEET, 256 * 1024);

    let connect = |id: &str| Scripted::connect(FLEET, id, id, broker.port, &Login::Plain);
    let clients: Vec<Scripted> = honest.iter().map(|id| connect(id)).collect();
    let by = |id: &str| clients.iter().find(|c| c.id == id).unwrap();
    let stranger = connect("stranger");
    // Anybody on a permissive broker: publishes on whatever topic it likes.
    let attacker = connect("attacker");
    for c in clients.iter().chain([&stranger, &attacker]) {
        c.outcome(Duration::from_secs(10)).expect("connects");
    }
    for c in &clients {
        c.join(Some(&key_of(&c.id)));
    }
    stranger.join(Some(&key_of("stranger")));
    first
        .wait_for_line("round started round=1", Duration::from_secs(60))
        .expect("round 1 started with the six enrolled clients");

    // Round 1, forgeries first.
    let signed = |env: &Envelope, key: &SigningKey| seal(env, FLEET, Some(key));
    by("wrong-key").send_update(signed(
        &update("wrong-key", 1, 1, 9.0),
        &key_of("not-enrolled"),
    ));
    let mut flipped = signed(&update("flipped", 1, 1, 9.0), &key_of("flipped"));
    let sig_at = flipped.len() - 4 - SIGNATURE_LEN;
    flipped[sig_at + 10] ^= 0x01; // the signature is wrong, the checksum right
    let crc = crc32(&flipped[..flipped.len() - 4]);
    let n = flipped.len();
    flipped[n - 4..].copy_from_slice(&crc.to_le_bytes());
    by("flipped").send_update(flipped);
    by("unsigned").send_update(update("unsigned", 1, 1, 9.0).encode().unwrap());
    // impostor signs a body naming good-2 with its own key: on good-2's topic the signature
    // does not verify with good-2's key; on its own topic the body names someone else.
    let as_good_2 = signed(&update("good-2", 1, 1, 9.0), &key_of("impostor"));
    attacker.publish("update/good-2", as_good_2.clone());
    by("impostor").send_update(as_good_2);
    stranger.send_update(signed(&update("stranger", 1, 1, 9.0), &key_of("stranger")));
    for (client, reason) in [
        ("wrong-key", "bad_signature"),
        ("flipped", "bad_signature"),
        ("unsigned", "unsigned"),
        ("good-2", "bad_signature"),
        ("impostor", "client_mismatch"),
        ("stranger", "not_enrolled"),
    ] {
        first
            .wait_for_line(
                &format!("client={client} round=1 reason={reason} "),
                Duration::from_secs(30),
            )
            .unwrap_or_else(|| {
                panic!("{client}'s forged round-1 update was not refused as {reason}")
            });
    }
    // The genuine updates: every client the forgeries named is still in the round (a forgery
    // never knocks the client it names out); impostor, whose own signed update named another
    // client, has failed the round. It closes once the five others are accepted.
    let good_1_r1 = signed(&update("good-1", 1, 1, 0.1), &key_of("good-1"));
    for c in clients.iter().filter(|c| c.id != "impostor") {
        let bytes = if c.id == "good-1" {
            good_1_r1.clone()
        } else {
            signed(&update(&c.id, 1, 1, 0.1), &key_of(&c.id))
        };
        c.send_update(bytes);
    }
    first
        .wait_for_line("round started round=2", Duration::from_secs(60))
        .expect("round 1 closed with the five genuine updates");

    // Round 2: the attacker replays good-1's accepted round-1 update, then good-1 sends its
    // round-2 update and the aggregator is killed once it has accepted (checkpointed) it.
    attacker.publish("update/good-1", good_1_r1.clone());
    first
        .wait_for_line(
            "client=good-1 round=1 reason=duplicate ",
            Duration::from_secs(30),
        )
        .expect("a replayed round-1 update in round 2 is refused as a duplicate");
    let good_1_r2 = signed(&update("good-1", 2, 2, 0.2), &key_of("good-1"));
    by("good-1").send_update(good_1_r2.clone());
    first
        .wait_for_line("client=good-1 round=2 sequence=2", Duration::from_secs(30))
        .expect("good-1's round-2 update accepted");
    // The checkpoint is written right after the acceptance is logged.
    thread::sleep(Duration::from_secs(1));
    let before = first.output();
    first.kill_hard();

    // Restarted from its checkpoint, the aggregator still refuses both replays.
    let mut second = start("aggregator-2");
    attacker.publish("update/good-1", good_1_r2.clone());
    attacker.publish("update/good-1", good_1_r1.clone());
    second
        .wait_for_line(
            "client=good-1 round=2 reason=duplicate ",
            Duration::from_secs(30),
        )
        .expect("a replay of an accepted update after a restart is a duplicate");
    second
        .wait_for_line(
            "client=good-1 round=1 reason=duplicate ",
            Duration::from_secs(30),
        )
        .expect("a replay of round 1 after a restart is a duplicate");
    for c in clients.iter().filter(|c| c.id != "good-1") {
        c.send_update(signed(&update(&c.id, 2, 2, 0.2), &key_of(&c.id)));
    }
    let status = second
        .wait_exit(Duration::from_secs(60))
        .expect("the restarted aggregator finished round 2");
    assert!(status.success(), "aggregator exited with {status}");

    let mut lines = before;
    lines.extend(second.output());
    assert!(
        lines.iter().any(|l| l.contains("message rejected")
            && l.contains("client=stranger")
            && l.contains("reason=not_enrolled")),
        "the stranger's join was not refused"
    );
    for (client, round, reason) in [
        ("good-1", 1, "duplicate"),
        ("good-1", 2, "duplicate"),
        ("good-2", 1, "bad_signature"),
    ] {
        assert!(
            rejected_line(&lines, client, round, reason),
            "no log line refusing {client}'s round-{round} update as {reason}"
        );
    }
    let r = report(dir.path());
    let totals = &r["rejected"];
    for (reason, n) in [
        ("bad_signature", 3),
        ("unsigned", 1),
        ("client_mismatch", 1),
        // The stranger's join, status and update.
        ("not_enrolled", 3),
        // good-1's round-1 update replayed in round 2, and both of its updates replayed after
        // the restart.
        ("duplicate", 3),
    ] {
        assert_eq!(totals[reason], n, "{reason}: {totals}");
    }
    for (round, ok) in [(1, 5), (2, 6)] {
        let rec = r["rounds"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["round"] == round)
            .unwrap();
        assert_eq!(rec["status"], "ok", "{rec}");
        assert_eq!(rec["clients_ok"], ok, "{rec}");
    }
    // Every announcement and adapter the broker carried was signed by the aggregator.
    let messages = sniffer.messages();
    assert!(all_signed_by(&messages, FLEET, &agg_public) >= 4);
    // The accepted global adapter is FedAvg of the genuine updates only: w = 0.1 + 0.2.
    let last = messages
        .iter()
        .rev()
        .find(|(t, p)| t.ends_with("/global") && !p.is_empty())
        .unwrap();
    let Message::GlobalAdapter(g) = Envelope::decode(&last.1).unwrap().message else {
        panic!("not a global adapter")
    };
    assert_eq!(g.round, 2);
    for v in g.tensors[0].to_f32() {
        assert!(
            (v - 0.3).abs() < 1e-6,
            "forged values leaked into the adapter: {v}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// One small real round: the edge-client binary on the real trunk, over TLS, signing.

#[test]
fn a_real_edge_client_trains_a_signed_round_over_tls_behind_the_shipped_acl() {
    const FLEET: &str = "real";
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let pki = Pki::new();
    let (_broker, port, _) = shipped_mosquitto(
        &etc,
        &pki,
        &[("fedpeft-aggregator", "agg-pw"), ("pi-01", "pi-pw")],
    );
    let (agg_key, agg_public) = aggregator_keygen(dir.path());
    // `edge-client keygen` makes the client's key and prints the public key to enrol.
    let client_key = dir.path().join("pi-01.key");
    let out = Command::new(binary("edge-client"))
        .args(["keygen", "--out"])
        .arg(&client_key)
        .output()
        .expect("run edge-client keygen");
    assert!(out.status.success(), "{out:?}");
    let client_public = sign::parse_public_key(std::str::from_utf8(&out.stdout).unwrap()).unwrap();
    let enrolled = enrolment(dir.path(), &[("pi-01", client_public)]);
    std::fs::write(dir.path().join("agg.pw"), "agg-pw\n").unwrap();
    std::fs::write(dir.path().join("pi.pw"), "pi-pw\n").unwrap();
    let ca = etc.join("ca.crt");
    let cache = fedpeft_tests::e2e::shared_cache();
    let text = format!(
        r#"fleet = "{FLEET}"
run_id = {RUN}
rounds = 1
min_clients = 1
round_timeout_secs = 300
seed = 3

[local]
batch_size = 16
learning_rate = 0.001
optimizer = "adamw"

[broker]
url = "mqtts://localhost:{port}"
ca_file = "{ca}"
username = "fedpeft-aggregator"
password_file = "{pw}"
max_packet_bytes = 1048576

[security]
signing_key = "{key}"
enrolled_keys = "{enrolled}"

[model]
backbone = "{backbone}"
peft = "lora"
lora_rank = 8
lora_alpha = 16.0
eval_examples = 64
cache_dir = "{cache}"

[output]
dir = "{out}"
"#,
        ca = ca.display(),
        pw = dir.path().join("agg.pw").display(),
        key = agg_key.display(),
        enrolled = enrolled.display(),
        backbone = fedpeft_tests::e2e::backbone().display(),
        cache = cache.display(),
        out = dir.path().join("out").display(),
    );
    let config = dir.path().join("aggregator.toml");
    std::fs::write(&config, text).unwrap();
    let mut cmd = Command::new(binary("aggregator"));
    cmd.arg("--config").arg(&config);
    let mut aggregator = Proc::spawn("aggregator", cmd);
    aggregator
        .wait_for_line("aggregator ready", Duration::from_secs(120))
        .expect("aggregator ready over mqtts");

    let mut client = Command::new(binary("edge-client"));
    client
        .args(["--broker", &format!("mqtts://localhost:{port}")])
        .arg("--ca-file")
        .arg(&ca)
        .args(["--username", "pi-01", "--password-file"])
        .arg(dir.path().join("pi.pw"))
        .arg("--signing-key")
        .arg(&client_key)
        .args(["--aggregator-key", &sign::public_key_hex(&agg_public)])
        .args(["--fleet", FLEET, "--client-id", "pi-01"])
        .args(["--run-id", &RUN.to_string()])
        .arg("--model-dir")
        .arg(fedpeft_tests::e2e::backbone())
        .args(["--runtime", "auto", "--peft", "lora", "--image-size", "96"])
        .args(["--dataset", "fashion-mnist", "--partition", "iid"])
        .args(["--num-clients", "8", "--client-index", "0", "--seed", "3"])
        .args(["--max-examples", "32"])
        .arg("--cache-dir")
        .arg(&cache)
        .env("RAYON_NUM_THREADS", "1");
    let mut client = Proc::spawn("pi-01", client);

    let status = aggregator
        .wait_exit(Duration::from_secs(300))
        .expect("the aggregator finished the round");
    assert!(status.success(), "aggregator exited with {status}");
    let status = client
        .wait_exit(Duration::from_secs(60))
        .expect("the edge client exits when the run is done");
    assert!(status.success(), "edge client exited with {status}");
    let r = report(dir.path());
    let r1 = &r["rounds"][1];
    assert_eq!(
        (r1["round"].clone(), r1["status"].clone()),
        (1.into(), "ok".into()),
        "{r}"
    );
    assert_eq!(r1["clients_ok"], 1, "{r1}");
    assert!(
        r["rejected"].as_object().is_none_or(|m| m.is_empty()),
        "{r}"
    );
    // The client accepted the aggregator's signed messages and refused nothing.
    assert!(
        client
            .output()
            .iter()
            .any(|l| l.contains("edge client finished") && l.contains("rejected_messages=0")),
        "the edge client refused messages or did not finish cleanly"
    );
}
