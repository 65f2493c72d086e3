//! Devices and memory for bitnet-candle.
//!
//! * [`device`]: pick CUDA, Metal or CPU (`select(Preference::Auto)`) and describe what was chosen.
//! * [`HybridMemoryPool`]: size-class slabs for small blocks plus a buddy pool for large ones, with
//!   per-[`Category`] accounting; the quantizer kernels take their scratch and packed buffers from it.
//!
//! Errors are [`CoreError`]; they convert into `candle_core::Error` at candle boundaries.

pub mod error;

pub use error::CoreError;
