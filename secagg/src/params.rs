//! The parameters of a secure round and their rules.

use thiserror::Error;

/// Most neighbours a client may have: shares are points of GF(256) polynomials at the non-zero
/// x-coordinates `1..=255`, and `k` is even.
pub const MAX_NEIGHBOURS: u16 = 254;
/// Smallest modulus, bits.
pub const MIN_MODULUS_BITS: u8 = 12;
/// Largest modulus, bits.
pub const MAX_MODULUS_BITS: u8 = 32;
/// Fewest quantization levels per unit of clip that [`Params::check`] accepts (2^7).
pub const MIN_LEVELS: u64 = 128;

/// The parameters of a secure round (the same on the aggregator and every client).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// k: size of each client's neighbourhood (excluding itself); even, `2..=254`.
    pub neighbours: u16,
    /// t: shares needed to reconstruct a secret; `k/2 < t <= k`.
    pub threshold: u16,
    /// m: arithmetic is in `Z_{2^m}`, `12..=32`; masked vectors are bit-packed at m bits a value.
    pub modulus_bits: u8,
    /// Every update value is clipped to `[-clip, clip]` before quantization; finite, `> 0`.
    pub clip: f32,
}

/// A rule of [`Params::check`] that the parameters break.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ParamError {
    /// k is odd.
    #[error("neighbours {neighbours} must be even (k/2 on each side of the ring)")]
    OddNeighbours {
        /// k.
        neighbours: u16,
    },
    /// k is outside `2..=254`.
    #[error("neighbours {neighbours} must be in 2..={max} (GF(256) shares)")]
    NeighboursOutOfRange {
        /// k.
        neighbours: u16,
        /// 254.
        max: u16,
    },
    /// t <= k/2: two disjoint sets of shares could each reconstruct a secret, so the
    /// aggregator could learn both secrets of a client.
    #[error("threshold {threshold} must be > neighbours/2 = {half}")]
    ThresholdTooLow {
        /// t.
        threshold: u16,
        /// k/2.
        half: u16,
    },
    /// t > k: no secret could ever be reconstructed.
    #[error("threshold {threshold} must be <= neighbours = {neighbours}")]
    ThresholdTooHigh {
        /// t.
        threshold: u16,
        /// k.
        neighbours: u16,
    },
    /// m outside `12..=32`.
    #[error("modulus_bits {modulus_bits} must be in {min}..={max}")]
    ModulusOutOfRange {
        /// m.
        modulus_bits: u8,
        /// 12.
        min: u8,
        /// 32.
        max: u8,
    },
    /// clip not finite or not positive.
    #[error("clip {clip} must be finite and > 0")]
    BadClip {
        /// The clip.
        clip: f32,
    },
    /// Too little headroom for the sum: `2^(m-1) - max_clients - 1 < 128`.
    #[error(
        "modulus_bits {modulus_bits} with max_clients {max_clients} leaves \
         levels = 2^{half_bits} - {max_clients} - 1 = {levels}, fewer than {min}"
    )]
    TooFewLevels {
        /// m.
        modulus_bits: u8,
        /// m - 1.
        half_bits: u8,
        /// The most contributions the sum may hold.
        max_clients: usize,
        /// `2^(m-1) - max_clients - 1` (may be negative).
        levels: i128,
        /// 128.
        min: u64,
    },
}

impl Params {
    /// Checks the rules of the fields (k even in `2..=254`, `k/2 < t <= k`, m in `12..=32`,
    /// clip finite and `> 0`) and the headroom of the sum: with at most `max_clients`
    /// contributions the signed sum must stay inside `(-2^(m-1), 2^(m-1))` and leave at least
    /// 2^7 quantization levels per unit of clip:
    /// `levels = 2^(m-1) - max_clients - 1 >= 128`.
    ///
    /// (Each client's quantized value is at most `levels * scale_u + 1` in magnitude after
    /// stochastic rounding, and the scales add up to at most 1, so the sum is at most
    /// `levels + max_clients < 2^(m-1)`.)
    pub fn check(&self, max_clients: usize) -> Result<(), ParamError> {
        self.check_shape()?;
        let levels = levels_wide(self.modulus_bits, max_clients);
        if levels < i128::from(MIN_LEVELS) {
            return Err(ParamError::TooFewLevels {
                modulus_bits: self.modulus_bits,
                half_bits: self.modulus_bits - 1,
                max_clients,
                levels,
                min: MIN_LEVELS,
            });
        }
        Ok(())
    }

    /// The rules on the fields alone (everything [`Params::check`] checks but the headroom).
    pub(crate) fn check_shape(&self) -> Result<(), ParamError> {
        let k = self.neighbours;
        if !(2..=MAX_NEIGHBOURS).contains(&k) {
            return Err(ParamError::NeighboursOutOfRange {
                neighbours: k,
                max: MAX_NEIGHBOURS,
            });
        }
        if k % 2 != 0 {
            return Err(ParamError::OddNeighbours { neighbours: k });
        }
        let t = self.threshold;
        if t <= k / 2 {
            return Err(ParamError::ThresholdTooLow {
                threshold: t,
                half: k / 2,
            });
        }
        if t > k {
            return Err(ParamError::ThresholdTooHigh {
                threshold: t,
                neighbours: k,
            });
        }
        if !(MIN_MODULUS_BITS..=MAX_MODULUS_BITS).contains(&self.modulus_bits) {
            return Err(ParamError::ModulusOutOfRange {
                modulus_bits: self.modulus_bits,
                min: MIN_MODULUS_BITS,
                max: MAX_MODULUS_BITS,
            });
        }
        if !self.clip.is_finite() || self.clip <= 0.0 {
            return Err(ParamError::BadClip { clip: self.clip });
        }
        Ok(())
    }

    /// The effective neighbourhood size and threshold when the roster has `roster_len`
    /// members, as `(k', t')`.
    ///
    /// If `k >= n - 1` every other member is a neighbour (the graph is complete: plain SecAgg),
    /// so `k' = n - 1`; otherwise `k' = k` (the ring graph of [`crate::neighbourhoods`] is
    /// k-regular). It is *not* `min(k, n - 1)` rounded down to even. The threshold is
    /// `t' = min(t, k')`; since a round needs at least `t + 1` members
    /// ([`crate::ClientRound::share`] and [`crate::ServerRound::new`] refuse fewer),
    /// `t' = t` in every round that runs.
    pub fn effective(&self, roster_len: usize) -> (usize, usize) {
        let k = usize::from(self.neighbours);
        let others = roster_len.saturating_sub(1);
        let k_eff = if k >= others { others } else { k };
        (k_eff, usize::from(self.threshold).min(k_eff))
    }

    /// Quantization levels per unit of clip: `2^(m-1) - max_clients - 1`, at least 1 (the
    /// value is meaningful only for parameters that pass [`Params::check`]).
    pub fn levels(&self, max_clients: usize) -> u64 {
        let l = levels_wide(self.modulus_bits, max_clients).max(1);
        u64::try_from(l).unwrap_or(u64::MAX)
    }

    /// The quantization step: `clip / levels`.
    pub fn step(&self, max_clients: usize) -> f64 {
        f64::from(self.clip) / self.levels(max_clients) as f64
    }

    /// `2^m - 1` (m clamped to `1..=32`).
    pub(crate) fn mask(&self) -> u32 {
        modulus_mask(self.modulus_bits)
    }
}

/// `2^(m-1) - max_clients - 1` without overflow (m clamped to `1..=32`).
fn levels_wide(modulus_bits: u8, max_clients: usize) -> i128 {
    let m = modulus_bits.clamp(1, 32);
    (1i128 << (m - 1)) - max_clients as i128 - 1
}

/// `2^m - 1` for m clamped to `1..=32`.
pub(crate) fn modulus_mask(m: u8) -> u32 {
    let m = m.clamp(1, 32);
    if m == 32 { u32::MAX } else { (1u32 << m) - 1 }
}
