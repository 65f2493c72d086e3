use super::*;
use crate::{BitLinearConfig, Estimator};
use candle_core::Device;

fn quantizer(bits: u8, g: Granularity) -> Quantizer {
    Quantizer::new(Scheme::MultiBit { bits }, Estimator::Identity)
        .unwrap()
        .with_granularity(g)
        .unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Weights with a spread of row norms and one outlier per row, so that levels use the whole
/// range and per-row scales differ.
fn weight(out: usize, inp: usize) -> Tensor {
    let v: Vec<f32> = (0..out * inp)
        .map(|k| {
            let (r, i) = (k / inp, k % inp);
            let base = ((k as f32) * 0.7311).sin() * (0.2 + 0.1 * r as f32);
            if i == (r * 13) % inp {
                base * 9.0
            } else {
                base
            }
        })
        .collect();
    Tensor::from_vec(v, (out, inp), &Device::Cpu).unwrap()
}

/// (bits, granularity, in): odd widths, per-group segments of odd length (4-bit segments that
/// start on a high nibble), per-tensor and per-channel scales.
const CASES: [(u8, Granularity, usize); 7] = [
    (4, Granularity::PerTensor, 301),
    (4, Granularity::PerChannel, 300),
    (4, Granularity::PerGroup(7), 301),
    (4, Granularity::PerGroup(64), 256),
    (8, Granularity::PerTensor, 129),
    (8, Granularity::PerChannel, 257),
    (8, Granularity::PerGroup(32), 96),
];

#[test]
fn packing_keeps_the_quantizers_levels_and_scales() {
    for (bits, g, inp) in CASES {
        let q = quantizer(bits, g);
        let w = weight(9, inp);
        let p = PackedMultiBit::pack(&w, &q).unwrap();
        let (levels, params) = q.levels(&w).unwrap();
        assert_eq!(p.levels(), levels, "{bits} {g:?} {inp}");
        let scales: Vec<f32> = params.chunks_exact(2).map(|s| s[0]).collect();
        assert_eq!(p.scales(), scales.as_slice());
        let qmax = (1i32 << (bits - 1)) - 1;
        let top = levels.iter().map(|&l| (l as i32).abs()).max();
        assert_eq!(top, Some(qmax), "full range used");
        assert_eq!(p.row_bytes(), if bits == 4 { inp.div_ceil(2) } else { inp });
        assert_eq!(p.size_bytes(), 9 * p.row_bytes() + 4 * scales.len());
        let want = q.quantize(&w).unwrap();
        let diff = max_abs(&(p.unpack().unwrap() - &want).unwrap());
        assert!(
            diff <= 1e-6 * max_abs(&want),
            "{bits} {g:?}: unpack differs by {diff}"
        );
        // The raw parts rebuild the same weight.
        let back = PackedMultiBit::from_raw(9, inp, g, bits, p.data(), p.scales()).unwrap();
        assert_eq!(back.data(), p.data());
    }
}

/// The training forward of a BitLinear with `bits`-bit weights, int8 tokens, a bias and
/// optionally its RMSNorm.
fn trained(bits: u8, g: Granularity, inp: usize, norm: bool) -> BitLinear {
    let dev = Device::Cpu;
    let out = 11;
    let config = BitLinearConfig {
        weight: quantizer(bits, g),
        bias: true,
        norm,
        ..Default::default()
    };
    let bias = Tensor::arange(0u32, out as u32, &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .affine(0.05, -0.2)
        .unwrap();
    let norm = norm.then(|| {
        let nw = Tensor::arange(0u32, inp as u32, &dev).unwrap();
        let nw = nw.to_dtype(DType::F32).unwrap().affine(0.002, 0.8).unwrap();
        RmsNorm::from_weight(nw, 1e-6)
    });
    BitLinear::from_parts(weight(out, inp), Some(bias), norm, config)
}

#[test]
fn forward_equals_the_training_forward() {
    let dev = Device::Cpu;
    for (bits, g, inp) in CASES {
        for norm in [false, true] {
            let layer = trained(bits, g, inp, norm);
            let packed = PackedMultiBitLinear::from_trained(&layer).unwrap();
            // 1 token, 5 tokens, and a [2, 3, in] batch; some tokens with an outlier.
            for shape in [vec![1, inp], vec![5, inp], vec![2, 3, inp]] {
                let x = Tensor::randn(0f32, 1.0, shape.clone(), &dev).unwrap();
                let x = x
                    .broadcast_mul(
                        &weight(1, inp)
                            .affine(3.0, 0.0)
                            .unwrap()
                            .squeeze(0)
                            .unwrap()
                            .exp()
                            .unwrap(),
                    )
                    .unwrap();
                let want = layer.forward(&x).unwrap();
                let got = packed.forward(&x).unwrap();
                assert_eq!(got.dims(), want.dims());
                let diff = max_abs(&(&got - &want).unwrap());
                assert!(
                    diff <= 1e-5 * max_abs(&want),
                    "{bits} {g:?} in {inp} norm {norm} {shape:?}: differs by {diff} (max {})",
                    max_abs(&want)
                );
            }
        }
    }
}

/// The integer kernel on every nibble value, -8 included (raw data; the quantizer never makes
/// -8), against levels times scales computed one weight at a time.
#[test]
fn kernel_matches_levels_times_scales_for_every_value() {
    let dev = Device::Cpu;
    for (bits, g, inp) in CASES {
        let out = 5;
        let rb = row_bytes(inp, bits);
        let mut data: Vec<u8> = (0..out * rb).map(|k| (k * 37 + 11) as u8).collect();
        if bits == 4 && inp % 2 == 1 {
            data.chunks_exact_mut(rb).for_each(|r| r[rb - 1] &= 0x0F);
        }
        let n = super::super::layout::scale_count(out, inp, g).unwrap();
        let scales: Vec<f32> = (0..n).map(|k| 0.01 + 0.003 * k as f32).collect();
        let w = PackedMultiBit::from_raw(out, inp, g, bits, &data, &scales).unwrap();
        let lo = if bits == 4 { -8 } else { -128 };
        assert!(
            w.levels().contains(&lo),
            "{bits}: the lowest level is exercised"
        );
        let layer = PackedMultiBitLinear::from_parts(w.clone(), None, None).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, inp), &dev).unwrap();
        let got = layer.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        // The int8 tokens through the Int8PerToken quantizer itself, then f64 sums.
        let act = Quantizer::new(Scheme::Int8PerToken, Estimator::Identity).unwrap();
        let xq = act.quantize(&x).unwrap().to_vec2::<f32>().unwrap();
        let wf = w.unpack().unwrap().to_vec2::<f32>().unwrap();
        for (t, xrow) in xq.iter().enumerate() {
            for (r, wrow) in wf.iter().enumerate() {
                let want: f64 = xrow
                    .iter()
                    .zip(wrow)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                let tol = 1e-5 * (1.0 + want.abs());
                assert!(
                    (got[t][r] as f64 - want).abs() <= tol,
                    "{bits} {g:?} [{t}, {r}]: {} vs {want}",
                    got[t][r]
                );
            }
        }
    }
}

#[test]
fn bad_configs_and_inputs_are_errors_naming_what_is_wrong() {
    let dev = Device::Cpu;
    let w = weight(4, 64);
    let ternary = Quantizer::new(Scheme::TernaryAbsmean, Estimator::Identity).unwrap();
    let blended = quantizer(4, Granularity::PerTensor)
        .with_lambda(0.5)
        .unwrap();
    let errs = [
        (
            PackedMultiBit::pack(&w, &ternary).unwrap_err(),
            "weight.scheme",
        ),
        (
            PackedMultiBit::pack(&w, &quantizer(2, Granularity::PerTensor)).unwrap_err(),
            "weight.scheme",
        ),
        (
            PackedMultiBit::pack(&w, &blended).unwrap_err(),
            "weight.lambda",
        ),
        (
            PackedMultiBit::pack(
                &w.flatten_all().unwrap(),
                &quantizer(4, Granularity::PerTensor),
            )
            .unwrap_err(),
            "[out, in]",
        ),
        (
            PackedMultiBit::from_raw(4, 64, Granularity::PerTensor, 3, &[0; 128], &[1.0])
                .unwrap_err(),
            "bits",
        ),
        (
            PackedMultiBit::from_raw(4, 64, Granularity::PerTensor, 4, &[0; 127], &[1.0])
                .unwrap_err(),
            "127 packed bytes",
        ),
        (
            PackedMultiBit::from_raw(4, 64, Granularity::PerChannel, 4, &[0; 128], &[1.0])
                .unwrap_err(),
            "1 scales, expected 4",
        ),
        (
            PackedMultiBit::from_raw(4, 64, Granularity::PerTensor, 8, &[0; 256], &[f32::NAN])
                .unwrap_err(),
            "scale 0 is NaN",
        ),
        (
            PackedMultiBit::from_raw(1, 3, Granularity::PerTensor, 4, &[0, 0x10], &[1.0])
                .unwrap_err(),
            "padding nibble of row 0",
        ),
        (
            PackedMultiBit::from_raw(2, 64, Granularity::PerGroup(48), 8, &[0; 128], &[1.0; 2])
                .unwrap_err(),
            "PerGroup",
        ),
    ];
    for (e, want) in errs {
        assert!(e.to_string().contains(want), "{e} should name {want}");
    }
    let mut layer = trained(4, Granularity::PerChannel, 64, false);
    let packed = PackedMultiBitLinear::from_trained(&layer).unwrap();
    let forward_errs = [
        (
            packed
                .forward(&Tensor::zeros((2, 63), DType::F32, &dev).unwrap())
                .unwrap_err(),
            "expected last dimension 64",
        ),
        (
            packed
                .forward(&Tensor::zeros((2, 64), DType::U32, &dev).unwrap())
                .unwrap_err(),
            "dtype",
        ),
        (
            packed
                .forward(&Tensor::full(f32::NAN, (2, 64), &dev).unwrap())
                .unwrap_err(),
            "NaN",
        ),
    ];
    for (e, want) in forward_errs {
        assert!(e.to_string().contains(want), "{e} should name {want}");
    }
    let bias = Tensor::zeros(5, DType::F32, &dev).unwrap();
    let e =
        PackedMultiBitLinear::from_parts(packed.weight().clone(), Some(&bias), None).unwrap_err();
    assert!(e.to_string().contains("bias [5], expected [11]"), "{e}");
    let mut cfg = *layer.config();
    cfg.activation = None;
    layer = BitLinear::from_parts(layer.weight().clone(), None, None, cfg);
    let e = PackedMultiBitLinear::from_trained(&layer).unwrap_err();
    assert!(e.to_string().contains("activation"), "{e}");
    // An empty batch is an empty output, not an error.
    let y = packed
        .forward(&Tensor::zeros((0, 64), DType::F32, &dev).unwrap())
        .unwrap();
    assert_eq!(y.dims(), &[0, 11]);
}
