//! Quantization of a weighted update into `Z_{2^m}`, and m-bit packing.

use rand::RngCore;
use thiserror::Error;

use crate::params::{ParamError, Params, modulus_mask};

/// Why [`quantize`] refused its input.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum QuantError {
    /// The parameters break a rule of [`Params::check`].
    #[error("invalid parameters: {0}")]
    Params(#[from] ParamError),
    /// A value is NaN or infinite.
    #[error("value {index} is {value}, not finite")]
    NonFinite {
        /// Index in the update.
        index: usize,
        /// The value.
        value: f32,
    },
    /// The client claims more examples than the round's announced total.
    #[error("num_examples {num_examples} exceeds the round's reference total {reference_total}")]
    TooManyExamples {
        /// The client's examples.
        num_examples: u64,
        /// The round's total.
        reference_total: u64,
    },
    /// The round's announced total is 0.
    #[error("the round's reference total of examples is 0")]
    ZeroReferenceTotal,
}

/// Why [`unpack`] refused its input.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PackError {
    /// m outside `1..=32`.
    #[error("bit width {m} must be in 1..=32")]
    BadWidth {
        /// m.
        m: u8,
    },
    /// `len * m` bits do not fit in memory.
    #[error("{len} values of {m} bits overflow")]
    TooLong {
        /// Values.
        len: usize,
        /// m.
        m: u8,
    },
    /// The byte string is not `ceil(len * m / 8)` bytes.
    #[error("{got} bytes, expected {expected} for {len} values of {m} bits")]
    Length {
        /// Bytes given.
        got: usize,
        /// `ceil(len * m / 8)`.
        expected: usize,
        /// Values.
        len: usize,
        /// m.
        m: u8,
    },
    /// The unused high bits of the last byte are not zero.
    #[error("non-zero padding bits in the last byte ({byte:#04x})")]
    Padding {
        /// The last byte.
        byte: u8,
    },
}

/// Quantizes a client's update into its masked-input vector `x_u ∈ Z_{2^m}^{1+d}`:
///
/// - `x_u[0] = num_examples mod 2^m` (lets the aggregator cross-check the survivors' weight);
/// - `x_u[1+i] = stochastic_round(clip(v_i) * scale / step)` as a two's-complement integer mod
///   2^m, with `scale = num_examples / reference_total` and `step = clip / levels`
///   ([`Params::step`], [`Params::levels`]).
///
/// `reference_total` is the round's announced total of examples of all sampled clients, so the
/// scales of any subset add up to at most 1. Stochastic rounding rounds `z` up with probability
/// `z - floor(z)` (a 53-bit uniform from `rng.next_u64()` per value), so it is unbiased.
///
/// Refuses parameters that fail [`Params::check`]`(max_clients)`, non-finite values,
/// `num_examples > reference_total` and `reference_total == 0`.
pub fn quantize(
    p: &Params,
    max_clients: usize,
    values: &[f32],
    num_examples: u64,
    reference_total: u64,
    rng: &mut impl RngCore,
) -> Result<Vec<u32>, QuantError> {
    p.check(max_clients)?;
    if reference_total == 0 {
        return Err(QuantError::ZeroReferenceTotal);
    }
    if num_examples > reference_total {
        return Err(QuantError::TooManyExamples {
            num_examples,
            reference_total,
        });
    }
    if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(QuantError::NonFinite { index, value });
    }
    let mask = p.mask();
    let scale = num_examples as f64 / reference_total as f64;
    // z = clip(v) * scale / step = clip(v) * scale * levels / clip (exact at v = ±clip, scale 1).
    let factor = scale * p.levels(max_clients) as f64 / f64::from(p.clip);
    let clip = p.clip;
    let mut out = Vec::with_capacity(values.len() + 1);
    out.push((num_examples & u64::from(mask)) as u32);
    for &v in values {
        let z = f64::from(v.clamp(-clip, clip)) * factor;
        let floor = z.floor();
        let frac = z - floor;
        let u = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        let q = floor as i64 + i64::from(u < frac);
        out.push((q as u64 & u64::from(mask)) as u32);
    }
    Ok(out)
}

/// Reads an unmasked sum: returns `(Σ num_examples mod 2^m, Σ scale_u · clip(v_u))`, the
/// second by reading each coordinate as a signed m-bit integer times [`Params::step`].
///
/// The aggregator divides the values by the survivors' `Σ scale_u` to get the weighted
/// FedAvg. The result is meaningful only for parameters that pass
/// [`Params::check`]`(max_clients)` (for others it is computed with at least one level, and
/// never panics). An empty `sum` gives `(0, [])`.
pub fn dequantize(p: &Params, max_clients: usize, sum: &[u32]) -> (u64, Vec<f64>) {
    let m = p.modulus_bits.clamp(1, 32);
    let mask = modulus_mask(m);
    let half = 1i64 << (m - 1);
    let step = p.step(max_clients);
    let Some((&weight, rest)) = sum.split_first() else {
        return (0, Vec::new());
    };
    let values = rest
        .iter()
        .map(|&v| {
            let v = i64::from(v & mask);
            let signed = if v >= half { v - 2 * half } else { v };
            signed as f64 * step
        })
        .collect();
    (u64::from(weight & mask), values)
}

/// Packs values at `m` bits each, little-endian bit order: value `i` takes bits
/// `i*m .. (i+1)*m` of the byte string read as one little-endian integer; the unused high
/// bits of the last byte are zero. The result is `ceil(len * m / 8)` bytes.
///
/// Bits of a value above `m` are dropped. `m` is clamped to `1..=32` (the masked vectors use
/// `12..=32`, see [`Params::check`]).
pub fn pack(values: &[u32], m: u8) -> Vec<u8> {
    let m = u32::from(m.clamp(1, 32));
    let mask = u64::from(modulus_mask(m as u8));
    let mut out = Vec::with_capacity((values.len() * m as usize).div_ceil(8));
    let mut acc: u64 = 0;
    let mut bits: u32 = 0;
    for &v in values {
        acc |= (u64::from(v) & mask) << bits;
        bits += m;
        while bits >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            bits -= 8;
        }
    }
    if bits > 0 {
        out.push(acc as u8);
    }
    out
}

/// Unpacks `len` values of `m` bits from [`pack`]'s format. Refuses a byte string that is not
/// exactly `ceil(len * m / 8)` bytes, non-zero padding bits, and `m` outside `1..=32`.
pub fn unpack(bytes: &[u8], m: u8, len: usize) -> Result<Vec<u32>, PackError> {
    if !(1..=32).contains(&m) {
        return Err(PackError::BadWidth { m });
    }
    let total_bits = len
        .checked_mul(usize::from(m))
        .ok_or(PackError::TooLong { len, m })?;
    let expected = total_bits.div_ceil(8);
    if bytes.len() != expected {
        return Err(PackError::Length {
            got: bytes.len(),
            expected,
            len,
            m,
        });
    }
    let used = total_bits % 8;
    if used != 0 {
        if let Some(&last) = bytes.last() {
            if last >> used != 0 {
                return Err(PackError::Padding { byte: last });
            }
        }
    }
    let m = u32::from(m);
    let mask = u64::from(modulus_mask(m as u8));
    let mut out = Vec::with_capacity(len);
    let mut acc: u64 = 0;
    let mut bits: u32 = 0;
    let mut it = bytes.iter();
    for _ in 0..len {
        while bits < m {
            // The length check guarantees enough bytes; `unwrap_or` keeps this panic-free.
            acc |= u64::from(*it.next().unwrap_or(&0)) << bits;
            bits += 8;
        }
        out.push((acc & mask) as u32);
        acc >>= m;
        bits -= m;
    }
    Ok(out)
}
