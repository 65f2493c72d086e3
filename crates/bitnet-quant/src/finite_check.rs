//! When the GPU quantizers report NaN or infinite input.
//!
//! Every quantizer fails on non-finite input ([`QuantError::NonFinite`]). On the CPU the check is
//! a scan of the values. On CUDA the scales kernel counts such values on the GPU, and by default
//! each quantizer call copies the count back to fail at once: a host synchronisation per call,
//! dozens per training step. Inside [`defer_finite_checks`] the CUDA kernels add their counts
//! to one counter per device instead, without copying anything back, and
//! [`check_deferred_finite`] reads and resets it: once per training step, as the error then
//! names the step rather than the op.
//!
//! ```
//! use bitnet_quant::{check_deferred_finite, defer_finite_checks, Estimator, Quantizer, Scheme};
//! use candle_core::{Device, Tensor};
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu; // on CUDA, the error below waits for check_deferred_finite
//! let q = Quantizer::new(Scheme::TernaryAbsmean, Estimator::Identity)?;
//! let x = Tensor::new(&[1f32, f32::NAN], &dev)?;
//! let deferred = defer_finite_checks();
//! assert!(q.quantize(&x).is_err()); // the CPU never defers
//! check_deferred_finite(&dev)?; // nothing was deferred on the CPU
//! drop(deferred);
//! # Ok(()) }
//! ```

#[cfg(feature = "cuda")]
use crate::error::QuantError;
use candle_core::{Device, Result};
use std::cell::Cell;

thread_local! {
    static DEFERRED: Cell<bool> = const { Cell::new(false) };
}

/// While alive, the CUDA quantizers called on this thread count non-finite input on the GPU
/// for [`check_deferred_finite`] instead of failing at once (see the module docs). Dropping it
/// restores the previous mode.
#[derive(Debug)]
#[must_use = "the checks are deferred only while the guard is alive"]
pub struct DeferredFiniteChecks {
    previous: bool,
}

/// Defers the CUDA quantizers' NaN/infinity checks on this thread (see the module docs).
pub fn defer_finite_checks() -> DeferredFiniteChecks {
    let previous = DEFERRED.with(|d| d.replace(true));
    DeferredFiniteChecks { previous }
}

impl Drop for DeferredFiniteChecks {
    fn drop(&mut self) {
        DEFERRED.with(|d| d.set(self.previous));
    }
}

/// Whether the CUDA quantizers on this thread defer their checks.
pub fn finite_checks_deferred() -> bool {
    DEFERRED.with(Cell::get)
}

/// Reads and resets the non-finite count the CUDA quantizers accumulated on `device` while
/// deferred: [`QuantError::NonFinite`] with the count if it is not 0 (one copy to the host, which
/// waits for the kernels queued so far). Devices that never defer (CPU, Metal) have nothing to
/// report.
pub fn check_deferred_finite(device: &Device) -> Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => {
            let count = crate::ops::scales::cuda::take_deferred(dev)?;
            if count > 0 {
                return Err(QuantError::NonFinite {
                    op: "check_deferred_finite",
                    count,
                }
                .into());
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guard sets the mode on its thread only and restores the previous one, nested too.
    #[test]
    fn the_guard_scopes_the_mode() {
        assert!(!finite_checks_deferred());
        {
            let _outer = defer_finite_checks();
            assert!(finite_checks_deferred());
            std::thread::spawn(|| assert!(!finite_checks_deferred()))
                .join()
                .unwrap();
            {
                let _inner = defer_finite_checks();
                assert!(finite_checks_deferred());
            }
            assert!(finite_checks_deferred());
        }
        assert!(!finite_checks_deferred());
        check_deferred_finite(&Device::Cpu).unwrap();
    }
}
