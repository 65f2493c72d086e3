//! The checks `tests/cuda.rs` and `tests/metal.rs` share: every op's GPU kernel against its CPU
//! kernel (the reference), forward and backward, on odd sizes, every granularity and transposed
//! (non-contiguous) inputs. Each check takes the device, so the two files only choose it; a
//! folder module is not a test target of its own, so this compiles once per including file.
//!
//! Tolerances, and why:
//! * quantized values, LSQ's forward and `dL/dx` of the piecewise estimators: exact. Both
//!   devices get the same block parameters and the kernels are compiled without fused
//!   multiply-add (CUDA) or in the safe math mode without contraction (Metal), so every value is
//!   computed by the same IEEE operations.
//! * block parameters from a mean (`mean|x|`, the mean above a threshold, the center `mean(x)` of
//!   the centered binary kind): 2e-6 relative, plus 1e-12 of the block's `mean|x|` for the
//!   center, which can cancel to near zero. The CPU and CUDA sum in f64 in different orders,
//!   Metal in double-float pairs (it has no f64) scaled by a power of two so that they cannot
//!   overflow; the means differ by at most an ulp or so. Parameters from a maximum or a constant
//!   are exact.
//! * values that go through `tanh`, `exp` or `cosh`: 1e-6 relative plus 2e-6 of the largest
//!   magnitude. CUDA's `tanhf`/`expf`/`coshf` and Metal's `precise::` functions are within a few
//!   ulp, not bit-equal to the C library's, and `1 - tanh^2` turns a last-bit difference of
//!   `tanh` into a larger relative one.
//! * reductions of gradients (`dL/dt`, LSQ's `dL/ds`): f64 (CUDA) or double-float (Metal) sums in
//!   another order; 1e-6 relative plus a small absolute term for sums that cancel to near zero
//!   (1e-5 relative for `dL/dt`, whose terms carry the `tanh` differences above).

#![cfg(any(feature = "cuda", feature = "metal"))]

use bitnet_quant::ops::learnable::{LearnableGradOp, LearnableOp, Surrogate};
use bitnet_quant::ops::lsq::{LsqGradOp, LsqOp};
use bitnet_quant::ops::quantize::{QuantizeGradOp, QuantizeOp};
use bitnet_quant::ops::scales::scales;
use bitnet_quant::ops::{EstKind, Kind};
use bitnet_quant::{Estimator, Granularity, Quantizer, Scheme, Threshold};
use candle_core::{Device, Result, Tensor, Var};

/// Odd sizes (one value, one short row, a ragged matrix) and a large one.
const SHAPES: [(usize, usize); 4] = [(1, 1), (1, 7), (1000, 37), (4096, 4096)];

fn schemes() -> Vec<Scheme> {
    vec![
        Scheme::Binary { scaled: false },
        Scheme::Binary { scaled: true },
        Scheme::BinaryCentered,
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
        // After the first seven: no learnable temperature for it.
        Scheme::TernaryAbsmeanHf,
    ]
}

/// Per tensor, per row, and groups (64 where the row allows, else groups of one value).
pub fn granularities(cols: usize) -> [Granularity; 3] {
    let g = if cols % 64 == 0 { 64 } else { 1 };
    [
        Granularity::PerTensor,
        Granularity::PerChannel,
        Granularity::PerGroup(g),
    ]
}

/// Deterministic values in about [-0.1, 0.1], with exact zeros, signed zeros and values on the
/// rounding ties of the integer grids sprinkled in.
pub fn values(n: usize, seed: u64) -> Vec<f32> {
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

/// Both tensors of a pair, or both transposed (a strided view the kernels must gather).
fn maybe_t(p: &(Tensor, Tensor), transposed: bool) -> Result<(Tensor, Tensor)> {
    if transposed {
        Ok((p.0.t()?, p.1.t()?))
    } else {
        Ok(p.clone())
    }
}

/// The layouts a backward check runs on: row-major, and the transpose too where the including
/// file sets `BACKWARD_TRANSPOSED` (see there for why each device does or does not).
fn backward_layouts() -> &'static [bool] {
    if super::BACKWARD_TRANSPOSED {
        &[false, true]
    } else {
        &[false]
    }
}

/// The values of `t` on the host, flattened.
pub fn host(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()
}

/// Bit-equal values (NaN equals NaN).
pub fn assert_exact(what: &str, got: &[f32], want: &[f32]) {
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
pub fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32, abs_frac: f32, abs: f32) {
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
            | Kind::BinaryCentered
            | Kind::Absmean
            | Kind::AbsmeanHf
            | Kind::Threshold { fixed: None, .. }
            | Kind::Threshold { scaled: true, .. }
    )
}

/// Block parameters from a mean within the tolerance of the file docs.
pub fn assert_mean_params(what: &str, kind: Kind, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        // Each block's `(s, aux)`; the center is aux, next to its block's `mean|x|`.
        let abs = match kind {
            Kind::BinaryCentered if i % 2 == 1 => 1e-12 * want[i - 1],
            _ => 0.0,
        };
        assert!(
            (g - w).abs() <= 2e-6 * w.abs() + abs,
            "{what}: param {i}: got {g}, want {w}"
        );
    }
}

/// Every shape, granularity and scheme: the block parameters, then the forward of the quantize
/// op given the same parameters on both devices, on the row-major input and on its transpose.
pub fn scales_and_forward(dev: &Device) -> Result<()> {
    for (seed, &(r, c)) in SHAPES.iter().enumerate() {
        let xs = pair((r, c), seed as u64, dev)?;
        for transposed in [false, true] {
            let (x_cpu, x_dev) = maybe_t(&xs, transposed)?;
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
                        assert_mean_params(&format!("scales {what}"), kind, &p_dev, &p_cpu);
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
        Estimator::Ede { temperature: 0.5 },
    ]
}

fn transcendental(e: EstKind) -> bool {
    matches!(
        e,
        EstKind::SoftTanh(_) | EstKind::SoftSigmoid(_) | EstKind::SwishSign(_) | EstKind::Ede(_)
    )
}

/// The estimator's gradient op on both devices with the same parameters and upstream gradient,
/// on row-major `x` and upstream (and transposed ones, see [`backward_layouts`]); every estimator
/// on every scheme for the small shapes, a sample on the large one (half the schemes per layout).
pub fn quantize_backward(dev: &Device) -> Result<()> {
    for (seed, &(r, c)) in SHAPES.iter().enumerate() {
        let xs = pair((r, c), seed as u64, dev)?;
        let us = pair((r, c), 100 + seed as u64, dev)?;
        let large = r * c > 1 << 20;
        for &transposed in backward_layouts() {
            let (x_cpu, x_dev) = maybe_t(&xs, transposed)?;
            let (u_cpu, u_dev) = maybe_t(&us, transposed)?;
            for g in granularities(x_cpu.dims()[1]) {
                for (si, scheme) in schemes().into_iter().enumerate() {
                    if large && si % 2 != usize::from(transposed) {
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
                            let what = format!(
                                "grad {est:?} {scheme:?} {g:?} {:?} transposed={transposed} \
                                 lambda={lambda}",
                                x_cpu.dims()
                            );
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
    }
    Ok(())
}

/// The learnable surrogate: forward, `dL/dx` and `dL/dt` on both devices, `x` row-major (and
/// transposed, see [`backward_layouts`]; the large shape row-major only), at hardness 0, 1/2
/// and 1, the hard part's estimator the identity or (at 1/2) a clipped one.
pub fn learnable(dev: &Device) -> Result<()> {
    for (seed, &(r, c)) in SHAPES.iter().enumerate() {
        let xs = pair((r, c), seed as u64, dev)?;
        let (u_cpu, u_dev) = pair((r, c), 200 + seed as u64, dev)?;
        let t_cpu = Tensor::new(&[3.0f32], &Device::Cpu)?;
        let t_dev = t_cpu.to_device(dev)?;
        let large = r * c > 1 << 20;
        for &transposed in backward_layouts() {
            if large && transposed {
                continue;
            }
            let (x_cpu, x_dev) = maybe_t(&xs, transposed)?;
            for g in granularities(x_cpu.dims()[1]) {
                for scheme in schemes().into_iter().take(8) {
                    let kind = Kind::of(&scheme);
                    let p_dev_t = scales(&x_dev, kind, g)?;
                    let p_host = p_dev_t.to_device(&Device::Cpu)?;
                    for (h, est) in [
                        (0.0f32, EstKind::Identity),
                        (0.5, EstKind::Identity),
                        (0.5, EstKind::Clipped(0.7)),
                        (1.0, EstKind::Identity),
                    ] {
                        let op = LearnableOp {
                            surrogate: Surrogate::new(kind, h)?.with_estimator(est),
                            granularity: g,
                        };
                        let what = format!(
                            "learnable {scheme:?} {g:?} {:?} transposed={transposed} h={h} \
                             {est:?}",
                            x_cpu.dims()
                        );
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
    }
    Ok(())
}

/// LSQ forward and backward on both devices with the same steps, `x` and upstream row-major (and
/// transposed, see [`backward_layouts`]; the large shape row-major only).
pub fn lsq(dev: &Device) -> Result<()> {
    for (seed, &(r, c)) in SHAPES.iter().enumerate() {
        let xs = pair((r, c), seed as u64, dev)?;
        let us = pair((r, c), 300 + seed as u64, dev)?;
        let large = r * c > 1 << 20;
        for &transposed in backward_layouts() {
            if large && transposed {
                continue;
            }
            let (x_cpu, x_dev) = maybe_t(&xs, transposed)?;
            let (u_cpu, u_dev) = maybe_t(&us, transposed)?;
            for g in granularities(x_cpu.dims()[1]) {
                for bits in [2u8, 4, 8] {
                    let op = LsqOp::new(bits, g)?;
                    // Steps a little off the data's so that some values clamp.
                    let s_cpu = op.init_steps(&x_cpu)?.affine(0.7, 0.0)?;
                    let s_dev = s_cpu.to_device(dev)?;
                    let what = format!(
                        "lsq {bits} bits {g:?} {:?} transposed={transposed}",
                        x_cpu.dims()
                    );
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
    }
    Ok(())
}

/// The whole training path on the device: gradients reach the `Var`s through every op's `bwd`,
/// with the upstream gradient of `sum_all` (a broadcast, so not contiguous) and a transposed
/// weight. Each device computes its own scales here, hence the scale tolerance throughout.
pub fn autograd(dev: &Device) -> Result<()> {
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

/// A temperature that is not a finite number > 0 is the CPU's error on every device, in the
/// forward and in the gradient op.
pub fn bad_temperature(dev: &Device) -> Result<()> {
    let x = Tensor::from_vec(values(6 * 64, 11), (6, 64), dev)?;
    let kind = Kind::of(&Scheme::BinaryCentered);
    let g = Granularity::PerChannel;
    let p = scales(&x, kind, g)?;
    let op = LearnableOp {
        surrogate: Surrogate::new(kind, 0.5)?,
        granularity: g,
    };
    let rest = Tensor::cat(&[&p.flatten_all()?, &x.flatten_all()?], 0)?;
    for t in [0.0f32, -1.5, f32::NAN, f32::INFINITY] {
        let t = Tensor::new(&[t], dev)?;
        let fwd = x
            .apply_op3_no_bwd(&t, &p, &op)
            .expect_err("forward")
            .to_string();
        let bwd = x
            .apply_op3_no_bwd(&t, &rest, &LearnableGradOp(op))
            .expect_err("backward")
            .to_string();
        for e in [fwd, bwd] {
            assert!(e.contains("`temperature`") && e.contains("> 0"), "{t}: {e}");
        }
    }
    Ok(())
}

/// Finite values whose `sum|x|` in a block passes `f32::MAX` (37 values of 3e37 in a row, and
/// values up to 1.7e38 of both signs): every device gives the CPU's finite parameters (its f64
/// sums do not overflow; Metal scales its double-float sums so that they cannot).
pub fn overflow(dev: &Device) -> Result<()> {
    let same = vec![3e37f32; 1000 * 37];
    let mixed: Vec<f32> = values(1000 * 37, 12)
        .iter()
        .map(|v| v * 17.0 * 1e38)
        .collect();
    for (name, v) in [("3e37", same), ("1.7e38", mixed)] {
        let x_cpu = Tensor::from_vec(v, (1000, 37), &Device::Cpu)?;
        let x_dev = x_cpu.to_device(dev)?;
        for scheme in [
            Scheme::TernaryAbsmean,
            Scheme::BinaryCentered,
            Scheme::TernaryThreshold {
                threshold: Threshold::Twn,
                scaled: true,
            },
        ] {
            let kind = Kind::of(&scheme);
            for g in granularities(37) {
                let what = format!("overflow {name} {scheme:?} {g:?}");
                let want = host(&scales(&x_cpu, kind, g)?)?;
                let got = host(&scales(&x_dev, kind, g)?)?;
                assert!(want.iter().all(|v| v.is_finite()), "{what}: cpu {want:?}");
                assert_mean_params(&what, kind, &got, &want);
            }
        }
    }
    Ok(())
}

/// NaN and infinity are an error on every device, as on the CPU.
pub fn non_finite(dev: &Device) -> Result<()> {
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
