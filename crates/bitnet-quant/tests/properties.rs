//! Property tests: outputs lie on the scheme's levels times the block scale, shapes are kept, and
//! per-channel quantization is per-tensor quantization applied row by row.

use bitnet_quant::{Estimator, Granularity, Quantizer, Scheme, Threshold};
use candle_core::{Device, Tensor};
use proptest::prelude::*;

fn schemes() -> impl Strategy<Value = Scheme> {
    prop_oneof![
        any::<bool>().prop_map(|scaled| Scheme::Binary { scaled }),
        Just(Scheme::BinaryCentered),
        Just(Scheme::TernaryAbsmean),
        Just(Scheme::TernaryAbsmeanHf),
        (0.0f32..1.0, any::<bool>()).prop_map(|(d, scaled)| Scheme::TernaryThreshold {
            threshold: Threshold::Fixed(d),
            scaled
        }),
        any::<bool>().prop_map(|scaled| Scheme::TernaryThreshold {
            threshold: Threshold::Twn,
            scaled
        }),
        (2u8..=8).prop_map(|bits| Scheme::MultiBit { bits }),
        Just(Scheme::Int8PerToken),
    ]
}

fn matrix() -> impl Strategy<Value = (usize, usize, Vec<f32>)> {
    (1usize..6, 1usize..9).prop_flat_map(|(r, c)| {
        (
            Just(r),
            Just(c),
            proptest::collection::vec(-3.0f32..3.0, r * c),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn outputs_are_levels_times_scale((r, c, xs) in matrix(), scheme in schemes(), per_row in any::<bool>()) {
        let g = if per_row { Granularity::PerChannel } else { Granularity::PerTensor };
        let q = Quantizer::new(scheme, Estimator::Identity).unwrap().with_granularity(g).unwrap();
        let x = Tensor::from_slice(&xs, (r, c), &Device::Cpu).unwrap();
        let y = q.quantize(&x).unwrap();
        prop_assert_eq!(y.dims(), &[r, c]);
        let ys = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (levels, params) = q.levels(&x).unwrap();
        let allowed = scheme.levels();
        let block = if per_row { c } else { r * c };
        for i in 0..ys.len() {
            prop_assert!(allowed.contains(&(levels[i] as i32)), "level {} not in {:?}", levels[i], allowed);
            let s = params[2 * (i / block)];
            let want = levels[i] as f32 * s;
            prop_assert!((ys[i] - want).abs() <= 1e-5 * want.abs().max(1.0), "{} vs {} * {}", ys[i], levels[i], s);
        }
    }

    #[test]
    fn per_channel_is_per_tensor_row_by_row((r, c, xs) in matrix(), scheme in schemes()) {
        let base = Quantizer::new(scheme, Estimator::Identity).unwrap();
        let per_row = base.with_granularity(Granularity::PerChannel).unwrap();
        let whole = base.with_granularity(Granularity::PerTensor).unwrap();
        let x = Tensor::from_slice(&xs, (r, c), &Device::Cpu).unwrap();
        let y = per_row.quantize(&x).unwrap().to_vec2::<f32>().unwrap();
        for (i, row) in y.iter().enumerate() {
            let xr = x.narrow(0, i, 1).unwrap();
            let yr = whole.quantize(&xr).unwrap().to_vec2::<f32>().unwrap();
            prop_assert_eq!(row, &yr[0]);
        }
    }

    #[test]
    fn shapes_are_kept(dims in proptest::collection::vec(1usize..5, 0..4), scheme in schemes()) {
        let n: usize = dims.iter().product();
        let x = Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap().affine(0.3, -1.0).unwrap().reshape(dims.as_slice()).unwrap();
        let q = Quantizer::new(scheme, Estimator::Identity).unwrap();
        let y = q.quantize(&x).unwrap();
        prop_assert_eq!(y.dims(), dims.as_slice());
    }
}
