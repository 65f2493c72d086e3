//! The integer dot products of packed inference: `sum(code * x)` over 2-bit weight codes (the
//! layout of [`PackedTernary`](crate::packed::PackedTernary)) and int8 activations.
//!
//! Kernels return the sum with the *codes* (0, 1, 2), not the levels (-1, 0, 1): the caller
//! subtracts `sum(x)` once per activation segment (`sum((c - 1) x) = sum(c x) - sum(x)`), which
//! is shared by every output row. Codes are then non-negative, which is what x86's
//! `maddubs` (unsigned x signed bytes) needs, and the subtraction leaves the inner loop.
//!
//! Variants, chosen at run time by [`Kernel::detect`]: [`Kernel::Avx2`] on x86-64 with AVX2,
//! [`Kernel::Neon`] on aarch64, and the portable [`Kernel::Scalar`] everywhere. All give
//! identical `i32` results (integer arithmetic, no overflow: `|sum| <= 2 * 128 * len`). There is
//! no AVX-512 variant yet: the machines we measure on have none, and an unmeasured kernel is a
//! liability.

#[cfg(target_arch = "aarch64")]
mod neon;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use super::layout::{BLOCK, BLOCK_BYTES, BLOCK_BYTES_1BIT};

/// An implementation of the packed dot products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Portable Rust, one weight at a time; the reference.
    Scalar,
    /// x86-64 AVX2: `vpmaddubsw` on 32 codes x 32 activations at a time.
    Avx2,
    /// aarch64 NEON: widening multiplies and pairwise accumulation, 16 lanes at a time.
    Neon,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub fn detect() -> Kernel {
        if Kernel::Avx2.is_available() {
            Kernel::Avx2
        } else if Kernel::Neon.is_available() {
            Kernel::Neon
        } else {
            Kernel::Scalar
        }
    }

    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            // NEON is part of the aarch64 baseline.
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every kernel this CPU can run (for tests and benches).
    pub fn available() -> Vec<Kernel> {
        [Kernel::Scalar, Kernel::Avx2, Kernel::Neon]
            .into_iter()
            .filter(|k| k.is_available())
            .collect()
    }

    /// `sum(code[i] * x[i])` where `code[i]` is weight `i` of `w` in the block layout.
    /// An unavailable kernel falls back to [`Kernel::Scalar`].
    ///
    /// # Panics
    /// If `w.len()` is not a multiple of 32 or `x.len() != 4 * w.len()`: the kernels read whole
    /// blocks, and checking here is what keeps their unchecked loads in bounds.
    ///
    /// ```
    /// use bitnet_quant::packed::kernels::Kernel;
    /// let w = [0b10_01_00_10u8; 32]; // codes 2, 0, 1, 2 -> levels +1, -1, 0, +1 per quarter
    /// let x = [1i8; 128];
    /// let k = Kernel::detect();
    /// assert_eq!(k.dot(&w, &x), 32 * (2 + 0 + 1 + 2));
    /// assert_eq!(k.dot(&w, &x), Kernel::Scalar.dot(&w, &x));
    /// ```
    pub fn dot(self, w: &[u8], x: &[i8]) -> i32 {
        check(w, x);
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 is present (checked just now, cached by std) and `check` ensured the
            // lengths the kernel's unchecked loads rely on.
            Kernel::Avx2 if self.is_available() => unsafe { x86::dot_avx2(w, x) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: NEON is baseline on aarch64; `check` ensured the lengths.
            Kernel::Neon => unsafe { neon::dot_neon(w, x) },
            _ => scalar::dot(w, x),
        }
    }

    /// Four dot products of one weight row with four activation rows: the weight codes are
    /// unpacked once and used four times (the batched path). Same contract as [`Self::dot`] for
    /// each `x`.
    pub fn dot4(self, w: &[u8], xs: [&[i8]; 4]) -> [i32; 4] {
        for x in xs {
            check(w, x);
        }
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `dot`.
            Kernel::Avx2 if self.is_available() => unsafe { x86::dot4_avx2(w, xs) },
            _ => xs.map(|x| self.dot(w, x)),
        }
    }
}

impl Kernel {
    /// `sum(code[i] * x[i])` over 1-bit weights (the binary layout of
    /// [`PackedTernary`](crate::packed::PackedTernary)), with `code = 2 * bit`: the level
    /// `2 bit - 1` plus one, so that the caller subtracts `sum(x)` exactly as for 2-bit codes.
    /// NEON runs the scalar kernel here.
    ///
    /// # Panics
    /// If `w.len()` is not a multiple of 16 or `x.len() != 8 * w.len()`.
    ///
    /// ```
    /// use bitnet_quant::packed::kernels::Kernel;
    /// let w = [0b0000_0001u8; 16]; // bit 0 set: weights 0..16 are +1, weights 16..128 are -1
    /// let x = [1i8; 128];
    /// let k = Kernel::detect();
    /// assert_eq!(k.dot_binary(&w, &x) - 128, 16 - 112); // sum(level * x)
    /// assert_eq!(k.dot_binary(&w, &x), Kernel::Scalar.dot_binary(&w, &x));
    /// ```
    pub fn dot_binary(self, w: &[u8], x: &[i8]) -> i32 {
        check_binary(w, x);
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 is present (checked just now) and `check_binary` ensured the lengths
            // the kernel's unchecked loads rely on.
            Kernel::Avx2 if self.is_available() => unsafe { x86::dot_binary_avx2(w, x) },
            _ => scalar::dot_binary(w, x),
        }
    }

    /// Four [`Self::dot_binary`] products of one weight row, unpacking the bits once.
    pub fn dot4_binary(self, w: &[u8], xs: [&[i8]; 4]) -> [i32; 4] {
        for x in xs {
            check_binary(w, x);
        }
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `dot_binary`.
            Kernel::Avx2 if self.is_available() => unsafe { x86::dot4_binary_avx2(w, xs) },
            _ => xs.map(|x| self.dot_binary(w, x)),
        }
    }
}

/// Whole blocks of `block_bytes` weight bytes, each holding `BLOCK` weights, and one activation
/// per weight: what the kernels' unchecked loads rely on. `what` names the kernel family.
#[inline(always)]
fn check_blocks(what: &str, w: &[u8], x: &[i8], block_bytes: usize) {
    let per_byte = BLOCK / block_bytes;
    assert!(
        w.len() % block_bytes == 0 && x.len() == per_byte * w.len(),
        "{what}: {} weight bytes (need a multiple of {block_bytes}) and {} activations (need {})",
        w.len(),
        x.len(),
        per_byte * w.len()
    );
}

#[inline(always)]
fn check(w: &[u8], x: &[i8]) {
    check_blocks("packed dot", w, x, BLOCK_BYTES);
}

#[inline(always)]
fn check_binary(w: &[u8], x: &[i8]) {
    check_blocks("packed binary dot", w, x, BLOCK_BYTES_1BIT);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(blocks: usize, seed: u64) -> (Vec<u8>, Vec<i8>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let w = (0..blocks * BLOCK_BYTES)
            .map(|_| {
                let mut b = 0u8;
                for j in 0..4 {
                    b |= rng.random_range(0..3u8) << (2 * j);
                }
                b
            })
            .collect();
        let x = (0..blocks * 4 * BLOCK_BYTES)
            .map(|_| rng.random::<i8>())
            .collect();
        (w, x)
    }

    #[test]
    fn every_kernel_matches_scalar() {
        for (blocks, seed) in [(1, 1), (2, 2), (7, 3), (32, 4), (54, 5)] {
            let (w, x) = random(blocks, seed);
            let expect = scalar::dot(&w, &x);
            for k in Kernel::available() {
                assert_eq!(k.dot(&w, &x), expect, "{k:?} blocks={blocks}");
            }
        }
    }

    #[test]
    fn extremes_do_not_overflow() {
        // All codes 2 with x = -128 everywhere: the largest magnitude per lane.
        let w = vec![0b1010_1010u8; 64 * BLOCK_BYTES];
        let x = vec![-128i8; 256 * BLOCK_BYTES];
        for k in Kernel::available() {
            assert_eq!(k.dot(&w, &x), -2 * 128 * 256 * 32, "{k:?}");
            assert_eq!(
                k.dot4(&w, [&x, &x, &x, &x]),
                [-2 * 128 * 256 * 32; 4],
                "{k:?}"
            );
        }
    }

    #[test]
    fn dot4_matches_dot() {
        let (w, _) = random(9, 7);
        let xs: Vec<Vec<i8>> = (0..4).map(|s| random(9, 10 + s).1).collect();
        for k in Kernel::available() {
            let got = k.dot4(&w, [&xs[0], &xs[1], &xs[2], &xs[3]]);
            for (g, x) in got.iter().zip(&xs) {
                assert_eq!(*g, scalar::dot(&w, x), "{k:?}");
            }
        }
    }

    fn random_bits(blocks: usize, seed: u64) -> (Vec<u8>, Vec<i8>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let w = (0..blocks * BLOCK_BYTES_1BIT)
            .map(|_| rng.random())
            .collect();
        let x = (0..blocks * 8 * BLOCK_BYTES_1BIT)
            .map(|_| rng.random::<i8>())
            .collect();
        (w, x)
    }

    #[test]
    fn binary_kernels_match_the_levels() {
        for (blocks, seed) in [(1, 1), (2, 2), (7, 3), (32, 4)] {
            let (w, x) = random_bits(blocks, seed);
            // Straight from the layout's definition: weight `b + 16 j` of a block is bit `j` of
            // byte `b`, level +1 for a set bit, -1 otherwise.
            let mut want = 0i32;
            for (i, &xv) in x.iter().enumerate() {
                let (blk, o) = (i / 128, i % 128);
                let bit = (w[blk * 16 + o % 16] >> (o / 16)) & 1;
                want += (2 * bit as i32 - 1) * xv as i32;
            }
            let sum_x: i32 = x.iter().map(|&v| v as i32).sum();
            for k in Kernel::available() {
                assert_eq!(k.dot_binary(&w, &x) - sum_x, want, "{k:?} blocks={blocks}");
                let xs = [&x[..], &x[..], &x[..], &x[..]];
                assert_eq!(k.dot4_binary(&w, xs), [want + sum_x; 4], "{k:?}");
            }
        }
    }

    #[test]
    fn binary_extremes_do_not_overflow() {
        let w = vec![0xFFu8; 64 * BLOCK_BYTES_1BIT];
        let x = vec![-128i8; 512 * BLOCK_BYTES_1BIT];
        for k in Kernel::available() {
            assert_eq!(k.dot_binary(&w, &x), -2 * 128 * 128 * 64, "{k:?}");
        }
    }

    #[test]
    #[should_panic(expected = "packed binary dot")]
    fn wrong_binary_lengths_panic() {
        Kernel::detect().dot_binary(&[0u8; 16], &[0i8; 64]);
    }

    #[test]
    #[should_panic(expected = "packed dot")]
    fn wrong_lengths_panic_before_any_load() {
        Kernel::detect().dot(&[0u8; 32], &[0i8; 64]);
    }
}
