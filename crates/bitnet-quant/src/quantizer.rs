//! [`Quantizer`]: a scheme, a granularity and an estimator, validated once, applied as candle ops.

use crate::error::{invalid, QuantError};
use crate::ops::learnable::{LearnableOp, Surrogate};
use crate::ops::lsq::LsqOp;
use crate::ops::math::{EstKind, Kind};
use crate::ops::quantize::QuantizeOp;
use crate::ops::scales::scales;
use crate::scheme::{Estimator, Granularity, Scheme};
use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

/// A validated quantizer.
///
/// * Forward: the [`Scheme`] per block of the [`Granularity`], optionally blended with the input as
///   `x + lambda (q(x) - x)` (progressive quantization, `lambda = 1` by default).
/// * Backward: `u * ((1 - lambda) + lambda * e(x / n))` with `e` the [`Estimator`]'s derivative;
///   the scale is a constant, as in `x + (q(x) - x).detach()`.
/// * Reference: BitNet b1.58 (Ma et al. 2024) for absmean; Larq's `ste_sign`, `approx_sign`,
///   `swish_sign` and `SteTern` for the estimators.
///
/// ```
/// use bitnet_quant::{Estimator, Quantizer, Scheme};
/// use candle_core::{Device, Tensor, Var};
/// # fn main() -> candle_core::Result<()> {
/// let q = Quantizer::new(Scheme::TernaryAbsmean, Estimator::Clipped { clip: 1.0 })?;
/// let w = Var::new(&[[0.4f32, -0.1, 0.0, -0.9]], &Device::Cpu)?;
/// let wq = q.quantize(w.as_tensor())?;            // mean|w| = 0.35: levels [1, 0, 0, -1]
/// assert_eq!(wq.to_vec2::<f32>()?, [[0.35, 0.0, 0.0, -0.35]]);
/// let grads = wq.sum_all()?.backward()?;           // |w / 0.35| <= 1 for -0.1 and 0 only
/// assert_eq!(grads.get(&w).unwrap().to_vec2::<f32>()?, [[0.0, 1.0, 1.0, 0.0]]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quantizer {
    scheme: Scheme,
    granularity: Granularity,
    estimator: Estimator,
    lambda: f32,
}

impl Quantizer {
    /// A quantizer at the scheme's default granularity (per row for [`Scheme::Int8PerToken`],
    /// per tensor otherwise). Errors name the offending field.
    pub fn new(scheme: Scheme, estimator: Estimator) -> Result<Self> {
        scheme.validate()?;
        estimator.validate()?;
        Ok(Self {
            scheme,
            granularity: scheme.default_granularity(),
            estimator,
            lambda: 1.0,
        })
    }

    /// The same quantizer with scales shared per tensor, per row, or per group.
    pub fn with_granularity(mut self, granularity: Granularity) -> Result<Self> {
        granularity.validate()?;
        self.granularity = granularity;
        Ok(self)
    }

    /// The same quantizer blended with its input: `x + lambda (q(x) - x)`, `lambda` in `[0, 1]`.
    pub fn with_lambda(mut self, lambda: f32) -> Result<Self> {
        if !(0.0..=1.0).contains(&lambda) {
            return Err(invalid("lambda", lambda, "0.0..=1.0").into());
        }
        self.lambda = lambda;
        Ok(self)
    }

    /// The same quantizer with another backward.
    pub fn with_estimator(mut self, estimator: Estimator) -> Result<Self> {
        estimator.validate()?;
        self.estimator = estimator;
        Ok(self)
    }

    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    pub fn granularity(&self) -> Granularity {
        self.granularity
    }

    pub fn estimator(&self) -> Estimator {
        self.estimator
    }

    /// The progressive blend factor.
    pub fn lambda(&self) -> f32 {
        self.lambda
    }

    /// The kernel view of the scheme.
    pub fn kind(&self) -> Kind {
        Kind::of(&self.scheme)
    }

    /// The quantize op this quantizer applies (its kernels' view of the configuration).
    pub fn op(&self) -> QuantizeOp {
        QuantizeOp {
            kind: self.kind(),
            estimator: EstKind::of(&self.estimator),
            granularity: self.granularity,
            lambda: self.lambda,
        }
    }

    /// Block parameters `[blocks, 2]` of `x` (`(s, aux)` per block; see
    /// [`Kind::params`](crate::ops::Kind::params)), as constants. `x` must be f32.
    pub fn scales(&self, x: &Tensor) -> Result<Tensor> {
        scales(x, self.kind(), self.granularity)
    }

    /// Quantizes `x` (differentiable through the estimator). f16, bf16 and f64 inputs are
    /// computed in f32 and returned in their own dtype; integer inputs are an error.
    ///
    /// Non-finite input is an error ([`QuantError::NonFinite`]): a NaN or infinite weight or
    /// activation means training already diverged, and a scale computed from it would silently
    /// turn the whole block into NaN.
    pub fn quantize(&self, x: &Tensor) -> Result<Tensor> {
        with_f32(x, "quantize", |x| {
            let params = self.scales(x)?;
            x.apply_op2(&params, self.op())
        })
    }

    /// The soft-to-hard surrogate with a learnable temperature `t` (a one-value tensor, usually
    /// a `Var`) at hardness `h` in `[0, 1]`; see [`crate::ops::learnable`]. Binary and ternary
    /// schemes only. This quantizer's estimator is the backward of the hard part (weighted by
    /// `h`); its `lambda` does not apply.
    pub fn quantize_learnable(&self, x: &Tensor, t: &Tensor, hardness: f32) -> Result<Tensor> {
        let surrogate =
            Surrogate::new(self.kind(), hardness)?.with_estimator(EstKind::of(&self.estimator));
        with_f32(x, "quantize_learnable", |x| {
            let params = self.scales(x)?;
            let t = t.to_dtype(DType::F32)?;
            x.apply_op3(
                &t,
                &params,
                LearnableOp {
                    surrogate,
                    granularity: self.granularity,
                },
            )
        })
    }

    /// The LSQ op of this quantizer (learned step size, Esser et al. 2020; see
    /// [`crate::ops::lsq`]): [`Scheme::MultiBit`] only, one step per block of the granularity.
    pub fn lsq_op(&self) -> Result<LsqOp> {
        match self.scheme {
            Scheme::MultiBit { bits } => Ok(LsqOp::new(bits, self.granularity)?),
            other => Err(invalid(
                "scheme",
                format!("{other:?}"),
                "MultiBit for a learned step size (LSQ)",
            )
            .into()),
        }
    }

    /// LSQ's initial steps for `x`, one per block: `2 mean|x| / sqrt(qmax)` (f32, `x`'s device).
    pub fn lsq_init_steps(&self, x: &Tensor) -> Result<Tensor> {
        let op = self.lsq_op()?;
        with_f32_host(x, "lsq_init_steps", |x| op.init_steps(x))
    }

    /// Quantizes `x` with learned steps `steps` (one value per block, usually a `Var`):
    /// `s * clamp(round(x / s), qmin, qmax)` forward, LSQ's gradients for `x` and `steps`
    /// backward (see [`crate::ops::lsq`]); blended as `x + lambda (q - x)` when `lambda < 1`.
    /// [`Scheme::MultiBit`] only; this quantizer's estimator does not apply (LSQ has its own).
    ///
    /// ```
    /// use bitnet_quant::{Estimator, Quantizer, Scheme};
    /// use candle_core::{Device, Tensor, Var};
    /// # fn main() -> candle_core::Result<()> {
    /// let q = Quantizer::new(Scheme::MultiBit { bits: 3 }, Estimator::Identity)?;
    /// let w = Var::new(&[[0.3f32, -0.9, 0.05, 0.6]], &Device::Cpu)?;
    /// let steps = Var::new(&[0.25f32], &Device::Cpu)?; // levels -4..=3 times 0.25
    /// let wq = q.quantize_lsq(w.as_tensor(), steps.as_tensor())?;
    /// assert_eq!(wq.to_vec2::<f32>()?, [[0.25, -1.0, 0.0, 0.5]]); // -3.6 rounds to -4
    /// let grads = wq.sum_all()?.backward()?;
    /// assert!(grads.get(&steps).is_some()); // the step size learns
    /// # Ok(()) }
    /// ```
    pub fn quantize_lsq(&self, x: &Tensor, steps: &Tensor) -> Result<Tensor> {
        let op = self.lsq_op()?;
        with_f32(x, "quantize_lsq", |x| {
            let q = x.apply_op2(&steps.to_dtype(DType::F32)?, op)?;
            if self.lambda == 1.0 {
                Ok(q)
            } else {
                // Plain tensor ops, so autograd weighs both gradients by the blend.
                x + ((q - x)? * self.lambda as f64)?
            }
        })
    }

    /// The integer level of every value (row-major, copied to the host) and the block
    /// parameters: what packing, histograms and flip ratios are computed from.
    pub fn levels(&self, x: &Tensor) -> Result<(Vec<i8>, Vec<f32>)> {
        with_f32_host(x, "levels", |x| {
            let params = self.scales(x)?.flatten_all()?.to_vec1::<f32>()?;
            let xs = x.flatten_all()?.to_vec1::<f32>()?;
            let last = x.dims().last().copied().unwrap_or(1);
            let block = self.granularity.block_size(xs.len(), last)?;
            let kind = self.kind();
            let levels = xs
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    let b = i / block;
                    kind.level(v, params[2 * b], params[2 * b + 1]) as i8
                })
                .collect();
            Ok((levels, params))
        })
    }
}

/// Runs `f` on an f32 view of `x` and converts back.
fn with_f32(
    x: &Tensor,
    op: &'static str,
    f: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    match x.dtype() {
        DType::F32 => f(x),
        DType::F16 | DType::BF16 | DType::F64 => f(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype()),
        dtype => Err(QuantError::DType { op, dtype }.into()),
    }
}

fn with_f32_host<T>(
    x: &Tensor,
    op: &'static str,
    f: impl FnOnce(&Tensor) -> Result<T>,
) -> Result<T> {
    match x.dtype() {
        DType::F32 => f(x),
        DType::F16 | DType::BF16 | DType::F64 => f(&x.to_dtype(DType::F32)?),
        dtype => Err(QuantError::DType { op, dtype }.into()),
    }
}
