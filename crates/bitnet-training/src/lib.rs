//! Quantization-aware training for BitNet models in candle.
//!
//! * [`ste`]: straight-through estimator variants ([`STEVariant`], [`STEConfig`]).
//! * [`QATConfig`] and [`QATLayer`]: wrap a `BitLinear`, train with quantization in the loop.
//! * [`progressive`]: lambda warmup of the blend `x + lambda (q(x) - x)`, hardness schedules,
//!   bit-width reduction, IR-Net's temperature anneal.
//! * [`state`]: per-layer statistics (level shares, flip ratio, SQNR, norms) as JSON lines.
//! * [`regularization`]: L2, L1 sparsity, distance to the quantization grid, BNN+.
//! * [`distillation`]: Hinton KD loss, feature matching, a frozen-teacher [`distillation::Distiller`].
//! * [`policy`]: mixed precision, layer-name patterns to schemes.
//! * [`convert`]: a pretrained fp model's linears into `QATLayer<BitLinear>`, by name and policy.
//! * [`sensitivity`]: quantize one layer at a time, rank the layers, propose a policy.
//! * [`checkpoint`]: atomic save and bit-exact resume.
//! * [`data_parallel`]: a batch split into row shards that train on all cores at once.
//! * [`loss`]: cross-entropy as one graph node (candle-nn's is about ten).

pub mod checkpoint;
pub mod config;
pub mod convert;
pub mod data_parallel;
pub mod distillation;
pub mod error;
pub mod init;
pub mod loss;
pub mod optim;
pub mod policy;
pub mod progressive;
pub mod qat_layer;
pub mod regularization;
pub mod sensitivity;
pub mod state;
pub mod ste;

pub use config::QATConfig;
pub use error::TrainingError;
pub use qat_layer::{QATLayer, QuantLinear};
pub use ste::{STEConfig, STEVariant};
