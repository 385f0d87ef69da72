//! Signed (version 2) envelopes: arbitrary bytes through signature verification and the
//! decoder, as given and with a version-2 header byte and a valid CRC added; and a genuinely
//! signed envelope with fuzzer-chosen edits, which must verify if and only if no byte changed.
#![no_main]

use fedpeft_protocol::sign::{is_signed, parse_public_key, verify};
use fedpeft_protocol::{
    ClientId, Envelope, FleetName, SIGNED_VERSION, SigningKey, Status, ClientState, crc32,
};
use libfuzzer_sys::fuzz_target;

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

fn exercise(bytes: &[u8], fleet: &FleetName) {
    let k = key();
    let signed = is_signed(bytes);
    let verified = verify(bytes, fleet, &k.verifying_key()).is_ok();
    assert!(!verified || signed, "verified an envelope that is not version 2");
    if let Ok(env) = Envelope::decode(bytes) {
        let _ = env.message.validate();
    }
}

fuzz_target!(|data: &[u8]| {
    let fleet = FleetName::new("fuzz").unwrap();
    exercise(data, &fleet);
    if let Ok(text) = core::str::from_utf8(data) {
        let _ = parse_public_key(text);
    }
    let mut framed = Vec::with_capacity(data.len() + 5);
    framed.push(SIGNED_VERSION as u8);
    framed.extend_from_slice(data);
    let crc = crc32(&framed);
    framed.extend_from_slice(&crc.to_le_bytes());
    exercise(&framed, &fleet);

    // A real signed envelope, edited at fuzzer-chosen positions.
    let (Some(&n), Some(rest)) = (data.first(), data.get(1..)) else {
        return;
    };
    let env = Envelope::new(
        u64::from(n),
        u32::from(n),
        Status {
            client: ClientId::new("c1").unwrap(),
            state: ClientState::Idle,
        },
    );
    let k = key();
    let good = env.encode_signed(&fleet, &k).expect("a status encodes");
    assert!(verify(&good, &fleet, &k.verifying_key()).is_ok());
    let mut edited = good.clone();
    for pair in rest.chunks(2) {
        if let [pos, x] = pair {
            let i = usize::from(*pos) % edited.len();
            edited[i] ^= *x;
        }
    }
    // The signature covers everything before the trailing CRC.
    let covered = good.len() - 4;
    let ok = verify(&edited, &fleet, &k.verifying_key()).is_ok();
    assert_eq!(
        ok,
        edited[..covered] == good[..covered],
        "verification disagrees with whether a signed byte changed"
    );
    if let Ok(back) = Envelope::decode(&edited) {
        let _ = back.message.validate();
    }
});
