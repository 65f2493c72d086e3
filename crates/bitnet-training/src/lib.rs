//! Quantization-aware training for BitNet models in candle.

pub mod error;

pub use error::TrainingError;
