//! Per-layer quantization sensitivity: which layers lose the most when quantized, and a
//! [`PrecisionPolicy`] that keeps those wider (8 or 4 bits): the `k` most sensitive, or as many
//! as an average bits-per-weight budget allows.
//!
//! The analysis starts from the model with every layer in full precision (latent weights, no
//! activation quantization) and quantizes one layer at a time; a layer's sensitivity is the loss
//! with only that layer quantized minus the full-precision loss, on a batch the caller chooses.
//!
//! ```
//! use bitnet_training::sensitivity;
//! use bitnet_training::{QATConfig, QATLayer};
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> candle_core::Result<()> {
//! let vm = VarMap::new();
//! let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
//! let fc1 = QATLayer::bitlinear(16, 32, QATConfig::ternary(), vb.pp("fc1"))?;
//! let fc2 = QATLayer::bitlinear(32, 4, QATConfig::ternary(), vb.pp("fc2"))?;
//! let x = Tensor::randn(0f32, 1.0, (64, 16), &Device::Cpu)?;
//! let model = |x: &Tensor| fc2.forward(&fc1.forward(x)?.relu()?);
//! // Here the loss is the distance to the full-precision output; use your task's loss instead.
//! fc1.set_quantization_enabled(false);
//! fc2.set_quantization_enabled(false);
//! let target = model(&x)?;
//! let loss = || -> candle_core::Result<f64> {
//!     Ok((model(&x)? - &target)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64)
//! };
//! let report = sensitivity::analyze(&[&fc1, &fc2], loss)?;
//! assert_eq!(report.base_loss, 0.0);
//! println!("{}", report.table());
//! let policy = report.propose_policy(QATConfig::ternary(), 1); // the worst layer at 8 bits
//! assert_eq!(policy.rules.len(), 1);
//! assert!(fc1.quantization_enabled() && fc2.quantization_enabled()); // restored afterwards
//! # Ok(()) }
//! ```

use crate::policy::PrecisionPolicy;
use crate::qat_layer::{QATLayer, QuantLinear};
use crate::{QATConfig, TrainingError};
use bitnet_quant::Scheme;
use candle_core::Result;

/// One layer's entry of a [`SensitivityReport`].
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSensitivity {
    /// The layer's name ([`QATLayer::name`]).
    pub name: String,
    /// The loss with only this layer quantized.
    pub loss: f64,
    /// `loss - base_loss`: how much quantizing this layer alone costs.
    pub loss_delta: f64,
    /// The number of weights (elements of the latent weight), for bit budgets.
    pub weights: usize,
}

/// What [`analyze`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct SensitivityReport {
    /// The loss with every layer in full precision.
    pub base_loss: f64,
    /// The loss with every layer quantized (the model as trained).
    pub quantized_loss: f64,
    /// One entry per layer, in the order the layers were given.
    pub layers: Vec<LayerSensitivity>,
}

/// Re-enables quantization on every layer when dropped, also when the loss closure fails.
struct Restore<'a, M: QuantLinear>(&'a [&'a QATLayer<M>]);

impl<M: QuantLinear> Drop for Restore<'_, M> {
    fn drop(&mut self) {
        self.0.iter().for_each(|l| l.set_quantization_enabled(true));
    }
}

/// Measures each layer's sensitivity with `loss`, which runs the model on a fixed batch; the
/// layers' quantization switches are restored (all on) before returning, also on error.
pub fn analyze<M: QuantLinear>(
    layers: &[&QATLayer<M>],
    mut loss: impl FnMut() -> Result<f64>,
) -> Result<SensitivityReport> {
    let _restore = Restore(layers);
    let only = |i: Option<usize>| {
        for (j, l) in layers.iter().enumerate() {
            l.set_quantization_enabled(Some(j) == i);
        }
    };
    only(None);
    let base_loss = loss()?;
    let mut entries = Vec::with_capacity(layers.len());
    for (i, l) in layers.iter().enumerate() {
        only(Some(i));
        let li = loss()?;
        entries.push(LayerSensitivity {
            name: l.name().to_string(),
            loss: li,
            loss_delta: li - base_loss,
            weights: l.inner().latent_weight().elem_count(),
        });
    }
    layers.iter().for_each(|l| l.set_quantization_enabled(true));
    let quantized_loss = loss()?;
    Ok(SensitivityReport {
        base_loss,
        quantized_loss,
        layers: entries,
    })
}

impl SensitivityReport {
    /// The layers, most sensitive (largest loss increase) first.
    pub fn ranked(&self) -> Vec<&LayerSensitivity> {
        let mut v: Vec<_> = self.layers.iter().collect();
        v.sort_by(|a, b| b.loss_delta.total_cmp(&a.loss_delta));
        v
    }

    /// A policy over `default` that keeps the `keep` most sensitive layers at 8 bits (8-bit
    /// weights, int8 per-token activations), one rule per layer, most sensitive first. Layers
    /// whose quantization lowered the loss are never kept.
    pub fn propose_policy(&self, default: QATConfig, keep: usize) -> PrecisionPolicy {
        self.propose_policy_at(default, keep, Scheme::MultiBit { bits: 8 })
    }

    /// [`Self::propose_policy`] with the kept layers' weights at `wide` (e.g. 4-bit) instead
    /// of 8 bits; their activations stay int8 per token.
    pub fn propose_policy_at(
        &self,
        default: QATConfig,
        keep: usize,
        wide: Scheme,
    ) -> PrecisionPolicy {
        self.ranked()
            .into_iter()
            .filter(|l| l.loss_delta > 0.0)
            .take(keep)
            .fold(PrecisionPolicy::new(default), |p, l| keep_wide(p, l, wide))
    }

    /// The policy over `default` that keeps the most sensitive layers at `wide` while the
    /// average bits per weight over all the layers ([`PrecisionPolicy::average_bits`]) stays
    /// at most `max_bits`: layers are taken most sensitive first, and one that would break the
    /// budget is passed over for the next, smaller ones. Layers whose quantization lowered the
    /// loss are never kept.
    ///
    /// A budget below what `default` alone costs is an error naming `max_bits` and the
    /// smallest budget allowed.
    ///
    /// ```
    /// use bitnet_training::sensitivity::{LayerSensitivity, SensitivityReport};
    /// use bitnet_training::QATConfig;
    /// use bitnet_quant::Scheme;
    /// let layer = |name: &str, loss_delta, weights| LayerSensitivity {
    ///     name: name.into(), loss: loss_delta, loss_delta, weights,
    /// };
    /// let report = SensitivityReport {
    ///     base_loss: 0.0,
    ///     quantized_loss: 1.0,
    ///     layers: vec![layer("ffn", 0.5, 400), layer("attn", 0.2, 100), layer("out", 0.1, 100)],
    /// };
    /// // 2.5 bits on average: `ffn` at 4 bits would cost about 3.2, so it is passed over.
    /// let p = report.propose_within_bits(QATConfig::ternary(), Scheme::MultiBit { bits: 4 }, 2.5)?;
    /// let kept: Vec<&str> = p.rules.iter().map(|r| r.pattern.as_str()).collect();
    /// assert_eq!(kept, ["attn", "out"]);
    /// assert!(p.average_bits(report.layers.iter().map(|l| (l.name.as_str(), l.weights))) <= 2.5);
    /// # Ok::<(), bitnet_training::TrainingError>(())
    /// ```
    pub fn propose_within_bits(
        &self,
        default: QATConfig,
        wide: Scheme,
        max_bits: f64,
    ) -> std::result::Result<PrecisionPolicy, TrainingError> {
        let sizes = || self.layers.iter().map(|l| (l.name.as_str(), l.weights));
        let mut policy = PrecisionPolicy::new(default);
        let floor = policy.average_bits(sizes());
        // A little slack, so that a budget written as the exact average of a policy is met.
        let slack = 1e-9;
        if !(max_bits.is_finite() && max_bits + slack >= floor) {
            return Err(TrainingError::InvalidConfig {
                field: "max_bits",
                value: format!("{max_bits} (the default scheme alone averages {floor:.4})"),
                allowed: "a finite budget at least the default scheme's average bits per weight",
            });
        }
        for l in self.ranked().into_iter().filter(|l| l.loss_delta > 0.0) {
            let wider = keep_wide(policy.clone(), l, wide);
            if wider.average_bits(sizes()) <= max_bits + slack {
                policy = wider;
            }
        }
        Ok(policy)
    }

    /// A plain-text table: one line per layer, most sensitive first.
    pub fn table(&self) -> String {
        // As wide as the longest name (at least 16), so that the numbers line up.
        let w = self
            .layers
            .iter()
            .map(|l| l.name.len())
            .max()
            .unwrap_or(0)
            .max(16);
        let mut s = format!(
            "full-precision loss {:.4}, all quantized {:.4}\n{:<w$} {:>10} {:>10}\n",
            self.base_loss, self.quantized_loss, "layer", "loss", "delta"
        );
        for l in self.ranked() {
            s += &format!("{:<w$} {:>10.4} {:>+10.4}\n", l.name, l.loss, l.loss_delta);
        }
        s
    }
}

/// `policy` with one more rule: layer `l` at `wide` weights and int8 per-token activations.
fn keep_wide(policy: PrecisionPolicy, l: &LayerSensitivity, wide: Scheme) -> PrecisionPolicy {
    policy.rule(&l.name, Some(wide), Some(Scheme::Int8PerToken))
}

#[cfg(test)]
mod tests;
