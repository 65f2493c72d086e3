//! Shared by the examples: command-line value checks and where the committed data sets live.

// Each example includes this module and uses part of it.
#![allow(dead_code)]

use std::path::PathBuf;

/// Which quantizer every layer of an example's model uses (`--mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// No quantization (the same layers, full precision).
    Fp,
    /// BitNet b1.58: absmean ternary weights, int8 activations.
    Ternary,
    /// BitNet b1: binary weights `sign(W - mean W)`, int8 activations.
    Binary,
}

impl Mode {
    /// The name in logs and JSON lines, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Fp => "fp",
            Mode::Ternary => "ternary",
            Mode::Binary => "binary",
        }
    }
}

/// A data set committed under `data/` in this repository (`rel` inside it). The examples default
/// to these copies; the library itself takes every path from its caller.
pub fn repo_data(rel: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/data")).join(rel)
}

/// The thread count rayon's global pool will have (`RAYON_NUM_THREADS`, else the cores), read
/// without starting the pool: `rayon::current_num_threads()` would start it, and a process with
/// more than one thread can no longer move candle's elementwise ops onto the caller
/// (`bitnet::core::host_threads::elementwise_on_caller`). For default shard counts.
pub fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
}

/// An integer of at least 1, for clap's `value_parser`.
pub fn positive_usize(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(v) => Ok(v),
        Err(e) => Err(format!("{e} (expected an integer >= 1)")),
    }
}

/// A finite number above 0, for clap's `value_parser`.
pub fn positive_f64(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(v) => Err(format!("{v} is not a finite number > 0")),
        Err(e) => Err(format!("{e} (expected a finite number > 0)")),
    }
}

/// A number in `[0, 1]`, for clap's `value_parser`.
pub fn unit_f64(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        Ok(v) => Err(format!("{v} is not in [0, 1]")),
        Err(e) => Err(format!("{e} (expected a number in [0, 1])")),
    }
}

/// The process's peak resident memory for the JSON summary line, `null` where the platform does
/// not report it.
pub fn peak_rss_json() -> serde_json::Value {
    bitnet::core::host_memory::peak_resident_bytes().into()
}
