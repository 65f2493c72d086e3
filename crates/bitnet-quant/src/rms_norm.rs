//! RMSNorm with a backward to both the input and the weight.
//!
//! candle-nn's `RmsNorm::forward` takes a fused fast path on contiguous input that records no
//! backward, so its weight would never learn inside a training graph; this one always does. On the
//! CPU it runs as one fused custom op ([`crate::ops::rms_norm`]); elsewhere it is built from
//! differentiable tensor ops ([`RmsNorm::forward_composed`]).

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// `y = x / sqrt(mean(x^2, last dim) + eps) * weight`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// A norm over `dim` features with a learnable weight initialised to ones (`vb` name `weight`).
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?;
        Ok(Self { weight, eps })
    }

    /// From an existing weight tensor.
    pub fn from_weight(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    /// The learnable scale.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The epsilon added under the square root.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// The norm from candle tensor ops (six forward, their backward): the path on devices without
    /// a fused kernel, and the reference the fused op is tested against.
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let y = x.broadcast_div(&(ms + self.eps)?.sqrt()?)?;
        y.broadcast_mul(&self.weight)?.to_dtype(dtype)
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Our fused kernel is CPU/f32 only, and rejects empty input, which the composed ops
        // map to an empty output of the same shape. Off the CPU, inference (nothing to
        // differentiate) takes candle's fused kernel: one launch instead of six per norm, which
        // adds up in a one-token decode step (four norms per layer).
        if x.elem_count() == 0 || self.weight.dtype() != DType::F32 {
            return self.forward_composed(x);
        }
        if !x.device().is_cpu() {
            if x.track_op() || self.weight.track_op() || x.dtype() != DType::F32 {
                return self.forward_composed(x);
            }
            return candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32);
        }
        let dtype = x.dtype();
        let y = crate::ops::rms_norm::rms_norm(
            &x.to_dtype(DType::F32)?,
            &self.weight,
            self.eps as f32,
        )?;
        y.to_dtype(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// A norm with a non-trivial weight, an input and a fixed upstream gradient `r`.
    fn setup(rows: usize, dim: usize) -> (Var, Var, Tensor, RmsNorm) {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (rows, dim), &dev).unwrap();
        let w = Var::randn(1f32, 0.3, dim, &dev).unwrap();
        let r = Tensor::randn(0f32, 1.0, (rows, dim), &dev).unwrap();
        let norm = RmsNorm::from_weight(w.as_tensor().clone(), 1e-6);
        (x, w, r, norm)
    }

    #[test]
    fn fused_matches_composed_forward_and_gradients() {
        // 40 x 1000 = 40 000 values: above PAR_MIN, so the parallel row split runs too.
        for (rows, dim) in [(3, 7), (40, 1000)] {
            let (x, w, r, norm) = setup(rows, dim);
            let fused = norm.forward(x.as_tensor()).unwrap();
            let composed = norm.forward_composed(x.as_tensor()).unwrap();
            assert!(max_diff(&fused, &composed) < 1e-5);
            let gf = (fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (composed * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &w] {
                let (a, b) = (
                    gf.get(v.as_tensor()).unwrap(),
                    gc.get(v.as_tensor()).unwrap(),
                );
                assert_eq!(a.dims(), b.dims());
                let scale: f32 = b
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar()
                    .unwrap();
                let tol = 1e-5 * (1.0 + scale) * rows as f32;
                assert!(
                    max_diff(a, b) < tol,
                    "{rows}x{dim}: {} >= {tol}",
                    max_diff(a, b)
                );
            }
        }
    }

    #[test]
    fn fused_gradients_match_finite_differences() {
        // f64 finite differences of L = sum(r * norm(x)) around f32 values, central, step 1e-2:
        // the norm is smooth, so the truncation error is far below the tolerance.
        let (rows, dim) = (3, 5);
        let (x, w, r, norm) = setup(rows, dim);
        let loss = |xv: &[f32], wv: &[f32]| -> f64 {
            let xt = Tensor::from_slice(xv, (rows, dim), &Device::Cpu).unwrap();
            let wt = Tensor::from_slice(wv, dim, &Device::Cpu).unwrap();
            let y = RmsNorm::from_weight(wt, 1e-6).forward(&xt).unwrap();
            (y * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let grads = (norm.forward(x.as_tensor()).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let wv: Vec<f32> = w.to_vec1().unwrap();
        let h = 1e-2f32;
        for (which, var, base) in [(0, &x, &xv), (1, &w, &wv)] {
            let g: Vec<f32> = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (i, &gi) in g.iter().enumerate() {
                let (mut plus, mut minus) = (base.clone(), base.clone());
                plus[i] += h;
                minus[i] -= h;
                let fd = if which == 0 {
                    (loss(&plus, &wv) - loss(&minus, &wv)) / (2.0 * h as f64)
                } else {
                    (loss(&xv, &plus) - loss(&xv, &minus)) / (2.0 * h as f64)
                };
                assert!(
                    (gi as f64 - fd).abs() < 2e-2 * (1.0 + fd.abs()),
                    "param {which} index {i}: {gi} vs {fd}"
                );
            }
        }
    }

    #[test]
    fn fused_rejects_a_weight_of_the_wrong_size() {
        let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
        assert!(RmsNorm::from_weight(w, 1e-6).forward(&x).is_err());
    }
}
