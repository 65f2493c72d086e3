//! CPU forward of the fused BitLinear op: the norm, scale, quantize and GEMM kernels of the
//! separate ops, called in the same order on plain buffers.

use crate::ops::quantize::QuantizeOp;
use crate::ops::sparse::{self, SparseRows};
use crate::ops::Kind;
use crate::ops::{quantize, rms_norm, scales};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};

/// The forward's output and what the backward keeps.
pub(crate) struct Forward {
    pub y: Vec<f32>,
    pub xn: Vec<f32>,
    /// `None` without an activation quantizer (the GEMM then reads `xn`).
    pub xq: Option<Vec<f32>>,
    pub x_params: Option<Vec<f32>>,
    pub x_block: usize,
    /// The quantized weight as the backward reads it.
    pub wq: WeightKept,
    /// The GEMM's left operand as entries, when it is sparse enough for the sparse kernels
    /// (pattern: nonzero input or nonzero operand; see [`sparse::MAX_DENSITY`]).
    pub sparse: Option<SparseRows>,
    pub w_params: Vec<f32>,
    pub w_block: usize,
}

/// The quantized weight kept for the backward.
pub(crate) enum WeightKept {
    /// `[n, k]`, for the dense GEMMs.
    Rows(Vec<f32>),
    /// The transpose `[k, n]`, for the sparse kernels (`sparse` is set).
    Columns(Vec<f32>),
    /// The transpose's levels (-1, 0, 1; `[k, n]`) and one scale per output (`[n]`): all the
    /// first layer's sparse backward reads ([`sparse::WeightT::Signs`]; `sparse` is set).
    ColumnSigns(Vec<i8>, Vec<f32>),
}

/// `x: [m, k]`, `w: [n, k]`, `g: [k]` (row-major values). `signs_suffice`: the backward needs
/// only the weight and norm-weight gradients (a first layer), so a sparse integer forward may
/// keep the weight as [`WeightKept::ColumnSigns`].
pub(crate) fn forward(
    op: &'static str,
    weight: &QuantizeOp,
    act: Option<&QuantizeOp>,
    eps: f32,
    (xs, ws, gs): (&[f32], &[f32], &[f32]),
    (m, k, n): (usize, usize, usize),
    signs_suffice: bool,
) -> Result<Forward> {
    let xn = rms_norm::cpu::forward(xs, gs, eps);
    let (xq, x_params, x_block) = match act {
        Some(a) => {
            let block = a.granularity.block_size(m * k, k)?;
            let params = scales::cpu::block_params(op, a.kind, &xn, block)?;
            let xq = quantize::cpu::forward(a.kind, &xn, &params, block, a.lambda);
            (Some(xq), Some(params), block)
        }
        None => (None, None, m * k),
    };
    let w_block = weight.granularity.block_size(n * k, k)?;
    let w_params = scales::cpu::block_params(op, weight.kind, ws, w_block)?;
    let quantize_weight =
        || quantize::cpu::forward(weight.kind, ws, &w_params, w_block, weight.lambda);
    let (lhs, xn) = match xq {
        Some(xq) => (xq, Some(xn)),
        None => (xn, None),
    };
    let int_scales = integer_scales(
        act,
        weight,
        x_params.as_deref(),
        x_block,
        &w_params,
        w_block,
        (m, k, n),
    );
    // The input's nonzeros join the pattern: the norm gradient reads the GEMM's input gradient
    // wherever the input is nonzero, even where its quantized value rounded to zero. The integer
    // forward pays at higher densities than the f32 products (a hidden layer after ReLU).
    let limit = match int_scales {
        Some(_) => sparse::MAX_DENSITY_LEVELS,
        None => sparse::MAX_DENSITY,
    };
    let sparse = SparseRows::from_dense(&lhs, k, limit, Some(xs))?;
    let (y, lhs, wq, sparse) = match sparse {
        Some(sp) => {
            // The sparse kernels read the weight transposed (its signs, for the integer ones),
            // quantized strip by strip straight into it. The backward's sparse products pay only
            // below `MAX_DENSITY` and read the transpose too (or just its signs, for a first
            // layer); above, the backward is the dense GEMMs, on the weight as stored.
            let sparse_bwd = sp.density() <= sparse::MAX_DENSITY;
            let levels = int_scales.is_some();
            let quantize_rows = |r0: usize, strip: &mut [f32]| {
                let (kind, lambda) = (weight.kind, weight.lambda);
                quantize::cpu::forward_range(kind, ws, &w_params, w_block, lambda, r0 * k, strip)
            };
            let (rows, wt) = match sparse_bwd {
                true => {
                    let values = !(levels && signs_suffice);
                    (
                        None,
                        sparse::transpose_rows(n, k, values, levels, quantize_rows)?,
                    )
                }
                false => {
                    let wq = quantize_weight();
                    let copy_rows = |r0: usize, strip: &mut [f32]| {
                        strip.copy_from_slice(&wq[r0 * k..r0 * k + strip.len()])
                    };
                    let wt = sparse::transpose_rows(n, k, !levels, levels, copy_rows)?;
                    (Some(wq), wt)
                }
            };
            let (y, col_scale) = match int_scales {
                Some((inv, col_scale)) => {
                    (sp.matmul_levels(&wt.signs, n, &inv, &col_scale)?, col_scale)
                }
                None => (sp.matmul(&wt.values, n)?, Vec::new()),
            };
            match (rows, wt.values.is_empty()) {
                (Some(wq), _) => (y, lhs, WeightKept::Rows(wq), None),
                (None, true) => (
                    y,
                    lhs,
                    WeightKept::ColumnSigns(wt.signs, col_scale),
                    Some(sp),
                ),
                (None, false) => (y, lhs, WeightKept::Columns(wt.values), Some(sp)),
            }
        }
        None => {
            let (y, lhs, wq) = dense_gemm(op, lhs, quantize_weight(), (m, k, n))?;
            (y, lhs, WeightKept::Rows(wq), None)
        }
    };
    let (xn, xq) = match xn {
        Some(xn) => (xn, Some(lhs)),
        None => (lhs, None),
    };
    Ok(Forward {
        y,
        xn,
        xq,
        x_params,
        x_block,
        wq,
        sparse,
        w_params,
        w_block,
    })
}

/// `lhs @ wq^T` by candle's f32 GEMM (`lhs: [m, k]`, `wq: [n, k]`), handing both buffers back.
/// They are moved into storages for the GEMM and back out afterwards: no copy.
fn dense_gemm(
    op: &'static str,
    lhs: Vec<f32>,
    wq: Vec<f32>,
    (m, k, n): (usize, usize, usize),
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let lhs = CpuStorage::F32(lhs);
    let rhs = CpuStorage::F32(wq);
    let y = lhs.matmul(
        &rhs,
        (1, m, n, k),
        &Layout::contiguous((m, k)),
        &Layout::contiguous((n, k)).transpose(0, 1)?,
    )?;
    let (CpuStorage::F32(y), CpuStorage::F32(lhs), CpuStorage::F32(wq)) = (y, lhs, rhs) else {
        candle_core::bail!("{op}: the f32 GEMM returned another dtype");
    };
    Ok((y, lhs, wq))
}

/// For the sparse forward in integers ([`SparseRows::matmul_levels`]): each row's inverse
/// activation step and each output's weight scale, when the layer is int8-style activations
/// (integer levels with one scale per row, no blend) times weights of levels -1, 0, 1 (binary or
/// ternary, one scale per tensor or per output row, no blend) and `n` is a multiple of 16.
/// `None` otherwise (the f32 sparse kernel then runs).
fn integer_scales(
    act: Option<&QuantizeOp>,
    weight: &QuantizeOp,
    x_params: Option<&[f32]>,
    x_block: usize,
    w_params: &[f32],
    w_block: usize,
    (m, k, n): (usize, usize, usize),
) -> Option<(Vec<f32>, Vec<f32>)> {
    let (a, xp) = (act?, x_params?);
    let Kind::Int { qmax } = a.kind else {
        return None;
    };
    let ternary_levels = matches!(
        weight.kind,
        Kind::Binary { .. }
            | Kind::BinaryCentered
            | Kind::Absmean
            | Kind::AbsmeanHf
            | Kind::Threshold { .. }
    );
    let per_row = x_block % k == 0;
    let w_ok = w_block == n * k || w_block == k;
    if qmax > 127.0
        || a.lambda != 1.0
        || weight.lambda != 1.0
        || !ternary_levels
        || !per_row
        || !w_ok
        || n % 16 != 0
    {
        return None;
    }
    // The quantizer's own `inv = qmax / aux`, so that `value * inv` gives back its level.
    let inv = (0..m)
        .map(|r| qmax / xp[2 * (r * k / x_block) + 1])
        .collect();
    let col_scale = (0..n)
        .map(|o| {
            if w_block == k {
                w_params[2 * o]
            } else {
                w_params[0]
            }
        })
        .collect();
    Some((inv, col_scale))
}
