//! The matrix product of [`PackedBitLinear`](super::PackedBitLinear) for 2-bit weights, built
//! from the kernels' tiles ([`Kernel::dot_tile`]).
//!
//! Blocking, from the inside out:
//! * A register tile: `R` output rows x `T` tokens, over a whole segment. Each block of codes
//!   is unpacked once for the `T` tokens, each block of activations loaded once for the `R`
//!   rows.
//! * A token tile of at most [`TOKEN_TILE_BYTES`] of int8 activations (72 tokens of 14336
//!   inputs): every group of `R` rows sweeps it, so the activations are read from L2 and the
//!   rows' codes (`R * 3.5` KiB at 14336 inputs) from L1, and each weight row is read from
//!   memory once per token tile rather than once per token.
//! * Threads: over token tiles when there are enough of them (prompt processing), else over
//!   chunks of rows (generation, a few tokens).
//!
//! Every output is `(sum_seg (dot - sum_x) * scale) * m + bias` in this order, whatever the
//! kernel and tiling, so all kernels give bit-identical outputs.

use super::kernels::Kernel;
use super::layout::PackedTernary;
use rayon::prelude::*;
use std::ops::Range;

/// Tokens per register tile: every x86 kernel has registers for four tokens' accumulators.
const T: usize = 4;

/// Bytes of int8 activations in one token tile: half of a 2 MiB L2, so that the tile stays
/// there while the weight rows stream past it.
pub(crate) const TOKEN_TILE_BYTES: usize = 1 << 20;

/// Output rows per task when the threads split the rows: 16 rows of 14336 inputs are 56 KiB of
/// codes, enough work to amortise a rayon task, few enough to balance across cores.
const ROWS_PER_TASK: usize = 16;

/// Int8 activations in the weight's padded segment layout, with what the dequantization needs.
pub(crate) struct Input<'a> {
    /// `[tokens, segments * segment_padded]` int8 levels.
    pub q: &'a [i8],
    /// Per token `max|x| / 127`.
    pub m: &'a [f32],
    /// Per token and segment, the sum of the int8 levels.
    pub sums: &'a [i32],
    pub tokens: usize,
}

struct Ctx<'a> {
    w: &'a PackedTernary,
    kernel: Kernel,
    bias: Option<&'a [f32]>,
    x: &'a Input<'a>,
    seg_bytes: usize,
    stride: usize,
    tile_tokens: usize,
}

/// `y[t, r]` for every token and output row, `[tokens, out]` row-major.
///
/// # Panics
/// If the weight is not 2-bit or the input's lengths do not match it (the caller builds both).
pub(crate) fn matmul(
    w: &PackedTernary,
    kernel: Kernel,
    bias: Option<&[f32]>,
    x: &Input,
    parallel: bool,
) -> Vec<f32> {
    assert_eq!(w.bits(), 2, "packed matmul: 2-bit codes only");
    let stride = w.segments_per_row() * w.segment_padded();
    assert_eq!(x.q.len(), x.tokens * stride, "packed matmul: activations");
    assert_eq!(
        x.sums.len(),
        x.tokens * w.segments_per_row(),
        "packed matmul: sums"
    );
    assert_eq!(x.m.len(), x.tokens, "packed matmul: token scales");
    let tile_tokens = (TOKEN_TILE_BYTES / stride).max(1).div_ceil(T) * T;
    let ctx = Ctx {
        w,
        kernel,
        bias,
        x,
        seg_bytes: w.segment_padded() / 4,
        stride,
        tile_tokens,
    };
    let (out, tokens) = (w.out_features(), x.tokens);
    let mut y = vec![0f32; tokens * out];
    let token_tiles = tokens.div_ceil(tile_tokens);
    if !parallel {
        ctx.compute(0..out, 0..tokens, &mut |r, t, v| y[t * out + r] = v);
    } else if token_tiles >= rayon::current_num_threads() {
        y.par_chunks_mut(tile_tokens * out)
            .enumerate()
            .for_each(|(i, chunk)| {
                let t0 = i * tile_tokens;
                let t1 = t0 + chunk.len() / out;
                ctx.compute(0..out, t0..t1, &mut |r, t, v| chunk[(t - t0) * out + r] = v);
            });
    } else {
        // Rows split across tasks: each task fills its own `[rows, tokens]` chunk, transposed
        // into `y` afterwards (a few tokens: small next to the product).
        let mut yt = vec![0f32; out * tokens];
        yt.par_chunks_mut(ROWS_PER_TASK * tokens)
            .enumerate()
            .for_each(|(i, chunk)| {
                let r0 = i * ROWS_PER_TASK;
                let r1 = r0 + chunk.len() / tokens;
                ctx.compute(r0..r1, 0..tokens, &mut |r, t, v| {
                    chunk[(r - r0) * tokens + t] = v
                });
            });
        for (r, col) in yt.chunks_exact(tokens).enumerate() {
            for (t, v) in col.iter().enumerate() {
                y[t * out + r] = *v;
            }
        }
    }
    y
}

impl Ctx<'_> {
    /// Outputs for `rows` x `tokens`, handed to `sink(row, token, value)`.
    fn compute(
        &self,
        rows: Range<usize>,
        tokens: Range<usize>,
        sink: &mut impl FnMut(usize, usize, f32),
    ) {
        match self.kernel {
            Kernel::Avx512Vnni => self.tiles::<4>(rows, tokens, sink),
            Kernel::AvxVnni => self.tiles::<2>(rows, tokens, sink),
            _ => self.tiles::<1>(rows, tokens, sink),
        }
    }

    /// Token tiles, then groups of `R` rows, then register tiles of `T` tokens.
    fn tiles<const R: usize>(
        &self,
        rows: Range<usize>,
        tokens: Range<usize>,
        sink: &mut impl FnMut(usize, usize, f32),
    ) {
        let mut t0 = tokens.start;
        while t0 < tokens.end {
            let t1 = tokens.end.min(t0 + self.tile_tokens);
            let mut r = rows.start;
            while r + R <= rows.end {
                self.row_group::<R>(r, t0..t1, sink);
                r += R;
            }
            while r < rows.end {
                self.row_group::<1>(r, t0..t1, sink);
                r += 1;
            }
            t0 = t1;
        }
    }

    /// Rows `r..r + R` for `tokens`, `T` at a time and the rest in one smaller tile.
    fn row_group<const R: usize>(
        &self,
        r: usize,
        tokens: Range<usize>,
        sink: &mut impl FnMut(usize, usize, f32),
    ) {
        let mut t = tokens.start;
        while t + T <= tokens.end {
            self.tile::<R, T>(r, t, sink);
            t += T;
        }
        match tokens.end - t {
            0 => {}
            1 => self.tile::<R, 1>(r, t, sink),
            2 => self.tile::<R, 2>(r, t, sink),
            _ => self.tile::<R, 3>(r, t, sink),
        }
    }

    /// One register tile: rows `r0..r0 + R`, tokens `t0..t0 + U`, over every segment.
    #[inline]
    fn tile<const R: usize, const U: usize>(
        &self,
        r0: usize,
        t0: usize,
        sink: &mut impl FnMut(usize, usize, f32),
    ) {
        let (w, x) = (self.w, self.x);
        let (nseg, segp, sb) = (w.segments_per_row(), w.segment_padded(), self.seg_bytes);
        let (data, rb) = (w.data(), w.row_bytes());
        let mut acc = [[0f32; U]; R];
        for s in 0..nseg {
            let ws: [&[u8]; R] = std::array::from_fn(|i| &data[(r0 + i) * rb + s * sb..][..sb]);
            let xs: [&[i8]; U] =
                std::array::from_fn(|j| &x.q[(t0 + j) * self.stride + s * segp..][..segp]);
            let d = self.kernel.dot_tile(ws, xs);
            for (i, (a, d)) in acc.iter_mut().zip(d).enumerate() {
                let scale = w.scale(r0 + i, s);
                for (j, (a, d)) in a.iter_mut().zip(d).enumerate() {
                    *a += (d - x.sums[(t0 + j) * nseg + s]) as f32 * scale;
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            let bias = self.bias.map_or(0.0, |b| b[r0 + i]);
            for (j, a) in a.iter().enumerate() {
                sink(r0 + i, t0 + j, a * x.m[t0 + j] + bias);
            }
        }
    }
}
