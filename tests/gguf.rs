//! GGUF files of the `bitnet` architecture against independent references
//! (`tests/reference/gguf/`, made by `tests/reference/gguf_reference.py`):
//! * llama.cpp's `convert_hf_to_gguf.py` output (TQ1_0 and TQ2_0) loads into our model and gives
//!   transformers' logits and greedy tokens, and its tokenizer metadata encodes as sentencepiece;
//! * gguf-py's dequantization of files our exporter writes equals ours, value for value;
//! * HF -> GGUF -> HF keeps every ternary code, per type; loader and exporter errors.
//!
//! Tolerance of the logits: 1e-4 of the largest logit's magnitude (max |ours - theirs| /
//! max |theirs|), against transformers run on the values the GGUF holds (`logits_gguf`: the f16
//! embedding and the f16 block scales). Against the latent model (`logits_hf`) the files differ by
//! what that rounding adds: the scale moves by at most 2^-11 relative and the embedding by f16
//! rounding, which flips some of the int8 activation roundings of this random (chaotic) model —
//! the script prints that difference (0.42 of the max logit here), so it is not a test bound.

use bitnet::io::gguf::{
    export, tokenizer_metadata, ExportOptions, GgmlType, GgufFile, GgufModel, Value,
};
use bitnet::io::hf::{save, SaveForm};
use bitnet::models::bitnet::{BitNetForCausalLM, ProjectionWeight, Runtime};
use candle_core::{DType, Device, Tensor};
use std::path::PathBuf;

mod bitnet_common;
use bitnet_common::{all_logits, greedy, packed_model, reference as fixture, rel_diff, TOLERANCE};

fn temp_dir(tag: &str) -> PathBuf {
    bitnet_common::temp_dir(&format!("gguf-{tag}"))
}

fn expected() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("gguf/expected.safetensors"), &Device::Cpu).unwrap()
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

#[test]
fn llama_cpp_converted_files_give_transformers_logits() {
    let e = expected();
    let input = ids(&e["input_ids"]);
    let want_greedy = ids(&e["greedy_gguf"]);
    for (file, runtime) in [
        ("gguf/tiny-tq1_0.gguf", Runtime::Packed),
        ("gguf/tiny-tq2_0.gguf", Runtime::Packed),
        ("gguf/tiny-tq2_0.gguf", Runtime::Dense),
    ] {
        let g = GgufModel::open(fixture(file)).unwrap();
        let cfg = g.config();
        assert_eq!(
            (
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.num_hidden_layers
            ),
            (256, 512, 2)
        );
        assert_eq!((cfg.num_attention_heads, cfg.num_key_value_heads), (4, 2));
        assert!(cfg.tie_word_embeddings);
        let model = g.load_model(runtime).unwrap();
        let logits = all_logits(&model, &input);
        let d = rel_diff(&logits, &e["logits_gguf"]);
        eprintln!("{file} {runtime:?}: logits within {d:.2e} of the max logit");
        assert!(d < TOLERANCE, "{file} {runtime:?}: rel diff {d}");
        assert_eq!(
            greedy(&model, &input, want_greedy.len()),
            want_greedy,
            "{file} {runtime:?}"
        );
    }
}

#[test]
fn converted_projections_are_per_tensor_ternary() {
    // Every block of a converted projection has the same f16 scale: one scale per tensor.
    let g = GgufModel::open(fixture("gguf/tiny-tq1_0.gguf")).unwrap();
    let model = g.load_model(Runtime::Packed).unwrap();
    for (name, p) in model.projections() {
        let ProjectionWeight::Packed(w) = p.weight().unwrap() else {
            panic!("{name} is not packed");
        };
        assert_eq!(w.scales().len(), 1, "{name}");
        let s = w.scales()[0];
        assert_eq!(
            half::f16::from_f32(s).to_f32(),
            s,
            "{name}: not an f16 value"
        );
    }
}

#[test]
fn tokenizer_from_metadata_encodes_as_sentencepiece() {
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("gguf/summary.json")).unwrap())
            .unwrap();
    let as_ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let g = GgufModel::open(fixture("gguf/tiny-tq2_0.gguf")).unwrap();
    let tok = g
        .tokenizer()
        .unwrap()
        .expect("the converter writes a tokenizer");
    assert_eq!(tok.bos, Some(1));
    assert_eq!(tok.eos, Some(2));
    assert!(tok.add_bos);
    let mut prompt = vec![1];
    prompt.extend(tok.encode(summary["prompt"].as_str().unwrap()));
    assert_eq!(prompt, as_ids(&summary["input_ids"]));
    for s in summary["samples"].as_array().unwrap() {
        let text = s["text"].as_str().unwrap();
        let want = as_ids(&s["ids"]);
        assert_eq!(tok.encode(text), want, "{text:?}");
        assert_eq!(tok.decode(&want, true), text, "{text:?}");
    }
}

/// Our exports of the TQ2_0 fixture's model, type by type (f16 embeddings).
fn export_fixture(t: GgmlType) -> Vec<u8> {
    export_fixture_with(t, GgmlType::F16)
}

fn export_fixture_with(t: GgmlType, embeddings: GgmlType) -> Vec<u8> {
    let g = GgufModel::open(fixture("gguf/tiny-tq2_0.gguf")).unwrap();
    let model = g.load_model(Runtime::Packed).unwrap();
    let opts = ExportOptions {
        ternary: t,
        embeddings,
        name: "tiny".into(),
        extra_metadata: tokenizer_metadata(g.file()),
        ..Default::default()
    };
    export(&model, &opts).unwrap().to_bytes()
}

/// Checks `values` (f32, row-major) of `shape` against gguf-py's record of one tensor: its shape,
/// its first values, and the sha256 of all of its f32 bytes.
fn check_against_gguf_py(what: &str, shape: &[usize], values: &[f32], want: &serde_json::Value) {
    use sha2::{Digest, Sha256};
    let want_shape: Vec<usize> = want["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(shape, want_shape, "{what}: shape");
    let first: Vec<f32> = want["first"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(values[..first.len()], first[..], "{what}: first values");
    let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
    let digest: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        digest,
        want["sha256"].as_str().unwrap(),
        "{what}: values differ"
    );
}

fn gguf_py_record() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("gguf/exported/gguf_py.json")).unwrap())
        .unwrap()
}

#[test]
fn gguf_py_dequantizes_our_exports_to_our_values() {
    // exported/gguf_py.json: per type and tensor, the sha256 of gguf-py's dequantized f32 values
    // of what `bitnet_convert` wrote (the script's `check`); the committed tq2_0.gguf is that
    // file, and we write the same bytes today.
    let committed = std::fs::read(fixture("gguf/exported/tq2_0.gguf")).unwrap();
    assert!(
        committed == export_fixture(GgmlType::TQ2_0),
        "our TQ2_0 export changed"
    );
    let record = gguf_py_record();
    for t in [GgmlType::TQ1_0, GgmlType::TQ2_0, GgmlType::I2S] {
        let file =
            GgufFile::parse(t.name(), bitnet::io::gguf::Bytes::Owned(export_fixture(t))).unwrap();
        let ours = GgufModel::from_file(file).unwrap();
        let theirs = record[t.name()].as_object().unwrap();
        assert_eq!(theirs.len(), ours.file().tensors().len(), "{t}");
        for (name, want) in theirs {
            let got = ours.tensor_f32(name).unwrap();
            let v = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            check_against_gguf_py(&format!("{t} {name}"), got.dims(), &v, want);
        }
    }
}

#[test]
fn gguf_py_reads_our_embedding_types() {
    let record = gguf_py_record();
    for e in [GgmlType::Q8_0, GgmlType::BF16, GgmlType::F32] {
        let bytes = export_fixture_with(GgmlType::TQ2_0, e);
        let file = GgufFile::parse(e.name(), bitnet::io::gguf::Bytes::Owned(bytes)).unwrap();
        let (info, raw) = file.tensor_bytes("token_embd.weight").unwrap();
        assert_eq!(info.dtype, e);
        let v = bitnet::io::gguf::dequant::dequantize("token_embd.weight", e, &info.shape(), raw)
            .unwrap();
        let want = &record[format!("tq2_0+{}", e.name())]["token_embd.weight"];
        check_against_gguf_py(e.name(), &info.shape(), &v, want);
    }
}

#[test]
fn every_type_we_read_dequantizes_as_gguf_py() {
    // exported/dtypes.gguf: written by gguf-py, one tensor of each type (F32, F16, BF16, Q8_0,
    // Q6_K, TQ1_0, TQ2_0; the TQ blocks have a scale each, so they load per group).
    let file = GgufFile::open(fixture("gguf/exported/dtypes.gguf")).unwrap();
    let record = gguf_py_record();
    let theirs = record["dtypes"].as_object().unwrap();
    assert_eq!(theirs.len(), 7);
    for (name, want) in theirs {
        let (info, bytes) = file.tensor_bytes(name).unwrap();
        assert_eq!(
            info.dtype.name(),
            name,
            "the tensor is named after its type"
        );
        let v =
            bitnet::io::gguf::dequant::dequantize(name, info.dtype, &info.shape(), bytes).unwrap();
        check_against_gguf_py(name, &info.shape(), &v, want);
    }
}

fn packed_weights(model: &BitNetForCausalLM) -> Vec<(String, Vec<i8>, Vec<f32>)> {
    model
        .projections()
        .into_iter()
        .map(|(name, p)| {
            let w = p.weight().unwrap().to_packed().unwrap();
            (name, w.levels(), w.scales().to_vec())
        })
        .collect()
}

#[test]
fn hf_to_gguf_to_hf_keeps_every_code_per_type() {
    // An HF offline checkpoint of the fixture model (256 wide: whole TQ blocks).
    let dir = temp_dir("rt");
    let src = GgufModel::open(fixture("gguf/tiny-tq2_0.gguf")).unwrap();
    save(
        &src.load_model(Runtime::Packed).unwrap(),
        dir.join("hf"),
        SaveForm::Offline,
        DType::F32,
        None,
    )
    .unwrap();
    let hf = packed_model(dir.join("hf"));
    let want = packed_weights(&hf);
    let input = ids(&expected()["input_ids"]);
    let want_logits = all_logits(&hf, &input);
    for t in [GgmlType::TQ1_0, GgmlType::TQ2_0, GgmlType::I2S] {
        let path = dir.join(format!("{t}.gguf"));
        let opts = ExportOptions {
            ternary: t,
            embeddings: GgmlType::F32,
            ..Default::default()
        };
        export(&hf, &opts).unwrap().write(&path).unwrap();
        let g = GgufModel::open(&path).unwrap();
        let gm = g.load_model(Runtime::Packed).unwrap();
        // The fixture's scales are f16 values already, so even TQ keeps them exactly.
        assert_eq!(packed_weights(&gm), want, "{t}: GGUF codes or scales");
        let back = dir.join(format!("hf-{t}"));
        save(&gm, &back, SaveForm::Offline, DType::F32, None).unwrap();
        let again = packed_model(&back);
        assert_eq!(packed_weights(&again), want, "{t}: HF codes or scales");
        let d = rel_diff(&all_logits(&again, &input), &want_logits);
        assert_eq!(d, 0.0, "{t}: logits moved by {d}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tq_scales_round_to_f16_and_i2_s_keeps_f32() {
    // The HF fixture's scales are arbitrary f32 (mean|W|); TQ files hold f16 ones.
    let hf = packed_model(fixture("bitnet_hf/untied/offline"));
    let w = match hf.projections()[0].1.weight().unwrap() {
        ProjectionWeight::Packed(p) => p,
        _ => panic!("offline weights are packed"),
    };
    let s = w.scales()[0];
    assert_ne!(
        half::f16::from_f32(s).to_f32(),
        s,
        "pick a scale that f16 changes"
    );
    // The fixture is 64 wide, not whole blocks: each type refuses it, naming the block.
    for (t, block) in [
        (GgmlType::TQ1_0, "256"),
        (GgmlType::TQ2_0, "256"),
        (GgmlType::I2S, "128"),
    ] {
        let opts = ExportOptions {
            ternary: t,
            untied_head: true,
            ..Default::default()
        };
        let err = export(&hf, &opts).unwrap_err().to_string();
        assert!(err.contains(block) && err.contains("attn_q"), "{t}: {err}");
    }
    // One weight, 256 wide, through the block codecs directly.
    use bitnet::io::gguf::ternary::{from_packed, to_packed};
    let q = bitnet_quant::Quantizer::new(
        bitnet_quant::Scheme::TernaryAbsmeanHf,
        bitnet_quant::Estimator::Identity,
    )
    .unwrap();
    let x = Tensor::randn(0f32, 1.0, (8, 512), &Device::Cpu).unwrap();
    let p = bitnet_quant::PackedTernary::pack(&x, &q).unwrap();
    let s = p.scales()[0];
    for t in [GgmlType::TQ1_0, GgmlType::TQ2_0, GgmlType::I2S] {
        let back = to_packed("w", t, 8, 512, &from_packed(&p, t).unwrap()).unwrap();
        assert_eq!(back.levels(), p.levels(), "{t}");
        let want = match t {
            GgmlType::I2S => s,
            _ => half::f16::from_f32(s).to_f32(),
        };
        assert_eq!(back.scales(), [want], "{t}");
    }
}

#[test]
fn untied_heads_go_out_as_output_weight_when_asked_and_load_back() {
    // The fixture model, untied: its HF form with an lm_head of its own (half the embedding).
    let dir = temp_dir("untied");
    let src = GgufModel::open(fixture("gguf/tiny-tq2_0.gguf")).unwrap();
    let hf_dir = dir.join("hf");
    save(
        &src.load_model(Runtime::Packed).unwrap(),
        &hf_dir,
        SaveForm::Offline,
        DType::F32,
        None,
    )
    .unwrap();
    let st = hf_dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let head = (tensors["model.embed_tokens.weight"].clone() * 0.5).unwrap();
    tensors.insert("lm_head.weight".into(), head);
    candle_core::safetensors::save(&tensors, &st).unwrap();
    let cfg_path = hf_dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["tie_word_embeddings"] = false.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let hf = packed_model(&hf_dir);
    let err = export(&hf, &ExportOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("untied lm_head"), "{err}");
    let opts = ExportOptions {
        embeddings: GgmlType::F32,
        untied_head: true,
        ..Default::default()
    };
    let path = dir.join("untied.gguf");
    export(&hf, &opts).unwrap().write(&path).unwrap();
    let g = GgufModel::open(&path).unwrap();
    assert!(!g.config().tie_word_embeddings);
    assert!(g.file().tensor_info("output.weight").is_some());
    let input = ids(&expected()["input_ids"]);
    let d = rel_diff(
        &all_logits(&g.load_model(Runtime::Packed).unwrap(), &input),
        &all_logits(&hf, &input),
    );
    assert_eq!(d, 0.0, "untied logits moved by {d}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn exporter_refuses_untied_heads() {
    let hf = packed_model(fixture("bitnet_hf/untied/online"));
    let err = export(&hf, &ExportOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("untied lm_head"), "{err}");
}

/// An edit of a file's metadata and tensor names (`old=new` renames a tensor).
type Edit = dyn Fn(&mut Vec<(String, Value)>, &mut Vec<String>);

#[test]
fn loader_errors_name_the_field_or_tensor() {
    let bytes = std::fs::read(fixture("gguf/tiny-tq2_0.gguf")).unwrap();
    let file = GgufFile::parse("t", bitnet::io::gguf::Bytes::Owned(bytes.clone())).unwrap();
    // Rebuild the file with one change each and check the error's words.
    let rebuild = |edit: &Edit| -> String {
        let mut meta = file.metadata().to_vec();
        let mut names: Vec<String> = file.tensors().iter().map(|t| t.name.clone()).collect();
        edit(&mut meta, &mut names);
        let mut w = bitnet::io::gguf::GgufWriter::new();
        for (k, v) in meta {
            if k != "general.alignment" {
                w.set(k, v);
            }
        }
        for t in file.tensors() {
            if let Some(n) = names
                .iter()
                .find(|n| **n == t.name || n.starts_with(&format!("{}=", t.name)))
            {
                let new = n.split_once('=').map_or(n.as_str(), |x| x.1);
                let (_, b) = file.tensor_bytes(&t.name).unwrap();
                w.add_tensor(new, &t.shape(), t.dtype, b.to_vec()).unwrap();
            }
        }
        let f = GgufFile::parse("t", bitnet::io::gguf::Bytes::Owned(w.to_bytes())).unwrap();
        GgufModel::from_file(f).unwrap_err().to_string()
    };
    let set = |key: &'static str, v: Value| {
        move |m: &mut Vec<(String, Value)>, _: &mut Vec<String>| {
            m.retain(|(k, _)| k != key);
            m.push((key.to_string(), v.clone()));
        }
    };
    let cases: Vec<(Box<Edit>, &str)> = vec![
        (
            Box::new(set("general.architecture", Value::String("llama".into()))),
            "general.architecture",
        ),
        (
            Box::new(set("bitnet.block_count", Value::U32(0))),
            "bitnet.block_count",
        ),
        (
            Box::new(set("bitnet.block_count", Value::U32(3))),
            "hold at most 2 layers",
        ),
        (
            Box::new(set("bitnet.block_count", Value::U32(u32::MAX))),
            "bitnet.block_count",
        ),
        (
            Box::new(set("bitnet.feed_forward_length", Value::U32(256))),
            "blk.0.ffn_sub_norm.weight",
        ),
        (
            Box::new(|m: &mut Vec<(String, Value)>, _: &mut Vec<String>| {
                m.retain(|(k, _)| k != "bitnet.embedding_length")
            }),
            "missing metadata `bitnet.embedding_length`",
        ),
        (
            Box::new(|_: &mut Vec<(String, Value)>, n: &mut Vec<String>| {
                n.retain(|x| x != "blk.1.ffn_sub_norm.weight")
            }),
            "missing tensor `blk.1.ffn_sub_norm.weight`",
        ),
        (
            Box::new(|_: &mut Vec<(String, Value)>, n: &mut Vec<String>| {
                for x in n.iter_mut() {
                    if x == "blk.0.attn_norm.weight" {
                        *x = "blk.0.attn_norm.weight=blk.0.attn_norm.scale".into();
                    }
                }
            }),
            "blk.0.attn_norm",
        ),
    ];
    for (edit, words) in cases {
        let err = rebuild(&*edit);
        assert!(err.contains(words), "expected {words:?} in: {err}");
    }
}
