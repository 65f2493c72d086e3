//! CPU kernels of the fused RMSNorm: forward, and the two gradients of the backward.

use crate::ops::slot::Slot;
use rayon::prelude::*;

/// Rows per parallel work item: about [`CHUNK`](crate::ops::cpu_util::CHUNK) values.
fn rows_per_task(dim: usize) -> usize {
    (crate::ops::cpu_util::CHUNK / dim).max(1)
}

/// Calls `f(row_index, out_row)` for every row of `dim` values of `out`, in parallel when
/// [`parallel`](crate::ops::parallel) says so. Rows are independent, so the result does not
/// depend on the split.
fn for_rows<S: Send>(out: &mut [S], dim: usize, f: impl Fn(usize, &mut [S]) + Sync) {
    if crate::ops::parallel(out.len()) {
        let per = rows_per_task(dim);
        out.par_chunks_mut(per * dim)
            .enumerate()
            .for_each(|(t, block)| {
                for (i, row) in block.chunks_mut(dim).enumerate() {
                    f(t * per + i, row);
                }
            });
    } else {
        for (i, row) in out.chunks_mut(dim).enumerate() {
            f(i, row);
        }
    }
}

/// `sum(x^2)` in 8 interleaved partial sums: a single running f32 sum cannot be vectorised (the
/// compiler may not reorder float additions), and the norm's rows are reduced in every pass.
#[inline(always)]
fn sum_sq(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    acc.iter().sum::<f32>() + tail
}

/// `sum(u w x)` in 8 interleaved partial sums (see [`sum_sq`]).
#[inline(always)]
fn dot3(x: &[f32], u: &[f32], w: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (cx, cu, cw) = (x.chunks_exact(8), u.chunks_exact(8), w.chunks_exact(8));
    let tail = cx
        .remainder()
        .iter()
        .zip(cu.remainder())
        .zip(cw.remainder());
    let tail: f32 = tail.map(|((&x, &u), &w)| u * w * x).sum();
    for ((x, u), w) in cx.zip(cu).zip(cw) {
        for l in 0..8 {
            acc[l] += u[l] * w[l] * x[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `sqrt(mean(x^2) + eps)` of one row.
#[inline(always)]
pub(crate) fn rms(x: &[f32], eps: f32) -> f32 {
    (sum_sq(x) / x.len() as f32 + eps).sqrt()
}

/// `y = x / rms(x) * w` row by row; `w` has one value per column.
pub(crate) fn forward(xs: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let dim = w.len();
    let mut out = Box::<[f32]>::new_uninit_slice(xs.len());
    for_rows(&mut out, dim, |r, o| {
        let x = &xs[r * dim..(r + 1) * dim];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is available (checked above).
            return unsafe { forward_row_avx2(x, w, eps, o) };
        }
        forward_row(x, w, eps, o);
    });
    // SAFETY: `for_rows` visits every row and `forward_row` writes every value of it.
    unsafe { out.assume_init() }.into_vec()
}

/// One row of [`forward`].
#[inline(always)]
fn forward_row<S: Slot<f32>>(x: &[f32], w: &[f32], eps: f32, out: &mut [S]) {
    let denom = rms(x, eps);
    for ((o, &x), &w) in out.iter_mut().zip(x).zip(w) {
        o.put(x / denom * w);
    }
}

/// [`forward_row`] compiled for AVX2: the same eight partial sums and the same operations per
/// value (no FMA), so the same bits, eight values per instruction instead of four (the default
/// x86-64 target is SSE2). The same holds for [`grad_input_row_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn forward_row_avx2<S: Slot<f32>>(x: &[f32], w: &[f32], eps: f32, out: &mut [S]) {
    forward_row(x, w, eps, out);
}

/// `dL/dx` for upstream `us`: with `s = 1 / rms(x)` and `D` columns,
/// `g_j = s u_j w_j - x_j s^3 / D * sum_i(u_i w_i x_i)` (the `1/rms` factor depends on every
/// value of its row, hence the second term).
pub(crate) fn grad_input(xs: &[f32], w: &[f32], us: &[f32], eps: f32) -> Vec<f32> {
    let dim = w.len();
    let mut out = Box::<[f32]>::new_uninit_slice(xs.len());
    for_rows(&mut out, dim, |r, o| {
        let x = &xs[r * dim..(r + 1) * dim];
        let u = &us[r * dim..(r + 1) * dim];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is available (checked above).
            return unsafe { grad_input_row_avx2(x, u, w, eps, o) };
        }
        grad_input_row(x, u, w, eps, o);
    });
    // SAFETY: `for_rows` visits every row and `grad_input_row` writes every value of it.
    unsafe { out.assume_init() }.into_vec()
}

/// One row of [`grad_input`].
#[inline(always)]
fn grad_input_row<S: Slot<f32>>(x: &[f32], u: &[f32], w: &[f32], eps: f32, out: &mut [S]) {
    let s = 1.0 / rms(x, eps);
    let dot = dot3(x, u, w);
    let k = dot * s * s * s / x.len() as f32;
    for (((o, &x), &u), &w) in out.iter_mut().zip(x).zip(u).zip(w) {
        o.put(s * u * w - x * k);
    }
}

/// [`grad_input_row`] compiled for AVX2 (see [`forward_row_avx2`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn grad_input_row_avx2<S: Slot<f32>>(
    x: &[f32],
    u: &[f32],
    w: &[f32],
    eps: f32,
    out: &mut [S],
) {
    grad_input_row(x, u, w, eps, out);
}

/// `dL/dw_j = sum over rows of u_j x_j / rms(x)`. Sequential over rows, so the sum has one fixed
/// order.
pub(crate) fn grad_weight(xs: &[f32], us: &[f32], dim: usize, eps: f32) -> Vec<f32> {
    let mut out = vec![0f32; dim];
    for (x, u) in xs.chunks(dim).zip(us.chunks(dim)) {
        let s = 1.0 / rms(x, eps);
        for ((o, &x), &u) in out.iter_mut().zip(x).zip(u) {
            *o += u * x * s;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The AVX2 builds must give the portable builds' values to the bit (the GPU kernels were
    /// verified against the latter), with and without an 8-value tail.
    #[test]
    fn the_avx2_builds_give_the_same_bits() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for dim in [1usize, 7, 8, 13, 256, 784] {
            let mut v =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2f32..2.0)).collect() };
            let (xs, us, w) = (v(3 * dim), v(3 * dim), v(dim));
            let got = forward(&xs, &w, 1e-6);
            let got_grad = grad_input(&xs, &w, &us, 1e-6);
            for r in 0..3 {
                let (x, u) = (&xs[r * dim..][..dim], &us[r * dim..][..dim]);
                let mut want = vec![0f32; dim];
                forward_row(x, &w, 1e-6, &mut want);
                assert_eq!(
                    bits(&got[r * dim..][..dim]),
                    bits(&want),
                    "forward, dim {dim}"
                );
                grad_input_row(x, u, &w, 1e-6, &mut want);
                assert_eq!(
                    bits(&got_grad[r * dim..][..dim]),
                    bits(&want),
                    "grad, dim {dim}"
                );
            }
        }
    }
}
