//! Progressive quantization: schedules that move a layer from full precision to quantized.
//!
//! * [`LambdaSchedule`]: the blend `y = x + lambda (q(x) - x)` of the Hugging Face 1.58-bit
//!   fine-tuning recipe, `lambda` from 0 to 1 over a warmup.
//! * [`HardnessSchedule`]: how hard the learnable-temperature surrogate is (0 soft, 1 hard).
//! * [`BitSchedule`]: bit-width reduction, e.g. 8 -> 4 -> 2 bits -> ternary at given steps.
//! * [`TemperatureAnneal`]: IR-Net's soft-to-hard annealing of `k tanh(t x)`.

use crate::error::TrainingError;
use bitnet_quant::Scheme;
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

/// One stage of a [`BitSchedule`]: `scheme` from step `from_step` on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BitStage {
    /// The first step of this stage.
    pub from_step: usize,
    /// The weight scheme of this stage.
    pub scheme: Scheme,
}

/// Bit-width reduction: the weight scheme steps down at given training steps (e.g. 8-bit, then
/// 4-bit, 2-bit, and ternary), so that the latent weights adapt to each coarser grid in turn.
///
/// Stored in a fixed array of at most [`BitSchedule::MAX_STAGES`] stages so that the schedule (and
/// [`QATConfig`](crate::QATConfig), which holds one) stays `Copy`; it serializes as a list of
/// stages.
///
/// ```
/// use bitnet_quant::Scheme;
/// use bitnet_training::progressive::BitSchedule;
/// let s = BitSchedule::new(&[
///     (0, Scheme::MultiBit { bits: 8 }),
///     (100, Scheme::MultiBit { bits: 4 }),
///     (200, Scheme::MultiBit { bits: 2 }),
///     (300, Scheme::TernaryAbsmean),
/// ]).unwrap();
/// assert_eq!(s.scheme_at(150), Scheme::MultiBit { bits: 4 });
/// assert_eq!(s.scheme_at(10_000), Scheme::TernaryAbsmean);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Vec<BitStage>", into = "Vec<BitStage>")]
pub struct BitSchedule {
    stages: [BitStage; BitSchedule::MAX_STAGES],
    len: usize,
}

impl BitSchedule {
    /// The most stages a schedule holds (8-bit down to binary is at most 8 distinct widths).
    pub const MAX_STAGES: usize = 8;

    /// A schedule from `(from_step, scheme)` pairs. The first stage starts at step 0, steps
    /// strictly increase, there are 1 to [`Self::MAX_STAGES`] stages, and every scheme is valid.
    pub fn new(stages: &[(usize, Scheme)]) -> Result<Self, TrainingError> {
        let v: Vec<BitStage> = stages
            .iter()
            .map(|&(from_step, scheme)| BitStage { from_step, scheme })
            .collect();
        Self::try_from(v)
    }

    /// The stages in order.
    pub fn stages(&self) -> &[BitStage] {
        &self.stages[..self.len]
    }

    /// The scheme in force at `step`: that of the last stage starting at or before it.
    pub fn scheme_at(&self, step: usize) -> Scheme {
        self.stages()
            .iter()
            .rev()
            .find(|s| s.from_step <= step)
            .unwrap_or(&self.stages[0])
            .scheme
    }

    /// Checks the invariants of [`BitSchedule::new`] (also run when deserializing).
    pub fn validate(&self) -> Result<(), TrainingError> {
        let stages = self.stages();
        if stages.is_empty() || stages.len() > Self::MAX_STAGES {
            return Err(invalid("bit_schedule", stages.len(), "1..=8 stages"));
        }
        if stages[0].from_step != 0 {
            return Err(invalid(
                "bit_schedule.from_step",
                stages[0].from_step,
                "0 for the first stage",
            ));
        }
        for w in stages.windows(2) {
            if w[1].from_step <= w[0].from_step {
                return Err(invalid(
                    "bit_schedule.from_step",
                    format!("{} after {}", w[1].from_step, w[0].from_step),
                    "strictly increasing steps",
                ));
            }
        }
        for s in stages {
            s.scheme
                .validate()
                .map_err(|e| invalid("bit_schedule.scheme", e, "a valid scheme"))?;
        }
        Ok(())
    }
}

impl TryFrom<Vec<BitStage>> for BitSchedule {
    type Error = TrainingError;

    fn try_from(v: Vec<BitStage>) -> Result<Self, TrainingError> {
        if v.is_empty() || v.len() > Self::MAX_STAGES {
            return Err(invalid("bit_schedule", v.len(), "1..=8 stages"));
        }
        let mut stages = [v[0]; Self::MAX_STAGES];
        stages[..v.len()].copy_from_slice(&v);
        let s = Self {
            stages,
            len: v.len(),
        };
        s.validate()?;
        Ok(s)
    }
}

impl From<BitSchedule> for Vec<BitStage> {
    fn from(s: BitSchedule) -> Self {
        s.stages().to_vec()
    }
}

/// IR-Net's error-decay estimator schedule (Qin et al. 2020): at epoch (or step) `e` of `E`,
/// `t = t_min * 10^(e / E * log10(t_max / t_min))` and `k = max(1 / t, 1)`; the binarizer's
/// surrogate is `k tanh(t x)`, soft (close to identity) at first and close to `sign` at the end.
/// [`QATConfig::temperature_anneal`](crate::QATConfig::temperature_anneal) trains with it: the
/// weight quantizer's backward at step `e` is `Estimator::Ede { temperature: t(e) }`, the
/// derivative `k t (1 - tanh(t x)^2)` of that surrogate.
///
/// ```
/// use bitnet_training::progressive::TemperatureAnneal;
/// let a = TemperatureAnneal::new(0.1, 10.0, 100).unwrap();
/// assert!((a.t(50) - 1.0).abs() < 1e-6);  // halfway on a log scale from 0.1 to 10
/// assert!((a.k(0) - 10.0).abs() < 1e-4);  // k = 1 / t while t < 1
/// assert_eq!(a.k(100), 1.0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemperatureAnneal {
    /// `T_min > 0` (IR-Net: 0.1).
    pub t_min: f64,
    /// `T_max >= T_min` (IR-Net: 10).
    pub t_max: f64,
    /// `E`, the number of epochs or steps of the anneal; `>= 1`.
    pub total: usize,
}

impl TemperatureAnneal {
    /// A validated anneal.
    pub fn new(t_min: f64, t_max: f64, total: usize) -> Result<Self, TrainingError> {
        let a = Self {
            t_min,
            t_max,
            total,
        };
        a.validate()?;
        Ok(a)
    }

    /// Rejects `t_min <= 0`, `t_max < t_min`, non-finite values and `total = 0`, naming the field.
    pub fn validate(&self) -> Result<(), TrainingError> {
        if !(self.t_min.is_finite() && self.t_min > 0.0) {
            return Err(invalid(
                "temperature_anneal.t_min",
                self.t_min,
                "a finite number > 0",
            ));
        }
        if !(self.t_max.is_finite() && self.t_max >= self.t_min) {
            return Err(invalid(
                "temperature_anneal.t_max",
                self.t_max,
                "a finite number >= t_min",
            ));
        }
        if self.total == 0 {
            return Err(invalid("temperature_anneal.total", 0, "an integer >= 1"));
        }
        Ok(())
    }

    /// `t` at `e` (clamped to `E`).
    pub fn t(&self, e: usize) -> f64 {
        let frac = e.min(self.total) as f64 / self.total as f64;
        self.t_min * 10f64.powf(frac * (self.t_max / self.t_min).log10())
    }

    /// `k = max(1 / t, 1)` at `e`.
    pub fn k(&self, e: usize) -> f64 {
        (1.0 / self.t(e)).max(1.0)
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

    #[test]
    fn bit_schedule_steps_down_and_validates() {
        let b8 = Scheme::MultiBit { bits: 8 };
        let b4 = Scheme::MultiBit { bits: 4 };
        let b2 = Scheme::MultiBit { bits: 2 };
        let s =
            BitSchedule::new(&[(0, b8), (10, b4), (20, b2), (30, Scheme::TernaryAbsmean)]).unwrap();
        let cases = [
            (0, b8),
            (9, b8),
            (10, b4),
            (19, b4),
            (20, b2),
            (29, b2),
            (30, Scheme::TernaryAbsmean),
            (99, Scheme::TernaryAbsmean),
        ];
        for (step, want) in cases {
            assert_eq!(s.scheme_at(step), want, "step {step}");
        }
        let bad = [
            (vec![(0, b8), (10, b4), (10, b2)], "bit_schedule.from_step"),
            (vec![(0, b8), (20, b4), (10, b2)], "bit_schedule.from_step"),
            (vec![(5, b8)], "bit_schedule.from_step"),
            (vec![], "bit_schedule"),
            (vec![(0, Scheme::MultiBit { bits: 9 })], "bits"),
            (vec![(0, b8); 9], "bit_schedule"),
        ];
        for (stages, field) in bad {
            let e = BitSchedule::new(&stages).unwrap_err().to_string();
            assert!(e.contains(field), "{stages:?}: {e}");
        }
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.starts_with("[{\"from_step\":0"), "{json}");
        assert_eq!(serde_json::from_str::<BitSchedule>(&json).unwrap(), s);
        assert!(serde_json::from_str::<BitSchedule>(
            r#"[{"from_step":3,"scheme":"TernaryAbsmean"}]"#
        )
        .is_err());
    }

    #[test]
    fn irnet_anneal_matches_the_formula() {
        // T_min = 0.1, T_max = 10, E = 100: t = 0.1 * 10^(2 e / 100) = 10^(e / 50 - 1).
        let a = TemperatureAnneal::new(0.1, 10.0, 100).unwrap();
        let cases = [
            (0, 0.1, 10.0),
            (25, 0.316_227_766, 3.162_277_66),
            (50, 1.0, 1.0),
            (75, 3.162_277_66, 1.0),
            (100, 10.0, 1.0),
            (500, 10.0, 1.0),
        ];
        for (e, t, k) in cases {
            assert!((a.t(e) - t).abs() < 1e-8, "t({e}) = {}", a.t(e));
            assert!((a.k(e) - k).abs() < 1e-7, "k({e}) = {}", a.k(e));
        }
        let bad = [
            (0.0, 1.0, 1, "anneal.t_min"),
            (1.0, 0.5, 1, "anneal.t_max"),
            (0.1, 1.0, 0, "anneal.total"),
        ];
        for (lo, hi, n, field) in bad {
            assert!(TemperatureAnneal::new(lo, hi, n)
                .unwrap_err()
                .to_string()
                .contains(field));
        }
    }
}
