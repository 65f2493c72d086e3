//! Gradients: every estimator against the formulas in `bitnet_quant::Estimator`'s docs (written
//! out again here, independently of the kernels), and the smooth ones against finite differences of the function they differentiate.

use bitnet_quant::ops::learnable::{learnable_quantize, LearnableOp, Surrogate};
use bitnet_quant::ops::lsq::{lsq_quantize, LsqOp};
use bitnet_quant::ops::EstKind;
use bitnet_quant::{Estimator, Granularity, Quantizer, Scheme};
use candle_core::{Device, Tensor, Var};

const XS: [f32; 10] = [-2.0, -1.0, -0.75, -0.3, -0.01, 0.0, 0.2, 0.5, 1.0, 1.7];
const US: [f32; 10] = [0.3, -1.0, 2.0, 0.5, -0.25, 1.0, 1.5, -2.0, 0.7, 1.1];

fn sech2(z: f32) -> f32 {
    1.0 / (z.cosh() * z.cosh())
}

/// The estimator table of `Estimator`'s docs, `r` the normalised input.
fn design_formula(e: Estimator, r: f32) -> f32 {
    match e {
        Estimator::Identity => 1.0,
        Estimator::Clipped { clip } => (r.abs() <= clip) as i32 as f32,
        Estimator::SoftTanh { temperature: t } => t * sech2(t * r),
        Estimator::SoftSigmoid { temperature: t } => {
            let s = 1.0 / (1.0 + (-t * r).exp());
            2.0 * t * s * (1.0 - s)
        }
        Estimator::ApproxSign => {
            if r.abs() <= 1.0 {
                2.0 - 2.0 * r.abs()
            } else {
                0.0
            }
        }
        Estimator::SwishSign { beta: b } => {
            b * (2.0 - b * r * (b * r / 2.0).tanh()) / (1.0 + (b * r).cosh())
        }
        // IR-Net: k t sech^2(t r), k = max(1 / t, 1).
        Estimator::Ede { temperature: t } => (1.0 / t).max(1.0) * t * sech2(t * r),
    }
}

const ESTIMATORS: [Estimator; 10] = [
    Estimator::Identity,
    Estimator::Clipped { clip: 1.0 },
    Estimator::Clipped { clip: 0.5 },
    Estimator::SoftTanh { temperature: 1.0 },
    Estimator::SoftTanh { temperature: 3.0 },
    Estimator::SoftSigmoid { temperature: 2.0 },
    Estimator::ApproxSign,
    Estimator::SwishSign { beta: 5.0 },
    Estimator::Ede { temperature: 0.3 },
    Estimator::Ede { temperature: 4.0 },
];

/// The gradient reaching a `Var` through `loss = sum(q(x) * u)`.
fn grad_through(q: &Quantizer, xs: &[f32], us: &[f32], shape: (usize, usize)) -> Vec<f32> {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::from_slice(xs, shape, &dev).unwrap()).unwrap();
    let u = Tensor::from_slice(us, shape, &dev).unwrap();
    let loss = q
        .quantize(x.as_tensor())
        .unwrap()
        .mul(&u)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    grads
        .get(&x)
        .expect("the Var got no gradient")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_close(name: &str, got: &[f32], want: &[f32], tol: f32) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * w.abs().max(1.0),
            "{name}[{i}]: got {g}, want {w}"
        );
    }
}

#[test]
fn every_estimator_on_every_scheme_gives_the_formula() {
    let mean_abs = XS.iter().map(|v| v.abs()).sum::<f32>() / XS.len() as f32;
    let mean = XS.iter().sum::<f32>() / XS.len() as f32;
    let max_abs = 2.0f32;
    // (scheme, normaliser n and center c of r = (x - c) / n for the one block of XS)
    let schemes = [
        (Scheme::Binary { scaled: false }, 1.0, 0.0),
        (Scheme::Binary { scaled: true }, mean_abs, 0.0),
        // BitNet b1: measured from the mean, its threshold.
        (Scheme::BinaryCentered, mean_abs, mean),
        (Scheme::TernaryAbsmean, mean_abs + 1e-5, 0.0),
        (Scheme::TernaryAbsmeanHf, 1.0 / (1.0 / mean_abs), 0.0),
        (
            Scheme::TernaryThreshold {
                threshold: bitnet_quant::Threshold::Fixed(0.4),
                scaled: false,
            },
            1.0,
            0.0,
        ),
        (Scheme::MultiBit { bits: 4 }, max_abs, 0.0),
        (Scheme::Int8PerToken, max_abs, 0.0),
    ];
    for (scheme, n, c) in schemes {
        for est in ESTIMATORS {
            let q = Quantizer::new(scheme, est).unwrap();
            let got = grad_through(&q, &XS, &US, (1, 10));
            let want: Vec<f32> = XS
                .iter()
                .zip(&US)
                .map(|(&x, &u)| u * design_formula(est, (x - c) / n))
                .collect();
            assert_close(&format!("{scheme:?} {est:?}"), &got, &want, 1e-5);
        }
    }
}

#[test]
fn estimator_gradient_uses_each_blocks_own_scale() {
    // Two rows with very different ranges: clipping at 1 must compare x / s_row.
    let xs = [0.1f32, -0.3, 0.05, 0.9, 10.0, -30.0, 5.0, 2.0];
    let us = [1.0f32; 8];
    let q = Quantizer::new(
        Scheme::Binary { scaled: true },
        Estimator::Clipped { clip: 1.0 },
    )
    .unwrap()
    .with_granularity(Granularity::PerChannel)
    .unwrap();
    let got = grad_through(&q, &xs, &us, (2, 4));
    // Row means 0.3375 and 11.75: |x / s| <= 1 for 0.1, 0.3, 0.05, 10, 5, 2; not for 0.9, -30.
    assert_eq!(got, vec![1., 1., 1., 0., 1., 0., 1., 1.]);
}

#[test]
fn blended_gradient_mixes_identity_and_estimator() {
    let lambda = 0.25f32;
    let est = Estimator::SoftTanh { temperature: 2.0 };
    let q = Quantizer::new(Scheme::Binary { scaled: false }, est)
        .unwrap()
        .with_lambda(lambda)
        .unwrap();
    let got = grad_through(&q, &XS, &US, (2, 5));
    let want: Vec<f32> = XS
        .iter()
        .zip(&US)
        .map(|(&x, &u)| u * ((1.0 - lambda) + lambda * design_formula(est, x)))
        .collect();
    assert_close("blend", &got, &want, 1e-6);
}

#[test]
fn soft_estimators_are_the_derivatives_of_their_surrogates() {
    // Finite differences of tanh(t x), 2 sig(t x) - 1 and IR-Net's k tanh(t x) (k = max(1/t, 1))
    // against the kernels' gradients.
    let h = 1e-3f64;
    for (est, f) in [
        (
            Estimator::SoftTanh { temperature: 1.5 },
            (|x: f64| (1.5 * x).tanh()) as fn(f64) -> f64,
        ),
        (Estimator::SoftSigmoid { temperature: 1.5 }, |x| {
            2.0 / (1.0 + (-1.5 * x).exp()) - 1.0
        }),
        (Estimator::Ede { temperature: 0.5 }, |x| {
            2.0 * (0.5 * x).tanh()
        }),
        (Estimator::Ede { temperature: 3.0 }, |x| (3.0 * x).tanh()),
    ] {
        let q = Quantizer::new(Scheme::Binary { scaled: false }, est).unwrap();
        let got = grad_through(&q, &XS, &[1.0; 10], (1, 10));
        for (i, &x) in XS.iter().enumerate() {
            let fd = (f(x as f64 + h) - f(x as f64 - h)) / (2.0 * h);
            assert!(
                (got[i] as f64 - fd).abs() < 1e-4,
                "{est:?} at {x}: {} vs fd {fd}",
                got[i]
            );
        }
    }
}

#[test]
fn non_contiguous_gradients_match() {
    let x0 = Tensor::arange(0f32, 12., &Device::Cpu)
        .unwrap()
        .affine(0.2, -1.1)
        .unwrap()
        .reshape((3, 4))
        .unwrap();
    let q = Quantizer::new(Scheme::TernaryAbsmean, Estimator::ApproxSign)
        .unwrap()
        .with_granularity(Granularity::PerChannel)
        .unwrap();
    let u = Tensor::arange(0f32, 12., &Device::Cpu)
        .unwrap()
        .reshape((4, 3))
        .unwrap();
    let g = |contiguous: bool| {
        let x = Var::from_tensor(&x0).unwrap();
        let xt = x.as_tensor().t().unwrap();
        let xt = if contiguous {
            xt.contiguous().unwrap()
        } else {
            xt
        };
        let loss = q.quantize(&xt).unwrap().mul(&u).unwrap().sum_all().unwrap();
        loss.backward()
            .unwrap()
            .get(&x)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    };
    assert_eq!(g(false), g(true));
}

#[test]
fn candle_round_gives_no_gradient_but_our_op_does() {
    // The reason the quantizers are custom ops: `round` has a zero gradient in candle.
    let x = Var::new(&[0.3f32, -0.7, 1.2], &Device::Cpu).unwrap();
    let plain = x
        .as_tensor()
        .round()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let plain = plain.get(&x).map(|g| g.to_vec1::<f32>().unwrap());
    assert!(
        plain.as_ref().is_none_or(|g| g.iter().all(|&v| v == 0.0)),
        "{plain:?}"
    );
    let q = Quantizer::new(Scheme::MultiBit { bits: 4 }, Estimator::Identity).unwrap();
    let ours = q
        .quantize(x.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(
        ours.get(&x).unwrap().to_vec1::<f32>().unwrap(),
        vec![1.0, 1.0, 1.0]
    );
}

/// `(absolute, relative)` error allowed between a gradient and a central difference of the f32
/// forward with step 5e-3: the rounding of eight f32 outputs of about 1, divided by the step,
/// is about 5e-5; the truncation error (the step squared times the third derivative, over 6)
/// is below 1e-4 for `t = 1.7`.
const FD_TOL: (f64, f64) = (3e-4, 2e-3);

/// The learnable surrogate's loss `sum(u * y)` at `x` and `t`, with the block parameters held
/// fixed (as the backward holds them), in f64.
fn learnable_loss(op: LearnableOp, x: &[f32], t: f32, params: &Tensor, u: &[f32]) -> f64 {
    let dev = Device::Cpu;
    let x = Tensor::new(x, &dev).unwrap();
    let t = Tensor::new(&[t], &dev).unwrap();
    let y = learnable_quantize(&x, &t, params, op)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    y.iter().zip(u).map(|(&y, &u)| y as f64 * u as f64).sum()
}

/// Both gradients of the learnable surrogate against central differences, at hardness 0, in
/// between, and 1. `dL/dt` is the difference quotient in `t` (exactly 0 at `h = 1`, where `t`
/// no longer changes the output); `dL/dx` is the difference quotient in `x`, which sees only
/// the soft part `(1 - h) s soft(r)` (the hard part is flat away from its thresholds), plus the
/// hard part's straight-through term `h u e(r)`. The values stay more than the step away from
/// every threshold (asserted), and the parameters are held fixed as the backward holds them.
#[test]
fn learnable_gradients_match_finite_differences_at_every_hardness() {
    let dev = Device::Cpu;
    let xs = [-1.2f32, -0.45, -0.07, 0.03, 0.31, 0.8, 1.5, -2.0];
    let us = [0.5f32, -1.0, 2.0, 1.0, 0.3, -0.7, 1.2, 0.9];
    let t0 = 1.7f32;
    let step = 5e-3f32;
    let thr = |d| Scheme::TernaryThreshold {
        threshold: bitnet_quant::Threshold::Fixed(d),
        scaled: true,
    };
    let schemes = [
        Scheme::Binary { scaled: false },
        Scheme::Binary { scaled: true },
        Scheme::BinaryCentered,
        Scheme::TernaryAbsmean,
        thr(0.5),
        Scheme::TernaryThreshold {
            threshold: bitnet_quant::Threshold::Twn,
            scaled: false,
        },
    ];
    let estimators = [Estimator::Identity, Estimator::Clipped { clip: 0.6 }];
    for scheme in schemes {
        for est in estimators {
            let q = Quantizer::new(scheme, est).unwrap();
            let x_t = Tensor::new(&xs, &dev).unwrap();
            let params = q.scales(&x_t).unwrap();
            let p = params.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let kind = q.kind();
            let (n, c) = (kind.normalizer(p[0], p[1]), kind.center(p[1]));
            for h in [0.0f32, 0.3, 0.7, 1.0] {
                let what = format!("{scheme:?} {est:?} h={h}");
                let op = LearnableOp {
                    surrogate: Surrogate::new(kind, h)
                        .unwrap()
                        .with_estimator(EstKind::of(&est)),
                    granularity: Granularity::PerTensor,
                };
                let x = Var::new(&xs, &dev).unwrap();
                let t = Var::new(&[t0], &dev).unwrap();
                let y = learnable_quantize(x.as_tensor(), t.as_tensor(), &params, op).unwrap();
                let u = Tensor::new(&us, &dev).unwrap();
                let grads = y.mul(&u).unwrap().sum_all().unwrap().backward().unwrap();
                let gx = grads.get(&x).unwrap().to_vec1::<f32>().unwrap();
                let gt = grads.get(&t).unwrap().to_vec1::<f32>().unwrap()[0] as f64;

                let loss = |x: &[f32], t: f32| learnable_loss(op, x, t, &params, &us);
                let fd_t = (loss(&xs, t0 + step) - loss(&xs, t0 - step)) / (2.0 * step as f64);
                if h == 1.0 {
                    assert_eq!(gt, 0.0, "{what}: dt");
                    assert_eq!(fd_t, 0.0, "{what}: the output depends on t at h = 1");
                } else {
                    assert!(fd_t.abs() > 1e-3, "{what}: a vacuous dt check ({fd_t})");
                    assert!(
                        (gt - fd_t).abs() < FD_TOL.0 + FD_TOL.1 * fd_t.abs(),
                        "{what}: dt {gt} vs fd {fd_t}"
                    );
                }

                for i in 0..xs.len() {
                    let (mut hi, mut lo) = (xs, xs);
                    hi[i] += step;
                    lo[i] -= step;
                    let hard = |v: f32| kind.quantize(v, p[0], p[1]);
                    assert_eq!(
                        hard(hi[i]),
                        hard(lo[i]),
                        "{what}: x[{i}] straddles a threshold"
                    );
                    let fd = (loss(&hi, t0) - loss(&lo, t0)) / (2.0 * step as f64);
                    let ste = h as f64 * us[i] as f64 * design_formula(est, (xs[i] - c) / n) as f64;
                    let want = fd + ste;
                    assert!(
                        (gx[i] as f64 - want).abs() < FD_TOL.0 + FD_TOL.1 * want.abs(),
                        "{what}: dx[{i}] {} vs fd {fd} + ste {ste}",
                        gx[i]
                    );
                }
            }
        }
    }
}

#[test]
fn learnable_binary_matches_design_formula_and_hardness_reaches_the_hard_quantizer() {
    let dev = Device::Cpu;
    let q = Quantizer::new(Scheme::Binary { scaled: false }, Estimator::Identity).unwrap();
    let x = Var::new(&XS, &dev).unwrap();
    let t = Var::new(&[2.0f32], &dev).unwrap();
    let y = q
        .quantize_learnable(x.as_tensor(), t.as_tensor(), 0.0)
        .unwrap();
    let yv = y.to_vec1::<f32>().unwrap();
    let grads = y
        .mul(&Tensor::new(&US, &dev).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gx = grads.get(&x).unwrap().to_vec1::<f32>().unwrap();
    let gt = grads.get(&t).unwrap().to_vec1::<f32>().unwrap()[0];
    let mut want_t = 0f32;
    for i in 0..XS.len() {
        assert!((yv[i] - (2.0 * XS[i]).tanh()).abs() < 1e-6);
        assert!((gx[i] - US[i] * 2.0 * sech2(2.0 * XS[i])).abs() < 1e-5);
        want_t += US[i] * XS[i] * sech2(2.0 * XS[i]);
    }
    assert!((gt - want_t).abs() < 1e-5, "{gt} vs {want_t}");
    let hard = q
        .quantize_learnable(x.as_tensor(), t.as_tensor(), 1.0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let sign: Vec<f32> = XS
        .iter()
        .map(|&v| if v >= 0.0 { 1.0 } else { -1.0 })
        .collect();
    assert_eq!(hard, sign);
    let e = q
        .quantize_learnable(x.as_tensor(), t.as_tensor(), 1.5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`hardness`"), "{e}");
    let multi = Quantizer::new(Scheme::MultiBit { bits: 4 }, Estimator::Identity).unwrap();
    assert!(multi
        .quantize_learnable(x.as_tensor(), t.as_tensor(), 0.0)
        .is_err());
}

#[test]
fn lsq_gradients_follow_the_paper() {
    let dev = Device::Cpu;
    // 3 bits: qmin -4, qmax 3; step 0.5 -> x / s = -5, -1.2, 0.3, 0.8, 1.5, 4
    let xs = [-2.5f32, -0.6, 0.15, 0.4, 0.75, 2.0];
    let us = [1.0f32, 2.0, -1.0, 0.5, 1.0, 3.0];
    let op = LsqOp::new(3, Granularity::PerTensor).unwrap();
    let x = Var::new(&xs, &dev).unwrap();
    let s = Var::new(&[0.5f32], &dev).unwrap();
    let y = lsq_quantize(x.as_tensor(), s.as_tensor(), op).unwrap();
    assert_eq!(
        y.to_vec1::<f32>().unwrap(),
        vec![-2.0, -0.5, 0.0, 0.5, 1.0, 1.5]
    );
    let grads = y
        .mul(&Tensor::new(&us, &dev).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(
        grads.get(&x).unwrap().to_vec1::<f32>().unwrap(),
        vec![0.0, 2.0, -1.0, 0.5, 1.0, 0.0]
    );
    // ds: u * (qmin | round(r) - r | qmax): 1*-4 + 2*(-1+1.2) + -1*(0-0.3) + .5*(1-.8) + 1*(2-1.5) + 3*3
    let raw = -4.0 + 2.0 * 0.2 + 0.3 + 0.5 * 0.2 + 0.5 + 9.0;
    let want = raw / (6.0f32 * 3.0).sqrt();
    let got = grads.get(&s).unwrap().to_vec1::<f32>().unwrap()[0];
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
}

/// `linear(x, w) = x w^T`: forward and both gradients against loops over the definition, for a
/// 2-D input, a 3-D input (leading dims flattened) and a transposed (non-contiguous) input.
#[test]
fn linear_op_gradients_are_g_w_and_g_transposed_x() {
    use bitnet_quant::ops::linear::linear;
    let dev = Device::Cpu;
    let (out, inp) = (3, 5);
    let wv: Vec<f32> = (0..out * inp)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3)
        .collect();
    for dims in [vec![4, inp], vec![2, 3, inp], vec![inp, 4]] {
        let transposed = dims == [inp, 4];
        let n: usize = dims.iter().product();
        let xv: Vec<f32> = (0..n).map(|i| ((i * 5 % 13) as f32 - 6.0) * 0.25).collect();
        let xvar = Var::from_vec(xv.clone(), dims.clone(), &dev).unwrap();
        let wvar = Var::from_vec(wv.clone(), (out, inp), &dev).unwrap();
        // The input the op sees, and its rows as plain vectors (row r, column i).
        let x = match transposed {
            true => xvar.as_tensor().t().unwrap(),
            false => xvar.as_tensor().clone(),
        };
        let rows = n / inp;
        let xr = |r: usize, i: usize| match transposed {
            true => xv[i * rows + r],
            false => xv[r * inp + i],
        };
        let y = linear(&x, wvar.as_tensor()).unwrap();
        let yv = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for r in 0..rows {
            for o in 0..out {
                let want: f32 = (0..inp).map(|i| xr(r, i) * wv[o * inp + i]).sum();
                assert!((yv[r * out + o] - want).abs() < 1e-5, "{dims:?} y[{r},{o}]");
            }
        }
        // Loss sum(u * y) with u[r, o] = r - o: dL/dy = u.
        let u = |r: usize, o: usize| r as f32 - o as f32;
        let uv: Vec<f32> = (0..rows * out).map(|k| u(k / out, k % out)).collect();
        let ut = Tensor::from_vec(uv, y.shape(), &dev).unwrap();
        let grads = (y * ut).unwrap().sum_all().unwrap().backward().unwrap();
        let dw = grads
            .get(&wvar)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for o in 0..out {
            for i in 0..inp {
                let want: f32 = (0..rows).map(|r| u(r, o) * xr(r, i)).sum();
                assert!(
                    (dw[o * inp + i] - want).abs() < 1e-4,
                    "{dims:?} dW[{o},{i}]"
                );
            }
        }
        let dx = grads
            .get(&xvar)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for r in 0..rows {
            for i in 0..inp {
                let want: f32 = (0..out).map(|o| u(r, o) * wv[o * inp + i]).sum();
                let k = if transposed {
                    i * rows + r
                } else {
                    r * inp + i
                };
                assert!((dx[k] - want).abs() < 1e-4, "{dims:?} dx[{r},{i}]");
            }
        }
    }
    let bad = linear(
        &Tensor::zeros((2, 4), candle_core::DType::F32, &dev).unwrap(),
        &Tensor::zeros((3, 5), candle_core::DType::F32, &dev).unwrap(),
    );
    assert!(bad.unwrap_err().to_string().contains("in-features 5"));
}
