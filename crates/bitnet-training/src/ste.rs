//! Straight-through estimator variants as a training-facing configuration, mapped onto the
//! quantizer estimators of bitnet-quant.

use crate::error::TrainingError;
use bitnet_quant::Estimator;
use serde::{Deserialize, Serialize};

/// Which backward the weight quantizer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum STEVariant {
    /// Identity gradient (BitNet, `x + (q(x) - x).detach()`).
    Standard,
    /// Identity inside `|x / s| <= clipping_threshold`, zero outside (BinaryConnect, Larq).
    Clipped,
    /// The derivative of `tanh(temperature * x / s)`.
    Soft,
    /// A soft-to-hard surrogate whose temperature is learned (a `Var` trained by the optimizer).
    Learnable,
    /// LSQ (Esser et al. 2020): multi-bit weights whose step size per block is learned (a `Var`
    /// trained by the optimizer), with LSQ's own gradients for the weights and the steps.
    Lsq,
}

/// Which straight-through estimator a [`crate::QATLayer`] uses, and its parameters (clip,
/// temperature); serde, so it loads from a `QATConfig` file.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct STEConfig {
    pub variant: STEVariant,
    /// The clip `c` of [`STEVariant::Clipped`]; > 0.
    pub clipping_threshold: f32,
    /// The (initial) temperature of [`STEVariant::Soft`] and [`STEVariant::Learnable`]; > 0.
    pub temperature: f32,
    /// Learn the temperature (implied by [`STEVariant::Learnable`]).
    pub learnable_temperature: bool,
}

impl Default for STEConfig {
    fn default() -> Self {
        Self {
            variant: STEVariant::Standard,
            clipping_threshold: 1.0,
            temperature: 1.0,
            learnable_temperature: false,
        }
    }
}

impl STEConfig {
    /// Rejects a non-positive clip or temperature, naming the field.
    pub fn validate(&self) -> Result<(), TrainingError> {
        let check = |field, v: f32| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(TrainingError::InvalidConfig {
                    field,
                    value: v.to_string(),
                    allowed: "a finite number > 0",
                })
            }
        };
        check("ste.clipping_threshold", self.clipping_threshold)?;
        check("ste.temperature", self.temperature)
    }

    /// Whether the temperature is a trained `Var`.
    pub fn is_learnable(&self) -> bool {
        self.variant == STEVariant::Learnable || self.learnable_temperature
    }

    /// Whether the weight's step sizes are trained `Var`s (LSQ).
    pub fn is_lsq(&self) -> bool {
        self.variant == STEVariant::Lsq
    }

    /// The quantizer estimator for the non-learnable variants (the learnable one replaces the
    /// quantize op by the surrogate op altogether and uses this as its hard part's backward;
    /// LSQ has its own backward).
    pub fn estimator(&self) -> Estimator {
        match self.variant {
            STEVariant::Standard | STEVariant::Learnable | STEVariant::Lsq => Estimator::Identity,
            STEVariant::Clipped => Estimator::Clipped {
                clip: self.clipping_threshold,
            },
            STEVariant::Soft => Estimator::SoftTanh {
                temperature: self.temperature,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_map_to_estimators() {
        let c = |variant| STEConfig {
            variant,
            clipping_threshold: 0.5,
            temperature: 3.0,
            learnable_temperature: false,
        };
        let cases = [
            (STEVariant::Standard, Estimator::Identity, false),
            (STEVariant::Clipped, Estimator::Clipped { clip: 0.5 }, false),
            (
                STEVariant::Soft,
                Estimator::SoftTanh { temperature: 3.0 },
                false,
            ),
            (STEVariant::Learnable, Estimator::Identity, true),
            (STEVariant::Lsq, Estimator::Identity, false),
        ];
        for (v, e, learn) in cases {
            assert_eq!(c(v).estimator(), e);
            assert_eq!(c(v).is_learnable(), learn);
            assert_eq!(c(v).is_lsq(), v == STEVariant::Lsq);
        }
        let bad = STEConfig {
            temperature: 0.0,
            ..STEConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("ste.temperature"));
    }
}
