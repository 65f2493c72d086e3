//! CPU kernel of the block parameters.

use crate::error::QuantError;
use crate::ops::math::Kind;
use crate::ops::parallel;
use rayon::prelude::*;

/// `(sum |x|, max |x|)`; NaN shows up in the sum (the max ignores it), infinities in both.
/// Eight independent lanes in f32 per 1024 values, then f64 across, so the loop vectorises and a
/// 16 M value sum keeps about 7 significant digits.
pub(crate) fn abs_stats(xs: &[f32]) -> (f64, f32) {
    let mut total = 0f64;
    let mut mx = 0f32;
    for chunk in xs.chunks(1024) {
        let mut acc = [0f32; 8];
        let mut lane_max = [0f32; 8];
        let mut it = chunk.chunks_exact(8);
        for c in &mut it {
            for k in 0..8 {
                let a = c[k].abs();
                acc[k] += a;
                lane_max[k] = lane_max[k].max(a);
            }
        }
        let mut s: f32 = acc.iter().sum();
        let mut m = lane_max.iter().fold(0f32, |a, &b| a.max(b));
        for &v in it.remainder() {
            s += v.abs();
            m = m.max(v.abs());
        }
        total += s as f64;
        mx = mx.max(m);
    }
    (total, mx)
}

/// `(sum |x|, count)` over the values with `|x| > d`.
fn above_stats(xs: &[f32], d: f32) -> (f64, usize) {
    let mut sum = 0f64;
    let mut count = 0usize;
    for chunk in xs.chunks(1024) {
        let mut s = 0f32;
        for &v in chunk {
            let a = v.abs();
            let hit = a > d;
            s += if hit { a } else { 0.0 };
            count += hit as usize;
        }
        sum += s as f64;
    }
    (sum, count)
}

fn check_finite(op: &'static str, sum: f64, xs: &[f32]) -> Result<(), QuantError> {
    if sum.is_finite() {
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
    let mean = (sum / n) as f32;
    let above_mean = if kind.needs_above_pass() {
        let d = kind.threshold(mean);
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
    kind.params(mean, max, above_mean)
}

/// Block parameters, `(s, aux)` per block of `block` consecutive values, flattened.
pub(crate) fn block_params(
    op: &'static str,
    kind: Kind,
    xs: &[f32],
    block: usize,
) -> Result<Vec<f32>, QuantError> {
    let one = |b: &[f32]| -> Result<(f32, f32), QuantError> {
        let (sum, max) = abs_stats(b);
        check_finite(op, sum, b)?;
        Ok(finish(kind, b, sum, max, false))
    };
    let pairs: Vec<(f32, f32)> = if block == xs.len() && parallel(xs.len()) {
        let (sum, max) = xs
            .par_chunks(1 << 16)
            .map(abs_stats)
            .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1.max(b.1)));
        check_finite(op, sum, xs)?;
        vec![finish(kind, xs, sum, max, true)]
    } else if parallel(xs.len()) {
        xs.par_chunks(block).map(one).collect::<Result<_, _>>()?
    } else {
        xs.chunks(block).map(one).collect::<Result<_, _>>()?
    };
    Ok(pairs.into_iter().flat_map(|(s, a)| [s, a]).collect())
}
