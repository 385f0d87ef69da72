//! Secure aggregation for fedpeft: the cryptography and arithmetic of SecAgg+ (Bell et al.,
//! CCS 2020, over Bonawitz et al., CCS 2017) as pure code — no I/O, no async, no MQTT, and
//! deterministic given the RNG passed in. The aggregator drives a [`ServerRound`], each edge
//! client a [`ClientRound`]; the messages between them carry exactly the byte strings and
//! vectors this crate produces and consumes (every input from a peer is validated here and
//! refused with an error naming the client, the round and the stage; nothing panics on it).
//!
//! # The protocol
//!
//! Each sampled client u holds a quantized update `x_u ∈ Z_{2^m}^{1+d}` ([`quantize`]). The
//! aggregator must learn `Σ_{u ∈ U3} x_u mod 2^m` over the clients U3 that made it to the end,
//! and nothing else about any single `x_u`.
//!
//! 1. **Advertise** ([`ClientRound::new`]). u draws two X25519 key pairs — `enc` (to encrypt
//!    shares) and `mask` (for pairwise masks) — and a 32-byte self-mask seed `b_u`, and sends
//!    the two public keys and a commitment `SHA-256("fedpeft-secagg-v1 self-mask" ‖ round ‖ b_u)`
//!    ([`Advertise`]). The aggregator collects the roster ([`RosterEntry`]) and draws a
//!    32-byte graph seed.
//! 2. **Share** ([`ClientRound::share`], [`ServerRound::accept_shares`],
//!    [`ServerRound::close_sharing`]). From the roster and the seed every party builds the same
//!    k-regular neighbour graph ([`neighbourhoods`]). u deals Shamir `t`-of-`k` shares of `b_u`
//!    and of `mask_sk_u` to its neighbours, each pair encrypted end to end (X25519 + HKDF +
//!    ChaCha20-Poly1305) through the aggregator, which only sees ciphertexts. U2 = clients
//!    whose shares the aggregator accepted; it relays each one's inbox ([`Relay`]).
//! 3. **Masked input** ([`ClientRound::masked_input`], [`ServerRound::accept_masked`],
//!    [`ServerRound::close_masking`]). u sends
//!    `y_u = x_u + PRG(b_u) + Σ_{v ∈ N(u) ∩ U2} ±PRG(s_uv) mod 2^m`, where
//!    `s_uv = HKDF(X25519(mask_sk_u, mask_pk_v))` is shared by u and v only, added by the
//!    smaller id and subtracted by the larger. The aggregator adds the `y_u` into a running
//!    sum. U3 = clients whose masked input arrived; dropped = U2 \ U3 ([`UnmaskRequest`]).
//! 4. **Unmask** ([`ClientRound::unmask`], [`ServerRound::accept_reveals`],
//!    [`ServerRound::finish`]). Each survivor reveals, for each neighbour v, its share of `b_v`
//!    if v ∈ U3 or its share of `mask_sk_v` if v dropped — never both. The aggregator
//!    reconstructs every `b_u` (checked against the commitment) and every dropped `mask_sk_v`
//!    (checked against `mask_pk_v`), subtracts the self masks, removes the pairwise masks
//!    between dropped clients and their surviving neighbours (the masks between two survivors
//!    cancel in the sum), and gets `Σ_{u ∈ U3} x_u` ([`Unmasked`]).
//!
//! **Who learns what.** The aggregator learns the sum over U3, the sets U1 ⊇ U2 ⊇ U3, the
//! public keys, the ciphertexts, the masked vectors (uniform in `Z_{2^m}` to it: each carries
//! `PRG(b_u)`), the `b_u` of survivors and the `mask_sk_v` of dropped clients — never both
//! secrets of one client, since a client whose masked input arrived is in U3 and a client
//! refuses to answer two different unmask requests, and `t > k/2` means no two disjoint sets
//! of neighbours can each reach the threshold. A client learns shares of its neighbours'
//! secrets (fewer than `t` of anyone's, with fewer than `t` colluding neighbours) and nothing
//! of any input. The protection holds against an honest-but-curious aggregator colluding with
//! fewer than `t` of any client's neighbours; an aggregator that lies about U2/U3 to different
//! clients, or substitutes keys, is outside this model (the consistency round of Bonawitz et
//! al.'s malicious variant is not implemented; authenticity of messages is the transport's
//! job: fedpeft's signed envelopes). Choosing `k` and `t` for a given population, corruption
//! rate and dropout rate (Bell et al., Theorem 3.6) is the caller's job; [`Params::check`]
//! enforces only the structural rules.
//!
//! # Arithmetic and encodings
//!
//! - All vectors are in `Z_{2^m}`, `m ∈ 12..=32` ([`Params`]); [`pack`]/[`unpack`] put them on
//!   the wire at m bits a value.
//! - [`quantize`] clips, scales by `num_examples / reference_total` and stochastically rounds
//!   (unbiased); `x_u[0]` carries `num_examples mod 2^m`. [`dequantize`] reads the sum back.
//! - Masks: a 256-bit seed expanded by ChaCha20 (`rand_chacha::ChaCha20Rng::from_seed`,
//!   `next_u32() & (2^m − 1)` per coordinate). Seeds are never folded to fewer bits.
//! - Pairwise seed: HKDF-SHA256(ikm = X25519(mask_sk_u, mask_pk_v), salt
//!   `fedpeft-secagg-v1 pairwise`, info = round (u32 LE) ‖ len (u64 LE) ‖ min(u, v) ‖ len ‖
//!   max(u, v)).
//! - Share encryption: key = HKDF-SHA256(X25519(enc_sk_from, enc_pk_to), salt
//!   `fedpeft-secagg-v1 share`, info = round ‖ len ‖ from ‖ len ‖ to), ChaCha20-Poly1305 with an
//!   all-zero nonce (each key encrypts one message) and AAD = the same info. The plaintext is the
//!   two shares (of `b_u`, then of `mask_sk_u`), [`SHARE_CIPHERTEXT_LEN`] bytes once sealed;
//!   sender, recipient and round are bound by the key and the AAD rather than repeated inside.
//! - Shares: x-coordinate (1 byte) ‖ 32 bytes ([`REVEAL_SHARE_LEN`]); the neighbour at index
//!   `i` of the dealer's sorted neighbourhood gets x = `i + 1`, which the recipient and the
//!   aggregator check.
//! - Mask secret keys are dealt clamped, so a reconstructed key passes only if it is exactly
//!   the dealt bytes.
//!
//! # Misbehaving clients
//!
//! Every reconstructed secret is checked (commitment, public key) before it is used, so wrong
//! revealed shares can make a round fail ([`Failure::Unrecoverable`]) but never make the sum
//! wrong. [`ServerRound::finish`] tries other subsets when shares disagree and names the
//! holders of wrong shares ([`Unmasked::bad_shares`]) when the dealt polynomial can be told
//! apart (up to `⌊(N − t + 1) / 2⌋` wrong shares out of N); with more it may name nobody
//! ([`Unmasked::unattributed`]). Shares are not verifiable one by one (that would need
//! verifiable secret sharing), so a large enough coalition of liars about one secret could get
//! an honest holder named: treat `bad_shares` as evidence, not proof.
//!
//! # Crates
//!
//! Nothing here is home-made cryptography: X25519 is `x25519-dalek` 2 (on `curve25519-dalek` 4,
//! which the workspace already builds for Ed25519), the AEAD is RustCrypto's `chacha20poly1305`
//! 0.10, the KDF RustCrypto's `hkdf` 0.12 over the workspace's `sha2` 0.10, the mask stream
//! `rand_chacha` 0.9 (the workspace's rand 0.9 family). Shamir sharing is `blahaj` 0.7, the
//! maintained fork of `sharks`: byte-wise sharing over GF(256) (a neighbourhood is at most 254
//! clients, below its 255-share limit), shares zeroed on drop, small and dependency-light
//! (`vsss-rs` needs big-integer and elliptic-curve stacks for the same job, and `sharks` itself
//! has had no release since 2021). blahaj draws its random coefficients through rand_core 0.10;
//! a ten-line adapter hands it the caller's rand 0.9 RNG. x25519-dalek and chacha20poly1305
//! are on rand_core 0.6: keys are built from bytes the caller's RNG draws
//! (`StaticSecret::from([u8; 32])`) and nonces are fixed, so no RNG crosses that version line.
//!
//! # Example
//!
//! ```
//! use fedpeft_secagg::{ClientRound, Params, ServerRound, quantize, dequantize};
//! use rand_chacha::ChaCha20Rng;
//! use rand_chacha::rand_core::SeedableRng;
//!
//! let p = Params { neighbours: 2, threshold: 2, modulus_bits: 20, clip: 1.0 };
//! let mut rng = ChaCha20Rng::from_seed([7; 32]);
//! let ids = ["a", "b", "c", "d"].map(String::from);
//! let updates = [[0.5f32, -0.25], [0.1, 0.2], [-0.3, 0.0], [0.0, 0.9]];
//! let (mut clients, mut roster) = (Vec::new(), Vec::new());
//! for id in &ids {
//!     let (c, ad) = ClientRound::new(p, 1, id, &mut rng);
//!     roster.push(ad.entry(id.as_str()));
//!     clients.push(c);
//! }
//! let mut server = ServerRound::new(p, 1, ids.len(), 3, [42; 32], roster.clone()).unwrap();
//! for c in &mut clients {
//!     let shares = c.share(&roster, &[42; 32], &mut rng).unwrap();
//!     server.accept_shares(c.id(), shares).unwrap();
//! }
//! let relay = server.close_sharing().unwrap();
//! for (c, v) in clients.iter_mut().zip(&updates) {
//!     let x = quantize(&p, ids.len(), v, 10, 40, &mut rng).unwrap();
//!     let y = c.masked_input(&relay.inbox[c.id()], &relay.u2, &x).unwrap();
//!     server.accept_masked(c.id(), &y).unwrap();
//! }
//! let request = server.close_masking().unwrap();
//! for c in &mut clients {
//!     let reveals = c.unmask(&request.u3, &request.dropped).unwrap();
//!     server.accept_reveals(c.id(), reveals).unwrap();
//! }
//! let out = server.finish().unwrap();
//! let (weight, values) = dequantize(&p, ids.len(), &out.sum);
//! assert_eq!(weight, 40);
//! // Σ scale·v = 0.25 · (0.5 + 0.1 − 0.3 + 0.0) = 0.075, within a few steps.
//! assert!((values[0] - 0.075).abs() < 1e-4);
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
mod crypto;
mod error;
mod graph;
mod noise;
mod params;
mod quant;
mod server;

#[cfg(test)]
mod tests;

pub use client::{Advertise, ClientRound, Reveal, RosterEntry};
pub use crypto::{REVEAL_SHARE_LEN, SHARE_CIPHERTEXT_LEN, SHARE_PLAINTEXT_LEN, TAG_LEN};
pub use error::{Failure, RevealKind, SecAggError, Stage};
pub use graph::neighbourhoods;
pub use noise::{add_discrete_gaussian, discrete_gaussian};
pub use params::{
    MAX_MODULUS_BITS, MAX_NEIGHBOURS, MIN_LEVELS, MIN_MODULUS_BITS, ParamError, Params,
};
pub use quant::{PackError, QuantError, dequantize, pack, quantize, unpack};
pub use server::{MAX_RECONSTRUCTION_TRIES, Relay, ServerRound, UnmaskRequest, Unmasked};
