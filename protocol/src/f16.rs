//! IEEE 754 binary16 ("half") conversion, written out so the crate needs no `half` dependency.
//!
//! f32 -> f16 rounds to nearest, ties to even, with gradual underflow to subnormals and
//! overflow to infinity; NaN stays NaN (quiet) and keeps its sign. f16 -> f32 is exact.

/// Converts an f32 to f16 bits, rounding to nearest-even.
pub fn f32_to_f16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let man = bits & 0x007f_ffff;

    if exp == 0xff {
        if man == 0 {
            return sign | 0x7c00;
        }
        // Keep the top payload bits and force the quiet bit so the result is still a NaN even
        // when the payload lived only in the low 13 bits.
        return sign | 0x7e00 | (man >> 13) as u16;
    }

    // Exponent re-biased from 127 to 15.
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        // Below 2^-25 (half the smallest subnormal) everything rounds to zero; exactly 2^-25
        // is a tie and rounds to the even value, zero, which the general path also gives.
        if e < -10 {
            return sign;
        }
        let m = man | 0x0080_0000;
        let shift = (14 - e) as u32;
        let mut h = m >> shift;
        let rem = m & ((1 << shift) - 1);
        let half = 1 << (shift - 1);
        if rem > half || (rem == half && (h & 1) == 1) {
            // May carry into the exponent field: 0x400 is exactly the smallest normal.
            h += 1;
        }
        return sign | h as u16;
    }

    let mut h = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    if rem > 0x1000 || (rem == 0x1000 && (h & 1) == 1) {
        // A carry out of the mantissa bumps the exponent, and 0x7c00 is infinity: both right.
        h += 1;
    }
    sign | h as u16
}

/// Converts f16 bits to the f32 with exactly the same value.
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x03ff);
    match exp {
        0 => {
            // Zero or subnormal: man * 2^-24 is exact in f32.
            let magnitude = man as f32 * (1.0 / 16_777_216.0);
            f32::from_bits(magnitude.to_bits() | sign)
        }
        0x1f => f32::from_bits(sign | 0x7f80_0000 | (man << 13)),
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (man << 13)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_non_nan_f16_value_round_trips_exactly() {
        for h in 0..=u16::MAX {
            let f = f16_bits_to_f32(h);
            if f.is_nan() {
                assert!(f32_to_f16_bits(f) & 0x7c00 == 0x7c00 && f32_to_f16_bits(f) & 0x3ff != 0);
                continue;
            }
            assert_eq!(f32_to_f16_bits(f), h, "f16 bits {h:#06x} ({f})");
        }
    }

    #[test]
    fn known_values_convert_as_ieee_specifies() {
        assert_eq!(f32_to_f16_bits(1.0), 0x3c00);
        assert_eq!(f32_to_f16_bits(-2.0), 0xc000);
        assert_eq!(f32_to_f16_bits(65504.0), 0x7bff);
        // 65520 is the midpoint between 65504 and 65536 (not representable): ties-to-even
        // goes up to infinity.
        assert_eq!(f32_to_f16_bits(65520.0), 0x7c00);
        assert_eq!(f32_to_f16_bits(65519.0), 0x7bff);
        assert_eq!(f32_to_f16_bits(f32::INFINITY), 0x7c00);
        assert_eq!(f32_to_f16_bits(f32::NEG_INFINITY), 0xfc00);
        assert_eq!(f32_to_f16_bits(2.0f32.powi(-24)), 0x0001);
        assert_eq!(f32_to_f16_bits(2.0f32.powi(-25)), 0x0000);
        assert_eq!(f32_to_f16_bits(1.5 * 2.0f32.powi(-25)), 0x0001);
        assert_eq!(f32_to_f16_bits(-0.0), 0x8000);
        // 1 + 2^-11 is the tie between 1.0 and 1.0 + 2^-10: even mantissa (1.0) wins.
        assert_eq!(f32_to_f16_bits(1.0 + 2.0f32.powi(-11)), 0x3c00);
        assert_eq!(f32_to_f16_bits(1.0 + 3.0 * 2.0f32.powi(-11)), 0x3c02);
        assert!(f16_bits_to_f32(f32_to_f16_bits(f32::NAN)).is_nan());
    }
}
