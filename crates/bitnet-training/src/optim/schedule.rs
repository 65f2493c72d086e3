//! Schedules of the learning rate and the weight decay.
//!
//! A [`Schedule`] maps a step (0-based) to a value. The implementations compose: [`Sequence`] runs
//! one schedule up to a step and another after it (restarted at 0), and boxed or borrowed schedules
//! are schedules too. [`bitnet_two_stage_lr`] and [`bitnet_two_stage_wd`] build the BitNet b1.58
//! recipe from these parts. [`Scheduler`] sets an optimizer's learning rate (and weight decay) from
//! schedules before each step. Constructors reject bad configs with an error naming the field.
//!
//! ```
//! use bitnet_training::optim::schedule::{Schedule, WarmupCosine};
//! # fn main() -> candle_core::Result<()> {
//! let s = WarmupCosine::new(1e-3, 10, 110, 0.0)?;
//! assert!((s.value(5) - 0.5e-3).abs() < 1e-15); // half-way through the warmup
//! assert_eq!(s.value(10), 1e-3); // peak
//! assert!((s.value(60) - 0.5e-3).abs() < 1e-15); // half-way through the cosine
//! assert_eq!(s.value(500), 0.0);
//! # Ok(()) }
//! ```

use std::f64::consts::PI;

use candle_core::Result;
use candle_nn::Optimizer;

use super::{check, WeightDecay};

/// A value (learning rate, weight decay, ...) as a function of the step, counted from 0.
pub trait Schedule {
    /// The value at `step`.
    fn value(&self, step: usize) -> f64;
}

impl<S: Schedule + ?Sized> Schedule for Box<S> {
    fn value(&self, step: usize) -> f64 {
        (**self).value(step)
    }
}

impl<S: Schedule + ?Sized> Schedule for &S {
    fn value(&self, step: usize) -> f64 {
        (**self).value(step)
    }
}

fn check_value(field: &'static str, v: f64) -> Result<()> {
    check(field, v, v >= 0.0 && v.is_finite(), "finite, >= 0")
}

/// The same value at every step.
#[derive(Clone, Debug, PartialEq)]
pub struct Constant {
    value: f64,
}

impl Constant {
    /// A constant schedule; `value` must be finite and >= 0.
    pub fn new(value: f64) -> Result<Self> {
        check_value("value", value)?;
        Ok(Self { value })
    }
}

impl Schedule for Constant {
    fn value(&self, _step: usize) -> f64 {
        self.value
    }
}

/// The shared shape of the warmup-then-decay schedules.
#[derive(Clone, Debug, PartialEq)]
struct Warmup {
    peak: f64,
    warmup_steps: usize,
    total_steps: usize,
    min_value: f64,
}

impl Warmup {
    fn new(peak: f64, warmup_steps: usize, total_steps: usize, min_value: f64) -> Result<Self> {
        check_value("peak", peak)?;
        check("total_steps", total_steps, total_steps >= 1, ">= 1")?;
        check(
            "warmup_steps",
            warmup_steps,
            warmup_steps <= total_steps,
            "0..=total_steps",
        )?;
        check(
            "min_value",
            min_value,
            min_value >= 0.0 && min_value <= peak,
            "0..=peak",
        )?;
        Ok(Self {
            peak,
            warmup_steps,
            total_steps,
            min_value,
        })
    }

    /// `Ok(warmup value)` during the warmup, else `Err(progress in [0, 1])` of the decay.
    fn phase(&self, step: usize) -> std::result::Result<f64, f64> {
        if step < self.warmup_steps {
            Ok(self.peak * step as f64 / self.warmup_steps as f64)
        } else if step >= self.total_steps {
            Err(1.0)
        } else {
            Err((step - self.warmup_steps) as f64 / (self.total_steps - self.warmup_steps) as f64)
        }
    }
}

/// Linear warmup from 0 to `peak` over `warmup_steps`, then cosine decay to `min_value` at
/// `total_steps`, and `min_value` after it (HuggingFace's `get_cosine_schedule_with_warmup` plus a floor):
/// `peak * s / warmup` for `s < warmup`, else `min + (peak - min) * (1 + cos(pi * p)) / 2` with
/// `p = min(1, (s - warmup) / (total - warmup))`.
#[derive(Clone, Debug, PartialEq)]
pub struct WarmupCosine(Warmup);

impl WarmupCosine {
    /// Errors unless `peak` is finite and >= 0, `total_steps >= 1`, `warmup_steps <= total_steps` and
    /// `0 <= min_value <= peak`.
    pub fn new(peak: f64, warmup_steps: usize, total_steps: usize, min_value: f64) -> Result<Self> {
        Warmup::new(peak, warmup_steps, total_steps, min_value).map(Self)
    }
}

impl Schedule for WarmupCosine {
    fn value(&self, step: usize) -> f64 {
        let w = &self.0;
        match w.phase(step) {
            Ok(v) => v,
            Err(p) => w.min_value + (w.peak - w.min_value) * 0.5 * (1.0 + (PI * p).cos()),
        }
    }
}

/// Linear warmup from 0 to `peak` over `warmup_steps`, then linear decay to `min_value` at
/// `total_steps`, and `min_value` after it: `peak + (min - peak) * p` with `p` as in [`WarmupCosine`].
#[derive(Clone, Debug, PartialEq)]
pub struct WarmupLinear(Warmup);

impl WarmupLinear {
    /// Same constraints as [`WarmupCosine::new`].
    pub fn new(peak: f64, warmup_steps: usize, total_steps: usize, min_value: f64) -> Result<Self> {
        Warmup::new(peak, warmup_steps, total_steps, min_value).map(Self)
    }
}

impl Schedule for WarmupLinear {
    fn value(&self, step: usize) -> f64 {
        let w = &self.0;
        match w.phase(step) {
            Ok(v) => v,
            Err(p) => w.peak + (w.min_value - w.peak) * p,
        }
    }
}

/// `first` for steps below `switch_at`, then `then` evaluated at `step - switch_at`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sequence<A, B> {
    first: A,
    switch_at: usize,
    then: B,
}

impl<A: Schedule, B: Schedule> Sequence<A, B> {
    /// Chains two schedules at step `switch_at`.
    pub fn new(first: A, switch_at: usize, then: B) -> Self {
        Self {
            first,
            switch_at,
            then,
        }
    }
}

impl<A: Schedule, B: Schedule> Schedule for Sequence<A, B> {
    fn value(&self, step: usize) -> f64 {
        if step < self.switch_at {
            self.first.value(step)
        } else {
            self.then.value(step - self.switch_at)
        }
    }
}

/// Where the BitNet b1.58 learning rate restarts at the half-way point, as a fraction of the peak.
pub const BITNET_RESTART_FRACTION: f64 = 2.0 / 3.0;

/// The BitNet b1.58 two-stage learning rate, as we read the recipe: with `half = total_steps / 2`,
/// stage 1 ([`WarmupLinear`]) warms up linearly to `peak` over `warmup_steps` and decays linearly to
/// 0 at `half`; stage 2 restarts at `peak * 2/3` ([`BITNET_RESTART_FRACTION`]) at `half` and decays
/// linearly to 0 at `total_steps`.
///
/// Errors: `peak` not finite or negative, `total_steps < 2`, `warmup_steps > total_steps / 2`.
pub fn bitnet_two_stage_lr(
    peak: f64,
    warmup_steps: usize,
    total_steps: usize,
) -> Result<Sequence<WarmupLinear, WarmupLinear>> {
    check("total_steps", total_steps, total_steps >= 2, ">= 2")?;
    let half = total_steps / 2;
    check(
        "warmup_steps",
        warmup_steps,
        warmup_steps <= half,
        "0..=total_steps / 2",
    )?;
    let first = WarmupLinear::new(peak, warmup_steps, half, 0.0)?;
    let then = WarmupLinear::new(peak * BITNET_RESTART_FRACTION, 0, total_steps - half, 0.0)?;
    Ok(Sequence::new(first, half, then))
}

/// The BitNet b1.58 weight decay: `weight_decay` (0.1 in the paper) for the first `total_steps / 2`
/// steps, then 0.
pub fn bitnet_two_stage_wd(
    weight_decay: f64,
    total_steps: usize,
) -> Result<Sequence<Constant, Constant>> {
    check("total_steps", total_steps, total_steps >= 2, ">= 2")?;
    Ok(Sequence::new(
        Constant::new(weight_decay)?,
        total_steps / 2,
        Constant::new(0.0)?,
    ))
}

/// Applies a learning-rate schedule, and optionally a weight-decay schedule, to an optimizer.
///
/// ```
/// use bitnet_training::optim::schedule::{bitnet_two_stage_lr, bitnet_two_stage_wd, Scheduler};
/// use bitnet_training::optim::{ParamsQatAdamW, QatAdamW, WeightDecay};
/// use candle_nn::Optimizer;
/// # fn main() -> candle_core::Result<()> {
/// let sched = Scheduler::new(bitnet_two_stage_lr(1.5e-3, 10, 100)?)
///     .with_weight_decay(bitnet_two_stage_wd(0.1, 100)?);
/// let mut opt = QatAdamW::new(vec![], ParamsQatAdamW::default())?;
/// sched.apply(&mut opt, 50); // call before each step with the step index
/// assert!((opt.learning_rate() - 1e-3).abs() < 1e-15); // restarted at 2/3 of the peak
/// assert_eq!(opt.weight_decay(), 0.0);
/// # Ok(()) }
/// ```
pub struct Scheduler {
    lr: Box<dyn Schedule>,
    weight_decay: Option<Box<dyn Schedule>>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("weight_decay", &self.weight_decay.is_some())
            .finish()
    }
}

impl Scheduler {
    /// A scheduler of the learning rate only.
    pub fn new(lr: impl Schedule + 'static) -> Self {
        Self {
            lr: Box::new(lr),
            weight_decay: None,
        }
    }

    /// Also schedules the weight decay.
    pub fn with_weight_decay(mut self, weight_decay: impl Schedule + 'static) -> Self {
        self.weight_decay = Some(Box::new(weight_decay));
        self
    }

    /// The learning rate at `step`.
    pub fn lr(&self, step: usize) -> f64 {
        self.lr.value(step)
    }

    /// The weight decay at `step`, if scheduled.
    pub fn weight_decay(&self, step: usize) -> Option<f64> {
        self.weight_decay.as_ref().map(|s| s.value(step))
    }

    /// Sets `opt`'s learning rate, and its weight decay if scheduled, for `step`.
    pub fn apply<O: Optimizer + WeightDecay>(&self, opt: &mut O, step: usize) {
        opt.set_learning_rate(self.lr(step));
        if let Some(wd) = self.weight_decay(step) {
            opt.set_weight_decay(wd);
        }
    }

    /// Sets only `opt`'s learning rate (for optimizers without weight decay, e.g. Bop's gamma).
    pub fn apply_lr<O: Optimizer>(&self, opt: &mut O, step: usize) {
        opt.set_learning_rate(self.lr(step));
    }
}
