//! Checkpoints from the Hugging Face Hub (feature `hub`): a thin wrapper that downloads a
//! repository's files into the local Hugging Face cache and returns the folder, which
//! [`super::HfCheckpoint::open`] reads like any other.

use crate::error::ModelError;
use candle_core::Result;
use std::path::PathBuf;

/// Downloads `repo_id` (e.g. `microsoft/bitnet-b1.58-2B-4T`) into the Hub cache (`HF_HOME`,
/// else `~/.cache/huggingface`) as candle's own examples do, skipping files already there, and
/// returns the snapshot folder: `config.json`, the safetensors (one file or the shards its index
/// lists) and `tokenizer.json` when the repository has one.
pub fn download(repo_id: &str) -> Result<PathBuf> {
    let hub_err = |e: hf_hub::api::sync::ApiError| {
        ModelError::checkpoint(repo_id, format!("Hugging Face Hub: {e}"))
    };
    let api = hf_hub::api::sync::Api::new().map_err(hub_err)?;
    let repo = api.model(repo_id.to_string());
    let config = repo.get("config.json").map_err(hub_err)?;
    let _ = repo.get("tokenizer.json");
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::checkpoint(index.display().to_string(), e.to_string()))?;
            let mut files: Vec<&str> = v["weight_map"]
                .as_object()
                .map(|m| m.values().filter_map(|f| f.as_str()).collect())
                .unwrap_or_default();
            files.sort();
            files.dedup();
            for f in files {
                repo.get(f).map_err(hub_err)?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors").map_err(hub_err)?;
        }
    }
    let dir = config.parent().ok_or_else(|| {
        ModelError::checkpoint(repo_id, "the Hub cache returned a file with no folder")
    })?;
    Ok(dir.to_path_buf())
}
