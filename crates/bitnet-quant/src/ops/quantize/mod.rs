//! The quantize op: `(x, params) -> x + lambda (q(x) - x)` with `q` the scheme's quantizer and the
//! estimator as its backward. `params` come from [`scales`](crate::ops::scales) and are constants.

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "metal")]
pub(crate) mod metal;

use crate::error::QuantError;
use crate::ops::cpu_util::{f32_values, last_dim, non_empty};
use crate::ops::math::{EstKind, Kind};
use crate::scheme::Granularity;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// Forward of the quantizer, with the estimator as backward.
#[derive(Debug, Clone, Copy)]
pub struct QuantizeOp {
    pub kind: Kind,
    pub estimator: EstKind,
    pub granularity: Granularity,
    /// Progressive blend factor in `[0, 1]`; 1 is plain quantization.
    pub lambda: f32,
}

/// Block size of `x` and a check that `params` has one `(s, aux)` row per block.
pub(crate) fn checked_block(
    op: &'static str,
    g: Granularity,
    lx: &Layout,
    lp: &Layout,
) -> Result<usize> {
    non_empty(op, lx)?;
    let n = lx.shape().elem_count();
    let block = g.block_size(n, last_dim(lx))?;
    if lp.shape().elem_count() != 2 * (n / block) {
        return Err(QuantError::Shape {
            op,
            what: format!(
                "{} blocks need params of shape [{}, 2], got {:?}",
                n / block,
                n / block,
                lp.shape()
            ),
        }
        .into());
    }
    Ok(block)
}

/// The upstream gradient must have the input's shape.
pub(crate) fn same_shape(op: &'static str, lx: &Layout, lu: &Layout) -> Result<()> {
    if lu.shape() != lx.shape() {
        return Err(QuantError::Shape {
            op,
            what: format!("gradient {:?} vs input {:?}", lu.shape(), lx.shape()),
        }
        .into());
    }
    Ok(())
}

impl CustomOp2 for QuantizeOp {
    fn name(&self) -> &'static str {
        "bitnet-quantize"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let block = checked_block(self.name(), self.granularity, l1, l2)?;
        let xs = f32_values(self.name(), s1, l1)?;
        let ps = f32_values(self.name(), s2, l2)?;
        let out = cpu::forward(self.kind, &xs, &ps, block, self.lambda);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let block = checked_block(self.name(), self.granularity, l1, l2)?;
        let out = cuda::forward(
            self.name(),
            self.kind,
            (s1, l1),
            (s2, l2),
            block,
            self.lambda,
        )?;
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
        let block = checked_block(self.name(), self.granularity, l1, l2)?;
        let out = metal::forward(
            self.name(),
            self.kind,
            (s1, l1),
            (s2, l2),
            block,
            self.lambda,
        )?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // (1 - lambda) + lambda * 1 = 1: the straight-through gradient is the upstream one as is.
        if self.estimator == EstKind::Identity {
            return Ok((Some(grad.clone()), None));
        }
        let g = x.apply_op3_no_bwd(params, grad, &QuantizeGradOp(*self))?;
        Ok((Some(g), None))
    }
}

/// The estimator's gradient as an op of `(x, params, upstream)`; only ever called from
/// [`QuantizeOp::bwd`], so it has no backward of its own.
#[derive(Debug, Clone, Copy)]
pub struct QuantizeGradOp(pub QuantizeOp);

impl QuantizeGradOp {
    /// Every device's input checks, the block size: parameters that match `x`'s blocks and an
    /// upstream gradient of `x`'s shape.
    fn checks(&self, l1: &Layout, l2: &Layout, l3: &Layout) -> Result<usize> {
        let block = checked_block(self.name(), self.0.granularity, l1, l2)?;
        same_shape(self.name(), l1, l3)?;
        Ok(block)
    }
}

impl CustomOp3 for QuantizeGradOp {
    fn name(&self) -> &'static str {
        "bitnet-quantize-grad"
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
        let op = self.0;
        let block = self.checks(l1, l2, l3)?;
        let xs = f32_values(self.name(), s1, l1)?;
        let ps = f32_values(self.name(), s2, l2)?;
        let us = f32_values(self.name(), s3, l3)?;
        let out = cpu::backward(op.kind, op.estimator, &xs, &ps, &us, block, op.lambda);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
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
        let op = self.0;
        let block = self.checks(l1, l2, l3)?;
        let out = cuda::backward(
            self.name(),
            op.kind,
            op.estimator,
            (s1, l1),
            (s2, l2),
            (s3, l3),
            block,
            op.lambda,
        )?;
        Ok((out, l1.shape().clone()))
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
        let op = self.0;
        let block = self.checks(l1, l2, l3)?;
        let out = metal::backward(
            self.name(),
            op.kind,
            op.estimator,
            (s1, l1),
            (s2, l2),
            (s3, l3),
            block,
            op.lambda,
        )?;
        Ok((out, l1.shape().clone()))
    }
}

/// Applies the op: `params` must be the `[blocks, 2]` output of [`scales`](crate::ops::scales::scales).
pub fn quantize_with(x: &Tensor, params: &Tensor, op: QuantizeOp) -> Result<Tensor> {
    x.apply_op2(params, op)
}
