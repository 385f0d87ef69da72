//! Unit tests: whole rounds with dropouts, refusals of bad input, statistics of the masks, and
//! the parameters, quantization, packing and graph rules.

use std::collections::{BTreeMap, BTreeSet};

use rand::RngCore;
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;

use crate::*;

const ROUND: u32 = 7;
const GRAPH_SEED: [u8; 32] = [0x5e; 32];

fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

fn params(k: u16, t: u16, m: u8) -> Params {
    Params {
        neighbours: k,
        threshold: t,
        modulus_bits: m,
        clip: 1.0,
    }
}

/// A whole round, in memory: the clients, the aggregator, and each client's plain input.
struct Sim {
    p: Params,
    n: usize,
    clients: BTreeMap<String, ClientRound>,
    roster: Vec<RosterEntry>,
    /// Raw update, num_examples.
    raw: BTreeMap<String, (Vec<f32>, u64)>,
    /// Quantized x_u.
    x: BTreeMap<String, Vec<u32>>,
    server: Option<ServerRound>,
    rng: ChaCha20Rng,
}

impl Sim {
    fn new(n: usize, p: Params, d: usize, seed: u64) -> Sim {
        let mut rng = rng(seed);
        let ids: Vec<String> = (0..n).map(|i| format!("client-{i:02}")).collect();
        let mut clients = BTreeMap::new();
        let mut roster = Vec::new();
        for id in &ids {
            let (c, ad) = ClientRound::new(p, ROUND, id, &mut rng);
            roster.push(ad.entry(id.as_str()));
            clients.insert(id.clone(), c);
        }
        let mut raw = BTreeMap::new();
        for id in &ids {
            let v: Vec<f32> = (0..d)
                .map(|_| (rng.next_u32() as f64 / u32::MAX as f64 * 3.0 - 1.5) as f32)
                .collect();
            let examples = 1 + u64::from(rng.next_u32() % 100);
            raw.insert(id.clone(), (v, examples));
        }
        let total: u64 = raw.values().map(|(_, e)| e).sum();
        let mut x = BTreeMap::new();
        for (id, (v, e)) in &raw {
            x.insert(id.clone(), quantize(&p, n, v, *e, total, &mut rng).unwrap());
        }
        let server = ServerRound::new(p, ROUND, n, d + 1, GRAPH_SEED, roster.clone()).unwrap();
        Sim {
            p,
            n,
            clients,
            roster,
            raw,
            x,
            server: Some(server),
            rng,
        }
    }

    fn server(&mut self) -> &mut ServerRound {
        self.server.as_mut().unwrap()
    }

    fn ids(&self) -> Vec<String> {
        self.clients.keys().cloned().collect()
    }

    /// Stage 2 for every client but `skip`; returns each one's shares as sent.
    fn share(&mut self, skip: &[&str]) -> BTreeMap<String, Vec<(String, Vec<u8>)>> {
        let mut sent = BTreeMap::new();
        for id in self.ids() {
            if skip.contains(&id.as_str()) {
                continue;
            }
            let c = self.clients.get_mut(&id).unwrap();
            let shares = c.share(&self.roster, &GRAPH_SEED, &mut self.rng).unwrap();
            assert!(
                shares
                    .iter()
                    .all(|(_, ct)| ct.len() == SHARE_CIPHERTEXT_LEN)
            );
            self.server
                .as_mut()
                .unwrap()
                .accept_shares(&id, shares.clone())
                .unwrap();
            sent.insert(id, shares);
        }
        sent
    }

    /// Stage 3 for every client in u2 but `skip`; returns the masked vectors.
    fn mask(&mut self, relay: &Relay, skip: &[&str]) -> BTreeMap<String, Vec<u32>> {
        let mut ys = BTreeMap::new();
        for id in &relay.u2 {
            if skip.contains(&id.as_str()) {
                continue;
            }
            let c = self.clients.get_mut(id).unwrap();
            let y = c
                .masked_input(&relay.inbox[id], &relay.u2, &self.x[id])
                .unwrap();
            self.server.as_mut().unwrap().accept_masked(id, &y).unwrap();
            ys.insert(id.clone(), y);
        }
        ys
    }

    /// Stage 4 for every client in u3 but `skip`.
    fn reveal(&mut self, req: &UnmaskRequest, skip: &[&str]) {
        for id in &req.u3 {
            if skip.contains(&id.as_str()) {
                continue;
            }
            let reveals = self.unmask(id, req);
            self.server().accept_reveals(id, reveals).unwrap();
        }
    }

    fn unmask(&mut self, id: &str, req: &UnmaskRequest) -> Vec<Reveal> {
        self.clients
            .get_mut(id)
            .unwrap()
            .unmask(&req.u3, &req.dropped)
            .unwrap()
    }

    fn finish(&mut self) -> Result<Unmasked, Failure> {
        self.server.take().unwrap().finish()
    }

    /// The plain wrapping sum of the quantized inputs of `set`.
    fn plain_sum(&self, set: &[String]) -> Vec<u32> {
        let mask = self.p.mask();
        let len = self.x.values().next().unwrap().len();
        let mut sum = vec![0u32; len];
        for id in set {
            for (s, v) in sum.iter_mut().zip(&self.x[id]) {
                *s = s.wrapping_add(*v) & mask;
            }
        }
        sum
    }

    /// Runs a whole round with the given dropouts and checks the sum is exact over u3.
    fn run_exact(&mut self, drop_share: &[&str], drop_mask: &[&str], drop_reveal: &[&str]) {
        self.share(drop_share);
        let relay = self.server().close_sharing().unwrap();
        for d in drop_share {
            assert!(!relay.u2.iter().any(|u| u == d), "{d} must not be in u2");
        }
        self.mask(&relay, drop_mask);
        let req = self.server().close_masking().unwrap();
        let dropped: Vec<String> = drop_mask.iter().map(|s| s.to_string()).collect();
        assert_eq!(req.dropped, dropped);
        self.reveal(&req, drop_reveal);
        assert!(self.server().can_finish());
        let out = self.finish().unwrap();
        assert_eq!(out.u3, req.u3);
        assert!(out.bad_shares.is_empty());
        assert_eq!(
            out.sum,
            self.plain_sum(&out.u3),
            "unmasked sum must be exact"
        );
        self.check_dequantized(&out);
    }

    /// dequantize(sum) is Σ scale·clip(v) within step·n, and the weight is Σ num_examples.
    fn check_dequantized(&self, out: &Unmasked) {
        let total: u64 = self.raw.values().map(|(_, e)| e).sum();
        let (weight, values) = dequantize(&self.p, self.n, &out.sum);
        let survivors_weight: u64 = out.u3.iter().map(|u| self.raw[u].1).sum();
        assert_eq!(weight, survivors_weight & u64::from(self.p.mask()));
        let step = self.p.step(self.n);
        for (i, got) in values.iter().enumerate() {
            let want: f64 = out
                .u3
                .iter()
                .map(|u| {
                    let (v, e) = &self.raw[u];
                    f64::from(v[i].clamp(-1.0, 1.0)) * *e as f64 / total as f64
                })
                .sum();
            assert!(
                (got - want).abs() <= step * self.n as f64,
                "coordinate {i}: {got} vs {want}"
            );
        }
    }
}

// ---------------------------------------------------------------- 1. exact sums

#[test]
fn exact_sum_complete_graph_n8() {
    // k = 8 >= n - 1: every other client is a neighbour (plain SecAgg), k' = 7, t = 5.
    let mut sim = Sim::new(8, params(8, 5, 20), 1000, 1);
    assert_eq!(sim.server().neighbours("client-00").unwrap().len(), 7);
    sim.run_exact(&[], &[], &[]);
}

#[test]
fn exact_sum_ring_n20_k6_t4() {
    let mut sim = Sim::new(20, params(6, 4, 24), 1000, 2);
    for id in sim.ids() {
        assert_eq!(sim.server().neighbours(&id).unwrap().len(), 6);
    }
    sim.run_exact(&[], &[], &[]);
}

#[test]
fn exact_sum_at_32_bits() {
    let mut sim = Sim::new(6, params(4, 3, 32), 200, 3);
    sim.run_exact(&[], &[], &[]);
}

// ---------------------------------------------------------------- 2. dropouts

#[test]
fn dropout_after_advertising() {
    let mut sim = Sim::new(20, params(6, 4, 24), 300, 10);
    sim.run_exact(&["client-03"], &[], &[]);
}

#[test]
fn dropout_after_sharing_removes_pairwise_masks_via_mask_key() {
    let mut sim = Sim::new(20, params(6, 4, 24), 300, 11);
    sim.run_exact(&[], &["client-05"], &[]);
}

#[test]
fn dropout_after_masked_input_still_exact() {
    let mut sim = Sim::new(20, params(6, 4, 24), 300, 12);
    sim.run_exact(&[], &[], &["client-07"]);
}

#[test]
fn dropouts_at_every_stage_in_one_round() {
    let mut sim = Sim::new(20, params(6, 4, 24), 300, 13);
    sim.run_exact(&["client-01"], &["client-10", "client-15"], &["client-18"]);
}

#[test]
fn dropouts_complete_graph() {
    let mut sim = Sim::new(8, params(8, 5, 20), 300, 14);
    sim.run_exact(&["client-00"], &["client-04"], &[]);
    // With t = 5 of k' = 7, two more can drop after sending their masked input.
    let mut sim = Sim::new(8, params(8, 5, 20), 300, 15);
    sim.run_exact(&[], &[], &["client-03", "client-06"]);
}

/// Clients that are neighbours of `c` in the server's graph.
fn neighbours_of(sim: &mut Sim, c: &str) -> Vec<String> {
    sim.server().neighbours(c).unwrap().to_vec()
}

#[test]
fn too_few_after_sharing_fails_with_reason() {
    let mut sim = Sim::new(20, params(6, 4, 24), 50, 20);
    let hood = neighbours_of(&mut sim, "client-00");
    let skip: Vec<&str> = hood.iter().take(3).map(String::as_str).collect();
    sim.share(&skip);
    let err = sim.server().close_sharing().unwrap_err();
    match &err {
        Failure::TooFewSurvivors {
            round,
            stage,
            have,
            need,
            ..
        } => {
            assert_eq!((*round, *stage, *have, *need), (ROUND, Stage::Share, 3, 4));
        }
        other => panic!("unexpected {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("3 neighbours left") && msg.contains("at least 4"),
        "{msg}"
    );
    // The round is dead.
    assert!(matches!(
        sim.server().close_sharing(),
        Err(Failure::OutOfOrder { .. })
    ));
}

#[test]
fn too_few_after_masking_fails_with_reason() {
    let mut sim = Sim::new(5, params(4, 3, 20), 50, 21);
    sim.share(&[]);
    let relay = sim.server().close_sharing().unwrap();
    sim.mask(&relay, &["client-00", "client-01", "client-02"]);
    let err = sim.server().close_masking().unwrap_err();
    assert_eq!(
        err,
        Failure::TooFewClients {
            round: ROUND,
            stage: Stage::MaskedInput,
            have: 2,
            need: 3
        }
    );
    assert!(err.to_string().contains("2 clients left"));

    // In a ring: three of a client's six neighbours shared but sent no masked input.
    let mut sim = Sim::new(20, params(6, 4, 24), 50, 23);
    let hood = neighbours_of(&mut sim, "client-04");
    let skip: Vec<&str> = hood.iter().take(3).map(String::as_str).collect();
    sim.share(&[]);
    let relay = sim.server().close_sharing().unwrap();
    sim.mask(&relay, &skip);
    match sim.server().close_masking().unwrap_err() {
        Failure::TooFewSurvivors {
            stage, have, need, ..
        } => assert_eq!((stage, have, need), (Stage::MaskedInput, 3, 4)),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn too_few_reveals_fails_with_reason() {
    let mut sim = Sim::new(20, params(6, 4, 24), 50, 22);
    let hood = neighbours_of(&mut sim, "client-09");
    let silent: Vec<&str> = hood.iter().take(3).map(String::as_str).collect();
    sim.share(&[]);
    let relay = sim.server().close_sharing().unwrap();
    sim.mask(&relay, &[]);
    let req = sim.server().close_masking().unwrap();
    sim.reveal(&req, &silent);
    assert!(!sim.server().can_finish());
    let err = sim.finish().unwrap_err();
    match &err {
        Failure::NotEnoughShares {
            stage,
            kind,
            have,
            need,
            ..
        } => assert_eq!(
            (*stage, *kind, *have, *need),
            (Stage::Finish, RevealKind::SelfMask, 3, 4)
        ),
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("3 shares"), "{err}");
}

// ---------------------------------------------------------------- 3. refusals

#[test]
fn tampered_ciphertext_names_the_sender() {
    let mut sim = Sim::new(8, params(4, 3, 20), 20, 30);
    sim.share(&[]);
    let relay = sim.server().close_sharing().unwrap();
    let a = "client-02".to_string();
    let ids = sim.ids();
    let genuine = relay.inbox[&a].clone();
    let mut tampered = genuine.clone();
    let from = tampered[1].0.clone();
    tampered[1].1[10] ^= 0x01;
    let c = sim.clients.get_mut(&a).unwrap();
    let err = c
        .masked_input(&tampered, &relay.u2, &sim.x[&a])
        .unwrap_err();
    assert_eq!(
        err,
        SecAggError::BadShareCiphertext {
            round: ROUND,
            from: from.clone(),
            to: a.clone()
        }
    );
    assert!(err.to_string().contains(&from));
    // Missing a share from a u2 neighbour is named too.
    let mut short = genuine.clone();
    let gone = short.remove(0).0;
    let err = c.masked_input(&short, &relay.u2, &sim.x[&a]).unwrap_err();
    assert!(matches!(err, SecAggError::MissingShare { ref from, .. } if *from == gone));
    // A share claimed from a non-neighbour is refused.
    let hood = c.neighbours().unwrap().to_vec();
    let stranger = ids
        .into_iter()
        .find(|v| *v != a && !hood.contains(v))
        .unwrap();
    let mut forged = short.clone();
    forged.push((stranger.clone(), vec![0; SHARE_CIPHERTEXT_LEN]));
    let err = c.masked_input(&forged, &relay.u2, &sim.x[&a]).unwrap_err();
    assert!(matches!(err, SecAggError::BadShare { ref from, .. } if *from == stranger));
    // After all those refusals the genuine inbox is accepted.
    c.masked_input(&genuine, &relay.u2, &sim.x[&a]).unwrap();
}

#[test]
fn share_for_another_round_is_refused() {
    let p = params(4, 3, 20);
    let n = 6;
    let mut sim = Sim::new(n, p, 20, 31);
    // client-01 again, same keys (same RNG draws) but round + 1.
    let mut key_rng = rng(31);
    let _ = ClientRound::new(p, ROUND, "client-00", &mut key_rng);
    let (mut evil, ad) = ClientRound::new(p, ROUND + 1, "client-01", &mut key_rng);
    assert_eq!(ad.enc_pk, sim.roster[1].enc_pk, "same keys, other round");
    let mut roster = sim.roster.clone();
    roster[1] = ad.entry("client-01");
    let evil_shares = evil.share(&roster, &GRAPH_SEED, &mut rng(99)).unwrap();
    sim.share(&[]);
    let relay = sim.server().close_sharing().unwrap();
    let (to, ct) = evil_shares[0].clone();
    let mut inbox = relay.inbox[&to].clone();
    let slot = inbox.iter_mut().find(|(f, _)| f == "client-01").unwrap();
    slot.1 = ct;
    let c = sim.clients.get_mut(&to).unwrap();
    let err = c.masked_input(&inbox, &relay.u2, &sim.x[&to]).unwrap_err();
    assert_eq!(
        err,
        SecAggError::BadShareCiphertext {
            round: ROUND,
            from: "client-01".into(),
            to: to.clone()
        }
    );
    // The genuine inbox still works: the refusal changed nothing.
    c.masked_input(&relay.inbox[&to], &relay.u2, &sim.x[&to])
        .unwrap();
}

#[test]
fn client_never_reveals_both_secrets_of_a_neighbour() {
    let mut sim = Sim::new(8, params(4, 3, 20), 20, 32);
    sim.share(&[]);
    let relay = sim.server().close_sharing().unwrap();
    sim.mask(&relay, &["client-03"]);
    let req = sim.server().close_masking().unwrap();
    let me = "client-02".to_string();
    let c = sim.clients.get_mut(&me).unwrap();
    // A client in both lists.
    let mut both = req.dropped.clone();
    both.push("client-04".into());
    let err = c.unmask(&req.u3, &both).unwrap_err();
    assert!(
        matches!(err, SecAggError::InconsistentSets { ref client, .. } if client == "client-04")
    );
    // u3 ∪ dropped must be u2.
    let err = c.unmask(&req.u3, &[]).unwrap_err();
    assert!(
        matches!(err, SecAggError::InconsistentSets { ref client, .. } if client == "client-03")
    );
    // The genuine request, twice: the same answer, one kind per neighbour.
    let first = c.unmask(&req.u3, &req.dropped).unwrap();
    assert_eq!(c.unmask(&req.u3, &req.dropped).unwrap(), first);
    let ofs: BTreeSet<&String> = first.iter().map(|r| &r.of).collect();
    assert_eq!(ofs.len(), first.len());
    // Then a different request that would flip a neighbour from survivor to dropped.
    let survivor_neighbour = first
        .iter()
        .find(|r| r.kind == RevealKind::SelfMask)
        .unwrap()
        .of
        .clone();
    let u3: Vec<String> = req
        .u3
        .iter()
        .filter(|u| **u != survivor_neighbour)
        .cloned()
        .collect();
    let mut dropped = req.dropped.clone();
    dropped.push(survivor_neighbour);
    dropped.sort();
    let err = c.unmask(&u3, &dropped).unwrap_err();
    assert_eq!(
        err,
        SecAggError::ConflictingUnmask {
            round: ROUND,
            client: me
        }
    );
}

#[test]
fn server_refuses_replay_wrong_length_unknown_and_non_neighbours() {
    let mut sim = Sim::new(8, params(4, 3, 20), 20, 33);
    let id = "client-01".to_string();
    let shares = sim
        .clients
        .get_mut(&id)
        .unwrap()
        .share(&sim.roster, &GRAPH_SEED, &mut rng(5))
        .unwrap();
    let hood = sim.server().neighbours(&id).unwrap().to_vec();
    let outsider = sim
        .ids()
        .into_iter()
        .find(|v| *v != id && !hood.contains(v))
        .unwrap();
    // To a non-neighbour.
    let mut bad = shares.clone();
    bad[0].0 = outsider.clone();
    let err = sim.server().accept_shares(&id, bad).unwrap_err();
    assert!(
        matches!(err, SecAggError::WrongRecipients { ref to, problem, .. }
        if *to == outsider && problem.contains("non-neighbour"))
    );
    // One missing.
    let err = sim
        .server()
        .accept_shares(&id, shares[1..].to_vec())
        .unwrap_err();
    assert!(matches!(
        err,
        SecAggError::WrongRecipients {
            problem: "hold none for",
            ..
        }
    ));
    // Twice to one neighbour.
    let mut twice = shares.clone();
    twice[1] = twice[0].clone();
    assert!(matches!(
        sim.server().accept_shares(&id, twice),
        Err(SecAggError::WrongRecipients {
            problem: "hold more than one for",
            ..
        })
    ));
    // Wrong ciphertext length.
    let mut long = shares.clone();
    long[0].1.push(0);
    assert!(matches!(
        sim.server().accept_shares(&id, long),
        Err(SecAggError::WrongLength { got, expected, .. }) if got == expected + 1
    ));
    // Unknown client.
    assert_eq!(
        sim.server().accept_shares("mallory", shares.clone()),
        Err(SecAggError::UnknownClient {
            round: ROUND,
            stage: Stage::Share,
            client: "mallory".into()
        })
    );
    // Accepted once, then a replay.
    sim.server().accept_shares(&id, shares.clone()).unwrap();
    assert!(matches!(
        sim.server().accept_shares(&id, shares),
        Err(SecAggError::Replay {
            stage: Stage::Share,
            ..
        })
    ));
    // Masked input before the stage opens.
    assert!(matches!(
        sim.server().accept_masked(&id, &[0; 21]),
        Err(SecAggError::OutOfOrder { .. })
    ));
    sim.share(&["client-01"]);
    let relay = sim.server().close_sharing().unwrap();
    let ys = sim.mask(&relay, &["client-02"]);
    let y = ys["client-03"].clone();
    assert!(matches!(
        sim.server().accept_masked("client-03", &y),
        Err(SecAggError::Replay {
            stage: Stage::MaskedInput,
            ..
        })
    ));
    assert!(matches!(
        sim.server().accept_masked("client-02", &y[1..]),
        Err(SecAggError::WrongLength {
            got: 20,
            expected: 21,
            ..
        })
    ));
    assert!(matches!(
        sim.server().accept_masked("mallory", &y),
        Err(SecAggError::UnknownClient { .. })
    ));
    let mut big = y.clone();
    big[3] = 1 << 20;
    assert!(matches!(
        sim.server().accept_masked("client-02", &big),
        Err(SecAggError::OutOfRange { index: 3, .. })
    ));
    // Nothing of the refused vectors went into the sum.
    let req = sim.server().close_masking().unwrap();
    assert_eq!(req.dropped, vec!["client-02".to_string()]);
    sim.reveal(&req, &[]);
    let out = sim.finish().unwrap();
    assert_eq!(out.sum, sim.plain_sum(&out.u3));
}

#[test]
fn server_refuses_malformed_reveals_without_changing_state() {
    let mut sim = Sim::new(8, params(4, 3, 20), 20, 34);
    sim.share(&[]);
    let relay = sim.server().close_sharing().unwrap();
    sim.mask(&relay, &["client-05"]);
    let req = sim.server().close_masking().unwrap();
    let id = "client-04".to_string(); // a neighbour of client-05? not necessarily
    let good = sim.unmask(&id, &req);
    // Wrong kind.
    let mut flipped = good.clone();
    flipped[0].kind = match flipped[0].kind {
        RevealKind::SelfMask => RevealKind::MaskKey,
        RevealKind::MaskKey => RevealKind::SelfMask,
    };
    let err = sim.server().accept_reveals(&id, flipped).unwrap_err();
    assert!(matches!(err, SecAggError::BadReveal { ref from, .. } if *from == id));
    // Wrong length.
    let mut short = good.clone();
    short[0].share.pop();
    assert!(matches!(
        sim.server().accept_reveals(&id, short),
        Err(SecAggError::WrongLength { .. })
    ));
    // Wrong x-coordinate.
    let mut moved = good.clone();
    moved[0].share[0] ^= 0x40;
    assert!(matches!(
        sim.server().accept_reveals(&id, moved),
        Err(SecAggError::BadReveal { .. })
    ));
    // Not a neighbour of the sender.
    let hood = sim.server().neighbours(&id).unwrap().to_vec();
    let outsider = req
        .u3
        .iter()
        .find(|v| **v != id && !hood.contains(v))
        .unwrap()
        .clone();
    let mut stray = good.clone();
    stray[0].of = outsider;
    assert!(matches!(
        sim.server().accept_reveals(&id, stray),
        Err(SecAggError::BadReveal {
            problem: "not a neighbour of the sender",
            ..
        })
    ));
    // Twice the same neighbour.
    let mut dup = good.clone();
    dup.push(good[0].clone());
    assert!(matches!(
        sim.server().accept_reveals(&id, dup),
        Err(SecAggError::BadReveal { .. })
    ));
    // From a dropped client.
    assert!(matches!(
        sim.server().accept_reveals("client-05", vec![]),
        Err(SecAggError::NotInSet { .. })
    ));
    // The genuine message is still accepted, once.
    sim.server().accept_reveals(&id, good.clone()).unwrap();
    assert!(matches!(
        sim.server().accept_reveals(&id, good),
        Err(SecAggError::Replay { .. })
    ));
    sim.reveal(
        &req,
        &[id.as_str()], // already revealed above
    );
    let out = sim.finish().unwrap();
    assert_eq!(out.sum, sim.plain_sum(&out.u3));
}

/// Replaces the 32 y-bytes of a revealed share with random bytes (keeping the x-coordinate).
fn corrupt(share: &mut [u8], rng: &mut ChaCha20Rng) {
    rng.fill_bytes(&mut share[1..]);
}

#[test]
fn wrong_reveal_share_is_named_and_tolerated() {
    let mut sim = Sim::new(20, params(6, 4, 24), 100, 35);
    sim.share(&[]);
    let relay = sim.server().close_sharing().unwrap();
    sim.mask(&relay, &["client-11"]);
    let req = sim.server().close_masking().unwrap();
    let mut noise = rng(77);
    // Two liars: one about a survivor's self mask, one about the dropped client's mask key.
    let liar_key = sim.server().neighbours("client-11").unwrap()[0].clone();
    let liar_self = "client-00".to_string();
    for id in req.u3.clone() {
        let mut reveals = sim.unmask(&id, &req);
        if id == liar_self {
            let r = reveals
                .iter_mut()
                .find(|r| r.kind == RevealKind::SelfMask)
                .unwrap();
            corrupt(&mut r.share, &mut noise);
        }
        if id == liar_key {
            let r = reveals.iter_mut().find(|r| r.of == "client-11").unwrap();
            assert_eq!(r.kind, RevealKind::MaskKey);
            corrupt(&mut r.share, &mut noise);
        }
        sim.server().accept_reveals(&id, reveals).unwrap();
    }
    let out = sim.finish().unwrap();
    assert_eq!(out.sum, sim.plain_sum(&out.u3));
    assert!(out.unattributed.is_empty());
    let mut liars = vec![liar_self, liar_key];
    liars.sort();
    liars.dedup();
    assert_eq!(out.bad_shares, liars);
}

#[test]
fn too_many_wrong_shares_fail_with_reason() {
    let mut sim = Sim::new(20, params(6, 4, 24), 100, 36);
    sim.share(&[]);
    let relay = sim.server().close_sharing().unwrap();
    sim.mask(&relay, &[]);
    let req = sim.server().close_masking().unwrap();
    let victim = "client-08".to_string();
    let liars: Vec<String> = sim.server().neighbours(&victim).unwrap()[..3].to_vec();
    let mut noise = rng(78);
    for id in req.u3.clone() {
        let mut reveals = sim.unmask(&id, &req);
        if liars.contains(&id) {
            let r = reveals.iter_mut().find(|r| r.of == victim).unwrap();
            corrupt(&mut r.share, &mut noise);
        }
        sim.server().accept_reveals(&id, reveals).unwrap();
    }
    // Every target has its 6 shares, so the driver would try.
    assert!(sim.server().can_finish());
    let err = sim.finish().unwrap_err();
    match &err {
        Failure::Unrecoverable {
            client,
            kind,
            have,
            need,
            tried,
            ..
        } => {
            assert_eq!(
                (client.as_str(), *kind, *have, *need),
                (victim.as_str(), RevealKind::SelfMask, 6, 4)
            );
            assert_eq!(*tried, 15, "all C(6, 4) subsets");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("commitment"), "{err}");
}

#[test]
fn reconstruction_retries_other_subsets_with_bounded_effort() {
    use crate::crypto::{deal, recover};
    use crate::server::{Why, reconstruct};
    let mut r = rng(37);
    let secret = [0x42u8; 32];
    let dealt = deal(&secret, 4, 20, &mut r);
    assert_eq!(
        *recover(4, &[&*dealt[3], &*dealt[7], &*dealt[8], &*dealt[19]]).unwrap(),
        secret
    );
    assert!(recover(4, &[&*dealt[3], &*dealt[7], &*dealt[8]]).is_none());
    let holders: Vec<(String, crate::crypto::ShareBytes)> = dealt
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("h{i:02}"), s.clone()))
        .collect();
    let verify = |s: &[u8; 32]| *s == secret;
    // All good.
    let got = reconstruct(&holders[..6], 4, verify).unwrap();
    assert_eq!(
        (*got.secret, got.wrong.len(), got.unattributed),
        (secret, 0, false)
    );
    // The first holder's share is wrong: the first subset fails, a later one passes, and with
    // 1 <= (6 - 4 + 1) / 2 wrong share its holder is named.
    let mut one_bad = holders[..6].to_vec();
    one_bad[0].1[5] ^= 0xff;
    let got = reconstruct(&one_bad, 4, verify).unwrap();
    assert_eq!(*got.secret, secret);
    assert_eq!(got.wrong, vec!["h00".to_string()]);
    assert!(!got.unattributed);
    // Two wrong of six: the secret is still exact (four good shares), but two wrong shares are
    // beyond the unique-decoding radius: nobody is named (in particular no honest holder).
    let mut two_bad = holders[..6].to_vec();
    corrupt(&mut two_bad[1].1[..], &mut r);
    corrupt(&mut two_bad[4].1[..], &mut r);
    let got = reconstruct(&two_bad, 4, verify).unwrap();
    assert_eq!(*got.secret, secret);
    assert!(got.wrong.is_empty() && got.unattributed);
    // Two wrong of ten (radius 3): both named.
    let mut ten = holders[..10].to_vec();
    corrupt(&mut ten[0].1[..], &mut r);
    corrupt(&mut ten[7].1[..], &mut r);
    let got = reconstruct(&ten, 4, verify).unwrap();
    assert_eq!(got.wrong, vec!["h00".to_string(), "h07".to_string()]);
    // 17 of 20 wrong: C(20, 4) = 4845 subsets, the search stops at the bound.
    let mut mostly_bad = holders.clone();
    for (_, s) in mostly_bad.iter_mut().skip(3) {
        corrupt(&mut s[..], &mut r);
    }
    assert_eq!(
        reconstruct(&mostly_bad, 4, verify).unwrap_err(),
        Why::NoneAgree {
            tried: MAX_RECONSTRUCTION_TRIES
        }
    );
    assert_eq!(
        reconstruct(&holders[..3], 4, verify).unwrap_err(),
        Why::TooFew
    );
}

#[test]
fn client_refuses_bad_rosters() {
    let p = params(4, 3, 20);
    let mut r = rng(40);
    let ids: Vec<String> = (0..6).map(|i| format!("c{i}")).collect();
    let mut clients = Vec::new();
    let mut roster = Vec::new();
    for id in &ids {
        let (c, ad) = ClientRound::new(p, ROUND, id, &mut r);
        roster.push(ad.entry(id.as_str()));
        clients.push(c);
    }
    let c = &mut clients[0];
    // Missing me.
    let err = c.share(&roster[1..], &GRAPH_SEED, &mut r).unwrap_err();
    assert!(matches!(
        err,
        SecAggError::RosterMismatch {
            problem: "has no entry",
            ..
        }
    ));
    // My keys replaced.
    let mut swapped = roster.clone();
    swapped[0].mask_pk = roster[1].mask_pk;
    let err = c.share(&swapped, &GRAPH_SEED, &mut r).unwrap_err();
    assert!(matches!(
        err,
        SecAggError::RosterMismatch {
            problem: "has other keys",
            ..
        }
    ));
    // Duplicates.
    let mut dup = roster.clone();
    dup.push(roster[2].clone());
    let err = c.share(&dup, &GRAPH_SEED, &mut r).unwrap_err();
    assert!(matches!(err, SecAggError::Duplicate { ref client, .. } if client == "c2"));
    // Too few (t + 1 = 4 needed).
    let err = c.share(&roster[..3], &GRAPH_SEED, &mut r).unwrap_err();
    assert_eq!(
        err,
        SecAggError::TooFewMembers {
            round: ROUND,
            stage: Stage::Share,
            have: 3,
            need: 4
        }
    );
    // A small-order key (the identity, u = 0).
    let mut weak = roster.clone();
    weak[3].enc_pk = [0; 32];
    let err = c.share(&weak, &GRAPH_SEED, &mut r).unwrap_err();
    assert!(
        matches!(err, SecAggError::WeakKey { ref client, key: "encryption", .. } if client == "c3")
    );
    assert!(matches!(
        ServerRound::new(p, ROUND, 6, 3, GRAPH_SEED, weak),
        Err(SecAggError::WeakKey { .. })
    ));
    // Out of order.
    assert!(matches!(
        c.masked_input(&[], &ids, &[0]),
        Err(SecAggError::OutOfOrder { .. })
    ));
    assert!(matches!(
        c.unmask(&ids, &[]),
        Err(SecAggError::OutOfOrder { .. })
    ));
    // The good roster works, once.
    c.share(&roster, &GRAPH_SEED, &mut r).unwrap();
    assert!(matches!(
        c.share(&roster, &GRAPH_SEED, &mut r),
        Err(SecAggError::OutOfOrder { .. })
    ));
    // Server: duplicates, too few, too many.
    let mut dup = roster.clone();
    dup.push(roster[0].clone());
    assert!(matches!(
        ServerRound::new(p, ROUND, 10, 3, GRAPH_SEED, dup),
        Err(SecAggError::Duplicate { .. })
    ));
    assert!(matches!(
        ServerRound::new(p, ROUND, 10, 3, GRAPH_SEED, roster[..3].to_vec()),
        Err(SecAggError::TooFewMembers {
            have: 3,
            need: 4,
            ..
        })
    ));
    assert!(matches!(
        ServerRound::new(p, ROUND, 5, 3, GRAPH_SEED, roster.clone()),
        Err(SecAggError::TooManyMembers {
            have: 6,
            max: 5,
            ..
        })
    ));
    // A small-order key of a client that is not a neighbour: the client never uses it, so
    // it does not check it (the aggregator refuses such a key as it arrives).
    let graph = neighbourhoods(&GRAPH_SEED, &ids, 4);
    let stranger = ids
        .iter()
        .position(|v| v != "c1" && !graph["c1"].contains(v))
        .expect("c1 has a non-neighbour among 6 with k = 4");
    let mut weak = roster.clone();
    weak[stranger].enc_pk = [0; 32];
    clients[1].share(&weak, &GRAPH_SEED, &mut r).unwrap();
}

#[test]
fn client_debug_prints_no_secrets() {
    let mut r = rng(41);
    let (c, _) = ClientRound::new(params(4, 3, 20), ROUND, "alice", &mut r);
    let s = format!("{c:?}");
    assert!(s.contains("alice") && s.contains("<redacted>"), "{s}");
    let reveal = Reveal {
        of: "bob".into(),
        kind: RevealKind::SelfMask,
        share: vec![0xab; REVEAL_SHARE_LEN],
    };
    assert!(!format!("{reveal:?}").contains("171"));
}

#[test]
fn rounds_are_deterministic_given_the_rng() {
    let run = |seed| {
        let mut sim = Sim::new(6, params(4, 3, 20), 30, seed);
        let sent = sim.share(&[]);
        let relay = sim.server().close_sharing().unwrap();
        let ys = sim.mask(&relay, &[]);
        (sent, ys)
    };
    assert_eq!(run(50), run(50));
    assert_ne!(run(50).1, run(51).1);
}

// ---------------------------------------------------------------- 4. masks look uniform

/// Chi-square statistic of the top 8 bits of 16-bit values over 256 buckets.
fn chi_square_top8(values: &[u32]) -> f64 {
    let mut buckets = [0u64; 256];
    for &v in values {
        buckets[((v >> 8) & 0xff) as usize] += 1;
    }
    let expected = values.len() as f64 / 256.0;
    buckets
        .iter()
        .map(|&o| (o as f64 - expected).powi(2) / expected)
        .sum()
}

#[test]
fn masked_vectors_look_uniform() {
    // 99.9 % quantile of chi-square with 255 degrees of freedom.
    const CRITICAL: f64 = 330.52;
    let d = 100_000;
    let mut sim = Sim::new(4, params(2, 2, 16), d, 60);
    sim.share(&[]);
    let relay = sim.server().close_sharing().unwrap();
    let ys = sim.mask(&relay, &[]);
    for (id, y) in &ys {
        let x = &sim.x[id];
        let chi = chi_square_top8(y);
        assert!(chi < CRITICAL, "{id}: masked chi-square {chi}");
        let plain = chi_square_top8(x);
        assert!(plain > 100.0 * CRITICAL, "{id}: plain chi-square {plain}");
        // Expected d / 2^16 ≈ 1.5 equal coordinates.
        let same = x.iter().zip(y).filter(|(a, b)| a == b).count();
        assert!(same <= 12, "{id}: {same} coordinates unmasked");
    }
}

// ---------------------------------------------------------------- 5. parameters, quantization, packing

#[test]
fn params_rules_name_the_numbers() {
    let ok = params(6, 4, 24);
    assert_eq!(ok.check(100), Ok(()));
    let cases: Vec<(Params, usize, &str)> = vec![
        (params(5, 3, 24), 10, "neighbours 5 must be even"),
        (params(0, 1, 24), 10, "neighbours 0 must be in 2..=254"),
        (
            params(256, 200, 24),
            10,
            "neighbours 256 must be in 2..=254",
        ),
        (
            params(8, 4, 24),
            10,
            "threshold 4 must be > neighbours/2 = 4",
        ),
        (
            params(8, 3, 24),
            10,
            "threshold 3 must be > neighbours/2 = 4",
        ),
        (
            params(6, 7, 24),
            10,
            "threshold 7 must be <= neighbours = 6",
        ),
        (params(6, 4, 11), 10, "modulus_bits 11 must be in 12..=32"),
        (params(6, 4, 33), 10, "modulus_bits 33 must be in 12..=32"),
        (
            params(6, 4, 12),
            1920,
            "modulus_bits 12 with max_clients 1920 leaves levels = 2^11 - 1920 - 1 = 127, fewer than 128",
        ),
    ];
    for (p, max_clients, want) in cases {
        let msg = p.check(max_clients).unwrap_err().to_string();
        assert!(msg.starts_with(want), "{msg:?} should start with {want:?}");
    }
    assert_eq!(params(6, 4, 12).check(1919), Ok(()));
    for clip in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let p = Params { clip, ..ok };
        assert!(matches!(p.check(10), Err(ParamError::BadClip { .. })));
        assert!(
            p.check(10)
                .unwrap_err()
                .to_string()
                .contains("must be finite and > 0")
        );
    }
    // Huge max_clients does not overflow.
    assert!(matches!(
        ok.check(usize::MAX),
        Err(ParamError::TooFewLevels { .. })
    ));
}

#[test]
fn effective_neighbourhood_and_threshold() {
    let p = params(6, 4, 24);
    assert_eq!(p.effective(20), (6, 4));
    assert_eq!(p.effective(8), (6, 4));
    assert_eq!(p.effective(7), (6, 4)); // k = n - 1: complete graph, same size
    assert_eq!(p.effective(6), (5, 4)); // k > n - 1: every other member
    assert_eq!(p.effective(4), (3, 3));
    assert_eq!(p.effective(0), (0, 0));
}

#[test]
fn quantize_refuses_bad_input() {
    let p = params(6, 4, 20);
    let mut r = rng(70);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        assert!(matches!(
            quantize(&p, 10, &[0.0, bad], 1, 2, &mut r),
            Err(QuantError::NonFinite { index: 1, .. })
        ));
    }
    assert_eq!(
        quantize(&p, 10, &[0.0], 3, 2, &mut r),
        Err(QuantError::TooManyExamples {
            num_examples: 3,
            reference_total: 2
        })
    );
    assert_eq!(
        quantize(&p, 10, &[0.0], 0, 0, &mut r),
        Err(QuantError::ZeroReferenceTotal)
    );
    assert!(matches!(
        quantize(&params(6, 2, 20), 10, &[0.0], 1, 2, &mut r),
        Err(QuantError::Params(ParamError::ThresholdTooLow { .. }))
    ));
}

#[test]
fn quantize_layout_and_clipping() {
    let p = params(6, 4, 16);
    let max_clients = 10;
    let levels = p.levels(max_clients);
    assert_eq!(levels, (1 << 15) - 11);
    let mut r = rng(71);
    // scale 1, values at the clip and beyond: exactly ±levels.
    let x = quantize(
        &p,
        max_clients,
        &[1.0, -1.0, 5.0, -5.0, 0.0],
        70_000,
        70_000,
        &mut r,
    )
    .unwrap();
    let l = levels as u32;
    assert_eq!(
        x,
        vec![70_000 & 0xffff, l, (1 << 16) - l, l, (1 << 16) - l, 0]
    );
    let (w, v) = dequantize(&p, max_clients, &x);
    assert_eq!(w, 70_000 & 0xffff);
    let want = [1.0, -1.0, 1.0, -1.0, 0.0];
    assert!(
        v.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12),
        "{v:?}"
    );
    assert_eq!(dequantize(&p, max_clients, &[]), (0, vec![]));
}

#[test]
fn stochastic_rounding_is_unbiased() {
    let p = params(6, 4, 12);
    let max_clients = 1;
    let step = p.step(max_clients);
    let mut r = rng(72);
    for z in [2.3f64, -1.7, 0.05, -0.5] {
        let v = (z * step) as f32;
        let exact = f64::from(v) / step;
        let n = 100_000;
        let x = quantize(&p, max_clients, &vec![v; n], 5, 5, &mut r).unwrap();
        let (_, deq) = dequantize(&p, max_clients, &x);
        let mean = deq.iter().sum::<f64>() / n as f64 / step;
        // Each draw is floor or floor + 1: standard deviation of the mean <= 0.5 / sqrt(n).
        assert!(
            (mean - exact).abs() < 5.0 * 0.5 / (n as f64).sqrt(),
            "{z}: mean {mean} vs {exact}"
        );
        let lo = exact.floor();
        assert!(deq.iter().all(|d| {
            let q = (d / step).round();
            q == lo || q == lo + 1.0
        }));
    }
}

#[test]
fn pack_round_trips_and_has_the_documented_layout() {
    // 12 bits: 0xabc, 0x123 -> bits LE: bc, 3a (low nibble c of 0xabc... ) checked by value.
    assert_eq!(pack(&[0xabc, 0x123], 12), vec![0xbc, 0x3a, 0x12]);
    assert_eq!(
        unpack(&[0xbc, 0x3a, 0x12], 12, 2).unwrap(),
        vec![0xabc, 0x123]
    );
    let mut r = rng(80);
    for m in 1..=32u8 {
        for len in [0usize, 1, 2, 3, 7, 8, 9, 100] {
            let mask = if m == 32 { u32::MAX } else { (1u32 << m) - 1 };
            let v: Vec<u32> = (0..len).map(|_| r.next_u32() & mask).collect();
            let bytes = pack(&v, m);
            assert_eq!(bytes.len(), (len * m as usize).div_ceil(8));
            assert_eq!(unpack(&bytes, m, len).unwrap(), v, "m {m} len {len}");
        }
    }
}

#[test]
fn unpack_refuses_bad_input() {
    let bytes = pack(&[1, 2, 3], 12); // 36 bits -> 5 bytes, 4 padding bits
    assert_eq!(bytes.len(), 5);
    assert_eq!(
        unpack(&bytes[..4], 12, 3),
        Err(PackError::Length {
            got: 4,
            expected: 5,
            len: 3,
            m: 12
        })
    );
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(
        unpack(&longer, 12, 3),
        Err(PackError::Length { .. })
    ));
    let mut padded = bytes.clone();
    *padded.last_mut().unwrap() |= 0x10;
    assert!(matches!(
        unpack(&padded, 12, 3),
        Err(PackError::Padding { .. })
    ));
    assert_eq!(unpack(&bytes, 0, 3), Err(PackError::BadWidth { m: 0 }));
    assert_eq!(unpack(&bytes, 33, 3), Err(PackError::BadWidth { m: 33 }));
    assert!(matches!(
        unpack(&bytes, 32, usize::MAX),
        Err(PackError::TooLong { .. })
    ));
}

// ---------------------------------------------------------------- 6. neighbourhoods

#[test]
fn neighbourhoods_are_symmetric_regular_and_seeded() {
    let roster: Vec<String> = (0..25).map(|i| format!("n{i}")).collect();
    for k in [2u16, 4, 6, 10] {
        let g = neighbourhoods(&GRAPH_SEED, &roster, k);
        assert_eq!(g.len(), roster.len());
        for (u, hood) in &g {
            assert_eq!(hood.len(), usize::from(k), "regular");
            assert!(!hood.contains(u), "no self loop");
            assert!(hood.windows(2).all(|w| w[0] < w[1]), "sorted, distinct");
            for v in hood {
                assert!(g[v].contains(u), "symmetric: {u} -> {v}");
            }
        }
        // Deterministic, independent of the roster's order.
        let mut shuffled = roster.clone();
        shuffled.reverse();
        assert_eq!(neighbourhoods(&GRAPH_SEED, &shuffled, k), g);
        // Depends on the seed.
        assert_ne!(neighbourhoods(&[1; 32], &roster, k), g);
    }
    // k >= n - 1: the complete graph.
    let small: Vec<String> = (0..5).map(|i| format!("s{i}")).collect();
    for k in [4u16, 6] {
        let g = neighbourhoods(&GRAPH_SEED, &small, k);
        for (u, hood) in &g {
            let others: Vec<String> = small.iter().filter(|s| *s != u).cloned().collect();
            assert_eq!(*hood, others);
        }
    }
    assert!(neighbourhoods(&GRAPH_SEED, &[], 4).is_empty());
    assert_eq!(
        neighbourhoods(&GRAPH_SEED, &["solo".to_string()], 4)["solo"],
        Vec::<String>::new()
    );
}
