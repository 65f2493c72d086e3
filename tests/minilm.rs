//! The BERT encoder on the real all-MiniLM-L6-v2: full-precision embeddings against an
//! independent reference, conversion that keeps every non-linear tensor bit-identical,
//! distillation steps that bring a ternary student closer to the teacher, and a mixed-precision
//! student whose 4- and 8-bit linears pack at their widths with the training forward.
//!
//! The model comes from the directory in `BITNET_MINILM_DIR`, `../shared/models` beside the
//! repository, or the Hugging Face cache; when none has it the tests say that they skipped
//! (`BITNET_REQUIRE_EXTERNAL=1` makes that a failure, as in CI).
//!
//! Expected values come from `tests/reference/minilm_reference.py` (numpy, float64, the
//! Hugging Face `tokenizers` for the token ids); its first values for "This is an example
//! sentence" are also the ones sentence-transformers prints for this model.

use bitnet::models::bert::{pool, BertConfig, BertEncoder};
use bitnet::quant::{Granularity, Scheme};
use bitnet::training::convert::{load_safetensors, Converter};
use bitnet::training::optim::{ParamsQatAdamW, QatAdamW};
use bitnet::training::policy::PrecisionPolicy;
use bitnet::training::QATConfig;
use candle_core::{Device, Module, Tensor};
use candle_nn::{Optimizer, VarMap};
use std::collections::HashMap;
use std::path::PathBuf;

mod common;

/// (sentence, token ids, first 8 values of the reference embedding).
const SENTENCES: [(&str, &[u32], [f32; 8]); 5] = [
    (
        "This is an example sentence",
        &[101, 2023, 2003, 2019, 2742, 6251, 102],
        [
            0.067657, 0.063496, 0.048713, 0.079305, 0.037448, 0.002653, 0.039375, -0.007098,
        ],
    ),
    (
        "Each sentence is converted",
        &[101, 2169, 6251, 2003, 4991, 102],
        [
            0.086439, 0.102763, 0.005395, 0.002044, -0.009963, 0.025386, 0.049288, -0.030627,
        ],
    ),
    (
        "A man is eating food.",
        &[101, 1037, 2158, 2003, 5983, 2833, 1012, 102],
        [
            0.033242, 0.004406, -0.006277, 0.048379, -0.138702, -0.033617, 0.101128, -0.054385,
        ],
    ),
    (
        "A man is eating a piece of bread.",
        &[
            101, 1037, 2158, 2003, 5983, 1037, 3538, 1997, 7852, 1012, 102,
        ],
        [
            0.052518, 0.055241, -0.011188, -0.005745, -0.127208, -0.022252, 0.076879, 0.013185,
        ],
    ),
    (
        "The new movie is awesome for kids.",
        &[101, 1996, 2047, 3185, 2003, 12476, 2005, 4268, 1012, 102],
        [
            -0.075922, -0.024352, 0.021237, 0.004495, -0.026018, -0.023785, -0.003947, 0.013004,
        ],
    ),
];

/// The model from `BITNET_MINILM_DIR`, `../shared/models`, or the Hugging Face cache; `None`
/// (the test skips) when none has it.
fn model_dir() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("BITNET_MINILM_DIR")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    candidates.push(common::shared("models/all-MiniLM-L6-v2"));
    candidates.extend(common::hf_cache_snapshots(
        "sentence-transformers/all-MiniLM-L6-v2",
    ));
    common::find_dir("all-MiniLM-L6-v2", &candidates, "model.safetensors")
}

fn pretrained() -> Option<(BertConfig, HashMap<String, Tensor>)> {
    let dir = model_dir()?;
    let cfg = BertConfig::load(dir.join("config.json")).unwrap();
    let tensors = load_safetensors(dir.join("model.safetensors")).unwrap();
    Some((cfg, tensors))
}

/// A right-padded batch of the sentences and its mask.
fn batch(which: &[usize]) -> (Tensor, Tensor) {
    let len = which.iter().map(|&i| SENTENCES[i].1.len()).max().unwrap();
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for &i in which {
        let s = SENTENCES[i].1;
        ids.extend(
            s.iter()
                .copied()
                .chain(std::iter::repeat_n(0, len - s.len())),
        );
        mask.extend((0..len).map(|k| (k < s.len()) as u32));
    }
    let shape = (which.len(), len);
    (
        Tensor::from_vec(ids, shape, &Device::Cpu).unwrap(),
        Tensor::from_vec(mask, shape, &Device::Cpu).unwrap(),
    )
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn fp_encoder_matches_the_reference_embeddings() {
    let Some((cfg, tensors)) = pretrained() else {
        return;
    };
    let vm = VarMap::new();
    let conv = Converter::new(
        &tensors,
        &vm,
        PrecisionPolicy::new(QATConfig::full_precision()),
    );
    let enc = BertEncoder::new(cfg, &conv).unwrap();
    assert!(enc.qat_layers().is_empty());
    let all: Vec<usize> = (0..SENTENCES.len()).collect();
    let (ids, mask) = batch(&all);
    let e = rows(&enc.embed(&ids, &mask).unwrap());
    for (row, (s, _, want)) in e.iter().zip(SENTENCES) {
        assert!((dot(row, row) - 1.0).abs() < 1e-5, "{s}: not unit norm");
        for (k, (&g, &w)) in row.iter().zip(&want).enumerate() {
            assert!((g - w).abs() < 2e-5, "{s}[{k}]: {g} vs reference {w}");
        }
    }
    // Food and bread are close (0.7553 in the reference), food and movies are not (-0.0660).
    assert!((dot(&e[2], &e[3]) - 0.755337).abs() < 1e-4);
    assert!((dot(&e[2], &e[4]) + 0.066047).abs() < 1e-4);
    // Padding changes nothing: alone, each sentence embeds the same; and it is deterministic.
    let (ids, mask) = batch(&[3]);
    let alone = rows(&enc.embed(&ids, &mask).unwrap());
    assert!(alone[0]
        .iter()
        .zip(&e[3])
        .all(|(a, b)| (a - b).abs() < 1e-5));
    let again = rows(&enc.embed(&ids, &mask).unwrap());
    assert_eq!(alone, again);
    // What per-layer distillation matches: the embedding output and one output per layer, the
    // last of which pools to the same embedding.
    let outs = enc.layer_outputs(&ids, &mask).unwrap();
    assert_eq!(outs.len(), enc.config().num_hidden_layers + 1);
    assert_eq!(rows(&pool(outs.last().unwrap(), &mask).unwrap()), again);
}

#[test]
fn conversion_keeps_every_tensor_bit_identical_under_its_name() {
    let Some((cfg, tensors)) = pretrained() else {
        return;
    };
    let vm = VarMap::new();
    let conv = Converter::new(&tensors, &vm, PrecisionPolicy::new(QATConfig::ternary()));
    let enc = BertEncoder::new(cfg, &conv).unwrap();
    assert_eq!(enc.qat_layers().len(), 6 * 6);
    let vars = vm.data().lock().unwrap();
    // Everything but the unused pooler and the integer position ids is a variable now.
    let expected: Vec<&String> = tensors
        .keys()
        .filter(|k| !k.starts_with("pooler.") && *k != "embeddings.position_ids")
        .collect();
    assert_eq!(vars.len(), expected.len());
    for name in expected {
        let (got, want) = (vars[name].as_tensor(), &tensors[name]);
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name} changed"
        );
    }
}

#[test]
fn distillation_steps_raise_the_ternary_students_cosine() {
    let Some((cfg, tensors)) = pretrained() else {
        return;
    };
    let (tvm, svm) = (VarMap::new(), VarMap::new());
    let fp = PrecisionPolicy::new(QATConfig::full_precision());
    let teacher = BertEncoder::new(cfg.clone(), &Converter::new(&tensors, &tvm, fp)).unwrap();
    let ternary = PrecisionPolicy::new(QATConfig::ternary());
    let student = BertEncoder::new(cfg, &Converter::new(&tensors, &svm, ternary)).unwrap();
    let all: Vec<usize> = (0..SENTENCES.len()).collect();
    let (ids, mask) = batch(&all);
    let target = teacher.embed(&ids, &mask).unwrap().detach();
    let cosine = |e: &Tensor| (e * &target).unwrap().sum(1).unwrap().mean_all().unwrap();
    // Train only the latent weights of the quantized layers.
    let latent: Vec<_> = student
        .qat_layers()
        .iter()
        .map(|l| l.inner().weight().id())
        .collect();
    let vars: Vec<_> = svm
        .all_vars()
        .into_iter()
        .filter(|v| latent.contains(&v.as_tensor().id()))
        .collect();
    assert_eq!(vars.len(), 36);
    let mut opt = QatAdamW::new(
        vars,
        ParamsQatAdamW {
            lr: 1e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let before = cosine(&student.embed(&ids, &mask).unwrap())
        .to_scalar::<f32>()
        .unwrap();
    for _ in 0..4 {
        let c = cosine(&student.embed(&ids, &mask).unwrap());
        opt.backward_step(&(1.0 - c).unwrap()).unwrap();
    }
    let after = cosine(&student.embed(&ids, &mask).unwrap())
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        before < 0.98,
        "post-training ternarisation should hurt: {before}"
    );
    println!("cosine {before} -> {after}");
    assert!(after > before + 0.01, "cosine {before} -> {after}");
}

#[test]
fn mixed_precision_student_packs_each_linear_at_its_width() {
    let Some((cfg, tensors)) = pretrained() else {
        return;
    };
    let mut base = QATConfig::ternary();
    base.weight_granularity = Granularity::PerChannel;
    let (four, eight) = (
        "encoder.layer.0.intermediate.dense",
        "encoder.layer.5.attention.self.value",
    );
    let int8 = Some(Scheme::Int8PerToken);
    let policy = PrecisionPolicy::new(base)
        .rule(four, Some(Scheme::MultiBit { bits: 4 }), int8)
        .rule(eight, Some(Scheme::MultiBit { bits: 8 }), int8);
    let vm = VarMap::new();
    let enc = BertEncoder::new(cfg, &Converter::new(&tensors, &vm, policy.clone())).unwrap();
    let (ids, mask) = batch(&[0, 1, 2]);
    // Real hidden states (the encoder's layer outputs) as inputs of the right width.
    let outs = enc.layer_outputs(&ids, &mask).unwrap();
    let layers = enc.qat_layers();
    assert_eq!(layers.len(), 36);
    let (mut bytes, mut bits, mut weights) = (0usize, 0f64, 0usize);
    for l in &layers {
        let packed = l.to_packed_layer().unwrap();
        let (inp, out) = packed.dims();
        // Codes at the layer's width (ternary rows padded to 128 weights), one f32 scale a row.
        let (width, row_bytes, nominal) = match l.name() {
            n if n == four => (4, inp / 2, 4.0),
            n if n == eight => (8, inp, 8.0),
            _ => (2, inp.div_ceil(128) * 32, 3f64.log2()),
        };
        assert_eq!(packed.bits(), width, "{}", l.name());
        assert_eq!(packed.weight_bytes(), out * (row_bytes + 4), "{}", l.name());
        bytes += packed.weight_bytes();
        bits += nominal * (inp * out) as f64;
        weights += inp * out;
        if width > 2 {
            let x = if l.name() == four { &outs[1] } else { &outs[5] };
            let want = l.forward(x).unwrap();
            let got = packed.forward(x).unwrap();
            let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
            let scale = want.abs().unwrap().max_all().unwrap();
            let (diff, scale) = (
                diff.to_scalar::<f32>().unwrap(),
                scale.to_scalar::<f32>().unwrap(),
            );
            assert!(diff <= 1e-5 * scale, "{}: {diff} vs {scale}", l.name());
        }
    }
    let sizes: Vec<(&str, usize)> = layers
        .iter()
        .map(|l| (l.name(), l.inner().weight().elem_count()))
        .collect();
    let avg = policy.average_bits(sizes);
    assert!((avg - bits / weights as f64).abs() < 1e-9, "{avg}");
    // 34 ternary linears, one at 4 and one at 8 bits: about 1.85 bits a weight nominally, and
    // the packed codes plus scales under a tenth of the f32 weights.
    assert!((1.8..1.9).contains(&avg), "{avg}");
    assert!(
        bytes * 10 < weights * 4,
        "{bytes} bytes for {weights} weights"
    );
}
