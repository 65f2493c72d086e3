//! Metal kernels of LSQ, ported from `cuda.rs`. The backward splits each block into chunks (see
//! [`splits`](crate::ops::metal_util::splits)): one kernel writes `dL/dx` and a partial sum of
//! `dL/ds` per chunk (a double-float pair where CUDA has f64, see `metal_util.rs`), a second adds
//! each block's partials in a fixed order.

use crate::ops::metal_util::{
    encode, f32_buffer, f32_view, pipeline, run_elementwise, splits, wrap,
};
use candle_core::backend::BackendStorage;
use candle_core::{Layout, MetalStorage, Result};
use candle_metal_kernels::metal::ComputeCommandEncoder;
use candle_metal_kernels::set_params;
use candle_metal_kernels::utils::Input;
use candle_metal_kernels::Output;

const SRC: &str = r#"
// Mirrors bq_lsq_fwd (lsq/cuda.rs).
kernel void bq_lsq_fwd(device const float* x [[buffer(0)]],
                       device const float* steps [[buffer(1)]],
                       device float* out [[buffer(2)]],
                       constant ulong& n [[buffer(3)]],
                       constant ulong& block [[buffer(4)]],
                       constant float& qmax [[buffer(5)]],
                       BQ_THREAD_IDS) {
    for (ulong i = ulong(bid) * bdim + tid; i < n; i += ulong(gdim) * bdim) {
        float s = bq_fmax(steps[bq_div(i, block)], BQ_EPS);
        out[i] = s * clampf(rint(x[i] / s), -qmax - 1.0f, qmax);
    }
}

// Mirrors bq_lsq_bwd (lsq/cuda.rs): chunk (bid % splits) of block (bid / splits), dL/dx into
// out, the chunk's sum of u * d(q/s)/ds into partial.
kernel void bq_lsq_bwd(device const float* x [[buffer(0)]],
                       device const float* steps [[buffer(1)]],
                       device const float* u [[buffer(2)]],
                       device float* out [[buffer(3)]],
                       device bq_dd* partial [[buffer(4)]],
                       constant ulong& block [[buffer(5)]],
                       constant uint& splits [[buffer(6)]],
                       constant ulong& chunk [[buffer(7)]],
                       constant float& qmax [[buffer(8)]],
                       BQ_THREAD_IDS) {
    threadgroup bq_dd shd[256];
    ulong qb = bid / splits, k = bid % splits;
    ulong lo = qb * block + k * chunk;
    ulong end = qb * block + block;
    ulong hi = lo + chunk < end ? lo + chunk : end;
    float s = bq_fmax(steps[qb], BQ_EPS);
    float qmin = -qmax - 1.0f;
    bq_dd acc = bq_dd(0.0f);
    for (ulong i = lo + tid; i < hi; i += bdim) {
        float r = x[i] / s;
        out[i] = (qmin <= r && r <= qmax) ? u[i] : 0.0f;
        float d = r < qmin ? qmin : (r > qmax ? qmax : rint(r) - r);
        acc = bq_dd_add(acc, bq_dd(u[i] * d, 0.0f));
    }
    acc = bq_block_sum<bq_dd>(acc, shd, tid, bdim);
    if (tid == 0) {
        partial[bid] = acc;
    }
}

// Mirrors bq_lsq_ds (lsq/cuda.rs): out[n + b] = g * (sum of block b's partials), one thread per
// block.
kernel void bq_lsq_ds(device const bq_dd* partial [[buffer(0)]],
                      constant uint& splits [[buffer(1)]],
                      constant ulong& blocks [[buffer(2)]],
                      constant float& g [[buffer(3)]],
                      device float* out [[buffer(4)]],
                      constant ulong& n [[buffer(5)]],
                      BQ_THREAD_IDS) {
    ulong qb = ulong(bid) * bdim + tid;
    if (qb >= blocks) {
        return;
    }
    bq_dd acc = bq_dd(0.0f);
    for (uint k = 0; k < splits; ++k) {
        acc = bq_dd_add(acc, partial[qb * splits + k]);
    }
    out[n + qb] = g * bq_dd_float(acc);
}
"#;

const MODULE: &str = "bitnet_quant_lsq";

/// `s * clamp(round(x / s), -(qmax + 1), qmax)` per block.
pub(crate) fn forward(
    op: &'static str,
    qmax: f32,
    (sx, lx): (&MetalStorage, &Layout),
    (ss, ls): (&MetalStorage, &Layout),
    block: usize,
) -> Result<MetalStorage> {
    let dev = sx.device();
    let (mut tx, mut ts) = (None, None);
    let x = f32_view(op, sx, lx, &mut tx)?;
    let steps = f32_view(op, ss, ls, &mut ts)?;
    let n = lx.shape().elem_count();
    let (n_u, block_u) = (n as u64, block as u64);
    run_elementwise(dev, (MODULE, SRC, "bq_lsq_fwd"), n, |enc, out| {
        set_params!(
            enc,
            (
                Input::from_buffer_offset(&x),
                Input::from_buffer_offset(&steps),
                Output::new(out),
                n_u,
                block_u,
                qmax
            )
        );
    })
}

/// `[dL/dx ..., dL/ds per block ...]`.
pub(crate) fn backward(
    op: &'static str,
    qmax: f32,
    (sx, lx): (&MetalStorage, &Layout),
    (ss, ls): (&MetalStorage, &Layout),
    (su, lu): (&MetalStorage, &Layout),
    block: usize,
) -> Result<MetalStorage> {
    let dev = sx.device();
    let (mut tx, mut ts, mut tu) = (None, None, None);
    let x = f32_view(op, sx, lx, &mut tx)?;
    let steps = f32_view(op, ss, ls, &mut ts)?;
    let u = f32_view(op, su, lu, &mut tu)?;
    let n = lx.shape().elem_count();
    let blocks = n / block;
    let (nsplit, chunk, threads) = splits(blocks, block);
    let grid = blocks * nsplit;
    // The same expression as the CPU kernel, so that g is the same f32.
    let g = 1.0 / ((block as f32) * qmax).sqrt();
    let (n_u, block_u, blocks_u, chunk_u, nsplit_u) = (
        n as u64,
        block as u64,
        blocks as u64,
        chunk as u64,
        nsplit as u32,
    );
    // The first kernel writes out[..n] and every partial (a double-float pair, two f32), the
    // second out[n..].
    let out = f32_buffer(dev, n + blocks, "bq_lsq_bwd")?;
    let partial = f32_buffer(dev, 2 * grid, "bq_lsq_partial")?;
    let bwd = pipeline(dev, MODULE, SRC, "bq_lsq_bwd")?;
    let ds = pipeline(dev, MODULE, SRC, "bq_lsq_ds")?;

    let encoder = dev.command_encoder()?;
    let enc: &ComputeCommandEncoder = encoder.as_ref();
    encode(enc, &bwd, grid, threads, |enc| {
        set_params!(
            enc,
            (
                Input::from_buffer_offset(&x),
                Input::from_buffer_offset(&steps),
                Input::from_buffer_offset(&u),
                Output::new(&out),
                Output::new(&partial),
                block_u,
                nsplit_u,
                chunk_u,
                qmax
            )
        );
    });
    encode(enc, &ds, blocks.div_ceil(128), 128, |enc| {
        set_params!(
            enc,
            (
                Input::new(&partial),
                nsplit_u,
                blocks_u,
                g,
                Output::new(&out),
                n_u
            )
        );
    });
    Ok(wrap(out, dev, n + blocks))
}
