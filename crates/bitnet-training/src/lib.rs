//! Quantization-aware training for BitNet models in candle.

pub mod error;
pub mod optim;

pub use error::TrainingError;
