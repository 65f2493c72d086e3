//! Every op's CUDA kernel against its CPU kernel (the reference), forward and backward: the checks
//! of `gpu_common` (see there for the tolerances), plus the packed layer, which only CUDA has.
//!
//! `test_device!` runs each check on the CPU too, where it compares the CPU kernel with itself:
//! that keeps the checks' own logic tested on machines without a GPU.
//!
//! The packed layer ([`PackedBitLinear`] moved with `to_device`) is checked to 1e-6 relative, no
//! absolute term. The kernels reproduce the CPU path's float operations in its order (the norm's
//! 8-lane sum of squares, `round_clamped`, one `acc += sum * scale` per segment, `acc * m / 127 +
//! bias`) and the integer sums are exact, so the outputs are expected to be bit-identical; the
//! relative bound only names the contract.

#![cfg(feature = "cuda")]

mod gpu_common;

use bitnet_quant::packed::PackedBitLinear;
use bitnet_quant::{
    check_deferred_finite, defer_finite_checks, BitLinear, BitLinearConfig, Estimator, Granularity,
    Quantizer, RmsNorm, Scheme,
};
use candle_core::{test_device, DType, Device, Module, Result, Tensor};
use gpu_common::{
    assert_close, autograd, bad_temperature, host, learnable, lsq, non_finite, overflow,
    quantize_backward, scales_and_forward, values,
};

/// The backward checks run on transposed inputs too. Read from the code (not yet run on a GPU
/// since it was turned on): every CUDA op, forward and backward (`quantize`, `learnable`, `lsq`
/// and `scales` in `src/ops/*/cuda.rs`), takes each input through `cuda_util::f32_view`, which
/// copies a non-contiguous layout to a contiguous buffer in logical row-major order with
/// candle's strided copy, and the op checks compare shapes, not strides. A transposed `x` or
/// upstream gradient therefore reaches the kernels exactly as its row-major copy does, the
/// path the transposed forward checks (`scales_and_forward`) and the broadcast upstream of
/// `autograd` already passed on the H200.
const BACKWARD_TRANSPOSED: bool = true;

/// A trained-looking layer `[out, inp]` with the weight quantizer `weight` (granularity set),
/// optional bias and norm (a non-trivial norm weight), packed on the CPU.
fn packed_layer(
    inp: usize,
    out: usize,
    weight: Quantizer,
    bias: bool,
    norm: bool,
    seed: u64,
) -> Result<PackedBitLinear> {
    let w = Tensor::from_vec(values(out * inp, seed), (out, inp), &Device::Cpu)?;
    let b = bias
        .then(|| Tensor::from_vec(values(out, seed + 1), out, &Device::Cpu))
        .transpose()?;
    let n = norm
        .then(|| -> Result<RmsNorm> {
            let nw = (Tensor::from_vec(values(inp, seed + 2), inp, &Device::Cpu)? * 5.0)? + 1.0;
            Ok(RmsNorm::from_weight(nw?, 1e-6))
        })
        .transpose()?;
    let cfg = BitLinearConfig {
        bias,
        norm,
        weight,
        ..Default::default()
    };
    PackedBitLinear::from_trained(&BitLinear::from_parts(w, b, n, cfg))
}

/// Input `[dims..]` on the CPU and on `dev`, about N(0, 1) with the generator's zeros and ties.
fn packed_input(dims: &[usize], seed: u64, dev: &Device) -> Result<(Tensor, Tensor)> {
    let n = dims.iter().product();
    let cpu = (Tensor::from_vec(values(n, seed), dims, &Device::Cpu)? * 20.0)?;
    let on_dev = cpu.to_device(dev)?;
    Ok((cpu, on_dev))
}

/// The packed layer on the device equals the CPU packed layer: ternary (2-bit) and binary
/// (1-bit) weights, every granularity (groups of one and of several 128-weight blocks), with
/// and without bias and norm; batch 1 (the GEMV kernel), 2..=4 tokens, and larger batches that
/// are not multiples of the 8-token tile (a 3-d input among them); input widths that are not
/// multiples of 128 and odd output counts.
fn packed_matmul(dev: &Device) -> Result<()> {
    // (inp, out, group): groups of one block, of a block with padding, of several blocks.
    let shapes = [
        (7usize, 5usize, 7usize),
        (130, 31, 65),
        (300, 1, 100),
        (1000, 37, 200),
        (4096, 257, 128),
        (6912, 33, 384),
    ];
    let schemes = [Scheme::TernaryAbsmean, Scheme::Binary { scaled: true }];
    let mut checked = 0;
    for (k, &(inp, out, group)) in shapes.iter().enumerate() {
        for scheme in schemes {
            for g in [
                Granularity::PerTensor,
                Granularity::PerChannel,
                Granularity::PerGroup(group),
            ] {
                for (bias, norm) in [(false, false), (true, true), (false, true)] {
                    let q = Quantizer::new(scheme, Estimator::Identity)?.with_granularity(g)?;
                    let seed = 1000 + 10 * k as u64;
                    let cpu = packed_layer(inp, out, q, bias, norm, seed)?;
                    let on_dev = cpu.to_device(dev)?;
                    assert!(on_dev.device().same_device(dev));
                    let batches: [&[usize]; 7] = [
                        &[1, inp],
                        &[inp],
                        &[2, inp],
                        &[4, inp],
                        &[5, inp],
                        &[2, 3, inp],
                        &[17, inp],
                    ];
                    for (b, dims) in batches.iter().enumerate() {
                        let (x_cpu, x_dev) = packed_input(dims, seed + b as u64, dev)?;
                        let want = cpu.forward(&x_cpu)?;
                        let got = on_dev.forward(&x_dev)?;
                        assert_eq!(got.dims(), want.dims());
                        assert!(got.device().same_device(dev));
                        let what = format!(
                            "packed {scheme:?} {g:?} [{out}, {inp}] bias={bias} norm={norm} {dims:?}"
                        );
                        assert_close(&what, &host(&got)?, &host(&want)?, 1e-6, 0.0, 0.0);
                        checked += 1;
                    }
                }
            }
        }
    }
    assert!(checked >= 700, "{checked}");

    // 129 tokens (17 tiles of 8, the last one short), a transposed (non-contiguous) input and
    // a bf16 input on the large per-group layer.
    for scheme in schemes {
        let q = Quantizer::new(scheme, Estimator::Identity)?
            .with_granularity(Granularity::PerGroup(128))?;
        let cpu = packed_layer(4096, 96, q, true, true, 77)?;
        let on_dev = cpu.to_device(dev)?;
        let (x_cpu, x_dev) = packed_input(&[129, 4096], 78, dev)?;
        let what = format!("packed {scheme:?} 129 tokens");
        let want = host(&cpu.forward(&x_cpu)?)?;
        assert_close(
            &what,
            &host(&on_dev.forward(&x_dev)?)?,
            &want,
            1e-6,
            0.0,
            0.0,
        );

        let (xt_cpu, xt_dev) = packed_input(&[4096, 6], 79, dev)?;
        let want = host(&cpu.forward(&xt_cpu.t()?)?)?;
        let got = host(&on_dev.forward(&xt_dev.t()?)?)?;
        assert_close(&format!("{what} transposed"), &got, &want, 1e-6, 0.0, 0.0);

        let (xb_cpu, xb_dev) = packed_input(&[3, 4096], 80, dev)?;
        let (xb_cpu, xb_dev) = (xb_cpu.to_dtype(DType::BF16)?, xb_dev.to_dtype(DType::BF16)?);
        let got = on_dev.forward(&xb_dev)?;
        assert_eq!(got.dtype(), DType::BF16);
        let want = host(&cpu.forward(&xb_cpu)?.to_dtype(DType::F32)?)?;
        let got = host(&got.to_dtype(DType::F32)?)?;
        assert_close(&format!("{what} bf16"), &got, &want, 1e-6, 0.0, 0.0);
    }
    Ok(())
}

/// Bad input to a layer on the device: clear errors, and the defined result of NaN input with
/// the finite check off.
fn packed_errors(dev: &Device) -> Result<()> {
    let q = Quantizer::new(Scheme::TernaryAbsmean, Estimator::Identity)?;
    let cpu = packed_layer(300, 7, q, true, true, 5)?;
    let layer = cpu.to_device(dev)?;
    let text = |e: candle_core::Error| format!("{e} {e:?}");
    let e = layer
        .forward(&Tensor::zeros((2, 299), DType::F32, dev)?)
        .unwrap_err();
    assert!(text(e).contains("last dimension 300"));
    let e = layer
        .forward(&Tensor::zeros((2, 300), DType::U8, dev)?)
        .unwrap_err();
    assert!(text(e).contains("dtype"));
    let empty = layer.forward(&Tensor::zeros((0, 300), DType::F32, dev)?)?;
    assert_eq!(empty.dims(), &[0, 7]);
    assert!(empty.device().same_device(dev));

    // Three tokens take the one-launch kernel on CUDA, nine the two-launch path.
    for tokens in [3usize, 9] {
        let (x_cpu, _) = packed_input(&[tokens, 300], 6, dev)?;
        let mut v = host(&x_cpu)?;
        v[310] = f32::NAN;
        v[tokens * 300 - 1] = f32::INFINITY;
        let bad = Tensor::from_vec(v, (tokens, 300), dev)?;
        // The count is taken after the norm: the NaN token's 300 values and the infinity.
        let checked = layer.clone().with_finite_check(true);
        let e = text(checked.forward(&bad).unwrap_err());
        assert!(e.contains("contains 301 NaN or infinite"), "{e}");
        // The default: the CPU checks, CUDA does not (no host synchronisation).
        assert_eq!(layer.finite_check(), dev.is_cpu());
        let unchecked = [layer.clone().with_finite_check(false), layer.clone()];
        for l in &unchecked[..if dev.is_cpu() { 1 } else { 2 }] {
            // The NaN and infinite tokens' outputs are NaN, the others are the CPU layer's.
            let y = host(&l.forward(&bad)?)?;
            let want = host(&cpu.forward(&x_cpu)?)?;
            let last = (tokens - 1) * 7;
            assert!(y[7..14].iter().all(|v| v.is_nan()), "{y:?}");
            assert!(y[last..].iter().all(|v| v.is_nan()), "{y:?}");
            assert_close("unchecked token 0", &y[..7], &want[..7], 1e-6, 0.0, 0.0);
            assert_close(
                "unchecked middle",
                &y[14..last],
                &want[14..last],
                1e-6,
                0.0,
                0.0,
            );
        }
    }

    let (x_cpu, _) = packed_input(&[3, 300], 6, dev)?;
    let want = host(&cpu.forward(&x_cpu)?)?;
    if !dev.is_cpu() {
        // The layer lives on the GPU: CPU input is a device mismatch, not a silent copy.
        let e = layer.forward(&x_cpu).unwrap_err();
        assert!(text(e).contains("device mismatch"));
        // Back on the CPU it takes CPU input again.
        let back = layer.to_device(&Device::Cpu)?;
        assert!(back.device().is_cpu());
        assert_close(
            "back on the CPU",
            &host(&back.forward(&x_cpu)?)?,
            &want,
            0.0,
            0.0,
            0.0,
        );
    }
    Ok(())
}

/// Inside `defer_finite_checks`, a CUDA quantizer given NaN or infinity returns without a host
/// copy and `check_deferred_finite` reports the accumulated count once (two calls with two bad
/// values each: 4), then nothing; outside, the error is immediate again. The CPU never defers.
fn deferred_finite(dev: &Device) -> Result<()> {
    let q = Quantizer::new(Scheme::TernaryAbsmean, Estimator::Identity)?;
    let mut v = values(1000 * 37, 9);
    v[5] = f32::NAN;
    v[777] = f32::INFINITY;
    let bad = Tensor::from_vec(v, (1000, 37), dev)?;
    let good = Tensor::from_vec(values(1000 * 37, 10), (1000, 37), dev)?;
    check_deferred_finite(dev)?;
    let deferred = defer_finite_checks();
    if dev.is_cpu() {
        assert!(q.quantize(&bad).is_err());
    } else {
        q.quantize(&good)?;
        q.quantize(&bad)?;
        q.quantize(&bad)?;
        let e = check_deferred_finite(dev).unwrap_err().to_string();
        assert!(e.contains("contains 4 NaN or infinite"), "{e}");
    }
    check_deferred_finite(dev)?;
    drop(deferred);
    let e = q.quantize(&bad).unwrap_err().to_string();
    assert!(e.contains("contains 2 NaN or infinite"), "{e}");
    Ok(())
}

/// The norm on `dev` against the CPU's fused op: candle's fused kernel for inference off the CPU
/// (nothing tracked), the composed ops when the weight is a `Var` (training), each to 1e-5
/// relative plus 1e-6 of the largest output (a sum of squares in another order), on a
/// contiguous and a transposed input.
fn rms_norm_devices(dev: &Device) -> Result<()> {
    let (rows, dim) = (37, 300);
    let w = values(dim, 11).iter().map(|v| 1.0 + v).collect::<Vec<_>>();
    let x = values(rows * dim, 12);
    let cpu_x = Tensor::from_vec(x.clone(), (rows, dim), &Device::Cpu)?;
    let cpu_w = Tensor::from_vec(w.clone(), dim, &Device::Cpu)?;
    let want = host(&RmsNorm::from_weight(cpu_w, 1e-5).forward(&cpu_x)?)?;
    let want_t = host(
        &RmsNorm::from_weight(Tensor::from_vec(w.clone(), dim, &Device::Cpu)?, 1e-5)
            .forward(&Tensor::from_vec(x.clone(), (dim, rows), &Device::Cpu)?.t()?)?,
    )?;
    let dx = Tensor::from_vec(x, (rows, dim), dev)?;
    let dxt = dx.reshape((dim, rows))?.t()?;
    let inference = Tensor::from_vec(w.clone(), dim, dev)?;
    let trained = candle_core::Var::from_vec(w, dim, dev)?;
    for (name, weight) in [
        ("inference", inference),
        ("training", trained.as_tensor().clone()),
    ] {
        let norm = RmsNorm::from_weight(weight, 1e-5);
        assert_close(name, &host(&norm.forward(&dx)?)?, &want, 1e-5, 1e-6, 0.0);
        assert_close(name, &host(&norm.forward(&dxt)?)?, &want_t, 1e-5, 1e-6, 0.0);
    }
    Ok(())
}

test_device!(
    rms_norm_devices,
    rms_norm_devices_cpu,
    rms_norm_devices_cuda,
    rms_norm_devices_metal
);
test_device!(
    deferred_finite,
    deferred_finite_cpu,
    deferred_finite_cuda,
    deferred_finite_metal
);
test_device!(
    packed_matmul,
    packed_matmul_cpu,
    packed_matmul_cuda,
    packed_matmul_metal
);
test_device!(
    packed_errors,
    packed_errors_cpu,
    packed_errors_cuda,
    packed_errors_metal
);
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
