//! RMSNorm as one custom op: `(x, w) -> x / sqrt(mean(x^2, last dim) + eps) * w`, with a backward
//! giving gradients to both `x` and `w`. Built from tensor ops the norm takes six ops forward and
//! about twice as many backward, each a pass over the activations with its own allocation; this
//! op makes one pass forward and two backward.

pub(crate) mod cpu;

use crate::error::QuantError;
use crate::ops::cpu_util::{f32_values, last_dim, non_empty};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// The fused RMSNorm forward (`x` of shape `[..., D]`, weight `[D]`), CPU only.
#[derive(Debug, Clone, Copy)]
pub struct RmsNormOp {
    /// Added to the mean square under the root.
    pub eps: f32,
}

/// Checks that the weight has one value per column of `x`; returns the column count.
fn checked_dim(op: &'static str, lx: &Layout, lw: &Layout) -> Result<usize> {
    non_empty(op, lx)?;
    let dim = last_dim(lx);
    if lw.shape().elem_count() != dim || lw.dims().len() != 1 {
        return Err(QuantError::Shape {
            op,
            what: format!(
                "weight of shape [{dim}] expected for input {:?}, got {:?}",
                lx.shape(),
                lw.shape()
            ),
        }
        .into());
    }
    Ok(dim)
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "bitnet-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        checked_dim(self.name(), l1, l2)?;
        let xs = f32_values(self.name(), s1, l1)?;
        let ws = f32_values(self.name(), s2, l2)?;
        Ok((
            CpuStorage::F32(cpu::forward(&xs, &ws, self.eps)),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let gx = x.apply_op3_no_bwd(
            w,
            grad,
            &RmsNormGradOp {
                eps: self.eps,
                wrt_weight: false,
            },
        )?;
        let gw = x.apply_op3_no_bwd(
            w,
            grad,
            &RmsNormGradOp {
                eps: self.eps,
                wrt_weight: true,
            },
        )?;
        Ok((Some(gx), Some(gw)))
    }
}

/// One gradient of [`RmsNormOp`] as an op of `(x, w, upstream)`: w.r.t. the input (shape of `x`)
/// or w.r.t. the weight (shape of `w`). Only called from [`RmsNormOp::bwd`], so it has no backward.
#[derive(Debug, Clone, Copy)]
pub struct RmsNormGradOp {
    /// The forward's epsilon.
    pub eps: f32,
    /// `true`: the gradient w.r.t. the weight; `false`: w.r.t. the input.
    pub wrt_weight: bool,
}

impl CustomOp3 for RmsNormGradOp {
    fn name(&self) -> &'static str {
        "bitnet-rms-norm-grad"
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
        let dim = checked_dim(self.name(), l1, l2)?;
        if l3.shape() != l1.shape() {
            return Err(QuantError::Shape {
                op: self.name(),
                what: format!("gradient {:?} vs input {:?}", l3.shape(), l1.shape()),
            }
            .into());
        }
        let xs = f32_values(self.name(), s1, l1)?;
        let us = f32_values(self.name(), s3, l3)?;
        if self.wrt_weight {
            let g = cpu::grad_weight(&xs, &us, dim, self.eps);
            Ok((CpuStorage::F32(g), l2.shape().clone()))
        } else {
            let ws = f32_values(self.name(), s2, l2)?;
            let g = cpu::grad_input(&xs, &ws, &us, self.eps);
            Ok((CpuStorage::F32(g), l1.shape().clone()))
        }
    }
}

/// The fused RMSNorm of `x` (f32, CPU) with weight `w`, differentiable in both.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    x.apply_op2(w, RmsNormOp { eps })
}
