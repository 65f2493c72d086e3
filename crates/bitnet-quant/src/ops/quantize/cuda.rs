//! CUDA kernels of the quantize op: forward map and estimator backward, one thread per value in a
//! grid-stride loop, each value's block parameters read from `params`.

use crate::ops::cuda_util::{cfg, f32_view, function, stride_blocks, wrap, THREADS};
use crate::ops::math::{EstKind, Kind};
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{Layout, Result};
use std::sync::OnceLock;

const SRC: &str = r#"
extern "C" __global__ void bq_quantize_fwd(const float* x, const float* params, float* out, u64 n, u64 block,
                                           unsigned kind, float qmax, float lambda) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u64 b = i / block;
        float v = x[i];
        out[i] = bq_blend(v, bq_quantize(kind, qmax, v, params[2 * b], params[2 * b + 1]), lambda);
    }
}

extern "C" __global__ void bq_quantize_bwd(const float* x, const float* params, const float* u, float* out,
                                           u64 n, u64 block, unsigned kind, unsigned est, float p, float lambda) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u64 b = i / block;
        float s = params[2 * b], aux = params[2 * b + 1];
        float inv_n = 1.0f / bq_normalizer(kind, s, aux);
        float r = (x[i] - bq_center(kind, aux)) * inv_n;
        out[i] = u[i] * ((1.0f - lambda) + lambda * bq_derivative(est, p, r));
    }
}
"#;

const MODULE: &str = "bitnet_quant_quantize";
static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();

/// `blend(x, q(x), lambda)` for every value.
pub(crate) fn forward(
    op: &'static str,
    kind: Kind,
    (sx, lx): (&CudaStorage, &Layout),
    (sp, lp): (&CudaStorage, &Layout),
    block: usize,
    lambda: f32,
) -> Result<CudaStorage> {
    let dev = &sx.device;
    let (mut tx, mut tp) = (None, None);
    let x = f32_view(op, sx, lx, &mut tx)?;
    let p = f32_view(op, sp, lp, &mut tp)?;
    let n = lx.shape().elem_count();
    let (code, _, qmax) = kind.device_code();
    let (n_u, block_u) = (n as u64, block as u64);
    // SAFETY: the kernel writes all n values.
    let mut out = unsafe { dev.alloc::<f32>(n)? };
    let f = function(dev, &PTX, MODULE, SRC, "bq_quantize_fwd")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&x).arg(&p).arg(&mut out).arg(&n_u).arg(&block_u);
    b.arg(&code).arg(&qmax).arg(&lambda);
    // SAFETY: the argument list matches the kernel's signature.
    unsafe { b.launch(cfg(stride_blocks(n), THREADS)) }.w()?;
    Ok(wrap(out, dev))
}

/// `u * ((1 - lambda) + lambda * e'(x / n))` for every value.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    op: &'static str,
    kind: Kind,
    est: EstKind,
    (sx, lx): (&CudaStorage, &Layout),
    (sp, lp): (&CudaStorage, &Layout),
    (su, lu): (&CudaStorage, &Layout),
    block: usize,
    lambda: f32,
) -> Result<CudaStorage> {
    let dev = &sx.device;
    let (mut tx, mut tp, mut tu) = (None, None, None);
    let x = f32_view(op, sx, lx, &mut tx)?;
    let p = f32_view(op, sp, lp, &mut tp)?;
    let u = f32_view(op, su, lu, &mut tu)?;
    let n = lx.shape().elem_count();
    let (code, _, _) = kind.device_code();
    let (est_code, est_p) = est.device_code();
    let (n_u, block_u) = (n as u64, block as u64);
    // SAFETY: the kernel writes all n values.
    let mut out = unsafe { dev.alloc::<f32>(n)? };
    let f = function(dev, &PTX, MODULE, SRC, "bq_quantize_bwd")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&x)
        .arg(&p)
        .arg(&u)
        .arg(&mut out)
        .arg(&n_u)
        .arg(&block_u);
    b.arg(&code).arg(&est_code).arg(&est_p).arg(&lambda);
    // SAFETY: the argument list matches the kernel's signature.
    unsafe { b.launch(cfg(stride_blocks(n), THREADS)) }.w()?;
    Ok(wrap(out, dev))
}
