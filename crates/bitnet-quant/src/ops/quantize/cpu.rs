//! CPU kernels of the quantize op: forward map and estimator backward.

use crate::ops::cpu_util::for_block_segments;
use crate::ops::math::{blend, EstKind, Kind};

/// `blend(x, q(x), lambda)` for every value, `params` holding `(s, aux)` per block.
pub(crate) fn forward(
    kind: Kind,
    xs: &[f32],
    params: &[f32],
    block: usize,
    lambda: f32,
) -> Vec<f32> {
    // SAFETY: the segments cover `out` and `map` writes every value of each.
    let mut out = unsafe { crate::ops::cpu_util::output_vec(xs.len()) };
    for_block_segments(&mut out, block, |b, start, seg| {
        let (s, aux) = (params[2 * b], params[2 * b + 1]);
        let xs = &xs[start..start + seg.len()];
        // One arm per kind so that each inner loop is branch-free and vectorises.
        match kind {
            Kind::Binary { .. } => map(seg, xs, lambda, |x| {
                Kind::Binary { scaled: true }.quantize(x, s, aux)
            }),
            Kind::Absmean => map(seg, xs, lambda, |x| Kind::Absmean.quantize(x, s, aux)),
            Kind::Threshold { .. } => map(seg, xs, lambda, |x| {
                Kind::Threshold {
                    fixed: None,
                    scaled: true,
                }
                .quantize(x, s, aux)
            }),
            Kind::Int { qmax } => map(seg, xs, lambda, |x| Kind::Int { qmax }.quantize(x, s, aux)),
        }
    });
    out
}

#[inline(always)]
fn map(out: &mut [f32], xs: &[f32], lambda: f32, q: impl Fn(f32) -> f32) {
    if lambda == 1.0 {
        for (o, &x) in out.iter_mut().zip(xs) {
            *o = q(x);
        }
    } else {
        for (o, &x) in out.iter_mut().zip(xs) {
            *o = blend(x, q(x), lambda);
        }
    }
}

/// `u * ((1 - lambda) + lambda * e'(x / n))` for every value: the gradient of the blended
/// quantizer with the estimator standing in for `dq/dx`.
pub(crate) fn backward(
    kind: Kind,
    est: EstKind,
    xs: &[f32],
    params: &[f32],
    us: &[f32],
    block: usize,
    lambda: f32,
) -> Vec<f32> {
    let mut out = vec![0f32; xs.len()];
    for_block_segments(&mut out, block, |b, start, seg| {
        let inv_n = 1.0 / kind.normalizer(params[2 * b], params[2 * b + 1]);
        let xs = &xs[start..start + seg.len()];
        let us = &us[start..start + seg.len()];
        for ((o, &x), &u) in seg.iter_mut().zip(xs).zip(us) {
            *o = u * ((1.0 - lambda) + lambda * est.derivative(x * inv_n));
        }
    });
    out
}
