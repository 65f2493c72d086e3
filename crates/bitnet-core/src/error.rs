//! The one error type of bitnet-core.

/// Everything that can go wrong in bitnet-core.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A configuration value outside its allowed range.
    #[error("invalid config: `{field}` = {value}, allowed: {allowed}")]
    InvalidConfig {
        /// The name of the offending field, as spelled in the config struct.
        field: &'static str,
        /// The rejected value, formatted for the message.
        value: String,
        /// The allowed range, in words.
        allowed: &'static str,
    },

    /// A device was requested whose support was not compiled into bitnet.
    #[error("{device} requested but bitnet was built without the `{feature}` feature")]
    FeatureDisabled {
        /// Human name of the device kind ("CUDA", "Metal").
        device: &'static str,
        /// The cargo feature that would enable it.
        feature: &'static str,
    },

    /// The device support is compiled in, but opening the device failed.
    #[error("could not open {device} device {ordinal}: {reason}")]
    DeviceUnavailable {
        /// Human name of the device kind ("CUDA", "Metal").
        device: &'static str,
        /// The ordinal that was asked for.
        ordinal: usize,
        /// What the backend reported.
        reason: String,
    },

    /// An allocation alignment that is not a power of two or above the pool's maximum.
    #[error("invalid alignment {align}: must be a power of two no larger than {max}")]
    InvalidAlignment {
        /// The alignment that was asked for.
        align: usize,
        /// The largest alignment the pool can honour.
        max: usize,
    },

    /// Serving the request would take the pool's reserved memory above its cap.
    #[error(
        "memory pool cap exceeded: a request of {requested} bytes needs {needed} more reserved bytes, \
         {reserved} of {cap} are already reserved"
    )]
    CapExceeded {
        /// The size the caller asked for.
        requested: usize,
        /// How much new backing memory serving it would take.
        needed: usize,
        /// Bytes the pool holds from the system right now.
        reserved: usize,
        /// The configured cap (`PoolConfig::max_bytes`).
        cap: usize,
    },

    /// The system allocator refused to give the pool more memory.
    #[error("the system allocator could not provide {bytes} bytes for the memory pool")]
    OutOfMemory {
        /// The size of the region that could not be obtained.
        bytes: usize,
    },

    /// Changing the process environment was refused because it would not be sound: other
    /// threads exist (and may read the environment at the same time), or the platform gives no
    /// way to check that none do.
    #[error("cannot set {var}: {reason}")]
    EnvironmentBusy {
        /// The variable that was to be set.
        var: &'static str,
        /// Why it was refused, with what to do instead.
        reason: String,
    },

    /// The requested size cannot be represented (it overflows once rounded to a block size).
    #[error("allocation of {size} bytes is too large to represent")]
    SizeOverflow {
        /// The size the caller asked for.
        size: usize,
    },
}

impl From<CoreError> for candle_core::Error {
    fn from(e: CoreError) -> Self {
        candle_core::Error::wrap(e)
    }
}
