//! Quantizers for BitNet-style quantization-aware training in candle.
//!
//! * [`Quantizer`]: binary (BitNet b1's centered sign, XNOR-Net's plain one), ternary (absmean,
//!   threshold/TWN), multi-bit (fixed or learned LSQ step) and int8 per-token quantization at
//!   per-tensor, per-channel or per-group granularity, with a choice of [`Estimator`] for the
//!   backward. Every quantizer is a candle custom op with our own kernels,
//!   because candle's autograd gives no gradient through `round` or `sign`.
//! * [`BitLinear`]: BitNet b1.58's linear layer (RMSNorm, int8 activations, ternary weights).
//! * [`packed`]: inference with 2-bit packed weights ([`PackedTernary`], [`PackedBitLinear`]),
//!   their SIMD kernels and a safetensors file format.
//! * [`ops`]: the ops themselves (block scales, quantize, learnable temperature, LSQ) and the
//!   scalar formulas all kernels share.
//!
//! ```
//! use bitnet_quant::{Estimator, Granularity, Quantizer, Scheme};
//! use candle_core::{Device, Tensor};
//! # fn main() -> candle_core::Result<()> {
//! let acts = Quantizer::new(Scheme::Int8PerToken, Estimator::Identity)?;
//! let x = Tensor::new(&[[1.0f32, -0.5, 0.25], [2.0, 0.0, -2.0]], &Device::Cpu)?;
//! let q = acts.quantize(&x)?; // one absmax per row
//! assert_eq!(q.to_vec2::<f32>()?[1], [2.0, 0.0, -2.0]);
//! # let _ = Granularity::PerTensor;
//! # Ok(()) }
//! ```

pub mod bitlinear;
pub mod error;
pub mod finite_check;
pub mod metrics;
pub mod ops;
pub mod packed;
pub mod quantizer;
pub mod rms_norm;
pub mod scheme;

pub use bitlinear::{BitLinear, BitLinearConfig};
pub use error::QuantError;
pub use finite_check::{check_deferred_finite, defer_finite_checks, DeferredFiniteChecks};
pub use packed::{PackedBitLinear, PackedTernary};
pub use quantizer::Quantizer;
pub use rms_norm::RmsNorm;
pub use scheme::{Estimator, Granularity, Scheme, Threshold, EPS};

/// The README's example, compiled and run as a doctest so that it cannot rot.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
