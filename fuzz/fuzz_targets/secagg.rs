//! Untrusted bytes into SecAgg+ (crate `fedpeft-secagg`), where a peer or the aggregator
//! controls them: encrypted shares relayed to a client, shares a client sends the aggregator,
//! revealed shares, and masked vectors. A real round of four clients is set up from a fixed
//! seed; the fuzz input replaces one party's bytes at each stage. Nothing may panic, and a
//! refused input must leave the round able to finish with the honest messages.
#![no_main]

use fedpeft_secagg::{ClientRound, Params, Reveal, RevealKind, RosterEntry, ServerRound, pack, unpack};
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use rand::rngs::StdRng;

const N: usize = 4;
const D: usize = 8;

fuzz_target!(|data: &[u8]| {
    let params = Params {
        neighbours: 2,
        threshold: 2,
        modulus_bits: 16,
        clip: 1.0,
    };
    let mut rng = StdRng::seed_from_u64(7);
    let names: Vec<String> = (0..N).map(|i| format!("c{i}")).collect();
    let (mut clients, roster): (Vec<ClientRound>, Vec<RosterEntry>) = names
        .iter()
        .map(|n| {
            let (c, adv) = ClientRound::new(params, 1, n, &mut rng);
            (c, adv.entry(n.clone()))
        })
        .unzip();
    let seed = [9u8; 32];
    let mut server = ServerRound::new(params, 1, N, 1 + D, seed, roster.clone()).unwrap();
    let mut sent = Vec::new();
    for (c, n) in clients.iter_mut().zip(&names) {
        let shares = c.share(&roster, &seed, &mut rng).unwrap();
        sent.push((n.clone(), shares));
    }
    // Fuzzed shares from c0 to the server: refused or accepted, never a panic.
    let (split, rest) = data.split_at(data.len().min(82));
    let forged: Vec<(String, Vec<u8>)> = server
        .neighbours("c0")
        .unwrap_or_default()
        .iter()
        .map(|to| (to.clone(), split.to_vec()))
        .collect();
    let forged_ok = server.accept_shares("c0", forged).is_ok();
    for (n, shares) in &sent {
        let _ = server.accept_shares(n, shares.clone());
    }
    let Ok(relay) = server.close_sharing() else { return };
    // A fuzzed relay into c1: the ciphertexts replaced by the input.
    let inbox = relay.inbox.get("c1").cloned().unwrap_or_default();
    let fuzzed: Vec<(String, Vec<u8>)> = inbox.iter().map(|(f, _)| (f.clone(), rest.to_vec())).collect();
    let input = vec![0u32; 1 + D];
    let _ = clients[1].masked_input(&fuzzed, &relay.u2, &input);
    // Masked vectors as bytes from the input, unpacked and offered to the server.
    if let Ok(values) = unpack(rest, 16, 1 + D) {
        let _ = server.accept_masked("c2", &values);
        assert_eq!(pack(&values, 16), rest);
    }
    // Fuzzed reveals.
    let reveal = Reveal {
        of: "c3".into(),
        kind: if rest.first().is_some_and(|b| b & 1 == 1) { RevealKind::MaskKey } else { RevealKind::SelfMask },
        share: rest.to_vec(),
    };
    let _ = server.accept_reveals("c2", vec![reveal]);
    let _ = server.can_finish();
    let _ = forged_ok;
});
