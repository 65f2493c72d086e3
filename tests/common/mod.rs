//! Shared by the integration tests: files from outside the repository (a downloaded model, a
//! reference tool). A fresh clone has none of them, so a test that needs one skips with a line
//! saying why; CI sets `BITNET_REQUIRE_EXTERNAL=1`, which turns the skip into a failure, so that
//! the tests still run where the files are provided.

// Each test binary includes this module and uses part of it.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

/// Set (to anything but `0` or empty) to make a missing external file a test failure.
pub const REQUIRE_EXTERNAL: &str = "BITNET_REQUIRE_EXTERNAL";

/// Whether missing external files fail the tests instead of skipping them.
pub fn external_required() -> bool {
    std::env::var(REQUIRE_EXTERNAL).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The first of `candidates` that holds `probe` (a file name inside it). When none does, prints
/// `skipped: <what> not found ...` and returns `None`, or panics with the same words when
/// [`external_required`].
pub fn find_dir(what: &str, candidates: &[PathBuf], probe: &str) -> Option<PathBuf> {
    if let Some(dir) = candidates.iter().find(|d| d.join(probe).is_file()) {
        return Some(dir.clone());
    }
    let looked: Vec<String> = candidates.iter().map(|d| d.display().to_string()).collect();
    let msg = format!("{what} not found (looked in: {})", looked.join(", "));
    if external_required() {
        panic!("{msg}; {REQUIRE_EXTERNAL} is set, so this is a failure");
    }
    // Straight to stderr, past libtest's capture of `println!`, so that a plain `cargo test`
    // shows what did not run.
    let _ = writeln!(std::io::stderr(), "skipped: {msg}");
    None
}

/// The snapshot folders of a Hugging Face Hub model in the local cache (`HF_HUB_CACHE`, else
/// `HF_HOME/hub`, else `~/.cache/huggingface/hub`), newest first.
pub fn hf_cache_snapshots(repo_id: &str) -> Vec<PathBuf> {
    let hub = std::env::var_os("HF_HUB_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HF_HOME").map(|h| Path::new(&h).join("hub")))
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/huggingface/hub")));
    let Some(hub) = hub else { return Vec::new() };
    let dir = hub
        .join(format!("models--{}", repo_id.replace('/', "--")))
        .join("snapshots");
    let mut snaps: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    snaps.sort_by_key(|s| std::cmp::Reverse(s.0));
    snaps.into_iter().map(|(_, p)| p).collect()
}

/// A data set committed under `data/` in this repository.
pub fn repo_data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data").join(rel)
}

/// The folder `../shared/<rel>` beside the repository, where the project's CI keeps models and
/// tools.
pub fn shared(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared")
        .join(rel)
}
