//! [`QATConfig`]: what a [`QATLayer`](crate::QATLayer) quantizes and how, loadable from TOML or JSON.

use crate::error::TrainingError;
use crate::progressive::{BitSchedule, HardnessSchedule, LambdaSchedule, TemperatureAnneal};
use crate::ste::{STEConfig, STEVariant};
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
    /// Bit-width reduction: when set, it decides the weight scheme at every step (and `weight` is
    /// not used), e.g. 8-bit, then 4-bit, then ternary. `None` keeps `weight` throughout.
    pub bit_schedule: Option<BitSchedule>,
    /// IR-Net's temperature anneal for `ste.variant = Soft`: the weight quantizer's backward at
    /// step `k` is the error-decay estimator [`Estimator::Ede`] at temperature `t(k)` (in place
    /// of `SoftTanh` at `ste.temperature`), soft at first and close to `sign`'s at the end.
    pub temperature_anneal: Option<TemperatureAnneal>,
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
            bit_schedule: None,
            temperature_anneal: None,
        }
    }

    /// BitNet b1.58 as Hugging Face transformers computes it ([`Scheme::TernaryAbsmeanHf`]:
    /// scale `1 / max(mean|w|, 1e-5)`, multiplied), int8 per-token activations: what a model
    /// loaded from a transformers `BitNetForCausalLM` checkpoint trains with, so that its forward
    /// is transformers' `AutoBitLinear` bit for bit.
    pub fn ternary_hf() -> Self {
        Self {
            weight: Some(Scheme::TernaryAbsmeanHf),
            ..Self::ternary()
        }
    }

    /// BitNet b1: `mean|w| * sign(w - mean(w))` weights ([`Scheme::BinaryCentered`]), int8
    /// per-token activations, identity STE. The uncentered XNOR-Net form is
    /// `weight: Some(Scheme::Binary { scaled: true })`.
    pub fn binary() -> Self {
        Self {
            weight: Some(Scheme::BinaryCentered),
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

    /// The weight quantizer this config describes at step 0 (`None` for full precision); see
    /// [`QATConfig::weight_quantizer_at`] for the schedules.
    pub fn weight_quantizer(&self) -> Result<Option<Quantizer>, TrainingError> {
        self.weight
            .map(|s| self.quantizer(s, self.estimator_at(0)))
            .transpose()
    }

    fn quantizer(&self, scheme: Scheme, estimator: Estimator) -> Result<Quantizer, TrainingError> {
        Ok(Quantizer::new(scheme, estimator)?.with_granularity(self.weight_granularity)?)
    }

    /// The weight quantizer's backward at `step`: the STE's, or the annealed error-decay
    /// estimator when [`QATConfig::temperature_anneal`] is set.
    pub fn estimator_at(&self, step: usize) -> Estimator {
        match &self.temperature_anneal {
            Some(a) => Estimator::Ede {
                temperature: a.t(step) as f32,
            },
            None => self.ste.estimator(),
        }
    }

    /// Whether the weight quantizer changes with the step (a bit schedule or a temperature
    /// anneal), so that [`QATConfig::weight_quantizer_at`] must be asked at every step.
    pub fn is_scheduled(&self) -> bool {
        self.bit_schedule.is_some() || self.temperature_anneal.is_some()
    }

    /// The weight scheme at `step`: the bit schedule's if there is one, else `weight`.
    pub fn weight_scheme_at(&self, step: usize) -> Option<Scheme> {
        match &self.bit_schedule {
            Some(b) => Some(b.scheme_at(step)),
            None => self.weight,
        }
    }

    /// The weight quantizer at `step` (scheme from [`QATConfig::weight_scheme_at`], backward
    /// from [`QATConfig::estimator_at`]); `None` for full precision.
    pub fn weight_quantizer_at(&self, step: usize) -> Result<Option<Quantizer>, TrainingError> {
        self.weight_scheme_at(step)
            .map(|s| self.quantizer(s, self.estimator_at(step)))
            .transpose()
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
        // Before the quantizers: their estimator comes from the anneal.
        if let Some(a) = &self.temperature_anneal {
            a.validate()?;
            if self.ste.variant != STEVariant::Soft || self.ste.learnable_temperature {
                return Err(TrainingError::InvalidConfig {
                    field: "temperature_anneal",
                    value: format!("{a:?} with ste.variant = {:?}", self.ste.variant),
                    allowed:
                        "an anneal only with ste.variant = Soft (and no learnable_temperature)",
                });
            }
        }
        self.weight_quantizer()?;
        self.activation_quantizer()?;
        let mut schemes: Vec<Option<Scheme>> = vec![self.weight];
        if let Some(b) = &self.bit_schedule {
            b.validate()?;
            schemes = b.stages().iter().map(|s| Some(s.scheme)).collect();
        }
        let multi_bit = schemes
            .iter()
            .any(|s| matches!(s, Some(Scheme::MultiBit { .. } | Scheme::Int8PerToken)));
        if self.ste.is_learnable() && multi_bit {
            return Err(TrainingError::InvalidConfig {
                field: "ste.variant",
                value: "Learnable".into(),
                allowed: "Standard, Clipped, Soft or Lsq for multi-bit weights (Learnable needs a binary or ternary scheme)",
            });
        }
        if self.ste.is_lsq() {
            let multi_bit_weight = matches!(self.weight, Some(Scheme::MultiBit { .. }));
            if !multi_bit_weight || self.bit_schedule.is_some() || self.ste.learnable_temperature {
                return Err(TrainingError::InvalidConfig {
                    field: "ste.variant",
                    value: "Lsq".into(),
                    allowed: "Lsq with a MultiBit weight scheme, no bit_schedule and no learnable_temperature",
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cfg` reads back equal from its TOML and from its JSON.
    fn assert_round_trips(cfg: &QATConfig) {
        let toml_text = cfg.to_toml_string().unwrap();
        let back = QATConfig::from_toml_str(&toml_text).unwrap();
        assert_eq!(&back, cfg, "{toml_text}");
        let json = serde_json::to_string(cfg).unwrap();
        assert_eq!(&QATConfig::from_json_str(&json).unwrap(), cfg, "{json}");
    }

    #[test]
    fn round_trips_through_toml_and_json() {
        let mut cfg = QATConfig::binary();
        cfg.lambda = LambdaSchedule::Exponential { steps: 10, k: 2.0 };
        cfg.weight_granularity = Granularity::PerGroup(64);
        assert_round_trips(&cfg);
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

    /// LSQ and the temperature anneal come through TOML and JSON, and the combinations they do
    /// not support are refused naming the field.
    #[test]
    fn lsq_and_anneal_round_trip_and_are_validated() {
        use crate::progressive::TemperatureAnneal;
        use crate::ste::STEVariant;
        let mut lsq = QATConfig::ternary();
        lsq.weight = Some(Scheme::MultiBit { bits: 4 });
        lsq.ste.variant = STEVariant::Lsq;
        let mut anneal = QATConfig::binary();
        anneal.ste.variant = STEVariant::Soft;
        anneal.temperature_anneal = Some(TemperatureAnneal::new(0.1, 10.0, 500).unwrap());
        for cfg in [lsq, anneal] {
            assert_round_trips(&cfg);
        }
        assert_eq!(QATConfig::binary().weight, Some(Scheme::BinaryCentered));
        let anneal_toml = "[temperature_anneal]\nt_min = 0.1\nt_max = 10.0\ntotal = 100";
        let bad = [
            ("[ste]\nvariant = \"Lsq\"", "ste.variant"),
            (
                "weight = { MultiBit = { bits = 4 } }\n[ste]\nvariant = \"Lsq\"\nlearnable_temperature = true",
                "ste.variant",
            ),
            (anneal_toml, "temperature_anneal"),
            (
                "[ste]\nvariant = \"Soft\"\n[temperature_anneal]\nt_min = 0.0\nt_max = 1.0\ntotal = 10",
                "temperature_anneal.t_min",
            ),
        ];
        for (text, field) in bad {
            let e = QATConfig::from_toml_str(text).unwrap_err().to_string();
            assert!(e.contains(&format!("`{field}`")), "{text}: {e}");
        }
    }

    #[test]
    fn bit_schedule_round_trips_and_is_validated() {
        use crate::progressive::BitSchedule;
        let mut cfg = QATConfig::ternary();
        cfg.bit_schedule = Some(
            BitSchedule::new(&[
                (0, Scheme::MultiBit { bits: 8 }),
                (100, Scheme::MultiBit { bits: 4 }),
                (200, Scheme::TernaryAbsmean),
            ])
            .unwrap(),
        );
        assert_round_trips(&cfg);
        assert_eq!(
            cfg.weight_scheme_at(150),
            Some(Scheme::MultiBit { bits: 4 })
        );
        assert_eq!(
            QATConfig::ternary().weight_scheme_at(150),
            Some(Scheme::TernaryAbsmean)
        );
        let bad = [
            ("[[bit_schedule]]\nfrom_step = 0\nscheme = \"TernaryAbsmean\"\n[[bit_schedule]]\nfrom_step = 0\nscheme = \"TernaryAbsmean\"", "bit_schedule.from_step"),
            ("[[bit_schedule]]\nfrom_step = 0\nscheme = \"TernaryAbsmean\"\nbits = 3", "unknown field"),
            ("[ste]\nvariant = \"Learnable\"\n[[bit_schedule]]\nfrom_step = 0\nscheme = { MultiBit = { bits = 4 } }", "ste.variant"),
        ];
        for (text, field) in bad {
            let e = QATConfig::from_toml_str(text).unwrap_err().to_string();
            assert!(e.contains(field), "{text}: {e}");
        }
    }
}
