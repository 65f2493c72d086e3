//! Soft-to-hard quantization with a learnable temperature `t` (a `Var`).
//!
//! Forward: `y = (1 - h) * s * soft(r) + h * q(x)` with `h` the hardness in `[0, 1]` (a schedule
//! raises it to 1), `q` the scheme's hard quantizer, `r = (x - c) / n` the input measured from
//! the kind's [`center`](Kind::center) in units of its normaliser, and the soft surrogate
//! * binary: `soft(r) = tanh(t r)`,
//! * ternary: `soft(r) = (tanh(t (r - d)) + tanh(t (r + d))) / 2` with the half step `d = 1/2` for
//!   absmean and `d = D / n` for threshold schemes: a smooth staircase through -1, 0, +1.
//!
//! Backward, with `u` the upstream gradient:
//! * `dL/dx = u * ((1 - h) * (s / n) * soft'(r) + h * e(r))`: the soft part's exact derivative,
//!   plus the hard part's straight-through estimator `e` (the quantizer's [`EstKind`]; the
//!   identity by default), as the quantize op's backward weighs its blend.
//! * `dL/dt = u * (1 - h) * s * dsoft/dt`: 0 at `h = 1`, where `t` no longer changes the output.
//!
//! For unscaled binary at `h = 0` these are `u * t * (1 - tanh(t x)^2)` and
//! `u * x * (1 - tanh(t x)^2)`.

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "metal")]
pub(crate) mod metal;

use crate::error::QuantError;
use crate::ops::cpu_util::f32_values;
use crate::ops::math::{EstKind, Kind};
use crate::ops::quantize::checked_block;
use crate::scheme::Granularity;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// The surrogate for one scheme at one hardness.
#[derive(Debug, Clone, Copy)]
pub struct Surrogate {
    pub kind: Kind,
    /// Hardness `h` in `[0, 1]`: 0 is the soft surrogate alone, 1 the hard quantizer.
    pub hardness: f32,
    /// The hard part's straight-through estimator, weighted by `h` in `dL/dx`.
    pub estimator: EstKind,
}

impl Surrogate {
    /// Only sign-like schemes have a tanh surrogate. The hard part's estimator is the identity;
    /// see [`Surrogate::with_estimator`].
    pub fn new(kind: Kind, hardness: f32) -> std::result::Result<Self, QuantError> {
        if matches!(kind, Kind::AbsmeanHf) {
            // Its reciprocal-scale form has no kernel in the learnable op's device code.
            return Err(crate::error::invalid(
                "scheme",
                "TernaryAbsmeanHf",
                "Binary, TernaryAbsmean or TernaryThreshold for a learnable temperature",
            ));
        }
        if matches!(kind, Kind::Int { .. }) {
            return Err(crate::error::invalid(
                "scheme",
                "MultiBit/Int8PerToken",
                "Binary, BinaryCentered, TernaryAbsmean or TernaryThreshold for a learnable temperature (use LSQ for multi-bit)",
            ));
        }
        if !(0.0..=1.0).contains(&hardness) {
            return Err(crate::error::invalid("hardness", hardness, "0.0..=1.0"));
        }
        Ok(Self {
            kind,
            hardness,
            estimator: EstKind::Identity,
        })
    }

    /// The same surrogate with `estimator` as the hard part's backward.
    pub fn with_estimator(self, estimator: EstKind) -> Self {
        Self { estimator, ..self }
    }

    /// `(r, half step)`: the normalised input and `None` for binary, `Some(d)` for ternary.
    #[inline(always)]
    fn parts(&self, x: f32, s: f32, aux: f32) -> (f32, Option<f32>) {
        let n = self.kind.normalizer(s, aux);
        let d = match self.kind {
            Kind::Binary { .. } | Kind::BinaryCentered => None,
            Kind::Absmean | Kind::AbsmeanHf => Some(0.5),
            _ => Some(aux / n),
        };
        ((x - self.kind.center(aux)) / n, d)
    }

    /// The forward value.
    #[inline(always)]
    pub fn value(&self, x: f32, s: f32, aux: f32, t: f32) -> f32 {
        let (r, d) = self.parts(x, s, aux);
        let soft = match d {
            None => (t * r).tanh(),
            Some(d) => 0.5 * ((t * (r - d)).tanh() + (t * (r + d)).tanh()),
        };
        let h = self.hardness;
        if h == 0.0 {
            s * soft
        } else {
            (1.0 - h) * s * soft + h * self.kind.quantize(x, s, aux)
        }
    }

    /// `dy/dx`: `(1 - h) (s / n) soft'(r) + h e(r)`.
    #[inline(always)]
    pub fn dx(&self, x: f32, s: f32, aux: f32, t: f32) -> f32 {
        let n = self.kind.normalizer(s, aux);
        let (r, d) = self.parts(x, s, aux);
        let sech2 = |z: f32| {
            let th = z.tanh();
            1.0 - th * th
        };
        let ds = match d {
            None => t * sech2(t * r),
            Some(d) => 0.5 * t * (sech2(t * (r - d)) + sech2(t * (r + d))),
        };
        let h = self.hardness;
        if h == 0.0 {
            s / n * ds
        } else {
            (1.0 - h) * (s / n * ds) + h * self.estimator.derivative(r)
        }
    }

    /// `dy/dt`: `(1 - h) s dsoft/dt`, exactly 0 at `h = 1`.
    #[inline(always)]
    pub fn dt(&self, x: f32, s: f32, aux: f32, t: f32) -> f32 {
        let (r, d) = self.parts(x, s, aux);
        let sech2 = |z: f32| {
            let th = z.tanh();
            1.0 - th * th
        };
        let ds = match d {
            None => r * sech2(t * r),
            Some(d) => 0.5 * ((r - d) * sech2(t * (r - d)) + (r + d) * sech2(t * (r + d))),
        };
        let h = self.hardness;
        if h == 0.0 {
            s * ds
        } else {
            (1.0 - h) * (s * ds)
        }
    }
}

/// The op `(x, t, params) -> y`; `t` holds one value.
#[derive(Debug, Clone, Copy)]
pub struct LearnableOp {
    pub surrogate: Surrogate,
    pub granularity: Granularity,
}

fn temperature(op: &'static str, s: &CpuStorage, l: &Layout) -> Result<f32> {
    let t = f32_values(op, s, l)?;
    match t.as_ref() {
        [t] if t.is_finite() && *t > 0.0 => Ok(*t),
        [t] => Err(crate::error::invalid("temperature", t, "a finite number > 0").into()),
        _ => Err(QuantError::Shape {
            op,
            what: format!("temperature must hold one value, got shape {:?}", l.shape()),
        }
        .into()),
    }
}

/// The GPU kernels' check of the temperature: the CPU's ([`temperature`]: one value, finite
/// and above 0, the same errors), on a copy of it read back to the host. That waits for the GPU
/// once per call, as the scales op before it already does for its non-finite check; the
/// kernels still read `t` on the device.
#[cfg(any(feature = "cuda", feature = "metal"))]
fn device_temperature<S: candle_core::backend::BackendStorage>(
    op: &'static str,
    s: &S,
    l: &Layout,
) -> Result<()> {
    if l.shape().elem_count() != 1 {
        return Err(QuantError::Shape {
            op,
            what: format!("temperature must hold one value, got shape {:?}", l.shape()),
        }
        .into());
    }
    temperature(op, &s.to_cpu_storage()?, l).map(|_| ())
}

impl LearnableOp {
    /// The GPU kernels' input checks, the block size: parameters that match `x`'s blocks and a
    /// one-value `t` that is finite and > 0.
    #[cfg(any(feature = "cuda", feature = "metal"))]
    fn device_checks<S: candle_core::backend::BackendStorage>(
        &self,
        l1: &Layout,
        (s2, l2): (&S, &Layout),
        l3: &Layout,
    ) -> Result<usize> {
        let block = checked_block(self.name(), self.granularity, l1, l3)?;
        device_temperature(self.name(), s2, l2)?;
        Ok(block)
    }
}

impl CustomOp3 for LearnableOp {
    fn name(&self) -> &'static str {
        "bitnet-learnable"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let block = checked_block(self.name(), self.granularity, l1, l3)?;
        let t = temperature(self.name(), s2, l2)?;
        let xs = f32_values(self.name(), s1, l1)?;
        let ps = f32_values(self.name(), s3, l3)?;
        let out = cpu::forward(&self.surrogate, &xs, &ps, block, t);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// `t` is checked as on the CPU (see `device_temperature`): `t <= 0` is the same error.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let block = self.device_checks(l1, (s2, l2), l3)?;
        let out = cuda::forward(
            self.name(),
            &self.surrogate,
            (s1, l1),
            (s2, l2),
            (s3, l3),
            block,
        )?;
        Ok((out, l1.shape().clone()))
    }

    /// `t` is checked as on the CPU, as on CUDA.
    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
        s3: &candle_core::MetalStorage,
        l3: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let block = self.device_checks(l1, (s2, l2), l3)?;
        let out = metal::forward(
            self.name(),
            &self.surrogate,
            (s1, l1),
            (s2, l2),
            (s3, l3),
            block,
        )?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        t: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = x.elem_count();
        // The gradient op has three inputs, so params and the upstream gradient travel together.
        let rest = Tensor::cat(&[&params.flatten_all()?, &grad.flatten_all()?], 0)?;
        let both = x.apply_op3_no_bwd(t, &rest, &LearnableGradOp(*self))?;
        let gx = both.narrow(0, 0, n)?.reshape(x.shape())?;
        let gt = both.narrow(0, n, 1)?.reshape(t.shape())?;
        Ok((Some(gx), Some(gt), None))
    }
}

/// `(x, t, [params ++ upstream]) -> [dL/dx ..., dL/dt]`, called from [`LearnableOp::bwd`] only.
#[derive(Debug, Clone, Copy)]
pub struct LearnableGradOp(pub LearnableOp);

impl LearnableGradOp {
    /// The GPU kernels' input checks, `(n, block)`: a non-empty `x`, a one-value `t` that is
    /// finite and > 0, and exactly the parameters plus the upstream gradient in the third input.
    #[cfg(any(feature = "cuda", feature = "metal"))]
    fn device_checks<S: candle_core::backend::BackendStorage>(
        &self,
        l1: &Layout,
        (s2, l2): (&S, &Layout),
        l3: &Layout,
    ) -> Result<(usize, usize)> {
        crate::ops::cpu_util::non_empty(self.name(), l1)?;
        let n = l1.shape().elem_count();
        let block = self
            .0
            .granularity
            .block_size(n, crate::ops::cpu_util::last_dim(l1))?;
        device_temperature(self.name(), s2, l2)?;
        if l3.shape().elem_count() != 2 * (n / block) + n {
            return Err(QuantError::Shape {
                op: self.name(),
                what: format!(
                    "params and gradient need {} values, got {:?}",
                    2 * (n / block) + n,
                    l3.shape()
                ),
            }
            .into());
        }
        Ok((n, block))
    }
}

impl CustomOp3 for LearnableGradOp {
    fn name(&self) -> &'static str {
        "bitnet-learnable-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = l1.shape().elem_count();
        let block = self
            .0
            .granularity
            .block_size(n, crate::ops::cpu_util::last_dim(l1))?;
        let t = temperature(self.name(), s2, l2)?;
        let xs = f32_values(self.name(), s1, l1)?;
        let rest = f32_values(self.name(), s3, l3)?;
        let (ps, us) = rest.split_at(2 * (n / block));
        let out = cpu::backward(&self.0.surrogate, &xs, ps, us, block, t);
        Ok((CpuStorage::F32(out), Shape::from(n + 1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, block) = self.device_checks(l1, (s2, l2), l3)?;
        let out = cuda::backward(
            self.name(),
            &self.0.surrogate,
            (s1, l1),
            (s2, l2),
            (s3, l3),
            block,
        )?;
        Ok((out, Shape::from(n + 1)))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
        s3: &candle_core::MetalStorage,
        l3: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let (n, block) = self.device_checks(l1, (s2, l2), l3)?;
        let out = metal::backward(
            self.name(),
            &self.0.surrogate,
            (s1, l1),
            (s2, l2),
            (s3, l3),
            block,
        )?;
        Ok((out, Shape::from(n + 1)))
    }
}

/// Applies the learnable surrogate: `t` is a one-value tensor (usually a `Var`), `params` the
/// `[blocks, 2]` output of [`scales`](crate::ops::scales::scales).
pub fn learnable_quantize(
    x: &Tensor,
    t: &Tensor,
    params: &Tensor,
    op: LearnableOp,
) -> Result<Tensor> {
    x.apply_op3(t, params, op)
}
