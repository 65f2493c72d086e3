//! Bad configs fail at construction naming the field; bad inputs give errors, never panics.

use bitnet_quant::ops::lsq::LsqOp;
use bitnet_quant::{Estimator, Granularity, Quantizer, Scheme, Threshold};
use candle_core::{DType, Device, Tensor};

#[test]
fn invalid_configs_name_their_field() {
    let id = Estimator::Identity;
    let ter = Scheme::TernaryAbsmean;
    let cases: Vec<(&str, candle_core::Result<Quantizer>)> = vec![
        ("bits", Quantizer::new(Scheme::MultiBit { bits: 1 }, id)),
        ("bits", Quantizer::new(Scheme::MultiBit { bits: 9 }, id)),
        (
            "threshold",
            Quantizer::new(
                Scheme::TernaryThreshold {
                    threshold: Threshold::Fixed(-0.1),
                    scaled: false,
                },
                id,
            ),
        ),
        (
            "threshold",
            Quantizer::new(
                Scheme::TernaryThreshold {
                    threshold: Threshold::Fixed(f32::NAN),
                    scaled: true,
                },
                id,
            ),
        ),
        (
            "clip",
            Quantizer::new(ter, Estimator::Clipped { clip: 0.0 }),
        ),
        (
            "temperature",
            Quantizer::new(ter, Estimator::SoftTanh { temperature: -1.0 }),
        ),
        (
            "temperature",
            Quantizer::new(
                ter,
                Estimator::SoftSigmoid {
                    temperature: f32::INFINITY,
                },
            ),
        ),
        (
            "beta",
            Quantizer::new(ter, Estimator::SwishSign { beta: 0.0 }),
        ),
        (
            "group_size",
            Quantizer::new(ter, id).and_then(|q| q.with_granularity(Granularity::PerGroup(0))),
        ),
        (
            "lambda",
            Quantizer::new(ter, id).and_then(|q| q.with_lambda(1.5)),
        ),
    ];
    for (field, r) in cases {
        let e = r.expect_err(field).to_string();
        assert!(
            e.contains(&format!("`{field}`")),
            "error for {field} does not name it: {e}"
        );
        assert!(
            e.contains("allowed"),
            "error for {field} gives no range: {e}"
        );
    }
    assert!(LsqOp::new(1, Granularity::PerTensor)
        .unwrap_err()
        .to_string()
        .contains("`bits`"));
}

#[test]
fn bad_inputs_are_errors() {
    let dev = Device::Cpu;
    let qz = Quantizer::new(Scheme::TernaryAbsmean, Estimator::Identity).unwrap();
    let grouped = qz.with_granularity(Granularity::PerGroup(3)).unwrap();
    let x4 = Tensor::ones((2, 4), DType::F32, &dev).unwrap();
    let e = grouped.quantize(&x4).unwrap_err().to_string();
    assert!(
        e.contains("group_size") && e.contains("last dimension 4"),
        "{e}"
    );

    let empty = Tensor::zeros((0, 4), DType::F32, &dev).unwrap();
    assert!(qz
        .quantize(&empty)
        .unwrap_err()
        .to_string()
        .contains("empty"));

    let ints = Tensor::new(&[1u32, 2], &dev).unwrap();
    assert!(qz
        .quantize(&ints)
        .unwrap_err()
        .to_string()
        .contains("dtype"));

    // A learnable temperature that is not a finite number > 0 (the GPUs check it as well, in
    // tests/{cuda,metal}.rs); one LSQ step size per block.
    let x = Tensor::new(&[0.5f32, -1.0, 1.0, 0.25], &dev).unwrap();
    for t in [0.0f32, -2.0, f32::NAN] {
        let t = Tensor::new(&[t], &dev).unwrap();
        let e = qz.quantize_learnable(&x, &t, 0.5).unwrap_err().to_string();
        assert!(e.contains("`temperature`") && e.contains("> 0"), "{e}");
    }
    let four = Quantizer::new(Scheme::MultiBit { bits: 4 }, Estimator::Identity).unwrap();
    let e = four
        .quantize_lsq(&x, &Tensor::new(&[0.1f32, 0.2], &dev).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("step sizes"), "{e}");
    let e = qz.quantize_lsq(&x, &Tensor::new(&[0.1f32], &dev).unwrap());
    assert!(e.unwrap_err().to_string().contains("`scheme`"));

    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let x = Tensor::new(&[0.5f32, bad, 1.0, bad], &dev).unwrap();
        for scheme in [
            Scheme::TernaryAbsmean,
            Scheme::Binary { scaled: false },
            Scheme::BinaryCentered,
            Scheme::Int8PerToken,
        ] {
            let q = Quantizer::new(scheme, Estimator::Identity).unwrap();
            let e = q.quantize(&x).unwrap_err().to_string();
            assert!(e.contains("2 NaN or infinite"), "{scheme:?} {bad}: {e}");
        }
    }
}
