//! The one error type of bitnet-core.

/// Everything that can go wrong in bitnet-core.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A configuration value outside its allowed range.
    #[error("invalid config: `{field}` = {value}, allowed: {allowed}")]
    InvalidConfig {
        field: &'static str,
        value: String,
        allowed: &'static str,
    },
}

impl From<CoreError> for candle_core::Error {
    fn from(e: CoreError) -> Self {
        candle_core::Error::wrap(e)
    }
}
