//! bitnet-candle: 1-bit and 1.58-bit (BitNet) quantization-aware training for candle.
//!
//! This facade re-exports the three crates and holds the data loaders and models the examples use:
//! * [`core`]: devices and the `HybridMemoryPool`;
//! * [`quant`]: quantizers as candle custom ops, `BitLinear`, metrics;
//! * [`training`]: STE variants, `QATLayer`, schedules, state tracking;
//! * [`models`]: the MNIST MLP, the byte LM, a BERT encoder and Hugging Face's
//!   `BitNetForCausalLM` ([`models::bitnet`]);
//! * [`io`]: Hugging Face checkpoint directories in and out ([`io::hf`]).

pub use bitnet_core as core;
pub use bitnet_quant as quant;
pub use bitnet_training as training;

pub mod datasets;
pub mod error;
pub mod io;
pub mod models;

pub use error::ModelError;

/// The types most programs use: `use bitnet::prelude::*;`.
pub mod prelude {
    pub use bitnet_quant::{
        BitLinear, BitLinearConfig, Estimator, Granularity, Quantizer, Scheme, Threshold,
    };
    pub use bitnet_training::{QATConfig, QATLayer, STEConfig, STEVariant};
}

/// The README's usage example, compiled and run as a doctest so that it cannot rot.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
