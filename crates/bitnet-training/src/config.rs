//! [`QATConfig`]: what a [`QATLayer`](crate::QATLayer) quantizes and how, loadable from TOML or JSON.

use crate::error::TrainingError;
use crate::progressive::{HardnessSchedule, LambdaSchedule};
use crate::ste::STEConfig;
use bitnet_quant::{Estimator, Granularity, Quantizer, Scheme};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The quantization-aware training configuration of one layer (or of every layer).
///
/// ```
/// use bitnet_training::QATConfig;
/// let cfg = QATConfig::from_toml_str(r#"
///     weight = "TernaryAbsmean"
///     activation = "Int8PerToken"
///     [ste]
///     variant = "Clipped"
///     clipping_threshold = 1.0
///     [lambda]
///     kind = "linear"
///     steps = 1000
/// "#).unwrap();
/// assert_eq!(cfg.lambda.value(500), 0.5);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QATConfig {
    /// Weight scheme; `None` trains full-precision weights (a baseline with the same layers).
    pub weight: Option<Scheme>,
    pub weight_granularity: Granularity,
    /// Activation scheme; `None` keeps activations in full precision.
    pub activation: Option<Scheme>,
    pub activation_granularity: Granularity,
    /// The weight quantizer's backward.
    pub ste: STEConfig,
    /// Progressive blend `x + lambda (q(x) - x)` of weights and activations.
    pub lambda: LambdaSchedule,
    /// Soft-to-hard schedule of the learnable-temperature surrogate.
    pub hardness: HardnessSchedule,
}

impl Default for QATConfig {
    fn default() -> Self {
        Self::ternary()
    }
}

impl QATConfig {
    /// BitNet b1.58: absmean ternary weights per tensor, int8 per-token activations, identity STE.
    pub fn ternary() -> Self {
        Self {
            weight: Some(Scheme::TernaryAbsmean),
            weight_granularity: Granularity::PerTensor,
            activation: Some(Scheme::Int8PerToken),
            activation_granularity: Granularity::PerChannel,
            ste: STEConfig::default(),
            lambda: LambdaSchedule::default(),
            hardness: HardnessSchedule::default(),
        }
    }

    /// BitNet b1: `mean|w| * sign(w)` weights, int8 per-token activations.
    pub fn binary() -> Self {
        Self {
            weight: Some(Scheme::Binary { scaled: true }),
            ..Self::ternary()
        }
    }

    /// No quantization at all: the full-precision baseline of the same network.
    pub fn full_precision() -> Self {
        Self {
            weight: None,
            activation: None,
            ..Self::ternary()
        }
    }

    /// Parses TOML and validates.
    pub fn from_toml_str(s: &str) -> Result<Self, TrainingError> {
        let cfg: Self =
            toml::from_str(s).map_err(|e| TrainingError::Parse(format!("QATConfig TOML: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses JSON and validates.
    pub fn from_json_str(s: &str) -> Result<Self, TrainingError> {
        let cfg: Self = serde_json::from_str(s)
            .map_err(|e| TrainingError::Parse(format!("QATConfig JSON: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a `.toml` or `.json` file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, TrainingError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| TrainingError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        match path.extension().and_then(|e| e.to_str()) {
            Some("json") => Self::from_json_str(&text),
            _ => Self::from_toml_str(&text),
        }
    }

    /// TOML text that [`QATConfig::from_toml_str`] reads back.
    pub fn to_toml_string(&self) -> Result<String, TrainingError> {
        toml::to_string(self).map_err(|e| TrainingError::Parse(format!("QATConfig TOML: {e}")))
    }

    /// The weight quantizer this config describes (`None` for full precision).
    pub fn weight_quantizer(&self) -> Result<Option<Quantizer>, TrainingError> {
        self.weight
            .map(|s| {
                Quantizer::new(s, self.ste.estimator())?.with_granularity(self.weight_granularity)
            })
            .transpose()
            .map_err(TrainingError::from)
    }

    /// The activation quantizer (straight-through; `None` for full precision).
    pub fn activation_quantizer(&self) -> Result<Option<Quantizer>, TrainingError> {
        self.activation
            .map(|s| {
                Quantizer::new(s, Estimator::Identity)?
                    .with_granularity(self.activation_granularity)
            })
            .transpose()
            .map_err(TrainingError::from)
    }

    /// Checks every field; errors name the field and its allowed range.
    pub fn validate(&self) -> Result<(), TrainingError> {
        self.ste.validate()?;
        self.lambda.validate()?;
        self.hardness.validate()?;
        self.weight_quantizer()?;
        self.activation_quantizer()?;
        if self.ste.is_learnable()
            && matches!(
                self.weight,
                Some(Scheme::MultiBit { .. } | Scheme::Int8PerToken)
            )
        {
            return Err(TrainingError::InvalidConfig {
                field: "ste.variant",
                value: "Learnable".into(),
                allowed: "Standard, Clipped or Soft for multi-bit weights (Learnable needs a binary or ternary scheme)",
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_toml_and_json() {
        let mut cfg = QATConfig::binary();
        cfg.lambda = LambdaSchedule::Exponential { steps: 10, k: 2.0 };
        cfg.weight_granularity = Granularity::PerGroup(64);
        let toml_text = cfg.to_toml_string().unwrap();
        assert_eq!(QATConfig::from_toml_str(&toml_text).unwrap(), cfg);
        let json = serde_json::to_string(&cfg).unwrap();
        assert_eq!(QATConfig::from_json_str(&json).unwrap(), cfg);
    }

    #[test]
    fn rejects_bad_fields_by_name() {
        let cases = [
            ("[ste]\ntemperature = -1.0", "ste.temperature"),
            ("[lambda]\nkind = \"linear\"\nsteps = 0", "lambda.steps"),
            ("weight = { MultiBit = { bits = 12 } }", "bits"),
            ("weight_granularity = { PerGroup = 0 }", "group_size"),
            ("wieght = \"TernaryAbsmean\"", "unknown field"),
        ];
        for (text, field) in cases {
            let e = QATConfig::from_toml_str(text).unwrap_err().to_string();
            assert!(e.contains(field), "{text}: {e}");
        }
    }
}
