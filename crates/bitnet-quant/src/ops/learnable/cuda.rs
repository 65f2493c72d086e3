//! CUDA kernels of the learnable-temperature surrogate. `t` is read on the GPU from its one-value
//! tensor (no host round trip); `dL/dt` is a grid-stride partial sum per CUDA block in f64 plus a
//! second kernel that adds the partials in a fixed order, so the result is deterministic.

use super::Surrogate;
use crate::ops::cuda_util::{cfg, f32_view, function, stride_blocks, wrap, THREADS};
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{Layout, Result};
use std::sync::OnceLock;

/// `Surrogate::{value, dx, dt}` transcribed; kind codes as `Kind::device_code` (0..=6 and 8),
/// estimator codes as `EstKind::device_code`.
const SRC: &str = r#"
struct bq_parts_t {
    float r;
    float d;
    bool ternary;
};

__device__ __forceinline__ bq_parts_t bq_parts(unsigned kind, float x, float s, float aux) {
    float n = bq_normalizer(kind, s, aux);
    bq_parts_t p;
    p.ternary = kind >= 2u && kind <= 6u;
    p.d = kind == 2u ? 0.5f : aux / n;
    p.r = (x - bq_center(kind, aux)) / n;
    return p;
}

__device__ __forceinline__ float bq_sech2(float z) {
    float th = tanhf(z);
    return 1.0f - th * th;
}

__device__ __forceinline__ float bq_value(unsigned kind, float h, float x, float s, float aux, float t) {
    bq_parts_t p = bq_parts(kind, x, s, aux);
    float soft = !p.ternary ? tanhf(t * p.r) : 0.5f * (tanhf(t * (p.r - p.d)) + tanhf(t * (p.r + p.d)));
    if (h == 0.0f) {
        return s * soft;
    }
    return (1.0f - h) * s * soft + h * bq_quantize(kind, 0.0f, x, s, aux);
}

__device__ __forceinline__ float bq_dx(unsigned kind, float h, unsigned est, float ep, float x, float s,
                                       float aux, float t) {
    float n = bq_normalizer(kind, s, aux);
    bq_parts_t p = bq_parts(kind, x, s, aux);
    float ds = !p.ternary ? t * bq_sech2(t * p.r)
                          : 0.5f * t * (bq_sech2(t * (p.r - p.d)) + bq_sech2(t * (p.r + p.d)));
    if (h == 0.0f) {
        return s / n * ds;
    }
    return (1.0f - h) * (s / n * ds) + h * bq_derivative(est, ep, p.r);
}

__device__ __forceinline__ float bq_dt(unsigned kind, float h, float x, float s, float aux, float t) {
    bq_parts_t p = bq_parts(kind, x, s, aux);
    float r = p.r, d = p.d;
    float ds = !p.ternary ? r * bq_sech2(t * r)
                          : 0.5f * ((r - d) * bq_sech2(t * (r - d)) + (r + d) * bq_sech2(t * (r + d)));
    if (h == 0.0f) {
        return s * ds;
    }
    return (1.0f - h) * (s * ds);
}

extern "C" __global__ void bq_learnable_fwd(const float* x, const float* tp, const float* params, float* out,
                                            u64 n, u64 block, unsigned kind, float h) {
    float t = tp[0];
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u64 b = i / block;
        out[i] = bq_value(kind, h, x[i], params[2 * b], params[2 * b + 1], t);
    }
}

// rest = [params (2 per block) ..., upstream (n) ...]; out = [dL/dx (n) ..., dL/dt]; partial
// sums of dL/dt per CUDA block go to partial.
extern "C" __global__ void bq_learnable_bwd(const float* x, const float* tp, const float* rest, float* out,
                                            double* partial, u64 n, u64 block, unsigned kind, float h,
                                            unsigned est, float ep) {
    __shared__ double shd[256];
    float t = tp[0];
    const float* params = rest;
    const float* u = rest + 2 * (n / block);
    double acc = 0.0;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u64 b = i / block;
        float s = params[2 * b], aux = params[2 * b + 1];
        out[i] = u[i] * bq_dx(kind, h, est, ep, x[i], s, aux, t);
        acc += (double)(u[i] * bq_dt(kind, h, x[i], s, aux, t));
    }
    acc = bq_block_sum<double>(acc, shd);
    if (threadIdx.x == 0) {
        partial[blockIdx.x] = acc;
    }
}

// One CUDA block: out[n] = the sum of the partials.
extern "C" __global__ void bq_learnable_dt(const double* partial, unsigned count, float* out, u64 n) {
    __shared__ double shd[256];
    double acc = 0.0;
    for (unsigned i = threadIdx.x; i < count; i += blockDim.x) {
        acc += partial[i];
    }
    acc = bq_block_sum<double>(acc, shd);
    if (threadIdx.x == 0) {
        out[n] = (float)acc;
    }
}
"#;

const MODULE: &str = "bitnet_quant_learnable";
static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();

/// `(1 - h) s soft(x / n) + h q(x)` for every value.
pub(crate) fn forward(
    op: &'static str,
    sur: &Surrogate,
    (sx, lx): (&CudaStorage, &Layout),
    (st, lt): (&CudaStorage, &Layout),
    (sp, lp): (&CudaStorage, &Layout),
    block: usize,
) -> Result<CudaStorage> {
    let dev = &sx.device;
    let (mut tx, mut tt, mut tp) = (None, None, None);
    let x = f32_view(op, sx, lx, &mut tx)?;
    let t = f32_view(op, st, lt, &mut tt)?;
    let p = f32_view(op, sp, lp, &mut tp)?;
    let n = lx.shape().elem_count();
    let (code, _, _) = sur.kind.device_code();
    let (n_u, block_u) = (n as u64, block as u64);
    // SAFETY: the kernel writes all n values.
    let mut out = unsafe { dev.alloc::<f32>(n)? };
    let f = function(dev, &PTX, MODULE, SRC, "bq_learnable_fwd")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&x)
        .arg(&t)
        .arg(&p)
        .arg(&mut out)
        .arg(&n_u)
        .arg(&block_u);
    b.arg(&code).arg(&sur.hardness);
    // SAFETY: the argument list matches the kernel's signature.
    unsafe { b.launch(cfg(stride_blocks(n), THREADS)) }.w()?;
    Ok(wrap(out, dev))
}

/// `[dL/dx (one per value) ..., dL/dt]`; `rest` holds the parameters then the upstream gradient.
pub(crate) fn backward(
    op: &'static str,
    sur: &Surrogate,
    (sx, lx): (&CudaStorage, &Layout),
    (st, lt): (&CudaStorage, &Layout),
    (sr, lr): (&CudaStorage, &Layout),
    block: usize,
) -> Result<CudaStorage> {
    let dev = &sx.device;
    let (mut tx, mut tt, mut tr) = (None, None, None);
    let x = f32_view(op, sx, lx, &mut tx)?;
    let t = f32_view(op, st, lt, &mut tt)?;
    let rest = f32_view(op, sr, lr, &mut tr)?;
    let n = lx.shape().elem_count();
    let (code, _, _) = sur.kind.device_code();
    let (est, ep) = sur.estimator.device_code();
    let (n_u, block_u) = (n as u64, block as u64);
    let grid = stride_blocks(n);
    let grid_u = grid as u32;
    // SAFETY: the first kernel writes out[..n] and every partial, the second out[n].
    let mut out = unsafe { dev.alloc::<f32>(n + 1)? };
    let mut partial = unsafe { dev.alloc::<f64>(grid)? };
    let stream = dev.cuda_stream();

    let f = function(dev, &PTX, MODULE, SRC, "bq_learnable_bwd")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&x).arg(&t).arg(&rest).arg(&mut out).arg(&mut partial);
    b.arg(&n_u).arg(&block_u).arg(&code).arg(&sur.hardness);
    b.arg(&est).arg(&ep);
    // SAFETY: the argument list matches the kernel's signature.
    unsafe { b.launch(cfg(grid, THREADS)) }.w()?;

    let f = function(dev, &PTX, MODULE, SRC, "bq_learnable_dt")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&partial).arg(&grid_u).arg(&mut out).arg(&n_u);
    // SAFETY: as above; one CUDA block.
    unsafe { b.launch(cfg(1, THREADS)) }.w()?;
    Ok(wrap(out, dev))
}
