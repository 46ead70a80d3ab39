//! Comparing outputs: bit-exact, or floats within tolerances.
//!
//! Replicas of a task computed on different GPUs may differ in the last
//! bits of floating-point results (fused multiply-add, different `sqrt`).
//! A job declares how close is close enough: an absolute difference, a
//! difference relative to the larger magnitude, or a distance in units in
//! the last place (ULPs). Two values agree if any declared bound holds.
//! NaN and infinities agree only with themselves (any NaN matches any NaN;
//! an infinity only the same infinity), never within a tolerance.

use serde::{Deserialize, Serialize};

/// Bounds within which two f32 values agree. A zero bound is not used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Tolerance {
    pub abs: f64,
    pub rel: f64,
    pub ulps: u32,
}

/// The first disagreement found.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Mismatch {
    #[error("the outputs have different lengths: {0} and {1} bytes")]
    Length(usize, usize),
    #[error("byte {index} differs: {a:#04x} and {b:#04x}")]
    Byte { index: usize, a: u8, b: u8 },
    #[error("element {index} differs: {a:e} and {b:e} ({ulps} ULPs apart)")]
    Float {
        index: usize,
        a: f32,
        b: f32,
        ulps: u64,
    },
}

/// Every byte equal.
pub fn exact(a: &[u8], b: &[u8]) -> Result<(), Mismatch> {
    if a.len() != b.len() {
        return Err(Mismatch::Length(a.len(), b.len()));
    }
    match a.iter().zip(b).position(|(x, y)| x != y) {
        None => Ok(()),
        Some(index) => Err(Mismatch::Byte {
            index,
            a: a[index],
            b: b[index],
        }),
    }
}

/// The number of representable f32 values between `a` and `b` (0 when
/// equal, including +0 and −0); `u64::MAX` when either is NaN.
pub fn ulp_distance(a: f32, b: f32) -> u64 {
    if a.is_nan() || b.is_nan() {
        return u64::MAX;
    }
    // Map the bit patterns onto a line where adjacent floats are adjacent
    // integers: negative floats count down from zero.
    let key = |x: f32| {
        let bits = x.to_bits() as i32;
        if bits < 0 {
            i64::from(i32::MIN) - i64::from(bits)
        } else {
            i64::from(bits)
        }
    };
    key(a).abs_diff(key(b))
}

/// Whether two f32 values agree under `tol`.
pub fn f32_agree(a: f32, b: f32, tol: &Tolerance) -> bool {
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && b.is_nan();
    }
    if a.is_infinite() || b.is_infinite() {
        return a == b;
    }
    if a == b {
        return true;
    }
    let diff = (f64::from(a) - f64::from(b)).abs();
    let scale = f64::from(a).abs().max(f64::from(b).abs());
    (tol.abs > 0.0 && diff <= tol.abs)
        || (tol.rel > 0.0 && diff <= tol.rel * scale)
        || (tol.ulps > 0 && ulp_distance(a, b) <= u64::from(tol.ulps))
}

/// Little-endian f32 buffers that agree element by element under `tol`.
pub fn f32_within(a: &[u8], b: &[u8], tol: &Tolerance) -> Result<(), Mismatch> {
    if a.len() != b.len() || !a.len().is_multiple_of(4) {
        return Err(Mismatch::Length(a.len(), b.len()));
    }
    let floats = |s: &[u8]| -> Vec<f32> {
        s.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let (fa, fb) = (floats(a), floats(b));
    match fa
        .iter()
        .zip(&fb)
        .position(|(x, y)| !f32_agree(*x, *y, tol))
    {
        None => Ok(()),
        Some(index) => Err(Mismatch::Float {
            index,
            a: fa[index],
            b: fb[index],
            ulps: ulp_distance(fa[index], fb[index]),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn ulps_count_representable_steps() {
        assert_eq!(ulp_distance(1.0, 1.0), 0);
        assert_eq!(ulp_distance(0.0, -0.0), 0);
        assert_eq!(ulp_distance(1.0, f32::from_bits(1.0f32.to_bits() + 3)), 3);
        assert_eq!(
            ulp_distance(-f32::MIN_POSITIVE, f32::MIN_POSITIVE),
            2 * u64::from(f32::MIN_POSITIVE.to_bits())
        );
        assert_eq!(ulp_distance(f32::NAN, 1.0), u64::MAX);
    }

    #[test]
    fn tolerances() {
        let ulp2 = Tolerance {
            ulps: 2,
            ..Default::default()
        };
        assert!(f32_agree(1.0, f32::from_bits(1.0f32.to_bits() + 2), &ulp2));
        assert!(!f32_agree(1.0, f32::from_bits(1.0f32.to_bits() + 3), &ulp2));
        let abs = Tolerance {
            abs: 1e-3,
            ..Default::default()
        };
        assert!(f32_agree(0.0, 0.0009, &abs));
        assert!(!f32_agree(0.0, 0.002, &abs));
        let rel = Tolerance {
            rel: 1e-6,
            ..Default::default()
        };
        assert!(f32_agree(1e6, 1e6 + 0.5, &rel));
        assert!(!f32_agree(1.0, 1.0001, &rel));
        assert!(
            !f32_agree(1.0, 1.0001, &Tolerance::default()),
            "no bound, no slack"
        );
    }

    #[test]
    fn nan_and_infinity_agree_only_with_their_kind() {
        let loose = Tolerance {
            abs: 1e30,
            rel: 1.0,
            ulps: u32::MAX,
        };
        assert!(f32_agree(f32::NAN, f32::NAN, &loose));
        assert!(!f32_agree(f32::NAN, 1.0, &loose));
        assert!(f32_agree(f32::INFINITY, f32::INFINITY, &loose));
        assert!(!f32_agree(f32::INFINITY, f32::NEG_INFINITY, &loose));
        assert!(!f32_agree(f32::INFINITY, f32::MAX, &loose));
    }

    #[test]
    fn buffers() {
        let a = bytes(&[1.0, 2.0, 3.0]);
        assert_eq!(exact(&a, &a), Ok(()));
        let b = bytes(&[1.0, 2.0, 3.000_001]);
        assert!(matches!(exact(&a, &b), Err(Mismatch::Byte { .. })));
        assert_eq!(
            f32_within(
                &a,
                &b,
                &Tolerance {
                    ulps: 8,
                    ..Default::default()
                }
            ),
            Ok(())
        );
        let err = f32_within(
            &a,
            &bytes(&[1.0, 2.5, 3.0]),
            &Tolerance {
                ulps: 8,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(err, Mismatch::Float { index: 1, .. }), "{err}");
        assert_eq!(exact(&a, &a[..4]), Err(Mismatch::Length(12, 4)));
    }
}
