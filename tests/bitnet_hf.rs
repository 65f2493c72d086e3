//! Hugging Face `BitNetForCausalLM` checkpoints against transformers' own logits
//! (`tests/reference/bitnet_hf/`, made by `tests/reference/bitnet_hf_reference.py`): both weight
//! forms, every runtime, greedy continuations, save -> load round trips, and the loader's
//! errors on bad files.
//!
//! Tolerance: logits agree within 1e-4 of the largest logit's magnitude (max |ours - theirs| /
//! max |theirs|); both sides compute in f32, so what is left is summation order.

use bitnet::io::hf::{save, HfCheckpoint, SaveForm};
use bitnet::models::bitnet::{BitNetForCausalLM, Cache, ProjectionWeight, Runtime};
use bitnet::training::QATConfig;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::path::{Path, PathBuf};

mod bitnet_common;
use bitnet_common::{all_logits, greedy, rel_diff, TOLERANCE};

fn fixture(rel: &str) -> PathBuf {
    bitnet_common::reference("bitnet_hf").join(rel)
}

fn temp_dir(tag: &str) -> PathBuf {
    bitnet_common::temp_dir(&format!("hf-{tag}"))
}

struct Expected {
    ids: Vec<u32>,
    logits: Tensor,
    greedy: Vec<u32>,
}

fn expected(model: &str, form: &str) -> Expected {
    let t =
        candle_core::safetensors::load(fixture(model).join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    let ids = |k: &str| -> Vec<u32> {
        t[k].to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|v| v as u32)
            .collect()
    };
    Expected {
        ids: ids("input_ids"),
        logits: t[&format!("logits_{form}")].clone(),
        greedy: ids(&format!("greedy_{form}")),
    }
}

fn training_model(dir: &Path) -> BitNetForCausalLM {
    let (cfg, vm) = HfCheckpoint::open(dir).unwrap().load_varmap().unwrap();
    let qat = match cfg.quantization_config {
        Some(_) => QATConfig::ternary_hf(),
        None => QATConfig::full_precision(),
    };
    // The VarMap holds every tensor already: `get` returns them, creating nothing.
    let n = vm.all_vars().len();
    let m = BitNetForCausalLM::new(
        &cfg,
        qat,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap();
    assert_eq!(
        vm.all_vars().len(),
        n,
        "the model created variables the checkpoint lacks"
    );
    m
}

const CASES: [(&str, &str); 4] = [
    ("untied", "online"),
    ("untied", "offline"),
    ("tied", "online"),
    ("tied", "offline"),
];

#[test]
fn logits_and_greedy_tokens_match_transformers_in_every_runtime() {
    for (model, form) in CASES {
        let dir = fixture(&format!("{model}/{form}"));
        let e = expected(model, form);
        let ckpt = HfCheckpoint::open(&dir).unwrap();
        let runtimes = [
            ("packed", ckpt.load_model(Runtime::Packed).unwrap()),
            ("dense", ckpt.load_model(Runtime::Dense).unwrap()),
            ("training", training_model(&dir)),
        ];
        for (name, m) in &runtimes {
            let ours = all_logits(m, &e.ids);
            assert_eq!(ours.dims(), e.logits.dims(), "{model}/{form} {name}");
            let rel = rel_diff(&ours, &e.logits);
            assert!(
                rel < TOLERANCE,
                "{model}/{form} {name}: logits differ by {rel:e} (relative)"
            );
        }
        let (_, packed) = &runtimes[0];
        assert_eq!(
            greedy(packed, &e.ids, e.greedy.len()),
            e.greedy,
            "{model}/{form} greedy"
        );
        // The KV cache gives the logits a full forward gives: prefill, then token by token.
        let mut cache = Cache::new(true, packed.config());
        let split = e.ids.len() - 3;
        let x = |s: &[u32]| Tensor::new(s, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        packed.forward(&x(&e.ids[..split]), 0, &mut cache).unwrap();
        let mut last = None;
        for (k, &t) in e.ids[split..].iter().enumerate() {
            last = Some(
                packed
                    .forward(&x(&[t]), split + k, &mut cache)
                    .unwrap()
                    .squeeze(0)
                    .unwrap(),
            );
        }
        let want = e.logits.get(e.ids.len() - 1).unwrap();
        let rel = rel_diff(&last.unwrap(), &want);
        assert!(rel < TOLERANCE, "{model}/{form} cached decode: {rel:e}");
    }
}

#[test]
fn the_two_forms_of_a_model_agree_and_the_tokenizer_is_found() {
    for model in ["untied", "tied"] {
        let on = expected(model, "online");
        let off = expected(model, "offline");
        assert!(rel_diff(&on.logits, &off.logits) < TOLERANCE);
        let ckpt = HfCheckpoint::open(fixture(&format!("{model}/online"))).unwrap();
        assert!(ckpt.tokenizer_path().is_some());
    }
}

/// Every weight of `m` as (name, values): latent tensors, or packed codes and scales.
fn weights(m: &BitNetForCausalLM) -> Vec<(String, Vec<f32>, Vec<i8>)> {
    let mut out: Vec<(String, Vec<f32>, Vec<i8>)> = m
        .named_tensors()
        .into_iter()
        .map(|(n, t)| {
            (
                n,
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                Vec::new(),
            )
        })
        .collect();
    for (name, p) in m.projections() {
        match p.weight().unwrap() {
            ProjectionWeight::Latent(t) => out.push((
                name,
                t.flatten_all().unwrap().to_vec1().unwrap(),
                Vec::new(),
            )),
            ProjectionWeight::Packed(p) => out.push((name, p.scales().to_vec(), p.levels())),
        }
    }
    out
}

fn bits(w: &[(String, Vec<f32>, Vec<i8>)]) -> Vec<(String, Vec<u32>, Vec<i8>)> {
    w.iter()
        .map(|(n, v, l)| {
            (
                n.clone(),
                v.iter().map(|x| x.to_bits()).collect(),
                l.clone(),
            )
        })
        .collect()
}

#[test]
fn load_save_load_gives_bit_identical_weights_in_both_forms() {
    let out = temp_dir("roundtrip");
    for (model, form) in CASES {
        let src = fixture(&format!("{model}/{form}"));
        // Online: the training runtime's latent weights; offline: the packed codes and scales.
        let (save_form, first) = match form {
            "online" => (SaveForm::Online, training_model(&src)),
            _ => (
                SaveForm::Offline,
                HfCheckpoint::open(&src)
                    .unwrap()
                    .load_model(Runtime::Packed)
                    .unwrap(),
            ),
        };
        let dir = out.join(format!("{model}-{form}"));
        save(&first, &dir, save_form, DType::F32, None).unwrap();
        let again = match form {
            "online" => training_model(&dir),
            _ => HfCheckpoint::open(&dir)
                .unwrap()
                .load_model(Runtime::Packed)
                .unwrap(),
        };
        assert_eq!(
            bits(&weights(&first)),
            bits(&weights(&again)),
            "{model}/{form}"
        );
        // And the other form: its logits are transformers' for the source checkpoint.
        let other = out.join(format!("{model}-{form}-other"));
        let other_form = match form {
            "online" => SaveForm::Offline,
            _ => SaveForm::Online,
        };
        save(&first, &other, other_form, DType::F32, None).unwrap();
        let e = expected(model, form);
        for runtime in [Runtime::Packed, Runtime::Dense] {
            let m = HfCheckpoint::open(&other)
                .unwrap()
                .load_model(runtime)
                .unwrap();
            let rel = rel_diff(&all_logits(&m, &e.ids), &e.logits);
            assert!(
                rel < TOLERANCE,
                "{model}/{form} saved as {other_form:?}: {rel:e}"
            );
        }
        let rel = rel_diff(&all_logits(&training_model(&other), &e.ids), &e.logits);
        assert!(
            rel < TOLERANCE,
            "{model}/{form} saved as {other_form:?}, trained: {rel:e}"
        );
    }
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn bf16_saving_keeps_bf16_values_exactly() {
    // The tied model's online checkpoint is bf16: loading upcasts, saving bf16 writes the same
    // bits back.
    let src = fixture("tied/online");
    let dir = temp_dir("bf16");
    let m = training_model(&src);
    save(&m, &dir, SaveForm::Online, DType::BF16, None).unwrap();
    let a = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let b = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let u = &b[name];
        assert_eq!(u.dtype(), DType::BF16, "{name}");
        let d = (t.to_dtype(DType::F32).unwrap() - u.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{name}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
