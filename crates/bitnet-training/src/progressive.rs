//! Progressive quantization: schedules that move a layer from full precision to quantized.
//!
//! * [`LambdaSchedule`]: the blend `y = x + lambda (q(x) - x)` of the Hugging Face 1.58-bit
//!   fine-tuning recipe, `lambda` from 0 to 1 over a warmup.
//! * [`HardnessSchedule`]: how hard the learnable-temperature surrogate is (0 soft, 1 hard).

use crate::error::TrainingError;
use serde::{Deserialize, Serialize};

fn invalid(field: &'static str, value: impl ToString, allowed: &'static str) -> TrainingError {
    TrainingError::InvalidConfig {
        field,
        value: value.to_string(),
        allowed,
    }
}

/// `lambda(step)` for the progressive blend; `t = min(step / steps, 1)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LambdaSchedule {
    /// The same `value` at every step (1 = plain quantization-aware training).
    Constant { value: f32 },
    /// `t`.
    Linear { steps: usize },
    /// `1 - (1 - t)^k`: fast at first, then gently into full quantization.
    Exponential { steps: usize, k: f32 },
    /// `sigmoid(k (t - 1/2))`, rescaled so that it is exactly 0 at `t = 0` and 1 at `t = 1`.
    Sigmoid { steps: usize, k: f32 },
    /// 0 before `steps`, 1 from then on.
    Step { steps: usize },
}

impl Default for LambdaSchedule {
    fn default() -> Self {
        LambdaSchedule::Constant { value: 1.0 }
    }
}

impl LambdaSchedule {
    /// Rejects values outside `[0, 1]`, zero-length warmups and non-positive shapes.
    pub fn validate(&self) -> Result<(), TrainingError> {
        match *self {
            LambdaSchedule::Constant { value } if !(0.0..=1.0).contains(&value) => {
                Err(invalid("lambda.value", value, "0.0..=1.0"))
            }
            LambdaSchedule::Linear { steps }
            | LambdaSchedule::Exponential { steps, .. }
            | LambdaSchedule::Sigmoid { steps, .. }
            | LambdaSchedule::Step { steps }
                if steps == 0 =>
            {
                Err(invalid("lambda.steps", steps, "an integer >= 1"))
            }
            LambdaSchedule::Exponential { k, .. } | LambdaSchedule::Sigmoid { k, .. }
                if !(k.is_finite() && k > 0.0) =>
            {
                Err(invalid("lambda.k", k, "a finite number > 0"))
            }
            _ => Ok(()),
        }
    }

    /// `lambda` at `step`, in `[0, 1]`.
    pub fn value(&self, step: usize) -> f32 {
        let t = |steps: usize| (step as f32 / steps as f32).min(1.0);
        match *self {
            LambdaSchedule::Constant { value } => value,
            LambdaSchedule::Linear { steps } => t(steps),
            LambdaSchedule::Exponential { steps, k } => 1.0 - (1.0 - t(steps)).powf(k),
            LambdaSchedule::Sigmoid { steps, k } => {
                let s = |z: f32| 1.0 / (1.0 + (-k * (z - 0.5)).exp());
                ((s(t(steps)) - s(0.0)) / (s(1.0) - s(0.0))).clamp(0.0, 1.0)
            }
            LambdaSchedule::Step { steps } => (step >= steps) as u8 as f32,
        }
    }
}

/// Hardness of the learnable surrogate: linear from `start` to 1 over `steps`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HardnessSchedule {
    pub start: f32,
    pub steps: usize,
}

impl Default for HardnessSchedule {
    fn default() -> Self {
        Self {
            start: 0.0,
            steps: 1000,
        }
    }
}

impl HardnessSchedule {
    /// Rejects a start outside `[0, 1]`.
    pub fn validate(&self) -> Result<(), TrainingError> {
        if !(0.0..=1.0).contains(&self.start) {
            return Err(invalid("hardness.start", self.start, "0.0..=1.0"));
        }
        Ok(())
    }

    /// Hardness at `step`.
    pub fn value(&self, step: usize) -> f32 {
        if self.steps == 0 {
            return 1.0;
        }
        let t = (step as f32 / self.steps as f32).min(1.0);
        self.start + (1.0 - self.start) * t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lambda_shapes_at_hand_picked_steps() {
        let s1 = |z: f32| 1.0 / (1.0 + (-4.0 * (z - 0.5)).exp());
        let sig_mid = (s1(0.5) - s1(0.0)) / (s1(1.0) - s1(0.0)); // = 0.5 by symmetry
        let cases = [
            (LambdaSchedule::Constant { value: 0.3 }, 7, 0.3),
            (LambdaSchedule::Linear { steps: 100 }, 0, 0.0),
            (LambdaSchedule::Linear { steps: 100 }, 25, 0.25),
            (LambdaSchedule::Linear { steps: 100 }, 1000, 1.0),
            (LambdaSchedule::Exponential { steps: 100, k: 2.0 }, 50, 0.75),
            (LambdaSchedule::Exponential { steps: 100, k: 3.0 }, 100, 1.0),
            (LambdaSchedule::Sigmoid { steps: 10, k: 4.0 }, 5, sig_mid),
            (LambdaSchedule::Sigmoid { steps: 10, k: 4.0 }, 0, 0.0),
            (LambdaSchedule::Sigmoid { steps: 10, k: 4.0 }, 10, 1.0),
            (LambdaSchedule::Step { steps: 10 }, 9, 0.0),
            (LambdaSchedule::Step { steps: 10 }, 10, 1.0),
        ];
        for (s, step, want) in cases {
            assert!(
                (s.value(step) - want).abs() < 1e-6,
                "{s:?} at {step}: {}",
                s.value(step)
            );
        }
        assert!((sig_mid - 0.5).abs() < 1e-6);
        assert!(LambdaSchedule::Linear { steps: 0 }
            .validate()
            .unwrap_err()
            .to_string()
            .contains("lambda.steps"));
        assert!(LambdaSchedule::Constant { value: 2.0 }.validate().is_err());
        assert_eq!(
            HardnessSchedule {
                start: 0.2,
                steps: 10
            }
            .value(5),
            0.6
        );
    }
}
