//! CPU kernels of the fused optimizer updates: one pass over a parameter, its gradient and its
//! state, in place, with no allocation.
//!
//! Each kernel works on chunks of [`CHUNK`] elements. Below the parallel threshold (default
//! [`DEFAULT_PAR_THRESHOLD`] elements) the chunks run one after the other on the calling thread;
//! above it, with more than one rayon thread, they are spread over rayon's pool. The update of an
//! element never depends on another element, so the result is bit-identical whatever the
//! threshold or the number of threads.
//!
//! The gradient may be strided (candle hands the gradient of a `Linear` weight over as a transposed
//! view): it is read through [`GradSrc`]. A 2-D transposed view is copied chunk by chunk into a
//! per-thread scratch buffer with a cache-blocked transpose ([`transpose_chunk`]), so that the update
//! itself always runs the contiguous, vectorised loop; any other layout walks the strides element by
//! element. The values read are the same either way, so the result is bit-identical.

use rayon::prelude::*;
use std::cell::RefCell;

/// Elements per work item, sequential or parallel.
pub(crate) const CHUNK: usize = 16 * 1024;

/// Parameters with at least this many elements are updated in parallel (rayon), smaller ones on the
/// calling thread.
///
/// Measured with `cargo bench --bench optimizer -- cpu_adamw_kernel_threshold` (criterion, one
/// parameter through `QatAdamW::step`, 2 rayon threads, on the shared 2-core development machine under
/// heavy load, so the numbers are noisy): at 16 Ki elements and below a parameter is a single chunk,
/// so "parallel" runs the same sequential code (84 vs 94 µs at 16 Ki: noise); at 32 Ki (2 chunks)
/// sequential 240 µs vs parallel 75 µs; at 64 Ki 358 vs 130 µs; at 256 Ki 1.78 ms vs 0.51 ms. The
/// threshold is therefore the smallest size that splits into two chunks, 32 Ki elements. It can be
/// changed per optimizer (`set_parallel_threshold`).
pub const DEFAULT_PAR_THRESHOLD: usize = 32 * 1024;

/// Side of the square tiles of [`transpose_chunk`]: 32 x 32 f32 is 4 KiB read and 4 KiB written,
/// which stays in L1 while each source row is read as 128 contiguous bytes (two cache lines).
const TILE: usize = 32;

/// A read-only view of a gradient: contiguous, transposed, or strided (any layout candle produces).
#[derive(Clone, Copy, Debug)]
pub(crate) enum GradSrc<'a> {
    /// The elements, in logical order.
    Contiguous(&'a [f32]),
    /// A logical `[rows, cols]` matrix (`dims`) with strides `[1, ld]` (`strides`): element
    /// `(r, c)` is `data[offset + r + c * ld]`. This is `w.t()` for a contiguous `w`, the layout
    /// of a `Linear` weight's gradient. Build it with [`GradSrc::strided`].
    Transposed {
        data: &'a [f32],
        dims: &'a [usize],
        strides: &'a [usize],
        offset: usize,
    },
    /// `data[offset + sum(idx[d] * strides[d])]` in row-major order of `dims`.
    Strided {
        data: &'a [f32],
        dims: &'a [usize],
        strides: &'a [usize],
        offset: usize,
    },
}

/// Walks a strided view from a given logical position (an odometer over the dims).
pub(crate) struct StridedIter<'a> {
    data: &'a [f32],
    dims: &'a [usize],
    strides: &'a [usize],
    idx: [usize; 8],
    pos: usize,
    left: usize,
}

impl Iterator for StridedIter<'_> {
    type Item = f32;

    #[inline]
    fn next(&mut self) -> Option<f32> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let value = self.data[self.pos];
        // Advance the odometer, last dim fastest.
        for d in (0..self.dims.len()).rev() {
            self.idx[d] += 1;
            self.pos += self.strides[d];
            if self.idx[d] < self.dims[d] {
                break;
            }
            self.pos -= self.strides[d] * self.dims[d];
            self.idx[d] = 0;
        }
        Some(value)
    }
}

/// Iterator over `len` gradient elements starting at logical index `start`.
pub(crate) enum GradIter<'a> {
    Contiguous(&'a [f32]),
    Strided(StridedIter<'a>),
}

thread_local! {
    /// Per-thread destination of [`transpose_chunk`]: one chunk, allocated once per thread.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Writes the logical elements `start..start + out.len()` of a transposed view (see
/// [`GradSrc::Transposed`]) into `out`, in logical order. Whole logical rows go through
/// `TILE x TILE` tiles (contiguous reads down the source, writes within a few cache lines); the
/// partial rows at the chunk's ends are copied element by element.
pub(crate) fn transpose_chunk(
    out: &mut [f32],
    data: &[f32],
    cols: usize,
    ld: usize,
    offset: usize,
    start: usize,
) {
    let end = start + out.len();
    let at = |i: usize| data[offset + i / cols + (i % cols) * ld];
    // Head: the rest of a row the chunk starts inside of.
    let head_end = start.div_ceil(cols).saturating_mul(cols).min(end);
    for i in start..head_end {
        out[i - start] = at(i);
    }
    // Body: whole rows, tiled.
    let (r0, r1) = (head_end / cols, end / cols);
    for rr in (r0..r1).step_by(TILE) {
        let r_hi = (rr + TILE).min(r1);
        for cc in (0..cols).step_by(TILE) {
            let c_hi = (cc + TILE).min(cols);
            for c in cc..c_hi {
                let src = &data[offset + c * ld + rr..offset + c * ld + r_hi];
                for (k, &g) in src.iter().enumerate() {
                    out[(rr + k) * cols + c - start] = g;
                }
            }
        }
    }
    // Tail: the start of a row the chunk ends inside of.
    for i in (r1 * cols).max(head_end)..end {
        out[i - start] = at(i);
    }
}

impl<'a> GradSrc<'a> {
    /// Maximum rank of a strided gradient (contiguous ones have no limit).
    pub(crate) const MAX_RANK: usize = 8;

    /// The view of a non-contiguous gradient: [`GradSrc::Transposed`] for the `[1, ld]` strides of
    /// a transposed matrix (with `ld >= rows`, so that no two elements alias), else
    /// [`GradSrc::Strided`].
    pub(crate) fn strided(
        data: &'a [f32],
        dims: &'a [usize],
        strides: &'a [usize],
        offset: usize,
    ) -> Self {
        match (dims, strides) {
            ([rows, _], [1, ld]) if *ld >= *rows => GradSrc::Transposed {
                data,
                dims,
                strides,
                offset,
            },
            _ => GradSrc::Strided {
                data,
                dims,
                strides,
                offset,
            },
        }
    }

    /// Calls `f` with an iterator over the `len` gradient elements from logical index `start`.
    /// A transposed view is first copied into this thread's scratch buffer, so `f` gets the
    /// contiguous iterator and its vectorised loop.
    #[inline(always)]
    fn with_iter<R>(&self, start: usize, len: usize, f: impl FnOnce(GradIter<'_>) -> R) -> R {
        match *self {
            GradSrc::Transposed {
                data,
                dims,
                strides,
                offset,
            } => SCRATCH.with(|s| {
                let mut buf = s.borrow_mut();
                if buf.len() < len {
                    buf.resize(len, 0.0);
                }
                let buf = &mut buf[..len];
                transpose_chunk(buf, data, dims[1], strides[1], offset, start);
                f(GradIter::Contiguous(buf))
            }),
            _ => f(self.iter(start, len)),
        }
    }

    fn iter(&self, start: usize, len: usize) -> GradIter<'a> {
        match *self {
            GradSrc::Contiguous(g) => GradIter::Contiguous(&g[start..start + len]),
            // `with_iter` copies a transposed view instead; walking its strides gives the same
            // values (the tests compare the two).
            GradSrc::Transposed {
                data,
                dims,
                strides,
                offset,
            }
            | GradSrc::Strided {
                data,
                dims,
                strides,
                offset,
            } => {
                let mut idx = [0usize; 8];
                let mut rest = start;
                let mut pos = offset;
                for d in (0..dims.len()).rev() {
                    idx[d] = rest % dims[d];
                    rest /= dims[d];
                    pos += idx[d] * strides[d];
                }
                GradIter::Strided(StridedIter {
                    data,
                    dims,
                    strides,
                    idx,
                    pos,
                    left: len,
                })
            }
        }
    }
}

/// Runs `f(chunk_start, dst_chunk, state_chunks, grad_iter)` over all chunks, in parallel when
/// `dst.len() >= threshold`. `states` are per-element state buffers of the same length as `dst`.
macro_rules! drive {
    ($threshold:expr, $dst:expr, $grad:expr, [$($st:ident),*], $body:expr) => {{
        let threshold: usize = $threshold;
        let dst: &mut [f32] = $dst;
        let grad: GradSrc<'_> = $grad;
        let n = dst.len();
        if n >= threshold && n > CHUNK && rayon::current_num_threads() > 1 {
            dst.par_chunks_mut(CHUNK)
                $(.zip($st.par_chunks_mut(CHUNK)))*
                .enumerate()
                .for_each(|(i, drive!(@pat dst_c, [$($st),*]))| {
                        grad.with_iter(i * CHUNK, dst_c.len(), |g| $body(dst_c, $($st,)* g))
                });
        } else {
            for (i, drive!(@pat dst_c, [$($st),*])) in dst.chunks_mut(CHUNK)
                $(.zip($st.chunks_mut(CHUNK)))*
                .enumerate()
            {
                grad.with_iter(i * CHUNK, dst_c.len(), |g| $body(dst_c, $($st,)* g))
            }
        }
    }};
    (@pat $d:ident, []) => { $d };
    (@pat $d:ident, [$a:ident]) => { ($d, $a) };
    (@pat $d:ident, [$a:ident, $b:ident]) => { (($d, $a), $b) };
}

/// Per-step constants of AdamW, rounded to f32 exactly as candle-nn's tensor ops round them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdamCoeffs {
    pub beta1: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// `1 / (1 - beta1^t)`
    pub scale_m: f32,
    /// `1 / (1 - beta2^t)`
    pub scale_v: f32,
    /// `1 - lr * weight_decay`
    pub decay: f32,
    pub lr: f32,
    pub eps: f32,
    /// Clip the updated weight to `[-c, c]`.
    pub clip: Option<f32>,
}

impl AdamCoeffs {
    /// Coefficients for step `t` (1-based), computed in f64 like candle-nn then rounded to f32.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        t: usize,
        clip: Option<f32>,
    ) -> Self {
        let t = i32::try_from(t).unwrap_or(i32::MAX);
        Self {
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            scale_m: (1.0 / (1.0 - beta1.powi(t))) as f32,
            scale_v: (1.0 / (1.0 - beta2.powi(t))) as f32,
            decay: (1.0 - lr * weight_decay) as f32,
            lr: lr as f32,
            eps: eps as f32,
            clip,
        }
    }
}

/// One element of AdamW: `(theta, m, v)` after the update with gradient `g`.
#[inline(always)]
fn adam_elem<const CLIP: bool>(t: f32, m: f32, v: f32, g: f32, c: &AdamCoeffs) -> (f32, f32, f32) {
    // The order of operations copies candle-nn's AdamW (each tensor op rounds to f32), so that
    // both agree to the last bit whenever the compiler does not contract into FMAs.
    let next_m = m * c.beta1 + g * c.one_minus_beta1;
    let next_v = v * c.beta2 + (g * g) * c.one_minus_beta2;
    let m_hat = next_m * c.scale_m;
    let v_hat = next_v * c.scale_v;
    let adjusted = m_hat / (v_hat.sqrt() + c.eps);
    let mut next_t = t * c.decay - adjusted * c.lr;
    if CLIP {
        let clip = c.clip.unwrap_or(f32::INFINITY);
        next_t = next_t.clamp(-clip, clip);
    }
    (next_t, next_m, next_v)
}

/// The contiguous case as an indexed loop over equal-length slices, with the clip decided once
/// per chunk: LLVM vectorises this (8 lanes with AVX2) but not the four-way `zip` with an
/// `Option` test per element, which ran scalar at about 5 ns per element.
#[inline(always)]
fn adam_slice<const CLIP: bool>(
    theta: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    c: &AdamCoeffs,
) {
    let n = theta.len();
    let (m, v, g) = (&mut m[..n], &mut v[..n], &g[..n]);
    for i in 0..n {
        let (t, mm, vv) = adam_elem::<CLIP>(theta[i], m[i], v[i], g[i], c);
        theta[i] = t;
        m[i] = mm;
        v[i] = vv;
    }
}

/// [`adam_slice`] compiled for AVX2 when the CPU has it: the default x86-64 target is SSE2, and
/// the update's division and square root on 4 lanes instead of 8 made the step compute-bound
/// (0.35 ms for the MNIST MLP's 270k parameters, 8 % of its training step). No FMA is enabled,
/// so the rounding is the same as the SSE2 build and as candle-nn's.
#[inline(always)]
fn adam_slice_best<const CLIP: bool>(
    theta: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    c: &AdamCoeffs,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is available (checked above).
        unsafe { adam_slice_avx2::<CLIP>(theta, m, v, g, c) };
        return;
    }
    adam_slice::<CLIP>(theta, m, v, g, c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn adam_slice_avx2<const CLIP: bool>(
    theta: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    c: &AdamCoeffs,
) {
    adam_slice::<CLIP>(theta, m, v, g, c)
}

#[inline(always)]
fn adam_iter<const CLIP: bool>(
    theta: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: impl Iterator<Item = f32>,
    c: &AdamCoeffs,
) {
    for (((t, m), v), g) in theta.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
        (*t, *m, *v) = adam_elem::<CLIP>(*t, *m, *v, g, c);
    }
}

#[inline(always)]
fn adam_dispatch(theta: &mut [f32], m: &mut [f32], v: &mut [f32], g: GradIter<'_>, c: &AdamCoeffs) {
    match (g, c.clip.is_some()) {
        (GradIter::Contiguous(g), false) => adam_slice_best::<false>(theta, m, v, g, c),
        (GradIter::Contiguous(g), true) => adam_slice_best::<true>(theta, m, v, g, c),
        (GradIter::Strided(g), false) => adam_iter::<false>(theta, m, v, g, c),
        (GradIter::Strided(g), true) => adam_iter::<true>(theta, m, v, g, c),
    }
}

/// Fused AdamW update of `theta`, `m` and `v` in place.
pub(crate) fn adamw(
    theta: &mut [f32],
    grad: GradSrc<'_>,
    m: &mut [f32],
    v: &mut [f32],
    c: &AdamCoeffs,
    threshold: usize,
) {
    drive!(threshold, theta, grad, [m, v], |t, m, v, g| adam_dispatch(
        t, m, v, g, c
    ));
}

/// Per-step constants of SGD.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SgdCoeffs {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    pub nesterov: bool,
}

#[inline(always)]
fn sgd_chunk(p: &mut [f32], b: &mut [f32], g: impl Iterator<Item = f32>, c: &SgdCoeffs) {
    for ((p, b), g) in p.iter_mut().zip(b.iter_mut()).zip(g) {
        // PyTorch: g += wd * p; b = mu * b + g; step = nesterov ? g + mu * b : b; p -= lr * step
        let g = g + c.weight_decay * *p;
        let next_b = c.momentum * *b + g;
        let step = if c.nesterov {
            g + c.momentum * next_b
        } else {
            next_b
        };
        *b = next_b;
        *p -= c.lr * step;
    }
}

#[inline(always)]
fn sgd_dispatch(p: &mut [f32], b: &mut [f32], g: GradIter<'_>, c: &SgdCoeffs) {
    match g {
        GradIter::Contiguous(g) => sgd_chunk(p, b, g.iter().copied(), c),
        GradIter::Strided(g) => sgd_chunk(p, b, g, c),
    }
}

/// Fused SGD (momentum, optional Nesterov, coupled weight decay) update in place.
pub(crate) fn sgd(
    p: &mut [f32],
    grad: GradSrc<'_>,
    b: &mut [f32],
    c: &SgdCoeffs,
    threshold: usize,
) {
    drive!(threshold, p, grad, [b], |p, b, g| sgd_dispatch(p, b, g, c));
}

/// Per-step constants of Bop.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BopCoeffs {
    pub gamma: f32,
    pub threshold: f32,
}

#[inline(always)]
fn bop_chunk(w: &mut [f32], m: &mut [f32], g: impl Iterator<Item = f32>, c: &BopCoeffs) {
    for ((w, m), g) in w.iter_mut().zip(m.iter_mut()).zip(g) {
        let next_m = *m + c.gamma * (g - *m);
        *m = next_m;
        if *w * next_m > c.threshold {
            *w = -*w;
        }
    }
}

#[inline(always)]
fn bop_dispatch(w: &mut [f32], m: &mut [f32], g: GradIter<'_>, c: &BopCoeffs) {
    match g {
        GradIter::Contiguous(g) => bop_chunk(w, m, g.iter().copied(), c),
        GradIter::Strided(g) => bop_chunk(w, m, g, c),
    }
}

/// Fused Bop update (moving average of the gradient, sign flips) in place.
pub(crate) fn bop(
    w: &mut [f32],
    grad: GradSrc<'_>,
    m: &mut [f32],
    c: &BopCoeffs,
    threshold: usize,
) {
    drive!(threshold, w, grad, [m], |w, m, g| bop_dispatch(w, m, g, c));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 build of the contiguous AdamW update gives the portable build's values to the
    /// bit (no FMA contraction), with and without clipping.
    #[test]
    fn the_avx2_adamw_gives_the_same_bits() {
        let n = 1003;
        let vals = |seed: u32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32)
                .map(|v| v / (1u32 << 24) as f32 - 0.5)
                .collect()
        };
        for clip in [None, Some(0.3f32)] {
            let c = AdamCoeffs::new(1e-3, 0.9, 0.999, 1e-8, 0.01, 7, clip);
            let g = vals(1);
            let (mut t1, mut m1, mut v1) = (
                vals(2),
                vals(3),
                vals(4).iter().map(|v| v.abs()).collect::<Vec<_>>(),
            );
            let (mut t2, mut m2, mut v2) = (t1.clone(), m1.clone(), v1.clone());
            match clip {
                None => {
                    adam_slice::<false>(&mut t1, &mut m1, &mut v1, &g, &c);
                    adam_slice_best::<false>(&mut t2, &mut m2, &mut v2, &g, &c);
                }
                Some(_) => {
                    adam_slice::<true>(&mut t1, &mut m1, &mut v1, &g, &c);
                    adam_slice_best::<true>(&mut t2, &mut m2, &mut v2, &g, &c);
                }
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&t1), bits(&t2), "theta, clip {clip:?}");
            assert_eq!(bits(&m1), bits(&m2), "m, clip {clip:?}");
            assert_eq!(bits(&v1), bits(&v2), "v, clip {clip:?}");
        }
    }

    #[test]
    fn strided_iter_walks_a_transposed_view() {
        // data is a row-major [2, 3] matrix; its transpose [3, 2] has strides [1, 3].
        let data = [0.0f32, 1.0, 2.0, 3.0, 4.0, 5.0];
        let g = GradSrc::Strided {
            data: &data,
            dims: &[3, 2],
            strides: &[1, 3],
            offset: 0,
        };
        let all: Vec<f32> = match g.iter(0, 6) {
            GradIter::Strided(it) => it.collect(),
            GradIter::Contiguous(_) => unreachable!(),
        };
        assert_eq!(all, vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        let tail: Vec<f32> = match g.iter(3, 3) {
            GradIter::Strided(it) => it.collect(),
            GradIter::Contiguous(_) => unreachable!(),
        };
        assert_eq!(tail, vec![4.0, 2.0, 5.0]);
    }

    /// The strided walk of a `[rows, cols]` view with strides `[1, ld]` from `start`.
    fn walk(
        data: &[f32],
        dims: &[usize],
        strides: &[usize],
        offset: usize,
        start: usize,
        len: usize,
    ) -> Vec<f32> {
        let g = GradSrc::Strided {
            data,
            dims,
            strides,
            offset,
        };
        match g.iter(start, len) {
            GradIter::Strided(it) => it.collect(),
            GradIter::Contiguous(_) => unreachable!(),
        }
    }

    #[test]
    fn tiled_transpose_matches_the_strided_walk() {
        // Odd sizes (partial tiles), chunks starting and ending inside rows, an offset and a
        // leading dimension larger than the row count (a narrowed transpose).
        for (rows, cols, ld, offset) in [
            (3, 2, 3, 0),
            (37, 70, 37, 0),
            (256, 784, 256, 0),
            (33, 65, 40, 5),
        ] {
            let data: Vec<f32> = (0..offset + cols * ld).map(|i| i as f32).collect();
            let (dims, strides) = ([rows, cols], [1, ld]);
            let n = rows * cols;
            for (start, len) in [
                (0, n),
                (1, n - 1),
                (cols - 1, cols + 2),
                (n / 3, n / 3),
                (n - 1, 1),
            ] {
                let mut out = vec![f32::NAN; len];
                transpose_chunk(&mut out, &data, cols, ld, offset, start);
                assert_eq!(
                    out,
                    walk(&data, &dims, &strides, offset, start, len),
                    "{rows}x{cols} from {start}"
                );
            }
        }
    }

    #[test]
    fn transposed_gradient_updates_like_the_contiguous_one() {
        // 300 x 200 = 60 000 elements: several chunks, split inside rows, run both in parallel and
        // sequentially; the transposed storage is the [200, 300] matrix.
        let (rows, cols) = (300, 200);
        let n = rows * cols;
        let stored: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let logical = walk(&stored, &[rows, cols], &[1, rows], 0, 0, n);
        let theta0: Vec<f32> = (0..n)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 3.0)
            .collect();
        let c = AdamCoeffs::new(1e-2, 0.9, 0.999, 1e-8, 0.01, 2, None);
        let run = |grad: GradSrc<'_>, threshold: usize| {
            let (mut t, mut m, mut v) = (theta0.clone(), vec![0.1f32; n], vec![0.2f32; n]);
            adamw(&mut t, grad, &mut m, &mut v, &c, threshold);
            (t, m, v)
        };
        let expected = run(GradSrc::Contiguous(&logical), usize::MAX);
        let (dims, strides) = ([rows, cols], [1, rows]);
        let src = GradSrc::strided(&stored, &dims, &strides, 0);
        assert!(matches!(src, GradSrc::Transposed { .. }));
        assert_eq!(run(src, usize::MAX), expected);
        assert_eq!(run(src, 0), expected);
        let (mut p, mut b) = (theta0.clone(), vec![0.0f32; n]);
        let sc = SgdCoeffs {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 0.01,
            nesterov: true,
        };
        sgd(&mut p, src, &mut b, &sc, 0);
        let (mut p2, mut b2) = (theta0.clone(), vec![0.0f32; n]);
        sgd(
            &mut p2,
            GradSrc::Contiguous(&logical),
            &mut b2,
            &sc,
            usize::MAX,
        );
        assert_eq!((p, b), (p2, b2));
    }

    #[test]
    fn parallel_and_sequential_agree_bitwise() {
        let n = 3 * CHUNK + 17;
        let grad: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let theta0: Vec<f32> = (0..n)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 3.0)
            .collect();
        let c = AdamCoeffs::new(1e-2, 0.9, 0.999, 1e-8, 0.01, 3, Some(4.0));
        let run = |threshold: usize| {
            let (mut t, mut m, mut v) = (theta0.clone(), vec![0.1f32; n], vec![0.2f32; n]);
            adamw(
                &mut t,
                GradSrc::Contiguous(&grad),
                &mut m,
                &mut v,
                &c,
                threshold,
            );
            (t, m, v)
        };
        assert_eq!(run(usize::MAX), run(0));
    }
}
