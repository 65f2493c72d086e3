//! CPU kernels of LSQ.

use crate::ops::cpu_util::for_block_segments;
use crate::scheme::EPS;
use rayon::prelude::*;

/// `s * clamp(round(x / s), -(qmax + 1), qmax)` per block with its own step `s` (floored at 1e-5).
pub(crate) fn forward(qmax: f32, xs: &[f32], steps: &[f32], block: usize) -> Vec<f32> {
    let mut out = vec![0f32; xs.len()];
    for_block_segments(&mut out, block, |b, start, seg| {
        let s = steps[b].max(EPS);
        for (o, &x) in seg.iter_mut().zip(&xs[start..]) {
            *o = s * crate::ops::math::round_clamped(x / s, -qmax - 1.0, qmax);
        }
    });
    out
}

/// `[dL/dx ..., dL/ds per block ...]`.
pub(crate) fn backward(qmax: f32, xs: &[f32], steps: &[f32], us: &[f32], block: usize) -> Vec<f32> {
    let n = xs.len();
    let blocks = n / block;
    let qmin = -qmax - 1.0;
    let mut out = vec![0f32; n + blocks];
    let (gx, gs) = out.split_at_mut(n);
    for_block_segments(gx, block, |b, start, seg| {
        let s = steps[b].max(EPS);
        for (i, o) in seg.iter_mut().enumerate() {
            let r = xs[start + i] / s;
            *o = if (qmin..=qmax).contains(&r) {
                us[start + i]
            } else {
                0.0
            };
        }
    });
    // LSQ's gradient scale keeps the step's updates in proportion to the weights' (Esser et al.).
    let g = 1.0 / ((block as f32) * qmax).sqrt();
    let ds = |b: usize| -> f32 {
        let s = steps[b].max(EPS);
        let mut acc = 0f64;
        for i in b * block..(b + 1) * block {
            let r = xs[i] / s;
            let d = if r < qmin {
                qmin
            } else if r > qmax {
                qmax
            } else {
                r.round_ties_even() - r
            };
            acc += (us[i] * d) as f64;
        }
        g * acc as f32
    };
    if crate::ops::parallel(n) {
        gs.par_iter_mut().enumerate().for_each(|(b, o)| *o = ds(b));
    } else {
        gs.iter_mut().enumerate().for_each(|(b, o)| *o = ds(b));
    }
    out
}
