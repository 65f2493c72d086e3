//! Every op's CUDA kernel against its CPU kernel (the reference), forward and backward, on odd
//! sizes, every granularity and a transposed (non-contiguous) input.
//!
//! `test_device!` runs each check on the CPU too, where it compares the CPU kernel with itself:
//! that keeps the checks' own logic tested on machines without a GPU.
//!
//! Tolerances, and why:
//! * quantized values, LSQ's forward and `dL/dx` of the piecewise estimators: exact. Both
//!   devices get the same block parameters and the kernels are compiled without fused
//!   multiply-add, so every value is computed by the same IEEE operations.
//! * block parameters from a mean (`mean|x|`, the mean above a threshold): 2e-6 relative. The CPU
//!   sums in f32 lanes of 1024 values and then f64, the GPU in f64; the sums differ in their last
//!   f32 bits. Parameters from a maximum or a constant are exact.
//! * values that go through `tanh`, `exp` or `cosh`: 1e-6 relative plus 2e-6 of the largest
//!   magnitude. CUDA's `tanhf`/`expf`/`coshf` are within 2 ulp, not bit-equal to the C library's,
//!   and `1 - tanh^2` turns a last-bit difference of `tanh` into a larger relative one.
//! * reductions of gradients (`dL/dt`, LSQ's `dL/ds`): f64 sums in another order; 1e-6 relative
//!   plus a small absolute term for sums that cancel to near zero (1e-5 relative for `dL/dt`,
//!   whose terms carry the `tanh` differences above).
//! * the packed layer ([`PackedBitLinear`] moved with `to_device`): 1e-6 relative, no absolute
//!   term. The kernels reproduce the CPU path's float operations in its order (the norm's 8-lane
//!   sum of squares, `round_clamped`, one `acc += sum * scale` per segment, `acc * m / 127 +
//!   bias`) and the integer sums are exact, so the outputs are expected to be bit-identical; the
//!   relative bound only names the contract.

#![cfg(feature = "cuda")]

use bitnet_quant::ops::learnable::{LearnableGradOp, LearnableOp, Surrogate};
use bitnet_quant::ops::lsq::{LsqGradOp, LsqOp};
use bitnet_quant::ops::quantize::{QuantizeGradOp, QuantizeOp};
use bitnet_quant::ops::scales::scales;
use bitnet_quant::ops::{EstKind, Kind};
use bitnet_quant::packed::PackedBitLinear;
use bitnet_quant::{
    BitLinear, BitLinearConfig, Estimator, Granularity, Quantizer, RmsNorm, Scheme, Threshold,
};
use candle_core::{test_device, DType, Device, Module, Result, Tensor, Var};

/// Odd sizes (one value, one short row, a ragged matrix) and a large one.
const SHAPES: [(usize, usize); 4] = [(1, 1), (1, 7), (1000, 37), (4096, 4096)];

fn schemes() -> Vec<Scheme> {
    vec![
        Scheme::Binary { scaled: false },
        Scheme::Binary { scaled: true },
        Scheme::TernaryAbsmean,
        Scheme::TernaryThreshold {
            threshold: Threshold::Fixed(0.05),
            scaled: false,
        },
        Scheme::TernaryThreshold {
            threshold: Threshold::Fixed(0.05),
            scaled: true,
        },
        Scheme::TernaryThreshold {
            threshold: Threshold::Twn,
            scaled: false,
        },
        Scheme::TernaryThreshold {
            threshold: Threshold::Twn,
            scaled: true,
        },
        Scheme::MultiBit { bits: 2 },
        Scheme::MultiBit { bits: 4 },
        Scheme::Int8PerToken,
    ]
}

/// Per tensor, per row, and groups (64 where the row allows, else groups of one value).
fn granularities(cols: usize) -> [Granularity; 3] {
    let g = if cols % 64 == 0 { 64 } else { 1 };
    [
        Granularity::PerTensor,
        Granularity::PerChannel,
        Granularity::PerGroup(g),
    ]
}

/// Deterministic values in about [-0.1, 0.1], with exact zeros, signed zeros and values on the
/// rounding ties of the integer grids sprinkled in.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let v = ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2;
            match i % 97 {
                3 => 0.0,
                5 => -0.0,
                7 => 0.05,
                11 => -0.025,
                _ => v,
            }
        })
        .collect()
}

/// The same values on the CPU and on `dev`.
fn pair(shape: (usize, usize), seed: u64, dev: &Device) -> Result<(Tensor, Tensor)> {
    let cpu = Tensor::from_vec(values(shape.0 * shape.1, seed), shape, &Device::Cpu)?;
    let on_dev = cpu.to_device(dev)?;
    Ok((cpu, on_dev))
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()
}

fn assert_exact(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bad: Vec<_> = got
        .iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (g, w))| g != w && !(g.is_nan() && w.is_nan()))
        .take(5)
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: first differences (index, (got, want)): {bad:?}"
    );
}

/// `|got - want| <= rel |want| + abs_frac max|want| + abs`.
fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32, abs_frac: f32, abs: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let max = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let bad: Vec<_> = got
        .iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (g, w))| (*g - *w).abs() > rel * w.abs() + abs_frac * max + abs)
        .take(5)
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: first differences (index, (got, want)): {bad:?}"
    );
}

/// Scales whose values come from a mean (sums in another order on each device).
fn mean_based(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Binary { scaled: true }
            | Kind::Absmean
            | Kind::Threshold { fixed: None, .. }
            | Kind::Threshold { scaled: true, .. }
    )
}

/// Every shape, granularity and scheme: the block parameters, then the forward of the quantize
/// op given the same parameters on both devices, on the row-major input and on its transpose.
fn scales_and_forward(dev: &Device) -> Result<()> {
    for (seed, &(r, c)) in SHAPES.iter().enumerate() {
        let (x_cpu, x_dev) = pair((r, c), seed as u64, dev)?;
        for transposed in [false, true] {
            let (x_cpu, x_dev) = if transposed {
                (x_cpu.t()?, x_dev.t()?)
            } else {
                (x_cpu.clone(), x_dev.clone())
            };
            let cols = x_cpu.dims()[1];
            for g in granularities(cols) {
                for scheme in schemes() {
                    let kind = Kind::of(&scheme);
                    let what = format!(
                        "{scheme:?} {g:?} {:?} transposed={transposed}",
                        x_cpu.dims()
                    );
                    let p_cpu = host(&scales(&x_cpu, kind, g)?)?;
                    let p_dev_t = scales(&x_dev, kind, g)?;
                    let p_dev = host(&p_dev_t)?;
                    if mean_based(kind) {
                        assert_close(&format!("scales {what}"), &p_dev, &p_cpu, 2e-6, 0.0, 0.0);
                    } else {
                        assert_exact(&format!("scales {what}"), &p_dev, &p_cpu);
                    }
                    // The device's parameters on both sides: the kernels must then agree exactly.
                    let p_host = p_dev_t.to_device(&Device::Cpu)?;
                    for lambda in [1.0f32, 0.3] {
                        let op = QuantizeOp {
                            kind,
                            estimator: EstKind::Identity,
                            granularity: g,
                            lambda,
                        };
                        let want = host(&x_cpu.apply_op2_no_bwd(&p_host, &op)?)?;
                        let got = host(&x_dev.apply_op2_no_bwd(&p_dev_t, &op)?)?;
                        assert_exact(&format!("quantize lambda={lambda} {what}"), &got, &want);
                    }
                }
            }
        }
    }
    Ok(())
}

fn estimators() -> Vec<Estimator> {
    vec![
        Estimator::Identity,
        Estimator::Clipped { clip: 1.0 },
        Estimator::SoftTanh { temperature: 2.0 },
        Estimator::SoftSigmoid { temperature: 3.0 },
        Estimator::ApproxSign,
        Estimator::SwishSign { beta: 5.0 },
    ]
}

fn transcendental(e: EstKind) -> bool {
    matches!(
        e,
        EstKind::SoftTanh(_) | EstKind::SoftSigmoid(_) | EstKind::SwishSign(_)
    )
}

/// The estimator's gradient op on both devices with the same parameters and upstream gradient;
/// every estimator on every scheme for the small shapes, a sample on the large one.
fn quantize_backward(dev: &Device) -> Result<()> {
    for (seed, &(r, c)) in SHAPES.iter().enumerate() {
        let (x_cpu, x_dev) = pair((r, c), seed as u64, dev)?;
        let (u_cpu, u_dev) = pair((r, c), 100 + seed as u64, dev)?;
        let large = r * c > 1 << 20;
        for g in granularities(c) {
            for (si, scheme) in schemes().into_iter().enumerate() {
                if large && si % 2 != 0 {
                    continue;
                }
                let kind = Kind::of(&scheme);
                let p_dev_t = scales(&x_dev, kind, g)?;
                let p_host = p_dev_t.to_device(&Device::Cpu)?;
                for est in estimators() {
                    let est = EstKind::of(&est);
                    for lambda in [1.0f32, 0.3] {
                        let op = QuantizeGradOp(QuantizeOp {
                            kind,
                            estimator: est,
                            granularity: g,
                            lambda,
                        });
                        let what =
                            format!("grad {est:?} {scheme:?} {g:?} ({r}, {c}) lambda={lambda}");
                        let want = host(&x_cpu.apply_op3_no_bwd(&p_host, &u_cpu, &op)?)?;
                        let got = host(&x_dev.apply_op3_no_bwd(&p_dev_t, &u_dev, &op)?)?;
                        if transcendental(est) {
                            assert_close(&what, &got, &want, 1e-6, 2e-6, 0.0);
                        } else {
                            assert_exact(&what, &got, &want);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// The learnable surrogate: forward, `dL/dx` and `dL/dt` on both devices.
fn learnable(dev: &Device) -> Result<()> {
    for (seed, &(r, c)) in SHAPES.iter().enumerate() {
        let (x_cpu, x_dev) = pair((r, c), seed as u64, dev)?;
        let (u_cpu, u_dev) = pair((r, c), 200 + seed as u64, dev)?;
        let t_cpu = Tensor::new(&[3.0f32], &Device::Cpu)?;
        let t_dev = t_cpu.to_device(dev)?;
        for g in granularities(c) {
            for scheme in schemes().into_iter().take(7) {
                let kind = Kind::of(&scheme);
                let p_dev_t = scales(&x_dev, kind, g)?;
                let p_host = p_dev_t.to_device(&Device::Cpu)?;
                for h in [0.0f32, 0.5, 1.0] {
                    let op = LearnableOp {
                        surrogate: Surrogate::new(kind, h)?,
                        granularity: g,
                    };
                    let what = format!("learnable {scheme:?} {g:?} ({r}, {c}) h={h}");
                    let want = host(&x_cpu.apply_op3_no_bwd(&t_cpu, &p_host, &op)?)?;
                    let got = host(&x_dev.apply_op3_no_bwd(&t_dev, &p_dev_t, &op)?)?;
                    assert_close(&format!("{what} fwd"), &got, &want, 1e-6, 2e-6, 0.0);

                    let rest_cpu =
                        Tensor::cat(&[&p_host.flatten_all()?, &u_cpu.flatten_all()?], 0)?;
                    let rest_dev =
                        Tensor::cat(&[&p_dev_t.flatten_all()?, &u_dev.flatten_all()?], 0)?;
                    let gop = LearnableGradOp(op);
                    let want = host(&x_cpu.apply_op3_no_bwd(&t_cpu, &rest_cpu, &gop)?)?;
                    let got = host(&x_dev.apply_op3_no_bwd(&t_dev, &rest_dev, &gop)?)?;
                    let n = r * c;
                    assert_close(
                        &format!("{what} dx"),
                        &got[..n],
                        &want[..n],
                        1e-6,
                        2e-6,
                        0.0,
                    );
                    let (gt, wt) = (got[n], want[n]);
                    assert!(
                        (gt - wt).abs() <= 1e-5 * wt.abs().max(1.0),
                        "{what} dt: got {gt}, want {wt}"
                    );
                }
            }
        }
    }
    Ok(())
}

/// LSQ forward and backward on both devices with the same steps.
fn lsq(dev: &Device) -> Result<()> {
    for (seed, &(r, c)) in SHAPES.iter().enumerate() {
        let (x_cpu, x_dev) = pair((r, c), seed as u64, dev)?;
        let (u_cpu, u_dev) = pair((r, c), 300 + seed as u64, dev)?;
        for g in granularities(c) {
            for bits in [2u8, 4, 8] {
                let op = LsqOp::new(bits, g)?;
                // Steps a little off the data's so that some values clamp.
                let s_cpu = op.init_steps(&x_cpu)?.affine(0.7, 0.0)?;
                let s_dev = s_cpu.to_device(dev)?;
                let what = format!("lsq {bits} bits {g:?} ({r}, {c})");
                let want = host(&x_cpu.apply_op2_no_bwd(&s_cpu, &op)?)?;
                let got = host(&x_dev.apply_op2_no_bwd(&s_dev, &op)?)?;
                assert_exact(&format!("{what} fwd"), &got, &want);

                let gop = LsqGradOp(op);
                let want = host(&x_cpu.apply_op3_no_bwd(&s_cpu, &u_cpu, &gop)?)?;
                let got = host(&x_dev.apply_op3_no_bwd(&s_dev, &u_dev, &gop)?)?;
                let n = r * c;
                assert_exact(&format!("{what} dx"), &got[..n], &want[..n]);
                assert_close(
                    &format!("{what} ds"),
                    &got[n..],
                    &want[n..],
                    1e-6,
                    0.0,
                    1e-7,
                );
            }
        }
    }
    Ok(())
}

/// The whole training path on the device: gradients reach the `Var`s through every op's `bwd`,
/// with the upstream gradient of `sum_all` (a broadcast, so not contiguous) and a transposed
/// weight. Each device computes its own scales here, hence the scale tolerance throughout.
fn autograd(dev: &Device) -> Result<()> {
    let (x_cpu, x_dev) = pair((37, 1000), 7, dev)?;
    let (w_cpu, w_dev) = pair((1000, 37), 8, dev)?;
    let mut grads = Vec::new();
    for (x, w) in [(&x_cpu, &w_cpu), (&x_dev, &w_dev)] {
        let xv = Var::from_tensor(x)?;
        let t = Var::new(&[2.5f32], x.device())?;
        let lsq_op = LsqOp::new(4, Granularity::PerChannel)?;
        let steps = Var::from_tensor(&lsq_op.init_steps(x)?)?;
        let q = Quantizer::new(
            Scheme::TernaryAbsmean,
            Estimator::SoftTanh { temperature: 2.0 },
        )?;
        let a = q.quantize(&xv.as_tensor().t()?)?.mul(w)?.sum_all()?;
        let b = q
            .quantize_learnable(xv.as_tensor(), t.as_tensor(), 0.5)?
            .sum_all()?;
        let l = bitnet_quant::ops::lsq::lsq_quantize(xv.as_tensor(), steps.as_tensor(), lsq_op)?
            .sum_all()?;
        let gs = a.add(&b)?.add(&l)?.backward()?;
        let get = |v: &Var| host(gs.get(v).expect("a gradient"));
        grads.push((get(&xv)?, get(&t)?, get(&steps)?));
    }
    let (cpu, gpu) = (&grads[0], &grads[1]);
    assert_close("autograd dx", &gpu.0, &cpu.0, 1e-5, 1e-5, 0.0);
    assert_close("autograd dt", &gpu.1, &cpu.1, 1e-5, 0.0, 1e-5);
    assert_close("autograd ds", &gpu.2, &cpu.2, 1e-5, 0.0, 1e-5);
    Ok(())
}

/// NaN and infinity are an error on every device, as on the CPU.
fn non_finite(dev: &Device) -> Result<()> {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut v = values(1000 * 37, 9);
        v[555] = bad;
        let x = Tensor::from_vec(v, (1000, 37), dev)?;
        for g in granularities(37) {
            let q =
                Quantizer::new(Scheme::TernaryAbsmean, Estimator::Identity)?.with_granularity(g)?;
            let err = q
                .quantize(&x)
                .expect_err("non-finite input must fail")
                .to_string();
            assert!(err.contains("NaN or infinite"), "{g:?}: {err}");
        }
    }
    Ok(())
}

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

    let (x_cpu, _) = packed_input(&[3, 300], 6, dev)?;
    let mut v = host(&x_cpu)?;
    v[310] = f32::NAN;
    let bad = Tensor::from_vec(v, (3, 300), dev)?;
    assert!(text(layer.forward(&bad).unwrap_err()).contains("NaN or infinite"));
    // Unchecked: the NaN token's outputs are NaN, the others are the CPU layer's.
    let y = host(&layer.clone().with_finite_check(false).forward(&bad)?)?;
    let want = host(&cpu.forward(&x_cpu)?)?;
    assert!(y[7..14].iter().all(|v| v.is_nan()), "{y:?}");
    assert_close("unchecked token 0", &y[..7], &want[..7], 1e-6, 0.0, 0.0);
    assert_close("unchecked token 2", &y[14..], &want[14..], 1e-6, 0.0, 0.0);

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
