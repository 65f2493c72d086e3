//! The fused BitLinear op (the CPU training path of `BitLinear::forward`) against the same layer
//! run as separate ops, over a table of quantizer configurations; and its gradients against
//! finite differences where the layer is smooth.

use bitnet_quant::{
    BitLinear, BitLinearConfig, Estimator, Granularity, Quantizer, RmsNorm, Scheme,
};
use candle_core::{Device, Module, Tensor, Var};

fn q(scheme: Scheme, est: Estimator) -> Quantizer {
    Quantizer::new(scheme, est).unwrap()
}

/// A layer with its own variables (weight, norm weight away from 1, optional bias).
struct Case {
    layer: BitLinear,
    w: Var,
    g: Var,
    b: Option<Var>,
}

fn case(config: BitLinearConfig, k: usize, n: usize) -> Case {
    let dev = Device::Cpu;
    let w = Var::randn(0f32, 0.3, (n, k), &dev).unwrap();
    let g = Var::rand(0.5f32, 1.5, k, &dev).unwrap();
    let b = config.bias.then(|| Var::randn(0f32, 0.1, n, &dev).unwrap());
    let layer = BitLinear::from_parts(
        w.as_tensor().clone(),
        b.as_ref().map(|b| b.as_tensor().clone()),
        Some(RmsNorm::from_weight(g.as_tensor().clone(), config.norm_eps)),
        config,
    );
    Case { layer, w, g, b }
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1e-12);
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    d.to_scalar::<f32>().unwrap() / scale
}

/// Output and the gradients of `sum(y * r)` w.r.t. x (when it is a variable), w, g and b, by
/// the fused forward (`Module::forward`) or the separate ops.
fn run(c: &Case, x: &Tensor, x_var: Option<&Var>, r: &Tensor, fused: bool) -> Vec<Option<Tensor>> {
    let cfg = c.layer.config();
    let y = if fused {
        c.layer.forward(x).unwrap()
    } else {
        c.layer
            .forward_separate(x, &cfg.weight, cfg.activation.as_ref())
            .unwrap()
    };
    let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
    let mut out = vec![Some(y)];
    out.push(x_var.map(|v| grads.get(v.as_tensor()).unwrap().clone()));
    for v in [Some(&c.w), Some(&c.g), c.b.as_ref()] {
        out.push(v.map(|v| grads.get(v.as_tensor()).unwrap().clone()));
    }
    out
}

#[test]
fn fused_matches_separate_ops_for_every_configuration() {
    let int8 = q(Scheme::Int8PerToken, Estimator::Identity);
    let ternary = q(Scheme::TernaryAbsmean, Estimator::Identity);
    #[rustfmt::skip]
    let table: Vec<(&str, Quantizer, Option<Quantizer>, bool)> = vec![
        ("b1.58 default", ternary, Some(int8), false),
        ("with bias", ternary, Some(int8), true),
        ("fp activations", ternary, None, false),
        ("binary, clipped", q(Scheme::Binary { scaled: true }, Estimator::Clipped { clip: 1.0 }), Some(int8), false),
        ("4-bit, soft tanh", q(Scheme::MultiBit { bits: 4 }, Estimator::SoftTanh { temperature: 2.0 }), Some(int8), false),
        ("per-channel ternary", ternary.with_granularity(Granularity::PerChannel).unwrap(), Some(int8), false),
        ("per-group 4", ternary.with_granularity(Granularity::PerGroup(4)).unwrap(), Some(int8), true),
        ("blend 0.3", ternary.with_lambda(0.3).unwrap(), Some(int8.with_lambda(0.3).unwrap()), false),
        ("clipped int8", ternary, Some(q(Scheme::Int8PerToken, Estimator::Clipped { clip: 0.5 })), false),
    ];
    for (name, weight, activation, bias) in table {
        let config = BitLinearConfig {
            bias,
            weight,
            activation,
            ..BitLinearConfig::default()
        };
        // Dense input (candle's GEMM) and 85 % zeros (the sparse kernels), each as a variable
        // (the input gradient flows on) and as data (only the norm reads it, at the nonzeros);
        // 32 outputs (a multiple of 16) let int8 x ternary/binary layers take the integer kernel,
        // which at 55 % zeros runs the forward only (the backward is the dense GEMMs').
        let runs = [
            (7, 1.0, true),
            (7, 0.15, true),
            (7, 0.15, false),
            (32, 0.15, false),
            (32, 0.45, true),
            (32, 0.45, false),
        ];
        for (n, density, x_is_var) in runs {
            let c = case(config, 24, n);
            let name = format!("{name}, {n} outputs, density {density}, x var {x_is_var}");
            // 3-D input: the op flattens the leading dims.
            let x = sparse_randn((2, 5, 24), density);
            let x = Var::from_tensor(&x).unwrap();
            let r = Tensor::randn(0f32, 1.0, (2, 5, n), &Device::Cpu).unwrap();
            let xv = x_is_var.then_some(&x);
            let xt = match x_is_var {
                true => x.as_tensor().clone(),
                false => x.as_tensor().detach(),
            };
            let fused = run(&c, &xt, xv, &r, true);
            let separate = run(&c, &xt, xv, &r, false);
            let what = ["y", "dx", "dw", "dg", "db"];
            for (k, (a, b)) in fused.iter().zip(&separate).enumerate() {
                match (a, b) {
                    (Some(a), Some(b)) => {
                        assert_eq!(a.dims(), b.dims(), "{name}: {}", what[k]);
                        // The same math: equal up to f32 rounding (the sparse kernels add in
                        // another order than the GEMM).
                        let d = max_rel_diff(a, b);
                        assert!(d <= 1e-6, "{name}: {} differs by {d:e}", what[k]);
                    }
                    (None, None) => {}
                    _ => panic!("{name}: {} present in one path only", what[k]),
                }
            }
        }
    }
}

/// Standard normal values with about `1 - density` of them zeroed (in place, not a separate
/// mask op, so the zeros are exact).
fn sparse_randn(shape: (usize, usize, usize), density: f64) -> Tensor {
    let x = Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
    let keep = Tensor::rand(0f32, 1.0, shape, &Device::Cpu)
        .unwrap()
        .lt(density)
        .unwrap();
    keep.where_cond(&x, &x.zeros_like().unwrap()).unwrap()
}

#[test]
fn input_without_gradient_still_trains_the_weights() {
    // The first layer's input is data, not a variable: the op skips its gradient but must still
    // deliver the weight's and the norm's.
    let c = case(BitLinearConfig::default(), 16, 6);
    let x = Tensor::randn(0f32, 1.0, (9, 16), &Device::Cpu).unwrap();
    let r = Tensor::randn(0f32, 1.0, (9, 6), &Device::Cpu).unwrap();
    let fused = run(&c, &x, None, &r, true);
    let separate = run(&c, &x, None, &r, false);
    for k in [0, 2, 3] {
        let (a, b) = (fused[k].as_ref().unwrap(), separate[k].as_ref().unwrap());
        assert!(max_rel_diff(a, b) <= 1e-6, "output/grad {k}");
    }
}

#[test]
fn gradients_match_finite_differences_when_the_blend_is_off() {
    // lambda = 0 makes both quantizers the identity in value and gradient, so the layer is
    // `RMSNorm(x; g) @ w^T`: smooth, and central differences check the whole fused backward
    // (GEMMs and both RMSNorm gradients) against the function it computes.
    let ternary = q(Scheme::TernaryAbsmean, Estimator::Identity)
        .with_lambda(0.0)
        .unwrap();
    let int8 = q(Scheme::Int8PerToken, Estimator::Identity)
        .with_lambda(0.0)
        .unwrap();
    let config = BitLinearConfig {
        weight: ternary,
        activation: Some(int8),
        ..BitLinearConfig::default()
    };
    let dev = Device::Cpu;
    let c = case(config, 6, 3);
    let x = Var::randn(0f32, 1.0, (4, 6), &dev).unwrap();
    let r = Tensor::randn(0f32, 1.0, (4, 3), &dev).unwrap();
    let grads = run(&c, x.as_tensor(), Some(&x), &r, true);
    let loss = |c: &Case, x: &Tensor| -> f64 {
        let y = c.layer.forward(x).unwrap();
        let y = y.to_dtype(candle_core::DType::F64).unwrap();
        let r = r.to_dtype(candle_core::DType::F64).unwrap();
        (y * r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let h = 1e-2f32;
    for (name, var, grad) in [
        ("x", &x, &grads[1]),
        ("w", &c.w, &grads[2]),
        ("g", &c.g, &grads[3]),
    ] {
        let grad = grad
            .as_ref()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for i in 0..base.len() {
            let at = |d: f32| {
                let mut v = base.clone();
                v[i] += d;
                var.set(&Tensor::from_vec(v, var.shape(), &dev).unwrap())
                    .unwrap();
                loss(&c, x.as_tensor())
            };
            let fd = ((at(h) - at(-h)) / (2.0 * h as f64)) as f32;
            var.set(&Tensor::from_vec(base.clone(), var.shape(), &dev).unwrap())
                .unwrap();
            assert!(
                (fd - grad[i]).abs() <= 2e-2 * (1.0 + fd.abs()),
                "d/d{name}[{i}]: finite difference {fd} vs backward {}",
                grad[i]
            );
        }
    }
}
