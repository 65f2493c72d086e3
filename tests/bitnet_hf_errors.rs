//! The Hugging Face checkpoint loader on bad directories: each error names the tensor or field at
//! fault, and corrupted configs and safetensors headers give errors, never a panic.

use bitnet::io::hf::HfCheckpoint;
use bitnet::models::bitnet::Runtime;
use proptest::prelude::*;
use safetensors::tensor::TensorView;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference/bitnet_hf")
        .join(rel)
}

/// A fresh copy of a fixture checkpoint in a temporary folder.
fn copy_of(rel: &str, tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bitnet-hf-err-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(rel).join(f), d.join(f)).unwrap();
    }
    d
}

/// Rewrites the checkpoint's safetensors with `edit` applied to its (name -> (dtype, shape,
/// bytes)) map.
fn edit_tensors(
    dir: &Path,
    edit: impl FnOnce(&mut HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut map: HashMap<_, _> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut map);
    let views: HashMap<String, TensorView> = map
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(&views, None, &dir.join("model.safetensors")).unwrap();
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

fn open_err(dir: &Path) -> String {
    match HfCheckpoint::open(dir) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e.to_string(),
    }
}

type Edit = Box<dyn Fn(&Path)>;

#[test]
fn bad_checkpoints_are_errors_naming_the_tensor_or_field() {
    let q = "model.layers.0.self_attn.q_proj";
    let cases: Vec<(&str, &str, Edit, Vec<&str>)> = vec![
        (
            "missing tensor",
            "untied/online",
            Box::new(move |d| {
                edit_tensors(d, |m| {
                    m.remove(&format!("{q}.weight"));
                })
            }),
            vec!["missing tensor", "q_proj.weight"],
        ),
        (
            "unknown tensor",
            "untied/online",
            Box::new(|d| {
                edit_tensors(d, |m| {
                    m.insert(
                        "model.layers.0.mlp.extra.weight".into(),
                        (safetensors::Dtype::F32, vec![1], vec![0; 4]),
                    );
                })
            }),
            vec!["unknown tensor", "mlp.extra.weight"],
        ),
        (
            "wrong shape",
            "untied/online",
            Box::new(|d| {
                edit_tensors(d, |m| {
                    m.insert(
                        "model.norm.weight".into(),
                        (safetensors::Dtype::F32, vec![3], vec![0; 12]),
                    );
                })
            }),
            vec!["model.norm.weight", "[3]", "[64]"],
        ),
        (
            "wrong dtype",
            "untied/online",
            Box::new(move |d| {
                edit_tensors(d, |m| {
                    m.insert(
                        format!("{q}.weight"),
                        (safetensors::Dtype::U8, vec![64, 64], vec![0; 4096]),
                    );
                })
            }),
            vec!["q_proj.weight", "dtype"],
        ),
        (
            "packed rows",
            "untied/offline",
            Box::new(move |d| {
                edit_tensors(d, |m| {
                    m.insert(
                        format!("{q}.weight"),
                        (safetensors::Dtype::U8, vec![15, 64], vec![85; 960]),
                    );
                })
            }),
            vec!["q_proj.weight", "[15, 64]", "4 per byte"],
        ),
        (
            "rows not a multiple of 4",
            "untied/offline",
            Box::new(|d| {
                edit_config(d, |v| {
                    v["intermediate_size"] = 162.into();
                })
            }),
            vec!["gate_proj.weight", "not a multiple of 4"],
        ),
        (
            "weight_scale shape",
            "untied/offline",
            Box::new(move |d| {
                edit_tensors(d, |m| {
                    m.insert(
                        format!("{q}.weight_scale"),
                        (safetensors::Dtype::F32, vec![2], vec![0; 8]),
                    );
                })
            }),
            vec!["q_proj.weight_scale", "one value"],
        ),
        (
            "truncated file",
            "untied/online",
            Box::new(|d| {
                let p = d.join("model.safetensors");
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() - 100]).unwrap();
            }),
            vec!["model.safetensors", "truncated"],
        ),
        (
            "no weights",
            "untied/online",
            Box::new(|d| std::fs::remove_file(d.join("model.safetensors")).unwrap()),
            vec!["neither model.safetensors"],
        ),
        (
            "missing config field",
            "untied/online",
            Box::new(|d| {
                edit_config(d, |v| {
                    v.as_object_mut().unwrap().remove("num_key_value_heads");
                })
            }),
            vec!["config.json", "num_key_value_heads", "missing"],
        ),
        (
            "config field type",
            "untied/online",
            Box::new(|d| {
                edit_config(d, |v| {
                    v["hidden_size"] = "64".into();
                })
            }),
            vec!["hidden_size", "expected an integer"],
        ),
        (
            "unsupported activation",
            "untied/online",
            Box::new(|d| {
                edit_config(d, |v| {
                    v["hidden_act"] = "gelu".into();
                })
            }),
            vec!["hidden_act", "relu2"],
        ),
        (
            "heads",
            "untied/online",
            Box::new(|d| {
                edit_config(d, |v| {
                    v["num_key_value_heads"] = 3.into();
                })
            }),
            vec!["num_key_value_heads", "divisor"],
        ),
        (
            "linear class",
            "untied/offline",
            Box::new(|d| {
                edit_config(d, |v| {
                    v["quantization_config"]["linear_class"] = "fancylinear".into();
                })
            }),
            vec!["quantization_config.linear_class", "autobitlinear"],
        ),
        (
            "rope type",
            "untied/online",
            Box::new(|d| {
                edit_config(d, |v| {
                    v["rope_parameters"]["rope_type"] = "yarn".into();
                })
            }),
            vec!["rope_parameters.rope_type"],
        ),
        (
            "not json",
            "untied/online",
            Box::new(|d| std::fs::write(d.join("config.json"), "{").unwrap()),
            vec!["config.json"],
        ),
    ];
    for (i, (what, src, edit, words)) in cases.iter().enumerate() {
        let dir = copy_of(src, &format!("case{i}"));
        edit(&dir);
        let msg = open_err(&dir);
        for w in words {
            assert!(msg.contains(w), "{what}: {msg:?} lacks {w:?}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn a_bad_code_or_scale_is_an_error_when_the_model_is_built() {
    let q = "model.layers.1.mlp.down_proj";
    let dir = copy_of("untied/offline", "code3");
    edit_tensors(&dir, |m| {
        m.get_mut(&format!("{q}.weight")).unwrap().2[5] = 0xff;
    });
    let msg = HfCheckpoint::open(&dir)
        .unwrap()
        .load_model(Runtime::Packed)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("down_proj.weight") && msg.contains("code 3"),
        "{msg}"
    );
    edit_tensors(&dir, |m| {
        m.get_mut(&format!("{q}.weight")).unwrap().2[5] = 0x55;
        m.insert(
            format!("{q}.weight_scale"),
            (
                safetensors::Dtype::F32,
                vec![1],
                f32::NAN.to_le_bytes().to_vec(),
            ),
        );
    });
    let msg = HfCheckpoint::open(&dir)
        .unwrap()
        .load_model(Runtime::Packed)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("down_proj.weight") && msg.contains("weight_scale"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Overwrites bytes of the safetensors header (length prefix and JSON) or of config.json:
    /// opening and building give a result, never a panic.
    #[test]
    fn corrupted_headers_and_configs_never_panic(
        in_config in any::<bool>(),
        edits in proptest::collection::vec((0usize..2000, any::<u8>()), 1..6),
    ) {
        let dir = copy_of("untied/offline", "prop");
        let file = dir.join(if in_config { "config.json" } else { "model.safetensors" });
        let mut bytes = std::fs::read(&file).unwrap();
        // The header of the fixture's safetensors is about 5 KB; the config about 1 KB.
        let span = if in_config { bytes.len() } else { 8 + 5000.min(bytes.len() - 8) };
        for (pos, b) in edits {
            let at = pos % span;
            bytes[at] = b;
        }
        std::fs::write(&file, &bytes).unwrap();
        if let Ok(ckpt) = HfCheckpoint::open(&dir) {
            let _ = ckpt.load_model(Runtime::Packed);
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
