//! CUDA kernels of LSQ. The backward splits each block into chunks (see
//! [`splits`](crate::ops::cuda_util::splits)): one kernel writes `dL/dx` and a partial f64 sum of
//! `dL/ds` per chunk, a second adds each block's partials in a fixed order.

use crate::ops::cuda_util::{cfg, f32_view, function, splits, stride_blocks, wrap, THREADS};
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{Layout, Result};
use std::sync::OnceLock;

const SRC: &str = r#"
extern "C" __global__ void bq_lsq_fwd(const float* x, const float* steps, float* out, u64 n, u64 block,
                                      float qmax) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float s = fmaxf(steps[i / block], BQ_EPS);
        out[i] = s * clampf(rintf(x[i] / s), -qmax - 1.0f, qmax);
    }
}

// Chunk (blockIdx.x % splits) of block (blockIdx.x / splits): dL/dx into out, the chunk's sum
// of u * d(q/s)/ds into partial.
extern "C" __global__ void bq_lsq_bwd(const float* x, const float* steps, const float* u, float* out,
                                      double* partial, u64 block, unsigned splits, u64 chunk, float qmax) {
    __shared__ double shd[256];
    u64 qb = blockIdx.x / splits, k = blockIdx.x % splits;
    u64 lo = qb * block + k * chunk;
    u64 end = qb * block + block;
    u64 hi = lo + chunk < end ? lo + chunk : end;
    float s = fmaxf(steps[qb], BQ_EPS);
    float qmin = -qmax - 1.0f;
    double acc = 0.0;
    for (u64 i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        float r = x[i] / s;
        out[i] = (qmin <= r && r <= qmax) ? u[i] : 0.0f;
        float d = r < qmin ? qmin : (r > qmax ? qmax : rintf(r) - r);
        acc += (double)(u[i] * d);
    }
    acc = bq_block_sum<double>(acc, shd);
    if (threadIdx.x == 0) {
        partial[blockIdx.x] = acc;
    }
}

// out[n + b] = g * (sum of block b's partials), one thread per block.
extern "C" __global__ void bq_lsq_ds(const double* partial, unsigned splits, u64 blocks, float g, float* out,
                                     u64 n) {
    u64 qb = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (qb >= blocks) {
        return;
    }
    double acc = 0.0;
    for (unsigned k = 0; k < splits; ++k) {
        acc += partial[qb * splits + k];
    }
    out[n + qb] = g * (float)acc;
}
"#;

const MODULE: &str = "bitnet_quant_lsq";
static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();

/// `s * clamp(round(x / s), -(qmax + 1), qmax)` per block.
pub(crate) fn forward(
    op: &'static str,
    qmax: f32,
    (sx, lx): (&CudaStorage, &Layout),
    (ss, ls): (&CudaStorage, &Layout),
    block: usize,
) -> Result<CudaStorage> {
    let dev = &sx.device;
    let (mut tx, mut ts) = (None, None);
    let x = f32_view(op, sx, lx, &mut tx)?;
    let steps = f32_view(op, ss, ls, &mut ts)?;
    let n = lx.shape().elem_count();
    let (n_u, block_u) = (n as u64, block as u64);
    // SAFETY: the kernel writes all n values.
    let mut out = unsafe { dev.alloc::<f32>(n)? };
    let f = function(dev, &PTX, MODULE, SRC, "bq_lsq_fwd")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&x)
        .arg(&steps)
        .arg(&mut out)
        .arg(&n_u)
        .arg(&block_u)
        .arg(&qmax);
    // SAFETY: the argument list matches the kernel's signature.
    unsafe { b.launch(cfg(stride_blocks(n), THREADS)) }.w()?;
    Ok(wrap(out, dev))
}

/// `[dL/dx ..., dL/ds per block ...]`.
pub(crate) fn backward(
    op: &'static str,
    qmax: f32,
    (sx, lx): (&CudaStorage, &Layout),
    (ss, ls): (&CudaStorage, &Layout),
    (su, lu): (&CudaStorage, &Layout),
    block: usize,
) -> Result<CudaStorage> {
    let dev = &sx.device;
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
    // SAFETY: the first kernel writes out[..n] and every partial, the second out[n..].
    let mut out = unsafe { dev.alloc::<f32>(n + blocks)? };
    let mut partial = unsafe { dev.alloc::<f64>(grid)? };
    let stream = dev.cuda_stream();

    let f = function(dev, &PTX, MODULE, SRC, "bq_lsq_bwd")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&x)
        .arg(&steps)
        .arg(&u)
        .arg(&mut out)
        .arg(&mut partial);
    b.arg(&block_u).arg(&nsplit_u).arg(&chunk_u).arg(&qmax);
    // SAFETY: the argument list matches the kernel's signature; the grid covers every chunk.
    unsafe { b.launch(cfg(grid, threads)) }.w()?;

    let f = function(dev, &PTX, MODULE, SRC, "bq_lsq_ds")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&partial)
        .arg(&nsplit_u)
        .arg(&blocks_u)
        .arg(&g)
        .arg(&mut out)
        .arg(&n_u);
    // SAFETY: as above; one thread per block.
    unsafe { b.launch(cfg(blocks.div_ceil(128), 128)) }.w()?;
    Ok(wrap(out, dev))
}
