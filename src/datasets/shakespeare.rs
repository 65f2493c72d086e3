//! The Shakespeare corpus as bytes, split into training and validation text at a fixed boundary
//! (`data/shakespeare/` holds a copy: the complete plays, 5.06 MB, Open Knowledge Foundation).

use candle_core::Result;
use std::io::Read;
use std::path::Path;

/// The share of the corpus (from its start) used for training; the rest is validation text.
pub const TRAIN_SHARE: f64 = 0.9;

/// The corpus split into training and validation bytes.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// The first [`TRAIN_SHARE`] of the text.
    pub train: Vec<u8>,
    /// The rest: later plays than any the model trained on.
    pub valid: Vec<u8>,
}

/// Reads the corpus (gzip'd when the name ends in `.gz`) and splits it at [`TRAIN_SHARE`].
/// A file too short to give both parts at least `min_part` bytes is an error naming it.
pub fn load(path: impl AsRef<Path>, min_part: usize) -> Result<Corpus> {
    let path = path.as_ref();
    let err = |e: std::io::Error| candle_core::Error::Msg(format!("{}: {e}", path.display()));
    let raw = std::fs::read(path).map_err(err)?;
    let text = if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(err)?;
        out
    } else {
        raw
    };
    let split = (text.len() as f64 * TRAIN_SHARE) as usize;
    if split < min_part || text.len() - split < min_part {
        candle_core::bail!(
            "{}: {} bytes, too short for a training and a validation part of {min_part} bytes each",
            path.display(),
            text.len()
        );
    }
    Ok(Corpus {
        valid: text[split..].to_vec(),
        train: text[..split].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_copy_splits_at_the_boundary() {
        let c = load(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/data/shakespeare/shakespeare.txt.gz"
            ),
            1000,
        )
        .unwrap();
        assert_eq!(c.train.len() + c.valid.len(), 5_057_240);
        assert_eq!(c.train.len(), (5_057_240f64 * TRAIN_SHARE) as usize);
        assert!(String::from_utf8_lossy(&c.train[..20_000]).contains("PAROLLES"));
    }

    #[test]
    fn too_short_or_missing_files_are_errors_naming_them() {
        let p = std::env::temp_dir().join(format!("short-{}.txt", std::process::id()));
        std::fs::write(&p, b"To be, or not to be").unwrap();
        let e = load(&p, 100).unwrap_err().to_string();
        assert!(e.contains("short-") && e.contains("too short"), "{e}");
        std::fs::remove_file(&p).ok();
        let e = load("/nonexistent/corpus.txt", 1).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/corpus.txt"), "{e}");
    }
}
