//! A host emulation of the Metal kernels of `metal.rs` (and of the double-float helpers of
//! `metal_util.rs` they call), float operation by float operation in the kernels' order, checked
//! against the CPU kernel: there is no Mac to run the shaders on, and this is where their
//! arithmetic (the double-float sums, their scaling by powers of two, the final division) can go
//! wrong. Each function names the MSL function it transcribes.
//!
//! The emulation assumes the worst of Metal's float modes: results below `f32::MIN_POSITIVE` of
//! `ldexp` are flushed to zero, and a subnormal maximum counts as zero.

use super::cpu::block_params;
use crate::ops::gpu_emulation::tree;
use crate::ops::math::Kind;
use crate::ops::reduction_splits;
use crate::ops::test_values::uniform;

/// `BQ_NO_EXP`.
const NO_EXP: i32 = -100_000;

type Dd = (f32, f32);

/// `bq_two_sum`.
fn two_sum(a: f32, b: f32) -> Dd {
    let s = a + b;
    let bb = s - a;
    let e = (a - (s - bb)) + (b - bb);
    (s, e)
}

/// `bq_dd_add`.
fn dd_add(a: Dd, b: Dd) -> Dd {
    let t = two_sum(a.0, b.0);
    if t.0.is_infinite() {
        return (t.0, 0.0);
    }
    let e = t.1 + (a.1 + b.1);
    let hi = t.0 + e;
    (hi, e - (hi - t.0))
}

/// `bq_dd_div`: `fma` is `mul_add`, `float(n)` and `long(...)` are Rust's `as`.
fn dd_div(a: Dd, n: u64) -> f32 {
    let nh = n as f32;
    let nl = (n as i64 - nh as i64) as f32;
    let q = a.0 / nh;
    if !q.is_finite() {
        return q;
    }
    let p = q * nh;
    let pe = q.mul_add(nh, -p);
    let r = (((a.0 - p) - pe) + a.1) - q * nl;
    q + r / nh
}

/// `bq_fmax`.
fn fmax(a: f32, b: f32) -> f32 {
    if a.is_nan() {
        b
    } else if b.is_nan() || a > b {
        a
    } else {
        b
    }
}

/// MSL's `ldexp`, flushing a subnormal result to (signed) zero.
fn ldexp(x: f32, k: i32) -> f32 {
    let v = x as f64 * 2f64.powi(k);
    if v.abs() < f32::MIN_POSITIVE as f64 {
        0.0 * x.signum()
    } else {
        v as f32
    }
}

/// `bq_exponent` (MSL's `frexp`); a subnormal maximum is flushed, as the worst case.
fn exponent(mx: f32) -> i32 {
    // `mx` is a maximum of |x|: not normal means 0, subnormal (flushed), infinite or NaN.
    if !mx.is_normal() {
        return NO_EXP;
    }
    ((mx.to_bits() >> 23) & 0xff) as i32 - 126
}

fn dd_ldexp(a: Dd, k: i32) -> Dd {
    (ldexp(a.0, k), ldexp(a.1, k))
}

/// One chunk's per-thread accumulation (`for (i = lo + tid; i < hi; i += bdim)`), reduced.
fn chunk_sum(xs: &[f32], bdim: usize, term: impl Fn(f32) -> Option<f32>) -> Dd {
    let per_thread = (0..bdim)
        .map(|tid| {
            xs.iter()
                .skip(tid)
                .step_by(bdim)
                .filter_map(|&x| term(x))
                .fold((0.0, 0.0), |acc, t| dd_add(acc, (t, 0.0)))
        })
        .collect();
    tree(per_thread, dd_add)
}

/// What `bq_abs_partial` writes for one chunk: `(psum, psigned, pexp, pmax)`.
fn abs_partial(xs: &[f32], bdim: usize) -> (Dd, Dd, i32, f32) {
    let maxes = (0..bdim)
        .map(|tid| {
            xs.iter()
                .skip(tid)
                .step_by(bdim)
                .fold(0f32, |m, x| fmax(m, x.abs()))
        })
        .collect();
    let mx = tree(maxes, fmax);
    let e = exponent(mx);
    let down = if e == NO_EXP { 0 } else { -e };
    let sum = chunk_sum(xs, bdim, |x| Some(ldexp(x.abs(), down)));
    let signed = chunk_sum(xs, bdim, |x| Some(ldexp(x, down)));
    (sum, signed, e, mx)
}

/// `bq_block_exponent`, `bq_block_total` and `bq_scaled_mean` over one block's chunks.
fn scaled_mean(parts: &[Dd], exps: &[i32], n: u64) -> f32 {
    let e = exps.iter().copied().fold(NO_EXP, i32::max);
    let mut sum = (0.0, 0.0);
    for (&p, &ek) in parts.iter().zip(exps) {
        if ek != NO_EXP {
            sum = dd_add(sum, dd_ldexp(p, ek - e));
        }
    }
    if e == NO_EXP {
        0.0
    } else {
        ldexp(dd_div(sum, n), e)
    }
}

/// The Metal kernels' `[blocks, 2]` parameters of `xs` (kinds without a fixed threshold).
fn metal_params(kind: Kind, xs: &[f32], block: usize) -> Vec<f32> {
    let blocks = xs.len() / block;
    let (splits, chunk, bdim) = reduction_splits(blocks, block);
    let mut out = Vec::with_capacity(2 * blocks);
    for b in xs.chunks(block) {
        // Chunk k covers `k * chunk..`; a trailing empty one (when `splits` chunks overshoot the
        // block) adds nothing and has no exponent.
        let chunks: Vec<&[f32]> = b.chunks(chunk).collect();
        assert!(chunks.len() <= splits);
        let partials: Vec<_> = chunks.iter().map(|c| abs_partial(c, bdim)).collect();
        let exps: Vec<i32> = partials.iter().map(|p| p.2).collect();
        let sums: Vec<Dd> = partials.iter().map(|p| p.0).collect();
        let mean = scaled_mean(&sums, &exps, block as u64);
        // bq_finish, for the kinds this emulation covers.
        let (s, aux) = match kind {
            Kind::Binary { scaled: true } | Kind::Absmean => (mean, 0.0),
            Kind::BinaryCentered => {
                let signed: Vec<Dd> = partials.iter().map(|p| p.1).collect();
                (mean, scaled_mean(&signed, &exps, block as u64))
            }
            Kind::Threshold {
                fixed: None,
                scaled: true,
            } => {
                // bq_above_partial and bq_above_finish.
                let d = 0.7 * mean;
                let mut count = 0u64;
                let above: Vec<Dd> = chunks
                    .iter()
                    .zip(&exps)
                    .map(|(c, &e)| {
                        let down = if e == NO_EXP { 0 } else { -e };
                        count += c.iter().filter(|x| x.abs() > d).count() as u64;
                        chunk_sum(c, bdim, |x| (x.abs() > d).then(|| ldexp(x.abs(), down)))
                    })
                    .collect();
                let s = if count > 0 {
                    scaled_mean(&above, &exps, count)
                } else {
                    0.0
                };
                (s, d)
            }
            other => panic!("the emulation does not cover {other:?}"),
        };
        out.extend([s, aux]);
    }
    out
}

fn kinds() -> [Kind; 4] {
    [
        Kind::Binary { scaled: true },
        Kind::Absmean,
        Kind::BinaryCentered,
        Kind::Threshold {
            fixed: None,
            scaled: true,
        },
    ]
}

/// The device tests' tolerance for parameters from a mean, 2e-6 relative; a signed mean (the
/// center) that cancels to near zero is compared to `mean|x|` instead, at the double-float sums'
/// precision (1e-12).
fn assert_agrees(what: &str, kind: Kind, got: &[f32], want: &[f32], mean_abs: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let abs = if kind.needs_mean() && i % 2 == 1 {
            1e-12 * mean_abs[i / 2]
        } else {
            0.0
        };
        assert!(
            g.is_finite() && (g - w).abs() <= 2e-6 * w.abs() + abs,
            "{what} {kind:?} param {i}: metal {g} vs cpu {w}"
        );
    }
}

fn check(what: &str, xs: &[f32], block: usize) {
    assert_eq!(xs.len() % block, 0, "{what}: blocks must tile the values");
    let mean_abs: Vec<f32> = block_params("test", Kind::Absmean, xs, block)
        .unwrap()
        .chunks(2)
        .map(|p| p[0])
        .collect();
    for kind in kinds() {
        let want = block_params("test", kind, xs, block).unwrap();
        let got = metal_params(kind, xs, block);
        assert_agrees(what, kind, &got, &want, &mean_abs);
    }
}

/// Finite values whose `sum|x|` passes `f32::MAX`: a double-float sum of the raw values would be
/// infinite (the kernels' first version reported these blocks as non-finite); the scaled sums
/// give the CPU's finite means.
#[test]
fn sums_past_f32_max_give_the_cpus_means() {
    // 37 values of 3e37 per row (sum 1.1e39), as in tests/metal.rs.
    check("3e37 rows", &vec![3e37f32; 1000 * 37], 37);
    check("3e37 tensor", &vec![3e37f32; 1000 * 37], 1000 * 37);
    // Values up to f32::MAX / 2 of both signs, in blocks that split into several chunks.
    let big: Vec<f32> = uniform(1 << 18, 3).iter().map(|v| v * 1.7e38).collect();
    for block in [1 << 18, 1 << 14, 4096, 64] {
        check(&format!("near f32::MAX, block {block}"), &big, block);
    }
    // The raw double-float sum overflows here: what the scaling is for.
    let raw = big
        .iter()
        .fold((0.0, 0.0), |acc, x| dd_add(acc, (x.abs(), 0.0)));
    assert!(raw.0.is_infinite());
}

/// Ordinary values, tiny ones (a chunk's exponent far below 0) and blocks that mix magnitudes
/// 76 orders apart, where a term can vanish next to the largest (at most 2^-94 of the sum).
#[test]
fn ordinary_tiny_and_mixed_values_give_the_cpus_means() {
    for (block, seed) in [
        (1usize, 1u64),
        (7, 2),
        (1000, 3),
        (1 << 16, 4),
        (1 << 20, 5),
    ] {
        let n = (block * 3).max(4096 / block * block);
        let xs = uniform(n, seed);
        check(&format!("uniform, block {block}"), &xs, block);
        let tiny: Vec<f32> = xs.iter().map(|v| v * 1e-30).collect();
        check(&format!("tiny, block {block}"), &tiny, block);
    }
    let mixed: Vec<f32> = uniform(3 << 15, 6)
        .iter()
        .enumerate()
        .map(|(i, v)| if i % 3 == 0 { v * 1e38 } else { v * 1e-38 })
        .collect();
    for block in [3 << 15, 3 << 12, 3] {
        check(&format!("mixed, block {block}"), &mixed, block);
    }
    check("zeros", &[0.0; 4096], 64);
}

/// The centered kind's signed mean when the values nearly cancel: symmetric pairs plus a small
/// offset, so that `mean(x)` is 1e-4 of `mean|x|`.
#[test]
fn a_cancelling_signed_mean_agrees() {
    let half = uniform(1 << 15, 7);
    let xs: Vec<f32> = half
        .iter()
        .chain(half.iter())
        .enumerate()
        .map(|(i, &v)| if i < half.len() { v + 1e-4 } else { -v + 1e-4 })
        .collect();
    for block in [xs.len(), 4096, 128] {
        check(&format!("cancelling, block {block}"), &xs, block);
    }
}
