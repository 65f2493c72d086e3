//! Atomic checkpoints and exact resume.
//!
//! A checkpoint is a directory holding two files:
//!
//! * `weights-<step>-<sha prefix>.safetensors`: every variable of the `VarMap` (as `var/<name>`)
//!   and the optimizer's state (as `optim/<name>`, see
//!   [`OptimizerState`]).
//! * `checkpoint.json`, the manifest: format version, step, the weights file's name, length and
//!   SHA-256, the variable and optimizer entry names, the schedule position (any JSON) and the
//!   random generator's state.
//!
//! Both are written to a temporary file, flushed to disk and renamed; the manifest is renamed
//! last and is the commit point. A crash or error at any moment leaves the previous manifest
//! pointing to the previous (intact) weights file, and a loader checks the length and hash, so a
//! torn or corrupt file is reported (naming it) instead of silently loading garbage. The old
//! weights file is removed only after the new manifest is in place.
//!
//! ```
//! use bitnet_training::checkpoint::{self, TrainingState};
//! use candle_core::{DType, Device};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> candle_core::Result<()> {
//! let dir = std::env::temp_dir().join(format!("bitnet-ckpt-doc-{}", std::process::id()));
//! let vm = VarMap::new();
//! candle_nn::linear(3, 2, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu).pp("fc"))?;
//! let state = TrainingState { step: 7, ..Default::default() };
//! checkpoint::save(&dir, &vm, &[], &state)?;
//! let restored = checkpoint::load(&dir, &vm)?; // the variables are set in place
//! assert_eq!(restored.state.step, 7);
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(()) }
//! ```

use crate::error::TrainingError;
use crate::optim::OptimizerState;
use candle_core::{Device, Result, Tensor, Var};
use candle_nn::VarMap;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The manifest format this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's file name inside a checkpoint directory.
pub const MANIFEST: &str = "checkpoint.json";

/// The exact state of a `ChaCha8Rng` (seed, stream and position), so that a resumed run draws
/// the same numbers (batch order, dropout) as an uninterrupted one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The 32-byte seed, hex.
    pub seed: String,
    /// The stream number.
    pub stream: u64,
    /// The word position (a 68-bit number), decimal, because JSON numbers stop at 2^53.
    pub word_pos: String,
}

impl RngState {
    /// Captures `rng`'s state.
    pub fn capture(rng: &ChaCha8Rng) -> Self {
        Self {
            seed: hex(&rng.get_seed()),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    /// A generator in exactly the captured state.
    pub fn restore(&self) -> Result<ChaCha8Rng> {
        use rand::SeedableRng;
        let bad = |what: &str| TrainingError::Parse(format!("rng state: bad {what}"));
        // Checked as ASCII hex first so that the byte slicing below cannot split a character.
        if self.seed.len() != 64 || !self.seed.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("seed (64 hex digits)").into());
        }
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(&self.seed[2 * i..2 * i + 2], 16).map_err(|_| bad("seed"))?;
        }
        let pos: u128 = self.word_pos.parse().map_err(|_| bad("word_pos"))?;
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(pos);
        Ok(rng)
    }
}

/// Everything besides tensors that a resumed run needs.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TrainingState {
    /// The number of optimizer steps taken.
    pub step: u64,
    /// Schedule positions or any other JSON the training loop wants back (epoch, best loss...).
    #[serde(default)]
    pub extra: serde_json::Value,
    /// The data/noise generator's state, if the run uses one.
    #[serde(default)]
    pub rng: Option<RngState>,
}

/// What [`load`] returns besides setting the variables.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The optimizer's state, for [`OptimizerState::load_state`] (CPU tensors).
    pub optimizer: Vec<(String, Tensor)>,
    /// Step, extra JSON and rng state.
    pub state: TrainingState,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    version: u32,
    step: u64,
    weights: String,
    length: u64,
    sha256: String,
    vars: Vec<String>,
    optimizer: Vec<String>,
    extra: serde_json::Value,
    rng: Option<RngState>,
}

/// The variables of `vm` sorted by name. Build the optimizer over this list (not
/// `VarMap::all_vars`, whose order follows a `HashMap` and differs between runs), so that its
/// state entries line up with the same variables after a resume.
pub fn sorted_vars(vm: &VarMap) -> Vec<Var> {
    let data = vm.data().lock().expect("VarMap lock poisoned");
    let mut v: Vec<(&String, &Var)> = data.iter().collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v.into_iter().map(|(_, var)| var.clone()).collect()
}

/// Where a save may be made to fail on purpose, to test that a failed save keeps the last good
/// checkpoint loadable.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    None,
    /// Half the weights written to the temporary file, then an error (a crash mid-write).
    TornWeights,
    /// Weights in place, the manifest's temporary written, then an error before its rename.
    ManifestRename,
}

/// Saves `vm`'s variables, the optimizer's `state()` and `state` into the directory `dir`
/// (created if missing), atomically (see the module docs). Returns the manifest's path.
pub fn save(
    dir: impl AsRef<Path>,
    vm: &VarMap,
    optimizer: &[(String, Tensor)],
    state: &TrainingState,
) -> Result<PathBuf> {
    save_with(dir.as_ref(), vm, optimizer, state, Fault::None)
}

/// [`save`] with the optimizer's state taken from `opt`.
pub fn save_with_optimizer(
    dir: impl AsRef<Path>,
    vm: &VarMap,
    opt: &impl OptimizerState,
    state: &TrainingState,
) -> Result<PathBuf> {
    save(dir, vm, &opt.state()?, state)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> candle_core::Error + '_ {
    move |source| {
        TrainingError::Io {
            path: path.display().to_string(),
            source,
        }
        .into()
    }
}

fn ckpt_err(path: &Path, reason: impl Into<String>) -> candle_core::Error {
    TrainingError::Checkpoint {
        path: path.display().to_string(),
        reason: reason.into(),
    }
    .into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Writes `bytes` to a hidden temporary next to `path`, flushes it, renames it over `path`.
fn write_atomic(path: &Path, bytes: &[u8], fail_before_rename: bool) -> Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("checkpoint");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let written = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        if fail_before_rename {
            return Err(ckpt_err(&tmp, "injected failure before rename"));
        }
        std::fs::rename(&tmp, path).map_err(io_err(path))
    })();
    if written.is_err() && !fail_before_rename {
        std::fs::remove_file(&tmp).ok();
    }
    written
}

fn save_with(
    dir: &Path,
    vm: &VarMap,
    optimizer: &[(String, Tensor)],
    state: &TrainingState,
    fault: Fault,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let vars: Vec<(String, Tensor)> = {
        let data = vm.data().lock().expect("VarMap lock poisoned");
        let mut v: Vec<(String, Tensor)> = data
            .iter()
            .map(|(k, var)| (k.clone(), var.as_tensor().clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let mut entries: Vec<(String, Tensor)> = Vec::with_capacity(vars.len() + optimizer.len());
    let mut seen = std::collections::HashSet::new();
    for (name, t) in &vars {
        entries.push((format!("var/{name}"), t.to_device(&Device::Cpu)?));
    }
    for (name, t) in optimizer {
        if !seen.insert(name.as_str()) {
            return Err(TrainingError::OptimizerState {
                entry: name.clone(),
                reason: "appears twice".into(),
            }
            .into());
        }
        entries.push((format!("optim/{name}"), t.to_device(&Device::Cpu)?));
    }
    let bytes = safetensors::tensor::serialize(entries.iter().map(|(n, t)| (n.as_str(), t)), None)
        .map_err(|e| ckpt_err(dir, format!("serializing: {e}")))?;
    let sha = sha256(&bytes);
    let weights = format!("weights-{:010}-{}.safetensors", state.step, &sha[..16]);
    let weights_path = dir.join(&weights);
    if fault == Fault::TornWeights {
        // A crash mid-write: a torn temporary, no rename.
        let tmp = dir.join(format!(".{weights}.tmp"));
        std::fs::write(&tmp, &bytes[..bytes.len() / 2]).map_err(io_err(&tmp))?;
        return Err(ckpt_err(&tmp, "injected failure mid-write"));
    }
    write_atomic(&weights_path, &bytes, false)?;
    let manifest = Manifest {
        version: FORMAT_VERSION,
        step: state.step,
        weights: weights.clone(),
        length: bytes.len() as u64,
        sha256: sha,
        vars: vars.iter().map(|(n, _)| n.clone()).collect(),
        optimizer: optimizer.iter().map(|(n, _)| n.clone()).collect(),
        extra: state.extra.clone(),
        rng: state.rng.clone(),
    };
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| ckpt_err(dir, format!("manifest: {e}")))?;
    let manifest_path = dir.join(MANIFEST);
    write_atomic(&manifest_path, &json, fault == Fault::ManifestRename)?;
    // Make the renames durable before deleting the previous weights.
    if let Ok(d) = std::fs::File::open(dir) {
        d.sync_all().ok();
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("weights-") && name.ends_with(".safetensors") && name != weights {
                std::fs::remove_file(e.path()).ok();
            }
        }
    }
    Ok(manifest_path)
}

/// The manifest of the checkpoint in `dir`, parsed and version-checked, with its path.
fn read_manifest(dir: &Path) -> Result<(PathBuf, Manifest)> {
    let manifest_path = dir.join(MANIFEST);
    let text = std::fs::read(&manifest_path).map_err(io_err(&manifest_path))?;
    let m: Manifest = serde_json::from_slice(&text)
        .map_err(|e| ckpt_err(&manifest_path, format!("manifest: {e}")))?;
    if m.version != FORMAT_VERSION {
        return Err(ckpt_err(
            &manifest_path,
            format!(
                "format version {}, this code reads {FORMAT_VERSION}",
                m.version
            ),
        ));
    }
    Ok((manifest_path, m))
}

/// The [`TrainingState`] of the checkpoint in `dir` (step, extra JSON, rng) from the manifest
/// alone: what a program needs to build the right model before [`load`] fills it in.
pub fn read_state(dir: impl AsRef<Path>) -> Result<TrainingState> {
    let (_, m) = read_manifest(dir.as_ref())?;
    Ok(TrainingState {
        step: m.step,
        extra: m.extra,
        rng: m.rng,
    })
}

/// Loads the checkpoint in `dir`: checks the manifest and the weights file's length and hash,
/// then sets every variable of `vm` (each must be present with its shape and dtype; nothing is
/// changed unless all are) and returns the optimizer's state and the [`TrainingState`].
/// Errors name the offending file.
pub fn load(dir: impl AsRef<Path>, vm: &VarMap) -> Result<Restored> {
    let dir = dir.as_ref();
    let (manifest_path, m) = read_manifest(dir)?;
    if m.weights.contains('/') || m.weights.contains('\\') || m.weights.starts_with('.') {
        return Err(ckpt_err(
            &manifest_path,
            format!("weights file name {:?} is not a plain file name", m.weights),
        ));
    }
    let weights_path = dir.join(&m.weights);
    let bytes = std::fs::read(&weights_path).map_err(io_err(&weights_path))?;
    if bytes.len() as u64 != m.length {
        return Err(ckpt_err(
            &weights_path,
            format!(
                "{} bytes, the manifest says {} (truncated?)",
                bytes.len(),
                m.length
            ),
        ));
    }
    if sha256(&bytes) != m.sha256 {
        return Err(ckpt_err(
            &weights_path,
            "SHA-256 differs from the manifest's (corrupt)",
        ));
    }
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| ckpt_err(&weights_path, format!("safetensors: {e}")))?;
    // Check every variable before setting any, so a mismatch leaves the model untouched.
    let data = vm.data().lock().expect("VarMap lock poisoned");
    let mut updates = Vec::with_capacity(data.len());
    for (name, var) in data.iter() {
        let t = tensors
            .remove(&format!("var/{name}"))
            .ok_or_else(|| ckpt_err(&weights_path, format!("no variable `{name}`")))?;
        if t.dims() != var.dims() || t.dtype() != var.dtype() {
            return Err(ckpt_err(
                &weights_path,
                format!(
                    "variable `{name}`: {:?} {:?} in the file, {:?} {:?} in the model",
                    t.dims(),
                    t.dtype(),
                    var.dims(),
                    var.dtype()
                ),
            ));
        }
        updates.push((var, t.to_device(var.device())?));
    }
    if let Some(extra) = m.vars.iter().find(|n| !data.contains_key(n.as_str())) {
        return Err(ckpt_err(
            &weights_path,
            format!("variable `{extra}` is not in the model"),
        ));
    }
    for (var, t) in updates {
        var.set(&t)?;
    }
    let mut optimizer = Vec::with_capacity(m.optimizer.len());
    for name in &m.optimizer {
        let t = tensors
            .remove(&format!("optim/{name}"))
            .ok_or_else(|| ckpt_err(&weights_path, format!("no optimizer entry `{name}`")))?;
        optimizer.push((name.clone(), t));
    }
    Ok(Restored {
        optimizer,
        state: TrainingState {
            step: m.step,
            extra: m.extra,
            rng: m.rng,
        },
    })
}

/// [`load`], then restores `opt`'s state; returns the [`TrainingState`] to continue from.
pub fn resume(
    dir: impl AsRef<Path>,
    vm: &VarMap,
    opt: &mut impl OptimizerState,
) -> Result<TrainingState> {
    let r = load(dir, vm)?;
    opt.load_state(&r.optimizer)?;
    Ok(r.state)
}

#[cfg(test)]
mod tests;
