//! Stage 4 of a real SecAgg+ round under fuzzer-chosen dropouts and tampered reveals.
//!
//! Six clients (k = 4, t = 3, m = 16, 4 values). The first input byte picks which clients drop
//! after sharing (every feasible pattern is precomputed once from a fixed seed: honest shares,
//! masked vectors and reveals). The rest of the input is a list of edits to the survivors'
//! honest reveal messages (flip share bytes, change kind / of / x-coordinate, drop, duplicate,
//! truncate, withhold). The aggregator runs every stage honestly, accepts or refuses each
//! survivor's (edited) reveals and finishes. Properties:
//! - nothing panics;
//! - if `finish` succeeds, the sum is exactly the sum of the survivors' inputs;
//! - if every secret has at least t accepted shares of which at most ⌊(N − t + 1)/2⌋ are wrong,
//!   `finish` succeeds and names exactly the holders of the wrong shares (the crate's claim).
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use fedpeft_secagg::{ClientRound, Params, Reveal, RevealKind, RosterEntry, ServerRound};
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use rand::rngs::StdRng;

const N: usize = 6;
const D: usize = 4;
const SEED: [u8; 32] = [5; 32];
const P: Params = Params {
    neighbours: 4,
    threshold: 3,
    modulus_bits: 16,
    clip: 1.0,
};

struct Scenario {
    roster: Vec<RosterEntry>,
    shares: Vec<(String, Vec<(String, Vec<u8>)>)>,
    masked: Vec<(String, Vec<u32>)>,
    reveals: Vec<(String, Vec<Reveal>)>,
    expected: Vec<u32>,
}

fn names() -> Vec<String> {
    (0..N).map(|i| format!("c{i}")).collect()
}

fn input(i: usize) -> Vec<u32> {
    (0..=D)
        .map(|j| ((i * 7919 + j * 104_729) & 0xffff) as u32)
        .collect()
}

fn scenario(pattern: usize) -> Option<Scenario> {
    let names = names();
    let mut rng = StdRng::seed_from_u64(11);
    let (mut clients, roster): (Vec<ClientRound>, Vec<RosterEntry>) = names
        .iter()
        .map(|n| {
            let (c, adv) = ClientRound::new(P, 1, n, &mut rng);
            (c, adv.entry(n.clone()))
        })
        .unzip();
    let mut server = ServerRound::new(P, 1, N, 1 + D, SEED, roster.clone()).ok()?;
    let mut shares = Vec::new();
    for (c, n) in clients.iter_mut().zip(&names) {
        let s = c.share(&roster, &SEED, &mut rng).ok()?;
        server.accept_shares(n, s.clone()).ok()?;
        shares.push((n.clone(), s));
    }
    let relay = server.close_sharing().ok()?;
    let mut masked = Vec::new();
    let mut expected = vec![0u32; 1 + D];
    for (i, (c, n)) in clients.iter_mut().zip(&names).enumerate() {
        if pattern >> i & 1 == 1 {
            continue;
        }
        let x = input(i);
        for (e, v) in expected.iter_mut().zip(&x) {
            *e = e.wrapping_add(*v) & 0xffff;
        }
        let y = c.masked_input(&relay.inbox[n], &relay.u2, &x).ok()?;
        server.accept_masked(n, &y).ok()?;
        masked.push((n.clone(), y));
    }
    let request = server.close_masking().ok()?;
    let mut reveals = Vec::new();
    for (c, n) in clients.iter_mut().zip(&names) {
        if request.u3.contains(n) {
            let r = c.unmask(&request.u3, &request.dropped).ok()?;
            server.accept_reveals(n, r.clone()).ok()?;
            reveals.push((n.clone(), r));
        }
    }
    let out = server.finish().ok()?;
    assert_eq!(out.sum, expected, "honest round, pattern {pattern:#b}");
    assert!(out.bad_shares.is_empty() && out.unattributed.is_empty());
    Some(Scenario {
        roster,
        shares,
        masked,
        reveals,
        expected,
    })
}

fn scenarios() -> &'static Vec<Option<Scenario>> {
    static ALL: OnceLock<Vec<Option<Scenario>>> = OnceLock::new();
    ALL.get_or_init(|| (0..1 << N).map(scenario).collect())
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, ops)) = data.split_first() else {
        return;
    };
    let Some(s) = &scenarios()[usize::from(first) % (1 << N)] else {
        return;
    };
    let names = names();
    let mut server = ServerRound::new(P, 1, N, 1 + D, SEED, s.roster.clone()).unwrap();
    for (n, sh) in &s.shares {
        server.accept_shares(n, sh.clone()).unwrap();
    }
    server.close_sharing().unwrap();
    for (n, y) in &s.masked {
        server.accept_masked(n, y).unwrap();
    }
    server.close_masking().unwrap();

    // The survivors' messages, edited.
    let mut msgs: Vec<(String, Option<Vec<Reveal>>)> = s
        .reveals
        .iter()
        .map(|(n, r)| (n.clone(), Some(r.clone())))
        .collect();
    for op in ops.chunks_exact(4) {
        let (code, who, idx, arg) = (op[0], usize::from(op[1]), usize::from(op[2]), op[3]);
        let m = who % msgs.len();
        let Some(list) = msgs[m].1.as_mut() else {
            continue;
        };
        if code % 8 == 7 {
            msgs[m].1 = None;
            continue;
        }
        if list.is_empty() {
            continue;
        }
        let i = idx % list.len();
        match code % 8 {
            0 => {
                let len = list[i].share.len();
                if len > 1 {
                    let pos = 1 + usize::from(arg) % (len - 1);
                    list[i].share[pos] ^= arg | 1;
                }
            }
            1 => {
                list[i].kind = match list[i].kind {
                    RevealKind::SelfMask => RevealKind::MaskKey,
                    RevealKind::MaskKey => RevealKind::SelfMask,
                }
            }
            2 => {
                list.remove(i);
            }
            3 => {
                let r = list[i].clone();
                list.push(r);
            }
            4 => {
                if let Some(x) = list[i].share.first_mut() {
                    *x = arg;
                }
            }
            5 => list[i].of = names[usize::from(arg) % N].clone(),
            _ => list[i].share.truncate(usize::from(arg) % 40),
        }
    }

    // What was accepted, against the honest shares.
    let honest: BTreeMap<(String, String, RevealKind), Vec<u8>> = s
        .reveals
        .iter()
        .flat_map(|(h, list)| {
            list.iter()
                .map(move |r| ((h.clone(), r.of.clone(), r.kind), r.share.clone()))
        })
        .collect();
    let mut count: BTreeMap<(String, RevealKind), usize> = BTreeMap::new();
    let mut wrong: BTreeMap<(String, RevealKind), BTreeSet<String>> = BTreeMap::new();
    for (holder, list) in msgs {
        let Some(list) = list else { continue };
        if server.accept_reveals(&holder, list.clone()).is_err() {
            continue;
        }
        for r in list {
            *count.entry((r.of.clone(), r.kind)).or_default() += 1;
            if honest.get(&(holder.clone(), r.of.clone(), r.kind)) != Some(&r.share) {
                wrong
                    .entry((r.of.clone(), r.kind))
                    .or_default()
                    .insert(holder.clone());
            }
        }
    }
    let t = usize::from(P.threshold);
    // Every secret the aggregator needs: survivors' self masks, dropped neighbours' keys.
    let u3: BTreeSet<&String> = s.reveals.iter().map(|(n, _)| n).collect();
    let mut needed: Vec<(String, RevealKind)> = u3
        .iter()
        .map(|n| ((*n).clone(), RevealKind::SelfMask))
        .collect();
    for n in &names {
        if u3.contains(n) {
            continue;
        }
        let has_live = server
            .neighbours(n)
            .unwrap_or_default()
            .iter()
            .any(|w| u3.contains(w));
        if has_live {
            needed.push((n.clone(), RevealKind::MaskKey));
        }
    }
    let decodable = needed.iter().all(|key| {
        let c = count.get(key).copied().unwrap_or(0);
        let w = wrong.get(key).map_or(0, BTreeSet::len);
        c >= t && w <= (c + 1 - t) / 2
    });
    let liars: BTreeSet<String> = wrong.values().flatten().cloned().collect();
    let result = server.finish();
    if std::env::var_os("DEEP_STATS").is_some() {
        eprintln!(
            "STATS ok={} decodable={} liars={} named={}",
            result.is_ok(),
            decodable,
            liars.len(),
            result.as_ref().map_or(0, |o| o.bad_shares.len())
        );
    }
    match result {
        Ok(out) => {
            assert_eq!(
                out.sum, s.expected,
                "a finished round must have the exact sum"
            );
            if decodable {
                let named: BTreeSet<String> = out.bad_shares.iter().cloned().collect();
                assert_eq!(named, liars, "wrong shares within the decoding radius");
                assert!(out.unattributed.is_empty(), "{:?}", out.unattributed);
            }
        }
        Err(e) => assert!(!decodable, "decodable round failed: {e}"),
    }
});
