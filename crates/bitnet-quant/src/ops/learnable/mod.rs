//! Soft-to-hard quantization with a learnable temperature `t` (a `Var`).
//!
//! Forward: `y = (1 - h) * s * soft(x / n) + h * q(x)` with `h` the hardness in `[0, 1]` (a schedule
//! raises it to 1), `q` the scheme's hard quantizer, and the soft surrogate
//! * binary: `soft(r) = tanh(t r)`,
//! * ternary: `soft(r) = (tanh(t (r - d)) + tanh(t (r + d))) / 2` with the half step `d = 1/2` for
//!   absmean and `d = D / n` for threshold schemes: a smooth staircase through -1, 0, +1.
//!
//! Backward: the derivatives of the soft part, also while `h > 0` (straight through the hard part):
//! `dy/dx = u * (s / n) * soft'(r)`, `dy/dt = u * s * dsoft/dt`; for binary that is DESIGN.md's
//! `u * t * (1 - tanh(t x)^2)` and `u * x * (1 - tanh(t x)^2)`.

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "metal")]
pub(crate) mod metal;

use crate::error::QuantError;
use crate::ops::cpu_util::f32_values;
use crate::ops::math::Kind;
use crate::ops::quantize::checked_block;
use crate::scheme::Granularity;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// The surrogate for one scheme at one hardness.
#[derive(Debug, Clone, Copy)]
pub struct Surrogate {
    pub kind: Kind,
    /// Hardness `h` in `[0, 1]`: 0 is the soft surrogate alone, 1 the hard quantizer.
    pub hardness: f32,
}

impl Surrogate {
    /// Only sign-like schemes have a tanh surrogate.
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
                "Binary, TernaryAbsmean or TernaryThreshold for a learnable temperature (use LSQ for multi-bit)",
            ));
        }
        if !(0.0..=1.0).contains(&hardness) {
            return Err(crate::error::invalid("hardness", hardness, "0.0..=1.0"));
        }
        Ok(Self { kind, hardness })
    }

    /// `(r, half step)`: the normalised input and `None` for binary, `Some(d)` for ternary.
    #[inline(always)]
    fn parts(&self, x: f32, s: f32, aux: f32) -> (f32, Option<f32>) {
        let n = self.kind.normalizer(s, aux);
        let d = match self.kind {
            Kind::Binary { .. } => None,
            Kind::Absmean | Kind::AbsmeanHf => Some(0.5),
            _ => Some(aux / n),
        };
        (x / n, d)
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

    /// `dy/dx` of the soft part.
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
        s / n * ds
    }

    /// `dy/dt` of the soft part.
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
        s * ds
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

/// The temperature tensor must hold exactly one value (checked without reading it).
#[cfg(any(feature = "cuda", feature = "metal"))]
fn one_value(op: &'static str, l: &Layout) -> Result<()> {
    if l.shape().elem_count() != 1 {
        return Err(QuantError::Shape {
            op,
            what: format!("temperature must hold one value, got shape {:?}", l.shape()),
        }
        .into());
    }
    Ok(())
}

impl LearnableOp {
    /// The GPU kernels' input checks, the block size: parameters that match `x`'s blocks and a
    /// one-value `t` (its value is not read).
    #[cfg(any(feature = "cuda", feature = "metal"))]
    fn device_checks(&self, l1: &Layout, l2: &Layout, l3: &Layout) -> Result<usize> {
        let block = checked_block(self.name(), self.granularity, l1, l3)?;
        one_value(self.name(), l2)?;
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

    /// On CUDA the temperature's shape is checked but not its value: reading it would copy it to
    /// the host on every call, so a `t <= 0` or non-finite `t` gives the formula's value there
    /// instead of the CPU's error.
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
        let block = self.device_checks(l1, l2, l3)?;
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

    /// As on CUDA, the temperature's shape is checked but not its value (reading it would wait
    /// for the GPU on every call): a `t <= 0` or non-finite `t` gives the formula's value.
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
        let block = self.device_checks(l1, l2, l3)?;
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
    /// The GPU kernels' input checks, `(n, block)`: a non-empty `x`, a one-value `t` (its value is
    /// not read) and exactly the parameters plus the upstream gradient in the third input.
    #[cfg(any(feature = "cuda", feature = "metal"))]
    fn device_checks(&self, l1: &Layout, l2: &Layout, l3: &Layout) -> Result<(usize, usize)> {
        crate::ops::cpu_util::non_empty(self.name(), l1)?;
        let n = l1.shape().elem_count();
        let block = self
            .0
            .granularity
            .block_size(n, crate::ops::cpu_util::last_dim(l1))?;
        one_value(self.name(), l2)?;
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
        let (n, block) = self.device_checks(l1, l2, l3)?;
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
        let (n, block) = self.device_checks(l1, l2, l3)?;
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
