//! Per-block quantization parameters: `[blocks, 2]` holding `(s, aux)` per block, where `s` is the
//! scale the integer level is multiplied by and `aux` the threshold `D` (threshold schemes) or the
//! clamped absmax `m` (multi-bit, int8). See [`Kind::params`].
//!
//! The parameters are constants for autograd (computed from a detached input), exactly as the
//! scale in BitNet's `x + (q(x) - x).detach()`.

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "metal")]
pub(crate) mod metal;
#[cfg(test)]
mod metal_emulation;

use crate::ops::cpu_util::{f32_values, last_dim, non_empty};
use crate::ops::math::Kind;
use crate::scheme::Granularity;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// The custom op computing block parameters.
#[derive(Debug, Clone, Copy)]
pub struct ScalesOp {
    pub kind: Kind,
    pub granularity: Granularity,
}

impl ScalesOp {
    /// Values per block for an input of this layout.
    pub fn block_size(&self, l: &Layout) -> Result<usize> {
        Ok(self
            .granularity
            .block_size(l.shape().elem_count(), last_dim(l))?)
    }

    /// The GPU kernels' input checks and sizes, `(block, blocks)`: a non-empty input, as on the
    /// CPU, whose values split into whole blocks.
    #[cfg(any(feature = "cuda", feature = "metal"))]
    fn device_blocks(&self, l: &Layout) -> Result<(usize, usize)> {
        non_empty(self.name(), l)?;
        let block = self.block_size(l)?;
        Ok((block, l.shape().elem_count() / block))
    }
}

impl CustomOp1 for ScalesOp {
    fn name(&self) -> &'static str {
        "bitnet-scales"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        non_empty(self.name(), l)?;
        let block = self.block_size(l)?;
        let xs = f32_values(self.name(), s, l)?;
        let params = cpu::block_params(self.name(), self.kind, &xs, block)?;
        let blocks = params.len() / 2;
        Ok((CpuStorage::F32(params), Shape::from((blocks, 2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (block, blocks) = self.device_blocks(l)?;
        let params = cuda::block_params(self.name(), self.kind, s, l, block)?;
        Ok((params, Shape::from((blocks, 2))))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s: &candle_core::MetalStorage,
        l: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let (block, blocks) = self.device_blocks(l)?;
        let params = metal::block_params(self.name(), self.kind, s, l, block)?;
        Ok((params, Shape::from((blocks, 2))))
    }
}

/// The `[blocks, 2]` parameters of `x`, as a constant (no gradient flows through them).
pub fn scales(x: &Tensor, kind: Kind, granularity: Granularity) -> Result<Tensor> {
    x.detach().apply_op1(ScalesOp { kind, granularity })
}
