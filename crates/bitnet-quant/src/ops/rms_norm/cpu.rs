//! CPU kernels of the fused RMSNorm: forward, and the two gradients of the backward.

use rayon::prelude::*;

/// Rows per parallel work item: about [`CHUNK`](crate::ops::cpu_util::CHUNK) values.
fn rows_per_task(dim: usize) -> usize {
    (crate::ops::cpu_util::CHUNK / dim).max(1)
}

/// Calls `f(row_index, out_row)` for every row of `dim` values of `out`, in parallel when
/// [`parallel`](crate::ops::parallel) says so. Rows are independent, so the result does not
/// depend on the split.
fn for_rows(out: &mut [f32], dim: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
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
#[inline]
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
#[inline]
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
#[inline]
pub(crate) fn rms(x: &[f32], eps: f32) -> f32 {
    (sum_sq(x) / x.len() as f32 + eps).sqrt()
}

/// `y = x / rms(x) * w` row by row; `w` has one value per column.
pub(crate) fn forward(xs: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let dim = w.len();
    // SAFETY: `for_rows` visits every row and the loop writes every value of it.
    let mut out = unsafe { crate::ops::cpu_util::output_vec(xs.len()) };
    for_rows(&mut out, dim, |r, o| {
        let x = &xs[r * dim..(r + 1) * dim];
        let denom = rms(x, eps);
        for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
            *o = x / denom * w;
        }
    });
    out
}

/// `dL/dx` for upstream `us`: with `s = 1 / rms(x)` and `D` columns,
/// `g_j = s u_j w_j - x_j s^3 / D * sum_i(u_i w_i x_i)` (the `1/rms` factor depends on every
/// value of its row, hence the second term).
pub(crate) fn grad_input(xs: &[f32], w: &[f32], us: &[f32], eps: f32) -> Vec<f32> {
    let dim = w.len();
    // SAFETY: `for_rows` visits every row and the loop writes every value of it.
    let mut out = unsafe { crate::ops::cpu_util::output_vec(xs.len()) };
    for_rows(&mut out, dim, |r, o| {
        let x = &xs[r * dim..(r + 1) * dim];
        let u = &us[r * dim..(r + 1) * dim];
        let s = 1.0 / rms(x, eps);
        let dot = dot3(x, u, w);
        let k = dot * s * s * s / dim as f32;
        for (((o, &x), &u), &w) in o.iter_mut().zip(x).zip(u).zip(w) {
            *o = s * u * w - x * k;
        }
    });
    out
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
