//! Quantization error between a latent tensor and its quantized version.
//!
//! ```
//! use bitnet_quant::metrics;
//! use candle_core::{Device, Tensor};
//! # fn main() -> candle_core::Result<()> {
//! let x = Tensor::new(&[1.0f32, -1.0, 0.5, 0.0], &Device::Cpu)?;
//! let q = Tensor::new(&[1.0f32, -1.0, 1.0, 0.0], &Device::Cpu)?;
//! assert_eq!(metrics::mse(&x, &q)?, 0.0625);               // 0.25 / 4
//! assert!((metrics::sqnr_db(&x, &q)? - 9.5424).abs() < 1e-3); // 10 log10(2.25 / 0.25)
//! # Ok(()) }
//! ```

use crate::error::QuantError;
use candle_core::{DType, Result, Tensor};

fn host(x: &Tensor) -> Result<Vec<f64>> {
    x.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()
}

fn pair(op: &'static str, a: &Tensor, b: &Tensor) -> Result<(Vec<f64>, Vec<f64>)> {
    if a.shape() != b.shape() {
        return Err(QuantError::Shape {
            op,
            what: format!("{:?} vs {:?}", a.shape(), b.shape()),
        }
        .into());
    }
    Ok((host(a)?, host(b)?))
}

/// Mean squared error `mean((x - q)^2)`.
pub fn mse(x: &Tensor, q: &Tensor) -> Result<f64> {
    let (a, b) = pair("mse", x, q)?;
    Ok(a.iter().zip(&b).map(|(x, q)| (x - q).powi(2)).sum::<f64>() / a.len().max(1) as f64)
}

/// Signal-to-quantization-noise ratio `10 log10(sum x^2 / sum (x - q)^2)` in dB; infinite when
/// `q == x`.
pub fn sqnr_db(x: &Tensor, q: &Tensor) -> Result<f64> {
    let (a, b) = pair("sqnr_db", x, q)?;
    let signal: f64 = a.iter().map(|v| v * v).sum();
    let noise: f64 = a.iter().zip(&b).map(|(x, q)| (x - q).powi(2)).sum();
    Ok(10.0 * (signal / noise).log10())
}

/// Cosine similarity of the flattened tensors; 0 when either is all zero.
pub fn cosine_similarity(x: &Tensor, q: &Tensor) -> Result<f64> {
    let (a, b) = pair("cosine_similarity", x, q)?;
    let dot: f64 = a.iter().zip(&b).map(|(x, q)| x * q).sum();
    let na = a.iter().map(|v| v * v).sum::<f64>().sqrt();
    let nb = b.iter().map(|v| v * v).sum::<f64>().sqrt();
    Ok(if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    })
}

/// How often each integer level occurs: `(level, count)` for every level of `levels` present,
/// sorted by level.
pub fn level_histogram(levels: &[i8]) -> Vec<(i8, usize)> {
    let mut counts = [0usize; 256];
    for &l in levels {
        counts[(l as i16 + 128) as usize] += 1;
    }
    counts
        .iter()
        .enumerate()
        .filter(|(_, &c)| c > 0)
        .map(|(i, &c)| ((i as i16 - 128) as i8, c))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn metrics_by_hand() {
        let x = Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap();
        let q = Tensor::new(&[3.0f32, 0.0], &Device::Cpu).unwrap();
        assert_eq!(mse(&x, &q).unwrap(), 8.0);
        assert!((sqnr_db(&x, &q).unwrap() - 10.0 * (25.0f64 / 16.0).log10()).abs() < 1e-12);
        assert!((cosine_similarity(&x, &q).unwrap() - 0.6).abs() < 1e-12);
        assert!(sqnr_db(&x, &x).unwrap().is_infinite());
        assert_eq!(
            level_histogram(&[1, -1, 0, 1, 1, -128, 127]),
            vec![(-128, 1), (-1, 1), (0, 1), (1, 3), (127, 1)]
        );
        let bad = Tensor::new(&[1.0f32], &Device::Cpu).unwrap();
        assert!(mse(&x, &bad).unwrap_err().to_string().contains("shape"));
    }
}
