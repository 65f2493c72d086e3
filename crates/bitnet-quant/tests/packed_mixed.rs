//! Mixed-precision packed files: ternary, binary, 4-bit and 8-bit layers in one file, read back
//! bit for bit, and the loader's errors for what only a mixed file may hold.

use bitnet_quant::packed::{
    self, load_packed, load_packed_bytes, load_packed_layers, load_packed_layers_bytes,
    save_packed_layers, PackedBitLinear, PackedLayer,
};
use bitnet_quant::{BitLinear, BitLinearConfig, Estimator, Granularity, Quantizer, Scheme};
use candle_core::{Device, Module, Result, Tensor};
use std::collections::HashMap;

fn layer(
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

fn layers() -> Result<Vec<(String, PackedLayer)>> {
    let four = Scheme::MultiBit { bits: 4 };
    let eight = Scheme::MultiBit { bits: 8 };
    Ok(vec![
        (
            "t".into(),
            layer(
                Scheme::TernaryAbsmean,
                Granularity::PerChannel,
                130,
                6,
                true,
            )?,
        ),
        (
            "b".into(),
            layer(
                Scheme::Binary { scaled: true },
                Granularity::PerTensor,
                64,
                3,
                false,
            )?,
        ),
        (
            "q4".into(),
            layer(four, Granularity::PerGroup(7), 301, 5, true)?,
        ),
        (
            "q8".into(),
            layer(eight, Granularity::PerChannel, 96, 4, false)?,
        ),
    ])
}

fn refs(layers: &[(String, PackedLayer)]) -> Vec<(&str, &PackedLayer)> {
    layers.iter().map(|(n, l)| (n.as_str(), l)).collect()
}

#[test]
fn every_precision_round_trips_bit_for_bit() -> Result<()> {
    let layers = layers()?;
    assert_eq!(
        layers.iter().map(|(_, l)| l.bits()).collect::<Vec<_>>(),
        [2, 1, 4, 8]
    );
    let path =
        std::env::temp_dir().join(format!("bitnet-mixed-{}.safetensors", std::process::id()));
    save_packed_layers(&path, &refs(&layers))?;
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
        let l = layer(scheme, Granularity::PerChannel, 256, 6, false)?;
        assert_eq!(l.weight_bytes(), 6 * bytes_per_row + 6 * 4, "{scheme:?}");
    }
    Ok(())
}

#[test]
fn ternary_only_files_are_what_save_packed_writes() -> Result<()> {
    let layers: Vec<(String, PackedLayer)> = layers()?
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
        packed::io::layers_to_bytes(&refs(&layers))?,
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

/// The bytes of the mixed sample file after `edit` on its metadata and tensors.
fn crafted(
    edit: impl FnOnce(
        &mut HashMap<String, String>,
        &mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>,
    ),
) -> Vec<u8> {
    let layers = layers().unwrap();
    let good = packed::io::layers_to_bytes(&refs(&layers)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&good).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&good).unwrap();
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
fn loader_names_what_is_wrong_with_multibit_layers() {
    assert_eq!(
        load_packed_layers_bytes(&crafted(|_, _| {})).unwrap().len(),
        4
    );
    let packed_row = |t: &mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>,
                      name: &str| {
        let i = t
            .iter()
            .position(|x| x.0 == format!("{name}.weight_packed"))
            .unwrap();
        t[i].3.len()
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            crafted(|m, _| {
                m.insert("scheme".into(), "ternary".into());
            }),
            "bits",
        ),
        (
            crafted(|m, _| {
                m.insert("scheme".into(), "int4".into());
            }),
            "metadata `scheme` is `int4`",
        ),
        (
            // 301 inputs: each 4-bit row ends in a padding nibble, which must be 0.
            crafted(|_, t| {
                let n = packed_row(t, "q4");
                t.iter_mut().find(|x| x.0 == "q4.weight_packed").unwrap().3[n - 1] |= 0xF0;
            }),
            "padding nibble",
        ),
        (
            crafted(|_, t| {
                let x = t.iter_mut().find(|x| x.0 == "q8.weight_scale").unwrap();
                x.3[4..8].copy_from_slice(&f32::INFINITY.to_le_bytes());
            }),
            "scale 1 is inf",
        ),
        (
            crafted(|_, t| {
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
