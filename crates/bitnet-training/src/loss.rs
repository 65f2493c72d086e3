//! Cross-entropy as one graph node.
//!
//! `candle_nn::loss::cross_entropy` is `nll(log_softmax(logits))`: about ten tensor ops forward
//! (max, subtract, exp, sum, log, gather, ...) and as many backward, each with its own
//! allocation and a zero-filled gradient buffer. On a classifier's `[128, 10]` logits that is
//! about 60 us per step on one core, 1.5 % of the MNIST MLP's whole ternary training step, for
//! 1 280 values. This op does the same in one pass each way.
//!
//! Forward: `mean_i (log sum_c exp(x[i,c]) - x[i, t_i])` (the max subtracted first, the sum in
//! f64). Backward: `dx[i,c] = (softmax(x_i)[c] - [c == t_i]) * g / rows`.
//! Reference: `candle_nn::loss::cross_entropy`, which the tests compare it with.
//!
//! f32 logits on the CPU; other dtypes and devices go to `candle_nn::loss::cross_entropy`.
//!
//! ```
//! use bitnet_training::loss::cross_entropy;
//! use candle_core::{Device, Tensor};
//! let logits = Tensor::new(&[[2f32, 0.0], [0.0, 0.0]], &Device::Cpu)?;
//! let targets = Tensor::new(&[0u32, 1], &Device::Cpu)?;
//! let l = cross_entropy(&logits, &targets)?.to_scalar::<f32>()?;
//! let want = ((1.0 + (-2f32).exp()).ln() + 2f32.ln()) / 2.0;
//! assert!((l - want).abs() < 1e-6);
//! # Ok::<(), candle_core::Error>(())
//! ```

use crate::error::TrainingError;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use std::sync::Mutex;

/// Mean cross-entropy of `logits: [rows, classes]` against class indices `targets: [rows]`
/// (u8, u32 or i64), as `candle_nn::loss::cross_entropy` (see the module docs). A target
/// outside `0..classes` or a shape mismatch is an error naming `targets` or `logits`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (rows, _) = logits
        .dims2()
        .map_err(|_| shape_error("logits", logits, "[rows, classes]"))?;
    if targets.dims() != [rows] {
        return Err(shape_error(
            "targets",
            targets,
            "[rows], as logits [rows, classes]",
        ));
    }
    if logits.dtype() != DType::F32 || !logits.device().is_cpu() {
        return candle_nn::loss::cross_entropy(logits, targets);
    }
    let logits = logits.contiguous()?;
    logits.apply_op2(
        &targets.contiguous()?,
        CrossEntropy {
            softmax: Mutex::new(None),
        },
    )
}

fn shape_error(field: &'static str, t: &Tensor, allowed: &'static str) -> candle_core::Error {
    TrainingError::InvalidConfig {
        field,
        value: format!("shape {:?}", t.shape()),
        allowed,
    }
    .into()
}

/// The op; holds its forward's `softmax - onehot` for the backward (one instance per call).
struct CrossEntropy {
    softmax: Mutex<Option<Vec<f32>>>,
}

/// The class indices as `usize`, each checked against `classes`.
fn class_indices(s: &CpuStorage, l: &Layout, classes: usize) -> Result<Vec<usize>> {
    // The layout's window only: a batch narrowed from a whole label set shares its storage.
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("cross_entropy: strided targets".into()))?;
    let values: Vec<i64> = match s {
        CpuStorage::U8(v) => v[a..b].iter().map(|&t| t as i64).collect(),
        CpuStorage::U32(v) => v[a..b].iter().map(|&t| t as i64).collect(),
        CpuStorage::I64(v) => v[a..b].to_vec(),
        other => {
            return Err(TrainingError::InvalidConfig {
                field: "targets",
                value: format!(
                    "dtype {:?}",
                    candle_core::backend::BackendStorage::dtype(other)
                ),
                allowed: "u8, u32 or i64 class indices",
            }
            .into())
        }
    };
    values
        .iter()
        .enumerate()
        .map(|(i, &t)| match usize::try_from(t) {
            Ok(t) if t < classes => Ok(t),
            _ => Err(TrainingError::InvalidConfig {
                field: "targets",
                value: format!("{t} at row {i}"),
                allowed: "class indices in 0..classes (the logits' last dimension)",
            }
            .into()),
        })
        .collect()
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "bitnet-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        st: &CpuStorage,
        lt: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, classes) = lx.shape().dims2()?;
        let (CpuStorage::F32(xs), Some((a, b))) = (sx, lx.contiguous_offsets()) else {
            candle_core::bail!("cross_entropy: contiguous f32 logits expected");
        };
        let xs = &xs[a..b];
        let targets = class_indices(st, lt, classes)?;
        let mut softmax = vec![0f32; rows * classes];
        let mut total = 0f64;
        for ((x, p), &t) in xs
            .chunks(classes)
            .zip(softmax.chunks_mut(classes))
            .zip(&targets)
        {
            let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0f64;
            for (p, &v) in p.iter_mut().zip(x) {
                let e = (v - max).exp();
                *p = e;
                sum += e as f64;
            }
            let inv = (1.0 / sum) as f32;
            p.iter_mut().for_each(|p| *p *= inv);
            // The backward's `softmax - onehot`, while the target is at hand.
            p[t] -= 1.0;
            total += sum.ln() + (max - x[t]) as f64;
        }
        *self.softmax.lock().unwrap_or_else(|e| e.into_inner()) = Some(softmax);
        let mean = (total / rows as f64) as f32;
        Ok((CpuStorage::F32(vec![mean]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        _targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut d = self
            .softmax
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg("cross_entropy: backward before forward".into())
            })?;
        let (rows, classes) = logits.dims2()?;
        let scale = grad.to_dtype(DType::F32)?.to_scalar::<f32>()? / rows as f32;
        d.iter_mut().for_each(|v| *v *= scale);
        Ok((
            Some(Tensor::from_vec(d, (rows, classes), logits.device())?),
            None,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Value and gradient against candle-nn's `nll(log_softmax)` and against the formula,
    /// for each index dtype, ordinary and large logits (where a softmax without the max
    /// overflows), and a scaled upstream gradient.
    #[test]
    fn matches_candle_nn_and_the_softmax_formula() {
        let dev = Device::Cpu;
        for (scale, dtype) in [(1.0, DType::U32), (60.0, DType::I64), (3.0, DType::U8)] {
            let x = (Tensor::randn(0f32, 1.0, (37, 11), &dev).unwrap() * scale).unwrap();
            let t: Vec<u32> = (0..37u32).map(|i| (i * 7) % 11).collect();
            let t = Tensor::new(t.as_slice(), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let v = Var::from_tensor(&x).unwrap();
            let ours = cross_entropy(v.as_tensor(), &t).unwrap();
            let theirs = candle_nn::loss::cross_entropy(v.as_tensor(), &t).unwrap();
            let (a, b) = (
                ours.to_scalar::<f32>().unwrap(),
                theirs.to_scalar::<f32>().unwrap(),
            );
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "value {a} vs {b}");
            let ga = (ours * 2.5).unwrap().backward().unwrap();
            let gb = (theirs * 2.5).unwrap().backward().unwrap();
            let ga: Vec<Vec<f32>> = ga.get(&v).unwrap().to_vec2().unwrap();
            let gb: Vec<Vec<f32>> = gb.get(&v).unwrap().to_vec2().unwrap();
            let xs: Vec<Vec<f32>> = x.to_vec2().unwrap();
            let ts: Vec<u32> = t.to_dtype(DType::U32).unwrap().to_vec1().unwrap();
            for i in 0..37 {
                let max = xs[i].iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                let sum: f64 = xs[i].iter().map(|&v| (v as f64 - max).exp()).sum();
                for c in 0..11 {
                    let p = (xs[i][c] as f64 - max).exp() / sum;
                    let onehot = if c as u32 == ts[i] { 1.0 } else { 0.0 };
                    let want = (p - onehot) * 2.5 / 37.0;
                    assert!(
                        (ga[i][c] as f64 - want).abs() < 1e-6,
                        "({i},{c}) {} vs {want}",
                        ga[i][c]
                    );
                    assert!((ga[i][c] - gb[i][c]).abs() < 1e-6, "({i},{c}) vs candle-nn");
                }
            }
        }
    }

    /// A batch's targets narrowed from a whole label set (an offset into a shared storage).
    #[test]
    fn narrowed_targets_read_their_own_window() {
        let dev = Device::Cpu;
        let all: Vec<u32> = (0..100u32).map(|i| (i * 3) % 10).collect();
        let all = Tensor::new(all.as_slice(), &dev).unwrap();
        let t = all.narrow(0, 41, 16).unwrap();
        let x = Tensor::randn(0f32, 1.0, (16, 10), &dev).unwrap();
        let a = cross_entropy(&x, &t).unwrap().to_scalar::<f32>().unwrap();
        let b = candle_nn::loss::cross_entropy(&x, &t.copy().unwrap())
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
    }

    #[test]
    fn bad_shapes_and_targets_are_errors_that_name_the_argument() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((4, 3), DType::F32, &dev).unwrap();
        let cases = [
            (
                x.clone(),
                Tensor::new(&[0u32, 1, 2], &dev).unwrap(),
                "targets",
            ),
            (
                x.clone(),
                Tensor::new(&[0u32, 1, 2, 3], &dev).unwrap(),
                "targets",
            ),
            (
                x.clone(),
                Tensor::new(&[0i64, -1, 2, 1], &dev).unwrap(),
                "targets",
            ),
            (
                x.flatten_all().unwrap(),
                Tensor::new(&[0u32], &dev).unwrap(),
                "logits",
            ),
            (
                x.clone(),
                Tensor::new(&[0f32, 1.0, 2.0, 1.0], &dev).unwrap(),
                "targets",
            ),
        ];
        for (logits, targets, field) in cases {
            let e = cross_entropy(&logits, &targets).unwrap_err().to_string();
            assert!(e.contains(&format!("`{field}`")), "{e}");
        }
    }
}
