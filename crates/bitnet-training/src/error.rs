//! The one error type of bitnet-training.

/// Everything that can go wrong in bitnet-training.
#[derive(Debug, thiserror::Error)]
pub enum TrainingError {
    /// A configuration value outside its allowed range.
    #[error("invalid config: `{field}` = {value}, allowed: {allowed}")]
    InvalidConfig {
        field: &'static str,
        value: String,
        allowed: &'static str,
    },
    /// A configuration or log text that does not parse.
    #[error("parse error: {0}")]
    Parse(String),
    /// A file that cannot be read or written, named.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Errors from candle, kept as they are.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<TrainingError> for candle_core::Error {
    fn from(e: TrainingError) -> Self {
        match e {
            TrainingError::Candle(e) => e,
            e => candle_core::Error::wrap(e),
        }
    }
}
