//! The cryptographic building blocks, all from well-kept crates: X25519 (x25519-dalek),
//! HKDF-SHA256 (hkdf, sha2), ChaCha20-Poly1305 (chacha20poly1305), the ChaCha20 stream
//! (rand_chacha) and Shamir sharing over GF(256) (blahaj). This module only fixes how they are
//! combined: domain strings, KDF inputs, share layout.

use core::convert::Infallible;

use blahaj::{Share, Sharks};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore as _, SeedableRng};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

/// HKDF salt of the pairwise mask seeds.
pub(crate) const SALT_PAIRWISE: &[u8] = b"fedpeft-secagg-v1 pairwise";
/// HKDF salt of the share-encryption keys.
pub(crate) const SALT_SHARE: &[u8] = b"fedpeft-secagg-v1 share";
/// Prefix of the self-mask commitment.
pub(crate) const DOMAIN_SELF_MASK: &[u8] = b"fedpeft-secagg-v1 self-mask";

/// Bytes of one Shamir share of a 32-byte secret: the x-coordinate (1 byte, `1..=255`) then 32
/// bytes of y (one GF(256) point per secret byte). This is the length of
/// [`crate::Reveal::share`].
pub const REVEAL_SHARE_LEN: usize = 33;
/// Bytes of the plaintext a client encrypts for one neighbour: its share of `b_u`, then its
/// share of `mask_sk_u`.
pub const SHARE_PLAINTEXT_LEN: usize = 2 * REVEAL_SHARE_LEN;
/// Bytes of the Poly1305 tag.
pub const TAG_LEN: usize = 16;
/// Bytes of one encrypted share pair, as a client sends it to a neighbour (through the
/// aggregator).
pub const SHARE_CIPHERTEXT_LEN: usize = SHARE_PLAINTEXT_LEN + TAG_LEN;

/// One Shamir share, zeroed on drop.
pub(crate) type ShareBytes = Zeroizing<[u8; REVEAL_SHARE_LEN]>;

fn push_len_prefixed(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// `round (u32 LE) ‖ len(a) (u64 LE) ‖ a ‖ len(b) (u64 LE) ‖ b`.
fn context(round: u32, a: &str, b: &str) -> Vec<u8> {
    let mut buf = Vec::with_capacity(4 + 16 + a.len() + b.len());
    buf.extend_from_slice(&round.to_le_bytes());
    push_len_prefixed(&mut buf, a);
    push_len_prefixed(&mut buf, b);
    buf
}

/// HKDF-SHA256 with a 32-byte output.
fn hkdf32(ikm: &[u8; 32], salt: &[u8], info: &[u8]) -> Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(Some(salt), ikm);
    let mut okm = Zeroizing::new([0u8; 32]);
    hk.expand(info, &mut okm[..])
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    okm
}

/// Whether a public key is of small order (X25519 with any clamped scalar gives all zeros).
pub(crate) fn is_weak_public_key(pk: &[u8; 32]) -> bool {
    // A clamped scalar is 8·k' with 0 < k' < ℓ, so the result is the identity exactly when the
    // point is in the small-order subgroup.
    x25519_dalek::x25519([9u8; 32], *pk) == [0u8; 32]
}

/// The pairwise mask seed of `me` and `them`: HKDF-SHA256(ikm = X25519(my_sk, their_pk),
/// salt = `fedpeft-secagg-v1 pairwise`, info = round ‖ lp(min id) ‖ lp(max id)). Symmetric.
pub(crate) fn pairwise_seed(
    my_sk: &StaticSecret,
    their_pk: &[u8; 32],
    round: u32,
    me: &str,
    them: &str,
) -> Zeroizing<[u8; 32]> {
    let shared = my_sk.diffie_hellman(&PublicKey::from(*their_pk));
    let (lo, hi) = if me <= them { (me, them) } else { (them, me) };
    hkdf32(shared.as_bytes(), SALT_PAIRWISE, &context(round, lo, hi))
}

/// Encrypts a client's share pair for one neighbour. Key = HKDF-SHA256(X25519(enc_sk_from,
/// enc_pk_to), salt `fedpeft-secagg-v1 share`, info = round ‖ lp(from) ‖ lp(to)), nonce all
/// zero (each key encrypts exactly one message: fresh keys every round, the direction in the
/// info), AAD = the same round ‖ lp(from) ‖ lp(to).
pub(crate) fn seal_shares(
    enc_sk: &StaticSecret,
    to_pk: &[u8; 32],
    round: u32,
    from: &str,
    to: &str,
    plaintext: &[u8; SHARE_PLAINTEXT_LEN],
) -> Vec<u8> {
    let shared = enc_sk.diffie_hellman(&PublicKey::from(*to_pk));
    let ctx = context(round, from, to);
    let key = hkdf32(shared.as_bytes(), SALT_SHARE, &ctx);
    let cipher = ChaCha20Poly1305::new(Key::from_slice(&key[..]));
    cipher
        .encrypt(
            &Nonce::default(),
            Payload {
                msg: plaintext,
                aad: &ctx,
            },
        )
        .expect("ChaCha20-Poly1305 encrypts a 66-byte message")
}

/// Decrypts a share pair sent by `from` to `to` (see [`seal_shares`]); `None` if it does not
/// authenticate or has the wrong length.
pub(crate) fn open_shares(
    enc_sk: &StaticSecret,
    from_pk: &[u8; 32],
    round: u32,
    from: &str,
    to: &str,
    ciphertext: &[u8],
) -> Option<(ShareBytes, ShareBytes)> {
    if ciphertext.len() != SHARE_CIPHERTEXT_LEN {
        return None;
    }
    let shared = enc_sk.diffie_hellman(&PublicKey::from(*from_pk));
    let ctx = context(round, from, to);
    let key = hkdf32(shared.as_bytes(), SALT_SHARE, &ctx);
    let cipher = ChaCha20Poly1305::new(Key::from_slice(&key[..]));
    let plain = Zeroizing::new(
        cipher
            .decrypt(
                &Nonce::default(),
                Payload {
                    msg: ciphertext,
                    aad: &ctx,
                },
            )
            .ok()?,
    );
    if plain.len() != SHARE_PLAINTEXT_LEN {
        return None;
    }
    let mut b = Zeroizing::new([0u8; REVEAL_SHARE_LEN]);
    let mut sk = Zeroizing::new([0u8; REVEAL_SHARE_LEN]);
    b.copy_from_slice(&plain[..REVEAL_SHARE_LEN]);
    sk.copy_from_slice(&plain[REVEAL_SHARE_LEN..]);
    Some((b, sk))
}

/// The commitment to a self-mask seed: SHA-256(`fedpeft-secagg-v1 self-mask` ‖ round LE ‖ b).
pub(crate) fn self_mask_commitment(round: u32, b: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(DOMAIN_SELF_MASK);
    h.update(round.to_le_bytes());
    h.update(b);
    h.finalize().into()
}

/// Clamps 32 random bytes into a canonical X25519 secret key (bits 0–2 and 255 clear, bit 254
/// set). A mask key is dealt in this form so that a reconstructed key is accepted only if it is
/// exactly the dealt bytes (see [`is_clamped`]).
pub(crate) fn clamp(bytes: &mut [u8; 32]) {
    bytes[0] &= 248;
    bytes[31] &= 127;
    bytes[31] |= 64;
}

/// Whether 32 bytes are a clamped X25519 secret key.
pub(crate) fn is_clamped(bytes: &[u8; 32]) -> bool {
    bytes[0] & 7 == 0 && bytes[31] & 0xc0 == 0x40
}

/// Adds (or subtracts) the mask expanded from `seed` into `acc`, mod 2^m: the mask is
/// `ChaCha20Rng::from_seed(seed).next_u32() & (2^m - 1)` per coordinate, in order.
pub(crate) fn apply_mask(acc: &mut [u32], seed: &[u8; 32], mask: u32, subtract: bool) {
    let mut rng = ChaCha20Rng::from_seed(*seed);
    if subtract {
        for a in acc.iter_mut() {
            *a = a.wrapping_sub(rng.next_u32()) & mask;
        }
    } else {
        for a in acc.iter_mut() {
            *a = a.wrapping_add(rng.next_u32()) & mask;
        }
    }
}

/// Hands a rand 0.9 RNG (the workspace's) to blahaj, which draws through rand_core 0.10.
struct Rng010<'a, R: ?Sized>(&'a mut R);

impl<R: rand::RngCore + ?Sized> rand_core_0_10::TryRng for Rng010<'_, R> {
    type Error = Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(self.0.next_u32())
    }
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(self.0.next_u64())
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        self.0.fill_bytes(dst);
        Ok(())
    }
}

impl<R: rand::RngCore + rand::CryptoRng + ?Sized> rand_core_0_10::TryCryptoRng for Rng010<'_, R> {}

/// Deals `count` Shamir shares (threshold `threshold`) of a 32-byte secret; share `i` has
/// x-coordinate `i + 1`. Needs `1 <= threshold <= count <= 255`.
pub(crate) fn deal(
    secret: &[u8; 32],
    threshold: u8,
    count: usize,
    rng: &mut impl rand::CryptoRng,
) -> Vec<ShareBytes> {
    let mut adapter = Rng010(rng);
    Sharks(threshold)
        .dealer_rng(secret, &mut adapter)
        .take(count)
        .map(|share| {
            let bytes = Zeroizing::new(Vec::from(&share));
            let mut out = Zeroizing::new([0u8; REVEAL_SHARE_LEN]);
            out.copy_from_slice(&bytes);
            out
        })
        .collect()
}

/// Reconstructs a 32-byte secret from shares with distinct x-coordinates (all of them are
/// used: they must lie on one polynomial of degree `< threshold`). `None` if fewer than
/// `threshold` distinct shares are given.
pub(crate) fn recover(
    threshold: u8,
    shares: &[&[u8; REVEAL_SHARE_LEN]],
) -> Option<Zeroizing<[u8; 32]>> {
    let parsed: Vec<Share> = shares
        .iter()
        .filter_map(|s| Share::try_from(&s[..]).ok())
        .collect();
    let secret = Zeroizing::new(Sharks(threshold).recover(&parsed).ok()?);
    if secret.len() != 32 {
        return None;
    }
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&secret);
    Some(out)
}
