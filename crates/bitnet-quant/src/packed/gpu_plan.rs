//! Launch shapes of the CUDA packed forward (`cuda.rs`), kept apart from the CUDA code so that
//! the host emulation of the kernels (`cuda_emulation.rs`) runs them without the `cuda` feature.

/// One instantiation of the matmul kernel: `(name suffix, warps per block, rows per warp,
/// tokens per tile)`; must match the `BQ_MM` lines of `SRC` in `cuda.rs`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Variant {
    pub(crate) name: &'static str,
    pub(crate) warps: usize,
    pub(crate) rows: usize,
    pub(crate) tokens: usize,
}

impl Variant {
    /// Batch 1 is a GEMV: one row per warp gives the most warps, to keep enough loads in flight
    /// to reach memory bandwidth. Larger batches reuse each weight load for a tile of tokens
    /// and each activation load for several rows.
    pub(crate) fn for_tokens(tokens: usize) -> Variant {
        match tokens {
            1 => Variant {
                name: "gemv",
                warps: 8,
                rows: 1,
                tokens: 1,
            },
            2..=4 => Variant {
                name: "small",
                warps: 4,
                rows: 2,
                tokens: 4,
            },
            _ => Variant {
                name: "tile",
                warps: 4,
                rows: 4,
                tokens: 8,
            },
        }
    }
}

/// The most CUDA blocks along the grid's y axis; the kernels loop over further token tiles.
pub(crate) const MAX_GRID_Y: usize = 65_535;

/// How the one-launch kernel runs: its variant, CUDA blocks and dynamic shared memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct FusedPlan {
    pub(crate) variant: Variant,
    pub(crate) blocks: usize,
    pub(crate) shared_bytes: usize,
}

/// Dynamic shared memory the one-launch kernel may use for the levels: the 48 KiB a block gets
/// without opting in, less the kernel's static arrays (at most about 7 KiB).
pub(crate) const FUSED_MAX_LEVEL_BYTES: usize = 40 * 1024;

/// CUDA blocks of the one-launch kernel per streaming multiprocessor: each block quantizes the
/// whole input again, so more blocks than the GPU runs at once would only add that work.
pub(crate) const FUSED_BLOCKS_PER_SM: usize = 2;

/// The one-launch plan for `tokens` rows of `xrow` padded levels and `out` output rows on a GPU
/// of `sms` multiprocessors, or `None` for the two-launch path (more than 4 tokens, or levels
/// beyond [`FUSED_MAX_LEVEL_BYTES`]).
pub(crate) fn fused_plan(tokens: usize, xrow: usize, out: usize, sms: usize) -> Option<FusedPlan> {
    if tokens > 4 || tokens * xrow > FUSED_MAX_LEVEL_BYTES {
        return None;
    }
    let variant = Variant::for_tokens(tokens);
    let groups = out.div_ceil(variant.warps * variant.rows);
    Some(FusedPlan {
        variant,
        blocks: groups.clamp(1, sms.max(1) * FUSED_BLOCKS_PER_SM),
        shared_bytes: tokens * xrow,
    })
}

/// The fewest tokens the tensor-core kernel takes: below, most of its 64-token tile would be
/// padding, and the `dp4a` kernels reuse each weight load for up to 8 tokens anyway.
pub(crate) const MMA_MIN_TOKENS: usize = 16;

/// Whether `tokens` rows go to the tensor-core kernel on a GPU of compute capability
/// `(major, minor)`: `mma.sync` on s8 needs sm_80; older GPUs keep the `dp4a` kernels.
pub(crate) fn uses_mma(tokens: usize, capability: (i32, i32)) -> bool {
    tokens >= MMA_MIN_TOKENS && capability.0 >= 8
}

/// Rows and tokens of one block of the tensor-core kernel (`BQ_TM`, `BQ_TN` in `cuda.rs`).
pub(crate) const MMA_TILE: (usize, usize) = (64, 64);
