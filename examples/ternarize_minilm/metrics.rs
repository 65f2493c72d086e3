//! How close a student's sentence embeddings are to the teacher's.

use bitnet::training::distillation::neighbour_agreement;
use candle_core::{Result, Tensor};

/// The fidelity figures of one evaluation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Fidelity {
    /// Mean cosine between student and teacher embeddings of the same line.
    pub cosine: f64,
    /// Share of lines whose nearest other line is the same for student and teacher.
    pub top1: f64,
    /// Share of lines whose nearest other line by the teacher is among the student's 5 nearest.
    pub top5: f64,
}

impl Fidelity {
    /// Compares L2-normalised embeddings `[n, hidden]` of the same lines (n > 5).
    pub fn measure(student: &Tensor, teacher: &Tensor) -> Result<Self> {
        let cosine = (student * teacher)?
            .sum(1)?
            .mean_all()?
            .to_scalar::<f32>()? as f64;
        Ok(Self {
            cosine,
            top1: neighbour_agreement(student, teacher, 1)?,
            top5: neighbour_agreement(student, teacher, 5)?,
        })
    }

    /// The figures as JSON fields, rounded to 4 decimals.
    pub fn json(&self) -> serde_json::Value {
        let r = |v: f64| (v * 1e4).round() / 1e4;
        serde_json::json!({ "cosine": r(self.cosine), "top1": r(self.top1), "top5": r(self.top5) })
    }
}
