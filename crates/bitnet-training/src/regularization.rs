//! Regularizers for quantization-aware training: scalar penalties on latent weights that
//! backpropagate, each scaled by a weight that a schedule may change during training.
//!
//! * [`l2`]: `sum w^2`, plain weight decay as a loss term.
//! * [`l1`]: `sum |w|`, pushes latent weights to 0, i.e. ternary weights to the 0 level (sparsity).
//! * [`smoothness`]: `mean |w - q(w)|`, the distance of the latent weights to the level the
//!   [`Quantizer`] maps them to, so that they settle on levels instead of oscillating across a
//!   rounding boundary or a threshold.
//! * [`bnn_plus`]: `sum (a - |w|)^2`, the BNN+ regularizer (Darabi et al. 2018, p = 2) that pulls
//!   binary latent weights to `±a`.
//!
//! Where `|.|` has a kink (at 0 for [`l1`], at a level for [`smoothness`]) the gradient is 0: a
//! weight that already sits where the penalty wants it is left alone instead of being pushed off
//! by a subgradient of ±1.
//!
//! ```
//! use bitnet_training::regularization::{Penalty, Regularizer};
//! use candle_core::{Device, Var};
//! # fn main() -> candle_core::Result<()> {
//! let w = Var::new(&[0.5f32, -0.25, 0.0], &Device::Cpu)?;
//! let mut reg = Regularizer::new(Penalty::L1, 0.1)?;
//! let loss = reg.loss(&[w.as_tensor()])?; // 0.1 * (0.5 + 0.25 + 0)
//! assert!((loss.to_scalar::<f32>()? - 0.075).abs() < 1e-7);
//! let g = loss.backward()?.get(&w).unwrap().to_vec1::<f32>()?;
//! assert_eq!(g, [0.1, -0.1, 0.0]);
//! reg.set_weight(0.0); // e.g. switched off by a schedule
//! assert_eq!(reg.loss(&[w.as_tensor()])?.to_scalar::<f32>()?, 0.0);
//! // A list that may be empty says where its zero lives.
//! assert_eq!(reg.loss_on(&[], &Device::Cpu)?.to_scalar::<f32>()?, 0.0);
//! # Ok(()) }
//! ```

use crate::error::TrainingError;
use bitnet_quant::Quantizer;
use candle_core::{DType, Device, Result, Tensor};

/// `sum w^2`.
pub fn l2(w: &Tensor) -> Result<Tensor> {
    w.sqr()?.sum_all()
}

/// `sum |w|`; gradient `sign(w)`, 0 at `w = 0`.
pub fn l1(w: &Tensor) -> Result<Tensor> {
    // |w| = w * sign(w) with the sign a constant: the same value, and a gradient of exactly
    // sign(w) (0 at 0) instead of candle's abs backward, which pushes zeros to +.
    (w * w.sign()?.detach())?.sum_all()
}

/// The sparsity penalty, by the name users look for: [`l1`].
pub use self::l1 as sparsity;

/// `sum (a - |w|)^2` (BNN+, p = 2); gradient `-2 (a - |w|) sign(w)`. `a > 0`.
pub fn bnn_plus(w: &Tensor, a: f64) -> Result<Tensor> {
    check_a(a)?;
    let abs = (w * w.sign()?.detach())?;
    abs.affine(-1.0, a)?.sqr()?.sum_all()
}

/// `mean |w - q(w)|` with `q(w)` the value `q` quantizes `w` to (fully, whatever `q`'s blend):
/// its level, chosen exactly as the quantizer chooses it (ties to even, thresholds, the centered
/// binary's mean), times its block's scale. `q(w)` is a constant for the backward, so the
/// gradient is `sign(w - q(w)) / numel`, 0 on a level.
///
/// A block whose scale is 0 has every level at 0.
pub fn smoothness(w: &Tensor, q: &Quantizer) -> Result<Tensor> {
    let nearest = nearest_levels(w, q)?;
    let d = (w - nearest.to_dtype(w.dtype())?)?;
    (&d * d.sign()?.detach())?.mean_all()
}

/// The level `q` maps every value of `w` to, times its block's scale: `q`'s own forward (its
/// kernels, on `w`'s device) without the blend, as a constant f32 tensor of `w`'s shape.
pub fn nearest_levels(w: &Tensor, q: &Quantizer) -> Result<Tensor> {
    let x = w.detach().to_dtype(DType::F32)?;
    q.with_lambda(1.0)?.quantize(&x)
}

fn check_a(a: f64) -> Result<()> {
    if a.is_finite() && a > 0.0 {
        Ok(())
    } else {
        Err(TrainingError::InvalidConfig {
            field: "regularization.a",
            value: a.to_string(),
            allowed: "a finite number > 0",
        }
        .into())
    }
}

/// Which penalty a [`Regularizer`] computes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Penalty {
    /// [`l2`].
    L2,
    /// [`l1`] (sparsity).
    L1,
    /// [`smoothness`] with respect to this quantizer's grid.
    Smoothness(Quantizer),
    /// [`bnn_plus`] with this `a`.
    BnnPlus {
        /// The magnitude latent weights are pulled to.
        a: f64,
    },
}

/// A penalty times a weight: `weight * sum over tensors of penalty(w)`.
///
/// The weight is a plain field that [`Regularizer::set_weight`] changes, so that a schedule (e.g.
/// [`crate::optim::Schedule`]) can ramp the regularization up or down step by step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Regularizer {
    /// What is penalised.
    pub penalty: Penalty,
    weight: f64,
}

impl Regularizer {
    /// A regularizer; `weight >= 0` and finite, `a > 0` for BNN+.
    pub fn new(penalty: Penalty, weight: f64) -> Result<Self> {
        if let Penalty::BnnPlus { a } = penalty {
            check_a(a)?;
        }
        let mut r = Self {
            penalty,
            weight: 0.0,
        };
        r.try_set_weight(weight)?;
        Ok(r)
    }

    /// The current weight.
    pub fn weight(&self) -> f64 {
        self.weight
    }

    /// Sets the weight (a schedule's value at this step). Negative or non-finite values are
    /// clamped to 0, because a schedule must never turn a penalty into a reward.
    pub fn set_weight(&mut self, weight: f64) {
        self.weight = if weight.is_finite() {
            weight.max(0.0)
        } else {
            0.0
        };
    }

    /// Sets the weight, rejecting negative or non-finite values.
    pub fn try_set_weight(&mut self, weight: f64) -> Result<()> {
        if !(weight.is_finite() && weight >= 0.0) {
            return Err(TrainingError::InvalidConfig {
                field: "regularization.weight",
                value: weight.to_string(),
                allowed: "a finite number >= 0",
            }
            .into());
        }
        self.weight = weight;
        Ok(())
    }

    /// The unweighted penalty of one tensor.
    pub fn penalty(&self, w: &Tensor) -> Result<Tensor> {
        match self.penalty {
            Penalty::L2 => l2(w),
            Penalty::L1 => l1(w),
            Penalty::Smoothness(q) => smoothness(w, &q),
            Penalty::BnnPlus { a } => bnn_plus(w, a),
        }
    }

    /// `weight * sum_i penalty(ws[i])`, an f32 scalar on the tensors' device. The list must not
    /// be empty (there would be no device to put the 0 on): use [`Regularizer::loss_on`] for a
    /// list that may be.
    pub fn loss(&self, ws: &[&Tensor]) -> Result<Tensor> {
        match ws.first() {
            Some(w) => self.loss_on(ws, w.device()),
            None => Err(TrainingError::InvalidConfig {
                field: "ws",
                value: "[] (an empty list of tensors)".into(),
                allowed:
                    "at least one tensor; Regularizer::loss_on takes the device for an empty list",
            }
            .into()),
        }
    }

    /// [`Regularizer::loss`] on `device`: every tensor must be there, and an empty list gives
    /// an f32 0 there.
    pub fn loss_on(&self, ws: &[&Tensor], device: &Device) -> Result<Tensor> {
        let mut total = Tensor::zeros((), DType::F32, device)?;
        for (i, w) in ws.iter().enumerate() {
            if !w.device().same_device(device) {
                return Err(TrainingError::Parameter {
                    index: i,
                    shape: w.shape().clone(),
                    reason: format!(
                        "on {:?}, the regularization loss on {:?}",
                        w.device().location(),
                        device.location()
                    ),
                }
                .into());
            }
            total = (total + self.penalty(w)?.to_dtype(DType::F32)?)?;
        }
        total.affine(self.weight, 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitnet_quant::{Estimator, Granularity, Scheme, Threshold};
    use candle_core::{Device, Var};

    const W: [f32; 4] = [0.4, -0.1, 0.02, -0.9];

    fn grad_of(f: impl Fn(&Tensor) -> Result<Tensor>, w: &[f32]) -> (f32, Vec<f32>) {
        let v = Var::new(w, &Device::Cpu).unwrap();
        let loss = f(v.as_tensor()).unwrap();
        let g = loss
            .backward()
            .unwrap()
            .get(&v)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        (loss.to_scalar::<f32>().unwrap(), g)
    }

    fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
    }

    #[test]
    fn penalties_and_gradients_by_hand() {
        let tern = Quantizer::new(Scheme::TernaryAbsmean, Estimator::Identity).unwrap();
        let two = Quantizer::new(Scheme::MultiBit { bits: 2 }, Estimator::Identity).unwrap();
        // absmean: g = (0.4 + 0.1 + 0.02 + 0.9) / 4 = 0.355; levels {-g, 0, g};
        // nearest [g, 0, 0, -g]; distances [0.045, 0.1, 0.02, 0.545].
        // 2-bit: s = 0.9 / 1, levels {-1.8, -0.9, 0, 0.9}; nearest [0, 0, 0, -0.9]; -0.9 sits on a level.
        // BNN+ a = 0.5: (0.5 - |w|) = [0.1, 0.4, 0.48, -0.4]; grad -2 (a - |w|) sign(w).
        type F = Box<dyn Fn(&Tensor) -> Result<Tensor>>;
        let cases: Vec<(&str, F, f32, Vec<f32>)> = vec![
            (
                "l2",
                Box::new(l2),
                0.16 + 0.01 + 0.0004 + 0.81,
                W.iter().map(|w| 2.0 * w).collect(),
            ),
            ("l1", Box::new(l1), 1.42, vec![1.0, -1.0, 1.0, -1.0]),
            (
                "bnn+",
                Box::new(|w: &Tensor| bnn_plus(w, 0.5)),
                0.01 + 0.16 + 0.2304 + 0.16,
                vec![-0.2, 0.8, -0.96, -0.8],
            ),
            (
                "smooth ternary",
                Box::new(move |w: &Tensor| smoothness(w, &tern)),
                (0.045 + 0.1 + 0.02 + 0.545) / 4.0,
                vec![0.25, -0.25, 0.25, -0.25],
            ),
            (
                "smooth 2-bit",
                Box::new(move |w: &Tensor| smoothness(w, &two)),
                (0.4 + 0.1 + 0.02 + 0.0) / 4.0,
                vec![0.25, -0.25, 0.25, 0.0],
            ),
        ];
        for (name, f, want, want_g) in cases {
            let (v, g) = grad_of(f, &W);
            assert!((v - want).abs() < 1e-6, "{name}: {v} vs {want}");
            assert!(close(&g, &want_g, 1e-6), "{name}: {g:?} vs {want_g:?}");
        }
        // l1 at exactly 0: no push.
        assert_eq!(grad_of(l1, &[0.0, 2.0]).1, [0.0, 1.0]);
    }

    /// The smoothness target is the quantizer's own value: ties to even, strict thresholds, the
    /// centered binary's mean (the first version rounded ties away from zero, put every value
    /// on its nearest level whatever the threshold, and treated centered binary as ternary).
    #[test]
    fn smoothness_targets_the_quantizers_own_levels() {
        let q = |s| Quantizer::new(s, Estimator::Identity).unwrap();
        let cases = [
            // Unscaled threshold 0.7: 0.6 and -0.65 quantize to 0, not to their nearest level ±1.
            (
                q(Scheme::TernaryThreshold {
                    threshold: Threshold::Fixed(0.7),
                    scaled: false,
                }),
                vec![0.6f32, 0.8, -0.65],
                (0.6 + 0.2 + 0.65) / 3.0,
                vec![1.0 / 3.0, -1.0 / 3.0, -1.0 / 3.0],
            ),
            // 3 bits with max 3 (step 1): ties go to even, 0.5 -> 0, 1.5 -> 2, -2.5 -> -2.
            (
                q(Scheme::MultiBit { bits: 3 }),
                vec![3.0, 0.5, 1.5, -2.5],
                (0.0 + 0.5 + 0.5 + 0.5) / 4.0,
                vec![0.0, 0.25, -0.25, -0.25],
            ),
            // BitNet b1: mean 0.5, mean|w| 1.5; 0 is below the mean, so its target is -1.5.
            (
                q(Scheme::BinaryCentered),
                vec![1.0, -2.0, 0.0, 3.0],
                (0.5 + 0.5 + 1.5 + 1.5) / 4.0,
                vec![-0.25, -0.25, 0.25, 0.25],
            ),
        ];
        for (q, w, want, want_g) in cases {
            let name = format!("{:?}", q.scheme());
            let (v, g) = grad_of(|t: &Tensor| smoothness(t, &q), &w);
            assert!((v - want).abs() < 1e-6, "{name}: {v} vs {want}");
            assert!(close(&g, &want_g, 1e-6), "{name}: {g:?} vs {want_g:?}");
            // A blended quantizer still targets its fully quantized value.
            let half = q.with_lambda(0.5).unwrap();
            let (v, _) = grad_of(|t: &Tensor| smoothness(t, &half), &w);
            assert!((v - want).abs() < 1e-6, "{name} blended: {v} vs {want}");
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        // The backward treats the scale as a constant; schemes with a fixed scale (unscaled binary
        // and unscaled threshold, s = 1) make central differences of the loss comparable.
        let w = [0.3f32, -0.7, 1.6, -0.2, 0.05, 0.8];
        let qs = [
            Quantizer::new(Scheme::Binary { scaled: false }, Estimator::Identity).unwrap(),
            Quantizer::new(
                Scheme::TernaryThreshold {
                    threshold: Threshold::Fixed(0.5),
                    scaled: false,
                },
                Estimator::Identity,
            )
            .unwrap()
            .with_granularity(Granularity::PerChannel)
            .unwrap(),
        ];
        for q in qs {
            let f = |x: &[f32]| -> f64 {
                let t = Tensor::from_slice(x, (2, 3), &Device::Cpu).unwrap();
                smoothness(&t, &q).unwrap().to_scalar::<f32>().unwrap() as f64
            };
            let v = Var::from_slice(&w, (2, 3), &Device::Cpu).unwrap();
            let g = smoothness(v.as_tensor(), &q).unwrap().backward().unwrap();
            let g = g
                .get(&v)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for i in 0..w.len() {
                let h = 1e-3f32;
                let (mut a, mut b) = (w, w);
                a[i] += h;
                b[i] -= h;
                let fd = (f(&a) - f(&b)) / (2.0 * h as f64);
                assert!(
                    (fd - g[i] as f64).abs() < 1e-3,
                    "{q:?} #{i}: fd {fd} vs {}",
                    g[i]
                );
            }
        }
    }

    #[test]
    fn weight_scales_and_validates() {
        let w = Tensor::new(&[1f32, -2.0], &Device::Cpu).unwrap();
        let mut r = Regularizer::new(Penalty::L2, 0.5).unwrap();
        assert_eq!(r.loss(&[&w, &w]).unwrap().to_scalar::<f32>().unwrap(), 5.0); // 0.5 * (5 + 5)
        r.set_weight(-1.0);
        assert_eq!(r.weight(), 0.0);
        assert!(r
            .try_set_weight(f64::NAN)
            .unwrap_err()
            .to_string()
            .contains("regularization.weight"));
        let e = Regularizer::new(Penalty::BnnPlus { a: 0.0 }, 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("regularization.a"), "{e}");
    }

    /// The loss lives on its tensors' device; an empty list has none, so `loss` refuses it and
    /// `loss_on` puts the 0 where it is told (the first version returned a CPU 0, which fails
    /// to add to a GPU loss).
    #[test]
    fn the_loss_lives_on_the_tensors_device() {
        let r = Regularizer::new(Penalty::L1, 0.5).unwrap();
        let e = r.loss(&[]).unwrap_err().to_string();
        assert!(e.contains("`ws`") && e.contains("loss_on"), "{e}");
        let zero = r.loss_on(&[], &Device::Cpu).unwrap();
        assert_eq!(zero.dims(), &[] as &[usize]);
        assert_eq!(zero.dtype(), DType::F32);
        assert_eq!(zero.to_scalar::<f32>().unwrap(), 0.0);
        let w = Tensor::new(&[1f32, -2.0], &Device::Cpu).unwrap();
        let l = r.loss_on(&[&w], &Device::Cpu).unwrap();
        assert_eq!(l.to_scalar::<f32>().unwrap(), 1.5);
        assert!(l.device().same_device(w.device()));
    }
}
