//! ReLU as one op with a one-pass backward, for the activations between BitLinear layers.
//!
//! candle's `Tensor::relu` is cheap forward, but its backward builds the mask from four
//! tensor ops (`zeros_like`, `ge`, a `u8 -> f32` cast and a multiply), each a full pass and an
//! allocation over the activation, before the gradient is accumulated. In a small MLP's
//! training step those passes were 5-7 % of the time. This op computes the same thing in one
//! pass each way.
//!
//! Forward: `y = max(x, 0)`. Backward: `dx = dy` where `x >= 0`, else `0` (candle's convention,
//! so the gradient is the same as `Tensor::relu`'s to the bit, including at `x == 0`).
//! Reference: `Tensor::relu`, which the tests compare it with.
//!
//! f32 on the CPU; any other dtype or device goes to `Tensor::relu`.
//!
//! ```
//! use bitnet_quant::ops::relu::relu;
//! use candle_core::{Device, Tensor, Var};
//! let x = Var::new(&[-1f32, 0.0, 2.0], &Device::Cpu)?;
//! let y = relu(x.as_tensor())?;
//! assert_eq!(y.to_vec1::<f32>()?, [0.0, 0.0, 2.0]);
//! let g = y.sum_all()?.backward()?;
//! assert_eq!(g.get(&x).unwrap().to_vec1::<f32>()?, [0.0, 1.0, 1.0]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use crate::ops::cpu_util::f32_values;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// `max(x, 0)` with a one-pass backward (see the module docs).
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        return x.relu();
    }
    x.apply_op1(Relu)
}

struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "bitnet-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let xs = f32_values(self.name(), s, l)?;
        // A slice's exact length lets `collect` write the values straight into one allocation,
        // with no zeroing first.
        let out: Vec<f32> = xs.iter().map(|&x| x.max(0.0)).collect();
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(grad, &ReluGrad)?))
    }
}

/// `(x, dy) -> dy * [x >= 0]`.
struct ReluGrad;

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "bitnet-relu-grad"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let xs = f32_values(self.name(), sx, lx)?;
        let gs = f32_values(self.name(), sg, lg)?;
        let out: Vec<f32> = xs
            .iter()
            .zip(gs.iter())
            .map(|(&x, &g)| if x >= 0.0 { g } else { 0.0 })
            .collect();
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Forward and gradient equal `Tensor::relu`'s to the bit, on contiguous and strided inputs
    /// with exact zeros, and the gradient of a non-trivial loss matches central differences.
    #[test]
    fn matches_candle_relu_and_finite_differences() {
        let dev = Device::Cpu;
        let base = Tensor::randn(0f32, 1.0, (6, 9), &dev).unwrap();
        // Exact zeros, where the convention matters.
        let mask = Tensor::randn(0f32, 1.0, (6, 9), &dev)
            .unwrap()
            .ge(0.8)
            .unwrap();
        let base = mask.where_cond(&base.zeros_like().unwrap(), &base).unwrap();
        let w = Tensor::randn(0f32, 1.0, (6, 9), &dev).unwrap();
        for transposed in [false, true] {
            let x = Var::from_tensor(&base).unwrap();
            let xt = match transposed {
                true => x.as_tensor().t().unwrap(),
                false => x.as_tensor().clone(),
            };
            let wt = match transposed {
                true => w.t().unwrap(),
                false => w.clone(),
            };
            let loss = |y: Tensor| (y * &wt).unwrap().sum_all().unwrap();
            let ours = relu(&xt).unwrap();
            let theirs = xt.relu().unwrap();
            let bits = |t: &Tensor| {
                let v: Vec<u32> = t
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect();
                v
            };
            assert_eq!(
                bits(&ours),
                bits(&theirs),
                "forward, transposed {transposed}"
            );
            let g_ours = loss(ours).backward().unwrap();
            let g_theirs = loss(theirs).backward().unwrap();
            let (a, b) = (g_ours.get(&x).unwrap(), g_theirs.get(&x).unwrap());
            assert_eq!(bits(a), bits(b), "gradient, transposed {transposed}");
        }
        // d/dx sum(relu(x) * w) = w where x > 0, 0 where x < 0 (away from the kink).
        let xv: Vec<f32> = base.flatten_all().unwrap().to_vec1().unwrap();
        let wv: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let x = Var::from_tensor(&base).unwrap();
        let g = (relu(x.as_tensor()).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gv: Vec<f32> = g.get(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let f = |v: &[f32]| -> f64 {
            v.iter()
                .zip(&wv)
                .map(|(x, w)| x.max(0.0) as f64 * *w as f64)
                .sum()
        };
        let h = 1e-3f32;
        for i in 0..xv.len() {
            if xv[i].abs() < 2.0 * h {
                continue;
            }
            let (mut up, mut down) = (xv.clone(), xv.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (f(&up) - f(&down)) / (2.0 * h as f64);
            assert!(
                (fd - gv[i] as f64).abs() < 1e-3,
                "value {i}: {fd} vs {}",
                gv[i]
            );
        }
    }
}
