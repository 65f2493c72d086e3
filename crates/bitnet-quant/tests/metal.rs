//! Every op's Metal kernel against its CPU kernel (the reference), forward and backward: the
//! checks of `gpu_common` (see there for the tolerances), with the backward ops also on
//! non-contiguous inputs, plus the CPU's errors for bad dtypes and shapes.
//!
//! `test_device!` runs each check on the CPU too, where it compares the CPU kernel with itself:
//! that keeps the checks' own logic tested on machines without a Mac. These tests type-check on
//! Linux (`cargo check --target aarch64-apple-darwin --features metal --all-targets`) but have
//! not yet run on Apple hardware; the scales kernels' float operations are emulated on the host
//! by the unit tests of `src/ops/scales/metal_emulation.rs`.

#![cfg(feature = "metal")]

mod gpu_common;

use bitnet_quant::ops::learnable::{LearnableOp, Surrogate};
use bitnet_quant::ops::lsq::LsqOp;
use bitnet_quant::ops::quantize::{QuantizeGradOp, QuantizeOp};
use bitnet_quant::ops::scales::{scales, ScalesOp};
use bitnet_quant::ops::{EstKind, Kind};
use bitnet_quant::{Granularity, Scheme};
use candle_core::{test_device, DType, Device, Result, Tensor};
use gpu_common::{
    autograd, bad_temperature, learnable, lsq, non_finite, overflow, quantize_backward,
    scales_and_forward, values,
};

/// The backward ops also get transposed (non-contiguous) inputs: each Metal kernel gathers them
/// through its own strided copy (`metal_util::f32_view`), which these checks cover.
const BACKWARD_TRANSPOSED: bool = true;

/// The error of `f` on the CPU and on `dev`, which must be the same message. Only the first
/// line: with `RUST_BACKTRACE` set, candle appends each call's own backtrace.
fn same_error(what: &str, dev: &Device, f: impl Fn(&Device) -> Result<Tensor>) -> Result<()> {
    let first_line = |e: candle_core::Error| e.to_string().lines().next().map(str::to_owned);
    let want = first_line(f(&Device::Cpu).expect_err(what));
    let got = first_line(f(dev).expect_err(what));
    assert!(want.is_some(), "{what}: an empty error message");
    assert_eq!(got, want, "{what}");
    Ok(())
}

/// Bad dtypes and shapes get the CPU's errors on the device.
fn errors(dev: &Device) -> Result<()> {
    let x = |d: &Device| Tensor::from_vec(values(6 * 64, 10), (6, 64), d);
    let kind = Kind::of(&Scheme::TernaryAbsmean);
    let g = Granularity::PerChannel;
    let quant = QuantizeOp {
        kind,
        estimator: EstKind::Clipped(1.0),
        granularity: g,
        lambda: 1.0,
    };
    same_error("f16 input", dev, |d| {
        x(d)?.to_dtype(DType::F16)?.apply_op1_no_bwd(&ScalesOp {
            kind,
            granularity: g,
        })
    })?;
    same_error("params of another shape", dev, |d| {
        let p = Tensor::zeros((5, 2), DType::F32, d)?;
        x(d)?.apply_op2_no_bwd(&p, &quant)
    })?;
    same_error("f16 params", dev, |d| {
        let x = x(d)?;
        let p = scales(&x, kind, g)?.to_dtype(DType::F16)?;
        x.apply_op2_no_bwd(&p, &quant)
    })?;
    same_error("upstream of another shape", dev, |d| {
        let x = x(d)?;
        let p = scales(&x, kind, g)?;
        let u = Tensor::ones((64, 6), DType::F32, d)?;
        x.apply_op3_no_bwd(&p, &u, &QuantizeGradOp(quant))
    })?;
    same_error("two temperatures", dev, |d| {
        let x = x(d)?;
        let p = scales(&x, kind, g)?;
        let t = Tensor::new(&[1f32, 2.0], d)?;
        let op = LearnableOp {
            surrogate: Surrogate::new(kind, 0.0)?,
            granularity: g,
        };
        x.apply_op3_no_bwd(&t, &p, &op)
    })?;
    same_error("wrong number of steps", dev, |d| {
        let op = LsqOp::new(4, g)?;
        let s = Tensor::ones(5, DType::F32, d)?;
        x(d)?.apply_op2_no_bwd(&s, &op)
    })?;
    Ok(())
}

test_device!(
    scales_and_forward,
    scales_and_forward_cpu,
    scales_and_forward_cuda,
    scales_and_forward_metal
);
test_device!(
    quantize_backward,
    quantize_backward_cpu,
    quantize_backward_cuda,
    quantize_backward_metal
);
test_device!(learnable, learnable_cpu, learnable_cuda, learnable_metal);
test_device!(lsq, lsq_cpu, lsq_cuda, lsq_metal);
test_device!(autograd, autograd_cpu, autograd_cuda, autograd_metal);
test_device!(
    non_finite,
    non_finite_cpu,
    non_finite_cuda,
    non_finite_metal
);
test_device!(overflow, overflow_cpu, overflow_cuda, overflow_metal);
test_device!(
    bad_temperature,
    bad_temperature_cpu,
    bad_temperature_cuda,
    bad_temperature_metal
);
test_device!(errors, errors_cpu, errors_cuda, errors_metal);
