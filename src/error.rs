//! [`ModelError`]: what goes wrong in the facade's models and model files.

/// Errors of the `bitnet` facade: model configurations and checkpoint files. Each names the file,
/// field or tensor at fault; they convert into `candle_core::Error` at candle boundaries.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A configuration value that is missing, malformed or outside what the model supports.
    #[error("{file}: `{field}`: {reason}")]
    Config {
        /// The file (or "config" for one built in code).
        file: String,
        /// The field, dotted for nested ones (`quantization_config.linear_class`).
        field: String,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// A checkpoint that does not hold what the configuration says: a missing, unknown or
    /// misshapen tensor, or a file that is not valid safetensors.
    #[error("{file}: {what}")]
    Checkpoint {
        /// The file or folder.
        file: String,
        /// What is wrong, naming the tensor where there is one.
        what: String,
    },
    /// A file that cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl ModelError {
    /// A [`ModelError::Config`] of `file`.
    pub fn config(
        file: impl Into<String>,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self::Config {
            file: file.into(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A [`ModelError::Checkpoint`] of `file`.
    pub fn checkpoint(file: impl Into<String>, what: impl Into<String>) -> Self {
        Self::Checkpoint {
            file: file.into(),
            what: what.into(),
        }
    }

    /// A [`ModelError::Io`] on `path`.
    pub fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

impl From<ModelError> for candle_core::Error {
    fn from(e: ModelError) -> Self {
        candle_core::Error::wrap(e)
    }
}
