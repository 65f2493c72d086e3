//! Metal kernels of the learnable-temperature surrogate, ported from `cuda.rs`. `t` is read on the
//! GPU from its one-value tensor (no host round trip); `dL/dt` is a grid-stride partial sum per
//! threadgroup (a double-float pair where CUDA has f64, see `metal_util.rs`) plus a second kernel
//! that adds the partials in a fixed order, so the result is deterministic.

use super::Surrogate;
use crate::ops::metal_util::{
    encode, f32_buffer, f32_view, pipeline, run_elementwise, stride_groups, wrap, THREADS,
};
use candle_core::backend::BackendStorage;
use candle_core::{Layout, MetalStorage, Result};
use candle_metal_kernels::metal::ComputeCommandEncoder;
use candle_metal_kernels::set_params;
use candle_metal_kernels::utils::Input;
use candle_metal_kernels::Output;

/// `Surrogate::{value, dx, dt}` transcribed; kind codes as `Kind::device_code` (0..=6 and 8),
/// estimator codes as `EstKind::device_code`.
const SRC: &str = r#"
// Mirrors bq_parts_t / bq_parts (learnable/cuda.rs).
struct bq_parts_t {
    float r;
    float d;
    bool ternary;
};

BQ_FN bq_parts_t bq_parts(uint kind, float x, float s, float aux) {
    float n = bq_normalizer(kind, s, aux);
    bq_parts_t p;
    p.ternary = kind >= 2u && kind <= 6u;
    p.d = kind == 2u ? 0.5f : aux / n;
    p.r = (x - bq_center(kind, aux)) / n;
    return p;
}

// Mirrors bq_sech2 (learnable/cuda.rs).
BQ_FN float bq_sech2(float z) {
    float th = precise::tanh(z);
    return 1.0f - th * th;
}

// Mirrors bq_value (learnable/cuda.rs).
BQ_FN float bq_value(uint kind, float h, float x, float s, float aux, float t) {
    bq_parts_t p = bq_parts(kind, x, s, aux);
    float soft = !p.ternary ? precise::tanh(t * p.r)
                            : 0.5f * (precise::tanh(t * (p.r - p.d)) + precise::tanh(t * (p.r + p.d)));
    if (h == 0.0f) {
        return s * soft;
    }
    return (1.0f - h) * s * soft + h * bq_quantize(kind, 0.0f, x, s, aux);
}

// Mirrors bq_dx (learnable/cuda.rs).
BQ_FN float bq_dx(uint kind, float h, uint est, float ep, float x, float s, float aux, float t) {
    float n = bq_normalizer(kind, s, aux);
    bq_parts_t p = bq_parts(kind, x, s, aux);
    float ds = !p.ternary ? t * bq_sech2(t * p.r)
                          : 0.5f * t * (bq_sech2(t * (p.r - p.d)) + bq_sech2(t * (p.r + p.d)));
    if (h == 0.0f) {
        return s / n * ds;
    }
    return (1.0f - h) * (s / n * ds) + h * bq_derivative(est, ep, p.r);
}

// Mirrors bq_dt (learnable/cuda.rs).
BQ_FN float bq_dt(uint kind, float h, float x, float s, float aux, float t) {
    bq_parts_t p = bq_parts(kind, x, s, aux);
    float r = p.r, d = p.d;
    float ds = !p.ternary ? r * bq_sech2(t * r)
                          : 0.5f * ((r - d) * bq_sech2(t * (r - d)) + (r + d) * bq_sech2(t * (r + d)));
    if (h == 0.0f) {
        return s * ds;
    }
    return (1.0f - h) * (s * ds);
}

// Mirrors bq_learnable_fwd (learnable/cuda.rs).
kernel void bq_learnable_fwd(device const float* x [[buffer(0)]],
                             device const float* tp [[buffer(1)]],
                             device const float* params [[buffer(2)]],
                             device float* out [[buffer(3)]],
                             constant ulong& n [[buffer(4)]],
                             constant ulong& block [[buffer(5)]],
                             constant uint& kind [[buffer(6)]],
                             constant float& h [[buffer(7)]],
                             BQ_THREAD_IDS) {
    float t = tp[0];
    for (ulong i = ulong(bid) * bdim + tid; i < n; i += ulong(gdim) * bdim) {
        ulong b = bq_div(i, block);
        out[i] = bq_value(kind, h, x[i], params[2 * b], params[2 * b + 1], t);
    }
}

// Mirrors bq_learnable_bwd (learnable/cuda.rs). rest = [params (2 per block) ..., upstream (n)
// ...]; out = [dL/dx (n) ..., dL/dt]; partial sums of dL/dt per threadgroup go to partial.
kernel void bq_learnable_bwd(device const float* x [[buffer(0)]],
                             device const float* tp [[buffer(1)]],
                             device const float* rest [[buffer(2)]],
                             device float* out [[buffer(3)]],
                             device bq_dd* partial [[buffer(4)]],
                             constant ulong& n [[buffer(5)]],
                             constant ulong& block [[buffer(6)]],
                             constant uint& kind [[buffer(7)]],
                             constant float& h [[buffer(8)]],
                             constant uint& est [[buffer(9)]],
                             constant float& ep [[buffer(10)]],
                             BQ_THREAD_IDS) {
    threadgroup bq_dd shd[256];
    float t = tp[0];
    device const float* params = rest;
    device const float* u = rest + 2 * bq_div(n, block);
    bq_dd acc = bq_dd(0.0f);
    for (ulong i = ulong(bid) * bdim + tid; i < n; i += ulong(gdim) * bdim) {
        ulong b = bq_div(i, block);
        float s = params[2 * b], aux = params[2 * b + 1];
        out[i] = u[i] * bq_dx(kind, h, est, ep, x[i], s, aux, t);
        acc = bq_dd_add(acc, bq_dd(u[i] * bq_dt(kind, h, x[i], s, aux, t), 0.0f));
    }
    acc = bq_block_sum<bq_dd>(acc, shd, tid, bdim);
    if (tid == 0) {
        partial[bid] = acc;
    }
}

// Mirrors bq_learnable_dt (learnable/cuda.rs): one threadgroup, out[n] = the sum of the partials.
kernel void bq_learnable_dt(device const bq_dd* partial [[buffer(0)]],
                            constant uint& count [[buffer(1)]],
                            device float* out [[buffer(2)]],
                            constant ulong& n [[buffer(3)]],
                            BQ_THREAD_IDS) {
    threadgroup bq_dd shd[256];
    bq_dd acc = bq_dd(0.0f);
    for (uint i = tid; i < count; i += bdim) {
        acc = bq_dd_add(acc, partial[i]);
    }
    acc = bq_block_sum<bq_dd>(acc, shd, tid, bdim);
    if (tid == 0) {
        out[n] = bq_dd_float(acc);
    }
}
"#;

const MODULE: &str = "bitnet_quant_learnable";

/// `(1 - h) s soft(x / n) + h q(x)` for every value.
pub(crate) fn forward(
    op: &'static str,
    sur: &Surrogate,
    (sx, lx): (&MetalStorage, &Layout),
    (st, lt): (&MetalStorage, &Layout),
    (sp, lp): (&MetalStorage, &Layout),
    block: usize,
) -> Result<MetalStorage> {
    let dev = sx.device();
    let (mut tx, mut tt, mut tp) = (None, None, None);
    let x = f32_view(op, sx, lx, &mut tx)?;
    let t = f32_view(op, st, lt, &mut tt)?;
    let p = f32_view(op, sp, lp, &mut tp)?;
    let n = lx.shape().elem_count();
    let (code, _, _) = sur.kind.device_code();
    let (n_u, block_u) = (n as u64, block as u64);
    run_elementwise(dev, (MODULE, SRC, "bq_learnable_fwd"), n, |enc, out| {
        set_params!(
            enc,
            (
                Input::from_buffer_offset(&x),
                Input::from_buffer_offset(&t),
                Input::from_buffer_offset(&p),
                Output::new(out),
                n_u,
                block_u,
                code,
                sur.hardness
            )
        );
    })
}

/// `[dL/dx (one per value) ..., dL/dt]`; `rest` holds the parameters then the upstream gradient.
pub(crate) fn backward(
    op: &'static str,
    sur: &Surrogate,
    (sx, lx): (&MetalStorage, &Layout),
    (st, lt): (&MetalStorage, &Layout),
    (sr, lr): (&MetalStorage, &Layout),
    block: usize,
) -> Result<MetalStorage> {
    let dev = sx.device();
    let (mut tx, mut tt, mut tr) = (None, None, None);
    let x = f32_view(op, sx, lx, &mut tx)?;
    let t = f32_view(op, st, lt, &mut tt)?;
    let rest = f32_view(op, sr, lr, &mut tr)?;
    let n = lx.shape().elem_count();
    let (code, _, _) = sur.kind.device_code();
    let (est, ep) = sur.estimator.device_code();
    let (n_u, block_u) = (n as u64, block as u64);
    let grid = stride_groups(n);
    let grid_u = grid as u32;
    // The first kernel writes out[..n] and every partial (a double-float pair, two f32), the
    // second out[n].
    let out = f32_buffer(dev, n + 1, "bq_learnable_bwd")?;
    let partial = f32_buffer(dev, 2 * grid, "bq_learnable_partial")?;
    let bwd = pipeline(dev, MODULE, SRC, "bq_learnable_bwd")?;
    let dt = pipeline(dev, MODULE, SRC, "bq_learnable_dt")?;

    let encoder = dev.command_encoder()?;
    let enc: &ComputeCommandEncoder = encoder.as_ref();
    encode(enc, &bwd, grid, THREADS, |enc| {
        set_params!(
            enc,
            (
                Input::from_buffer_offset(&x),
                Input::from_buffer_offset(&t),
                Input::from_buffer_offset(&rest),
                Output::new(&out),
                Output::new(&partial),
                n_u,
                block_u,
                code,
                sur.hardness,
                est,
                ep
            )
        );
    });
    encode(enc, &dt, 1, THREADS, |enc| {
        set_params!(enc, (Input::new(&partial), grid_u, Output::new(&out), n_u));
    });
    Ok(wrap(out, dev, n + 1))
}
