//! Metal kernels of the block parameters, ported from `cuda.rs`: the same two passes (`sum|x|`,
//! `max|x|`, then for scaled threshold kinds the mean of `|x|` above the threshold), each a
//! partial reduction per chunk of a block followed by a fixed-order reduction of the chunks.
//!
//! CUDA's f64 sums are double-float pairs here (Metal has no `double`; see `metal_util.rs`), so a
//! mean can differ from the CPU's in its last bits, as CUDA's; maxima are exact. A pair cannot
//! exceed `f32::MAX`: a block whose `sum|x|` overflows is reported as non-finite, as the CPU does
//! when one of its f32 lane sums overflows (CUDA's f64 would still give a finite mean there).

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
// Mirrors bq_abs_partial (scales/cuda.rs): partial |x| statistics of chunk (bid % splits) of
// block (bid / splits).
kernel void bq_abs_partial(device const float* x [[buffer(0)]],
                           constant ulong& block [[buffer(1)]],
                           constant uint& splits [[buffer(2)]],
                           constant ulong& chunk [[buffer(3)]],
                           device bq_dd* psum [[buffer(4)]],
                           device float* pmax [[buffer(5)]],
                           device atomic_uint* nonfinite [[buffer(6)]],
                           BQ_THREAD_IDS) {
    threadgroup bq_dd shd[256];
    threadgroup float shf[256];
    threadgroup uint shu[256];
    ulong qb = bid / splits, k = bid % splits;
    ulong lo = k * chunk, hi = lo + chunk < block ? lo + chunk : block;
    device const float* xb = x + qb * block;
    bq_dd acc = bq_dd(0.0f);
    float mx = 0.0f;
    uint bad = 0;
    for (ulong i = lo + tid; i < hi; i += bdim) {
        float a = fabs(xb[i]);
        acc = bq_dd_add(acc, bq_dd(a, 0.0f));
        mx = bq_fmax(mx, a);
        // NaN fails the first test, infinity the second.
        bad += (a == a && a <= 3.402823466e38f) ? 0u : 1u;
    }
    acc = bq_block_sum<bq_dd>(acc, shd, tid, bdim);
    mx = bq_block_max(mx, shf, tid, bdim);
    bad = bq_block_sum<uint>(bad, shu, tid, bdim);
    if (tid == 0) {
        psum[bid] = acc;
        pmax[bid] = mx;
        if (bad > 0u) {
            atomic_fetch_add_explicit(nonfinite, bad, memory_order_relaxed);
        }
    }
}

// Mirrors bq_finish (scales/cuda.rs): Kind::params from the partials, one thread per block.
// Scaled threshold kinds get their threshold in aux here and their scale from bq_above_finish.
// A sum that overflowed f32 from finite values counts as one non-finite value (see the file
// docs); a NaN or infinite input was already counted by bq_abs_partial.
kernel void bq_finish(device const bq_dd* psum [[buffer(0)]],
                      device const float* pmax [[buffer(1)]],
                      constant uint& splits [[buffer(2)]],
                      constant ulong& block [[buffer(3)]],
                      constant ulong& blocks [[buffer(4)]],
                      constant uint& kind [[buffer(5)]],
                      constant float& fixed [[buffer(6)]],
                      constant float& qmax [[buffer(7)]],
                      device float* params [[buffer(8)]],
                      device atomic_uint* nonfinite [[buffer(9)]],
                      BQ_THREAD_IDS) {
    ulong qb = ulong(bid) * bdim + tid;
    if (qb >= blocks) {
        return;
    }
    bq_dd sum = bq_dd(0.0f);
    float mx = 0.0f;
    for (uint k = 0; k < splits; ++k) {
        sum = bq_dd_add(sum, psum[qb * splits + k]);
        mx = bq_fmax(mx, pmax[qb * splits + k]);
    }
    if (isinf(sum.x) && isfinite(mx)) {
        atomic_fetch_add_explicit(nonfinite, 1u, memory_order_relaxed);
    }
    float mean = bq_dd_div(sum, block);
    float s = 0.0f, aux = 0.0f;
    if (kind == 0u) {
        s = 1.0f;
    } else if (kind <= 2u) {
        s = mean;
    } else if (kind <= 6u) {
        s = (kind == 3u || kind == 5u) ? 1.0f : 0.0f;
        aux = kind <= 4u ? fixed : 0.7f * mean;
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
// the block's threshold (params' aux).
kernel void bq_above_partial(device const float* x [[buffer(0)]],
                             constant ulong& block [[buffer(1)]],
                             constant uint& splits [[buffer(2)]],
                             constant ulong& chunk [[buffer(3)]],
                             device const float* params [[buffer(4)]],
                             device bq_dd* psum [[buffer(5)]],
                             device uint* pcount [[buffer(6)]],
                             BQ_THREAD_IDS) {
    threadgroup bq_dd shd[256];
    threadgroup uint shu[256];
    ulong qb = bid / splits, k = bid % splits;
    ulong lo = k * chunk, hi = lo + chunk < block ? lo + chunk : block;
    device const float* xb = x + qb * block;
    float d = params[2 * qb + 1];
    bq_dd acc = bq_dd(0.0f);
    uint c = 0;
    for (ulong i = lo + tid; i < hi; i += bdim) {
        float a = fabs(xb[i]);
        if (a > d) {
            acc = bq_dd_add(acc, bq_dd(a, 0.0f));
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
                            constant uint& splits [[buffer(2)]],
                            constant ulong& blocks [[buffer(3)]],
                            device float* params [[buffer(4)]],
                            BQ_THREAD_IDS) {
    ulong qb = ulong(bid) * bdim + tid;
    if (qb >= blocks) {
        return;
    }
    bq_dd sum = bq_dd(0.0f);
    ulong c = 0;
    for (uint k = 0; k < splits; ++k) {
        sum = bq_dd_add(sum, psum[qb * splits + k]);
        c += pcount[qb * splits + k];
    }
    params[2 * qb] = c > 0 ? bq_dd_div(sum, c) : 0.0f;
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
    // is two f32.
    let psum = f32_buffer(dev, 2 * grid, "bq_psum")?;
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
                    Output::new(&psum),
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
                    Input::new(&pmax),
                    nsplit_u,
                    block_u,
                    blocks_u,
                    code,
                    fixed,
                    qmax,
                    Output::new(&params),
                    Output::new(&nonfinite)
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
