//! BitLinear's forward against the formula written out with plain tensor ops, and its gradients.

use bitnet_quant::{BitLinear, BitLinearConfig, Estimator, Quantizer, RmsNorm, Scheme};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{VarBuilder, VarMap};

fn reference(x: &Tensor, w: &Tensor, norm_w: &Tensor) -> Tensor {
    // RMSNorm
    let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let xn = x
        .broadcast_div(&(ms + 1e-6).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(norm_w)
        .unwrap();
    // int8 absmax per row, BitNet's reference formula
    let m = xn
        .abs()
        .unwrap()
        .max_keepdim(D::Minus1)
        .unwrap()
        .clamp(1e-5f32, f32::MAX)
        .unwrap();
    let s = (m.recip().unwrap() * 127.0).unwrap();
    let xq = xn
        .broadcast_mul(&s)
        .unwrap()
        .round()
        .unwrap()
        .clamp(-128f32, 127f32)
        .unwrap()
        .broadcast_div(&s)
        .unwrap();
    // absmean ternary
    let g = w.abs().unwrap().mean_all().unwrap();
    let wq = w
        .broadcast_div(&(&g + 1e-5).unwrap())
        .unwrap()
        .round()
        .unwrap()
        .clamp(-1f32, 1f32)
        .unwrap()
        .broadcast_mul(&g)
        .unwrap();
    xq.matmul(&wq.t().unwrap()).unwrap()
}

#[test]
fn forward_matches_the_b158_formula() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let layer = BitLinear::new(37, 11, vb.pp("l")).unwrap();
    // A norm weight away from 1 so that the test sees it.
    let nw = Tensor::arange(0f32, 37., &dev)
        .unwrap()
        .affine(0.01, 0.8)
        .unwrap();
    vm.data().lock().unwrap()["l.norm.weight"].set(&nw).unwrap();
    let x = Tensor::randn(0f32, 1.0, (5, 37), &dev).unwrap();
    let got = layer.forward(&x).unwrap();
    let want = reference(&x, layer.weight(), &nw);
    // candle's round is half away from zero, ours half to even: ties have probability ~0 here.
    let diff = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-4, "max diff {diff}");
}

#[test]
fn gradients_reach_latent_weight_norm_weight_and_bias() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let cfg = BitLinearConfig {
        bias: true,
        ..BitLinearConfig::default()
    };
    let layer = BitLinear::with_config(8, 3, cfg, vb.pp("l")).unwrap();
    let x = Tensor::randn(0f32, 1.0, (4, 8), &dev).unwrap();
    let grads = layer
        .forward(&x)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let data = vm.data().lock().unwrap();
    for name in ["l.weight", "l.bias", "l.norm.weight"] {
        let g = grads
            .get(&data[name])
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "zero gradient for {name}");
    }
}

#[test]
fn rms_norm_weight_learns_where_candle_nn_fast_path_does_not() {
    let dev = Device::Cpu;
    let w = candle_core::Var::new(&[1.0f32, 2.0, 3.0], &dev).unwrap();
    let x = Tensor::new(&[[1.0f32, -2.0, 0.5]], &dev).unwrap();
    let ours = RmsNorm::from_weight(w.as_tensor().clone(), 1e-6);
    let g = ours
        .forward(&x)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    // d/dw_i sum(x_i / rms * w_i) = x_i / rms, rms = sqrt((1 + 4 + 0.25) / 3 + 1e-6)
    let rms = ((5.25f32 / 3.0) + 1e-6).sqrt();
    let got = g.get(&w).unwrap().to_vec1::<f32>().unwrap();
    for (gv, xv) in got.iter().zip([1.0f32, -2.0, 0.5]) {
        assert!((gv - xv / rms).abs() < 1e-6, "{gv} vs {}", xv / rms);
    }
    let theirs = candle_nn::RmsNorm::new(w.as_tensor().clone(), 1e-6);
    let g = theirs.forward(&x).unwrap().sum_all().unwrap().backward();
    let reached = g
        .ok()
        .and_then(|g| g.get(&w).map(|t| t.to_vec1::<f32>().unwrap()));
    assert!(
        reached.as_ref().is_none_or(|v| v.iter().all(|&x| x == 0.0)),
        "candle-nn's fast path now has a backward: {reached:?}"
    );
}

#[test]
fn custom_quantizers_are_used() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let cfg = BitLinearConfig {
        norm: false,
        activation: None,
        weight: Quantizer::new(Scheme::Binary { scaled: false }, Estimator::Identity).unwrap(),
        ..BitLinearConfig::default()
    };
    let layer = BitLinear::with_config(4, 2, cfg, vb).unwrap();
    let x = Tensor::new(&[[1.0f32, 2.0, 3.0, 4.0]], &dev).unwrap();
    let sign = layer
        .weight()
        .ge(0f64)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .affine(2.0, -1.0)
        .unwrap();
    let want = x
        .matmul(&sign.t().unwrap())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(layer.forward(&x).unwrap().to_vec2::<f32>().unwrap(), want);
}
