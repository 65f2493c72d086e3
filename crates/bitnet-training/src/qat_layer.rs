//! [`QATLayer`]: a BitLinear (or any [`QuantLinear`]) trained under a [`QATConfig`].

use crate::config::QATConfig;
use crate::ste::STEVariant;
use bitnet_quant::packed::PackedLayer;
use bitnet_quant::{BitLinear, BitLinearConfig, PackedBitLinear, Quantizer};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// A linear layer whose weight can be replaced by its quantized version in the forward.
pub trait QuantLinear {
    /// The latent full-precision weight `[out, in]` the optimizer updates.
    fn latent_weight(&self) -> &Tensor;
    /// The forward with `weight` (already quantized) and activations quantized by `act`.
    fn forward_quantized(
        &self,
        x: &Tensor,
        weight: &Tensor,
        act: Option<&Quantizer>,
    ) -> Result<Tensor>;

    /// The forward with the weight quantized by `weight` and activations by `act`. The default
    /// quantizes the latent weight and calls [`QuantLinear::forward_quantized`]; a layer with a
    /// fused kernel for the whole thing overrides it.
    fn forward_with_quantizer(
        &self,
        x: &Tensor,
        weight: &Quantizer,
        act: Option<&Quantizer>,
    ) -> Result<Tensor> {
        let w = weight.quantize(self.latent_weight())?;
        self.forward_quantized(x, &w, act)
    }
}

impl QuantLinear for BitLinear {
    fn latent_weight(&self) -> &Tensor {
        self.weight()
    }

    fn forward_quantized(
        &self,
        x: &Tensor,
        weight: &Tensor,
        act: Option<&Quantizer>,
    ) -> Result<Tensor> {
        let x = self.prepare_input(x, act)?;
        self.project(&x, weight)
    }

    fn forward_with_quantizer(
        &self,
        x: &Tensor,
        weight: &Quantizer,
        act: Option<&Quantizer>,
    ) -> Result<Tensor> {
        self.forward_with(x, weight, act)
    }
}

/// A layer trained with quantization in the loop: quantizers from the config, the progressive
/// blend, hardness, bit width and temperature anneal read from its schedules at the current
/// step ([`QATLayer::set_step`]).
///
/// Two STE variants add variables under the layer's `VarBuilder`, which the optimizer trains
/// with the weights: `ste_temperature` (one value) for [`STEVariant::Learnable`], and
/// `lsq_step` (one step size per block of the weight granularity) for [`STEVariant::Lsq`].
///
/// ```
/// use bitnet_quant::BitLinear;
/// use bitnet_training::{QATConfig, QATLayer};
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{Optimizer, VarBuilder, VarMap, SGD};
/// # fn main() -> candle_core::Result<()> {
/// let vm = VarMap::new();
/// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
/// let layer = QATLayer::new(BitLinear::new(8, 2, vb.pp("fc"))?, QATConfig::ternary(), vb.pp("fc"))?;
/// let mut opt = SGD::new(vm.all_vars(), 0.1)?;
/// let x = Tensor::randn(0f32, 1.0, (4, 8), &Device::Cpu)?;
/// let loss = layer.forward(&x)?.sqr()?.mean_all()?;
/// opt.backward_step(&loss)?; // the latent weights move
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct QATLayer<M = BitLinear> {
    inner: M,
    config: QATConfig,
    weight_q: Option<Quantizer>,
    act_q: Option<Quantizer>,
    temperature: Option<Tensor>,
    steps: Option<Tensor>,
    step: AtomicUsize,
    quantize: AtomicBool,
    name: String,
}

impl<M: QuantLinear> QATLayer<M> {
    /// Wraps `inner`. With a learnable STE the temperature is a variable `ste_temperature` under
    /// `vb`, initialised to the config's temperature. With LSQ the step sizes are a variable
    /// `lsq_step` of one value per block, initialised as in the LSQ paper from the whole latent
    /// weight, `2 mean|w| / sqrt(qmax)` (per-channel and per-group steps then start equal and
    /// learn apart). The layer's name (for state tracking) is `vb`'s prefix.
    pub fn new(inner: M, config: QATConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let quantized = config.weight.is_some() || config.bit_schedule.is_some();
        let temperature = if config.ste.is_learnable() && quantized {
            Some(vb.get_with_hints(
                1,
                "ste_temperature",
                candle_nn::Init::Const(config.ste.temperature as f64),
            )?)
        } else {
            None
        };
        let weight_q = config.weight_quantizer()?;
        let steps = match (config.ste.variant, weight_q) {
            (STEVariant::Lsq, Some(q)) => Some(lsq_steps(inner.latent_weight(), &q, &vb)?),
            _ => None,
        };
        Ok(Self {
            inner,
            weight_q,
            act_q: config.activation_quantizer()?,
            config,
            temperature,
            steps,
            step: AtomicUsize::new(0),
            quantize: AtomicBool::new(true),
            name: vb.prefix(),
        })
    }

    /// Tells the schedules which training step this is.
    pub fn set_step(&self, step: usize) {
        self.step.store(step, Ordering::Relaxed);
    }

    /// The step the schedules read.
    pub fn step(&self) -> usize {
        self.step.load(Ordering::Relaxed)
    }

    /// Switches quantization off (weights and activations pass through in full precision) or back
    /// on. Meant for analysis, e.g. [`sensitivity`](crate::sensitivity), not for training.
    pub fn set_quantization_enabled(&self, on: bool) {
        self.quantize.store(on, Ordering::Relaxed);
    }

    /// Whether the forward quantizes (true unless switched off).
    pub fn quantization_enabled(&self) -> bool {
        self.quantize.load(Ordering::Relaxed)
    }

    pub fn inner(&self) -> &M {
        &self.inner
    }

    pub fn config(&self) -> &QATConfig {
        &self.config
    }

    /// The layer's name (its VarBuilder prefix).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The learnable temperature, if the STE has one.
    pub fn temperature(&self) -> Option<&Tensor> {
        self.temperature.as_ref()
    }

    /// The learned step sizes (one per block of the weight granularity), with the LSQ STE.
    pub fn lsq_steps(&self) -> Option<&Tensor> {
        self.steps.as_ref()
    }

    /// The weight quantizer at the current step (blend applied; the scheme from the config's bit
    /// schedule if it has one); `None` in full precision.
    pub fn weight_quantizer(&self) -> Result<Option<Quantizer>> {
        if !self.quantization_enabled() {
            return Ok(None);
        }
        let step = self.step();
        let lambda = self.config.lambda.value(step);
        let q = match self.config.is_scheduled() {
            true => self.config.weight_quantizer_at(step)?,
            false => self.weight_q,
        };
        q.map(|q| q.with_lambda(lambda)).transpose()
    }

    /// The weight as the forward uses it at the current step.
    pub fn effective_weight(&self) -> Result<Tensor> {
        self.weight_with(self.weight_quantizer()?)
    }

    /// The latent weight through `q` (see [`Self::weight_quantizer`]), with the learnable
    /// surrogate when the STE has a temperature and LSQ when it has step sizes.
    fn weight_with(&self, q: Option<Quantizer>) -> Result<Tensor> {
        let w = self.inner.latent_weight();
        match (q, &self.temperature, &self.steps) {
            (None, _, _) => Ok(w.clone()),
            (Some(q), _, Some(steps)) => q.quantize_lsq(w, steps),
            (Some(q), Some(t), None) => {
                q.quantize_learnable(w, t, self.config.hardness.value(self.step()))
            }
            (Some(q), None, None) => q.quantize(w),
        }
    }
}

/// LSQ's step sizes of `w` under `q` as the variable `lsq_step` of `vb`: one per block, all
/// `2 mean|w| / sqrt(qmax)` of the whole weight at first.
fn lsq_steps(w: &Tensor, q: &Quantizer, vb: &VarBuilder) -> Result<Tensor> {
    let op = q.lsq_op()?;
    let n = w.elem_count();
    let last = w.dims().last().copied().unwrap_or(1);
    let blocks = n / q.granularity().block_size(n, last)?;
    let mean_abs = w
        .detach()
        .to_dtype(candle_core::DType::F32)?
        .abs()?
        .mean_all()?
        .to_scalar::<f32>()?;
    let init = 2.0 * mean_abs as f64 / (op.qmax as f64).sqrt();
    vb.get_with_hints(blocks, "lsq_step", candle_nn::Init::Const(init))
}

impl QATLayer<BitLinear> {
    /// The layer as it is trained now (this layer's quantizers at the current step, not the inner
    /// `BitLinear`'s defaults), packed for integer inference with
    /// [`PackedBitLinear::from_trained`]. The weight scheme must be binary or ternary and the
    /// activations int8 per token with the blend finished (`lambda = 1`); anything else is an error
    /// naming the field. A learnable STE packs its hard (fully annealed) quantizer.
    pub fn to_packed(&self) -> Result<PackedBitLinear> {
        PackedBitLinear::from_trained(&self.as_trained()?)
    }

    /// [`Self::to_packed`] for any weight scheme that has a packed form: binary and ternary
    /// as [`PackedLayer::Ternary`], 4- and 8-bit as [`PackedLayer::MultiBit`] (what a
    /// mixed-precision policy produces).
    pub fn to_packed_layer(&self) -> Result<PackedLayer> {
        PackedLayer::from_trained(&self.as_trained()?)
    }

    /// The inner BitLinear with this layer's quantizers at the current step.
    fn as_trained(&self) -> Result<BitLinear> {
        let weight = self.weight_quantizer()?.ok_or_else(|| {
            candle_core::Error::from(crate::TrainingError::InvalidConfig {
                field: "weight",
                value: "None (full precision or quantization switched off)".into(),
                allowed: "a binary, ternary, 4-bit or 8-bit scheme",
            })
        })?;
        let act = match self.quantization_enabled() {
            true => self
                .act_q
                .map(|q| q.with_lambda(self.config.lambda.value(self.step()))),
            false => None,
        };
        let config = BitLinearConfig {
            weight,
            activation: act.transpose()?,
            ..*self.inner.config()
        };
        Ok(BitLinear::from_parts(
            self.inner.weight().detach(),
            self.inner.bias().map(|b| b.detach()),
            self.inner.norm().cloned(),
            config,
        ))
    }

    /// A BitNet b1.58 layer `in -> out` under `config`, variables under `vb`.
    pub fn bitlinear(
        in_dim: usize,
        out_dim: usize,
        config: QATConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = BitLinear::new(in_dim, out_dim, vb.clone())?;
        Self::new(inner, config, vb)
    }
}

impl<M: QuantLinear> Module for QATLayer<M> {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let lambda = self.config.lambda.value(self.step());
        let act = match self.quantization_enabled() {
            true => self.act_q.map(|q| q.with_lambda(lambda)).transpose()?,
            false => None,
        };
        match (self.weight_quantizer()?, &self.temperature, &self.steps) {
            (Some(q), None, None) => self.inner.forward_with_quantizer(x, &q, act.as_ref()),
            (q, _, _) => {
                let w = self.weight_with(q)?;
                self.inner.forward_quantized(x, &w, act.as_ref())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progressive::BitSchedule;
    use bitnet_quant::Scheme;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn packs_with_its_own_quantizers_not_the_inner_defaults() {
        // The inner BitLinear defaults to ternary; the QAT config says binary. The packed layer
        // must reproduce the binary forward.
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let layer = QATLayer::bitlinear(64, 8, QATConfig::binary(), vb.pp("fc")).unwrap();
        let packed = layer.to_packed().unwrap();
        assert_eq!(
            packed.weight().levels().iter().filter(|&&l| l == 0).count(),
            0
        );
        let x = Tensor::randn(0f32, 1.0, (5, 64), &Device::Cpu).unwrap();
        let want = layer.forward(&x).unwrap();
        let diff = max_abs(&(packed.forward(&x).unwrap() - &want).unwrap());
        assert!(diff <= 1e-5 * max_abs(&want));

        let fp = QATLayer::bitlinear(64, 8, QATConfig::full_precision(), vb.pp("fp")).unwrap();
        assert!(fp.to_packed().unwrap_err().to_string().contains("`weight`"));
        let mut warm = QATConfig::ternary();
        warm.lambda = crate::progressive::LambdaSchedule::Linear { steps: 10 };
        let warming = QATLayer::bitlinear(64, 8, warm, vb.pp("warm")).unwrap();
        warming.set_step(3);
        assert!(warming.to_packed().is_err()); // lambda 0.3: no integer path
    }

    #[test]
    fn packs_every_precision_a_policy_uses_with_its_forward() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let x = Tensor::randn(0f32, 1.0, (5, 96), &Device::Cpu).unwrap();
        let cases = [
            (Scheme::TernaryAbsmean, 2),
            (Scheme::Binary { scaled: true }, 1),
            (Scheme::MultiBit { bits: 4 }, 4),
            (Scheme::MultiBit { bits: 8 }, 8),
        ];
        for (k, (scheme, bits)) in cases.into_iter().enumerate() {
            let mut cfg = QATConfig::ternary();
            cfg.weight = Some(scheme);
            cfg.weight_granularity = bitnet_quant::Granularity::PerChannel;
            let layer = QATLayer::bitlinear(96, 7, cfg, vb.pp(format!("l{k}"))).unwrap();
            let packed = layer.to_packed_layer().unwrap();
            assert_eq!(packed.bits(), bits, "{scheme:?}");
            let want = layer.forward(&x).unwrap();
            let diff = max_abs(&(packed.forward(&x).unwrap() - &want).unwrap());
            let scale = max_abs(&want);
            assert!(diff <= 1e-5 * scale, "{scheme:?}: {diff} vs {scale}");
        }
    }

    #[test]
    fn layer_follows_its_bit_schedule() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let mut cfg = QATConfig::ternary();
        cfg.bit_schedule = Some(
            BitSchedule::new(&[
                (0, Scheme::MultiBit { bits: 8 }),
                (5, Scheme::TernaryAbsmean),
            ])
            .unwrap(),
        );
        let layer = QATLayer::bitlinear(16, 4, cfg, vb.pp("fc")).unwrap();
        let distinct = |layer: &QATLayer| {
            let mut v = layer
                .effective_weight()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            v.sort_by(f32::total_cmp);
            v.dedup();
            v.len()
        };
        assert_eq!(
            layer.weight_quantizer().unwrap().unwrap().scheme(),
            Scheme::MultiBit { bits: 8 }
        );
        assert!(distinct(&layer) > 3);
        layer.set_step(5);
        assert_eq!(
            layer.weight_quantizer().unwrap().unwrap().scheme(),
            Scheme::TernaryAbsmean
        );
        assert!(distinct(&layer) <= 3);
    }
}
