//! The one error type of bitnet-training.

/// Everything that can go wrong in bitnet-training.
#[derive(Debug, thiserror::Error)]
pub enum TrainingError {
    /// A configuration value outside its allowed range.
    #[error("invalid config: `{field}` = {value}, allowed: {allowed}")]
    InvalidConfig {
        /// The field's name.
        field: &'static str,
        /// The rejected value.
        value: String,
        /// The allowed range.
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
    /// An optimizer state entry that is missing, unknown, or of the wrong shape (see
    /// `optim::OptimizerState::load_state`).
    #[error("optimizer state entry `{entry}`: {reason}")]
    OptimizerState {
        /// The entry's name.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A parameter routed to no optimizer, to two, or of a kind an optimizer cannot update.
    #[error("parameter #{index} (shape {shape:?}): {reason}")]
    Parameter {
        /// The parameter's index in the list given to the optimizer.
        index: usize,
        /// The parameter's shape.
        shape: candle_core::Shape,
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint file that is missing pieces, truncated, corrupt or does not fit the model,
    /// named.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
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
