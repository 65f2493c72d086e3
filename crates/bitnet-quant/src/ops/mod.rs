//! The quantizers as candle custom ops. One folder per op; in each, `mod.rs` is the candle glue,
//! `cpu.rs`, `cuda.rs` (feature `cuda`) and `metal.rs` (feature `metal`) the kernels, so every
//! device's version of an op sits side by side. [`math`] holds the scalar formulas all kernels
//! share.
//!
//! * [`scales`]: per-block parameters `[blocks, 2]` (scale, aux), no gradient (a constant, as in
//!   the `x + (q - x).detach()` formulation of STE).
//! * [`quantize`]: `(x, params) -> q`, backward = the configured estimator.
//! * [`learnable`]: a soft-to-hard surrogate whose temperature is a `Var` (gradient w.r.t. `t`).
//! * [`lsq`]: multi-bit quantization with a learned step size (LSQ).
//! * [`bitlinear`]: BitLinear's norm, quantizers and GEMM as one op (CPU training fast path).
//! * [`linear`]: `x w^T` with a backward that needs no transpose node (used by `BitLinear`).
//! * [`rms_norm`]: RMSNorm fused into one op (forward) and two (backward), for [`crate::RmsNorm`].
//! * [`attention`]: causal softmax attention whose backward recomputes the scores (memory).
//! * [`relu`]: ReLU with a one-pass backward, for the activations between BitLinear layers.
//! * [`sparse`]: products with a mostly-zero input, which [`bitlinear`] takes for sparse data.
//! * [`gemv`]: `x w^T` for a few rows against a large f32/f16/bf16 weight (an output head).

pub mod attention;
#[doc(hidden)]
pub mod bench_support;
pub mod bitlinear;
pub(crate) mod cpu_util;
#[cfg(feature = "cuda")]
pub(crate) mod cuda_util;
pub mod gemv;
#[cfg(test)]
pub(crate) mod gpu_emulation;
pub mod learnable;
pub mod linear;
pub mod lsq;
pub mod math;
#[cfg(feature = "metal")]
pub(crate) mod metal_util;
pub mod quantize;
pub mod relu;
pub mod rms_norm;
pub mod scales;
pub(crate) mod slot;
pub mod sparse;
#[cfg(test)]
pub(crate) mod test_values;

pub use math::{EstKind, Kind};

/// Below this many values a CPU kernel runs on the calling thread: rayon's fork/join costs a few
/// microseconds, more than the whole kernel for a small layer's bias or a 256-wide row.
pub const PAR_MIN: usize = 1 << 15;

/// How the GPU kernels' per-block reductions split each quantization block of `block` values
/// (of `blocks`) among CUDA blocks or Metal threadgroups: `(splits, chunk, threads)`. A
/// per-tensor scale of a 4096x4096 matrix is one block of 16 M values; one CUDA block would
/// read it with one SM, so it is split into up to ~1000 chunks of at least 4096 values, reduced
/// again (in a fixed order) by a second kernel. Small blocks get fewer threads (a power of two
/// from 32 to 256) so that most of each group has work.
#[cfg(any(feature = "cuda", feature = "metal", test))]
pub(crate) fn reduction_splits(blocks: usize, block: usize) -> (usize, usize, usize) {
    let splits = 1024usize.div_ceil(blocks).min(block.div_ceil(4096)).max(1);
    let chunk = block.div_ceil(splits);
    let threads = chunk.next_power_of_two().clamp(32, 256);
    (splits, chunk, threads)
}

/// Whether a kernel over `n` values should split across rayon's pool: at least [`PAR_MIN`]
/// values and more than one thread. With one thread, handing the work to rayon's single worker
/// only adds a wake-up and a wait (measured: a sched_yield/futex pair per call, about 5 % of a
/// 1-thread training step) for no parallelism.
pub fn parallel(n: usize) -> bool {
    n >= PAR_MIN && rayon::current_num_threads() > 1
}
