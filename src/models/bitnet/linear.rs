//! [`Projection`]: one decoder projection in one of the model's runtimes.

use super::weights::ProjectionWeight;
use bitnet_quant::packed::PackedBitLinear;
use bitnet_quant::{BitLinear, BitLinearConfig, Estimator, Quantizer, Scheme};
use bitnet_training::{QATConfig, QATLayer};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// A decoder projection (`q_proj` ... `down_proj`, no bias, no inner norm) in one runtime.
#[derive(Debug)]
pub enum Projection {
    /// Training: latent weights (a `Var`), the configured quantizers and their estimators.
    Qat(Box<QATLayer>),
    /// Inference: 2-bit codes, int8 activations, integer dot products.
    Packed(PackedBitLinear),
    /// The same inference with the weights unpacked (`scale * code`) and candle's GEMM: the
    /// reference the packed kernels are measured against. `act` quantizes the input as the
    /// packed layer does (`None` for a full-precision model).
    Dense {
        /// `[out, in]`: f32, or the 16-bit type of [`Projection::to_weight_dtype`] (multiplied
        /// through [`bitnet_quant::ops::gemv::linear_t`], the output in the input's dtype).
        weight: Tensor,
        /// The activation quantizer.
        act: Option<Quantizer>,
    },
}

/// Transformers' activation quantizer (`ActQuant`): int8 absmax per token.
fn act_quantizer() -> Quantizer {
    Quantizer::new(Scheme::Int8PerToken, Estimator::Identity).expect("a valid scheme")
}

impl Projection {
    /// A training projection `in -> out` under `qat`, latent weight `weight` under `vb` (created
    /// with candle's Linear initialisation when `vb` is a fresh `VarMap`).
    pub fn qat(inp: usize, out: usize, qat: QATConfig, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(
            (out, inp),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let inner = BitLinear::from_parts(
            weight,
            None,
            None,
            BitLinearConfig {
                norm: false,
                ..BitLinearConfig::default()
            },
        );
        Ok(Projection::Qat(Box::new(QATLayer::new(inner, qat, vb)?)))
    }

    /// An inference projection from a checkpoint's weight: packed, or (`dense`) unpacked to f32;
    /// `quantized = false` is a full-precision model's plain linear layer (always dense).
    pub fn inference(w: &ProjectionWeight, quantized: bool, dense: bool) -> Result<Self> {
        if !quantized {
            return Ok(Projection::Dense {
                weight: w.to_latent()?,
                act: None,
            });
        }
        let packed = w.to_packed()?;
        if dense {
            return Ok(Projection::Dense {
                weight: packed.unpack()?,
                act: Some(act_quantizer()),
            });
        }
        Ok(Projection::Packed(PackedBitLinear::from_parts(
            packed, None, None,
        )?))
    }

    /// The weight in its stored form: latent for training and full-precision layers, packed
    /// codes for quantized inference layers (a dense quantized layer is packed again from its
    /// unpacked values, which gives back the same codes and scale).
    pub fn weight(&self) -> Result<ProjectionWeight> {
        match self {
            Projection::Qat(l) => Ok(ProjectionWeight::Latent(l.inner().weight().detach())),
            Projection::Packed(p) => Ok(ProjectionWeight::Packed(p.weight().clone())),
            Projection::Dense { weight, act: None } => Ok(ProjectionWeight::Latent(weight.clone())),
            Projection::Dense { weight, .. } => {
                let q = super::weights::hf_weight_quantizer();
                let w = weight.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
                Ok(ProjectionWeight::Packed(bitnet_quant::PackedTernary::pack(
                    &w, &q,
                )?))
            }
        }
    }

    /// This projection for integer inference: a training layer is packed with its quantizers at
    /// the current step ([`QATLayer::to_packed`]); a full-precision one stays dense.
    pub fn to_packed(&self) -> Result<Self> {
        match self {
            Projection::Qat(l) if l.config().weight.is_none() => Ok(Projection::Dense {
                weight: l.inner().weight().detach().to_dtype(DType::F32)?,
                act: None,
            }),
            Projection::Qat(l) => Ok(Projection::Packed(l.to_packed()?)),
            Projection::Packed(p) => Ok(Projection::Packed(p.clone())),
            Projection::Dense { .. } => {
                Projection::inference(&self.weight()?, self.quantized(), false)
            }
        }
    }

    /// This projection with f32 weights (see [`Projection::Dense`]).
    pub fn to_dense(&self) -> Result<Self> {
        match self {
            Projection::Dense { weight, act } => Ok(Projection::Dense {
                weight: weight.clone(),
                act: *act,
            }),
            _ => Projection::inference(&self.weight()?, self.quantized(), true),
        }
    }

    /// This inference projection on `device`: packed codes through
    /// [`PackedBitLinear::to_device`] (the CPU, and CUDA GPUs with the `cuda` feature), dense
    /// weights copied. A training layer is an error: its weight is a `Var` of the `VarMap` it was
    /// built from, which a copy would leave behind.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        match self {
            Projection::Qat(_) => candle_core::bail!(
                "Projection::to_device: a training projection learns in its VarMap; build the model on the device through its VarBuilder"
            ),
            Projection::Packed(p) => Ok(Projection::Packed(p.to_device(device)?)),
            Projection::Dense { weight, act } => Ok(Projection::Dense {
                weight: weight.to_device(device)?,
                act: *act,
            }),
        }
    }

    /// This projection with a dense weight stored as `dtype` (F32, BF16 or F16): the 16-bit
    /// baseline of the packed kernels. Packed and training projections are returned as they
    /// are.
    pub fn to_weight_dtype(&self, dtype: DType) -> Result<Self> {
        match self {
            Projection::Dense { weight, act } => Ok(Projection::Dense {
                weight: weight.to_dtype(dtype)?,
                act: *act,
            }),
            Projection::Packed(p) => Ok(Projection::Packed(p.clone())),
            Projection::Qat(_) => candle_core::bail!(
                "Projection::to_weight_dtype: a training projection keeps its latent weight in its VarMap's dtype"
            ),
        }
    }

    /// Whether the weights (and activations) are quantized.
    pub fn quantized(&self) -> bool {
        match self {
            Projection::Qat(l) => l.config().weight.is_some(),
            Projection::Packed(_) => true,
            Projection::Dense { act, .. } => act.is_some(),
        }
    }

    /// The training layer, if this is one.
    pub fn qat_layer(&self) -> Option<&QATLayer> {
        match self {
            Projection::Qat(l) => Some(l),
            _ => None,
        }
    }

    /// Bytes of weights held: packed codes and scales, or f32 values.
    pub fn weight_bytes(&self) -> usize {
        match self {
            Projection::Packed(p) => p.weight().size_bytes(),
            Projection::Qat(l) => {
                l.inner().weight().elem_count() * l.inner().weight().dtype().size_in_bytes()
            }
            Projection::Dense { weight, .. } => {
                weight.elem_count() * weight.dtype().size_in_bytes()
            }
        }
    }
}

impl Module for Projection {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Projection::Qat(l) => l.forward(x),
            Projection::Packed(p) => p.forward(x),
            Projection::Dense { weight, act } => {
                let x = match act {
                    Some(q) => q.quantize(x)?,
                    None => x.clone(),
                };
                // f32 stays candle's GEMM: the baseline the packed kernels are measured against.
                if weight.dtype() == DType::F32 {
                    return candle_nn::Linear::new(weight.clone(), None).forward(&x);
                }
                bitnet_quant::ops::gemv::linear_t(&x, weight)?.to_dtype(x.dtype())
            }
        }
    }
}
