//! CPU kernels of the learnable-temperature surrogate.

use super::Surrogate;
use crate::ops::cpu_util::for_block_segments;
use rayon::prelude::*;

/// `(1 - h) s soft(x / n) + h q(x)` for every value.
pub(crate) fn forward(
    sur: &Surrogate,
    xs: &[f32],
    params: &[f32],
    block: usize,
    t: f32,
) -> Vec<f32> {
    let mut out = vec![0f32; xs.len()];
    for_block_segments(&mut out, block, |b, start, seg| {
        let (s, aux) = (params[2 * b], params[2 * b + 1]);
        let xs = &xs[start..start + seg.len()];
        for (o, &x) in seg.iter_mut().zip(xs) {
            *o = sur.value(x, s, aux, t);
        }
    });
    out
}

/// `[dL/dx (one per value) ..., dL/dt]`: the surrogate's exact derivatives times the upstream.
pub(crate) fn backward(
    sur: &Surrogate,
    xs: &[f32],
    params: &[f32],
    us: &[f32],
    block: usize,
    t: f32,
) -> Vec<f32> {
    let n = xs.len();
    let mut out = vec![0f32; n + 1];
    let (gx, gt) = out.split_at_mut(n);
    for_block_segments(gx, block, |b, start, seg| {
        let (s, aux) = (params[2 * b], params[2 * b + 1]);
        for (i, o) in seg.iter_mut().enumerate() {
            *o = us[start + i] * sur.dx(xs[start + i], s, aux, t);
        }
    });
    let dt_of = |b: usize, range: std::ops::Range<usize>| -> f64 {
        let (s, aux) = (params[2 * b], params[2 * b + 1]);
        range
            .map(|i| (us[i] * sur.dt(xs[i], s, aux, t)) as f64)
            .sum::<f64>()
    };
    let blocks = n / block;
    gt[0] = if crate::ops::parallel(n) {
        (0..blocks)
            .into_par_iter()
            .map(|b| dt_of(b, b * block..(b + 1) * block))
            .sum::<f64>() as f32
    } else {
        (0..blocks)
            .map(|b| dt_of(b, b * block..(b + 1) * block))
            .sum::<f64>() as f32
    };
    out
}
