//! BitLinear's training forward as one op: `(x, w, g) -> ActQuant(RMSNorm(x; g)) @ WQuant(w)^T`.
//!
//! Built from separate ops the layer is six graph nodes (norm, two scales, two quantizers, the
//! GEMM). candle's backward allocates a zero tensor for every node's input gradient and adds the
//! incoming gradient into it, so each intermediate activation costs an allocation, a memset and an
//! add on top of its own kernel. This op runs the same kernels in one node, keeps what its
//! backward needs (the normed and quantized input, the quantized weight, both block parameters)
//! and skips the gradients nobody asked for: the data fed to the first layer has no gradient, so
//! its RMSNorm input gradient is never computed.
//!
//! Forward: exactly the separate ops' kernels in the same order, so the output is bitwise the
//! same as [`BitLinear::forward_separate`](crate::BitLinear::forward_separate) — except when the
//! input is mostly zeros (at most [`sparse::MAX_DENSITY`] nonzeros, like MNIST's pixels): then
//! the GEMM and the backward's products run as the [`sparse`] kernels over
//! the nonzeros only, equal up to f32 rounding (another summation order). With int8 activations
//! and ternary or binary weights the forward runs in integers up to
//! [`sparse::MAX_DENSITY_LEVELS`] nonzeros (a hidden layer after ReLU), the backward then by the
//! dense GEMMs.
//! Backward: `dXq = dY Wq`, `dW = e_w(dY^T Xq)`, `dXn = e_x(dXq)` with `e_*` the quantizers'
//! estimators (identity for the default STE), then RMSNorm's two gradients from `dXn`. When
//! only the norm weight needs `dXn` (the first layer), a sparse input's `dXq` is computed only
//! where the input is nonzero: the norm gradient `sum_i dXn[i,j] xhat[i,j]` reads nothing else.
//! Reference: the separate ops, which the tests compare it against (and finite differences).
//!
//! A first layer whose forward ran in integers on a sparse input keeps only its weight's levels
//! (1 byte each) and per-output scales: the one-sweep backward reads nothing else, and the
//! f32 transpose of a 784 x 256 weight was 800 KB to write in the forward and read back, mostly
//! out of cache, in the backward.
//!
//! CPU and f32 only: [`BitLinear`](crate::BitLinear) runs the separate ops on other devices.

pub(crate) mod cpu;

use crate::error::QuantError;
use crate::ops::cpu_util::{f32_values, last_dim, non_empty};
use crate::ops::quantize::{QuantizeGradOp, QuantizeOp};
use crate::ops::rms_norm::RmsNormGradOp;
use crate::ops::sparse::{self, SparseRows};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use std::sync::{Arc, Mutex};

/// What the forward keeps for the backward, as tensors so that the backward is plain tensor ops.
#[derive(Debug, Clone)]
struct Saved {
    /// `RMSNorm(x)`, `[m, in]`.
    xn: Tensor,
    /// The quantized `xn` (or `xn` itself without an activation quantizer), `[m, in]`.
    xq: Tensor,
    /// Activation block parameters `[blocks, 2]`, if quantized.
    x_params: Option<Tensor>,
    /// The quantized weight, `[out, in]` (`[in, out]` when `sparse` is set).
    wq: SavedWeight,
    /// The GEMM's input as entries, when the forward took the sparse kernels.
    sparse: Option<Arc<SparseRows>>,
    /// Weight block parameters `[blocks, 2]`.
    w_params: Tensor,
}

/// The quantized weight as the backward reads it (see [`cpu::WeightKept`]).
#[derive(Debug, Clone)]
enum SavedWeight {
    /// `[out, in]`, or `[in, out]` after a sparse forward.
    Values(Tensor),
    /// `[in, out]` levels and one scale per output.
    Signs(Arc<(Vec<i8>, Vec<f32>)>),
}

impl SavedWeight {
    /// The values (rebuilt from the levels if that is what was kept; the first layer's
    /// backward, the only one that keeps them, reads them directly instead).
    fn values(&self) -> Result<Tensor> {
        match self {
            SavedWeight::Values(t) => Ok(t.clone()),
            SavedWeight::Signs(ls) => {
                let (signs, scale) = (&ls.0, &ls.1);
                let n = scale.len();
                let v: Vec<f32> = signs
                    .iter()
                    .enumerate()
                    .map(|(t, &l)| l as f32 * scale[t % n])
                    .collect();
                Tensor::from_vec(v, (signs.len() / n, n), &candle_core::Device::Cpu)
            }
        }
    }
}

/// The op; see the module docs. One instance per forward call (it holds that call's saved
/// tensors), built by [`bitlinear_train`].
#[derive(Debug)]
pub struct BitLinearOp {
    weight: QuantizeOp,
    act: Option<QuantizeOp>,
    eps: f32,
    /// Only the weight and norm-weight gradients will be asked for (see [`cpu::forward`]).
    signs_suffice: bool,
    saved: Mutex<Option<Saved>>,
}

/// The fused forward of a BitLinear layer with an RMSNorm of weight `norm` (epsilon `eps`):
/// `x: [.., in]`, `w: [out, in]`, `norm: [in]`, all f32 on the CPU. `weight` and `act` are the
/// quantize ops of the weight and activation quantizers.
pub fn bitlinear_train(
    x: &Tensor,
    w: &Tensor,
    norm: &Tensor,
    weight: QuantizeOp,
    act: Option<QuantizeOp>,
    eps: f32,
) -> Result<Tensor> {
    let act_identity = act
        .as_ref()
        .is_none_or(|a| a.estimator == crate::ops::EstKind::Identity);
    let signs_suffice = w.track_op() && norm.track_op() && !x.track_op() && act_identity;
    let op = BitLinearOp {
        weight,
        act,
        eps,
        signs_suffice,
        saved: Mutex::new(None),
    };
    x.apply_op3(w, norm, op)
}

impl BitLinearOp {
    fn check(&self, lx: &Layout, lw: &Layout, lg: &Layout) -> Result<(usize, usize, usize)> {
        let op = self.name();
        non_empty(op, lx)?;
        let k = last_dim(lx);
        let shape_err =
            |what: String| -> candle_core::Error { QuantError::Shape { op, what }.into() };
        let (n, wk) = lw
            .shape()
            .dims2()
            .map_err(|_| shape_err(format!("weight must be [out, in], got {:?}", lw.shape())))?;
        if wk != k || n == 0 {
            return Err(shape_err(format!(
                "weight {:?} does not match input {:?}",
                lw.shape(),
                lx.shape()
            )));
        }
        if lg.dims() != [k] {
            return Err(shape_err(format!(
                "norm weight of shape [{k}] expected, got {:?}",
                lg.shape()
            )));
        }
        Ok((lx.shape().elem_count() / k, k, n))
    }

    /// `u` through a quantizer's estimator at input `x` (the identity shortcut as in
    /// [`QuantizeOp`]'s own backward).
    fn estimator_grad(q: &QuantizeOp, x: &Tensor, params: &Tensor, u: Tensor) -> Result<Tensor> {
        if q.estimator == crate::ops::EstKind::Identity {
            return Ok(u);
        }
        x.apply_op3_no_bwd(params, &u, &QuantizeGradOp(*q))
    }
}

impl CustomOp3 for BitLinearOp {
    fn name(&self) -> &'static str {
        "bitnet-bitlinear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k, n) = self.check(lx, lw, lg)?;
        let xs = f32_values(self.name(), sx, lx)?;
        let ws = f32_values(self.name(), sw, lw)?;
        let gs = f32_values(self.name(), sg, lg)?;
        let f = cpu::forward(
            self.name(),
            &self.weight,
            self.act.as_ref(),
            self.eps,
            (&xs, &ws, &gs),
            (m, k, n),
            self.signs_suffice,
        )?;
        let dev = candle_core::Device::Cpu;
        let xn = Tensor::from_vec(f.xn, (m, k), &dev)?;
        let xq = match f.xq {
            Some(v) => Tensor::from_vec(v, (m, k), &dev)?,
            None => xn.clone(),
        };
        let x_params = match f.x_params {
            Some(p) => Some(Tensor::from_vec(p, (m * k / f.x_block, 2), &dev)?),
            None => None,
        };
        let w_blocks = n * k / f.w_block;
        let wq = match f.wq {
            cpu::WeightKept::Rows(v) => SavedWeight::Values(Tensor::from_vec(v, (n, k), &dev)?),
            cpu::WeightKept::Columns(v) => SavedWeight::Values(Tensor::from_vec(v, (k, n), &dev)?),
            cpu::WeightKept::ColumnSigns(l, s) => SavedWeight::Signs(Arc::new((l, s))),
        };
        let saved = Saved {
            xn,
            xq,
            x_params,
            wq,
            sparse: f.sparse.map(Arc::new),
            w_params: Tensor::from_vec(f.w_params, (w_blocks, 2), &dev)?,
        };
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        let mut dims = lx.dims().to_vec();
        *dims.last_mut().expect("non-empty input has a last dim") = n;
        Ok((CpuStorage::F32(f.y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        norm: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = self
            .saved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| QuantError::Shape {
                op: "bitnet-bitlinear",
                what: "backward before forward".into(),
            })?;
        let n = w.dim(0)?;
        let g2 = grad.reshape(((), n))?;
        let (need_x, need_norm) = (x.track_op(), norm.track_op());
        if let Some(sp) = &s.sparse {
            return self.sparse_bwd(&s, sp, (x, w, norm), &g2, (need_x, need_norm));
        }
        let dw = match w.track_op() {
            // `g2.t()` is a strided view; the GEMM reads it without a copy.
            true => {
                let dwq = g2.t()?.matmul(&s.xq)?;
                Some(Self::estimator_grad(&self.weight, w, &s.w_params, dwq)?)
            }
            false => None,
        };
        if !need_x && !need_norm {
            return Ok((None, dw, None));
        }
        let dxq = g2.matmul(&s.wq.values()?)?;
        self.input_grads(&s, x, norm, dxq, (need_x, need_norm))
            .map(|(dx, dnorm)| (dx, dw, dnorm))
    }
}

/// Runs the fallible `f` on the values of a contiguous f32 CPU tensor.
fn with_values<R, E: Into<candle_core::Error>>(
    t: &Tensor,
    f: impl FnOnce(&[f32]) -> std::result::Result<R, E>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => f(&v[a..b]).map_err(Into::into),
        _ => candle_core::bail!("bitnet-bitlinear: expected a contiguous f32 CPU tensor"),
    }
}

impl BitLinearOp {
    /// The backward after a sparse forward: the weight gradient and, when only the norm needs
    /// it, the input gradient at the pattern's positions by the sparse kernels; an input
    /// gradient that flows on (a hidden layer) by the dense GEMM.
    #[allow(clippy::type_complexity)]
    fn sparse_bwd(
        &self,
        s: &Saved,
        sp: &SparseRows,
        (x, w, norm): (&Tensor, &Tensor, &Tensor),
        g2: &Tensor,
        (need_x, need_norm): (bool, bool),
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dev = candle_core::Device::Cpu;
        let (m, n) = g2.dims2()?;
        let k = sp.cols();
        let g2 = g2.contiguous()?;
        // `dW` (`[out, in]`) through the weight quantizer's estimator.
        let weight_grad = |dwq: Vec<f32>| -> Result<Tensor> {
            let dwq = Tensor::from_vec(dwq, (n, k), &dev)?;
            Self::estimator_grad(&self.weight, w, &s.w_params, dwq)
        };
        let act_identity = self
            .act
            .as_ref()
            .is_none_or(|a| a.estimator == crate::ops::EstKind::Identity);
        if w.track_op() && need_norm && !need_x && act_identity {
            // The first layer: the weight gradient and the norm-weight gradient in one sweep
            // over the input's nonzeros (`SparseRows::matmul_t_with_dots`); the input gradient,
            // which only the norm needed, is never formed.
            let eps = self.eps;
            let (st, second_t) = with_values(&x.contiguous()?, |xv| {
                let inv_rms: Vec<f32> = xv
                    .chunks(k)
                    .map(|row| 1.0 / crate::ops::rms_norm::cpu::rms(row, eps))
                    .collect();
                sp.transposed_gathered(xv, &inv_rms)
            })?;
            let (dw, dnorm) = with_values(&g2, |gv| match &s.wq {
                SavedWeight::Signs(ls) => {
                    let (signs, scale) = (&ls.0, &ls.1);
                    let w = sparse::WeightT::Signs { signs, scale };
                    Ok(st.matmul_t_with_dots(&second_t, gv, n, w)?)
                }
                SavedWeight::Values(wt) => with_values(wt, |wt| {
                    st.matmul_t_with_dots(&second_t, gv, n, sparse::WeightT::Values(wt))
                }),
            })?;
            let dnorm = Tensor::from_vec(dnorm, norm.shape(), &dev)?;
            return Ok((None, Some(weight_grad(dw)?), Some(dnorm)));
        }
        let by_column = (w.track_op() || (need_norm && !need_x)).then(|| sp.transposed());
        let dw = match (w.track_op(), &by_column) {
            (true, Some(st)) => {
                let dwt = with_values(&g2, |gv| st.matmul(gv, n))?;
                Some(weight_grad(sparse::transpose(&dwt, k, n)?)?)
            }
            _ => None,
        };
        if !need_x && !need_norm {
            return Ok((None, dw, None));
        }
        let dxq = match (need_x, &by_column) {
            (false, Some(st)) => {
                let wt = s.wq.values()?;
                let vals =
                    with_values(&g2, |gv| with_values(&wt, |wt| st.sampled_dots(gv, wt, n)))?;
                Tensor::from_vec(st.scatter_transposed(&vals)?, (m, k), &dev)?
            }
            _ => g2.matmul(&s.wq.values()?.t()?)?,
        };
        self.input_grads(s, x, norm, dxq, (need_x, need_norm))
            .map(|(dx, dnorm)| (dx, dw, dnorm))
    }

    /// The input and norm-weight gradients from the GEMM's input gradient `dxq` (`[m, in]`).
    fn input_grads(
        &self,
        s: &Saved,
        x: &Tensor,
        norm: &Tensor,
        dxq: Tensor,
        (need_x, need_norm): (bool, bool),
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dxn = match (&self.act, &s.x_params) {
            (Some(a), Some(p)) => Self::estimator_grad(a, &s.xn, p, dxq)?,
            _ => dxq,
        }
        .reshape(x.shape())?;
        let rms_grad = |wrt_weight| {
            x.apply_op3_no_bwd(
                norm,
                &dxn,
                &RmsNormGradOp {
                    eps: self.eps,
                    wrt_weight,
                },
            )
        };
        let dx = need_x.then(|| rms_grad(false)).transpose()?;
        let dnorm = need_norm.then(|| rms_grad(true)).transpose()?;
        Ok((dx, dnorm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Levels kept for the first layer give back the values `level * scale[output]` if another
    /// backward path ever asks for them.
    #[test]
    fn kept_levels_rebuild_the_transposed_values() {
        let (signs, scale) = (vec![1i8, 0, -1, -1, 1, 0], vec![0.5f32, 2.0, 0.25]);
        let w = SavedWeight::Signs(Arc::new((signs, scale)));
        let v = w.values().unwrap();
        assert_eq!(v.dims(), [2, 3]);
        let want = [[0.5f32, 0.0, -0.25], [-0.5, 2.0, 0.0]];
        assert_eq!(v.to_vec2::<f32>().unwrap(), want);
    }
}
