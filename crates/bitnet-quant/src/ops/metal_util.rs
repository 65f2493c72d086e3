//! What the Metal kernels share, the counterpart of `cuda_util.rs`: the scalar formulas of
//! [`math`](super::math) transcribed to the Metal Shading Language, run-time compilation (once per
//! device and module) with cached pipelines, input views and dispatch sizes.
//!
//! Metal has no `double`. Where a CUDA kernel accumulates in f64, the Metal kernel accumulates a
//! double-float pair `(hi, lo)` with error-free additions (about 48 significant bits against f64's
//! 53), reduced in the same order as the CUDA kernel. The pair has f32's exponent range, so the
//! block statistics add their values scaled by a power of two that keeps every sum finite (see
//! `scales/metal.rs`, whose tests emulate these operations on the host).

use crate::error::QuantError;
use candle_core::backend::BackendStorage;
use candle_core::metal_backend::DeviceId;
use candle_core::{CpuStorage, DType, Layout, MetalDevice, MetalError, MetalStorage, Result};
use candle_metal_kernels::metal::{Buffer, ComputeCommandEncoder, ComputePipeline, Library};
use candle_metal_kernels::BufferOffset;
use objc2_metal::{MTLCompileOptions, MTLSize};
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

/// Threads per threadgroup of every kernel; the threadgroup reductions assume a power of two
/// <= 256 (the size of their threadgroup arrays).
pub(crate) const THREADS: usize = 256;

/// MSL of `Kind::quantize`, `Kind::normalizer`, `Kind::center`, `EstKind::derivative` and `blend`, line by line
/// after `cuda_util::MATH`, plus the double-float sums that stand in for CUDA's f64. The kind and
/// estimator codes are those of `Kind::device_code` and `EstKind::device_code`. `clampf` and
/// `bq_fmax` keep the NaN rules of Rust's `clamp` and CUDA's `fmaxf` whatever the math mode.
pub(crate) const MATH: &str = r#"
#include <metal_stdlib>
using namespace metal;

// The library is also compiled in the safe math mode; this keeps multiply-adds unfused even where
// a compiler ignores that: the CPU kernels round every product and sum separately, and a fused
// one rounds differently and can move a value across a rounding boundary of the levels.
#pragma STDC FP_CONTRACT OFF

#define BQ_EPS 1e-5f
#define BQ_FN inline __attribute__((always_inline))
#define BQ_THREAD_IDS                                   \
    uint tid [[thread_position_in_threadgroup]],        \
    uint bid [[threadgroup_position_in_grid]],          \
    uint bdim [[threads_per_threadgroup]],              \
    uint gdim [[threadgroups_per_grid]]

BQ_FN float clampf(float v, float lo, float hi) {
    return v < lo ? lo : (v > hi ? hi : v);
}

// CUDA's fmaxf: a NaN operand yields the other one.
BQ_FN float bq_fmax(float a, float b) {
    return a != a ? b : (b != b ? a : (a > b ? a : b));
}

// i / d for 64-bit indices. Apple GPUs have no 64-bit integer divide (it is a long software
// routine), so indices that fit in 32 bits, every tensor below 4 G values, use the 32-bit one.
BQ_FN ulong bq_div(ulong i, ulong d) {
    return (i | d) <= 0xffffffffUL ? ulong(uint(i) / uint(d)) : i / d;
}

// Kind codes: 0 binary, 1 binary scaled, 2 absmean, 3..=6 threshold (fixed, fixed scaled, twn,
// twn scaled), 7 integer grid with qmax, 8 centered binary (center in aux), 9 Hugging Face
// absmean (aux = 1 / max(mean, eps)).
BQ_FN float bq_quantize(uint kind, float qmax, float x, float s, float aux) {
    if (kind == 8u) {
        return x >= aux ? s : -s;
    }
    if (kind <= 1u) {
        return x >= 0.0f ? s : -s;
    }
    if (kind == 2u) {
        return s * clampf(rint(x / (s + BQ_EPS)), -1.0f, 1.0f);
    }
    if (kind == 9u) {
        return s * clampf(rint(x * aux), -1.0f, 1.0f);
    }
    if (kind <= 6u) {
        return x > aux ? s : (x < -aux ? -s : 0.0f);
    }
    float inv = qmax / aux;
    return clampf(rint(x * inv), -qmax - 1.0f, qmax) / inv;
}

BQ_FN float bq_center(uint kind, float aux) {
    return kind == 8u ? aux : 0.0f;
}

BQ_FN float bq_normalizer(uint kind, float s, float aux) {
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
BQ_FN float bq_derivative(uint est, float p, float r) {
    switch (est) {
    case 0u:
        return 1.0f;
    case 1u:
        return fabs(r) <= p ? 1.0f : 0.0f;
    case 2u: {
        float th = precise::tanh(p * r);
        return p * (1.0f - th * th);
    }
    case 3u: {
        float sg = 1.0f / (1.0f + precise::exp(-p * r));
        return 2.0f * p * sg * (1.0f - sg);
    }
    case 4u: {
        float a = fabs(r);
        return a <= 1.0f ? 2.0f - 2.0f * a : 0.0f;
    }
    case 5u: {
        float br = p * r;
        return p * (2.0f - br * precise::tanh(br / 2.0f)) / (1.0f + precise::cosh(br));
    }
    default: {
        float th = precise::tanh(p * r);
        return bq_fmax(p, 1.0f) * (1.0f - th * th);
    }
    }
}

BQ_FN float bq_blend(float x, float q, float lambda) {
    return lambda == 1.0f ? q : x + lambda * (q - x);
}

// A double-float (hi, lo): the stand-in for CUDA's f64 accumulators.
typedef float2 bq_dd;

// Knuth's two-sum: s + e == a + b exactly, which holds only without reassociation (safe mode).
BQ_FN bq_dd bq_two_sum(float a, float b) {
    float s = a + b;
    float bb = s - a;
    float e = (a - (s - bb)) + (b - bb);
    return bq_dd(s, e);
}

BQ_FN bq_dd bq_dd_add(bq_dd a, bq_dd b) {
    bq_dd t = bq_two_sum(a.x, b.x);
    // An overflowed or infinite sum stays infinite; its error terms would be inf - inf = NaN.
    if (isinf(t.x)) {
        return bq_dd(t.x, 0.0f);
    }
    float e = t.y + (a.y + b.y);
    float hi = t.x + e;
    return bq_dd(hi, e - (hi - t.x));
}

BQ_FN float bq_dd_float(bq_dd a) {
    return a.x + a.y;
}

// (float)(a / (double)n) of the CUDA kernels: one correction step of the quotient against the
// remainder a - q n, whose product part fma makes exact; n is split into two floats because
// counts above 2^24 are not exact in one.
BQ_FN float bq_dd_div(bq_dd a, ulong n) {
    float nh = float(n);
    float nl = float(long(n) - long(nh));
    float q = a.x / nh;
    if (!isfinite(q)) {
        return q;
    }
    float p = q * nh;
    float pe = fma(q, nh, -p);
    float r = (((a.x - p) - pe) + a.y) - q * nl;
    return q + r / nh;
}

BQ_FN uint bq_add(uint a, uint b) {
    return a + b;
}

BQ_FN bq_dd bq_add(bq_dd a, bq_dd b) {
    return bq_dd_add(a, b);
}

// Tree reduction of one value per thread over a threadgroup of bdim (a power of two) threads;
// every thread gets the result. The same order as CUDA's bq_block_sum.
template <typename T>
BQ_FN T bq_block_sum(T v, threadgroup T* sh, uint tid, uint bdim) {
    sh[tid] = v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint s = bdim / 2; s > 0; s >>= 1) {
        if (tid < s) {
            sh[tid] = bq_add(sh[tid], sh[tid + s]);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    T r = sh[0];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    return r;
}

BQ_FN float bq_block_max(float v, threadgroup float* sh, uint tid, uint bdim) {
    sh[tid] = v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint s = bdim / 2; s > 0; s >>= 1) {
        if (tid < s) {
            sh[tid] = bq_fmax(sh[tid], sh[tid + s]);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    float r = sh[0];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    return r;
}
"#;

type LibraryCache = HashMap<(DeviceId, &'static str), std::result::Result<Library, String>>;
type PipelineCache = HashMap<(DeviceId, &'static str, &'static str), ComputePipeline>;

/// Compiled libraries (or the compiler's message) per device and module: a failed compile is not
/// retried on every call, as CUDA's cached PTX result.
static LIBRARIES: LazyLock<Mutex<LibraryCache>> = LazyLock::new(Default::default);
static PIPELINES: LazyLock<Mutex<PipelineCache>> = LazyLock::new(Default::default);

/// A cache lock; a panic elsewhere cannot leave a half-inserted entry, so a poisoned lock's data
/// is still good.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn metal_err(e: candle_metal_kernels::MetalKernelError) -> candle_core::Error {
    MetalError::from(e).into()
}

/// Compiles `MATH` + `src` once per device (the cache keeps the library, or the compiler's
/// message) and returns the pipeline of kernel `name` from it, also cached.
///
/// Fast math is off (macOS 15 maps that to the safe math mode; the kernels call `precise::` for
/// `tanh`, `exp` and `cosh` either way): the CPU kernels are IEEE (correctly rounded division,
/// `rint`, no reassociation), the double-float sums need exact two-sums, and the quantized values
/// must match bit for bit.
pub(crate) fn pipeline(
    dev: &MetalDevice,
    module: &'static str,
    src: &str,
    name: &'static str,
) -> Result<ComputePipeline> {
    let key = (dev.id(), module, name);
    if let Some(p) = lock(&PIPELINES).get(&key) {
        return Ok(p.clone());
    }
    let library = {
        let mut libraries = lock(&LIBRARIES);
        let entry = libraries.entry((dev.id(), module)).or_insert_with(|| {
            let opts = MTLCompileOptions::new();
            // `mathMode` replaces this setter only from macOS 15; the setter works on every
            // version and maps `false` to the safe mode there.
            #[allow(deprecated)]
            opts.setFastMathEnabled(false);
            dev.device()
                .new_library_with_source(&format!("{MATH}{src}"), Some(&*opts))
                .map_err(|e| e.to_string())
        });
        match entry {
            Ok(l) => l.clone(),
            Err(e) => candle_core::bail!("{module}: the Metal compiler failed on the kernels: {e}"),
        }
    };
    let function = library.get_function(name, None).map_err(metal_err)?;
    let p = dev
        .device()
        .new_compute_pipeline_state_with_function(&function)
        .map_err(metal_err)?;
    Ok(lock(&PIPELINES).entry(key).or_insert(p).clone())
}

/// A contiguous f32 view of an input: the storage itself (at its offset) when the layout is
/// contiguous, else a contiguous copy made on the GPU into `tmp` (transposes, broadcasts and
/// narrows all work). Call it before taking the command encoder: the copy takes one itself.
pub(crate) fn f32_view<'a>(
    op: &'static str,
    s: &'a MetalStorage,
    l: &Layout,
    tmp: &'a mut Option<MetalStorage>,
) -> Result<BufferOffset<'a>> {
    if s.dtype() != DType::F32 {
        return Err(QuantError::DType {
            op,
            dtype: s.dtype(),
        }
        .into());
    }
    if let Some((a, _)) = l.contiguous_offsets() {
        return Ok(BufferOffset {
            buffer: s.buffer(),
            offset_in_bytes: a * DType::F32.size_in_bytes(),
        });
    }
    let n = l.shape().elem_count();
    let dev = s.device();
    let buf = dev.new_buffer(n, DType::F32, "bitnet-quant strided input")?;
    let mut dst = MetalStorage::new(buf, dev.clone(), n, DType::F32);
    s.copy_strided_src(&mut dst, 0, l)?;
    let dst: &'a MetalStorage = tmp.insert(dst);
    Ok(BufferOffset::zero_offset(dst.buffer()))
}

/// A new f32 buffer of `n` values for a kernel to fill.
pub(crate) fn f32_buffer(dev: &MetalDevice, n: usize, name: &str) -> Result<Arc<Buffer>> {
    dev.new_buffer(n, DType::F32, name)
}

/// Dispatches the pipeline set on `enc` as `groups` threadgroups of `threads` threads. A
/// pipeline that allows fewer threads (many registers) gets the largest power of two it allows,
/// which keeps the threadgroup reductions valid; every kernel loops over its range with a stride
/// of the actual threadgroup size.
pub(crate) fn dispatch(
    enc: &ComputeCommandEncoder,
    pipeline: &ComputePipeline,
    groups: usize,
    threads: usize,
) {
    let allowed = 1usize << pipeline.max_total_threads_per_threadgroup().max(1).ilog2();
    let size = |width: usize| MTLSize {
        width,
        height: 1,
        depth: 1,
    };
    enc.dispatch_thread_groups(size(groups.max(1)), size(threads.min(allowed).max(1)));
}

/// Sets `pipeline` on `enc`, binds its arguments with `bind` (a `set_params!` in the kernel's
/// argument order) and dispatches it as [`dispatch`] does: the three steps of every launch, kept
/// together so that no launch binds its arguments to the previous kernel.
pub(crate) fn encode(
    enc: &ComputeCommandEncoder,
    pipeline: &ComputePipeline,
    groups: usize,
    threads: usize,
    bind: impl FnOnce(&ComputeCommandEncoder),
) {
    enc.set_compute_pipeline_state(pipeline);
    bind(enc);
    dispatch(enc, pipeline, groups, threads);
}

/// Runs kernel `name` of `module` (see [`pipeline`]) once over `n` values with one thread per
/// value in a grid-stride loop ([`stride_groups`] threadgroups of [`THREADS`]), the launch of
/// every elementwise op: a new f32 output of `n` values, which `bind` gets to bind with the
/// inputs, then returned for candle.
pub(crate) fn run_elementwise(
    dev: &MetalDevice,
    (module, src, name): (&'static str, &str, &'static str),
    n: usize,
    bind: impl FnOnce(&ComputeCommandEncoder, &Buffer),
) -> Result<MetalStorage> {
    let out = f32_buffer(dev, n, name)?;
    let f = pipeline(dev, module, src, name)?;
    {
        let encoder = dev.command_encoder()?;
        let enc: &ComputeCommandEncoder = encoder.as_ref();
        encode(enc, &f, stride_groups(n), THREADS, |enc| bind(enc, &out));
    }
    Ok(wrap(out, dev, n))
}

/// Enough threadgroups of [`THREADS`] threads for a grid-stride loop over `n` values: the same
/// grid as `cuda_util::stride_blocks`, so both devices reduce in the same order.
pub(crate) fn stride_groups(n: usize) -> usize {
    n.div_ceil(THREADS).clamp(1, 132 * 8)
}

/// How a per-block reduction splits each quantization block among threadgroups: the same
/// [`reduction_splits`](super::reduction_splits) as CUDA's.
pub(crate) use super::reduction_splits as splits;

/// A zeroed `u32` counter for kernels to add to atomically.
pub(crate) fn zeroed_counter(dev: &MetalDevice) -> Result<Arc<Buffer>> {
    dev.allocate_zeros(std::mem::size_of::<u32>())
}

/// The counter's value on the host, after the GPU work queued so far (as CUDA's `clone_dtoh`).
/// Call it after the command encoder is dropped: the copy takes the device's command lock.
pub(crate) fn read_counter(dev: &MetalDevice, counter: Arc<Buffer>) -> Result<u32> {
    let s = MetalStorage::new(counter, dev.clone(), 1, DType::U32);
    match s.to_cpu_storage()? {
        CpuStorage::U32(v) if v.len() == 1 => Ok(v[0]),
        other => candle_core::bail!(
            "bitnet-quant: a one-value u32 Metal counter read back as {:?}",
            other.dtype()
        ),
    }
}

/// Wraps a kernel's output of `count` f32 values for candle.
pub(crate) fn wrap(out: Arc<Buffer>, dev: &MetalDevice, count: usize) -> MetalStorage {
    MetalStorage::new(out, dev.clone(), count, DType::F32)
}
