//! MNIST from the four canonical idx files, gzip'd or not (`data/mnist/` holds a copy).

use candle_core::{Device, Result, Tensor};
use std::io::Read;
use std::path::Path;

/// MNIST as tensors: images `[n, 784]` f32 in `[0, 1]`, labels `[n]` u32.
#[derive(Debug, Clone)]
pub struct Mnist {
    pub train_images: Tensor,
    pub train_labels: Tensor,
    pub test_images: Tensor,
    pub test_labels: Tensor,
}

fn read_file(dir: &Path, stem: &str) -> Result<Vec<u8>> {
    let gz = dir.join(format!("{stem}.gz"));
    let plain = dir.join(stem);
    let (path, zipped) = if gz.exists() {
        (gz, true)
    } else {
        (plain, false)
    };
    let raw = std::fs::read(&path)
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
    if !zipped {
        return Ok(raw);
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(raw.as_slice())
        .read_to_end(&mut out)
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
    Ok(out)
}

fn be_u32(b: &[u8], at: usize) -> usize {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize
}

/// Parses an idx file: big-endian magic (0x803 images, 0x801 labels), counts, then u8 data.
fn parse_idx<'a>(name: &str, b: &'a [u8], magic: usize) -> Result<(Vec<usize>, &'a [u8])> {
    let bad = |why: String| candle_core::Error::Msg(format!("{name}: not an idx file: {why}"));
    if b.len() < 8 || be_u32(b, 0) != magic {
        return Err(bad(format!("expected magic {magic:#x}")));
    }
    let ndim = magic & 0xff;
    let header = 4 + 4 * ndim;
    if b.len() < header {
        return Err(bad("truncated header".into()));
    }
    let dims: Vec<usize> = (0..ndim).map(|i| be_u32(b, 4 + 4 * i)).collect();
    let n: usize = dims.iter().product();
    if b.len() != header + n {
        return Err(bad(format!(
            "{} data bytes for dims {dims:?}",
            b.len() - header
        )));
    }
    Ok((dims, &b[header..]))
}

fn images(dir: &Path, stem: &str, dev: &Device) -> Result<Tensor> {
    let raw = read_file(dir, stem)?;
    let (dims, data) = parse_idx(stem, &raw, 0x803)?;
    let pixels: Vec<f32> = data.iter().map(|&p| p as f32 / 255.0).collect();
    Tensor::from_vec(pixels, (dims[0], dims[1] * dims[2]), dev)
}

fn labels(dir: &Path, stem: &str, dev: &Device) -> Result<Tensor> {
    let raw = read_file(dir, stem)?;
    let (dims, data) = parse_idx(stem, &raw, 0x801)?;
    let l: Vec<u32> = data.iter().map(|&v| v as u32).collect();
    Tensor::from_vec(l, dims[0], dev)
}

/// Loads MNIST from `dir` onto `dev`.
pub fn load(dir: impl AsRef<Path>, dev: &Device) -> Result<Mnist> {
    let dir = dir.as_ref();
    Ok(Mnist {
        train_images: images(dir, "train-images.idx3-ubyte", dev)?,
        train_labels: labels(dir, "train-labels.idx1-ubyte", dev)?,
        test_images: images(dir, "t10k-images.idx3-ubyte", dev)?,
        test_labels: labels(dir, "t10k-labels.idx1-ubyte", dev)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idx_parsing_checks_magic_and_length() {
        let mut b = vec![0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9];
        let (dims, data) = parse_idx("x", &b, 0x801).unwrap();
        assert_eq!((dims, data), (vec![3], &[7u8, 8, 9][..]));
        assert!(parse_idx("x", &b, 0x803)
            .unwrap_err()
            .to_string()
            .contains("magic"));
        b.pop();
        assert!(parse_idx("x", &b, 0x801)
            .unwrap_err()
            .to_string()
            .contains("data bytes"));
    }

    #[test]
    fn the_committed_copy_loads() {
        let m = load(
            concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist"),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(m.train_images.dims(), &[60000, 784]);
        assert_eq!(m.test_labels.dims(), &[10000]);
        let max = m.test_labels.max(0).unwrap().to_scalar::<u32>().unwrap();
        assert_eq!(max, 9);
    }
}
