//! Data parallelism across CPU cores: a batch split into row shards whose forward and backward
//! run at the same time, their gradients summed.
//!
//! On small layers (the MNIST MLP at batch 128) a second core gains little inside each op: the
//! GEMMs are too small to split well and every hand-off to a rayon worker costs a wake-up.
//! Running two half-batches side by side keeps each core busy with a whole forward and backward
//! instead. [`sharded_backward`] does that on rayon's pool and returns one [`GradStore`] for
//! the optimizer, so a training loop changes in one line.
//!
//! The summed gradients equal the whole batch's (up to float rounding of the sums) when the loss
//! is a mean over rows of a per-row term and the model mixes no rows: per-token activation
//! quantization, RMSNorm, per-tensor weight scales and cross-entropy all qualify; a batch norm
//! or a loss over pairs of rows (in-batch contrastive) does not. Each shard's loss is weighted by
//! its share of the rows, so shards of unequal size are exact too. The shards' gradients are
//! added in shard order, so the result does not depend on which thread finished first.
//!
//! ```
//! use bitnet_training::data_parallel::sharded_backward;
//! use candle_core::{Device, Tensor, Var};
//! # fn main() -> candle_core::Result<()> {
//! let w = Var::new(&[[1f32, -2.0]], &Device::Cpu)?;
//! let x = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]], &Device::Cpu)?;
//! let mean_sq = |b: &[Tensor]| b[0].matmul(&w.as_tensor().t()?)?.sqr()?.mean_all();
//! let (loss, grads) = sharded_backward(&[&x], 2, mean_sq)?;
//! let whole = mean_sq(&[x.clone()])?;
//! assert!((loss.to_scalar::<f32>()? - whole.to_scalar::<f32>()?).abs() < 1e-6);
//! let g = grads.get(w.as_tensor()).unwrap().to_vec2::<f32>()?;
//! let want = whole.backward()?.get(w.as_tensor()).unwrap().to_vec2::<f32>()?;
//! assert!((g[0][0] - want[0][0]).abs() < 1e-5 && (g[0][1] - want[0][1]).abs() < 1e-5);
//! # Ok(())
//! # }
//! ```

use crate::TrainingError;
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};
use rayon::prelude::*;

/// Splits every tensor of `batch` into `shards` blocks of rows (dim 0; the first blocks take
/// one row more when the rows do not divide), computes `loss_fn` on each block and its
/// backward in parallel on rayon's pool, and returns the batch loss (the shards' losses
/// weighted by their row counts, detached) and the sum of the shards' weighted gradients.
///
/// `loss_fn` receives the blocks in the order of `batch` and must return a scalar that is the
/// mean over the block's rows (see the module docs for when the result equals one backward over
/// the whole batch). `shards` is clamped to the number of rows; 1 runs the batch as it is.
///
/// Errors: `shards == 0`, an empty `batch`, tensors whose first dimensions differ or are zero, a
/// loss of more than one value, and whatever `loss_fn` or a backward returns.
///
/// Meant for the CPU, where each shard gets a core; on a GPU one large batch keeps the device
/// busier than shards launched from several threads.
pub fn sharded_backward<F>(
    batch: &[&Tensor],
    shards: usize,
    loss_fn: F,
) -> Result<(Tensor, GradStore)>
where
    F: Fn(&[Tensor]) -> Result<Tensor> + Sync,
{
    if shards == 0 {
        return Err(TrainingError::InvalidConfig {
            field: "shards",
            value: "0".into(),
            allowed: "at least 1",
        }
        .into());
    }
    let rows = batch_rows(batch)?;
    let shards = shards.min(rows);
    let (base, extra) = (rows / shards, rows % shards);
    let bounds: Vec<(usize, usize)> = (0..shards)
        .map(|i| (i * base + i.min(extra), base + usize::from(i < extra)))
        .collect();
    let run = |&(start, len): &(usize, usize)| -> Result<(Tensor, GradStore)> {
        let block = batch
            .iter()
            .map(|t| t.narrow(0, start, len))
            .collect::<Result<Vec<_>>>()?;
        let mut loss = scalar(loss_fn(&block)?)?;
        if len < rows {
            loss = (loss * (len as f64 / rows as f64))?;
        }
        let grads = loss.backward()?;
        Ok((loss.detach(), grads))
    };
    // One shard runs on the caller's thread: a hop onto rayon's pool would buy nothing.
    let parts: Vec<(Tensor, GradStore)> = match bounds.as_slice() {
        [one] => vec![run(one)?],
        _ => bounds.par_iter().map(run).collect::<Result<_>>()?,
    };
    let mut parts = parts.into_iter();
    let (mut loss, mut grads) = parts.next().expect("at least one shard");
    for (l, g) in parts {
        loss = (loss + l)?;
        grads.extend(g)?;
    }
    Ok((loss, grads))
}

/// `loss` itself when it holds one value: a per-row loss would be summed by the backward and
/// its shards weighted wrongly.
fn scalar(loss: Tensor) -> Result<Tensor> {
    if loss.elem_count() != 1 {
        return Err(TrainingError::InvalidConfig {
            field: "loss",
            value: format!("a tensor of shape {:?}", loss.dims()),
            allowed: "one value, the mean over the shard's rows",
        }
        .into());
    }
    Ok(loss)
}

/// The common first dimension of `batch`'s tensors.
fn batch_rows(batch: &[&Tensor]) -> Result<usize> {
    let Some(first) = batch.first() else {
        return Err(TrainingError::InvalidConfig {
            field: "batch",
            value: "[]".into(),
            allowed: "at least one tensor",
        }
        .into());
    };
    let rows = first.dims().first().copied().unwrap_or(0);
    for t in batch {
        let r = t.dims().first().copied().unwrap_or(0);
        if r != rows || r == 0 {
            return Err(TrainingError::InvalidConfig {
                field: "batch",
                value: format!(
                    "{:?}",
                    batch.iter().map(|t| t.dims().to_vec()).collect::<Vec<_>>()
                ),
                allowed: "tensors with the same, non-zero first dimension",
            }
            .into());
        }
    }
    Ok(rows)
}
