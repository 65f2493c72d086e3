//! Hugging Face's `BitNetForCausalLM` (BitNet b1.58 decoders such as
//! microsoft/bitnet-b1.58-2B-4T), computed as transformers 5.x computes it, in three runtimes:
//! training (`QATLayer<BitLinear>` projections with latent weights), packed integer inference
//! (`PackedBitLinear`), and the same inference with f32 weights for comparison.
//!
//! * [`config`]: [`Config`], the checkpoint's `config.json`.
//! * [`weights`]: [`WeightSource`], where tensors come from whatever the file format, and the two
//!   forms of a projection's weight ([`ProjectionWeight`]: latent or packed).
//! * [`linear`]: [`Projection`], one projection in one runtime.
//! * [`attention`], [`mlp`], [`model`]: the layers and [`BitNetForCausalLM`] with its [`Cache`].
//! * [`generation`]: [`generate`] and its [`Sampler`].
//!
//! Hugging Face checkpoint directories are read and written by [`crate::io::hf`].
//!
//! # Numerics
//! Every projection computes transformers' `AutoBitLinear`: activations quantized to int8 per
//! token (`127 / max|x|`, the max clamped at 1e-5, round half to even), weights ternarized with
//! the scale `1 / max(mean|W|, 1e-5)` ([`bitnet_quant::Scheme::TernaryAbsmeanHf`]), everything in
//! f32 (checkpoints in bf16 or f16 are upcast when loaded). This differs from the paper's
//! BitNet b1.58 quantizer our own models default to ([`bitnet_quant::Scheme::TernaryAbsmean`],
//! which divides by `mean|W| + 1e-5`); a model loaded from a checkpoint uses transformers'
//! numerics so that its logits match.

pub mod attention;
pub mod config;
pub mod generation;
pub mod linear;
pub mod mlp;
pub mod model;
pub mod weights;

pub use config::{Config, QuantizationConfig, RopeParameters, TokenIds, WeightForm};
pub use generation::{generate, GenerateConfig, Generation, Sampler};
pub use linear::Projection;
pub use model::{BitNetForCausalLM, Cache, DecoderLayer, Runtime};
pub use weights::{ProjectionWeight, WeightSource};
