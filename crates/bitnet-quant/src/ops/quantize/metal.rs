//! Metal kernels of the quantize op, ported from `cuda.rs`: forward map and estimator backward,
//! one thread per value in a grid-stride loop, each value's block parameters read from `params`.

use crate::ops::math::{EstKind, Kind};
use crate::ops::metal_util::{f32_view, run_elementwise};
use candle_core::backend::BackendStorage;
use candle_core::{Layout, MetalStorage, Result};
use candle_metal_kernels::set_params;
use candle_metal_kernels::utils::Input;
use candle_metal_kernels::Output;

const SRC: &str = r#"
// Mirrors bq_quantize_fwd (quantize/cuda.rs).
kernel void bq_quantize_fwd(device const float* x [[buffer(0)]],
                            device const float* params [[buffer(1)]],
                            device float* out [[buffer(2)]],
                            constant ulong& n [[buffer(3)]],
                            constant ulong& block [[buffer(4)]],
                            constant uint& kind [[buffer(5)]],
                            constant float& qmax [[buffer(6)]],
                            constant float& lambda [[buffer(7)]],
                            BQ_THREAD_IDS) {
    for (ulong i = ulong(bid) * bdim + tid; i < n; i += ulong(gdim) * bdim) {
        ulong b = bq_div(i, block);
        float v = x[i];
        out[i] = bq_blend(v, bq_quantize(kind, qmax, v, params[2 * b], params[2 * b + 1]), lambda);
    }
}

// Mirrors bq_quantize_bwd (quantize/cuda.rs).
kernel void bq_quantize_bwd(device const float* x [[buffer(0)]],
                            device const float* params [[buffer(1)]],
                            device const float* u [[buffer(2)]],
                            device float* out [[buffer(3)]],
                            constant ulong& n [[buffer(4)]],
                            constant ulong& block [[buffer(5)]],
                            constant uint& kind [[buffer(6)]],
                            constant uint& est [[buffer(7)]],
                            constant float& p [[buffer(8)]],
                            constant float& lambda [[buffer(9)]],
                            BQ_THREAD_IDS) {
    for (ulong i = ulong(bid) * bdim + tid; i < n; i += ulong(gdim) * bdim) {
        ulong b = bq_div(i, block);
        float s = params[2 * b], aux = params[2 * b + 1];
        float inv_n = 1.0f / bq_normalizer(kind, s, aux);
        float r = (x[i] - bq_center(kind, aux)) * inv_n;
        out[i] = u[i] * ((1.0f - lambda) + lambda * bq_derivative(est, p, r));
    }
}
"#;

const MODULE: &str = "bitnet_quant_quantize";

/// `blend(x, q(x), lambda)` for every value.
pub(crate) fn forward(
    op: &'static str,
    kind: Kind,
    (sx, lx): (&MetalStorage, &Layout),
    (sp, lp): (&MetalStorage, &Layout),
    block: usize,
    lambda: f32,
) -> Result<MetalStorage> {
    let dev = sx.device();
    let (mut tx, mut tp) = (None, None);
    let x = f32_view(op, sx, lx, &mut tx)?;
    let p = f32_view(op, sp, lp, &mut tp)?;
    let n = lx.shape().elem_count();
    let (code, _, qmax) = kind.device_code();
    let (n_u, block_u) = (n as u64, block as u64);
    run_elementwise(dev, (MODULE, SRC, "bq_quantize_fwd"), n, |enc, out| {
        set_params!(
            enc,
            (
                Input::from_buffer_offset(&x),
                Input::from_buffer_offset(&p),
                Output::new(out),
                n_u,
                block_u,
                code,
                qmax,
                lambda
            )
        );
    })
}

/// `u * ((1 - lambda) + lambda * e'(x / n))` for every value.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    op: &'static str,
    kind: Kind,
    est: EstKind,
    (sx, lx): (&MetalStorage, &Layout),
    (sp, lp): (&MetalStorage, &Layout),
    (su, lu): (&MetalStorage, &Layout),
    block: usize,
    lambda: f32,
) -> Result<MetalStorage> {
    let dev = sx.device();
    let (mut tx, mut tp, mut tu) = (None, None, None);
    let x = f32_view(op, sx, lx, &mut tx)?;
    let p = f32_view(op, sp, lp, &mut tp)?;
    let u = f32_view(op, su, lu, &mut tu)?;
    let n = lx.shape().elem_count();
    let (code, _, _) = kind.device_code();
    let (est_code, est_p) = est.device_code();
    let (n_u, block_u) = (n as u64, block as u64);
    run_elementwise(dev, (MODULE, SRC, "bq_quantize_bwd"), n, |enc, out| {
        set_params!(
            enc,
            (
                Input::from_buffer_offset(&x),
                Input::from_buffer_offset(&p),
                Input::from_buffer_offset(&u),
                Output::new(out),
                n_u,
                block_u,
                code,
                est_code,
                est_p,
                lambda
            )
        );
    })
}
