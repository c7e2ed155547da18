//! IEEE binary16 conversions for FP16 tensors (JSON data is decimal; the wire is 16 bits).

/// Round an `f32` to the nearest IEEE binary16 (ties to even) and return its bits.
/// Overflow gives infinity, tiny values subnormals or signed zero; NaN stays NaN (quiet,
/// sign and top payload bits kept).
pub fn f32_to_f16_bits(x: f32) -> u16 {
    if x.is_nan() {
        let b = x.to_bits();
        let sign = ((b >> 16) & 0x8000) as u16;
        return sign | 0x7e00 | ((b >> 13) & 0x3ff) as u16;
    }
    f64_to_f16_bits(f64::from(x))
}

/// The `f32` value of IEEE binary16 bits (exact: every half is an `f32`). NaN payloads are
/// kept.
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x3ff);
    match exp {
        0 => {
            // Zero or subnormal: mant * 2^-24, exact in f32.
            let v = mant as f32 * (1.0 / 16_777_216.0);
            if sign != 0 { -v } else { v }
        }
        0x1f => f32::from_bits(sign | 0x7f80_0000 | (mant << 13)),
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (mant << 13)),
    }
}

/// Round an `f64` straight to binary16 (no double rounding through `f32`).
pub(super) fn f64_to_f16_bits(x: f64) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 48) & 0x8000) as u16;
    let exp = ((b >> 52) & 0x7ff) as i32;
    let mant = b & ((1u64 << 52) - 1);
    if exp == 0x7ff {
        return if mant == 0 {
            sign | 0x7c00
        } else {
            sign | 0x7e00 | ((mant >> 42) & 0x3ff) as u16
        };
    }
    if exp == 0 {
        // Zero or an f64 subnormal (< 2^-1022): rounds to zero.
        return sign;
    }
    let e = exp - 1023;
    if e > 15 {
        return sign | 0x7c00;
    }
    // value = m * 2^(e-52); the half's quantum is 2^(max(e,-14)-10).
    let m = mant | (1u64 << 52);
    let shift = (42 + (-14 - e).max(0)) as u32;
    if shift >= 54 {
        // m < 2^53 <= half a quantum: rounds to zero.
        return sign;
    }
    let mut q = m >> shift;
    let rem = m & ((1u64 << shift) - 1);
    let half = 1u64 << (shift - 1);
    if rem > half || (rem == half && q & 1 == 1) {
        q += 1;
    }
    // Normal: q in [2^10, 2^11], a carry to 2^11 bumps the exponent. Subnormal: q in
    // [0, 2^10], 2^10 being the smallest normal.
    let r = if e >= -14 {
        (((e + 15) as u64) << 10) + q - 1024
    } else {
        q
    };
    if r >= 0x7c00 {
        sign | 0x7c00
    } else {
        sign | r as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_known_values() {
        let cases: [(f32, u16); 18] = [
            (0.0, 0x0000),
            (-0.0, 0x8000),
            (1.0, 0x3c00),
            (-2.0, 0xc000),
            (0.5, 0x3800),
            (0.1, 0x2e66),
            (1.0 / 3.0, 0x3555),
            (65504.0, 0x7bff),
            (65519.99, 0x7bff),
            (65520.0, 0x7c00),
            (1e10, 0x7c00),
            (f32::INFINITY, 0x7c00),
            (f32::NEG_INFINITY, 0xfc00),
            (6.103_515_6e-5, 0x0400), // 2^-14, smallest normal
            (6.097_555e-5, 0x03ff),   // largest subnormal
            (5.960_464_5e-8, 0x0001), // 2^-24, smallest subnormal
            (2.980_232_2e-8, 0x0000), // 2^-25: tie, to even (zero)
            (8.940_697e-8, 0x0002),   // 1.5 * 2^-24: tie, to even (2)
        ];
        for (x, h) in cases {
            assert_eq!(f32_to_f16_bits(x), h, "{x:e}");
        }
        assert_eq!(
            f32_to_f16_bits(f32::from_bits(2f32.powi(-25).to_bits() + 1)),
            0x0001
        );
        assert_eq!(f32_to_f16_bits(1e-30), 0x0000);
        assert_eq!(f32_to_f16_bits(-1e-30), 0x8000);
        assert_eq!(f32_to_f16_bits(f32::MIN_POSITIVE / 4.0), 0x0000); // f32 subnormal
        assert_eq!(f32_to_f16_bits(f32::MAX), 0x7c00);
        assert_eq!(f32_to_f16_bits(-f32::MAX), 0xfc00);
        // 2048 + 1 is a tie between 2048 and 2050: to even (2048); 2048 + 3 goes up to 2052.
        assert_eq!(f32_to_f16_bits(2049.0), f32_to_f16_bits(2048.0));
        assert_eq!(f16_bits_to_f32(f32_to_f16_bits(2051.0)), 2052.0);
        // f64 path: no double rounding through f32 (1 + 2^-11 + 2^-30 is above the tie).
        let x = 1.0 + 2f64.powi(-11) + 2f64.powi(-30);
        assert_eq!(f64_to_f16_bits(x), 0x3c01);
        assert_eq!(f32_to_f16_bits(x as f32), 0x3c00); // the f32 is exactly the tie

        assert_eq!(f16_bits_to_f32(0x3c00), 1.0);
        assert_eq!(f16_bits_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_bits_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_bits_to_f32(0x03ff), 1023.0 * 2f32.powi(-24));
        assert_eq!(f16_bits_to_f32(0x7c00), f32::INFINITY);
        assert_eq!(f16_bits_to_f32(0xfc00), f32::NEG_INFINITY);
        assert_eq!(f16_bits_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
        assert!(f16_bits_to_f32(0x7e00).is_nan());
        assert!(f16_bits_to_f32(0x7c01).is_nan()); // signalling NaN stays NaN
        let n = f32_to_f16_bits(f32::NAN);
        assert!(n & 0x7c00 == 0x7c00 && n & 0x3ff != 0);
        // A NaN whose payload is only in low f32 bits is still NaN, not infinity.
        let n = f32_to_f16_bits(f32::from_bits(0x7f80_0001));
        assert!(f16_bits_to_f32(n).is_nan());
        let n = f32_to_f16_bits(f32::from_bits(0xff80_0001));
        assert_eq!(n & 0x8000, 0x8000);
    }

    #[test]
    fn f16_exhaustive_roundtrip_and_ties() {
        for h in 0..=u16::MAX {
            let f = f16_bits_to_f32(h);
            if h & 0x7c00 == 0x7c00 && h & 0x3ff != 0 {
                assert!(f.is_nan(), "{h:#06x}");
                let back = f32_to_f16_bits(f);
                assert_eq!(back, h | 0x0200, "{h:#06x}"); // quietened
            } else {
                assert_eq!(f32_to_f16_bits(f), h, "{h:#06x}");
                assert_eq!(f64_to_f16_bits(f64::from(f)), h, "{h:#06x}");
            }
        }
        // Every midpoint between consecutive positive finite halves (and the last one,
        // towards 65536, the overflow threshold).
        for h in 0..0x7c00u16 {
            let lo = f64::from(f16_bits_to_f32(h));
            let hi = if h == 0x7bff {
                65536.0
            } else {
                f64::from(f16_bits_to_f32(h + 1))
            };
            let mid = (lo + hi) / 2.0;
            let up = h + 1; // 0x7c00 is infinity
            let even = if h % 2 == 0 { h } else { up };
            assert_eq!(f64_to_f16_bits(mid), even, "tie above {h:#06x}");
            assert_eq!(f32_to_f16_bits(mid as f32), even, "f32 tie above {h:#06x}");
            let above = f64::from_bits(mid.to_bits() + 1);
            let below = f64::from_bits(mid.to_bits() - 1);
            assert_eq!(f64_to_f16_bits(above), up, "above tie {h:#06x}");
            assert_eq!(f64_to_f16_bits(below), h, "below tie {h:#06x}");
            let above = f32::from_bits((mid as f32).to_bits() + 1);
            let below = f32::from_bits((mid as f32).to_bits() - 1);
            assert_eq!(f32_to_f16_bits(above), up, "f32 above tie {h:#06x}");
            assert_eq!(f32_to_f16_bits(below), h, "f32 below tie {h:#06x}");
            // Sign symmetry.
            assert_eq!(f64_to_f16_bits(f64::from(-above)), up | 0x8000);
            assert_eq!(f32_to_f16_bits(-below), h | 0x8000);
        }
    }
}
