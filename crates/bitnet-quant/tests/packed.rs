//! Packed inference: layout round trips, the Hugging Face layout, equality with the training
//! forward, the file format and its loader's errors, and files mixing ternary, binary, 4-bit
//! and 8-bit layers.

use bitnet_quant::packed::{
    self, load_packed, load_packed_bytes, load_packed_layers, load_packed_layers_bytes,
    save_packed, save_packed_layers, HfLinearClass, Kernel, PackedBitLinear, PackedLayer,
    PackedTernary,
};
use bitnet_quant::{
    BitLinear, BitLinearConfig, Estimator, Granularity, Quantizer, RmsNorm, Scheme, Threshold,
};
use candle_core::{DType, Device, Module, Result, Tensor};
use proptest::prelude::*;
use std::collections::HashMap;

fn weight_quantizers() -> Vec<Quantizer> {
    let schemes = [
        Scheme::TernaryAbsmean,
        Scheme::TernaryAbsmeanHf,
        Scheme::TernaryThreshold {
            threshold: Threshold::Twn,
            scaled: true,
        },
        Scheme::Binary { scaled: true },
        Scheme::BinaryCentered,
    ];
    schemes
        .into_iter()
        .map(|s| Quantizer::new(s, Estimator::Identity).unwrap())
        .collect()
}

fn randn(shape: (usize, usize), seed: u64) -> Tensor {
    // Deterministic values without a seeded candle RNG: a cheap hash spread over [-1, 1].
    let n = shape.0 * shape.1;
    let v: Vec<f32> = (0..n as u64)
        .map(|i| {
            let h =
                (i ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            let h = (h ^ (h >> 31)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((h >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The largest |value| of `t`, at least 1: what an output difference is measured against.
fn magnitude(t: &Tensor) -> Result<f32> {
    Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1.0))
}

fn text(e: &candle_core::Error) -> String {
    format!("{e} {e:?}")
}

#[test]
fn unpack_equals_quantize_for_every_scheme_and_granularity() -> Result<()> {
    for (k, &(out, inp)) in [(5, 7), (3, 130), (17, 256), (4, 384), (9, 64)]
        .iter()
        .enumerate()
    {
        for q in weight_quantizers() {
            let mut grans = vec![Granularity::PerTensor, Granularity::PerChannel];
            if inp % 32 == 0 {
                grans.push(Granularity::PerGroup(32));
            }
            if inp % 192 == 0 {
                grans.push(Granularity::PerGroup(192));
            }
            for g in grans {
                let q = q.with_granularity(g)?;
                let w = randn((out, inp), k as u64);
                let p = PackedTernary::pack(&w, &q)?;
                assert_eq!(
                    max_abs_diff(&p.unpack()?, &q.quantize(&w)?),
                    0.0,
                    "{q:?} {out}x{inp}"
                );
                let (levels, _) = q.levels(&w)?;
                assert_eq!(p.levels(), levels);
            }
        }
    }
    Ok(())
}

#[test]
fn kernel_layout_matches_the_documentation() -> Result<()> {
    // One row of 128 weights: weight i has level (i % 3) - 1. Byte b holds weights b, b+32,
    // b+64, b+96 in bits 0-1, 2-3, 4-5, 6-7, code = level + 1.
    let levels: Vec<f32> = (0..128).map(|i| (i % 3) as f32 - 1.0).collect();
    let w = Tensor::from_vec(levels, (1, 128), &Device::Cpu)?;
    let q = Quantizer::new(
        Scheme::TernaryThreshold {
            threshold: Threshold::Fixed(0.5),
            scaled: false,
        },
        Estimator::Identity,
    )?;
    let p = PackedTernary::pack(&w, &q)?;
    let expect: Vec<u8> = (0..32)
        .map(|b| (0..4).map(|j| ((b + 32 * j) % 3) << (2 * j)).sum::<usize>() as u8)
        .collect();
    assert_eq!(p.data(), &expect[..]);
    assert_eq!(p.scales(), &[1.0]);
    Ok(())
}

#[test]
fn binary_weights_pack_at_one_bit_in_the_documented_layout() -> Result<()> {
    // 200 inputs: one full 128-weight block and one padded block. Weight i is +1 when i % 5 < 2.
    let signs: Vec<f32> = (0..200)
        .map(|i| if i % 5 < 2 { 0.7 } else { -0.3 })
        .collect();
    let w = Tensor::from_vec(signs, (1, 200), &Device::Cpu)?;
    let q = Quantizer::new(Scheme::Binary { scaled: false }, Estimator::Identity)?;
    let p = PackedTernary::pack(&w, &q)?;
    assert_eq!(p.bits(), 1);
    assert_eq!(p.row_bytes(), 2 * 16);
    // Byte b of block k holds weights 128 k + b + 16 j in bit j; padding bits are 0.
    let expect: Vec<u8> = (0..32)
        .map(|byte| {
            let (k, b) = (byte / 16, byte % 16);
            (0..8)
                .map(|j| {
                    let i = 128 * k + b + 16 * j;
                    ((i < 200 && i % 5 < 2) as u8) << j
                })
                .sum::<u8>()
        })
        .collect();
    assert_eq!(p.data(), &expect[..]);
    assert_eq!(max_abs_diff(&p.unpack()?, &q.quantize(&w)?), 0.0);
    // Ternary schemes keep 2 bits.
    let t = Quantizer::new(Scheme::TernaryAbsmean, Estimator::Identity)?;
    assert_eq!(PackedTernary::pack(&w, &t)?.bits(), 2);
    Ok(())
}

/// BitNet b1's centered binary weights pack at 1 bit too: the bit is `w >= mean(w)` of the
/// weight's block, the scale `mean|w|`. Weights shifted off zero put many values between 0 and
/// the mean, where the centered and the plain sign disagree.
#[test]
fn centered_binary_packs_the_sign_of_w_minus_its_mean() -> Result<()> {
    let w = (randn((6, 256), 4) + 0.3)?;
    let rows = w.to_vec2::<f32>()?;
    for g in [Granularity::PerTensor, Granularity::PerChannel] {
        let q = Quantizer::new(Scheme::BinaryCentered, Estimator::Identity)?.with_granularity(g)?;
        let p = PackedTernary::pack(&w, &q)?;
        assert_eq!(p.bits(), 1);
        let mean = |r: &[f32]| r.iter().map(|&v| v as f64).sum::<f64>() / r.len() as f64;
        let mean_abs = |r: &[f32]| r.iter().map(|&v| v.abs() as f64).sum::<f64>() / r.len() as f64;
        let all: Vec<f32> = rows.concat();
        let levels = p.levels();
        let mut disagree = 0;
        for (r, row) in rows.iter().enumerate() {
            let block: &[f32] = if g == Granularity::PerTensor {
                &all
            } else {
                row
            };
            let (c, s) = (mean(block) as f32, mean_abs(block) as f32);
            let scale = p.scales()[if g == Granularity::PerTensor { 0 } else { r }];
            assert!(
                (scale - s).abs() <= 1e-6 * s,
                "{g:?} row {r}: scale {scale} vs {s}"
            );
            for (i, &v) in row.iter().enumerate() {
                let want: i8 = if v >= c { 1 } else { -1 };
                assert_eq!(
                    levels[r * 256 + i],
                    want,
                    "{g:?} w[{r}][{i}] = {v}, mean {c}"
                );
                disagree += (want != if v >= 0.0 { 1 } else { -1 }) as usize;
            }
        }
        assert!(
            disagree > 20,
            "{g:?}: only {disagree} values between 0 and the mean"
        );
        assert_eq!(max_abs_diff(&p.unpack()?, &q.quantize(&w)?), 0.0);
    }
    Ok(())
}

#[test]
fn binary_size_is_about_one_eighth_byte_per_weight() -> Result<()> {
    let q = Quantizer::new(Scheme::Binary { scaled: true }, Estimator::Identity)?;
    for (out, inp) in [(64, 4096), (32, 6912)] {
        let p = PackedTernary::pack(&randn((out, inp), 3), &q)?;
        // 1/8 byte per weight plus one f32 scale for the whole tensor.
        let want = 0.125 + 4.0 / (out * inp) as f64;
        assert_eq!(p.bytes_per_weight(), want, "{out}x{inp}");
    }
    Ok(())
}

#[test]
fn raw_binary_data_is_checked() -> Result<()> {
    let q = Quantizer::new(Scheme::Binary { scaled: true }, Estimator::Identity)?;
    let p = PackedTernary::pack(&randn((3, 100), 9), &q)?;
    let ok = PackedTernary::from_raw_bits(3, 100, Granularity::PerTensor, 1, p.data(), p.scales())?;
    assert_eq!(ok.levels(), p.levels());
    // Input 100 is padding (100 inputs padded to 128): byte 100 % 16 = 4 of the block, bit 6.
    let mut data = p.data().to_vec();
    data[4] |= 1 << 6;
    let e = PackedTernary::from_raw_bits(3, 100, Granularity::PerTensor, 1, &data, p.scales())
        .unwrap_err();
    assert!(text(&e).contains("padding bit 100"), "{e}");
    let e = PackedTernary::from_raw_bits(3, 100, Granularity::PerTensor, 3, p.data(), p.scales())
        .unwrap_err();
    assert!(text(&e).contains("bits"), "{e}");
    // The 2-bit reading of 1-bit data has the wrong length.
    assert!(PackedTernary::from_raw(3, 100, Granularity::PerTensor, p.data(), p.scales()).is_err());
    Ok(())
}

#[test]
fn hf_layout_matches_a_hand_made_example() -> Result<()> {
    // Levels of a [5, 2] weight; mean|w| = 0.7 so absmean gives back exactly these levels.
    let w = Tensor::new(
        &[[1f32, -1.], [0., 1.], [-1., 0.], [1., 1.], [0., -1.]],
        &Device::Cpu,
    )?;
    let q = Quantizer::new(Scheme::TernaryAbsmean, Estimator::Identity)?;
    let p = PackedTernary::pack(&w, &q)?;
    let (packed, scale) = p.to_hf(HfLinearClass::BitLinear)?;
    // ceil(5 / 4) = 2 packed rows. Packed row 0 holds original rows 0, 2, 4 (slots 0, 1, 2);
    // row 1 holds rows 1 and 3. Codes: r0 [2, 0], r1 [1, 2], r2 [0, 1], r3 [2, 2], r4 [1, 0].
    // The zero shifts spell out the slot each code lands in.
    #[allow(clippy::identity_op)]
    let expect: [[u8; 2]; 2] = [
        [2 | (0 << 2) | (1 << 4), (1 << 2)], // [18, 4]
        [1 | (2 << 2), 2 | (2 << 2)],        // [9, 10]
    ];
    assert_eq!(packed.to_vec2::<u8>()?, expect.map(|r| r.to_vec()).to_vec());
    assert_eq!(expect, [[18, 4], [9, 10]]);
    // The legacy class divides by its weight_scale, so it stores 1 / mean|w|; AutoBitLinear
    // multiplies, so it stores mean|w| itself. Same codes either way.
    let ws = scale.to_vec1::<f32>()?;
    assert!((ws[0] - 1.0 / 0.7).abs() < 1e-5, "{ws:?}");
    let (packed_auto, scale_auto) = p.to_hf(HfLinearClass::AutoBitLinear)?;
    assert_eq!(packed_auto.to_vec2::<u8>()?, packed.to_vec2::<u8>()?);
    assert_eq!(scale_auto.to_vec1::<f32>()?, [p.scales()[0]]);
    assert!((p.scales()[0] - 0.7).abs() < 1e-6);
    for (class, codes, ws) in [
        (HfLinearClass::BitLinear, &packed, &scale),
        (HfLinearClass::AutoBitLinear, &packed_auto, &scale_auto),
    ] {
        let back = PackedTernary::from_hf(codes, ws, 5, class)?;
        assert_eq!(back.levels(), p.levels());
        assert!(
            max_abs_diff(&back.unpack()?, &p.unpack()?) < 1e-6,
            "{class:?}"
        );
    }
    // Reading one class's scale in the other's convention is off by a factor of mean|w|^2.
    let wrong = PackedTernary::from_hf(&packed, &scale, 5, HfLinearClass::AutoBitLinear)?;
    assert!((wrong.scales()[0] - 1.0 / 0.7).abs() < 1e-5);
    Ok(())
}

#[test]
fn hf_round_trip_on_random_weights_and_errors() -> Result<()> {
    let q = Quantizer::new(Scheme::TernaryAbsmean, Estimator::Identity)?;
    for (out, inp) in [(1, 3), (4, 5), (7, 130), (33, 64)] {
        let p = PackedTernary::pack(&randn((out, inp), 3), &q)?;
        for class in [HfLinearClass::BitLinear, HfLinearClass::AutoBitLinear] {
            let (packed, scale) = p.to_hf(class)?;
            assert_eq!(packed.dims(), &[out.div_ceil(4), inp]);
            let back = PackedTernary::from_hf(
                &packed,
                &scale.to_dtype(DType::BF16)?.to_dtype(DType::F32)?,
                out,
                class,
            )?;
            assert_eq!(back.levels(), p.levels());
            // An f32 scale in the multiplying convention comes back bit for bit.
            if class == HfLinearClass::AutoBitLinear {
                let exact = PackedTernary::from_hf(&packed, &scale, out, class)?;
                assert_eq!(exact.scales(), p.scales());
            }
        }
    }
    let p = PackedTernary::pack(
        &randn((8, 8), 1),
        &q.with_granularity(Granularity::PerChannel)?,
    )?;
    assert!(text(&p.to_hf(HfLinearClass::AutoBitLinear).unwrap_err()).contains("unsupported"));
    let auto = HfLinearClass::AutoBitLinear;
    let legacy = HfLinearClass::BitLinear;
    let bad = Tensor::from_vec(vec![3u8; 8], (2, 4), &Device::Cpu)?;
    let one = Tensor::new(&[1f32], &Device::Cpu)?;
    assert!(text(&PackedTernary::from_hf(&bad, &one, 8, auto).unwrap_err()).contains("code 3"));
    let ok = Tensor::zeros((2, 4), DType::U8, &Device::Cpu)?;
    assert!(text(&PackedTernary::from_hf(&ok, &one, 9, auto).unwrap_err()).contains("output rows"));
    let zero = Tensor::new(&[0f32], &Device::Cpu)?;
    // A zero scale is a valid all-zero layer when multiplied, a division by zero when divided.
    assert!(
        text(&PackedTernary::from_hf(&ok, &zero, 8, legacy).unwrap_err()).contains("weight_scale")
    );
    assert_eq!(PackedTernary::from_hf(&ok, &zero, 8, auto)?.scales(), [0.0]);
    let minus = Tensor::new(&[-1f32], &Device::Cpu)?;
    assert!(
        text(&PackedTernary::from_hf(&ok, &minus, 8, auto).unwrap_err()).contains("weight_scale")
    );
    Ok(())
}

fn layer(inp: usize, out: usize, cfg: BitLinearConfig, seed: u64) -> BitLinear {
    let w = randn((out, inp), seed);
    let bias = cfg
        .bias
        .then(|| randn((1, out), seed + 1).flatten_all().unwrap());
    let norm = cfg.norm.then(|| {
        let nw = (randn((1, inp), seed + 2).flatten_all().unwrap() + 1.5).unwrap();
        RmsNorm::from_weight(nw, cfg.norm_eps)
    });
    BitLinear::from_parts(w, bias, norm, cfg)
}

#[test]
fn packed_forward_equals_bitlinear_forward() -> Result<()> {
    let shapes = [
        (7, 5),
        (33, 13),
        (128, 4),
        (130, 31),
        (300, 64),
        (1000, 3),
        (512, 256),
    ];
    let mut checked = 0;
    for (k, &(inp, out)) in shapes.iter().enumerate() {
        for q in weight_quantizers() {
            for gran in [
                Granularity::PerTensor,
                Granularity::PerChannel,
                Granularity::PerGroup(inp.min(128)),
            ] {
                if inp % inp.min(128) != 0 && matches!(gran, Granularity::PerGroup(_)) {
                    continue;
                }
                for (bias, norm) in [(false, true), (true, false), (true, true)] {
                    let cfg = BitLinearConfig {
                        bias,
                        norm,
                        weight: q.with_granularity(gran)?,
                        ..Default::default()
                    };
                    let l = layer(inp, out, cfg, k as u64 * 7);
                    let p = PackedBitLinear::from_trained(&l)?;
                    for batch in [vec![1, inp], vec![5, inp], vec![2, 3, inp], vec![16, inp]] {
                        let x = (Tensor::randn(0f32, 1.0, batch.clone(), &Device::Cpu)? * 3.0)?;
                        let want = l.forward(&x)?;
                        let scale = magnitude(&want)?;
                        for kern in Kernel::available() {
                            let got = p.clone().with_kernel(kern).forward(&x)?;
                            assert_eq!(got.dims(), want.dims());
                            let d = max_abs_diff(&got, &want);
                            assert!(d <= 2e-5 * scale, "{inp}x{out} {q:?} {gran:?} bias={bias} norm={norm} {batch:?} {kern:?}: {d} (scale {scale})");
                            checked += 1;
                        }
                    }
                }
            }
        }
    }
    assert!(checked > 200);
    Ok(())
}

/// The tiled matrix product: every kernel gives the scalar kernel's outputs bit for bit at
/// every token count the tiling treats differently (register tiles of four tokens and their
/// remainders; at 16384 inputs, 130 tokens are three token tiles, which the threads split by
/// tokens rather than by rows), with per-row and per-group scales, and stays within f32
/// rounding of the training forward.
#[test]
fn every_kernel_gives_the_scalar_outputs_bit_for_bit() -> Result<()> {
    let cases = [
        (300, 37, Granularity::PerChannel),
        (1024, 9, Granularity::PerGroup(256)),
        (16384, 6, Granularity::PerChannel),
        (16384, 5, Granularity::PerGroup(4096)),
    ];
    let mut token_counts: Vec<usize> = (1..=9).collect();
    token_counts.extend([16, 33]);
    for (c, &(inp, out, gran)) in cases.iter().enumerate() {
        let cfg = BitLinearConfig {
            bias: true,
            norm: false,
            weight: Quantizer::new(Scheme::TernaryAbsmean, Estimator::Identity)?
                .with_granularity(gran)?,
            ..Default::default()
        };
        let l = layer(inp, out, cfg, 40 + c as u64);
        let p = PackedBitLinear::from_trained(&l)?;
        let mut ns = token_counts.clone();
        if inp >= 16384 {
            ns.push(130);
        }
        for n in ns {
            let x = (randn((n, inp), 100 + n as u64) * 3.0)?;
            let reference = p.clone().with_kernel(Kernel::Scalar).forward(&x)?;
            let want = l.forward(&x)?;
            let scale = magnitude(&want)?;
            let d = max_abs_diff(&reference, &want);
            assert!(
                d <= 2e-5 * scale,
                "{inp}x{out} {gran:?} n={n}: {d} (scale {scale})"
            );
            let reference = reference.flatten_all()?.to_vec1::<f32>()?;
            for kern in Kernel::available() {
                let got = p.clone().with_kernel(kern).forward(&x)?;
                let got = got.flatten_all()?.to_vec1::<f32>()?;
                let same = got
                    .iter()
                    .zip(&reference)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{inp}x{out} {gran:?} n={n} {kern:?}");
            }
        }
    }
    Ok(())
}

#[test]
fn forward_rejects_bad_input() -> Result<()> {
    let p = PackedBitLinear::from_trained(&layer(16, 4, BitLinearConfig::default(), 1))?;
    let e = p
        .forward(&Tensor::zeros((2, 15), DType::F32, &Device::Cpu)?)
        .unwrap_err();
    assert!(text(&e).contains("last dimension 16"));
    let e = p
        .forward(&Tensor::zeros((2, 16), DType::U8, &Device::Cpu)?)
        .unwrap_err();
    assert!(text(&e).contains("dtype"));
    let nan = Tensor::from_vec(vec![f32::NAN; 16], (1, 16), &Device::Cpu)?;
    assert!(text(&p.forward(&nan).unwrap_err()).contains("NaN"));
    assert_eq!(
        p.forward(&Tensor::zeros((0, 16), DType::F32, &Device::Cpu)?)?
            .dims(),
        &[0, 4]
    );
    // Activations kept in full precision have no integer path.
    let cfg = BitLinearConfig {
        activation: None,
        ..Default::default()
    };
    let e = PackedBitLinear::from_trained(&layer(16, 4, cfg, 1)).unwrap_err();
    assert!(text(&e).contains("activation"));
    let cfg = BitLinearConfig {
        weight: Quantizer::new(Scheme::MultiBit { bits: 4 }, Estimator::Identity)?,
        ..Default::default()
    };
    assert!(
        text(&PackedBitLinear::from_trained(&layer(16, 4, cfg, 1)).unwrap_err())
            .contains("weight.scheme")
    );
    Ok(())
}

#[test]
fn packed_size_is_at_most_027_bytes_per_weight() -> Result<()> {
    let q = Quantizer::new(Scheme::TernaryAbsmean, Estimator::Identity)?;
    // Rows of the benchmark shapes (4096 and 6912 inputs); the size per weight does not depend
    // on the number of rows beyond the per-tensor scale.
    for (out, inp) in [(64, 4096), (32, 6912), (256, 2560)] {
        for g in [Granularity::PerTensor, Granularity::PerChannel] {
            let p = PackedTernary::pack(&randn((out, inp), 5), &q.with_granularity(g)?)?;
            assert!(
                p.bytes_per_weight() <= 0.27,
                "{out}x{inp} {g:?}: {}",
                p.bytes_per_weight()
            );
        }
        // A group of 128 carries one f32 scale per 128 weights: 0.25 + 4 / 128 bytes, above the
        // per-tensor budget by construction.
        let p = PackedTernary::pack(
            &randn((out, inp), 5),
            &q.with_granularity(Granularity::PerGroup(128))?,
        )?;
        assert_eq!(
            p.bytes_per_weight(),
            0.25 + 4.0 / 128.0,
            "{out}x{inp} per group"
        );
    }
    Ok(())
}

fn tmp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "bitnet-packed-{}-{name}.safetensors",
        std::process::id()
    ))
}

fn sample_layers() -> Result<Vec<(String, PackedBitLinear)>> {
    let q = Quantizer::new(Scheme::TernaryAbsmean, Estimator::Identity)?;
    Ok(vec![
        (
            "a".into(),
            PackedBitLinear::from_trained(&layer(
                130,
                9,
                BitLinearConfig {
                    bias: true,
                    ..Default::default()
                },
                1,
            ))?,
        ),
        (
            "b.c".into(),
            PackedBitLinear::from_trained(&layer(
                256,
                5,
                BitLinearConfig {
                    norm: false,
                    weight: q.with_granularity(Granularity::PerGroup(64))?,
                    ..Default::default()
                },
                2,
            ))?,
        ),
        (
            "binary".into(),
            PackedBitLinear::from_trained(&layer(
                200,
                6,
                BitLinearConfig {
                    weight: Quantizer::new(Scheme::Binary { scaled: true }, Estimator::Identity)?
                        .with_granularity(Granularity::PerChannel)?,
                    ..Default::default()
                },
                3,
            ))?,
        ),
    ])
}

#[test]
fn save_load_round_trip() -> Result<()> {
    let layers = sample_layers()?;
    let path = tmp("roundtrip");
    let refs: Vec<(&str, &PackedBitLinear)> = layers.iter().map(|(n, l)| (n.as_str(), l)).collect();
    save_packed(&path, &refs)?;
    let dir = std::fs::read_dir(std::env::temp_dir()).unwrap();
    assert!(!dir
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().contains(".tmp-")
            && e.file_name()
                .to_string_lossy()
                .contains(&format!("bitnet-packed-{}-roundtrip", std::process::id()))));
    let loaded = load_packed(&path)?;
    std::fs::remove_file(&path).ok();
    assert_eq!(loaded.len(), 3);
    for ((n, l), (m, k)) in layers.iter().zip(&loaded) {
        assert_eq!(n, m);
        assert_eq!(l.weight().bits(), k.weight().bits(), "{n}");
        assert_eq!(l.weight().data(), k.weight().data());
        assert_eq!(l.weight().scales(), k.weight().scales());
        assert_eq!(l.bias(), k.bias());
        let x = Tensor::randn(0f32, 1.0, (3, l.dims().0), &Device::Cpu)?;
        assert_eq!(max_abs_diff(&l.forward(&x)?, &k.forward(&x)?), 0.0);
    }
    let e = load_packed(tmp("does-not-exist")).unwrap_err();
    assert!(text(&e).contains("does-not-exist"));
    Ok(())
}

/// The tensors of a file: name, dtype, shape, bytes.
type Tensors = Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>;

/// A file built by hand from the parts of a valid one, with `edit` applied first.
fn crafted(edit: impl FnOnce(&mut HashMap<String, String>, &mut Tensors)) -> Vec<u8> {
    let layers = sample_layers().unwrap();
    let refs: Vec<(&str, &PackedBitLinear)> = layers.iter().map(|(n, l)| (n.as_str(), l)).collect();
    crafted_from(&packed::io::to_bytes(&refs).unwrap(), edit)
}

/// The file `good` rebuilt from its parts, with `edit` applied first.
fn crafted_from(
    good: &[u8],
    edit: impl FnOnce(&mut HashMap<String, String>, &mut Tensors),
) -> Vec<u8> {
    let st = safetensors::SafeTensors::deserialize(good).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(good).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    let mut tensors: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    edit(&mut meta, &mut tensors);
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, Some(meta)).unwrap()
}

#[test]
fn loader_names_what_is_wrong() {
    let expect = |bytes: Vec<u8>, needle: &str| {
        let e = load_packed_bytes(&bytes)
            .err()
            .unwrap_or_else(|| panic!("accepted a file that should fail with `{needle}`"));
        assert!(text(&e).contains(needle), "`{needle}` not in {}", text(&e));
    };
    assert!(load_packed_bytes(&crafted(|_, _| {})).is_ok());
    expect(
        crafted(|m, _| {
            m.insert("version".into(), "2".into());
        }),
        "metadata `version` is `2`",
    );
    expect(
        crafted(|m, _| {
            m.insert("layout".into(), "hf".into());
        }),
        "metadata `layout`",
    );
    expect(
        crafted(|m, _| {
            m.remove("format");
        }),
        "metadata `format` missing",
    );
    expect(
        crafted(|m, _| {
            m.insert("layers".into(), "{".into());
        }),
        "metadata `layers` is not valid",
    );
    expect(
        crafted(|_, t| t.retain(|x| x.0 != "a.bias")),
        "missing tensor `a.bias`",
    );
    expect(
        crafted(|_, t| t.push(("zzz".into(), safetensors::Dtype::U8, vec![1], vec![0]))),
        "unexpected tensor `zzz`",
    );
    expect(
        crafted(|_, t| {
            let x = t.iter_mut().find(|x| x.0 == "a.weight_scale").unwrap();
            x.1 = safetensors::Dtype::I32;
        }),
        "tensor `a.weight_scale` has dtype I32",
    );
    expect(
        crafted(|_, t| {
            let x = t.iter_mut().find(|x| x.0 == "a.bias").unwrap();
            x.2 = vec![3, 3];
            x.3.truncate(36);
        }),
        "tensor `a.bias` has shape [3, 3]",
    );
    expect(
        crafted(|_, t| t.iter_mut().find(|x| x.0 == "a.weight_packed").unwrap().3[0] = 0xFF),
        "code 3",
    );
    expect(
        crafted(|_, t| {
            t.iter_mut().find(|x| x.0 == "b.c.weight_scale").unwrap().3[0..4]
                .copy_from_slice(&f32::NAN.to_le_bytes())
        }),
        "scale 0 is NaN",
    );
    // Padding (130 inputs pad to 256) must hold zero codes.
    expect(
        crafted(|_, t| t.iter_mut().find(|x| x.0 == "a.weight_packed").unwrap().3[63] = 0),
        "padding",
    );
    expect(b"not a file".to_vec(), "not a safetensors file");
}

fn valid_file() -> Vec<u8> {
    crafted(|_, _| {})
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn loader_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = load_packed_bytes(&bytes);
    }

    #[test]
    fn loader_never_panics_on_truncated_files(cut in 0usize..4000) {
        let f = valid_file();
        let _ = load_packed_bytes(&f[..cut.min(f.len())]);
    }

    #[test]
    fn loader_never_panics_on_bit_flips(flips in proptest::collection::vec((any::<usize>(), 0u8..8), 1..6)) {
        let mut f = valid_file();
        let n = f.len();
        for (i, b) in flips {
            f[i % n] ^= 1 << b;
        }
        let _ = load_packed_bytes(&f);
    }
}

#[test]
fn packing_and_inference_draw_from_the_pool_the_caller_chose() -> Result<()> {
    use bitnet_core::{with_pool, Category, HybridMemoryPool, PoolConfig};
    let pool = HybridMemoryPool::new(PoolConfig::default())?;
    let stats = |c| *pool.stats().category(c);
    let l = layer(256, 64, BitLinearConfig::default(), 3);
    let x = Tensor::randn(0f32, 1.0, (4, 256), &Device::Cpu)?;
    let (p, copy) = with_pool(&pool, || -> Result<_> {
        let p = PackedBitLinear::from_trained(&l)?;
        p.forward(&x)?;
        Ok((p.clone(), p))
    })?;
    // One weight buffer, shared by the layer and its clone and charged to the chosen pool, still
    // alive after `with_pool` returned; the activation scratch went back after the call.
    let packed = stats(Category::PackedWeights);
    assert_eq!(packed.live_allocations, 1);
    assert_eq!(packed.bytes_in_use, p.weight().data().len());
    assert_eq!(p.weight().data().as_ptr(), copy.weight().data().as_ptr());
    let scratch = stats(Category::Scratch);
    assert!(scratch.total_allocations >= 1);
    assert_eq!(scratch.bytes_in_use, 0);
    // Clones and moves to the CPU share the codes too: no allocation, so no cap to hit.
    let third = copy.clone();
    let on_cpu = copy.to_device(&Device::Cpu)?;
    assert_eq!(stats(Category::PackedWeights).live_allocations, 1);
    assert_eq!(
        on_cpu.forward(&x)?.to_vec2::<f32>()?,
        p.forward(&x)?.to_vec2::<f32>()?
    );
    drop(on_cpu);
    drop((p, copy, third));
    assert_eq!(stats(Category::PackedWeights).bytes_in_use, 0);
    Ok(())
}

/// A pool whose cap the packed weight fills: cloning the layer and moving it to the CPU used to
/// allocate a copy there and panic on the cap; now they share the codes and succeed.
#[test]
fn clones_and_cpu_moves_succeed_in_a_full_pool() -> Result<()> {
    use bitnet_core::{with_pool, Category, HybridMemoryPool, PoolConfig};
    let l = layer(4096, 256, BitLinearConfig::default(), 5);
    let x = Tensor::randn(0f32, 1.0, (2, 4096), &Device::Cpu)?;
    let bytes = PackedBitLinear::from_trained(&l)?.weight().data().len();
    // One buddy arena of exactly the weight's size, and nothing more.
    let pool = HybridMemoryPool::new(PoolConfig {
        small_threshold: 4096,
        slab_chunk_size: 4096,
        arena_size: bytes.next_power_of_two(),
        max_bytes: bytes.next_power_of_two(),
        ..Default::default()
    })?;
    let p = with_pool(&pool, || PackedBitLinear::from_trained(&l))?;
    // The cap is reached: a second buffer of the same size is refused.
    assert!(pool.allocate(bytes, 64, Category::PackedWeights).is_err());
    let (copy, moved) = (p.clone(), p.to_device(&Device::Cpu)?);
    let want = p.forward(&x)?.to_vec2::<f32>()?;
    for q in [&copy, &moved] {
        assert_eq!(q.forward(&x)?.to_vec2::<f32>()?, want);
    }
    assert_eq!(
        pool.stats()
            .category(Category::PackedWeights)
            .live_allocations,
        1
    );
    Ok(())
}

// Mixed precision: ternary, binary, 4-bit and 8-bit layers in one file.

fn mixed_layer(
    scheme: Scheme,
    g: Granularity,
    inp: usize,
    out: usize,
    bias: bool,
) -> Result<PackedLayer> {
    let dev = Device::Cpu;
    let config = BitLinearConfig {
        weight: Quantizer::new(scheme, Estimator::Identity)?.with_granularity(g)?,
        bias,
        ..Default::default()
    };
    let w = Tensor::randn(0f32, 1.0, (out, inp), &dev)?;
    let b = bias
        .then(|| Tensor::randn(0f32, 1.0, out, &dev))
        .transpose()?;
    let norm =
        bitnet_quant::RmsNorm::from_weight(Tensor::ones(inp, candle_core::DType::F32, &dev)?, 1e-6);
    PackedLayer::from_trained(&BitLinear::from_parts(w, b, Some(norm), config))
}

fn mixed_layers() -> Result<Vec<(String, PackedLayer)>> {
    let four = Scheme::MultiBit { bits: 4 };
    let eight = Scheme::MultiBit { bits: 8 };
    Ok(vec![
        (
            "t".into(),
            mixed_layer(
                Scheme::TernaryAbsmean,
                Granularity::PerChannel,
                130,
                6,
                true,
            )?,
        ),
        (
            "b".into(),
            mixed_layer(
                Scheme::Binary { scaled: true },
                Granularity::PerTensor,
                64,
                3,
                false,
            )?,
        ),
        (
            "q4".into(),
            mixed_layer(four, Granularity::PerGroup(7), 301, 5, true)?,
        ),
        (
            "q8".into(),
            mixed_layer(eight, Granularity::PerChannel, 96, 4, false)?,
        ),
    ])
}

fn mixed_refs(layers: &[(String, PackedLayer)]) -> Vec<(&str, &PackedLayer)> {
    layers.iter().map(|(n, l)| (n.as_str(), l)).collect()
}

#[test]
fn every_precision_round_trips_bit_for_bit() -> Result<()> {
    let layers = mixed_layers()?;
    assert_eq!(
        layers.iter().map(|(_, l)| l.bits()).collect::<Vec<_>>(),
        [2, 1, 4, 8]
    );
    let path =
        std::env::temp_dir().join(format!("bitnet-mixed-{}.safetensors", std::process::id()));
    save_packed_layers(&path, &mixed_refs(&layers))?;
    let loaded = load_packed_layers(&path)?;
    // A file with multi-bit layers is not for the ternary-only reader.
    let e = load_packed(&path).unwrap_err().to_string();
    assert!(
        e.contains("4-bit") && e.contains("load_packed_layers"),
        "{e}"
    );
    std::fs::remove_file(&path).ok();
    let mut want: Vec<_> = layers.iter().collect();
    want.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(loaded.len(), want.len());
    for ((n, l), (m, k)) in want.into_iter().zip(&loaded) {
        assert_eq!(n, m);
        assert_eq!(
            (l.bits(), l.dims(), l.weight_bytes()),
            (k.bits(), k.dims(), k.weight_bytes())
        );
        let x = Tensor::randn(0f32, 1.0, (3, l.dims().0), &Device::Cpu)?;
        let (a, b) = (
            l.forward(&x)?.to_vec2::<f32>()?,
            k.forward(&x)?.to_vec2::<f32>()?,
        );
        assert_eq!(a, b, "{n}: the loaded layer computes the same bits");
    }
    Ok(())
}

#[test]
fn sizes_are_the_bits_the_layers_claim() -> Result<()> {
    // [out, in] = [6, 256] per channel: codes, then 6 scales of 4 bytes.
    for (scheme, bytes_per_row) in [
        (Scheme::TernaryAbsmean, 64),
        (Scheme::MultiBit { bits: 4 }, 128),
        (Scheme::MultiBit { bits: 8 }, 256),
    ] {
        let l = mixed_layer(scheme, Granularity::PerChannel, 256, 6, false)?;
        assert_eq!(l.weight_bytes(), 6 * bytes_per_row + 6 * 4, "{scheme:?}");
    }
    Ok(())
}

#[test]
fn ternary_only_files_are_what_save_packed_writes() -> Result<()> {
    let layers: Vec<(String, PackedLayer)> = mixed_layers()?
        .into_iter()
        .filter(|(_, l)| l.bits() <= 2)
        .collect();
    let plain: Vec<(&str, &PackedBitLinear)> = layers
        .iter()
        .map(|(n, l)| match l {
            PackedLayer::Ternary(t) => (n.as_str(), t),
            PackedLayer::MultiBit(_) => unreachable!("filtered above"),
        })
        .collect();
    let (a, b) = (
        packed::io::layers_to_bytes(&mixed_refs(&layers))?,
        packed::io::to_bytes(&plain)?,
    );
    // The same metadata (a map, whose order in the header is not fixed) and the same tensors.
    let parse = |bytes: &[u8]| {
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes).unwrap();
        let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
        let mut tensors: Vec<_> = st
            .tensors()
            .into_iter()
            .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
            .collect();
        tensors.sort_by(|x, y| x.0.cmp(&y.0));
        (header.metadata().clone(), tensors)
    };
    assert_eq!(parse(&a), parse(&b));
    assert_eq!(parse(&a).0.unwrap()["scheme"], "ternary");
    assert_eq!(load_packed_bytes(&a)?.len(), 2);
    Ok(())
}

/// The mixed sample file after `edit` on its metadata and tensors.
fn crafted_mixed(edit: impl FnOnce(&mut HashMap<String, String>, &mut Tensors)) -> Vec<u8> {
    let layers = mixed_layers().unwrap();
    crafted_from(
        &packed::io::layers_to_bytes(&mixed_refs(&layers)).unwrap(),
        edit,
    )
}

#[test]
fn loader_names_what_is_wrong_with_multibit_layers() {
    assert_eq!(
        load_packed_layers_bytes(&crafted_mixed(|_, _| {}))
            .unwrap()
            .len(),
        4
    );
    let packed_row = |t: &mut Tensors, name: &str| {
        let i = t
            .iter()
            .position(|x| x.0 == format!("{name}.weight_packed"))
            .unwrap();
        t[i].3.len()
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            crafted_mixed(|m, _| {
                m.insert("scheme".into(), "ternary".into());
            }),
            "bits",
        ),
        (
            crafted_mixed(|m, _| {
                m.insert("scheme".into(), "int4".into());
            }),
            "metadata `scheme` is `int4`",
        ),
        (
            // 301 inputs: each 4-bit row ends in a padding nibble, which must be 0.
            crafted_mixed(|_, t| {
                let n = packed_row(t, "q4");
                t.iter_mut().find(|x| x.0 == "q4.weight_packed").unwrap().3[n - 1] |= 0xF0;
            }),
            "padding nibble",
        ),
        (
            crafted_mixed(|_, t| {
                let x = t.iter_mut().find(|x| x.0 == "q8.weight_scale").unwrap();
                x.3[4..8].copy_from_slice(&f32::INFINITY.to_le_bytes());
            }),
            "scale 1 is inf",
        ),
        (
            crafted_mixed(|_, t| {
                let x = t.iter_mut().find(|x| x.0 == "q8.weight_packed").unwrap();
                x.2 = vec![4, 95];
                x.3.truncate(4 * 95);
            }),
            "380 packed bytes, expected 384 (4 rows of 96)",
        ),
    ];
    for (bytes, needle) in cases {
        let e = load_packed_layers_bytes(&bytes)
            .err()
            .unwrap_or_else(|| panic!("accepted a file that should fail with `{needle}`"));
        let text = format!("{e} {e:?}");
        assert!(text.contains(needle), "`{needle}` not in {text}");
    }
}
