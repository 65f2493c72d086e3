//! The one error type of bitnet-quant.

/// Everything that can go wrong in bitnet-quant.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// A configuration value outside its allowed range, rejected at construction.
    #[error("invalid config: `{field}` = {value}, allowed: {allowed}")]
    InvalidConfig {
        field: &'static str,
        value: String,
        allowed: &'static str,
    },
    /// The op only computes in f32 (the `Quantizer` converts f16/bf16/f64 for you).
    #[error("{op}: unsupported dtype {dtype:?}, expected f32")]
    DType {
        op: &'static str,
        dtype: candle_core::DType,
    },
    /// Quantizing nothing has no scale.
    #[error("{op}: empty tensor of shape {shape:?}")]
    Empty {
        op: &'static str,
        shape: candle_core::Shape,
    },
    /// NaN or infinite values reached a quantizer: its scale would be meaningless.
    #[error("{op}: input contains {count} NaN or infinite value(s)")]
    NonFinite { op: &'static str, count: usize },
    /// Two tensors that must agree in shape do not.
    #[error("{op}: shape mismatch, {what}")]
    Shape { op: &'static str, what: String },
    /// A valid configuration that an operation has no implementation for (e.g. per-channel
    /// scales in the single-scale Hugging Face layout).
    #[error("{op}: unsupported, {what}")]
    Unsupported { op: &'static str, what: String },
    /// An input on another device than the layer's weights (see
    /// [`PackedBitLinear::to_device`](crate::PackedBitLinear::to_device)).
    #[error("{op}: device mismatch, the layer is on {layer:?} and the input on {input:?}; move one of them with `to_device`")]
    Device {
        op: &'static str,
        layer: candle_core::DeviceLocation,
        input: candle_core::DeviceLocation,
    },
    /// Packed data or a packed-weights file that is malformed; `what` names the part.
    #[error("bad packed data: {what}")]
    BadData { what: String },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<QuantError> for candle_core::Error {
    fn from(e: QuantError) -> Self {
        candle_core::Error::wrap(e)
    }
}

pub(crate) fn invalid(
    field: &'static str,
    value: impl std::fmt::Display,
    allowed: &'static str,
) -> QuantError {
    QuantError::InvalidConfig {
        field,
        value: value.to_string(),
        allowed,
    }
}
