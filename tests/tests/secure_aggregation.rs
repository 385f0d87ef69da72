//! Secure aggregation (SecAgg+) end to end: the aggregator with its embedded broker and 8 real
//! edge clients (EfficientNet-Lite0 trunk, LoRA), neighbourhoods of k = 4, threshold t = 3,
//! arithmetic mod 2^16, and a sniffer on the broker that records every message.
//!
//! - round 1: client-07 goes silent after advertising its keys; round 2: client-06 after
//!   dealing its shares (its pairwise masks are removed with its reconstructed mask key);
//!   round 3: client-05 after its masked input (it is in the sum without revealing): each
//!   round completes, and its unmasked sum equals — exactly, as integers mod 2^16 — the sum of
//!   the quantized inputs of the clients the report lists in it (each device wrote its own
//!   input to `$FEDPEFT_SECAGG_DUMP_DIR`, which nothing ever sends);
//! - round 4: five clients go silent after sharing, so fewer than t are left: the round fails
//!   with the reason stated in the report, the global adapter is unchanged, and round 5 runs;
//! - no masked vector on the broker equals its client's input (the coordinates agree no more
//!   often than chance), and masked vectors pass a chi-square test of uniformity that the
//!   inputs fail; nothing the aggregator writes (report, checkpoint, globals) contains any
//!   client's input.
//!
//! A second fleet (5 clients, k = 4, t = 3) is signed and runs over Mosquitto, with an attacker
//! on the broker and the aggregator SIGKILLed mid-protocol:
//! - round 1: as the round is announced, key material for client-01 signed by a key that is not
//!   its enrolled one is published on its topic (before client-01's own); once client-02's
//!   masked input is on the broker, it is published again (a replay), and client-03's shares
//!   are kept for later. Each is refused and counted by reason, and the round completes with
//!   all five clients (client-01's real keys are in the roster);
//! - round 2: once the roster is out, the aggregator is SIGKILLed and started again on its
//!   checkpoint: the round fails with the stated reason ("restarted"), and no unmasking of it
//!   ever happens;
//! - round 3: client-03's round-1 shares (a share for another round) are refused; the round
//!   completes with everyone.
//!
//! Refusals of malformed messages (wrong lengths, wrong stages, unknown or mismatched senders,
//! forged shares) are also the round machine's tests (`aggregator/tests/secure_rounds.rs`) and
//! `fedpeft-secagg`'s.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use fedpeft_protocol::sign;
use fedpeft_protocol::{Envelope, FleetName, Message, SigningKey};
use fedpeft_tests::e2e::{Federation, round_record};
use fedpeft_tests::{Mosquitto, Proc, Sniffer, binary, free_port};

const CLIENTS: usize = 8;
const ROUNDS: u32 = 5;
const MAX_PACKET: usize = 262_144;
const BITS: u8 = 16;
/// Distributed DP in the signed fleet: S and σ.
const DP_CLIP: f32 = 1.0;
const DP_SIGMA: f32 = 0.5;

fn read_u32s(path: &Path) -> Vec<u32> {
    std::fs::read(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn names(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// Pearson's chi-square statistic of the top 8 bits of `values` (m-bit) over 256 buckets.
fn chi_square(values: &[u32]) -> f64 {
    let mut buckets = [0u64; 256];
    for v in values {
        buckets[((v >> (BITS - 8)) & 0xff) as usize] += 1;
    }
    let e = values.len() as f64 / 256.0;
    buckets.iter().map(|&o| (o as f64 - e).powi(2) / e).sum()
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn the_aggregator_learns_exactly_the_sum_through_dropouts_at_every_stage() {
    let dir = tempfile::tempdir().unwrap();
    let dumps = dir.path().join("dumps");
    std::fs::create_dir(&dumps).unwrap();
    let fed = Federation {
        fleet: "secagg".into(),
        run_id: 23,
        max_packet: MAX_PACKET,
        dir: dir.path().to_path_buf(),
        clients: CLIENTS,
        max_examples: 48,
    };
    let port = free_port();
    let top = format!(
        "min_clients = {CLIENTS}\nquorum = 3\nround_timeout_secs = 240.0\n\n\
         [secure_aggregation]\nneighbours = 4\nthreshold = 3\nmodulus_bits = {BITS}\n\
         clip = 0.25\nstage_timeout_secs = 8.0\n"
    );
    let config = fed.aggregator_config("embedded", port, ROUNDS, &top, "epochs = 1");
    let mut cmd = std::process::Command::new(binary("aggregator"));
    cmd.arg("--config")
        .arg(&config)
        .env("FEDPEFT_SECAGG_DUMP_DIR", &dumps);
    let mut aggregator = fed.start_aggregator_cmd(cmd, "aggregator");
    let sniffer = Sniffer::start(port, &fed.fleet, MAX_PACKET);
    let url = format!("mqtt://127.0.0.1:{port}");
    let drops: BTreeMap<usize, &str> = [
        (7, "keys@1"),
        (6, "shares@2"),
        (5, "masked@3"),
        (0, "shares@4"),
        (1, "shares@4"),
        (2, "shares@4"),
        (3, "shares@4"),
        (4, "shares@4"),
    ]
    .into();
    let mut clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let extra = ["--secagg-drop-after", drops[&i]];
            let mut cmd = fed.client_command(&url, i, &extra);
            cmd.env("FEDPEFT_SECAGG_DUMP_DIR", &dumps);
            fedpeft_tests::Proc::spawn(&format!("client-{i:02}"), cmd)
        })
        .collect();

    let start = Instant::now();
    let report = loop {
        if let Ok(b) = std::fs::read(fed.out().join("report.json"))
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b)
            && v["finished"] == true
        {
            break v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(900),
            "the run did not finish:\n{}",
            aggregator.output().join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    };

    let modulus = 1u64 << BITS;
    let mut checked = 0;
    for r in 1..=ROUNDS {
        let rec = round_record(&report, r);
        let secure = &rec["secure"];
        assert!(secure.is_object(), "round {r} has no secure record: {rec}");
        eprintln!(
            "round {r}: {} advertised, {} shared, {} masked, {} revealed, stage ms {}, failure {}",
            secure["advertised"].as_array().map_or(0, Vec::len),
            secure["shared"].as_array().map_or(0, Vec::len),
            secure["masked"].as_array().map_or(0, Vec::len),
            secure["revealed"].as_array().map_or(0, Vec::len),
            secure["stage_ms"],
            secure["failure"]
        );
        if r == 4 {
            assert_eq!(rec["status"], "failed", "round 4: {rec}");
            let why = secure["failure"].as_str().unwrap_or_default();
            assert!(
                !why.is_empty(),
                "round 4 failed without a stated reason: {rec}"
            );
            continue;
        }
        assert_eq!(rec["status"], "ok", "round {r}: {rec}");
        let masked = names(&secure["masked"]);
        let shared = names(&secure["shared"]);
        let revealed = names(&secure["revealed"]);
        let has = |list: &[String], c: &str| list.iter().any(|x| x == c);
        match r {
            1 => assert!(!has(&shared, "client-07"), "round 1: {secure}"),
            2 => {
                assert!(has(&shared, "client-06"), "round 2: {secure}");
                assert!(!has(&masked, "client-06"), "round 2: {secure}");
            }
            3 => {
                assert!(has(&masked, "client-05"), "round 3: {secure}");
                assert!(!has(&revealed, "client-05"), "round 3: {secure}");
            }
            _ => assert_eq!(masked.len(), CLIENTS, "round {r}: {secure}"),
        }
        assert_eq!(rec["clients_ok"], masked.len(), "round {r}");
        // The unmasked sum is exactly the sum of the survivors' quantized inputs.
        let sum = read_u32s(&dumps.join(format!("aggregator-r{r}.sum")));
        let mut expected = vec![0u64; sum.len()];
        for c in &masked {
            let input = read_u32s(&dumps.join(format!("{c}-r{r}.input")));
            assert_eq!(input.len(), sum.len(), "round {r}: {c}'s input length");
            for (e, v) in expected.iter_mut().zip(&input) {
                *e = (*e + u64::from(*v)) % modulus;
            }
        }
        let got: Vec<u64> = sum.iter().map(|&v| u64::from(v)).collect();
        assert_eq!(
            got, expected,
            "round {r}: the unmasked sum is not the inputs' sum"
        );
        checked += 1;
    }
    assert_eq!(checked, 4, "rounds 1, 2, 3 and 5 checked");
    assert_eq!(
        round_record(&report, 5)["status"],
        "ok",
        "round 5 runs after the failed one"
    );

    // What crossed the broker: masked vectors, never an input.
    let mut seen_masked = 0;
    for (topic, payload) in sniffer.messages() {
        let Ok(env) = Envelope::decode(&payload) else {
            continue;
        };
        if let Message::SecAggMasked(m) = env.message {
            let values = fedpeft_secagg::unpack(&m.values, BITS, m.len as usize).unwrap();
            let input = read_u32s(&dumps.join(format!("{}-r{}.input", m.client, m.round)));
            let same = values.iter().zip(&input).filter(|(a, b)| a == b).count();
            // Chance agreement is len / 2^16 (under 1 for a LoRA adapter): allow a handful.
            assert!(
                same <= 8,
                "{topic}: {same} of {} masked values equal the input",
                values.len()
            );
            // 255 degrees of freedom. The test runs on about 20 masked vectors per run, so the
            // bound is the p = 6e-13 critical value (450), not a 99.9 % one (330.5, which a
            // uniform vector exceeds once in a thousand: about one run in fifty would fail).
            const CRITICAL: f64 = 450.0;
            let (cm, ci) = (chi_square(&values[1..]), chi_square(&input[1..]));
            assert!(
                cm < CRITICAL,
                "{topic}: masked vector not uniform (chi-square {cm:.0})"
            );
            assert!(
                ci > CRITICAL,
                "{topic}: the input itself looks uniform ({ci:.0})"
            );
            seen_masked += 1;
        }
    }
    assert!(
        seen_masked >= 20,
        "only {seen_masked} masked vectors on the broker"
    );

    // Nothing the aggregator keeps holds an input.
    let inputs: Vec<Vec<u8>> = std::fs::read_dir(&dumps)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "input"))
        .map(|e| {
            let values = read_u32s(&e.path());
            fedpeft_secagg::pack(&values[1..33], BITS)
        })
        .collect();
    for f in files(&fed.out()) {
        let bytes = std::fs::read(&f).unwrap();
        for needle in &inputs {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_slice()),
                "{} contains a client's quantized input",
                f.display()
            );
        }
    }

    aggregator.terminate(Duration::from_secs(10));
    for c in &mut clients {
        c.terminate(Duration::from_secs(10));
    }
}

/// `edge-client keygen --out FILE` (or the aggregator's): the key file and its public key.
fn keygen(program: &str, path: &Path) -> (std::path::PathBuf, fedpeft_protocol::VerifyingKey) {
    let out = std::process::Command::new(binary(program))
        .args(["keygen", "--out"])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("run {program} keygen: {e}"));
    assert!(out.status.success(), "{program} keygen: {out:?}");
    let public = sign::parse_public_key(std::str::from_utf8(&out.stdout).unwrap()).unwrap();
    (path.to_path_buf(), public)
}

/// The first recorded message (topic, payload, envelope) that `want` picks, waiting up to 300 s.
fn wait_for(
    sniffer: &Sniffer,
    what: &str,
    aggregator: &Proc,
    want: impl Fn(&str, &Envelope) -> bool,
) -> (String, Vec<u8>, Envelope) {
    let start = Instant::now();
    loop {
        for (topic, payload) in sniffer.messages() {
            if let Ok(env) = Envelope::decode(&payload)
                && want(&topic, &env)
            {
                return (topic, payload, env);
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "never saw {what}:\n{}",
            aggregator.output().join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_announce(env: &Envelope, round: u32) -> bool {
    matches!(&env.message, Message::SecureRoundAnnounce(a) if a.announce.round == round)
}

/// A publisher on the broker that is not part of the fleet.
fn attacker(port: u16) -> rumqttc::Client {
    let mut opts = rumqttc::MqttOptions::new("attacker", "127.0.0.1", port);
    opts.set_max_packet_size(MAX_PACKET + 1024, MAX_PACKET + 1024);
    let (client, mut connection) = rumqttc::Client::new(opts, 64);
    std::thread::spawn(move || for _ in connection.iter() {});
    client
}

fn publish(attacker: &rumqttc::Client, topic: &str, payload: Vec<u8>) {
    attacker
        .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
        .expect("attacker publish");
}

#[test]
fn forged_keys_replays_and_an_aggregator_killed_mid_protocol_are_refused_or_fail_cleanly() {
    const N: usize = 5;
    const ROUNDS: u32 = 3;
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(MAX_PACKET as u32);
    let fleet_name = "secagg-signed";
    let fed = Federation {
        fleet: fleet_name.into(),
        run_id: 24,
        max_packet: MAX_PACKET,
        dir: dir.path().to_path_buf(),
        clients: N,
        max_examples: 48,
    };
    let (agg_key, agg_public) = keygen("aggregator", &dir.path().join("aggregator.key"));
    let mut enrolled = String::from("[clients]\n");
    let mut client_keys = Vec::new();
    for i in 0..N {
        let id = format!("client-{i:02}");
        let (path, public) = keygen("edge-client", &dir.path().join(format!("{id}.key")));
        enrolled.push_str(&format!("{id} = \"{}\"\n", sign::public_key_hex(&public)));
        client_keys.push(path);
    }
    let (forger_key, _) = keygen("edge-client", &dir.path().join("forger.key"));
    let forger: SigningKey = sign::read_signing_key(&forger_key).unwrap();
    let enrolment = dir.path().join("enrolled.toml");
    std::fs::write(&enrolment, enrolled).unwrap();
    let top = format!(
        "min_clients = {N}\nquorum = 3\nround_timeout_secs = 240.0\n\n\
         [security]\nsigning_key = \"{}\"\nenrolled_keys = \"{}\"\n\n\
         [secure_aggregation]\nneighbours = 4\nthreshold = 3\nmodulus_bits = {BITS}\n\
         clip = 0.25\nstage_timeout_secs = 8.0\n\n\
         [dp]\nclip_norm = {DP_CLIP}\nnoise_multiplier = {DP_SIGMA}\nfleet_size = {N}\n",
        agg_key.display(),
        enrolment.display()
    );
    let config = fed.aggregator_config(&broker.url(), 0, ROUNDS, &top, "epochs = 1");
    let dumps = dir.path().join("dumps");
    std::fs::create_dir(&dumps).unwrap();
    let start_aggregator = |name: &str| {
        let mut cmd = std::process::Command::new(binary("aggregator"));
        cmd.arg("--config")
            .arg(&config)
            .env("FEDPEFT_SECAGG_DUMP_DIR", &dumps);
        fed.start_aggregator_cmd(cmd, name)
    };
    let mut aggregator = start_aggregator("aggregator");
    let sniffer = Sniffer::start(broker.port, fleet_name, MAX_PACKET);
    let attacker = attacker(broker.port);
    let agg_hex = sign::public_key_hex(&agg_public);
    let mut clients: Vec<_> = (0..N)
        .map(|i| {
            let key = client_keys[i].to_str().unwrap().to_string();
            let extra = ["--signing-key", &key, "--aggregator-key", &agg_hex];
            let mut cmd = fed.client_command(&broker.url(), i, &extra);
            cmd.env("FEDPEFT_SECAGG_DUMP_DIR", &dumps);
            Proc::spawn(&format!("client-{i:02}"), cmd)
        })
        .collect();
    let fleet = FleetName::new(fleet_name).unwrap();
    let topic_of = |client: &str| format!("fedpeft/v1/{fleet_name}/update/{client}");

    // Round 1: forged key material for client-01, before its own.
    wait_for(&sniffer, "round 1's announcement", &aggregator, |_, e| {
        is_announce(e, 1)
    });
    let forged = Envelope::new(
        24,
        1,
        fedpeft_protocol::SecAggKeys {
            client: fedpeft_protocol::ClientId::new("client-01").unwrap(),
            round: 1,
            enc_pk: [9; 32],
            mask_pk: [9; 32],
            commitment: [7; 32],
        },
    )
    .encode_signed(&fleet, &forger)
    .unwrap();
    publish(&attacker, &topic_of("client-01"), forged);
    // A replay of client-02's masked input; client-03's shares kept for round 3.
    let (topic, masked, _) = wait_for(
        &sniffer,
        "client-02's masked input",
        &aggregator,
        |_, e| matches!(&e.message, Message::SecAggMasked(m) if m.round == 1 && m.client.as_str() == "client-02"),
    );
    publish(&attacker, &topic, masked);
    let (shares_topic, shares, _) = wait_for(
        &sniffer,
        "client-03's shares",
        &aggregator,
        |_, e| matches!(&e.message, Message::SecAggShares(m) if m.round == 1 && m.client.as_str() == "client-03"),
    );

    // Round 2: SIGKILL once the roster is out, then start again on the checkpoint.
    wait_for(
        &sniffer,
        "round 2's roster",
        &aggregator,
        |_, e| matches!(&e.message, Message::SecAggRoster(r) if r.round == 2),
    );
    aggregator.kill_hard();
    let mut aggregator = start_aggregator("aggregator-restarted");

    // Round 3: round 1's shares again.
    wait_for(&sniffer, "round 3's announcement", &aggregator, |_, e| {
        is_announce(e, 3)
    });
    publish(&attacker, &shares_topic, shares);

    let status = aggregator
        .wait_exit(Duration::from_secs(600))
        .unwrap_or_else(|| panic!("the restarted aggregator did not finish"));
    assert!(status.success(), "aggregator exited with {status}");
    let report = fed.report();

    let r1 = round_record(&report, 1);
    assert_eq!(r1["status"], "ok", "round 1: {r1}");
    let shared = names(&r1["secure"]["shared"]);
    assert_eq!(shared.len(), N, "round 1: everyone shared: {r1}");
    assert_eq!(names(&r1["secure"]["masked"]).len(), N, "round 1: {r1}");
    let rejected = &r1["rejected"];
    assert_eq!(
        rejected["bad_signature"], 1,
        "round 1: the forged keys are refused as bad_signature: {r1}"
    );
    let replays: u64 = rejected
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.as_str() != "bad_signature")
        .map(|(_, v)| v.as_u64().unwrap())
        .sum();
    assert_eq!(replays, 1, "round 1: the masked replay is refused: {r1}");
    // The roster carries client-01's own keys, not the forger's.
    let (_, _, roster) = wait_for(
        &sniffer,
        "round 1's roster",
        &aggregator,
        |_, e| matches!(&e.message, Message::SecAggRoster(r) if r.round == 1),
    );
    let Message::SecAggRoster(roster) = roster.message else {
        unreachable!()
    };
    let entry = roster
        .entries
        .iter()
        .find(|c| c.client.as_str() == "client-01")
        .expect("client-01 in round 1's roster");
    assert_ne!(entry.enc_pk, [9; 32], "the forged key reached the roster");

    let r2 = round_record(&report, 2);
    assert_eq!(r2["status"], "failed", "round 2: {r2}");
    let why = r2["secure"]["failure"].as_str().unwrap_or_default();
    assert!(why.contains("restarted"), "round 2's reason: {r2}");
    // No unmask request for round 2 ever crossed the broker, so no share of it was revealed.
    for (topic, payload) in sniffer.messages() {
        if let Ok(env) = Envelope::decode(&payload) {
            match &env.message {
                Message::SecAggUnmask(u) => assert_ne!(u.round, 2, "{topic}: round 2 unmasked"),
                Message::SecAggReveal(r) => assert_ne!(r.round, 2, "{topic}: round 2 revealed"),
                _ => {}
            }
        }
    }

    let r3 = round_record(&report, 3);
    assert_eq!(r3["status"], "ok", "round 3: {r3}");

    // Distributed DP: each device added discrete Gaussian noise of the announced size, the
    // unmasked sum is exactly the sum of the noised inputs (one weight per client), and the
    // accountant stated ε for the two aggregated rounds (the failed one cost nothing).
    let messages = sniffer.messages();
    for r in [1, 3] {
        let setup = messages
            .iter()
            .filter_map(|(_, p)| Envelope::decode(p).ok())
            .find_map(|e| match e.message {
                Message::SecureRoundAnnounce(a) if a.announce.round == r => Some(a.setup),
                _ => None,
            })
            .expect("the round's announcement");
        let dp = setup.dp.expect("distributed DP announced");
        assert_eq!((dp.clip_norm, dp.value_clip), (DP_CLIP, 0.25), "round {r}");
        // σ·S / (reference · √min_contributions) with reference W = 5, min_contributions the
        // quorum, 3; in steps of range / levels.
        let per_device = f64::from(DP_SIGMA * DP_CLIP) / (N as f64 * 3f64.sqrt());
        let levels = ((1u64 << (BITS - 1)) - N as u64 - 1) as f64;
        let step = f64::from(setup.clip) / levels;
        assert!(
            (dp.noise_steps * step / per_device - 1.0).abs() < 1e-3,
            "round {r}: {dp:?}, clip {}",
            setup.clip
        );
        let modulus = 1i64 << BITS;
        let signed = |v: i64| {
            let v = v.rem_euclid(modulus);
            if v >= modulus / 2 { v - modulus } else { v }
        };
        let mut expected = vec![0u64; 0];
        for i in 0..N {
            let c = format!("client-{i:02}");
            let clean = read_u32s(&dumps.join(format!("{c}-r{r}.clean")));
            let input = read_u32s(&dumps.join(format!("{c}-r{r}.input")));
            assert_eq!(clean[0], 1, "round {r}: {c} weighs 1 under DP");
            assert_eq!(input[0], 1, "round {r}: no noise on the weight");
            let noise: Vec<f64> = clean[1..]
                .iter()
                .zip(&input[1..])
                .map(|(&a, &b)| signed(i64::from(b) - i64::from(a)) as f64)
                .collect();
            let n = noise.len() as f64;
            let mean = noise.iter().sum::<f64>() / n;
            let sd = (noise.iter().map(|z| (z - mean).powi(2)).sum::<f64>() / n).sqrt();
            eprintln!(
                "round {r}: {c}: noise mean {mean:.1}, sd {sd:.1} (announced {:.1})",
                dp.noise_steps
            );
            assert!(
                (sd / dp.noise_steps - 1.0).abs() < 0.05 && mean.abs() < 5.0 * sd / n.sqrt(),
                "round {r}: {c}'s noise: mean {mean}, sd {sd}, announced {}",
                dp.noise_steps
            );
            if expected.is_empty() {
                expected = vec![0; input.len()];
            }
            for (e, v) in expected.iter_mut().zip(&input) {
                *e = (*e + u64::from(*v)) % modulus as u64;
            }
        }
        let sum: Vec<u64> = read_u32s(&dumps.join(format!("aggregator-r{r}.sum")))
            .into_iter()
            .map(u64::from)
            .collect();
        assert_eq!(sum[0], N as u64, "round {r}: one weight per client");
        assert_eq!(sum, expected, "round {r}: the sum of the noised inputs");
    }
    let eps = |r: u32| round_record(&report, r)["robust"]["dp_epsilon"].as_f64();
    let (e1, e3) = (
        eps(1).expect("ε after round 1"),
        eps(3).expect("ε after round 3"),
    );
    assert!(e1 > 0.0 && e3 > e1, "ε: round 1 {e1}, round 3 {e3}");
    assert_eq!(eps(2), None, "the failed round states no ε");
    let std = round_record(&report, 3)["robust"]["dp_noise_std"]
        .as_f64()
        .unwrap();
    assert!(
        (std - f64::from(DP_SIGMA * DP_CLIP) / N as f64).abs() < 1e-6,
        "noise std {std}"
    );
    assert_eq!(names(&r3["secure"]["masked"]).len(), N, "round 3: {r3}");
    // Round 1's shares are refused as late, named with their client and round (the clients'
    // own redeliveries of round 2's messages to the restarted aggregator are late too).
    assert!(
        r3["rejected"]["late"].as_u64().unwrap_or(0) >= 1,
        "round 3: round 1's shares are refused as late: {r3}"
    );
    let output = aggregator.output();
    assert!(
        output.iter().any(|l| l.contains("rejected")
            && l.contains("client=client-03")
            && l.contains("round=1 ")
            && l.contains("late")),
        "the restarted aggregator names round 1's shares:\n{}",
        output.join("\n")
    );

    for c in &mut clients {
        c.terminate(Duration::from_secs(10));
    }
}
