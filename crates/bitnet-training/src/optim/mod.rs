//! Optimizers for quantization-aware training, with fused in-place CPU updates.
//!
//! candle-nn's `AdamW` spends about fifteen allocating tensor ops per parameter and step. The
//! optimizers here update each f32 CPU parameter and its state in **one pass, in place, without
//! allocating**: a kernel ([`kernels`](self)) runs inside a candle in-place op
//! (`Tensor::inplace_op2`, the gradient as the second operand) on the parameter's own storage, and
//! the state (moments, momentum) lives in host `Vec<f32>` buffers owned by the optimizer. Large
//! parameters are split into chunks run on rayon's pool (see [`DEFAULT_PAR_THRESHOLD`]).
//!
//! Parameters of another float dtype (f16, bf16, f64) or on a CUDA / Metal device take a plain
//! tensor-op path with the same formulas (slower, correct; GPU kernels come later). Integer
//! parameters are rejected at construction, naming the parameter.
//!
//! - [`QatAdamW`]: AdamW (candle-nn's semantics exactly) plus parameter groups ([`ParamGroup`]:
//!   own lr / weight-decay multipliers, clipping of latent weights to `[-c, c]`).
//! - [`Sgd`]: SGD with momentum, Nesterov and weight decay (PyTorch's formulas).
//! - [`Bop`]: the binary optimizer of Helwegen et al. 2019 (flips signs of binary latent weights).
//! - [`CaseOptimizer`]: routes every parameter to exactly one optimizer (e.g. Bop for binary weights,
//!   QatAdamW for the rest).
//! - [`schedule`]: learning-rate / weight-decay schedules (warmup + cosine, BitNet b1.58 two-stage)
//!   and [`Scheduler`] to apply them each step.
//!
//! Every optimizer implements [`OptimizerState`]: its state (step count, buffers) exports to named
//! tensors and imports back for a bit-exact resume from a checkpoint.

mod adamw;
#[cfg(any(feature = "cuda", test))]
mod adamw_gpu;
mod bop;
mod case;
mod fused;
mod group;
mod kernels;
pub mod schedule;
mod sgd;
mod state;

pub use adamw::{ParamsQatAdamW, QatAdamW};
pub use bop::{Bop, ParamsBop};
pub use case::{CaseOptimizer, Cases, Selector, VarPredicate};
pub use group::ParamGroup;
pub use kernels::DEFAULT_PAR_THRESHOLD;
pub use schedule::{Schedule, Scheduler};
pub use sgd::{ParamsSgd, Sgd};

use candle_core::{Result, Tensor};

use crate::TrainingError;

/// Export and import of an optimizer's state, for checkpoints.
///
/// `state()` returns named tensors (step counters as CPU i64 scalars, per-parameter buffers in the
/// parameter's shape); `load_state` on an optimizer built over the same parameters in the same order
/// restores it so that further steps are bit-identical to an uninterrupted run. Missing, unknown or
/// mis-shaped entries are errors naming the entry.
pub trait OptimizerState {
    /// The state as `(name, tensor)` pairs.
    fn state(&self) -> Result<Vec<(String, Tensor)>>;
    /// Restores a state produced by [`OptimizerState::state`].
    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()>;
}

/// Optimizers with a (global) weight decay that a schedule can change.
pub trait WeightDecay {
    /// The current weight decay.
    fn weight_decay(&self) -> f64;
    /// Sets the weight decay (parameter groups keep their multipliers).
    fn set_weight_decay(&mut self, weight_decay: f64);
}

/// `Ok` if `ok`, else an [`TrainingError::InvalidConfig`] naming `field`.
pub(crate) fn check(
    field: &'static str,
    value: impl std::fmt::Display,
    ok: bool,
    allowed: &'static str,
) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(TrainingError::InvalidConfig {
            field,
            value: value.to_string(),
            allowed,
        }
        .into())
    }
}
