//! Knowledge distillation from a full-precision teacher into a quantized student.
//!
//! * [`kd_loss`]: Hinton et al. 2015, `(1 - a) CE(y, s) + a T^2 KL(softmax(t / T) || softmax(s / T))`.
//! * [`feature_loss`]: mean squared error between student and teacher hidden states.
//! * [`relation_loss`]: KL between student and teacher in-batch similarity distributions
//!   (each embedding's softmax over its similarities to the others).
//! * [`neighbour_agreement`]: how often the teacher's nearest neighbour of each embedding is
//!   among the student's `k` nearest (retrieval fidelity, not a loss).
//! * [`Distiller`]: runs a frozen teacher beside the student and combines both losses.
//!
//! The teacher's outputs are always detached, so no gradient reaches the teacher's variables and
//! an optimizer over all variables would leave it unchanged. Softmaxes use
//! `candle_nn::ops::{softmax, log_softmax}` along the last dimension, which backpropagate
//! (`softmax_last_dim` does not).

use crate::error::TrainingError;
use candle_core::{Module, Result, Tensor, D};
use candle_nn::ops::{log_softmax, softmax};

fn check(field: &'static str, value: f64, ok: bool, allowed: &'static str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(TrainingError::InvalidConfig {
            field,
            value: value.to_string(),
            allowed,
        }
        .into())
    }
}

/// `KL(softmax(t / T) || softmax(s / T))` summed over classes and averaged over the batch
/// (PyTorch's `batchmean`), for logits `[batch, classes]`. The teacher is detached.
pub fn kl_divergence(
    student_logits: &Tensor,
    teacher_logits: &Tensor,
    temperature: f64,
) -> Result<Tensor> {
    check(
        "temperature",
        temperature,
        temperature.is_finite() && temperature > 0.0,
        "a finite number > 0",
    )?;
    if student_logits.dims() != teacher_logits.dims() || student_logits.rank() != 2 {
        return Err(candle_core::Error::ShapeMismatchBinaryOp {
            lhs: student_logits.shape().clone(),
            rhs: teacher_logits.shape().clone(),
            op: "kl_divergence (both [batch, classes])",
        });
    }
    let inv_t = 1.0 / temperature;
    let log_ps = log_softmax(&student_logits.affine(inv_t, 0.0)?, D::Minus1)?;
    let t = teacher_logits.detach().affine(inv_t, 0.0)?;
    let log_pt = log_softmax(&t, D::Minus1)?;
    let pt = softmax(&t, D::Minus1)?;
    let batch = student_logits.dim(0)? as f64;
    (pt * (log_pt - log_ps)?)?
        .sum_all()?
        .affine(1.0 / batch, 0.0)
}

/// Hinton's distillation loss for logits `[batch, classes]` and `u32` / `i64` labels `[batch]`:
/// `(1 - alpha) CE(labels, s) + alpha T^2 KL(softmax(t / T) || softmax(s / T))`.
///
/// The `T^2` keeps the soft term's gradient magnitude independent of `T`. `temperature > 0`,
/// `alpha` in `[0, 1]`; the teacher's logits are detached.
///
/// ```
/// use bitnet_training::distillation::kd_loss;
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let s = Tensor::new(&[[0f32, 3f32.ln()]], &Device::Cpu)?; // softmax = [1/4, 3/4]
/// let t = Tensor::new(&[[0f32, 0.0]], &Device::Cpu)?;       // softmax = [1/2, 1/2]
/// let y = Tensor::new(&[1u32], &Device::Cpu)?;
/// // alpha = 1, T = 1: KL = 1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4) = 1/2 ln(4/3).
/// let l = kd_loss(&s, &t, 1.0, 1.0, &y)?.to_scalar::<f32>()?;
/// assert!((l - 0.5 * (4f32 / 3.0).ln()).abs() < 1e-6);
/// # Ok(()) }
/// ```
pub fn kd_loss(
    student_logits: &Tensor,
    teacher_logits: &Tensor,
    temperature: f64,
    alpha: f64,
    labels: &Tensor,
) -> Result<Tensor> {
    check("alpha", alpha, (0.0..=1.0).contains(&alpha), "0.0..=1.0")?;
    let kl = kl_divergence(student_logits, teacher_logits, temperature)?;
    // One node instead of candle-nn's nll(log_softmax(s, 1)); the same value and gradient.
    let ce = crate::loss::cross_entropy(student_logits, labels)?;
    ce.affine(1.0 - alpha, 0.0)? + kl.affine(alpha * temperature * temperature, 0.0)?
}

/// `mean((student - teacher)^2)` between hidden states of the same shape; the teacher is
/// detached.
///
/// ```
/// use bitnet_training::distillation::feature_loss;
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let s = Tensor::new(&[[1f32, 2.0]], &Device::Cpu)?;
/// let t = Tensor::new(&[[0f32, 4.0]], &Device::Cpu)?;
/// assert_eq!(feature_loss(&s, &t)?.to_scalar::<f32>()?, 2.5); // (1 + 4) / 2
/// # Ok(()) }
/// ```
pub fn feature_loss(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    if student.dims() != teacher.dims() {
        return Err(candle_core::Error::ShapeMismatchBinaryOp {
            lhs: student.shape().clone(),
            rhs: teacher.shape().clone(),
            op: "feature_loss",
        });
    }
    candle_nn::loss::mse(student, &teacher.detach())
}

/// Relation distillation over a batch of embeddings `[batch, dim]`: for each row, the softmax of
/// its similarities (dot products) to the *other* rows at `temperature`, student against
/// teacher, as [`kl_divergence`] (averaged over rows). The teacher is detached.
///
/// Matching each embedding to its target alone (`1 - cos`) leaves the errors free to reorder
/// neighbours; this term puts the batch's neighbourhood structure, which nearest-neighbour
/// search reads, into the loss. With L2-normalised embeddings a temperature of about 0.05 makes
/// the closest neighbours dominate. The diagonal (each row's similarity to itself) is excluded.
///
/// ```
/// use bitnet_training::distillation::relation_loss;
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let t = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [1.0, 1.0]], &dev)?;
/// assert!(relation_loss(&t, &t, 1.0)?.to_scalar::<f32>()?.abs() < 1e-6);
/// // Rows 0 and 1 collapse onto each other: their neighbourhoods change, the loss sees it.
/// let s = Tensor::new(&[[1f32, 0.0], [1.0, 0.0], [1.0, 1.0]], &dev)?;
/// assert!(relation_loss(&s, &t, 1.0)?.to_scalar::<f32>()? > 0.05);
/// # Ok(()) }
/// ```
pub fn relation_loss(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    if student.dims() != teacher.dims() || student.rank() != 2 || student.dim(0)? < 2 {
        return Err(candle_core::Error::ShapeMismatchBinaryOp {
            lhs: student.shape().clone(),
            rhs: teacher.shape().clone(),
            op: "relation_loss (both [batch >= 2, dim])",
        });
    }
    let n = student.dim(0)?;
    // A large finite value rather than -inf: 0 * -inf would be NaN in the KL's p * log p terms.
    let diagonal = (Tensor::eye(n, student.dtype(), student.device())? * 1e4)?;
    let logits = |e: &Tensor| e.matmul(&e.t()?)? - &diagonal;
    kl_divergence(&logits(student)?, &logits(&teacher.detach())?, temperature)
}

/// The share of rows whose nearest other row by the teacher (highest dot product) is among the
/// `k` nearest other rows by the student: top-`k` retrieval agreement of embeddings
/// `[n, dim]` (rows L2-normalised for cosine retrieval). `k = 1` asks for the same nearest
/// neighbour. Rows scoring exactly as high as the teacher's neighbour do not push it out.
///
/// Errors: shapes that differ or are not `[n, dim]`, and `k` outside `1..n`, naming them.
///
/// ```
/// use bitnet_training::distillation::neighbour_agreement;
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let t = Tensor::new(&[[1f32, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], &dev)?;
/// // Row 0 moves next to rows 2 and 3 in the student: its nearest by the teacher, 1, drops to 3rd.
/// let s = Tensor::new(&[[0.2f32, 1.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], &dev)?;
/// assert_eq!(neighbour_agreement(&t, &t, 1)?, 1.0);
/// assert!(neighbour_agreement(&s, &t, 1)? < 1.0);
/// assert_eq!(neighbour_agreement(&s, &t, 3)?, 1.0); // 3 of 3 others
/// # Ok(()) }
/// ```
pub fn neighbour_agreement(student: &Tensor, teacher: &Tensor, k: usize) -> Result<f64> {
    if student.dims() != teacher.dims() || student.rank() != 2 {
        return Err(candle_core::Error::ShapeMismatchBinaryOp {
            lhs: student.shape().clone(),
            rhs: teacher.shape().clone(),
            op: "neighbour_agreement (both [n, dim])",
        });
    }
    let n = student.dim(0)?;
    check(
        "k",
        k as f64,
        k >= 1 && k < n,
        "1..n (n rows, each has n - 1 others)",
    )?;
    let sims = |e: &Tensor| -> Result<Vec<Vec<f32>>> {
        e.to_dtype(candle_core::DType::F32)?
            .matmul(&e.to_dtype(candle_core::DType::F32)?.t()?)?
            .to_vec2()
    };
    let (s, t) = (sims(student)?, sims(teacher)?);
    let mut agree = 0;
    for (i, (srow, trow)) in s.iter().zip(&t).enumerate() {
        let nearest = (0..n)
            .filter(|&j| j != i)
            .fold(None, |b: Option<usize>, j| match b {
                Some(b) if trow[b] >= trow[j] => Some(b),
                _ => Some(j),
            })
            .expect("k < n leaves at least one other row");
        let above = (0..n)
            .filter(|&j| j != i && srow[j] > srow[nearest])
            .count();
        agree += (above < k) as usize;
    }
    Ok(agree as f64 / n as f64)
}

/// A frozen teacher and the distillation hyper-parameters.
///
/// ```
/// use bitnet_training::distillation::Distiller;
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{linear, VarBuilder, VarMap};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let (tvm, svm) = (VarMap::new(), VarMap::new());
/// let teacher = linear(4, 3, VarBuilder::from_varmap(&tvm, DType::F32, &dev))?;
/// let student = linear(4, 3, VarBuilder::from_varmap(&svm, DType::F32, &dev))?;
/// let d = Distiller::new(teacher, 2.0, 0.5)?;
/// let x = Tensor::randn(0f32, 1.0, (8, 4), &dev)?;
/// let y = Tensor::new(&[0u32, 1, 2, 0, 1, 2, 0, 1], &dev)?;
/// let loss = d.loss(&x, &student.forward(&x)?, &y)?;
/// let grads = loss.backward()?;
/// assert!(tvm.all_vars().iter().all(|v| grads.get(v).is_none())); // the teacher stays frozen
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Distiller<T> {
    teacher: T,
    temperature: f64,
    alpha: f64,
}

impl<T: Module> Distiller<T> {
    /// A distiller; `temperature > 0`, `alpha` in `[0, 1]` (see [`kd_loss`]).
    pub fn new(teacher: T, temperature: f64, alpha: f64) -> Result<Self> {
        check(
            "temperature",
            temperature,
            temperature.is_finite() && temperature > 0.0,
            "a finite number > 0",
        )?;
        check("alpha", alpha, (0.0..=1.0).contains(&alpha), "0.0..=1.0")?;
        Ok(Self {
            teacher,
            temperature,
            alpha,
        })
    }

    /// The teacher.
    pub fn teacher(&self) -> &T {
        &self.teacher
    }

    /// The temperature `T`.
    pub fn temperature(&self) -> f64 {
        self.temperature
    }

    /// The weight `alpha` of the soft term.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// Changes `alpha` (e.g. from a schedule); must be in `[0, 1]`.
    pub fn set_alpha(&mut self, alpha: f64) -> Result<()> {
        check("alpha", alpha, (0.0..=1.0).contains(&alpha), "0.0..=1.0")?;
        self.alpha = alpha;
        Ok(())
    }

    /// The teacher's output on `x`, detached: a constant for the student's backward.
    pub fn teacher_logits(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.teacher.forward(x)?.detach())
    }

    /// [`kd_loss`] of the student's logits on `x` against the teacher's.
    pub fn loss(&self, x: &Tensor, student_logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let t = self.teacher_logits(x)?;
        kd_loss(student_logits, &t, self.temperature, self.alpha, labels)
    }
}

#[cfg(test)]
mod tests;
