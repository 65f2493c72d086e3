//! Metal kernels of the block parameters, ported from `cuda.rs`: the same two passes (`sum|x|`,
//! `max|x|` and, for the centered binary kind, the signed `sum x`; then for scaled threshold kinds
//! the mean of `|x|` above the threshold), each a partial reduction per chunk of a block followed
//! by a fixed-order reduction of the chunks.
//!
//! Metal has no `double`: CUDA's f64 sums are double-float pairs here (see `metal_util.rs`), which
//! have f32's range. So that a sum of finite values cannot overflow (CUDA's f64 and the CPU's f64
//! do not), each chunk first finds its `max|x| < 2^e` and adds its values times `2^-e`: every
//! term is below 1, and a chunk's sum below its length. The finishing kernel brings the chunks of
//! a block to the largest exponent `E` among them, adds them, divides by the count and multiplies
//! the mean by `2^E`, which is at most `max|x|` and so finite. Scaling by a power of two is exact;
//! only terms below `2^-126` of their chunk's maximum can be lost (flushed to zero), at most
//! `2^-94` of the sum. The means then agree with the CPU's to about 1e-14 relative before the
//! final rounding to f32, as CUDA's do (the device tests allow 2e-6); maxima are exact.
//! `metal_emulation.rs` checks these float operations in a host emulation of the kernels.

use crate::error::QuantError;
use crate::ops::math::Kind;
use crate::ops::metal_util::{
    encode, f32_buffer, f32_view, pipeline, read_counter, splits, wrap, zeroed_counter,
};
use candle_core::backend::BackendStorage;
use candle_core::{DType, Layout, MetalStorage, Result};
use candle_metal_kernels::metal::ComputeCommandEncoder;
use candle_metal_kernels::set_params;
use candle_metal_kernels::utils::Input;
use candle_metal_kernels::Output;

const SRC: &str = r#"
// No exponent: a chunk whose values are all zero (or whose maximum is not finite, which
// bq_abs_partial reports as non-finite input anyway).
#define BQ_NO_EXP (-100000)

// The e of max|x| = f 2^e, f in [0.5, 1): every |x| of the chunk times 2^-e is below 1.
BQ_FN int bq_exponent(float mx) {
    if (!(mx > 0.0f) || !isfinite(mx)) {
        return BQ_NO_EXP;
    }
    int e;
    frexp(mx, e);
    return e;
}

BQ_FN bq_dd bq_dd_ldexp(bq_dd a, int k) {
    return bq_dd(ldexp(a.x, k), ldexp(a.y, k));
}

// The largest exponent of the chunks k of block qb.
BQ_FN int bq_block_exponent(device const int* pexp, ulong qb, uint splits) {
    int e = BQ_NO_EXP;
    for (uint k = 0; k < splits; ++k) {
        e = max(e, pexp[qb * splits + k]);
    }
    return e;
}

// The chunks' scaled sums of block qb added at the common exponent e (their own exponent
// minus e <= 0: exact, or below 2^-126 of the sum and flushed).
BQ_FN bq_dd bq_block_total(device const bq_dd* part, device const int* pexp, ulong qb, uint splits,
                           int e) {
    bq_dd sum = bq_dd(0.0f);
    for (uint k = 0; k < splits; ++k) {
        int ek = pexp[qb * splits + k];
        if (ek != BQ_NO_EXP) {
            sum = bq_dd_add(sum, bq_dd_ldexp(part[qb * splits + k], ek - e));
        }
    }
    return sum;
}

// (float)(sum 2^e / n): the mean of a scaled sum, back at its own exponent.
BQ_FN float bq_scaled_mean(bq_dd sum, int e, ulong n) {
    return e == BQ_NO_EXP ? 0.0f : ldexp(bq_dd_div(sum, n), e);
}

// Mirrors bq_abs_partial (scales/cuda.rs): partial |x| statistics of chunk (bid % splits) of
// block (bid / splits); the sums of |x| (and of x when `centered`) are of the values times
// 2^-pexp (see the file docs).
kernel void bq_abs_partial(device const float* x [[buffer(0)]],
                           constant ulong& block [[buffer(1)]],
                           constant uint& splits [[buffer(2)]],
                           constant ulong& chunk [[buffer(3)]],
                           constant uint& centered [[buffer(4)]],
                           device bq_dd* psum [[buffer(5)]],
                           device bq_dd* psigned [[buffer(6)]],
                           device int* pexp [[buffer(7)]],
                           device float* pmax [[buffer(8)]],
                           device atomic_uint* nonfinite [[buffer(9)]],
                           BQ_THREAD_IDS) {
    threadgroup bq_dd shd[256];
    threadgroup float shf[256];
    threadgroup uint shu[256];
    ulong qb = bid / splits, k = bid % splits;
    ulong lo = k * chunk, hi = lo + chunk < block ? lo + chunk : block;
    device const float* xb = x + qb * block;
    float mx = 0.0f;
    uint bad = 0;
    for (ulong i = lo + tid; i < hi; i += bdim) {
        float a = fabs(xb[i]);
        mx = bq_fmax(mx, a);
        // NaN fails the first test, infinity the second.
        bad += (a == a && a <= 3.402823466e38f) ? 0u : 1u;
    }
    mx = bq_block_max(mx, shf, tid, bdim);
    bad = bq_block_sum<uint>(bad, shu, tid, bdim);
    int e = bq_exponent(mx);
    int down = e == BQ_NO_EXP ? 0 : -e;
    bq_dd acc = bq_dd(0.0f);
    for (ulong i = lo + tid; i < hi; i += bdim) {
        acc = bq_dd_add(acc, bq_dd(ldexp(fabs(xb[i]), down), 0.0f));
    }
    acc = bq_block_sum<bq_dd>(acc, shd, tid, bdim);
    // `centered` is the same for the whole threadgroup, so every thread reaches the barriers.
    if (centered != 0u) {
        bq_dd sacc = bq_dd(0.0f);
        for (ulong i = lo + tid; i < hi; i += bdim) {
            sacc = bq_dd_add(sacc, bq_dd(ldexp(xb[i], down), 0.0f));
        }
        sacc = bq_block_sum<bq_dd>(sacc, shd, tid, bdim);
        if (tid == 0) {
            psigned[bid] = sacc;
        }
    }
    if (tid == 0) {
        psum[bid] = acc;
        pexp[bid] = e;
        pmax[bid] = mx;
        if (bad > 0u) {
            atomic_fetch_add_explicit(nonfinite, bad, memory_order_relaxed);
        }
    }
}

// Mirrors bq_finish (scales/cuda.rs): Kind::params from the partials, one thread per block.
// Scaled threshold kinds get their threshold in aux here and their scale from bq_above_finish.
kernel void bq_finish(device const bq_dd* psum [[buffer(0)]],
                      device const bq_dd* psigned [[buffer(1)]],
                      device const int* pexp [[buffer(2)]],
                      device const float* pmax [[buffer(3)]],
                      constant uint& splits [[buffer(4)]],
                      constant ulong& block [[buffer(5)]],
                      constant ulong& blocks [[buffer(6)]],
                      constant uint& kind [[buffer(7)]],
                      constant float& fixed [[buffer(8)]],
                      constant float& qmax [[buffer(9)]],
                      device float* params [[buffer(10)]],
                      BQ_THREAD_IDS) {
    ulong qb = ulong(bid) * bdim + tid;
    if (qb >= blocks) {
        return;
    }
    float mx = 0.0f;
    for (uint k = 0; k < splits; ++k) {
        mx = bq_fmax(mx, pmax[qb * splits + k]);
    }
    int e = bq_block_exponent(pexp, qb, splits);
    float mean = bq_scaled_mean(bq_block_total(psum, pexp, qb, splits, e), e, block);
    float s = 0.0f, aux = 0.0f;
    if (kind == 0u) {
        s = 1.0f;
    } else if (kind <= 2u) {
        s = mean;
    } else if (kind <= 6u) {
        s = (kind == 3u || kind == 5u) ? 1.0f : 0.0f;
        aux = kind <= 4u ? fixed : 0.7f * mean;
    } else if (kind == 8u) {
        s = mean;
        aux = bq_scaled_mean(bq_block_total(psigned, pexp, qb, splits, e), e, block);
    } else if (kind == 9u) {
        aux = 1.0f / bq_fmax(mean, BQ_EPS);
        s = 1.0f / aux;
    } else {
        float m = bq_fmax(mx, BQ_EPS);
        s = m / qmax;
        aux = m;
    }
    params[2 * qb] = s;
    params[2 * qb + 1] = aux;
}

// Mirrors bq_above_partial (scales/cuda.rs): partial sum and count of |x| over the values above
// the block's threshold (params' aux), scaled by the chunk's 2^-pexp from bq_abs_partial (the
// values above the threshold are at most the chunk's maximum).
kernel void bq_above_partial(device const float* x [[buffer(0)]],
                             constant ulong& block [[buffer(1)]],
                             constant uint& splits [[buffer(2)]],
                             constant ulong& chunk [[buffer(3)]],
                             device const float* params [[buffer(4)]],
                             device const int* pexp [[buffer(5)]],
                             device bq_dd* psum [[buffer(6)]],
                             device uint* pcount [[buffer(7)]],
                             BQ_THREAD_IDS) {
    threadgroup bq_dd shd[256];
    threadgroup uint shu[256];
    ulong qb = bid / splits, k = bid % splits;
    ulong lo = k * chunk, hi = lo + chunk < block ? lo + chunk : block;
    device const float* xb = x + qb * block;
    float d = params[2 * qb + 1];
    int e = pexp[bid];
    int down = e == BQ_NO_EXP ? 0 : -e;
    bq_dd acc = bq_dd(0.0f);
    uint c = 0;
    for (ulong i = lo + tid; i < hi; i += bdim) {
        float a = fabs(xb[i]);
        if (a > d) {
            acc = bq_dd_add(acc, bq_dd(ldexp(a, down), 0.0f));
            c += 1u;
        }
    }
    acc = bq_block_sum<bq_dd>(acc, shd, tid, bdim);
    c = bq_block_sum<uint>(c, shu, tid, bdim);
    if (tid == 0) {
        psum[bid] = acc;
        pcount[bid] = c;
    }
}

// Mirrors bq_above_finish (scales/cuda.rs): the scale of scaled threshold kinds, the mean of |x|
// above the threshold, 0 when none is.
kernel void bq_above_finish(device const bq_dd* psum [[buffer(0)]],
                            device const uint* pcount [[buffer(1)]],
                            device const int* pexp [[buffer(2)]],
                            constant uint& splits [[buffer(3)]],
                            constant ulong& blocks [[buffer(4)]],
                            device float* params [[buffer(5)]],
                            BQ_THREAD_IDS) {
    ulong qb = ulong(bid) * bdim + tid;
    if (qb >= blocks) {
        return;
    }
    ulong c = 0;
    for (uint k = 0; k < splits; ++k) {
        c += pcount[qb * splits + k];
    }
    int e = bq_block_exponent(pexp, qb, splits);
    bq_dd sum = bq_block_total(psum, pexp, qb, splits, e);
    params[2 * qb] = c > 0 ? bq_scaled_mean(sum, e, c) : 0.0f;
}
"#;

const MODULE: &str = "bitnet_quant_scales";

/// `[blocks, 2]` parameters of the values in `s`/`l`, in blocks of `block` values. Non-finite
/// input is counted on the GPU and reported as [`QuantError::NonFinite`] after one small copy of
/// the count to the host, as the CUDA and CPU kernels do.
pub(crate) fn block_params(
    op: &'static str,
    kind: Kind,
    s: &MetalStorage,
    l: &Layout,
    block: usize,
) -> Result<MetalStorage> {
    let dev = s.device();
    let mut tmp = None;
    let x = f32_view(op, s, l, &mut tmp)?;
    let n = l.shape().elem_count();
    let blocks = n / block;
    let (nsplit, chunk, threads) = splits(blocks, block);
    let grid = blocks * nsplit;
    let (code, fixed, qmax) = kind.device_code();
    let (block_u, chunk_u, blocks_u, nsplit_u) =
        (block as u64, chunk as u64, blocks as u64, nsplit as u32);

    // Every element of these is written by the kernels before it is read; a double-float partial
    // is two f32, an exponent one i32 (a u32 buffer of the same size). The signed partials are
    // written and read only for the centered kind.
    let centered = kind.needs_mean() as u32;
    let psum = f32_buffer(dev, 2 * grid, "bq_psum")?;
    let psigned = f32_buffer(dev, if centered != 0 { 2 * grid } else { 2 }, "bq_psigned")?;
    let pexp = dev.new_buffer(grid, DType::U32, "bq_pexp")?;
    let pmax = f32_buffer(dev, grid, "bq_pmax")?;
    let params = f32_buffer(dev, 2 * blocks, "bq_params")?;
    let nonfinite = zeroed_counter(dev)?;
    let abs_partial = pipeline(dev, MODULE, SRC, "bq_abs_partial")?;
    let finish = pipeline(dev, MODULE, SRC, "bq_finish")?;
    let above = if kind.needs_above_pass() {
        Some((
            pipeline(dev, MODULE, SRC, "bq_above_partial")?,
            pipeline(dev, MODULE, SRC, "bq_above_finish")?,
            dev.new_buffer(grid, DType::U32, "bq_pcount")?,
        ))
    } else {
        None
    };
    let fin_groups = blocks.div_ceil(128);

    {
        let encoder = dev.command_encoder()?;
        let enc: &ComputeCommandEncoder = encoder.as_ref();

        encode(enc, &abs_partial, grid, threads, |enc| {
            set_params!(
                enc,
                (
                    Input::from_buffer_offset(&x),
                    block_u,
                    nsplit_u,
                    chunk_u,
                    centered,
                    Output::new(&psum),
                    Output::new(&psigned),
                    Output::new(&pexp),
                    Output::new(&pmax),
                    Output::new(&nonfinite)
                )
            );
        });

        encode(enc, &finish, fin_groups, 128, |enc| {
            set_params!(
                enc,
                (
                    Input::new(&psum),
                    Input::new(&psigned),
                    Input::new(&pexp),
                    Input::new(&pmax),
                    nsplit_u,
                    block_u,
                    blocks_u,
                    code,
                    fixed,
                    qmax,
                    Output::new(&params)
                )
            );
        });

        if let Some((above_partial, above_finish, pcount)) = &above {
            encode(enc, above_partial, grid, threads, |enc| {
                set_params!(
                    enc,
                    (
                        Input::from_buffer_offset(&x),
                        block_u,
                        nsplit_u,
                        chunk_u,
                        Input::new(&params),
                        Input::new(&pexp),
                        Output::new(&psum),
                        Output::new(pcount)
                    )
                );
            });

            encode(enc, above_finish, fin_groups, 128, |enc| {
                set_params!(
                    enc,
                    (
                        Input::new(&psum),
                        Input::new(pcount),
                        Input::new(&pexp),
                        nsplit_u,
                        blocks_u,
                        Output::new(&params)
                    )
                );
            });
        }
    }

    let count = read_counter(dev, nonfinite)? as usize;
    if count > 0 {
        return Err(QuantError::NonFinite { op, count }.into());
    }
    Ok(wrap(params, dev, 2 * blocks))
}
