//! CPU kernel of the block parameters.

use crate::error::QuantError;
use crate::ops::math::Kind;
use crate::ops::parallel;
use rayon::prelude::*;

/// `(sum |x|, max |x|)`; NaN shows up in the sum (the max ignores it), infinities in both.
///
/// Every value is added in f64 (eight lanes, so the loop vectorises), as the CUDA kernel does in
/// another order. The order then moves the sum by about 1e-16 relative, far below an f32 ulp, so
/// both devices round it to the same f32 mean. With f32 partial sums (this function's first
/// version) the means differed by an ulp, and on an H200 that moved a value across TWN's
/// data-dependent threshold (`0.7 mean`), changing its group's scale by 1.3 %.
pub(crate) fn abs_stats(xs: &[f32]) -> (f64, f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is available (checked above).
        return unsafe { abs_stats_avx2(xs) };
    }
    abs_stats_body(xs)
}

/// [`abs_stats`] compiled for AVX2: the same eight f64 lanes in the same order (so the same
/// sum to the bit), in two registers instead of four. The default x86-64 target is SSE2; this
/// was 3-4 % of a training step (the weight's scale is recomputed every step).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn abs_stats_avx2(xs: &[f32]) -> (f64, f32) {
    abs_stats_body(xs)
}

#[inline(always)]
fn abs_stats_body(xs: &[f32]) -> (f64, f32) {
    let mut acc = [0f64; 8];
    let mut lane_max = [0f32; 8];
    let mut it = xs.chunks_exact(8);
    for c in &mut it {
        for k in 0..8 {
            let a = c[k].abs();
            acc[k] += a as f64;
            // `f32::max`'s NaN handling blocks `maxps`; a NaN fails `>` and is skipped the same.
            lane_max[k] = if a > lane_max[k] { a } else { lane_max[k] };
        }
    }
    let mut total: f64 = acc.iter().sum();
    let mut mx = lane_max.iter().fold(0f32, |a, &b| a.max(b));
    for &v in it.remainder() {
        total += v.abs() as f64;
        mx = mx.max(v.abs());
    }
    (total, mx)
}

/// `max |x|`, and whether every value is finite: all that an absmax scale (`Kind::Int`: int8
/// activations, one block per token) needs, without [`abs_stats`]' f64 sum.
pub(crate) fn abs_max(xs: &[f32]) -> (f32, bool) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is available (checked above).
        return unsafe { abs_max_avx2(xs) };
    }
    abs_max_body(xs)
}

/// [`abs_max`] compiled for AVX2 (the same lanes; a max has no rounding).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn abs_max_avx2(xs: &[f32]) -> (f32, bool) {
    abs_max_body(xs)
}

#[inline(always)]
fn abs_max_body(xs: &[f32]) -> (f32, bool) {
    let mut lane_max = [0f32; 8];
    // `v * 0` is (signed) 0 for a finite value and NaN for an infinite or NaN one; the sums
    // stay 0 exactly until one is not finite.
    let mut check = [0f32; 8];
    let mut it = xs.chunks_exact(8);
    for c in &mut it {
        for k in 0..8 {
            let a = c[k].abs();
            lane_max[k] = if a > lane_max[k] { a } else { lane_max[k] };
            check[k] += c[k] * 0.0;
        }
    }
    let mut mx = lane_max.iter().fold(0f32, |a, &b| a.max(b));
    let mut finite = check.iter().all(|&c| c == 0.0);
    for &v in it.remainder() {
        mx = mx.max(v.abs());
        finite &= v.is_finite();
    }
    (mx, finite)
}

/// `(sum |x|, count)` over the values with `|x| > d`, added in f64 like [`abs_stats`].
fn above_stats(xs: &[f32], d: f32) -> (f64, usize) {
    let mut acc = [0f64; 8];
    let mut count = 0usize;
    let mut it = xs.chunks_exact(8);
    for c in &mut it {
        for k in 0..8 {
            let a = c[k].abs();
            let hit = a > d;
            acc[k] += if hit { a as f64 } else { 0.0 };
            count += hit as usize;
        }
    }
    let mut sum: f64 = acc.iter().sum();
    for &v in it.remainder() {
        let a = v.abs();
        if a > d {
            sum += a as f64;
            count += 1;
        }
    }
    (sum, count)
}

/// `sum x` (signed), added in f64 lanes like [`abs_stats`]: the center of
/// [`Kind::BinaryCentered`]. A separate pass, so that the other kinds do not pay for it.
fn signed_sum(xs: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let mut it = xs.chunks_exact(8);
    for c in &mut it {
        for k in 0..8 {
            acc[k] += c[k] as f64;
        }
    }
    let sum: f64 = acc.iter().sum();
    sum + it.remainder().iter().map(|&v| v as f64).sum::<f64>()
}

/// `NonFinite` (with the count) unless `finite`, which the caller's pass over `xs` found: a
/// finite sum, or [`abs_max`]'s flag.
fn check_finite(op: &'static str, finite: bool, xs: &[f32]) -> Result<(), QuantError> {
    if finite {
        return Ok(());
    }
    let count = xs.iter().filter(|v| !v.is_finite()).count();
    // A finite input can only overflow the sum past f64::MAX, which f32 values cannot reach.
    Err(QuantError::NonFinite {
        op,
        count: count.max(1),
    })
}

fn finish(kind: Kind, xs: &[f32], sum: f64, max: f32, par: bool) -> (f32, f32) {
    let n = xs.len() as f64;
    let mean_abs = (sum / n) as f32;
    let mean = if kind.needs_mean() {
        let s = if par {
            xs.par_chunks(1 << 16).map(signed_sum).sum::<f64>()
        } else {
            signed_sum(xs)
        };
        (s / n) as f32
    } else {
        0.0
    };
    let above_mean = if kind.needs_above_pass() {
        let d = kind.threshold(mean_abs);
        let (s, c) = if par {
            xs.par_chunks(1 << 16)
                .map(|c| above_stats(c, d))
                .reduce(|| (0.0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
        } else {
            above_stats(xs, d)
        };
        if c > 0 {
            (s / c as f64) as f32
        } else {
            0.0
        }
    } else {
        0.0
    };
    kind.params_with_mean(mean_abs, max, above_mean, mean)
}

/// Block parameters, `(s, aux)` per block of `block` consecutive values, flattened.
pub(crate) fn block_params(
    op: &'static str,
    kind: Kind,
    xs: &[f32],
    block: usize,
) -> Result<Vec<f32>, QuantError> {
    // An absmax scale needs no sum (and so none of its f64 work).
    let max_only = matches!(kind, Kind::Int { .. });
    let one = |b: &[f32]| -> Result<(f32, f32), QuantError> {
        if max_only {
            let (max, finite) = abs_max(b);
            check_finite(op, finite, b)?;
            return Ok(kind.params(0.0, max, 0.0));
        }
        let (sum, max) = abs_stats(b);
        check_finite(op, sum.is_finite(), b)?;
        Ok(finish(kind, b, sum, max, false))
    };
    let pairs: Vec<(f32, f32)> = if block == xs.len() && parallel(xs.len()) && !max_only {
        let (sum, max) = xs
            .par_chunks(1 << 16)
            .map(abs_stats)
            .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1.max(b.1)));
        check_finite(op, sum.is_finite(), xs)?;
        vec![finish(kind, xs, sum, max, true)]
    } else if parallel(xs.len()) {
        xs.par_chunks(block).map(one).collect::<Result<_, _>>()?
    } else {
        xs.chunks(block).map(one).collect::<Result<_, _>>()?
    };
    Ok(pairs.into_iter().flat_map(|(s, a)| [s, a]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn mean(xs: &[f32]) -> f32 {
        (abs_stats(xs).0 / xs.len() as f64) as f32
    }

    /// The AVX2 build must give the portable build's sum and max to the bit (the CUDA kernel
    /// was verified against the latter).
    #[test]
    fn the_avx2_build_gives_the_same_bits() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for len in [0, 1, 7, 8, 9, 63, 1000, 4097] {
            let xs: Vec<f32> = (0..len).map(|_| rng.random_range(-3f32..3.0)).collect();
            let want = abs_stats_body(&xs);
            let got = abs_stats(&xs);
            assert_eq!(got.0.to_bits(), want.0.to_bits(), "sum, len {len}");
            assert_eq!(got.1.to_bits(), want.1.to_bits(), "max, len {len}");
        }
    }

    /// The max-only pass gives `abs_stats`' max and flags any non-finite value.
    #[test]
    fn abs_max_matches_abs_stats_and_flags_non_finite_values() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        for len in [0, 1, 7, 8, 9, 63, 1000, 4097] {
            let xs: Vec<f32> = (0..len).map(|_| rng.random_range(-3f32..3.0)).collect();
            let (mx, finite) = abs_max(&xs);
            assert_eq!(mx.to_bits(), abs_stats(&xs).1.to_bits(), "len {len}");
            assert_eq!((mx, finite), abs_max_body(&xs), "len {len}");
            assert!(finite);
            for (at, bad) in [
                (0, f32::NAN),
                (len / 2, f32::INFINITY),
                (len.max(1) - 1, f32::NEG_INFINITY),
            ] {
                if len == 0 {
                    continue;
                }
                let mut ys = xs.clone();
                ys[at] = bad;
                assert!(!abs_max(&ys).1, "len {len}, {bad} at {at}");
            }
        }
    }

    /// The GPU kernels add in another order than this loop; the f32 mean (and so TWN's threshold)
    /// must not depend on it. With f32 partial sums, a reversed block changed the mean's last bit
    /// in 344 of these 800 blocks.
    #[test]
    fn mean_does_not_depend_on_the_order_of_the_values() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for n in [64usize, 1000, 4096, 1 << 16] {
            for _ in 0..200 {
                let xs: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
                let mut rev = xs.clone();
                rev.reverse();
                let mut rot = xs.clone();
                rot.rotate_left(n / 3);
                let m = mean(&xs);
                assert_eq!(m.to_bits(), mean(&rev).to_bits(), "n={n}");
                assert_eq!(m.to_bits(), mean(&rot).to_bits(), "n={n}");
                let above = |v: &[f32]| above_stats(v, 0.7 * m);
                let (s, c) = above(&xs);
                let (s_rev, c_rev) = above(&rev);
                assert_eq!(c, c_rev);
                assert_eq!(
                    ((s / c as f64) as f32).to_bits(),
                    ((s_rev / c as f64) as f32).to_bits()
                );
            }
        }
    }
}
