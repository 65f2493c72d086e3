//! LSQ (Esser et al. 2020): multi-bit quantization with a learned step size `s` per block.
//!
//! Forward: `q = s * clamp(round(x / s), qmin, qmax)`, `qmin = -2^(bits-1)`, `qmax = 2^(bits-1) - 1`.
//! Backward: `dq/dx = u * 1[qmin <= x/s <= qmax]`; `dq/ds = g * sum_block u * (round(x/s) - x/s)`
//! inside the range, `u * qmin` below and `u * qmax` above, with `g = 1 / sqrt(block * qmax)`.
//! Steps below 1e-5 are used as 1e-5.

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "metal")]
pub(crate) mod metal;

use crate::error::QuantError;
use crate::ops::cpu_util::{f32_values, last_dim, non_empty};
use crate::scheme::Granularity;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// LSQ for `bits` in 2..=8 at a granularity; the step tensor holds one value per block.
#[derive(Debug, Clone, Copy)]
pub struct LsqOp {
    pub qmax: f32,
    pub granularity: Granularity,
}

impl LsqOp {
    /// Validates `bits` (2..=8) and the granularity.
    pub fn new(bits: u8, granularity: Granularity) -> std::result::Result<Self, QuantError> {
        crate::scheme::Scheme::MultiBit { bits }.validate()?;
        granularity.validate()?;
        Ok(Self {
            qmax: ((1u32 << (bits - 1)) - 1) as f32,
            granularity,
        })
    }

    fn block(&self, name: &'static str, lx: &Layout, ls: &Layout) -> Result<usize> {
        non_empty(name, lx)?;
        let n = lx.shape().elem_count();
        let block = self.granularity.block_size(n, last_dim(lx))?;
        if ls.shape().elem_count() != n / block {
            return Err(QuantError::Shape {
                op: name,
                what: format!(
                    "{} blocks need {} step sizes, got shape {:?}",
                    n / block,
                    n / block,
                    ls.shape()
                ),
            }
            .into());
        }
        Ok(block)
    }

    /// The usual LSQ initial step from data: `2 mean|x| / sqrt(qmax)` per block.
    pub fn init_steps(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.elem_count();
        let last = x.dims().last().copied().unwrap_or(1);
        let block = self.granularity.block_size(n, last)?;
        let mean = x.detach().abs()?.reshape((n / block, block))?.mean(1)?;
        mean.affine(2.0 / (self.qmax as f64).sqrt(), 0.0)
    }
}

impl CustomOp2 for LsqOp {
    fn name(&self) -> &'static str {
        "bitnet-lsq"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let block = self.block(self.name(), l1, l2)?;
        let xs = f32_values(self.name(), s1, l1)?;
        let ss = f32_values(self.name(), s2, l2)?;
        Ok((
            CpuStorage::F32(cpu::forward(self.qmax, &xs, &ss, block)),
            l1.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let block = self.block(self.name(), l1, l2)?;
        let out = cuda::forward(self.name(), self.qmax, (s1, l1), (s2, l2), block)?;
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let block = self.block(self.name(), l1, l2)?;
        let out = metal::forward(self.name(), self.qmax, (s1, l1), (s2, l2), block)?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        s: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = x.elem_count();
        let both = x.apply_op3_no_bwd(s, grad, &LsqGradOp(*self))?;
        let gx = both.narrow(0, 0, n)?.reshape(x.shape())?;
        let gs = both.narrow(0, n, s.elem_count())?.reshape(s.shape())?;
        Ok((Some(gx), Some(gs)))
    }
}

/// `(x, s, upstream) -> [dL/dx ..., dL/ds ...]`, called from [`LsqOp::bwd`] only.
#[derive(Debug, Clone, Copy)]
pub struct LsqGradOp(pub LsqOp);

impl LsqGradOp {
    /// The GPU kernels' input checks and output, `(block, shape)`: steps that match `x`'s blocks,
    /// an upstream gradient of `x`'s shape, and one `dL/dx` per value then one `dL/ds` per step.
    #[cfg(any(feature = "cuda", feature = "metal"))]
    fn device_checks(&self, l1: &Layout, l2: &Layout, l3: &Layout) -> Result<(usize, Shape)> {
        use candle_core::CustomOp3;
        let block = self.0.block(self.name(), l1, l2)?;
        crate::ops::quantize::same_shape(self.name(), l1, l3)?;
        let len = l1.shape().elem_count() + l2.shape().elem_count();
        Ok((block, Shape::from(len)))
    }
}

impl candle_core::CustomOp3 for LsqGradOp {
    fn name(&self) -> &'static str {
        "bitnet-lsq-grad"
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
        let block = self.0.block(self.name(), l1, l2)?;
        let xs = f32_values(self.name(), s1, l1)?;
        let ss = f32_values(self.name(), s2, l2)?;
        let us = f32_values(self.name(), s3, l3)?;
        let out = cpu::backward(self.0.qmax, &xs, &ss, &us, block);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
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
        let (block, shape) = self.device_checks(l1, l2, l3)?;
        let out = cuda::backward(
            self.name(),
            self.0.qmax,
            (s1, l1),
            (s2, l2),
            (s3, l3),
            block,
        )?;
        Ok((out, shape))
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
        let (block, shape) = self.device_checks(l1, l2, l3)?;
        let out = metal::backward(
            self.name(),
            self.0.qmax,
            (s1, l1),
            (s2, l2),
            (s3, l3),
            block,
        )?;
        Ok((out, shape))
    }
}

/// LSQ-quantizes `x` with the learned steps `s` (usually a `Var`).
pub fn lsq_quantize(x: &Tensor, s: &Tensor, op: LsqOp) -> Result<Tensor> {
    x.apply_op2(s, op)
}
