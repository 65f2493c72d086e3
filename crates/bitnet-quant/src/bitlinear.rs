//! BitLinear: the linear layer of BitNet b1.58, trained with latent f32 weights.

use crate::rms_norm::RmsNorm;
use crate::scheme::{Estimator, Scheme};
use crate::Quantizer;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// How a [`BitLinear`] quantizes. The default is BitNet b1.58: RMSNorm inside the layer, absmean
/// ternary weights per tensor, int8 absmax activations per token, straight-through estimators, no
/// bias.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BitLinearConfig {
    /// Whether the layer adds a learnable bias after the matmul.
    pub bias: bool,
    /// Whether an RMSNorm (with its own learnable weight) precedes activation quantization, as in
    /// BitNet's SubLN placement.
    pub norm: bool,
    /// The RMSNorm epsilon.
    pub norm_eps: f64,
    /// The weight quantizer.
    pub weight: Quantizer,
    /// The activation quantizer; `None` keeps activations in full precision.
    pub activation: Option<Quantizer>,
}

impl Default for BitLinearConfig {
    fn default() -> Self {
        Self {
            bias: false,
            norm: true,
            norm_eps: 1e-6,
            weight: Quantizer::new(Scheme::TernaryAbsmean, Estimator::Identity)
                .expect("valid default"),
            activation: Some(
                Quantizer::new(Scheme::Int8PerToken, Estimator::Identity).expect("valid default"),
            ),
        }
    }
}

/// `y = ActQuant(RMSNorm(x)) @ WQuant(W)^T (+ b)`, with latent f32 weights `W` of shape
/// `[out, in]` that the optimizer updates, and both quantizers differentiable through their
/// estimators.
///
/// ```
/// use bitnet_quant::BitLinear;
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// # fn main() -> candle_core::Result<()> {
/// let vm = VarMap::new();
/// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
/// let layer = BitLinear::new(16, 4, vb.pp("fc"))?;
/// let y = layer.forward(&Tensor::randn(0f32, 1.0, (8, 16), &Device::Cpu)?)?;
/// assert_eq!(y.dims(), &[8, 4]);
/// let grads = y.sqr()?.sum_all()?.backward()?;
/// assert!(grads.get(layer.weight()).is_some()); // the latent weight learns
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct BitLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    norm: Option<RmsNorm>,
    config: BitLinearConfig,
}

impl BitLinear {
    /// A BitNet b1.58 layer (see [`BitLinearConfig::default`]); variables `weight` and
    /// `norm.weight` under `vb`.
    pub fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Self::with_config(in_dim, out_dim, BitLinearConfig::default(), vb)
    }

    /// A layer with another configuration. Weights start as candle-nn's `Linear` does (Kaiming
    /// normal, bias uniform in `±1/sqrt(in)`).
    pub fn with_config(
        in_dim: usize,
        out_dim: usize,
        config: BitLinearConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get_with_hints(
            (out_dim, in_dim),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let bias = if config.bias {
            let bound = 1.0 / (in_dim as f64).sqrt();
            Some(vb.get_with_hints(
                out_dim,
                "bias",
                candle_nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            )?)
        } else {
            None
        };
        let norm = if config.norm {
            Some(RmsNorm::new(in_dim, config.norm_eps, vb.pp("norm"))?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            norm,
            config,
        })
    }

    /// A layer from existing tensors (e.g. a pretrained `Linear` being converted).
    pub fn from_parts(
        weight: Tensor,
        bias: Option<Tensor>,
        norm: Option<RmsNorm>,
        config: BitLinearConfig,
    ) -> Self {
        Self {
            weight,
            bias,
            norm,
            config,
        }
    }

    /// The latent full-precision weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The RMSNorm inside the layer, if any.
    pub fn norm(&self) -> Option<&RmsNorm> {
        self.norm.as_ref()
    }

    pub fn config(&self) -> &BitLinearConfig {
        &self.config
    }

    /// `(in, out)` features.
    pub fn dims(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[1], d[0])
    }

    /// The quantized weight as the forward uses it.
    pub fn quantized_weight(&self) -> Result<Tensor> {
        self.config.weight.quantize(&self.weight)
    }

    /// The input side of the layer: norm, then activation quantization.
    pub fn prepare_input(&self, x: &Tensor, act: Option<&Quantizer>) -> Result<Tensor> {
        let x = match &self.norm {
            Some(n) => n.forward(x)?,
            None => x.clone(),
        };
        match act {
            Some(q) => q.quantize(&x),
            None => Ok(x),
        }
    }

    /// `x @ w^T + b` for an already quantized weight `w`; `x` is the prepared input.
    pub fn project(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        self.add_bias(crate::ops::linear::linear(x, w)?)
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// The forward with other quantizers than the configured ones (schedules change them during
    /// training). On the CPU in f32, a layer with its norm runs as one fused op
    /// ([`crate::ops::bitlinear`]): the same numbers as [`BitLinear::forward_separate`] with fewer
    /// passes and allocations in the backward. Elsewhere it is the separate ops.
    pub fn forward_with(
        &self,
        x: &Tensor,
        weight: &Quantizer,
        act: Option<&Quantizer>,
    ) -> Result<Tensor> {
        let norm = match &self.norm {
            Some(n) if self.fusable(x, n) => n,
            _ => return self.forward_separate(x, weight, act),
        };
        let y = crate::ops::bitlinear::bitlinear_train(
            x,
            &self.weight,
            norm.weight(),
            weight.op(),
            act.map(Quantizer::op),
            norm.eps() as f32,
        )?;
        self.add_bias(y)
    }

    /// The forward as separate ops (norm, scales, quantizers, GEMM): the path on devices without
    /// the fused op, and the reference it is tested against.
    pub fn forward_separate(
        &self,
        x: &Tensor,
        weight: &Quantizer,
        act: Option<&Quantizer>,
    ) -> Result<Tensor> {
        let x = self.prepare_input(x, act)?;
        let w = weight.quantize(&self.weight)?;
        self.project(&x, &w)
    }

    /// Whether the fused op applies: CPU, f32 throughout, non-empty input.
    fn fusable(&self, x: &Tensor, norm: &RmsNorm) -> bool {
        let f32 = |t: &Tensor| t.dtype() == DType::F32;
        x.device().is_cpu()
            && self.weight.device().is_cpu()
            && f32(x)
            && f32(&self.weight)
            && f32(norm.weight())
            && x.elem_count() > 0
    }
}

impl Module for BitLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, &self.config.weight, self.config.activation.as_ref())
    }
}
