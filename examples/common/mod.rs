//! Shared by the examples: command-line value checks and where the committed data sets live.

// Each example includes this module and uses part of it.
#![allow(dead_code)]

use std::path::PathBuf;

/// A data set committed under `data/` in this repository (`rel` inside it). The examples default
/// to these copies; the library itself takes every path from its caller.
pub fn repo_data(rel: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/data")).join(rel)
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
