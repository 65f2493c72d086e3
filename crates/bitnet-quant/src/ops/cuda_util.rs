//! What the CUDA kernels share: the scalar formulas of [`math`](super::math) transcribed to CUDA C,
//! run-time compilation with NVRTC (once per process and module), input views and launch sizes.

use crate::error::QuantError;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaSlice, CudaView, LaunchConfig};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::{DType, Layout, Result};
use std::sync::OnceLock;

/// Threads per CUDA block of every kernel; the block reductions assume a power of two <= 256.
pub(crate) const THREADS: u32 = 256;

/// CUDA C of `Kind::quantize`, `Kind::normalizer`, `Kind::center`, `EstKind::derivative` and
/// `blend`, line by line.
/// The kind and estimator codes are those of `Kind::device_code` and `EstKind::device_code`.
/// `clampf` keeps Rust's `clamp` semantics (NaN passes through), which `fminf`/`fmaxf` would not.
pub(crate) const MATH: &str = r#"
#define BQ_EPS 1e-5f
typedef unsigned long long u64;

__device__ __forceinline__ float clampf(float v, float lo, float hi) {
    return v < lo ? lo : (v > hi ? hi : v);
}

// Kind codes: 0 binary, 1 binary scaled, 2 absmean, 3..=6 threshold (fixed, fixed scaled, twn,
// twn scaled), 7 integer grid with qmax, 8 centered binary (center in aux), 9 Hugging Face
// absmean (aux = 1 / max(mean, eps)).
__device__ __forceinline__ float bq_quantize(unsigned kind, float qmax, float x, float s, float aux) {
    if (kind == 8u) {
        return x >= aux ? s : -s;
    }
    if (kind <= 1u) {
        return x >= 0.0f ? s : -s;
    }
    if (kind == 2u) {
        return s * clampf(rintf(x / (s + BQ_EPS)), -1.0f, 1.0f);
    }
    if (kind == 9u) {
        return s * clampf(rintf(x * aux), -1.0f, 1.0f);
    }
    if (kind <= 6u) {
        return x > aux ? s : (x < -aux ? -s : 0.0f);
    }
    float inv = qmax / aux;
    return clampf(rintf(x * inv), -qmax - 1.0f, qmax) / inv;
}

__device__ __forceinline__ float bq_center(unsigned kind, float aux) {
    return kind == 8u ? aux : 0.0f;
}

__device__ __forceinline__ float bq_normalizer(unsigned kind, float s, float aux) {
    float n;
    if (kind == 2u) {
        n = s + BQ_EPS;
    } else if (kind == 7u) {
        n = aux;
    } else {
        n = s;
    }
    return n > 0.0f ? n : 1.0f;
}

// Estimator codes: 0 identity, 1 clipped(c), 2 soft tanh(t), 3 soft sigmoid(t), 4 approx sign,
// 5 swish sign(beta), 6 IR-Net's EDE(t).
__device__ __forceinline__ float bq_derivative(unsigned est, float p, float r) {
    switch (est) {
    case 0u:
        return 1.0f;
    case 1u:
        return fabsf(r) <= p ? 1.0f : 0.0f;
    case 2u: {
        float th = tanhf(p * r);
        return p * (1.0f - th * th);
    }
    case 3u: {
        float sg = 1.0f / (1.0f + expf(-p * r));
        return 2.0f * p * sg * (1.0f - sg);
    }
    case 4u: {
        float a = fabsf(r);
        return a <= 1.0f ? 2.0f - 2.0f * a : 0.0f;
    }
    case 5u: {
        float br = p * r;
        return p * (2.0f - br * tanhf(br / 2.0f)) / (1.0f + coshf(br));
    }
    default: {
        float th = tanhf(p * r);
        return fmaxf(p, 1.0f) * (1.0f - th * th);
    }
    }
}

__device__ __forceinline__ float bq_blend(float x, float q, float lambda) {
    return lambda == 1.0f ? q : x + lambda * (q - x);
}

// Tree reduction of one value per thread over a block of blockDim.x (a power of two) threads;
// thread 0 gets the result.
template <typename T>
__device__ __forceinline__ T bq_block_sum(T v, T* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            sh[threadIdx.x] += sh[threadIdx.x + s];
        }
        __syncthreads();
    }
    T r = sh[0];
    __syncthreads();
    return r;
}

__device__ __forceinline__ float bq_block_max(float v, float* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            sh[threadIdx.x] = fmaxf(sh[threadIdx.x], sh[threadIdx.x + s]);
        }
        __syncthreads();
    }
    float r = sh[0];
    __syncthreads();
    return r;
}
"#;

/// Compiles `MATH` + `src` once per process (the cell caches the PTX, or the compiler's message),
/// loads the module on `dev` (candle caches it by name) and returns `name` from it.
///
/// Floating-point contraction is off (`--fmad=false`): the CPU kernels round every product and
/// sum separately, and a fused multiply-add would round differently and move values across a
/// rounding boundary of the levels.
pub(crate) fn function(
    dev: &CudaDevice,
    cell: &'static OnceLock<std::result::Result<String, String>>,
    module: &str,
    src: &str,
    name: &str,
) -> Result<CudaFunction> {
    function_for(dev, cell, module, src, name, None)
}

/// [`function`] for a virtual architecture (`"compute_80"`), for kernels whose instructions
/// NVRTC's default target lacks; the module must only be loaded on devices that have it.
pub(crate) fn function_for(
    dev: &CudaDevice,
    cell: &'static OnceLock<std::result::Result<String, String>>,
    module: &str,
    src: &str,
    name: &str,
    arch: Option<&'static str>,
) -> Result<CudaFunction> {
    let ptx = cell.get_or_init(|| {
        let opts = CompileOptions {
            fmad: Some(false),
            arch,
            ..Default::default()
        };
        compile_ptx_with_opts(format!("{MATH}{src}"), opts)
            .map(|p| p.to_src())
            .map_err(|e| format!("{e:?}"))
    });
    let ptx = match ptx {
        Ok(p) => p,
        Err(e) => candle_core::bail!("{module}: NVRTC failed to compile the kernels: {e}"),
    };
    Ok(dev
        .get_or_load_custom_func(name, module, ptx)?
        .into_cuda_function())
}

/// A contiguous f32 view of an input: the storage itself when the layout is contiguous, else a
/// contiguous copy made on the GPU into `tmp` (transposes, broadcasts and narrows all work).
pub(crate) fn f32_view<'a>(
    op: &'static str,
    s: &'a CudaStorage,
    l: &Layout,
    tmp: &'a mut Option<CudaSlice<f32>>,
) -> Result<CudaView<'a, f32>> {
    if s.dtype() != DType::F32 {
        return Err(QuantError::DType {
            op,
            dtype: s.dtype(),
        }
        .into());
    }
    if let Some((a, b)) = l.contiguous_offsets() {
        return Ok(s.as_cuda_slice::<f32>()?.slice(a..b));
    }
    let n = l.shape().elem_count();
    // SAFETY: copy_strided_src writes all n values before anything reads them.
    let buf = unsafe { s.device.alloc::<f32>(n)? };
    let mut dst = CudaStorage::wrap_cuda_slice(buf, s.device.clone());
    s.copy_strided_src(&mut dst, 0, l)?;
    let CudaStorageSlice::F32(buf) = dst.slice else {
        candle_core::bail!("{op}: strided copy changed the dtype");
    };
    let buf: &'a CudaSlice<f32> = tmp.insert(buf);
    Ok(buf.slice(..))
}

/// A launch of `blocks` CUDA blocks of `threads` threads.
pub(crate) fn cfg(blocks: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Enough CUDA blocks of [`THREADS`] threads for a grid-stride loop over `n` values: one value
/// per thread up to 8 blocks per SM of a large GPU, the loop covers the rest.
pub(crate) fn stride_blocks(n: usize) -> usize {
    n.div_ceil(THREADS as usize).clamp(1, 132 * 8)
}

/// [`reduction_splits`](super::reduction_splits) with the thread count as CUDA launches take it.
pub(crate) fn splits(blocks: usize, block: usize) -> (usize, usize, u32) {
    let (splits, chunk, threads) = super::reduction_splits(blocks, block);
    (splits, chunk, threads as u32)
}

/// Wraps a kernel's output for candle.
pub(crate) fn wrap(out: CudaSlice<f32>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(out, dev.clone())
}
