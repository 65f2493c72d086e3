//! The knobs of a [`HybridMemoryPool`](super::HybridMemoryPool), checked once at construction.

use crate::CoreError;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
const GIB: usize = 1 << 30;

/// The largest alignment any pool honours. Backing regions are aligned to a page, and every slot
/// or block offset is a multiple of its own (power-of-two) size, so blocks are aligned to
/// `min(block size, MAX_ALIGN)`; asking for more than a page would need larger region alignment
/// for no use we know of.
pub const MAX_ALIGN: usize = 4096;

/// The smallest alignment any pool gives. 64 bytes is a cache line and the widest SIMD register
/// (AVX-512) we vectorise for, and it lets typed views of every primitive type be infallible.
pub const MIN_ALIGN: usize = 64;

/// Configuration of a [`HybridMemoryPool`](super::HybridMemoryPool).
///
/// Every size is in bytes. [`PoolConfig::validate`] (called by `HybridMemoryPool::new`) rejects
/// out-of-range values with an error naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Requests strictly smaller than this go to the size-class slabs, the rest to the buddy pool.
    /// A power of two in 4 KiB..=64 MiB; default 1 MiB.
    pub small_threshold: usize,
    /// Size of each chunk a size class carves its slots from. A power of two, at least
    /// `small_threshold` (so the largest class fits a chunk) and at most 1 GiB;
    /// default 1 MiB.
    pub slab_chunk_size: usize,
    /// Size of each buddy arena, grown one at a time on demand. A power of two, at least
    /// `small_threshold` and at most 64 GiB; default 64 MiB. A request larger than this gets an
    /// arena of its own, rounded up to a power of two.
    pub arena_size: usize,
    /// Cap on the memory the pool holds from the system (slab chunks plus arenas). Requests that
    /// would exceed it fail with [`CoreError::CapExceeded`]. At least `arena_size` and at least
    /// `slab_chunk_size`; default 16 GiB.
    pub max_bytes: usize,
    /// Alignment every buffer gets even when the caller asks for less. A power of two in
    /// 64..=4096; default 64.
    pub min_align: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            small_threshold: MIB,
            slab_chunk_size: MIB,
            arena_size: 64 * MIB,
            max_bytes: 16 * GIB,
            min_align: MIN_ALIGN,
        }
    }
}

fn invalid(field: &'static str, value: usize, allowed: &'static str) -> CoreError {
    CoreError::InvalidConfig {
        field,
        value: value.to_string(),
        allowed,
    }
}

fn pow2_in(
    field: &'static str,
    value: usize,
    lo: usize,
    hi: usize,
    allowed: &'static str,
) -> Result<(), CoreError> {
    if value.is_power_of_two() && (lo..=hi).contains(&value) {
        Ok(())
    } else {
        Err(invalid(field, value, allowed))
    }
}

impl PoolConfig {
    /// Checks every field, returning the first violation with the field's name and allowed range.
    pub fn validate(&self) -> Result<(), CoreError> {
        pow2_in(
            "small_threshold",
            self.small_threshold,
            4 * KIB,
            64 * MIB,
            "a power of two in 4 KiB..=64 MiB",
        )?;
        if self.slab_chunk_size < self.small_threshold {
            return Err(invalid(
                "slab_chunk_size",
                self.slab_chunk_size,
                "a power of two, >= small_threshold and <= 1 GiB",
            ));
        }
        pow2_in(
            "slab_chunk_size",
            self.slab_chunk_size,
            4 * KIB,
            GIB,
            "a power of two, >= small_threshold and <= 1 GiB",
        )?;
        if self.arena_size < self.small_threshold {
            return Err(invalid(
                "arena_size",
                self.arena_size,
                "a power of two, >= small_threshold and <= 64 GiB",
            ));
        }
        pow2_in(
            "arena_size",
            self.arena_size,
            4 * KIB,
            64 * GIB,
            "a power of two, >= small_threshold and <= 64 GiB",
        )?;
        if self.max_bytes < self.arena_size || self.max_bytes < self.slab_chunk_size {
            return Err(invalid(
                "max_bytes",
                self.max_bytes,
                "at least arena_size and at least slab_chunk_size",
            ));
        }
        pow2_in(
            "min_align",
            self.min_align,
            MIN_ALIGN,
            MAX_ALIGN,
            "a power of two in 64..=4096",
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        PoolConfig::default().validate().unwrap();
    }

    #[test]
    fn validation_names_the_offending_field() {
        let d = PoolConfig::default;
        let cases: Vec<(&str, PoolConfig)> = vec![
            (
                "small_threshold",
                PoolConfig {
                    small_threshold: 3000,
                    ..d()
                },
            ),
            (
                "small_threshold",
                PoolConfig {
                    small_threshold: 1024,
                    ..d()
                },
            ),
            (
                "small_threshold",
                PoolConfig {
                    small_threshold: 128 * MIB,
                    ..d()
                },
            ),
            (
                "slab_chunk_size",
                PoolConfig {
                    slab_chunk_size: 512 * KIB,
                    ..d()
                },
            ),
            (
                "slab_chunk_size",
                PoolConfig {
                    slab_chunk_size: 3 * MIB,
                    ..d()
                },
            ),
            (
                "arena_size",
                PoolConfig {
                    arena_size: 512 * KIB,
                    ..d()
                },
            ),
            (
                "arena_size",
                PoolConfig {
                    arena_size: 100 * MIB,
                    ..d()
                },
            ),
            (
                "max_bytes",
                PoolConfig {
                    max_bytes: 32 * MIB,
                    ..d()
                },
            ),
            (
                "min_align",
                PoolConfig {
                    min_align: 32,
                    ..d()
                },
            ),
            (
                "min_align",
                PoolConfig {
                    min_align: 96,
                    ..d()
                },
            ),
            (
                "min_align",
                PoolConfig {
                    min_align: 8192,
                    ..d()
                },
            ),
        ];
        for (field, cfg) in cases {
            let err = cfg.validate().expect_err(field);
            match &err {
                CoreError::InvalidConfig { field: f, .. } => assert_eq!(*f, field, "{cfg:?}"),
                other => panic!("unexpected error {other:?}"),
            }
            let msg = err.to_string();
            assert!(msg.contains(field), "{msg}");
            assert!(msg.contains("allowed"), "{msg}");
        }
    }
}
