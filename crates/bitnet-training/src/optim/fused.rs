//! Glue between the kernels and candle: an [`InplaceOp2`] that runs a fused update on a parameter's
//! storage in place, with the gradient as the second operand. The optimizer state lives outside the
//! op (host `Vec<f32>` buffers owned by the optimizer) and is lent to it for the step.

use std::cell::RefCell;

use candle_core::{CpuStorage, InplaceOp2, Layout, Result, Tensor};

use super::kernels::GradSrc;

/// One fused update, called with the parameter's elements (contiguous, in place) and a view of the
/// gradient.
pub(crate) trait SliceUpdate {
    /// The op's name, for candle's error messages.
    fn name(&self) -> &'static str;
    /// Updates `param` and the state the implementor holds.
    fn apply(&mut self, param: &mut [f32], grad: GradSrc<'_>);
}

/// Adapter from [`SliceUpdate`] to candle's in-place op trait. `InplaceOp2::cpu_fwd` takes `&self`,
/// hence the `RefCell` (the op is used on one thread, for one call).
struct FusedOp<'a, U: SliceUpdate>(RefCell<&'a mut U>);

impl<U: SliceUpdate> InplaceOp2 for FusedOp<'_, U> {
    fn name(&self) -> &'static str {
        self.0.borrow().name()
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let name = self.name();
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "{name}: gradient shape {:?} differs from the parameter's {:?}",
                l2.shape(),
                l1.shape()
            );
        }
        let (p0, p1) = l1.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg(format!("{name}: the parameter is not contiguous"))
        })?;
        let param = match s1 {
            CpuStorage::F32(v) => &mut v[p0..p1],
            _ => candle_core::bail!("{name}: the fused kernel takes f32 parameters only"),
        };
        let data = s2.as_slice::<f32>()?;
        let grad = match l2.contiguous_offsets() {
            Some((g0, g1)) => GradSrc::Contiguous(&data[g0..g1]),
            None => {
                if l2.dims().len() > GradSrc::MAX_RANK {
                    candle_core::bail!("{name}: strided gradient of rank > {}", GradSrc::MAX_RANK);
                }
                GradSrc::strided(data, l2.dims(), l2.stride(), l2.start_offset())
            }
        };
        self.0.borrow_mut().apply(param, grad);
        Ok(())
    }
}

/// Runs `update` on `param` (a CPU f32 tensor, updated in place) with gradient `grad`.
pub(crate) fn apply_fused<U: SliceUpdate>(
    param: &Tensor,
    grad: &Tensor,
    update: &mut U,
) -> Result<()> {
    param.inplace_op2(grad, &FusedOp(RefCell::new(update)))
}
