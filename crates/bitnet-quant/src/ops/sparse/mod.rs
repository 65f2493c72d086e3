//! Products with a mostly-zero left operand, for BitLinear layers fed sparse data.
//!
//! A layer whose input is mostly zeros (MNIST pixels are 81 % zero; one-hot and bag-of-words
//! features more) spends most of a dense GEMM multiplying zeros. Its three products in a training
//! step touch the input only through its nonzeros:
//!
//! * forward `Y = Xq W^T`: row `i` of `Y` is `sum_j Xq[i,j] W^T[j,:]` over the row's nonzeros
//!   ([`SparseRows::matmul`] with `W^T`, or [`SparseRows::matmul_levels`] in integers for int8
//!   activations times ternary or binary weights);
//! * weight gradient `dW^T = Xq^T dY`: the same product with the transpose
//!   ([`SparseRows::transposed`], then [`SparseRows::matmul`] with `dY`, then [`transpose`]);
//! * norm-weight gradient: `dg_j = sum_i dXn[i,j] xhat[i,j]` reads `dXn = dY Wq` only where the
//!   input is nonzero. Reordered as `sum_o Wq[o,j] sum_i dY[i,o] xhat[i,j]`, its inner sum runs
//!   over the weight gradient's entries and rows of `dY`, so one sweep computes both
//!   ([`SparseRows::matmul_t_with_dots`]); with a non-identity activation estimator in between,
//!   the dot products at the nonzeros instead ([`SparseRows::sampled_dots`]).
//!
//! Each costs `nnz * n` multiply-adds instead of `m * k * n`. The kernels reach about half the
//! FMA rate of a packed GEMM (every multiply-add loads a fresh operand), so they pay below
//! [`MAX_DENSITY`] nonzeros; `benches/sparse_input.rs` measures the crossing.
//! Results equal the dense products up to f32 rounding (a different summation order).
//!
//! Every function checks its operands' lengths against the shapes it was given and returns
//! [`QuantError::Shape`] naming the operand on a mismatch (an overflowing shape never matches).
//! AVX2 + FMA kernels where the CPU has them (checked at run time), portable loops elsewhere.
//!
//! ```
//! use bitnet_quant::ops::sparse::SparseRows;
//! // [[0, 2, 0], [1, 0, 0]] @ [[1, 1], [2, 2], [3, 3]]
//! let x = [0.0, 2.0, 0.0, 1.0, 0.0, 0.0];
//! let a = SparseRows::from_dense(&x, 3, 1.0, None)?.expect("a third nonzero is kept");
//! assert_eq!(a.nnz(), 2);
//! assert_eq!(a.matmul(&[1.0, 1.0, 2.0, 2.0, 3.0, 3.0], 2)?, vec![4.0, 4.0, 1.0, 1.0]);
//! // More than 30 % nonzero: not worth the sparse kernels.
//! assert!(SparseRows::from_dense(&x, 3, 0.3, None)?.is_none());
//! // `b` must be [cols, n] = [3, 2].
//! assert!(a.matmul(&[1.0, 1.0], 2).is_err());
//! # Ok::<(), bitnet_quant::QuantError>(())
//! ```

mod strips;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use strips::{transpose_rows, Transposed};

use crate::error::{invalid, QuantError};
use crate::ops::slot::Slot;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// The largest share of nonzeros at which [`crate::ops::bitlinear`] takes the sparse kernels.
/// `benches/sparse_input.rs` (784 inputs, 256 outputs, batch 128, random patterns, 1 thread):
/// the forward (integer kernel), weight gradient and sampled norm gradient together cost 0.60x
/// the three dense GEMMs at 20 % nonzeros, 1.01x at 35 % and 1.30x at 50 %.
pub const MAX_DENSITY: f32 = 0.3;

/// The largest share of nonzeros at which [`crate::ops::bitlinear`] runs its forward by the
/// integer kernel ([`SparseRows::matmul_levels`], int8 activations x ternary or binary weights);
/// its backward then takes the sparse kernels only up to [`MAX_DENSITY`], the dense GEMMs above.
/// `benches/sparse_input.rs` (same shapes): the integer forward costs 0.49x the dense GEMM at
/// 35 % nonzeros and 0.57x at 50 %.
pub const MAX_DENSITY_LEVELS: f32 = 0.6;

/// A row-major matrix stored by its kept entries, row by row (CSR).
#[derive(Debug, Clone)]
pub struct SparseRows {
    rows: usize,
    cols: usize,
    /// `start[r]..start[r + 1]` indexes row `r`'s entries; `rows + 1` values.
    start: Vec<usize>,
    col: Vec<u32>,
    val: Vec<f32>,
}

impl SparseRows {
    /// The entries of the row-major `[values.len() / cols, cols]` matrix that are nonzero, or where
    /// `also` (same shape) is nonzero, in row order; `None` as soon as more than `max_density` of
    /// all entries are kept (so a dense input costs a partial pass, not a full copy).
    ///
    /// `also` widens the pattern: BitLinear keeps the positions of nonzero *inputs* even where
    /// the quantized value is zero, because the norm gradient needs them.
    ///
    /// Errors: `cols` is 0 or above 2^32 (columns are stored as `u32`), `values` is not whole
    /// rows, `also` has another length, or `max_density` is NaN.
    pub fn from_dense(
        values: &[f32],
        cols: usize,
        max_density: f32,
        also: Option<&[f32]>,
    ) -> Result<Option<Self>, QuantError> {
        const OP: &str = "SparseRows::from_dense";
        if cols == 0 || cols - 1 > u32::MAX as usize {
            return Err(shape(OP, format!("`cols` = {cols}, expected 1 to 2^32")));
        }
        if values.len() % cols != 0 {
            let len = values.len();
            return Err(shape(
                OP,
                format!("`values` has {len} values, not whole rows of `cols` = {cols}"),
            ));
        }
        if max_density.is_nan() {
            let allowed = "a number (at most 0 keeps no entry, 1 or more keeps every one)";
            return Err(invalid("max_density", max_density, allowed));
        }
        let rows = values.len() / cols;
        if let Some(a) = also {
            expect_len(OP, "also", a.len(), &[("rows", rows), ("cols", cols)])?;
        }
        let limit = (max_density.clamp(0.0, 1.0) as f64 * values.len() as f64) as usize;
        let mut start = Vec::with_capacity(rows + 1);
        // Room for one more row past the limit: a row never reallocates before the check.
        let mut col = Vec::with_capacity(limit + cols);
        let mut val = Vec::with_capacity(limit + cols);
        start.push(0);
        for r in 0..rows {
            let row = &values[r * cols..(r + 1) * cols];
            let extra = also.map(|a| &a[r * cols..(r + 1) * cols]);
            scan_row(row, extra, &mut col, &mut val);
            if col.len() > limit {
                return Ok(None);
            }
            start.push(col.len());
        }
        Ok(Some(Self {
            rows,
            cols,
            start,
            col,
            val,
        }))
    }

    /// Rows of the dense matrix.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of the dense matrix.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Kept entries.
    pub fn nnz(&self) -> usize {
        self.val.len()
    }

    /// Kept entries over all entries.
    pub fn density(&self) -> f32 {
        self.nnz() as f32 / (self.rows * self.cols).max(1) as f32
    }

    fn row(&self, r: usize) -> (&[u32], &[f32]) {
        let (a, b) = (self.start[r], self.start[r + 1]);
        (&self.col[a..b], &self.val[a..b])
    }

    /// The same entries stored by column (the CSR of the transpose), each column's entries in
    /// row order.
    pub fn transposed(&self) -> SparseRows {
        self.transpose_entries(|_, _, _, _| {})
    }

    /// [`SparseRows::transposed`], moving a second value per entry (`extra`, in storage order,
    /// or empty for none) along with the entries.
    ///
    /// Errors: `extra` is neither empty nor one value per entry.
    pub fn transposed_with(&self, extra: &[f32]) -> Result<(SparseRows, Vec<f32>), QuantError> {
        if extra.is_empty() {
            return Ok((self.transposed(), Vec::new()));
        }
        const OP: &str = "SparseRows::transposed_with";
        expect_len(OP, "extra", extra.len(), &[("nnz", self.nnz())])?;
        Ok(self.transpose_entries_with(|e, _, _| extra[e]))
    }

    /// [`SparseRows::transposed_with`] the values [`SparseRows::gather_scaled`] would give,
    /// gathered while the entries move (one pass over them instead of two).
    ///
    /// Errors: `dense` is not `[rows, cols]` or `row_scale` not one value per row.
    pub fn transposed_gathered(
        &self,
        dense: &[f32],
        row_scale: &[f32],
    ) -> Result<(SparseRows, Vec<f32>), QuantError> {
        self.check_gather("SparseRows::transposed_gathered", dense, row_scale)?;
        let cols = self.cols;
        Ok(self.transpose_entries_with(|_, r, c| dense[r * cols + c] * row_scale[r]))
    }

    /// The operands of [`SparseRows::gather_scaled`] and [`SparseRows::transposed_gathered`].
    fn check_gather(
        &self,
        op: &'static str,
        dense: &[f32],
        row_scale: &[f32],
    ) -> Result<(), QuantError> {
        let (rows, cols) = (self.rows, self.cols);
        expect_len(op, "dense", dense.len(), &[("rows", rows), ("cols", cols)])?;
        expect_len(op, "row_scale", row_scale.len(), &[("rows", rows)])
    }

    fn transpose_entries_with(
        &self,
        extra: impl Fn(usize, usize, usize) -> f32,
    ) -> (SparseRows, Vec<f32>) {
        let mut moved = Box::<[f32]>::new_uninit_slice(self.nnz());
        let mp = moved.as_mut_ptr().cast::<f32>();
        let t = self.transpose_entries(|e, r, c, at| {
            // SAFETY: `at < nnz` (see `transpose_entries`).
            unsafe { mp.add(at).write(extra(e, r, c)) }
        });
        // SAFETY: `transpose_entries` calls `extra` once for every position `at` in `0..nnz`
        // (the entries move by a permutation), and each call wrote slot `at`.
        (t, unsafe { moved.assume_init() }.into_vec())
    }

    /// The transpose's entries; `extra(e, r, c, at)` is called for entry `e` at `(r, c)`, which
    /// lands at position `at` of the transpose.
    ///
    /// A counting sort: the scatter into 784 columns is what it waits on, so the loop keeps its
    /// pointers in registers and skips the bounds checks the invariants make redundant.
    fn transpose_entries(&self, mut extra: impl FnMut(usize, usize, usize, usize)) -> SparseRows {
        let mut count = vec![0usize; self.cols + 1];
        for &c in &self.col {
            count[c as usize + 1] += 1;
        }
        for c in 0..self.cols {
            count[c + 1] += count[c];
        }
        let start = count.clone();
        let mut next = count;
        let mut col = Box::<[u32]>::new_uninit_slice(self.nnz());
        let mut val = Box::<[f32]>::new_uninit_slice(self.nnz());
        let (cp, vp) = (
            col.as_mut_ptr().cast::<u32>(),
            val.as_mut_ptr().cast::<f32>(),
        );
        let np = next.as_mut_ptr();
        for r in 0..self.rows {
            let (a, b) = (self.start[r], self.start[r + 1]);
            for (e, (&c, &v)) in (a..b).zip(self.col[a..b].iter().zip(&self.val[a..b])) {
                let c = c as usize;
                // SAFETY: every stored column is `< cols` (`next` has `cols + 1` slots), and
                // `next[c]` runs from `start[c]` through `start[c + 1] - 1 < nnz` as column `c`'s
                // entries arrive.
                let at = unsafe {
                    let at = *np.add(c);
                    cp.add(at).write(r as u32);
                    vp.add(at).write(v);
                    *np.add(c) = at + 1;
                    at
                };
                extra(e, r, c, at);
            }
        }
        // SAFETY: the counting sort gives column `c` the positions `start[c]..start[c + 1]`,
        // which partition `0..nnz`, and its `count[c + 1] - count[c]` entries fill them in turn:
        // every position of both was written exactly once above.
        let (col, val) = unsafe { (col.assume_init(), val.assume_init()) };
        SparseRows {
            rows: self.cols,
            cols: self.rows,
            start,
            col: col.into_vec(),
            val: val.into_vec(),
        }
    }

    /// One value per kept entry, in storage order: `dense[r * cols + c] * row_scale[r]` for
    /// entry `(r, c)`, from a row-major `dense: [rows, cols]` (another matrix on this pattern).
    ///
    /// Errors: `dense` is not `[rows, cols]` or `row_scale` not one value per row.
    pub fn gather_scaled(&self, dense: &[f32], row_scale: &[f32]) -> Result<Vec<f32>, QuantError> {
        self.check_gather("SparseRows::gather_scaled", dense, row_scale)?;
        let mut out = Vec::with_capacity(self.nnz());
        for (r, &s) in row_scale.iter().enumerate() {
            let row = &dense[r * self.cols..(r + 1) * self.cols];
            let cs = &self.col[self.start[r]..self.start[r + 1]];
            out.extend(cs.iter().map(|&c| row[c as usize] * s));
        }
        Ok(out)
    }

    /// The transpose of `self @ b` (`b: [cols, n]`; the result is row-major `[n, rows]`), and with
    /// it, per row `r`, `dot(w[r], sum_e second[e] * b[cols of e])` over the row's entries `e`:
    /// the same sum with the entries' second values, reduced against `w: [rows, n]` instead of
    /// stored. Both sums share every load of `b`, which is what the kernel waits on.
    ///
    /// BitLinear's first layer uses it on the column-major input pattern: `(self @ dY)^T` is the
    /// weight gradient `dW` and, with `second = x / rms(x)` and `w = Wq^T`, the dots are the
    /// norm-weight gradient `sum_i (dY Wq)[i,j] x[i,j] / rms(x_i)`, without the input gradient
    /// ever being formed.
    ///
    /// `b` is first repacked as 32-wide column blocks, each contiguous (at `b`'s own row stride,
    /// 1 KiB for 256 columns, a block's rows would share a few L1 sets). The rows of `self` are
    /// then swept in chunks of 32, each chunk over every column block (its entries stay
    /// in L1 while the blocks pass; a block of 128 rows is 16 KiB), 8 rows at a time into a
    /// small tile that is transposed into the result, so the product never exists untransposed.
    /// Each row's dot is the sum of its blocks' partial dots in block order, whatever the thread
    /// count (threads split the column blocks). `w` given as signs and scales gives the same bits
    /// as the same values given as f32.
    ///
    /// Errors: `second` is not one value per entry, `b` not `[cols, n]`, `w` not `[rows, n]`
    /// (as values or signs) or the scales not one per column.
    pub fn matmul_t_with_dots(
        &self,
        second: &[f32],
        b: &[f32],
        n: usize,
        w: WeightT<'_>,
    ) -> Result<(Vec<f32>, Vec<f32>), QuantError> {
        const OP: &str = "SparseRows::matmul_t_with_dots";
        let rows = self.rows;
        expect_len(OP, "second", second.len(), &[("nnz", self.nnz())])?;
        expect_len(OP, "b", b.len(), &[("cols", self.cols), ("n", n)])?;
        match w {
            WeightT::Values(w) => expect_len(OP, "w", w.len(), &[("rows", rows), ("n", n)])?,
            WeightT::Signs { signs, scale } => {
                expect_len(OP, "signs", signs.len(), &[("rows", rows), ("n", n)])?;
                expect_len(OP, "scale", scale.len(), &[("n", n)])?;
            }
        }
        let mut out = Box::<[f32]>::new_uninit_slice(rows * n);
        let mut dots = vec![0f32; rows];
        if n == 0 || rows == 0 {
            // SAFETY: there are no slots.
            return Ok((unsafe { out.assume_init() }.into_vec(), dots));
        }
        let blocks = n.div_ceil(TILE_COLS);
        // Block `k` (columns `c0 = k * TILE_COLS`, `width` of them) at `c0 * cols`, row stride
        // `width`.
        let mut packed = Vec::with_capacity(b.len());
        for c0 in (0..n).step_by(TILE_COLS) {
            let width = TILE_COLS.min(n - c0);
            for row in b.chunks_exact(n) {
                packed.extend_from_slice(&row[c0..c0 + width]);
            }
        }
        // Column blocks `k0..`: their `[width, rows]` slabs of the result (contiguous) and one
        // partial dot per block and row.
        let run = |k0: usize, slab: &mut [MaybeUninit<f32>], part: &mut [f32]| {
            let mut tile = [[0f32; TILE_COLS]; 8];
            for r_chunk in (0..rows).step_by(ROW_CHUNK) {
                let chunk_end = (r_chunk + ROW_CHUNK).min(rows);
                for (k, part) in part.chunks_mut(rows).enumerate() {
                    let c0 = (k0 + k) * TILE_COLS;
                    let width = TILE_COLS.min(n - c0);
                    let bk = &packed[c0 * self.cols..(c0 + width) * self.cols];
                    let slab = &mut slab[k * TILE_COLS * rows..][..width * rows];
                    for r0 in (r_chunk..chunk_end).step_by(8) {
                        let height = 8.min(rows - r0);
                        for (i, t) in tile.iter_mut().take(height).enumerate() {
                            let r = r0 + i;
                            let (a, e) = (self.start[r], self.start[r + 1]);
                            // The weight rows are read once, by now mostly out of cache:
                            // fetch the next 8-row group's while this one runs.
                            let wr = match w {
                                WeightT::Values(w) => {
                                    prefetch(w, (r + 8) * n + c0, width);
                                    WRow::Values(&w[r * n + c0..r * n + c0 + width])
                                }
                                WeightT::Signs { signs, scale } => {
                                    prefetch(signs, (r + 8) * n + c0, width);
                                    let sg = &signs[r * n + c0..r * n + c0 + width];
                                    WRow::Signs(sg, &scale[c0..c0 + width])
                                }
                            };
                            let (cs, vs, ss) = (&self.col[a..e], &self.val[a..e], &second[a..e]);
                            part[r] = axpys2(&mut t[..width], cs, vs, ss, bk, wr, width, 0);
                        }
                        store_tile_t(&tile, height, width, slab, rows, r0);
                    }
                }
            }
        };
        let mut parts = vec![0f32; blocks * rows];
        if crate::ops::parallel(out.len()) {
            let per = blocks.div_ceil(rayon::current_num_threads());
            out.par_chunks_mut(per * TILE_COLS * rows)
                .zip(parts.par_chunks_mut(per * rows))
                .enumerate()
                .for_each(|(t, (slab, part))| run(t * per, slab, part));
        } else {
            run(0, &mut out, &mut parts);
        }
        for part in parts.chunks(rows) {
            for (d, p) in dots.iter_mut().zip(part) {
                *d += p;
            }
        }
        // SAFETY: the slabs cover the column blocks, the row chunks and their 8-row tiles cover
        // every row, and `store_tile_t` writes each tile's `height x width` values.
        Ok((unsafe { out.assume_init() }.into_vec(), dots))
    }

    /// `self @ b` for a row-major `b: [cols, n]`: a row-major `[rows, n]`.
    ///
    /// Swept in 64-wide column blocks of `b`, all rows per block (a 784 x 64 block, 200 KiB,
    /// stays in L2). Each multiply-add loads its own operand of `b`, so the kernel runs at about
    /// half a dense GEMM's rate; blocking the rows of `b` for L1 as well was measured no faster
    /// (the runs per row and block get short).
    ///
    /// Errors: `b` is not `[cols, n]`.
    pub fn matmul(&self, b: &[f32], n: usize) -> Result<Vec<f32>, QuantError> {
        expect_len(
            "SparseRows::matmul",
            "b",
            b.len(),
            &[("cols", self.cols), ("n", n)],
        )?;
        let mut out = Box::<[f32]>::new_uninit_slice(self.rows * n);
        let kernel = axpys_kernel();
        // An empty `b` has no column blocks: no row is ever visited.
        for_row_ranges(&mut out, n, |r0, block| {
            for c0 in (0..n).step_by(BLOCK) {
                let w = BLOCK.min(n - c0);
                for (i, o) in block.chunks_mut(n).enumerate() {
                    let (cs, vs) = self.row(r0 + i);
                    kernel(&mut o[c0..c0 + w], cs, vs, b, n, c0);
                }
            }
        });
        // SAFETY: the row ranges cover every row, the column blocks every column of it, and the
        // kernel writes all of its `w` columns.
        Ok(unsafe { out.assume_init() }.into_vec())
    }

    /// `self @ (signs * col_scale)` for int8-style values and ternary weights, in integers:
    /// every stored value of row `r` is an integer level over `inv_step[r]`
    /// (`value = L / inv_step[r]`, `|L| <= 128`, as int8 per-token activations are), and
    /// `signs: [cols, n]` holds -1, 0 or 1 (ternary or binary weights, transposed), output column
    /// `o` scaled by `col_scale[o]`. `n` must be a multiple of 16.
    ///
    /// The levels are multiplied (a sign flip) and summed in 16-bit lanes, 16 outputs per
    /// instruction, and widened to i32 every 255 entries (`255 * 128 < 2^15`), so the sums are
    /// exact; only `sum / inv_step[r] * col_scale[o]` is rounded. Reading 1-byte signs instead
    /// of f32 weights is what makes it faster than [`SparseRows::matmul`]: that kernel waits on
    /// loads, this one moves a quarter of the bytes.
    ///
    /// Errors: `n` is not a multiple of 16, `signs` not `[cols, n]`, `inv_step` not one value
    /// per row or `col_scale` not one per column ([`QuantError::Shape`]); a stored value whose
    /// level `value * inv_step[r]` rounds outside `-128..=128` or is NaN
    /// ([`QuantError::Unsupported`]: the 16-bit sums would be wrong).
    pub fn matmul_levels(
        &self,
        signs: &[i8],
        n: usize,
        inv_step: &[f32],
        col_scale: &[f32],
    ) -> Result<Vec<f32>, QuantError> {
        const OP: &str = "SparseRows::matmul_levels";
        if n % 16 != 0 {
            return Err(shape(OP, format!("`n` = {n}, expected a multiple of 16")));
        }
        expect_len(OP, "signs", signs.len(), &[("cols", self.cols), ("n", n)])?;
        expect_len(OP, "inv_step", inv_step.len(), &[("rows", self.rows)])?;
        expect_len(OP, "col_scale", col_scale.len(), &[("n", n)])?;
        for (r, &inv) in inv_step.iter().enumerate() {
            // `round_ties_even` keeps |x| <= 128.5 within +-128; NaN is never in range.
            let in_range = |v: f32| (v * inv).abs() <= 128.5;
            let vs = self.row(r).1;
            // A fold without early exit vectorises (a `find` ran at a tenth of the kernel's cost);
            // the culprit is looked for only once the row failed.
            if !vs.iter().fold(true, |ok, &v| ok & in_range(v)) {
                let v = vs
                    .iter()
                    .copied()
                    .find(|&v| !in_range(v))
                    .unwrap_or(f32::NAN);
                return Err(QuantError::Unsupported {
                    op: OP,
                    what: format!(
                        "row {r} holds {v}, level {} with `inv_step` {inv}; levels are -128..=128",
                        v * inv
                    ),
                });
            }
        }
        let mut out = Box::<[f32]>::new_uninit_slice(self.rows * n);
        if n == 0 {
            // SAFETY: there are no slots.
            return Ok(unsafe { out.assume_init() }.into_vec());
        }
        for_row_ranges(&mut out, n, |r0, block| {
            let mut totals = vec![0i32; n];
            for (i, o) in block.chunks_mut(n).enumerate() {
                let (cs, vs) = self.row(r0 + i);
                let inv = inv_step[r0 + i];
                totals.fill(0);
                level_sums(&mut totals, cs, vs, inv, signs, n);
                for ((o, &t), &c) in o.iter_mut().zip(&totals).zip(col_scale) {
                    o.put(t as f32 / inv * c);
                }
            }
        });
        // SAFETY: the row ranges cover every row, and each row's `n` values are written from
        // `totals` and `col_scale` (both `n` long).
        Ok(unsafe { out.assume_init() }.into_vec())
    }

    /// One value per kept entry, in storage order: entry `(r, c)` gets `dot(u[c], b[r])` for
    /// row-major `u: [cols, n]` and `b: [rows, n]`.
    ///
    /// On the column-major copy of a pattern ([`SparseRows::transposed`]) this is the sampled
    /// product `(b^T u)` at the pattern's positions; a column of the original pattern reuses one
    /// row of `b` for all its entries, which stays in L1.
    ///
    /// Errors: `u` is not `[cols, n]` or `b` not `[rows, n]`.
    pub fn sampled_dots(&self, u: &[f32], b: &[f32], n: usize) -> Result<Vec<f32>, QuantError> {
        const OP: &str = "SparseRows::sampled_dots";
        expect_len(OP, "u", u.len(), &[("cols", self.cols), ("n", n)])?;
        expect_len(OP, "b", b.len(), &[("rows", self.rows), ("n", n)])?;
        let mut out = Box::<[f32]>::new_uninit_slice(self.nnz());
        let fill = |r: usize, o: &mut [MaybeUninit<f32>]| {
            let (cs, _) = self.row(r);
            dots(o, cs, &b[r * n..(r + 1) * n], u, n);
        };
        if crate::ops::parallel(self.nnz() * n / 64) {
            // Split at row boundaries into pieces of about equal entries.
            let mut pieces: Vec<(usize, &mut [MaybeUninit<f32>])> = Vec::new();
            let mut rest = &mut out[..];
            for r in 0..self.rows {
                let len = self.start[r + 1] - self.start[r];
                let (head, tail) = rest.split_at_mut(len);
                pieces.push((r, head));
                rest = tail;
            }
            pieces.into_par_iter().for_each(|(r, o)| fill(r, o));
        } else {
            for r in 0..self.rows {
                fill(r, &mut out[self.start[r]..self.start[r + 1]]);
            }
        }
        // SAFETY: the rows' entry ranges partition `0..nnz`, and `dots` writes one value per
        // entry of each (`n == 0` included: every dot is then the empty sum).
        Ok(unsafe { out.assume_init() }.into_vec())
    }

    /// Writes `values` (one per entry, in storage order) into a dense row-major `[cols, rows]`
    /// at the transposed positions: entry `(r, c)` lands at `out[c * rows + r]`. With a
    /// column-major copy this puts values back at their original `[rows', cols']` position.
    ///
    /// Errors: `values` is not one value per entry.
    pub fn scatter_transposed(&self, values: &[f32]) -> Result<Vec<f32>, QuantError> {
        const OP: &str = "SparseRows::scatter_transposed";
        expect_len(OP, "values", values.len(), &[("nnz", self.nnz())])?;
        let mut out = vec![0f32; self.rows * self.cols];
        for r in 0..self.rows {
            let (a, b) = (self.start[r], self.start[r + 1]);
            for (&c, &v) in self.col[a..b].iter().zip(&values[a..b]) {
                out[c as usize * self.rows + r] = v;
            }
        }
        Ok(out)
    }
}

/// A [`QuantError::Shape`] of `op`.
fn shape(op: &'static str, what: String) -> QuantError {
    QuantError::Shape { op, what }
}

/// Checks that operand `name` holds the product of `dims` (named sizes) values; an overflowing
/// product matches no length.
fn expect_len(
    op: &'static str,
    name: &str,
    len: usize,
    dims: &[(&str, usize)],
) -> Result<(), QuantError> {
    let want = dims.iter().try_fold(1usize, |p, &(_, d)| p.checked_mul(d));
    if want == Some(len) {
        return Ok(());
    }
    let names: Vec<&str> = dims.iter().map(|d| d.0).collect();
    let sizes: Vec<String> = dims.iter().map(|d| d.1.to_string()).collect();
    let (names, sizes) = (names.join(", "), sizes.join(", "));
    Err(shape(
        op,
        format!("`{name}` has {len} values, expected [{names}] = [{sizes}]"),
    ))
}

/// Appends `row`'s kept entries (nonzero in `row` or in `extra`).
fn scan_row(row: &[f32], extra: Option<&[f32]>, col: &mut Vec<u32>, val: &mut Vec<f32>) {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: AVX2 checked; `extra` is a row of `also`, as long as `row` (checked).
        unsafe { x86::scan_row(row, extra, col, val) };
        return;
    }
    scalar::scan_row(row, extra, col, val);
}

/// The `w: [rows, n]` of [`SparseRows::matmul_t_with_dots`] (a quantized weight, transposed).
#[derive(Debug, Clone, Copy)]
pub enum WeightT<'a> {
    /// The values, row-major.
    Values(&'a [f32]),
    /// `w[r][o] = signs[r * n + o] * scale[o]`: a ternary or binary weight as its levels and
    /// one scale per column (per output of the layer), a quarter of the bytes to read.
    Signs { signs: &'a [i8], scale: &'a [f32] },
}

/// A row segment of a [`WeightT`], `width` long.
#[derive(Debug, Clone, Copy)]
enum WRow<'a> {
    Values(&'a [f32]),
    /// Levels and their columns' scales.
    Signs(&'a [i8], &'a [f32]),
}

impl WRow<'_> {
    fn len(&self) -> usize {
        match self {
            WRow::Values(w) => w.len(),
            WRow::Signs(s, _) => s.len(),
        }
    }

    /// Value `t` (a level times its scale is exact in f32: the same bits as the stored value).
    #[inline(always)]
    fn get(&self, t: usize) -> f32 {
        match self {
            WRow::Values(w) => w[t],
            WRow::Signs(s, c) => s[t] as f32 * c[t],
        }
    }
}

/// Columns of `b` per sweep of [`SparseRows::matmul`]: eight AVX registers of accumulators.
const BLOCK: usize = 64;

/// Calls `f(first_row, rows)` on ranges of `width`-wide rows of `out`, split across rayon when
/// [`parallel`](crate::ops::parallel) says so. Rows are independent: the split does not change
/// the result.
fn for_row_ranges<S: Send>(out: &mut [S], width: usize, f: impl Fn(usize, &mut [S]) + Sync) {
    if crate::ops::parallel(out.len()) {
        let per = (crate::ops::cpu_util::CHUNK / width).max(1);
        out.par_chunks_mut(per * width)
            .enumerate()
            .for_each(|(t, block)| f(t * per, block));
    } else {
        f(0, out);
    }
}

/// `out[t] = sum_e vs[e] * b[cs[e] * n + c0 + t]` for the `out.len()` (at most [`BLOCK`])
/// columns from `c0` (written, not accumulated: `out` may be fresh slots).
type Axpys<S> = fn(&mut [S], &[u32], &[f32], &[f32], usize, usize);

/// The [`Axpys`] kernel for this CPU, chosen once per product (it is called per row segment).
fn axpys_kernel<S: Slot<f32>>() -> Axpys<S> {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        return |out, cs, vs, b, n, c0| {
            // SAFETY: the CPU has AVX2 and FMA (checked before choosing this kernel); every
            // `cs[e] < b.len() / n` (entries come from a `cols`-wide matrix and `b` is
            // `[cols, n]`, checked by the callers) and `c0 + out.len() <= n`.
            unsafe { x86::axpys(out, cs, vs, b, n, c0) }
        };
    }
    scalar::axpys
}

/// `totals[o] += sum_e round(vs[e] * inv) * signs[cs[e] * n + o]`.
fn level_sums(totals: &mut [i32], cs: &[u32], vs: &[f32], inv: f32, signs: &[i8], n: usize) {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: AVX2 checked; `n % 16 == 0`, `totals.len() == n` and every
        // `(cs[e] + 1) * n <= signs.len()` (checked by `matmul_levels`).
        unsafe { x86::level_sums(totals, cs, vs, inv, signs, n) };
        return;
    }
    scalar::level_sums(totals, cs, vs, inv, signs, n);
}

/// Columns per block of [`SparseRows::matmul_t_with_dots`].
const TILE_COLS: usize = 32;

/// Rows of `self` per pass over the column blocks in [`SparseRows::matmul_t_with_dots`]
/// (a multiple of 8; 32 rows of a 20 %-dense 128-row column pattern are about 10 KiB of entries).
const ROW_CHUNK: usize = 32;

/// `out[t] = sum_e vs[e] * b[cs[e] * n + c0 + t]` for the `out.len()` (at most [`TILE_COLS`])
/// columns from `c0` (written, not accumulated), and the return value
/// `dot(w, sum_e ss[e] * b[cs[e] * n + c0 ..])` (`w` as long as `out`).
#[allow(clippy::too_many_arguments)]
fn axpys2(
    out: &mut [f32],
    cs: &[u32],
    vs: &[f32],
    ss: &[f32],
    b: &[f32],
    w: WRow<'_>,
    n: usize,
    c0: usize,
) -> f32 {
    assert_eq!(w.len(), out.len(), "one weight per output column");
    if let WRow::Signs(s, c) = w {
        assert_eq!(s.len(), c.len(), "one scale per level");
    }
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: AVX2 and FMA checked; `out` and `w` are as long, `c0 + out.len() <= n`, every
        // `(cs[e] + 1) * n <= b.len()` (checked by `matmul_t_with_dots`), `vs` and `ss` as long
        // as `cs`.
        return unsafe { x86::axpys2(out, cs, vs, ss, b, w, n, c0) };
    }
    scalar::axpys2(out, cs, vs, ss, b, w, n, c0)
}

/// Asks for the cache lines of `v[at..at + len]` (nothing past the end of `v`).
#[inline(always)]
fn prefetch<T>(v: &[T], at: usize, len: usize) {
    // A hint only: elsewhere the hardware prefetchers are left to it.
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (v, at, len);
    #[cfg(target_arch = "x86_64")]
    if len > 0 && at + len <= v.len() {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let (first, last) = (
            v[at..].as_ptr() as *const i8,
            v[at + len - 1..].as_ptr() as *const i8,
        );
        // SAFETY: prefetches never fault; both addresses are inside `v` anyway.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(first);
            _mm_prefetch::<_MM_HINT_T0>(last);
        }
    }
}

/// `slab[t * rows + r0 + i] = tile[i][t]` for the `height` rows and `width` columns of a tile.
fn store_tile_t<S: Slot<f32>>(
    tile: &[[f32; TILE_COLS]; 8],
    height: usize,
    width: usize,
    slab: &mut [S],
    rows: usize,
    r0: usize,
) {
    assert!(height <= 8 && width <= TILE_COLS && slab.len() == width * rows && r0 + height <= rows);
    #[cfg(target_arch = "x86_64")]
    if height == 8 && x86::available() {
        let full = width / 8 * 8;
        for t0 in (0..full).step_by(8) {
            // SAFETY: AVX2 checked; the 8 x 8 block reads tile columns `t0..t0 + 8` of 8 rows
            // and writes rows `t0..t0 + 8` of the slab at `r0..r0 + 8` (asserted in bounds).
            unsafe {
                x86::transpose8(
                    tile[0].as_ptr().add(t0),
                    TILE_COLS,
                    S::first_ptr(slab).add(t0 * rows + r0),
                    rows,
                )
            };
        }
        for t in full..width {
            for (i, row) in tile.iter().enumerate() {
                slab[t * rows + r0 + i].put(row[t]);
            }
        }
        return;
    }
    for t in 0..width {
        for (i, row) in tile.iter().take(height).enumerate() {
            slab[t * rows + r0 + i].put(row[t]);
        }
    }
}

/// `out[e] = dot(u, b[cs[e], :])` for every entry `e`.
fn dots<S: Slot<f32>>(out: &mut [S], cs: &[u32], u: &[f32], b: &[f32], n: usize) {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: as in `axpys`; `out.len() == cs.len()`.
        unsafe { x86::dots(out, cs, u, b, n) };
        return;
    }
    scalar::dots(out, cs, u, b, n);
}

/// The portable kernels (and the reference the AVX2 ones are tested against).
mod scalar {
    use crate::ops::slot::Slot;

    #[allow(clippy::too_many_arguments)]
    pub(super) fn axpys2(
        out: &mut [f32],
        cs: &[u32],
        vs: &[f32],
        ss: &[f32],
        b: &[f32],
        w: super::WRow<'_>,
        n: usize,
        c0: usize,
    ) -> f32 {
        let width = out.len();
        let mut h = [0f32; super::TILE_COLS];
        let h = &mut h[..width];
        out.fill(0.0);
        for ((&c, &v), &s) in cs.iter().zip(vs).zip(ss) {
            let row = &b[c as usize * n + c0..c as usize * n + c0 + width];
            for ((o, hh), &x) in out.iter_mut().zip(h.iter_mut()).zip(row) {
                *o += v * x;
                *hh += s * x;
            }
        }
        h.iter().enumerate().map(|(t, h)| h * w.get(t)).sum()
    }

    pub(super) fn level_sums(
        totals: &mut [i32],
        cs: &[u32],
        vs: &[f32],
        inv: f32,
        signs: &[i8],
        n: usize,
    ) {
        for (&c, &v) in cs.iter().zip(vs) {
            let l = (v * inv).round_ties_even() as i32;
            let row = &signs[c as usize * n..(c as usize + 1) * n];
            for (t, &s) in totals.iter_mut().zip(row) {
                *t += l * s as i32;
            }
        }
    }

    pub(super) fn scan_row(
        row: &[f32],
        extra: Option<&[f32]>,
        col: &mut Vec<u32>,
        val: &mut Vec<f32>,
    ) {
        for (c, &v) in row.iter().enumerate() {
            if v != 0.0 || extra.is_some_and(|e| e[c] != 0.0) {
                col.push(c as u32);
                val.push(v);
            }
        }
    }

    pub(super) fn axpys<S: Slot<f32>>(
        out: &mut [S],
        cs: &[u32],
        vs: &[f32],
        b: &[f32],
        n: usize,
        c0: usize,
    ) {
        let out = S::fill(out, 0.0);
        for (&c, &v) in cs.iter().zip(vs) {
            let row = &b[c as usize * n + c0..][..out.len()];
            for (o, &w) in out.iter_mut().zip(row) {
                *o += v * w;
            }
        }
    }

    pub(super) fn dots<S: Slot<f32>>(out: &mut [S], cs: &[u32], u: &[f32], b: &[f32], n: usize) {
        for (o, &c) in out.iter_mut().zip(cs) {
            let row = &b[c as usize * n..(c as usize + 1) * n];
            o.put(u.iter().zip(row).map(|(a, b)| a * b).sum());
        }
    }

    pub(super) fn transpose<S: Slot<f32>>(src: &[f32], rows: usize, cols: usize, dst: &mut [S]) {
        const T: usize = 16;
        for r0 in (0..rows).step_by(T) {
            for c0 in (0..cols).step_by(T) {
                for r in r0..(r0 + T).min(rows) {
                    for c in c0..(c0 + T).min(cols) {
                        dst[c * rows + r].put(src[r * cols + c]);
                    }
                }
            }
        }
    }
}

/// `-1`, `0` or `1` per value (`0` for zeros and NaN): the levels of a ternary or binary
/// weight, for [`SparseRows::matmul_levels`]. Compiled for AVX2 where the CPU has it (the
/// default x86-64 target packs the comparisons 4 at a time).
pub fn signs(values: &[f32]) -> Vec<i8> {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: AVX2 checked.
        return unsafe { x86::signs(values) };
    }
    signs_body(values)
}

#[inline(always)]
fn signs_body(values: &[f32]) -> Vec<i8> {
    values.iter().map(|&v| sign(v)).collect()
}

/// `-1`, `0` or `1` (`0` for zeros and NaN).
#[inline(always)]
fn sign(v: f32) -> i8 {
    (v > 0.0) as i8 - (v < 0.0) as i8
}

/// The transpose of a row-major `[rows, cols]`: a row-major `[cols, rows]` (8 x 8 register
/// transposes on AVX2).
///
/// Errors: `src` is not `[rows, cols]`.
pub fn transpose(src: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>, QuantError> {
    expect_len(
        "transpose",
        "src",
        src.len(),
        &[("rows", rows), ("cols", cols)],
    )?;
    let mut dst = Box::<[f32]>::new_uninit_slice(src.len());
    transpose_into(src, rows, cols, &mut dst);
    // SAFETY: `transpose_into` writes every position of the transpose.
    Ok(unsafe { dst.assume_init() }.into_vec())
}

/// [`transpose`] into `dst`; `src` and `dst` hold `rows * cols` values (checked by the caller).
pub(crate) fn transpose_into<S: Slot<f32>>(src: &[f32], rows: usize, cols: usize, dst: &mut [S]) {
    assert!(src.len() == dst.len() && Some(src.len()) == rows.checked_mul(cols));
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: AVX2 checked; both buffers hold `rows * cols` values (asserted).
        return unsafe { x86::transpose(src, rows, cols, dst) };
    }
    scalar::transpose(src, rows, cols, dst);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic matrix with about `density` nonzeros (values in [-1, 1)).
    fn sparse(rows: usize, cols: usize, density: f32, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32) / (1u64 << 31) as f32
        };
        (0..rows * cols)
            .map(|_| {
                let keep = next() < density;
                let v = next() * 2.0 - 1.0;
                if keep {
                    v
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// The plain triple loop in f64.
    fn dense_matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..k {
                for o in 0..n {
                    out[i * n + o] += a[i * k + j] as f64 * b[j * n + o] as f64;
                }
            }
        }
        out
    }

    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (t, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "{what}: entry {t}: {g} vs {w}"
            );
        }
    }

    // Widths around the kernel's 64- and 8-wide steps, and a batch of rows with empty ones.
    #[cfg(not(miri))]
    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 1, 1),
        (3, 17, 7),
        (9, 33, 64),
        (16, 70, 71),
        (31, 100, 136),
        (128, 784, 256),
    ];
    // Miri interprets every load: it checks that the kernels write every output slot (and
    // touch nothing else) on the small shapes, which still have the blocks' tails.
    #[cfg(miri)]
    const SHAPES: &[(usize, usize, usize)] = &[(1, 1, 1), (3, 17, 7), (9, 33, 64), (16, 70, 71)];

    #[test]
    fn matmul_equals_the_dense_product() {
        for (seed, &(m, k, n)) in SHAPES.iter().enumerate() {
            let a = sparse(m, k, 0.2, seed as u64);
            let b = sparse(k, n, 1.0, 100 + seed as u64);
            let s = SparseRows::from_dense(&a, k, 1.0, None).unwrap().unwrap();
            assert_close(
                &s.matmul(&b, n).unwrap(),
                &dense_matmul(&a, &b, m, k, n),
                "matmul",
            );
            // The transpose times a [m, n] matrix: A^T B.
            let u = sparse(m, n, 1.0, 200 + seed as u64);
            let at: Vec<f32> = transpose(&a, m, k).unwrap();
            assert_close(
                &s.transposed().matmul(&u, n).unwrap(),
                &dense_matmul(&at, &u, k, m, n),
                "transposed matmul",
            );
        }
    }

    #[test]
    fn sampled_dots_equal_the_dense_product_on_the_pattern_and_zero_elsewhere() {
        for (seed, &(m, k, n)) in SHAPES.iter().enumerate() {
            let a = sparse(m, k, 0.3, seed as u64);
            let dy = sparse(m, n, 1.0, 300 + seed as u64);
            let wt = sparse(k, n, 1.0, 400 + seed as u64);
            // As the norm gradient uses them: the column-major pattern, dots of `wt` rows with
            // `dy` rows, put back at the [m, k] positions.
            let st = SparseRows::from_dense(&a, k, 1.0, None)
                .unwrap()
                .unwrap()
                .transposed();
            let got = st
                .scatter_transposed(&st.sampled_dots(&dy, &wt, n).unwrap())
                .unwrap();
            let want = dense_matmul(&dy, &transpose(&wt, k, n).unwrap(), m, n, k);
            let want: Vec<f64> = want
                .iter()
                .zip(&a)
                .map(|(&w, &x)| if x != 0.0 { w } else { 0.0 })
                .collect();
            assert_close(&got, &want, "sampled dots");
        }
    }

    #[test]
    fn the_portable_kernels_agree_with_the_simd_ones() {
        // On a CPU without AVX2 the portable kernels run; here both run on the same data.
        let (m, k, n) = (13, 70, 77);
        let a = sparse(m, k, 0.4, 9);
        let extra = sparse(m, k, 0.1, 10);
        let b = sparse(k, n, 1.0, 11);
        let u = sparse(m, n, 1.0, 12);
        for r in 0..m {
            let row = &a[r * k..(r + 1) * k];
            let ex = Some(&extra[r * k..(r + 1) * k]);
            let (mut c1, mut v1, mut c2, mut v2) = (vec![], vec![], vec![], vec![]);
            scalar::scan_row(row, ex, &mut c1, &mut v1);
            scan_row(row, ex, &mut c2, &mut v2);
            assert_eq!((c1, v1), (c2, v2), "row {r} scan");
        }
        let s = SparseRows::from_dense(&a, k, 1.0, None).unwrap().unwrap();
        for r in 0..m {
            let (cs, vs) = s.row(r);
            for c0 in (0..n).step_by(BLOCK) {
                let w = BLOCK.min(n - c0);
                let (mut o1, mut o2) = (vec![0f32; w], vec![0f32; w]);
                scalar::axpys(&mut o1, cs, vs, &b, n, c0);
                axpys_kernel()(&mut o2, cs, vs, &b, n, c0);
                for (x, y) in o1.iter().zip(&o2) {
                    assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "axpys {x} vs {y}");
                }
            }
            let (mut d1, mut d2) = (vec![0f32; cs.len()], vec![0f32; cs.len()]);
            let ur = &u[r * n..(r + 1) * n];
            scalar::dots(&mut d1, cs, ur, &b, n);
            dots(&mut d2, cs, ur, &b, n);
            for (x, y) in d1.iter().zip(&d2) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "dots {x} vs {y}");
            }
        }
        let mut t1 = vec![0f32; m * k];
        scalar::transpose(&a, m, k, &mut t1);
        assert_eq!(t1, transpose(&a, m, k).unwrap());
    }

    #[test]
    fn matmul_levels_sums_integer_levels_exactly() {
        // Rows of 600 entries (past the 255-entry widening) with levels up to +-128, a row of
        // all zeros, and widths with a 16-wide tail after the 128-wide blocks.
        for &(m, k, n) in &[(3, 600, 16), (4, 600, 144), (2, 40, 256)] {
            let mut s = 12345u64;
            let mut next = move |modulo: u64| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 33) % modulo
            };
            let levels: Vec<i32> = (0..m * k)
                .map(|t| if t < k { 0 } else { next(257) as i32 - 128 })
                .collect();
            let inv: Vec<f32> = (0..m).map(|r| 127.0 / (0.5 + r as f32)).collect();
            let values: Vec<f32> = levels
                .iter()
                .enumerate()
                .map(|(t, &l)| l as f32 / inv[t / k])
                .collect();
            let signs: Vec<i8> = (0..k * n).map(|_| next(3) as i8 - 1).collect();
            let col_scale: Vec<f32> = (0..n).map(|o| 0.01 * (o + 1) as f32).collect();
            let sp = SparseRows::from_dense(&values, k, 1.0, None)
                .unwrap()
                .unwrap();
            let got = sp.matmul_levels(&signs, n, &inv, &col_scale).unwrap();
            for r in 0..m {
                for o in 0..n {
                    let exact: i64 = (0..k)
                        .map(|j| levels[r * k + j] as i64 * signs[j * n + o] as i64)
                        .sum();
                    let want = exact as f64 / inv[r] as f64 * col_scale[o] as f64;
                    let g = got[r * n + o] as f64;
                    assert!(
                        (g - want).abs() <= 1e-6 * (1.0 + want.abs()),
                        "({m},{k},{n}) row {r} col {o}: {g} vs {want}"
                    );
                }
            }
            // The portable kernel gives the same integer sums.
            for (r, &inv_r) in inv.iter().enumerate() {
                let (cs, vs) = sp.row(r);
                let (mut a, mut b) = (vec![0i32; n], vec![0i32; n]);
                scalar::level_sums(&mut a, cs, vs, inv_r, &signs, n);
                level_sums(&mut b, cs, vs, inv_r, &signs, n);
                assert_eq!(a, b, "row {r}");
            }
        }
    }

    /// A ternary `w` given as its signs and per-column scales gives the bits of the same
    /// values given as f32, on every shape (tails, the thread split).
    #[test]
    fn matmul_t_with_dots_reads_signs_and_scales_as_their_values() {
        for (seed, &(m, k, n)) in SHAPES.iter().enumerate() {
            let a = sparse(m, k, 0.25, 40 + seed as u64);
            let x2 = sparse(m, k, 1.0, 50 + seed as u64);
            let dy = sparse(m, n, 1.0, 60 + seed as u64);
            let levels: Vec<i8> = sparse(k, n, 0.6, 70 + seed as u64)
                .iter()
                .map(|&v| (v > 0.0) as i8 - (v < 0.0) as i8)
                .collect();
            let scale: Vec<f32> = (0..n)
                .map(|o| 0.01 + 0.37 * (o as f32).sin().abs())
                .collect();
            let wt: Vec<f32> = levels
                .iter()
                .enumerate()
                .map(|(t, &l)| l as f32 * scale[t % n])
                .collect();
            let sp = SparseRows::from_dense(&a, k, 1.0, None).unwrap().unwrap();
            let (st, second_t) = sp
                .transposed_with(&sp.gather_scaled(&x2, &vec![1.0; m]).unwrap())
                .unwrap();
            let from_values = st
                .matmul_t_with_dots(&second_t, &dy, n, WeightT::Values(&wt))
                .unwrap();
            let signs = WeightT::Signs {
                signs: &levels,
                scale: &scale,
            };
            let from_signs = st.matmul_t_with_dots(&second_t, &dy, n, signs).unwrap();
            assert_eq!(from_signs, from_values, "{m}x{k}x{n}");
            // The portable kernel too, block by block.
            for r in 0..st.rows() {
                let (a0, e) = (st.start[r], st.start[r + 1]);
                let (cs, vs, ss) = (&st.col[a0..e], &st.val[a0..e], &second_t[a0..e]);
                for c0 in (0..n).step_by(TILE_COLS) {
                    let at = r * n + c0..r * n + c0 + TILE_COLS.min(n - c0);
                    let rows = [
                        WRow::Values(&wt[at.clone()]),
                        WRow::Signs(&levels[at.clone()], &scale[c0..c0 + at.len()]),
                    ];
                    let [d1, d2] = rows.map(|w| {
                        let mut o = vec![0f32; at.len()];
                        scalar::axpys2(&mut o, cs, vs, ss, &dy, w, n, c0).to_bits()
                    });
                    assert_eq!(d1, d2, "row {r} block {c0}");
                }
            }
        }
    }

    #[test]
    fn matmul_t_with_dots_gives_the_transposed_product_and_the_reduced_second_sum() {
        for (seed, &(m, k, n)) in SHAPES.iter().enumerate() {
            // As the first layer's backward: the column-major pattern of a [m, k] input.
            let a = sparse(m, k, 0.25, seed as u64);
            let x2 = sparse(m, k, 1.0, 500 + seed as u64);
            let dy = sparse(m, n, 1.0, 600 + seed as u64);
            let wt = sparse(k, n, 1.0, 700 + seed as u64);
            let sp = SparseRows::from_dense(&a, k, 1.0, None).unwrap().unwrap();
            let second = sp.gather_scaled(&x2, &vec![1.0; m]).unwrap();
            let (st, second_t) = sp.transposed_with(&second).unwrap();
            let (prod_t, dots) = st
                .matmul_t_with_dots(&second_t, &dy, n, WeightT::Values(&wt))
                .unwrap();
            // (A^T dY)^T = dY^T A
            let want = dense_matmul(&transpose(&dy, m, n).unwrap(), &a, n, m, k);
            assert_close(&prod_t, &want, "product");
            // dots[j] = sum_o wt[j, o] * sum_i [a_ij != 0] x2_ij dy[i, o]
            let want: Vec<f64> = (0..k)
                .map(|j| {
                    (0..n)
                        .map(|o| {
                            let h: f64 = (0..m)
                                .filter(|&i| a[i * k + j] != 0.0)
                                .map(|i| x2[i * k + j] as f64 * dy[i * n + o] as f64)
                                .sum();
                            h * wt[j * n + o] as f64
                        })
                        .sum()
                })
                .collect();
            assert_close(&dots, &want, "dots");
            for r in 0..st.rows() {
                let (a0, e) = (st.start[r], st.start[r + 1]);
                let (cs, vs, ss) = (&st.col[a0..e], &st.val[a0..e], &second_t[a0..e]);
                for c0 in (0..n).step_by(TILE_COLS) {
                    let width = TILE_COLS.min(n - c0);
                    let wr = WRow::Values(&wt[r * n + c0..r * n + c0 + width]);
                    let (mut o1, mut o2) = (vec![0f32; width], vec![0f32; width]);
                    let d1 = scalar::axpys2(&mut o1, cs, vs, ss, &dy, wr, n, c0);
                    let d2 = axpys2(&mut o2, cs, vs, ss, &dy, wr, n, c0);
                    assert!(
                        (d1 - d2).abs() <= 1e-4 * (1.0 + d1.abs()),
                        "row {r}: {d1} vs {d2}"
                    );
                    for (x, y) in o1.iter().zip(&o2) {
                        assert!(
                            (x - y).abs() <= 1e-5 * (1.0 + x.abs()),
                            "row {r}: {x} vs {y}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn signs_of_every_kind_of_value() {
        let mut v: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.37).sin() * 2.0).collect();
        v[0] = 0.0;
        v[1] = -0.0;
        v[2] = f32::NAN;
        v[3] = f32::NEG_INFINITY;
        v[4] = 1e-30;
        let want: Vec<i8> = v
            .iter()
            .map(|&x| match x {
                x if x > 0.0 => 1,
                x if x < 0.0 => -1,
                _ => 0,
            })
            .collect();
        assert_eq!(signs(&v), want);
        assert_eq!(signs_body(&v), want);
    }

    #[test]
    fn pattern_keeps_nonzeros_of_either_matrix_and_respects_the_density_limit() {
        let values = [0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0];
        let also = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0];
        let s = SparseRows::from_dense(&values, 5, 1.0, Some(&also))
            .unwrap()
            .unwrap();
        assert_eq!(s.start, vec![0, 2, 4]);
        assert_eq!(s.col, vec![0, 1, 1, 4]);
        // The value is always `values`', zero where only `also` is set.
        assert_eq!(s.val, vec![0.0, 2.0, 3.0, 0.0]);
        assert_eq!(s.density(), 0.4);
        assert!(SparseRows::from_dense(&values, 5, 0.39, Some(&also))
            .unwrap()
            .is_none());
        assert!(SparseRows::from_dense(&values, 5, 0.2, None)
            .unwrap()
            .is_some());
        assert!(SparseRows::from_dense(&values, 5, 0.19, None)
            .unwrap()
            .is_none());
    }

    #[test]
    fn transposed_gathered_equals_gather_then_transpose() {
        for (seed, &(m, k, _)) in SHAPES.iter().enumerate() {
            let a = sparse(m, k, 0.3, 90 + seed as u64);
            let dense = sparse(m, k, 1.0, 95 + seed as u64);
            let scale: Vec<f32> = (0..m).map(|r| 0.5 + r as f32).collect();
            let sp = SparseRows::from_dense(&a, k, 1.0, None).unwrap().unwrap();
            let (want, want_moved) = sp
                .transposed_with(&sp.gather_scaled(&dense, &scale).unwrap())
                .unwrap();
            let (got, moved) = sp.transposed_gathered(&dense, &scale).unwrap();
            assert_eq!(
                (&got.start, &got.col, &got.val),
                (&want.start, &want.col, &want.val)
            );
            assert_eq!(moved, want_moved, "{m}x{k}");
            // And against the definition: entry (c, r) of the transpose carries dense[r, c] * scale[r].
            for c in 0..k {
                let at = got.start[c]..got.start[c + 1];
                for ((&r, &v), &m) in got.col[at.clone()]
                    .iter()
                    .zip(&got.val[at.clone()])
                    .zip(&moved[at])
                {
                    let r = r as usize;
                    assert_eq!(v, a[r * k + c]);
                    assert_eq!(m, dense[r * k + c] * scale[r]);
                }
            }
        }
    }

    #[test]
    fn transpose_is_its_own_inverse_and_moves_every_entry() {
        let shapes = [(1, 1), (3, 5), (17, 33), (256, 784)];
        // Miri (which interprets every load) checks the small shapes only.
        for &(r, c) in &shapes[..if cfg!(miri) { 3 } else { 4 }] {
            let a: Vec<f32> = (0..r * c).map(|t| t as f32).collect();
            let t = transpose(&a, r, c).unwrap();
            for i in 0..r {
                for j in 0..c {
                    assert_eq!(t[j * r + i], a[i * c + j]);
                }
            }
            assert_eq!(transpose(&t, c, r).unwrap(), a);
        }
    }

    /// Every public function, fed one wrong length (or shape) at a time, returns an error that
    /// names the function, the operand and what it should have been; none panics.
    #[test]
    fn a_wrong_shape_is_an_error_naming_the_operand() {
        // [[0, 1, 0], [2, 0, 3]]: 2 rows, 3 columns, 3 entries; n = 16 suits `matmul_levels`.
        let dense = [0.0, 1.0, 0.0, 2.0, 0.0, 3.0];
        let a = SparseRows::from_dense(&dense, 3, 1.0, None)
            .unwrap()
            .unwrap();
        let (n, big) = (16, usize::MAX);
        let v = |len: usize| vec![0.5f32; len];
        let s = |len: usize| vec![1i8; len];
        let (ones_r, ones_n) = (v(2), v(n));
        type Case<'a> = (
            &'a str,
            Box<dyn Fn() -> Result<(), QuantError> + 'a>,
            &'a str,
        );
        let cases: Vec<Case> = vec![
            (
                "SparseRows::from_dense",
                Box::new(|| SparseRows::from_dense(&dense, 0, 1.0, None).map(drop)),
                "`cols` = 0, expected 1 to 2^32",
            ),
            (
                "SparseRows::from_dense",
                Box::new(|| SparseRows::from_dense(&dense[..5], 3, 1.0, None).map(drop)),
                "`values` has 5 values, not whole rows of `cols` = 3",
            ),
            (
                "SparseRows::from_dense",
                Box::new(|| SparseRows::from_dense(&dense, 3, 1.0, Some(&v(5))).map(drop)),
                "`also` has 5 values, expected [rows, cols] = [2, 3]",
            ),
            (
                "invalid config",
                Box::new(|| SparseRows::from_dense(&dense, 3, f32::NAN, None).map(drop)),
                "`max_density` = NaN",
            ),
            (
                "SparseRows::transposed_with",
                Box::new(|| a.transposed_with(&v(2)).map(drop)),
                "`extra` has 2 values, expected [nnz] = [3]",
            ),
            (
                "SparseRows::transposed_gathered",
                Box::new(|| a.transposed_gathered(&v(5), &ones_r).map(drop)),
                "`dense` has 5 values, expected [rows, cols] = [2, 3]",
            ),
            (
                "SparseRows::transposed_gathered",
                Box::new(|| a.transposed_gathered(&dense, &v(3)).map(drop)),
                "`row_scale` has 3 values, expected [rows] = [2]",
            ),
            (
                "SparseRows::gather_scaled",
                Box::new(|| a.gather_scaled(&v(7), &ones_r).map(drop)),
                "`dense` has 7 values, expected [rows, cols] = [2, 3]",
            ),
            (
                "SparseRows::gather_scaled",
                Box::new(|| a.gather_scaled(&dense, &v(1)).map(drop)),
                "`row_scale` has 1 values, expected [rows] = [2]",
            ),
            (
                "SparseRows::matmul",
                Box::new(|| a.matmul(&v(3 * n - 1), n).map(drop)),
                "`b` has 47 values, expected [cols, n] = [3, 16]",
            ),
            (
                // 3 * usize::MAX wraps to usize::MAX - 2: an unchecked product would match.
                "SparseRows::matmul",
                Box::new(|| a.matmul(&[], big).map(drop)),
                "`b` has 0 values, expected [cols, n] = [3, 18446744073709551615]",
            ),
            (
                "SparseRows::matmul_levels",
                Box::new(|| a.matmul_levels(&s(3 * 8), 8, &ones_r, &v(8)).map(drop)),
                "`n` = 8, expected a multiple of 16",
            ),
            (
                "SparseRows::matmul_levels",
                Box::new(|| a.matmul_levels(&s(2 * n), n, &ones_r, &ones_n).map(drop)),
                "`signs` has 32 values, expected [cols, n] = [3, 16]",
            ),
            (
                "SparseRows::matmul_levels",
                Box::new(|| a.matmul_levels(&s(3 * n), n, &v(3), &ones_n).map(drop)),
                "`inv_step` has 3 values, expected [rows] = [2]",
            ),
            (
                "SparseRows::matmul_levels",
                Box::new(|| a.matmul_levels(&s(3 * n), n, &ones_r, &v(15)).map(drop)),
                "`col_scale` has 15 values, expected [n] = [16]",
            ),
            (
                // Row 1 holds 3: level 3 * 43 = 129 rounds outside the 8-bit range.
                "SparseRows::matmul_levels",
                Box::new(|| {
                    a.matmul_levels(&s(3 * n), n, &[1.0, 43.0], &ones_n)
                        .map(drop)
                }),
                "row 1 holds 3, level 129 with `inv_step` 43",
            ),
            (
                "SparseRows::matmul_levels",
                Box::new(|| {
                    a.matmul_levels(&s(3 * n), n, &[f32::NAN, 1.0], &ones_n)
                        .map(drop)
                }),
                "row 0 holds 1, level NaN",
            ),
            (
                "SparseRows::sampled_dots",
                Box::new(|| a.sampled_dots(&v(2 * n), &v(2 * n), n).map(drop)),
                "`u` has 32 values, expected [cols, n] = [3, 16]",
            ),
            (
                "SparseRows::sampled_dots",
                Box::new(|| a.sampled_dots(&v(3 * n), &v(3 * n), n).map(drop)),
                "`b` has 48 values, expected [rows, n] = [2, 16]",
            ),
            (
                "SparseRows::scatter_transposed",
                Box::new(|| a.scatter_transposed(&v(4)).map(drop)),
                "`values` has 4 values, expected [nnz] = [3]",
            ),
            (
                "SparseRows::matmul_t_with_dots",
                Box::new(|| {
                    let w = WeightT::Values(&v(2 * n));
                    a.matmul_t_with_dots(&v(2), &v(3 * n), n, w).map(drop)
                }),
                "`second` has 2 values, expected [nnz] = [3]",
            ),
            (
                "SparseRows::matmul_t_with_dots",
                Box::new(|| {
                    let w = WeightT::Values(&v(2 * n));
                    a.matmul_t_with_dots(&v(3), &v(2 * n), n, w).map(drop)
                }),
                "`b` has 32 values, expected [cols, n] = [3, 16]",
            ),
            (
                "SparseRows::matmul_t_with_dots",
                Box::new(|| {
                    let w = WeightT::Values(&v(3 * n));
                    a.matmul_t_with_dots(&v(3), &v(3 * n), n, w).map(drop)
                }),
                "`w` has 48 values, expected [rows, n] = [2, 16]",
            ),
            (
                "SparseRows::matmul_t_with_dots",
                Box::new(|| {
                    let (signs, scale) = (&s(2 * n + 1), &ones_n[..]);
                    let w = WeightT::Signs { signs, scale };
                    a.matmul_t_with_dots(&v(3), &v(3 * n), n, w).map(drop)
                }),
                "`signs` has 33 values, expected [rows, n] = [2, 16]",
            ),
            (
                "SparseRows::matmul_t_with_dots",
                Box::new(|| {
                    let (signs, scale) = (&s(2 * n), &ones_r[..]);
                    let w = WeightT::Signs { signs, scale };
                    a.matmul_t_with_dots(&v(3), &v(3 * n), n, w).map(drop)
                }),
                "`scale` has 2 values, expected [n] = [16]",
            ),
            (
                "transpose",
                Box::new(|| transpose(&dense, 4, 2).map(drop)),
                "`src` has 6 values, expected [rows, cols] = [4, 2]",
            ),
            (
                "transpose_rows",
                Box::new(|| transpose_rows(big, 2, true, true, |_, _| ()).map(drop)),
                "[rows, cols] = [18446744073709551615, 2] is more than usize::MAX values",
            ),
        ];
        for (op, f, want) in &cases {
            let err = f().expect_err(want).to_string();
            assert!(err.starts_with(op), "`{err}` does not name {op}");
            assert!(err.contains(want), "`{err}` does not say {want}");
        }
        // The widest level, 3 * 42.5 = 127.5, rounds to 128: still in range.
        assert!(a.matmul_levels(&s(3 * n), n, &[1.0, 42.5], &ones_n).is_ok());
    }

    /// Products with no columns (`n == 0`) are empty, and the sampled dots over no columns are
    /// the empty sum: zeros, one per entry.
    #[test]
    fn products_over_no_columns() {
        let a = SparseRows::from_dense(&[0.0, 1.0, 2.0, 0.0], 2, 1.0, None)
            .unwrap()
            .unwrap();
        assert_eq!(a.matmul(&[], 0).unwrap(), Vec::<f32>::new());
        assert_eq!(
            a.matmul_levels(&[], 0, &[1.0; 2], &[]).unwrap(),
            Vec::<f32>::new()
        );
        assert_eq!(a.sampled_dots(&[], &[], 0).unwrap(), vec![0.0; 2]);
        let (prod, dots) = a
            .matmul_t_with_dots(&[1.0; 2], &[], 0, WeightT::Values(&[]))
            .unwrap();
        assert_eq!((prod, dots), (vec![], vec![0.0; 2]));
    }
}
