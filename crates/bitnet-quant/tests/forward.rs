//! Forward values of every scheme on hand-checked inputs: zero, ties at .5, threshold boundaries.

use bitnet_quant::{Estimator, Granularity, Quantizer, Scheme, Threshold, EPS};
use candle_core::{DType, Device, Tensor};

fn q(scheme: Scheme, g: Granularity, x: &[f32], shape: (usize, usize)) -> Vec<f32> {
    let t = Tensor::from_slice(x, shape, &Device::Cpu).unwrap();
    let qz = Quantizer::new(scheme, Estimator::Identity)
        .unwrap()
        .with_granularity(g)
        .unwrap();
    qz.quantize(&t)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// (name, scheme, granularity, input, shape, expected output)
type Case = (
    &'static str,
    Scheme,
    Granularity,
    Vec<f32>,
    (usize, usize),
    Vec<f32>,
);

#[test]
fn forward_table() {
    use Granularity::*;
    let bin = |scaled| Scheme::Binary { scaled };
    let thr = |d, scaled| Scheme::TernaryThreshold {
        threshold: Threshold::Fixed(d),
        scaled,
    };
    let twn = |scaled| Scheme::TernaryThreshold {
        threshold: Threshold::Twn,
        scaled,
    };
    // absmean: g = mean|x| = (0.5 + 0.5 + 1.5 + 0) / 4 = 0.625; x / g = 0.8, -0.8, 2.4, 0.
    let g = 0.625f32;
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        // sign(0) = +1, including -0.0.
        ("binary unscaled", bin(false), PerTensor, vec![0.0, -0.0, 0.5, -0.5, 2.0, -1e-8], (1, 6), vec![1., 1., 1., -1., 1., -1.]),
        // s = mean|x| = 6 / 4.
        ("binary scaled", bin(true), PerTensor, vec![1.0, -2.0, 0.0, 3.0], (1, 4), vec![1.5, -1.5, 1.5, 1.5]),
        ("binary scaled per row", bin(true), PerChannel, vec![1.0, -3.0, 0.5, 0.5], (2, 2), vec![2., -2., 0.5, 0.5]),
        // BitNet b1: sign(x - mean) * mean|x|; mean 0.5, so 0 is below the threshold.
        ("binary centered", Scheme::BinaryCentered, PerTensor, vec![1.0, -2.0, 0.0, 3.0], (1, 4), vec![1.5, -1.5, -1.5, 1.5]),
        // A value equal to the mean is on the + side (sign(0) = +1).
        ("binary centered tie", Scheme::BinaryCentered, PerTensor, vec![0.25, 0.75, 0.5, 0.5], (1, 4), vec![-0.5, 0.5, 0.5, 0.5]),
        // Rows [1, 3] (mean 2, s 2) and [-1, -5] (mean -3, s 3).
        ("binary centered per row", Scheme::BinaryCentered, PerChannel, vec![1.0, 3.0, -1.0, -5.0], (2, 2), vec![-2., 2., 3., -3.]),
        // Groups [2, 4] (mean 3, s 3) and [-1, 1] (mean 0, s 1).
        ("binary centered per group", Scheme::BinaryCentered, PerGroup(2), vec![2.0, 4.0, -1.0, 1.0], (1, 4), vec![-3., 3., -1., 1.]),
        ("absmean", Scheme::TernaryAbsmean, PerTensor, vec![0.5, -0.5, 1.5, 0.0], (1, 4), vec![g, -g, g, 0.0]),
        // All zero: g = 0, the eps keeps it finite and every level is 0.
        ("absmean zeros", Scheme::TernaryAbsmean, PerTensor, vec![0.0; 4], (2, 2), vec![0.0; 4]),
        // Hugging Face: 1 / (1 / 0.625) is 0.625 in f32, the same levels as above.
        ("absmean hf", Scheme::TernaryAbsmeanHf, PerTensor, vec![0.5, -0.5, 1.5, 0.0], (1, 4), vec![g, -g, g, 0.0]),
        ("absmean hf zeros", Scheme::TernaryAbsmeanHf, PerTensor, vec![0.0; 4], (2, 2), vec![0.0; 4]),
        // Where the conventions part: g = 1e-4, so g + eps is 10 % above g. x / g = 0.54 and
        // 1.46 round to 1 and 1 (HF), x / (g + eps) = 0.49 and 1.33 to 0 and 1 (the paper's).
        ("absmean hf small", Scheme::TernaryAbsmeanHf, PerTensor, vec![0.54e-4, -1.46e-4], (1, 2), vec![1e-4, -1e-4]),
        ("absmean paper small", Scheme::TernaryAbsmean, PerTensor, vec![0.54e-4, -1.46e-4], (1, 2), vec![0.0, -1e-4]),
        // Below the floor: g = 2e-6 < eps, so the scale is 1e-5 and x * 1e5 = 0.1, 0.7 -> 0, 1.
        ("absmean hf floor", Scheme::TernaryAbsmeanHf, PerTensor, vec![1e-6, 7e-6, 0.0, 0.0], (1, 4), vec![0.0, 1e-5, 0.0, 0.0]),
        // Strict threshold: |x| == D gives 0.
        ("threshold fixed", thr(0.5, false), PerTensor, vec![0.5, -0.5, 0.51, -0.51, 0.0, 7.0], (1, 6), vec![0., 0., 1., -1., 0., 1.]),
        // s = mean of |x| above D = (1 + 2) / 2.
        ("threshold fixed scaled", thr(0.5, true), PerTensor, vec![1.0, -2.0, 0.3, 0.5], (1, 4), vec![1.5, -1.5, 0., 0.]),
        // Nothing above D: s = 0, all zero.
        ("threshold scaled none above", thr(5.0, true), PerTensor, vec![1.0, -2.0, 0.3, 0.5], (1, 4), vec![0.; 4]),
        // D = 0.7 * 3.5 / 4 = 0.6125.
        ("twn", twn(false), PerTensor, vec![2.0, -1.0, 0.2, 0.6], (1, 4), vec![1., -1., 0., 0.]),
        ("twn scaled", twn(true), PerTensor, vec![2.0, -1.0, 0.2, 0.6], (1, 4), vec![1.5, -1.5, 0., 0.]),
        // 2 bits: qmax 1, qmin -2, m = 2, x * 1/2 = 1, -1, .45, .5 (tie to even: 0), -.75.
        ("2 bits", Scheme::MultiBit { bits: 2 }, PerTensor, vec![2.0, -2.0, 0.9, 1.0, -1.5], (1, 5), vec![2., -2., 0., 0., -2.]),
        // 3 bits: qmax 3, m = 3, step 1: ties 1.5 -> 2, .5 -> 0, -2.5 -> -2.
        ("3 bits", Scheme::MultiBit { bits: 3 }, PerTensor, vec![3.0, -3.0, 1.5, 0.5, -2.5, 2.6], (1, 6), vec![3., -3., 2., 0., -2., 3.]),
        // int8: m = 127, step 1, ties to even; a zero row stays zero.
        ("int8 per token", Scheme::Int8PerToken, PerChannel, vec![127., 0.5, 1.5, 2.5, -0.5, -1.5, 0., 0., 0., 0., 0., 0.], (2, 6), vec![127., 0., 2., 2., 0., -2., 0., 0., 0., 0., 0., 0.]),
        // Per tensor: the second row's 254 sets m, step 2.
        ("int8 per tensor", Scheme::Int8PerToken, PerTensor, vec![127., 3.0, 254., -1.0], (2, 2), vec![128., 4., 254., -0.]),
        // Groups of 2 along the row: [1, -4] has g = 2.5, [0.2, 0.2] has g = 0.2.
        ("absmean per group", Scheme::TernaryAbsmean, PerGroup(2), vec![1.0, -4.0, 0.2, 0.2], (1, 4), vec![0., -2.5, 0.2, 0.2]),
    ];
    for (name, scheme, gran, x, shape, want) in cases {
        let got = q(scheme, gran, &x, shape);
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{name}[{i}]: got {g}, want {w}"
            );
        }
    }
}

#[test]
fn absmean_rounds_at_half_of_the_scale() {
    // Values just below and above half of (g + eps) round to 0 and 1.
    let g = 1.0f32;
    let half = 0.5 * (g + EPS);
    let x = [
        half * 0.999,
        half * 1.001,
        -half * 1.001,
        4.0 - half * 0.999 - half * 1.001 - half * 1.001,
    ];
    // mean|x| = 1 by construction of the last value.
    let got = q(Scheme::TernaryAbsmean, Granularity::PerTensor, &x, (1, 4));
    let s: f32 = x.iter().map(|v| v.abs()).sum::<f32>() / 4.0;
    assert!((s - 1.0).abs() < 1e-6);
    assert_eq!(got[0], 0.0);
    assert!(
        (got[1] - s).abs() < 1e-6 && (got[2] + s).abs() < 1e-6,
        "{got:?}"
    );
}

#[test]
fn other_float_dtypes_compute_in_f32_and_keep_their_dtype() {
    let x = Tensor::new(&[[0.5f32, -0.5, 1.5, 0.0]], &Device::Cpu).unwrap();
    let qz = Quantizer::new(Scheme::TernaryAbsmean, Estimator::Identity).unwrap();
    let want = qz.quantize(&x).unwrap().to_vec2::<f32>().unwrap();
    for dt in [DType::F16, DType::BF16, DType::F64] {
        let y = qz.quantize(&x.to_dtype(dt).unwrap()).unwrap();
        assert_eq!(y.dtype(), dt);
        let y = y.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
        for (a, b) in y[0].iter().zip(&want[0]) {
            assert!((a - b).abs() < 1e-2, "{dt:?}: {a} vs {b}");
        }
    }
}

#[test]
fn non_contiguous_input_matches_its_contiguous_copy() {
    let x = Tensor::arange(0f32, 24., &Device::Cpu)
        .unwrap()
        .affine(0.1, -1.1)
        .unwrap()
        .reshape((4, 6))
        .unwrap();
    let xt = x.t().unwrap(); // 6 x 4, strided
    assert!(!xt.is_contiguous());
    for scheme in [
        Scheme::TernaryAbsmean,
        Scheme::BinaryCentered,
        Scheme::Int8PerToken,
        Scheme::MultiBit { bits: 4 },
    ] {
        for g in [
            Granularity::PerTensor,
            Granularity::PerChannel,
            Granularity::PerGroup(2),
        ] {
            let qz = Quantizer::new(scheme, Estimator::Identity)
                .unwrap()
                .with_granularity(g)
                .unwrap();
            let a = qz.quantize(&xt).unwrap().to_vec2::<f32>().unwrap();
            let b = qz
                .quantize(&xt.contiguous().unwrap())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            assert_eq!(a, b, "{scheme:?} {g:?}");
        }
    }
}

#[test]
fn blend_interpolates_between_input_and_quantized() {
    let x = Tensor::new(&[[0.4f32, -0.1, 0.0, -0.9]], &Device::Cpu).unwrap();
    let base = Quantizer::new(Scheme::TernaryAbsmean, Estimator::Identity).unwrap();
    let full = base.quantize(&x).unwrap().to_vec2::<f32>().unwrap()[0].clone();
    for lambda in [0.0f32, 0.25, 0.5, 1.0] {
        let y = base
            .with_lambda(lambda)
            .unwrap()
            .quantize(&x)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (i, xv) in [0.4f32, -0.1, 0.0, -0.9].iter().enumerate() {
            let want = xv + lambda * (full[i] - xv);
            assert!(
                (y[0][i] - want).abs() < 1e-6,
                "lambda {lambda}: {} vs {want}",
                y[0][i]
            );
        }
    }
}

#[test]
fn levels_and_scales_are_exposed() {
    let x = Tensor::new(&[[0.5f32, -0.5], [1.5, 0.0]], &Device::Cpu).unwrap();
    let qz = Quantizer::new(Scheme::TernaryAbsmean, Estimator::Identity)
        .unwrap()
        .with_granularity(Granularity::PerChannel)
        .unwrap();
    let (levels, params) = qz.levels(&x).unwrap();
    assert_eq!(levels, vec![1, -1, 1, 0]);
    // (s, aux) per row: means 0.5 and 0.75.
    assert_eq!(params, vec![0.5, 0.0, 0.75, 0.0]);
}
