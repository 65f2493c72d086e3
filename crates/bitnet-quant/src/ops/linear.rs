//! `y = x w^T` as one op whose backward writes both gradients in the layout they are needed in.
//!
//! candle-nn's `Linear` computes `x.matmul(&w.t())`: two graph nodes. In the backward, the
//! matmul's gradient for `w^T` comes out as an `[in, out]` tensor, candle accumulates it into a
//! fresh zero tensor, and the transpose node then adds its transposed (strided) view into a second
//! zero tensor of `w`'s shape. Here `dW = g^T x` is produced directly as `[out, in]` by one GEMM
//! reading `g` transposed in place, and `dx = g w` by another; no transpose node, no strided copy.
//!
//! Forward: `y[.., o] = sum_i x[.., i] w[o, i]` (leading dims of `x` are flattened).
//! Backward: `dx = g w`, `dW = g^T x` (flattened over the leading dims).
//! Reference: the same as `candle_nn::Linear` without bias.
//!
//! Every device runs candle's own GEMM for its storage (`BackendStorage::matmul`), so CPU, CUDA
//! and Metal share this file.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// The op; see the module docs.
#[derive(Debug, Clone, Copy)]
pub struct LinearOp;

/// `x w^T` for `x: [.., in]` and `w: [out, in]` through [`LinearOp`].
///
/// ```
/// use bitnet_quant::ops::linear::linear;
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let x = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu)?;
/// let w = Tensor::new(&[[1f32, 0.0], [1.0, 1.0], [0.0, -1.0]], &Device::Cpu)?;
/// assert_eq!(linear(&x, &w)?.to_vec2::<f32>()?, [[1.0, 3.0, -2.0], [3.0, 7.0, -4.0]]);
/// # Ok(()) }
/// ```
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    if x.dims().last() != Some(&inp) {
        candle_core::bail!(
            "linear: x {:?} does not end in w's in-features {inp}",
            x.dims()
        );
    }
    if x.elem_count() == 0 || out == 0 {
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("checked above") = out;
        return Tensor::zeros(dims, x.dtype(), x.device());
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, LinearOp)
}

/// The forward on any backend: `x` viewed as `[m, in]`, `w` read transposed in place.
fn forward<S: BackendStorage>(x: &S, xl: &Layout, w: &S, wl: &Layout) -> Result<(S, Shape)> {
    let (out, inp) = wl.shape().dims2()?;
    let m = xl.shape().elem_count() / inp;
    let lhs = Layout::contiguous_with_offset((m, inp), xl.start_offset());
    let rhs = wl.transpose(0, 1)?;
    let y = x.matmul(w, (1, m, out, inp), &lhs, &rhs)?;
    let mut dims = xl.dims().to_vec();
    *dims.last_mut().expect("x has at least one dim") = out;
    Ok((y, Shape::from(dims)))
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "bitnet-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        forward(x, xl, w, wl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        forward(x, xl, w, wl)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        x: &candle_core::MetalStorage,
        xl: &Layout,
        w: &candle_core::MetalStorage,
        wl: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        forward(x, xl, w, wl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (out, inp) = w.dims2()?;
        let g2 = g.reshape(((), out))?;
        let x2 = x.reshape(((), inp))?;
        let dx = g2.matmul(w)?.reshape(x.shape())?;
        // `g2.t()` is a strided view; the GEMM reads it without a copy.
        let dw = g2.t()?.matmul(&x2)?;
        Ok((Some(dx), Some(dw)))
    }
}
