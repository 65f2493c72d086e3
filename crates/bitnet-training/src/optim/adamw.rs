//! [`QatAdamW`]: AdamW with a fused in-place CPU update, parameter groups and latent-weight clipping.

use std::collections::HashSet;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use candle_nn::Optimizer;

use super::fused::{apply_fused, SliceUpdate};
use super::kernels::{self, AdamCoeffs, GradSrc, DEFAULT_PAR_THRESHOLD};
use super::state::{check_float, check_shape, step_tensor, Buf, Entries};
use super::{check, OptimizerState, ParamGroup, WeightDecay};
use crate::TrainingError;

/// Hyper-parameters of [`QatAdamW`]; the defaults are candle-nn's `ParamsAdamW` defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamsQatAdamW {
    /// Learning rate (default 1e-3).
    pub lr: f64,
    /// Decay of the first moment, in [0, 1) (default 0.9).
    pub beta1: f64,
    /// Decay of the second moment, in [0, 1) (default 0.999).
    pub beta2: f64,
    /// Added to the denominator, > 0 (default 1e-8).
    pub eps: f64,
    /// Decoupled weight decay, >= 0 (default 0.01).
    pub weight_decay: f64,
}

impl Default for ParamsQatAdamW {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl From<candle_nn::ParamsAdamW> for ParamsQatAdamW {
    fn from(p: candle_nn::ParamsAdamW) -> Self {
        Self {
            lr: p.lr,
            beta1: p.beta1,
            beta2: p.beta2,
            eps: p.eps,
            weight_decay: p.weight_decay,
        }
    }
}

impl ParamsQatAdamW {
    /// Checks every field; the error names the field and its allowed range.
    pub fn validate(&self) -> Result<()> {
        check(
            "lr",
            self.lr,
            self.lr >= 0.0 && self.lr.is_finite(),
            "finite, >= 0",
        )?;
        check(
            "beta1",
            self.beta1,
            (0.0..1.0).contains(&self.beta1),
            "[0, 1)",
        )?;
        check(
            "beta2",
            self.beta2,
            (0.0..1.0).contains(&self.beta2),
            "[0, 1)",
        )?;
        check(
            "eps",
            self.eps,
            self.eps > 0.0 && self.eps.is_finite(),
            "finite, > 0",
        )?;
        check(
            "weight_decay",
            self.weight_decay,
            self.weight_decay >= 0.0 && self.weight_decay.is_finite(),
            "finite, >= 0",
        )
    }
}

#[derive(Debug)]
struct Slot {
    var: Var,
    group: usize,
    m: Buf,
    v: Buf,
}

/// AdamW for QAT: candle-nn's `AdamW` update, fused into one in-place pass per parameter.
///
/// Update at step `t` (1-based) for a parameter `theta` with gradient `g`, using its group's
/// `lr = params.lr * lr_scale` and `wd = params.weight_decay * weight_decay_scale`:
/// `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`, `theta = theta (1 - lr wd) -
/// lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`, then `theta = clamp(theta, -c, c)` if the
/// group clips. With one group and no clipping this is exactly candle-nn's `AdamW` (tested to f32
/// rounding). Parameters without a gradient in the `GradStore` are skipped; the step counter still
/// advances, as in candle-nn.
///
/// f32 CPU parameters take the fused kernel, f32 CUDA parameters (feature `cuda`) one fused CUDA
/// kernel per parameter with the same f32 operations (so the same bits); other float dtypes and
/// Metal take tensor ops.
///
/// ```
/// use bitnet_training::optim::{OptimizerState, ParamGroup, ParamsQatAdamW, QatAdamW};
/// use candle_core::{Device, Tensor, Var};
/// use candle_nn::Optimizer;
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let w = Var::new(&[0.5f32, -0.9], &dev)?;
/// let b = Var::new(&[0.0f32], &dev)?;
/// let groups = vec![
///     ParamGroup::new(vec![w.clone()]).clip(1.0),
///     ParamGroup::new(vec![b.clone()]).no_weight_decay(),
/// ];
/// let mut opt = QatAdamW::with_groups(groups, ParamsQatAdamW { lr: 0.1, ..Default::default() })?;
/// let loss = (w.as_tensor().sum_all()? + b.as_tensor().sum_all()?)?;
/// opt.backward_step(&loss)?;
/// // The first Adam step moves each weight by about lr against its gradient's sign.
/// let w1 = w.as_tensor().to_vec1::<f32>()?;
/// assert!((w1[0] - (0.5 * (1.0 - 0.1 * 0.01) - 0.1)).abs() < 1e-5);
/// assert!(w1[1] >= -1.0);
/// assert_eq!(opt.state()?.len(), 5); // step, m.0, v.0, m.1, v.1
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct QatAdamW {
    slots: Vec<Slot>,
    groups: Vec<ParamGroup>,
    params: ParamsQatAdamW,
    step_t: usize,
    par_threshold: usize,
}

/// The fused update of one parameter.
struct AdamUpdate<'a> {
    m: &'a mut [f32],
    v: &'a mut [f32],
    c: AdamCoeffs,
    threshold: usize,
}

impl SliceUpdate for AdamUpdate<'_> {
    fn name(&self) -> &'static str {
        "qat-adamw"
    }

    fn apply(&mut self, param: &mut [f32], grad: GradSrc<'_>) {
        kernels::adamw(param, grad, self.m, self.v, &self.c, self.threshold);
    }
}

impl QatAdamW {
    /// An optimizer over parameter groups. Every `Var` must appear in one group only, and be of a
    /// float dtype; the errors name the parameter by its index (counting through the groups in order).
    pub fn with_groups(groups: Vec<ParamGroup>, params: ParamsQatAdamW) -> Result<Self> {
        params.validate()?;
        let mut slots = Vec::new();
        let mut seen = HashSet::new();
        for (gi, group) in groups.iter().enumerate() {
            group.validate()?;
            check_float(&group.vars, slots.len())?;
            for var in &group.vars {
                if !seen.insert(var.as_tensor().id()) {
                    return Err(TrainingError::Parameter {
                        index: slots.len(),
                        shape: var.shape().clone(),
                        reason: format!("listed twice (again in group {gi})"),
                    }
                    .into());
                }
                slots.push(Slot {
                    var: var.clone(),
                    group: gi,
                    m: Buf::zeros(var)?,
                    v: Buf::zeros(var)?,
                });
            }
        }
        Ok(Self {
            slots,
            groups,
            params,
            step_t: 0,
            par_threshold: DEFAULT_PAR_THRESHOLD,
        })
    }

    /// The hyper-parameters.
    pub fn params(&self) -> &ParamsQatAdamW {
        &self.params
    }

    /// Replaces the hyper-parameters (validated).
    pub fn set_params(&mut self, params: ParamsQatAdamW) -> Result<()> {
        params.validate()?;
        self.params = params;
        Ok(())
    }

    /// The parameter groups.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> usize {
        self.step_t
    }

    /// Parameters with at least `n` elements are updated in parallel (default
    /// [`DEFAULT_PAR_THRESHOLD`]); `usize::MAX` keeps every update on the calling thread.
    pub fn set_parallel_threshold(&mut self, n: usize) {
        self.par_threshold = n;
    }

    /// The parallel threshold in elements.
    pub fn parallel_threshold(&self) -> usize {
        self.par_threshold
    }

    fn step_slot(&mut self, i: usize, g: &Tensor) -> Result<()> {
        let slot = &mut self.slots[i];
        let group = &self.groups[slot.group];
        let p = &self.params;
        let lr = p.lr * group.lr_scale;
        let wd = p.weight_decay * group.weight_decay_scale;
        match (&mut slot.m, &mut slot.v) {
            (Buf::Host(m), Buf::Host(v)) => {
                let c = AdamCoeffs::new(lr, p.beta1, p.beta2, p.eps, wd, self.step_t, group.clip);
                let mut update = AdamUpdate {
                    m,
                    v,
                    c,
                    threshold: self.par_threshold,
                };
                apply_fused(slot.var.as_tensor(), g, &mut update)
            }
            #[cfg(feature = "cuda")]
            (Buf::Device(m), Buf::Device(v))
                if slot.var.device().is_cuda() && slot.var.dtype() == candle_core::DType::F32 =>
            {
                // One fused kernel, then the copy of `Var::set`; the moments stay views of the
                // kernel's `[3, n]` output.
                let c = AdamCoeffs::new(lr, p.beta1, p.beta2, p.eps, wd, self.step_t, group.clip);
                let op = super::adamw_gpu::AdamStep {
                    grad: g.contiguous()?,
                    c,
                };
                let flat = |t: &Tensor| t.flatten_all()?.contiguous();
                let out =
                    flat(slot.var.as_tensor())?.apply_op3_no_bwd(&flat(m)?, &flat(v)?, &op)?;
                let shape = slot.var.shape().clone();
                *m = out.get(1)?.reshape(&shape)?;
                *v = out.get(2)?.reshape(&shape)?;
                slot.var.set(&out.get(0)?.reshape(&shape)?)
            }
            (Buf::Device(m), Buf::Device(v)) => {
                let t = i32::try_from(self.step_t).unwrap_or(i32::MAX);
                let scale_m = 1.0 / (1.0 - p.beta1.powi(t));
                let scale_v = 1.0 / (1.0 - p.beta2.powi(t));
                let next_m = ((&*m * p.beta1)? + (g * (1.0 - p.beta1))?)?;
                let next_v = ((&*v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
                let m_hat = (&next_m * scale_m)?;
                let v_hat = (&next_v * scale_v)?;
                let theta = (slot.var.as_tensor() * (1.0 - lr * wd))?;
                let adjusted = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
                let mut theta = (theta - (adjusted * lr)?)?;
                if let Some(c) = group.clip {
                    theta = theta.clamp(-c, c)?;
                }
                *m = next_m;
                *v = next_v;
                slot.var.set(&theta)
            }
            _ => unreachable!("both moments take the same path"),
        }
    }
}

impl Optimizer for QatAdamW {
    type Config = ParamsQatAdamW;

    /// One group holding every var (candle-nn's `AdamW::new`, but non-float vars are an error).
    fn new(vars: Vec<Var>, params: ParamsQatAdamW) -> Result<Self> {
        Self::with_groups(vec![ParamGroup::new(vars)], params)
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_t += 1;
        for i in 0..self.slots.len() {
            if let Some(g) = grads.get(self.slots[i].var.as_tensor()) {
                self.step_slot(i, g)?;
            }
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    /// Sets the base learning rate (groups keep their multipliers). Not validated: a schedule
    /// validates its values at construction.
    fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }
}

impl WeightDecay for QatAdamW {
    fn weight_decay(&self) -> f64 {
        self.params.weight_decay
    }

    fn set_weight_decay(&mut self, weight_decay: f64) {
        self.params.weight_decay = weight_decay;
    }
}

/// Entries: `step` (i64 scalar), then `m.{i}` and `v.{i}` for parameter `i` (counting through the
/// groups in order), each of the parameter's shape.
impl OptimizerState for QatAdamW {
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(1 + 2 * self.slots.len());
        out.push(("step".to_string(), step_tensor(self.step_t)?));
        for (i, s) in self.slots.iter().enumerate() {
            out.push((format!("m.{i}"), s.m.to_tensor(&s.var)?));
            out.push((format!("v.{i}"), s.v.to_tensor(&s.var)?));
        }
        Ok(out)
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let mut entries = Entries::new(state)?;
        let step = entries.take_step("step")?;
        // Check every entry before changing anything.
        let mut loaded = Vec::with_capacity(self.slots.len());
        for i in 0..self.slots.len() {
            let m_name = format!("m.{i}");
            let v_name = format!("v.{i}");
            loaded.push((
                m_name.clone(),
                entries.take(&m_name)?,
                v_name.clone(),
                entries.take(&v_name)?,
            ));
        }
        entries.finish()?;
        for (slot, (mn, m, vn, v)) in self.slots.iter().zip(&loaded) {
            check_shape(mn, m, &slot.var)?;
            check_shape(vn, v, &slot.var)?;
        }
        for (slot, (mn, m, vn, v)) in self.slots.iter_mut().zip(loaded) {
            slot.m.load(&mn, m, &slot.var)?;
            slot.v.load(&vn, v, &slot.var)?;
        }
        self.step_t = step;
        Ok(())
    }
}
