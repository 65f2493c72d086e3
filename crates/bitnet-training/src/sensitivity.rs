//! Per-layer quantization sensitivity: which layers lose the most when quantized, and a
//! [`PrecisionPolicy`] that keeps those at 8 bits.
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
use crate::QATConfig;
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
        self.ranked()
            .into_iter()
            .filter(|l| l.loss_delta > 0.0)
            .take(keep)
            .fold(PrecisionPolicy::new(default), |p, l| {
                p.rule(
                    &l.name,
                    Some(Scheme::MultiBit { bits: 8 }),
                    Some(Scheme::Int8PerToken),
                )
            })
    }

    /// A plain-text table: one line per layer, most sensitive first.
    pub fn table(&self) -> String {
        let mut s = format!(
            "full-precision loss {:.4}, all quantized {:.4}\n{:<16} {:>10} {:>10}\n",
            self.base_loss, self.quantized_loss, "layer", "loss", "delta"
        );
        for l in self.ranked() {
            s += &format!("{:<16} {:>10.4} {:>+10.4}\n", l.name, l.loss, l.loss_delta);
        }
        s
    }
}

#[cfg(test)]
mod tests;
