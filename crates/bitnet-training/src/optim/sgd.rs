//! [`Sgd`]: SGD with momentum, Nesterov and weight decay, fused in place.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use candle_nn::Optimizer;

use super::fused::{apply_fused, SliceUpdate};
use super::kernels::{self, GradSrc, SgdCoeffs, DEFAULT_PAR_THRESHOLD};
use super::state::{check_float, check_shape, step_tensor, Buf, Entries};
use super::{check, OptimizerState, WeightDecay};

/// Hyper-parameters of [`Sgd`].
#[derive(Clone, Debug, PartialEq)]
pub struct ParamsSgd {
    /// Learning rate, >= 0 (default 0.01).
    pub lr: f64,
    /// Momentum `mu` in [0, 1) (default 0: plain SGD).
    pub momentum: f64,
    /// Coupled (L2) weight decay added to the gradient, >= 0 (default 0).
    pub weight_decay: f64,
    /// Nesterov momentum; needs `momentum > 0` (default false).
    pub nesterov: bool,
}

impl Default for ParamsSgd {
    fn default() -> Self {
        Self {
            lr: 0.01,
            momentum: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        }
    }
}

impl ParamsSgd {
    /// Checks every field; the error names the field and its allowed range.
    pub fn validate(&self) -> Result<()> {
        check(
            "lr",
            self.lr,
            self.lr >= 0.0 && self.lr.is_finite(),
            "finite, >= 0",
        )?;
        check(
            "momentum",
            self.momentum,
            (0.0..1.0).contains(&self.momentum),
            "[0, 1)",
        )?;
        check(
            "weight_decay",
            self.weight_decay,
            self.weight_decay >= 0.0 && self.weight_decay.is_finite(),
            "finite, >= 0",
        )?;
        check(
            "nesterov",
            self.nesterov,
            !self.nesterov || self.momentum > 0.0,
            "true only with momentum > 0",
        )
    }
}

#[derive(Debug)]
struct Slot {
    var: Var,
    buf: Buf,
}

/// Stochastic gradient descent with PyTorch's momentum formulas, one fused in-place pass per
/// parameter.
///
/// With `g' = g + wd * p`: `b = mu * b + g'` (b starts at 0), then `p -= lr * b`, or with Nesterov
/// `p -= lr * (g' + mu * b)`. Parameters without a gradient are skipped.
///
/// ```
/// use bitnet_training::optim::{ParamsSgd, Sgd};
/// use candle_core::{Device, Var};
/// use candle_nn::Optimizer;
/// # fn main() -> candle_core::Result<()> {
/// let p = Var::new(&[1.0f32], &Device::Cpu)?;
/// let mut opt = Sgd::new(vec![p.clone()], ParamsSgd { lr: 0.1, momentum: 0.9, ..Default::default() })?;
/// for _ in 0..2 {
///     let loss = p.as_tensor().sum_all()?; // gradient 1
///     opt.backward_step(&loss)?;
/// }
/// // b1 = 1, p = 0.9; b2 = 0.9 + 1 = 1.9, p = 0.9 - 0.19 = 0.71
/// assert!((p.as_tensor().to_vec1::<f32>()?[0] - 0.71).abs() < 1e-6);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Sgd {
    slots: Vec<Slot>,
    params: ParamsSgd,
    step_t: usize,
    par_threshold: usize,
}

struct SgdUpdate<'a> {
    buf: &'a mut [f32],
    c: SgdCoeffs,
    threshold: usize,
}

impl SliceUpdate for SgdUpdate<'_> {
    fn name(&self) -> &'static str {
        "sgd-momentum"
    }

    fn apply(&mut self, param: &mut [f32], grad: GradSrc<'_>) {
        kernels::sgd(param, grad, self.buf, &self.c, self.threshold);
    }
}

impl Sgd {
    /// The hyper-parameters.
    pub fn params(&self) -> &ParamsSgd {
        &self.params
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> usize {
        self.step_t
    }

    /// Parameters with at least `n` elements are updated in parallel.
    pub fn set_parallel_threshold(&mut self, n: usize) {
        self.par_threshold = n;
    }

    fn step_slot(&mut self, i: usize, g: &Tensor) -> Result<()> {
        let p = &self.params;
        let slot = &mut self.slots[i];
        match &mut slot.buf {
            Buf::Host(buf) => {
                let c = SgdCoeffs {
                    lr: p.lr as f32,
                    momentum: p.momentum as f32,
                    weight_decay: p.weight_decay as f32,
                    nesterov: p.nesterov,
                };
                let mut update = SgdUpdate {
                    buf,
                    c,
                    threshold: self.par_threshold,
                };
                apply_fused(slot.var.as_tensor(), g, &mut update)
            }
            Buf::Device(b) => {
                let theta = slot.var.as_tensor();
                let g = (g + (theta * p.weight_decay)?)?;
                let next_b = ((&*b * p.momentum)? + &g)?;
                let step = if p.nesterov {
                    (&g + (&next_b * p.momentum)?)?
                } else {
                    next_b.clone()
                };
                let next = (theta - (step * p.lr)?)?;
                *b = next_b;
                slot.var.set(&next)
            }
        }
    }
}

impl Optimizer for Sgd {
    type Config = ParamsSgd;

    /// Validates `params`; non-float vars are an error naming their index.
    fn new(vars: Vec<Var>, params: ParamsSgd) -> Result<Self> {
        params.validate()?;
        check_float(&vars, 0)?;
        let slots = vars
            .into_iter()
            .map(|var| {
                Ok(Slot {
                    buf: Buf::zeros(&var)?,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            params,
            step_t: 0,
            par_threshold: DEFAULT_PAR_THRESHOLD,
        })
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

    fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }
}

impl WeightDecay for Sgd {
    fn weight_decay(&self) -> f64 {
        self.params.weight_decay
    }

    fn set_weight_decay(&mut self, weight_decay: f64) {
        self.params.weight_decay = weight_decay;
    }
}

/// Entries: `step` (i64 scalar) and `momentum.{i}` for parameter `i`.
impl OptimizerState for Sgd {
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![("step".to_string(), step_tensor(self.step_t)?)];
        for (i, s) in self.slots.iter().enumerate() {
            out.push((format!("momentum.{i}"), s.buf.to_tensor(&s.var)?));
        }
        Ok(out)
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let mut entries = Entries::new(state)?;
        let step = entries.take_step("step")?;
        let mut loaded = Vec::with_capacity(self.slots.len());
        for (i, slot) in self.slots.iter().enumerate() {
            let name = format!("momentum.{i}");
            let t = entries.take(&name)?;
            check_shape(&name, t, &slot.var)?;
            loaded.push((name, t));
        }
        entries.finish()?;
        for (slot, (name, t)) in self.slots.iter_mut().zip(loaded) {
            slot.buf.load(&name, t, &slot.var)?;
        }
        self.step_t = step;
        Ok(())
    }
}
