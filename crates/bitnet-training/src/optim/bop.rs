//! [`Bop`]: the binary optimizer (Helwegen et al. 2019, "Latent Weights Do Not Exist"), fused in place.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use candle_nn::Optimizer;

use super::fused::{apply_fused, SliceUpdate};
use super::kernels::{self, BopCoeffs, GradSrc, DEFAULT_PAR_THRESHOLD};
use super::state::{check_float, check_shape, step_tensor, Buf, Entries};
use super::{check, OptimizerState};

/// Hyper-parameters of [`Bop`]; the defaults are Larq's.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamsBop {
    /// Adaptivity rate of the gradient's moving average, in [0, 1] (default 1e-4).
    pub gamma: f64,
    /// Flip threshold tau, >= 0 (default 1e-8).
    pub threshold: f64,
}

impl Default for ParamsBop {
    fn default() -> Self {
        Self {
            gamma: 1e-4,
            threshold: 1e-8,
        }
    }
}

impl ParamsBop {
    /// Checks every field; the error names the field and its allowed range.
    pub fn validate(&self) -> Result<()> {
        check(
            "gamma",
            self.gamma,
            (0.0..=1.0).contains(&self.gamma),
            "[0, 1]",
        )?;
        check(
            "threshold",
            self.threshold,
            self.threshold >= 0.0 && self.threshold.is_finite(),
            "finite, >= 0",
        )
    }
}

#[derive(Debug)]
struct Slot {
    var: Var,
    buf: Buf,
}

/// Bop: keeps an exponential moving average `m` of each binary weight's gradient and flips the
/// weight when `m` agrees with it strongly enough.
///
/// Per element: `m = m + gamma * (g - m)`; then `w = -w` where `w * m > threshold` (for
/// `w in {-1, +1}`: `sign(w) == sign(m)` and `|m| > threshold`, as in Larq). The weights are meant
/// to hold `±1` (or `±s`): Bop only negates them, it never changes their magnitude. Parameters
/// without a gradient are skipped. [`Optimizer::learning_rate`] is `gamma`.
///
/// ```
/// use bitnet_training::optim::{Bop, ParamsBop};
/// use candle_core::{Device, Tensor, Var};
/// use candle_nn::Optimizer;
/// # fn main() -> candle_core::Result<()> {
/// let w = Var::new(&[1.0f32, -1.0, 1.0], &Device::Cpu)?;
/// let mut opt = Bop::new(vec![w.clone()], ParamsBop { gamma: 0.5, threshold: 0.1 })?;
/// // loss = sum(w * r): gradient r. m = 0.5 r.
/// let r = Tensor::new(&[1.0f32, 1.0, 0.1], &Device::Cpu)?;
/// opt.backward_step(&(w.as_tensor() * &r)?.sum_all()?)?;
/// // w*m: 0.5 > 0.1 flips; -0.5 keeps; 0.05 keeps.
/// assert_eq!(w.as_tensor().to_vec1::<f32>()?, vec![-1.0, -1.0, 1.0]);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Bop {
    slots: Vec<Slot>,
    params: ParamsBop,
    step_t: usize,
    par_threshold: usize,
}

struct BopUpdate<'a> {
    buf: &'a mut [f32],
    c: BopCoeffs,
    threshold: usize,
}

impl SliceUpdate for BopUpdate<'_> {
    fn name(&self) -> &'static str {
        "bop"
    }

    fn apply(&mut self, param: &mut [f32], grad: GradSrc<'_>) {
        kernels::bop(param, grad, self.buf, &self.c, self.threshold);
    }
}

impl Bop {
    /// The hyper-parameters.
    pub fn params(&self) -> &ParamsBop {
        &self.params
    }

    /// Sets the flip threshold (>= 0).
    pub fn set_threshold(&mut self, threshold: f64) -> Result<()> {
        let params = ParamsBop {
            threshold,
            ..self.params.clone()
        };
        params.validate()?;
        self.params = params;
        Ok(())
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
                let c = BopCoeffs {
                    gamma: p.gamma as f32,
                    threshold: p.threshold as f32,
                };
                let mut update = BopUpdate {
                    buf,
                    c,
                    threshold: self.par_threshold,
                };
                apply_fused(slot.var.as_tensor(), g, &mut update)
            }
            Buf::Device(m) => {
                let w = slot.var.as_tensor();
                let next_m = (&*m + ((g - &*m)? * p.gamma)?)?;
                let flip = (w * &next_m)?.gt(p.threshold)?;
                let next_w = flip.where_cond(&w.neg()?, w)?;
                *m = next_m;
                slot.var.set(&next_w)
            }
        }
    }
}

impl Optimizer for Bop {
    type Config = ParamsBop;

    /// Validates `params`; non-float vars are an error naming their index.
    fn new(vars: Vec<Var>, params: ParamsBop) -> Result<Self> {
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

    /// Bop's `gamma`.
    fn learning_rate(&self) -> f64 {
        self.params.gamma
    }

    /// Sets `gamma`.
    fn set_learning_rate(&mut self, gamma: f64) {
        self.params.gamma = gamma;
    }
}

/// Entries: `step` (i64 scalar) and `m.{i}` (gradient moving average) for parameter `i`.
impl OptimizerState for Bop {
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![("step".to_string(), step_tensor(self.step_t)?)];
        for (i, s) in self.slots.iter().enumerate() {
            out.push((format!("m.{i}"), s.buf.to_tensor(&s.var)?));
        }
        Ok(out)
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let mut entries = Entries::new(state)?;
        let step = entries.take_step("step")?;
        let mut loaded = Vec::with_capacity(self.slots.len());
        for (i, slot) in self.slots.iter().enumerate() {
            let name = format!("m.{i}");
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
