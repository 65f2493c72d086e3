//! CUDA kernels of the block parameters: the same two passes as `cpu.rs` (`sum|x|`, `max|x|` and,
//! for the centered binary kind, the signed `sum x`; then for scaled threshold kinds the mean of
//! `|x|` above the threshold), each a partial reduction per chunk of a block followed by a
//! fixed-order reduction of the chunks, all on the GPU.
//!
//! Sums are accumulated in f64, as on the CPU, in another order: the sums differ by about 1e-16
//! relative, so the f32 means almost always round to the same value and otherwise differ by an
//! ulp (the device tests allow 2e-6 relative); maxima are exact. f64 cannot overflow here: a
//! block of `2^32` values of `f32::MAX` sums to about `1.5e48`.

use crate::error::QuantError;
use crate::ops::cuda_util::{cfg, f32_view, function, splits, wrap};
use crate::ops::math::Kind;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, DeviceId, WrapErr};
use candle_core::{Layout, Result};
use std::sync::{Mutex, OnceLock};

const SRC: &str = r#"
// Partial |x| statistics of chunk (blockIdx.x % splits) of block (blockIdx.x / splits).
// With `centered` set, also the signed sum of the chunk (the center of kind 8) into psigned.
extern "C" __global__ void bq_abs_partial(const float* x, u64 block, unsigned splits, u64 chunk,
                                          unsigned centered, double* psum, double* psigned,
                                          float* pmax, unsigned* nonfinite) {
    __shared__ double shd[256];
    __shared__ float shf[256];
    __shared__ unsigned shu[256];
    u64 qb = blockIdx.x / splits, k = blockIdx.x % splits;
    u64 lo = k * chunk, hi = lo + chunk < block ? lo + chunk : block;
    const float* xb = x + qb * block;
    double acc = 0.0;
    float mx = 0.0f;
    unsigned bad = 0;
    for (u64 i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        float a = fabsf(xb[i]);
        acc += (double)a;
        mx = fmaxf(mx, a);
        // NaN fails the first test, infinity the second.
        bad += (a == a && a <= 3.402823466e38f) ? 0u : 1u;
    }
    acc = bq_block_sum<double>(acc, shd);
    mx = bq_block_max(mx, shf);
    bad = bq_block_sum<unsigned>(bad, shu);
    // `centered` is the same for the whole CUDA block, so every thread reaches the barriers.
    if (centered != 0u) {
        double sacc = 0.0;
        for (u64 i = lo + threadIdx.x; i < hi; i += blockDim.x) {
            sacc += (double)xb[i];
        }
        sacc = bq_block_sum<double>(sacc, shd);
        if (threadIdx.x == 0) {
            psigned[blockIdx.x] = sacc;
        }
    }
    if (threadIdx.x == 0) {
        psum[blockIdx.x] = acc;
        pmax[blockIdx.x] = mx;
        if (bad > 0u) {
            atomicAdd(nonfinite, bad);
        }
    }
}

// Kind::params from the partials, one thread per block. Scaled threshold kinds get their
// threshold in aux here and their scale from bq_above_finish.
extern "C" __global__ void bq_finish(const double* psum, const double* psigned, const float* pmax,
                                     unsigned splits, u64 block, u64 blocks, unsigned kind, float fixed,
                                     float qmax, float* params) {
    u64 qb = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (qb >= blocks) {
        return;
    }
    double sum = 0.0;
    float mx = 0.0f;
    for (unsigned k = 0; k < splits; ++k) {
        sum += psum[qb * splits + k];
        mx = fmaxf(mx, pmax[qb * splits + k]);
    }
    float mean = (float)(sum / (double)block);
    float s = 0.0f, aux = 0.0f;
    if (kind == 0u) {
        s = 1.0f;
    } else if (kind <= 2u) {
        s = mean;
    } else if (kind <= 6u) {
        s = (kind == 3u || kind == 5u) ? 1.0f : 0.0f;
        aux = kind <= 4u ? fixed : 0.7f * mean;
    } else if (kind == 8u) {
        double ssum = 0.0;
        for (unsigned k = 0; k < splits; ++k) {
            ssum += psigned[qb * splits + k];
        }
        s = mean;
        aux = (float)(ssum / (double)block);
    } else if (kind == 9u) {
        aux = 1.0f / fmaxf(mean, BQ_EPS);
        s = 1.0f / aux;
    } else {
        float m = fmaxf(mx, BQ_EPS);
        s = m / qmax;
        aux = m;
    }
    params[2 * qb] = s;
    params[2 * qb + 1] = aux;
}

// Partial sum and count of |x| over the values above the block's threshold (params' aux).
extern "C" __global__ void bq_above_partial(const float* x, u64 block, unsigned splits, u64 chunk,
                                            const float* params, double* psum, unsigned* pcount) {
    __shared__ double shd[256];
    __shared__ unsigned shu[256];
    u64 qb = blockIdx.x / splits, k = blockIdx.x % splits;
    u64 lo = k * chunk, hi = lo + chunk < block ? lo + chunk : block;
    const float* xb = x + qb * block;
    float d = params[2 * qb + 1];
    double acc = 0.0;
    unsigned c = 0;
    for (u64 i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        float a = fabsf(xb[i]);
        if (a > d) {
            acc += (double)a;
            c += 1u;
        }
    }
    acc = bq_block_sum<double>(acc, shd);
    c = bq_block_sum<unsigned>(c, shu);
    if (threadIdx.x == 0) {
        psum[blockIdx.x] = acc;
        pcount[blockIdx.x] = c;
    }
}

// The scale of scaled threshold kinds: the mean of |x| above the threshold, 0 when none is.
extern "C" __global__ void bq_above_finish(const double* psum, const unsigned* pcount, unsigned splits,
                                           u64 blocks, float* params) {
    u64 qb = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (qb >= blocks) {
        return;
    }
    double sum = 0.0;
    u64 c = 0;
    for (unsigned k = 0; k < splits; ++k) {
        sum += psum[qb * splits + k];
        c += pcount[qb * splits + k];
    }
    params[2 * qb] = c > 0 ? (float)(sum / (double)c) : 0.0f;
}
"#;

const MODULE: &str = "bitnet_quant_scales";
static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();

/// `[blocks, 2]` parameters of the values in `s`/`l`, in blocks of `block` values. Non-finite
/// input is counted on the GPU and reported as [`QuantError::NonFinite`] after one small copy of
/// the count to the host, as the CPU kernel does; inside
/// [`defer_finite_checks`](crate::defer_finite_checks) the count goes to the device's counter
/// for [`check_deferred_finite`](crate::check_deferred_finite) instead, with no copy.
pub(crate) fn block_params(
    op: &'static str,
    kind: Kind,
    s: &CudaStorage,
    l: &Layout,
    block: usize,
) -> Result<CudaStorage> {
    let dev = &s.device;
    let mut tmp = None;
    let x = f32_view(op, s, l, &mut tmp)?;
    let n = l.shape().elem_count();
    let blocks = n / block;
    let (nsplit, chunk, threads) = splits(blocks, block);
    let grid = blocks * nsplit;
    let (code, fixed, qmax) = kind.device_code();
    let (block_u, chunk_u, blocks_u, nsplit_u) =
        (block as u64, chunk as u64, blocks as u64, nsplit as u32);
    let stream = dev.cuda_stream();

    // SAFETY (all allocs below): every element is written by the kernels before it is read.
    let mut psum = unsafe { dev.alloc::<f64>(grid)? };
    // Written and read only for the centered kind; one value otherwise.
    let centered = kind.needs_mean() as u32;
    let mut psigned = unsafe { dev.alloc::<f64>(if centered != 0 { grid } else { 1 })? };
    let mut pmax = unsafe { dev.alloc::<f32>(grid)? };
    let mut params = unsafe { dev.alloc::<f32>(2 * blocks)? };
    // Deferred (see `finite_check`): the device's persistent counter, never copied back here.
    let deferred = crate::finite_check::finite_checks_deferred();
    let mut own = if deferred {
        None
    } else {
        Some(dev.alloc_zeros::<u32>(1)?)
    };
    let mut counters = if deferred {
        Some(counters().lock().unwrap_or_else(|e| e.into_inner()))
    } else {
        None
    };
    let nonfinite: &mut CudaSlice<u32> = match (&mut own, &mut counters) {
        (Some(c), _) => c,
        (None, Some(all)) => counter(all, dev)?,
        (None, None) => unreachable!("one of the two is set"),
    };

    let f = function(dev, &PTX, MODULE, SRC, "bq_abs_partial")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&x)
        .arg(&block_u)
        .arg(&nsplit_u)
        .arg(&chunk_u)
        .arg(&centered);
    b.arg(&mut psum)
        .arg(&mut psigned)
        .arg(&mut pmax)
        .arg(nonfinite);
    // SAFETY: the argument list matches the kernel's signature; the grid covers every chunk.
    unsafe { b.launch(cfg(grid, threads)) }.w()?;

    let fin_cfg = cfg(blocks.div_ceil(128), 128);
    let f = function(dev, &PTX, MODULE, SRC, "bq_finish")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&psum)
        .arg(&psigned)
        .arg(&pmax)
        .arg(&nsplit_u)
        .arg(&block_u)
        .arg(&blocks_u);
    b.arg(&code).arg(&fixed).arg(&qmax).arg(&mut params);
    // SAFETY: as above; one thread per block.
    unsafe { b.launch(fin_cfg) }.w()?;

    if kind.needs_above_pass() {
        let mut pcount = unsafe { dev.alloc::<u32>(grid)? };
        let f = function(dev, &PTX, MODULE, SRC, "bq_above_partial")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&x).arg(&block_u).arg(&nsplit_u).arg(&chunk_u);
        b.arg(&params).arg(&mut psum).arg(&mut pcount);
        // SAFETY: as above.
        unsafe { b.launch(cfg(grid, threads)) }.w()?;

        let f = function(dev, &PTX, MODULE, SRC, "bq_above_finish")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&psum)
            .arg(&pcount)
            .arg(&nsplit_u)
            .arg(&blocks_u)
            .arg(&mut params);
        // SAFETY: as above.
        unsafe { b.launch(fin_cfg) }.w()?;
    }

    drop(counters);
    if let Some(own) = own {
        let count = dev.clone_dtoh(&own)?[0] as usize;
        if count > 0 {
            return Err(QuantError::NonFinite { op, count }.into());
        }
    }
    Ok(wrap(params, dev))
}

/// The deferred non-finite counters, one per device.
type Counters = Vec<(DeviceId, CudaSlice<u32>)>;

fn counters() -> &'static Mutex<Counters> {
    static COUNTERS: OnceLock<Mutex<Counters>> = OnceLock::new();
    COUNTERS.get_or_init(|| Mutex::new(Vec::new()))
}

/// The counter of `dev`, created (zero) on first use.
fn counter<'a>(all: &'a mut Counters, dev: &CudaDevice) -> Result<&'a mut CudaSlice<u32>> {
    let i = match all.iter().position(|(id, _)| *id == dev.id()) {
        Some(i) => i,
        None => {
            all.push((dev.id(), dev.alloc_zeros::<u32>(1)?));
            all.len() - 1
        }
    };
    Ok(&mut all[i].1)
}

/// Reads and zeroes `dev`'s deferred count (0 if nothing was ever deferred there).
pub(crate) fn take_deferred(dev: &CudaDevice) -> Result<usize> {
    let mut all = counters().lock().unwrap_or_else(|e| e.into_inner());
    let Some((_, c)) = all.iter_mut().find(|(id, _)| *id == dev.id()) else {
        return Ok(0);
    };
    let count = dev.clone_dtoh(&*c)?[0] as usize;
    if count > 0 {
        dev.cuda_stream().memset_zeros(c).w()?;
    }
    Ok(count)
}
