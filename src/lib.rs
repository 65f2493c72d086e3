//! bitnet
pub use bitnet_core as core;
pub use bitnet_quant as quant;
pub use bitnet_training as training;
