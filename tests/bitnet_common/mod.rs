//! Shared by the BitNet model tests (`bitnet_hf.rs`, `gguf.rs`): the committed fixtures, scratch
//! folders, and the model calls their comparisons make.

// Each test binary includes this module and uses part of it.
#![allow(dead_code)]

use bitnet::io::hf::HfCheckpoint;
use bitnet::models::bitnet::{generate, BitNetForCausalLM, Cache, GenerateConfig, Runtime};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};

/// Logits agree within this fraction of the largest logit's magnitude (see [`rel_diff`]).
pub const TOLERANCE: f32 = 1e-4;

/// `tests/reference/<rel>`: the fixtures the reference scripts made.
pub fn reference(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference")
        .join(rel)
}

/// An empty folder of this process in the system's temporary folder.
pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bitnet-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The Hugging Face checkpoint in `dir`, as the packed inference model.
pub fn packed_model(dir: impl AsRef<Path>) -> BitNetForCausalLM {
    HfCheckpoint::open(dir)
        .unwrap()
        .load_model(Runtime::Packed)
        .unwrap()
}

/// The logits `[t, vocab]` at every position of `ids`, with no cache.
pub fn all_logits(model: &BitNetForCausalLM, ids: &[u32]) -> Tensor {
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model
        .forward_all(&x, 0, &mut Cache::new(false, model.config()))
        .unwrap()
        .squeeze(0)
        .unwrap()
}

/// max |a - b| / max |b|.
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let m = b.abs().unwrap().max_all().unwrap();
    d.to_scalar::<f32>().unwrap() / m.to_scalar::<f32>().unwrap()
}

/// The `n` greedy tokens after `ids`.
pub fn greedy(model: &BitNetForCausalLM, ids: &[u32], n: usize) -> Vec<u32> {
    let cfg = GenerateConfig {
        max_new_tokens: n,
        ..Default::default()
    };
    generate(model, ids, &cfg, |_| Ok(true)).unwrap().tokens
}
