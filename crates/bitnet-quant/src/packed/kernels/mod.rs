//! The integer dot products of packed inference: `sum(code * x)` over 2-bit weight codes (the
//! layout of [`PackedTernary`](crate::packed::PackedTernary)) and int8 activations.
//!
//! Kernels return the sum with the *codes* (0, 1, 2), not the levels (-1, 0, 1): the caller
//! subtracts `sum(x)` once per activation segment (`sum((c - 1) x) = sum(c x) - sum(x)`), which
//! is shared by every output row. Codes are then non-negative, which is what x86's
//! `vpmaddubsw` and `vpdpbusd` (unsigned x signed bytes) need, and the subtraction leaves the
//! inner loop.
//!
//! Variants, chosen at run time by [`Kernel::detect`] (fastest first): [`Kernel::Avx512Vnni`]
//! and [`Kernel::AvxVnni`] on x86-64 with those instructions, [`Kernel::Avx2`], [`Kernel::Neon`]
//! on aarch64, and the portable [`Kernel::Scalar`] everywhere. The environment variable
//! `BITNET_PACKED_KERNEL` (`scalar`, `avx2`, `avxvnni`, `avx512vnni`, `neon`) overrides the
//! choice, for comparing kernels on one machine; [`Kernel::available`] lists what the CPU runs,
//! which is how the tests check every variant. All give identical `i32` results (integer
//! arithmetic, no overflow: `|sum| <= 3 * 128 * len`).
//!
//! [`Kernel::dot_tile`] is the batched form: `R` weight rows against `T` token rows, each block
//! of codes unpacked once for all tokens; the matrix product
//! ([`PackedBitLinear`](crate::packed::PackedBitLinear)) is built from such tiles.

#[cfg(target_arch = "aarch64")]
mod neon;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod vnni;
#[cfg(target_arch = "x86_64")]
mod x86;

use super::layout::{BLOCK, BLOCK_BYTES, BLOCK_BYTES_1BIT};

/// The environment variable that overrides [`Kernel::detect`].
pub const KERNEL_ENV: &str = "BITNET_PACKED_KERNEL";

/// An implementation of the packed dot products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Portable Rust, one weight at a time; the reference.
    Scalar,
    /// x86-64 AVX2: `vpmaddubsw` on 32 codes x 32 activations at a time.
    Avx2,
    /// aarch64 NEON: widening multiplies and pairwise accumulation, 16 lanes at a time.
    Neon,
    /// x86-64 AVX-VNNI (256-bit `vpdpbusd`, for CPUs that have it without AVX-512). 1-bit
    /// weights run the AVX2 kernel.
    AvxVnni,
    /// x86-64 AVX-512 F/BW/VNNI: 512-bit `vpdpbusd`, 64 codes x 64 activations per
    /// instruction. 1-bit weights run the AVX2 kernel.
    Avx512Vnni,
}

impl Kernel {
    /// Every variant, fastest first.
    const ALL: [Kernel; 5] = [
        Kernel::Avx512Vnni,
        Kernel::AvxVnni,
        Kernel::Avx2,
        Kernel::Neon,
        Kernel::Scalar,
    ];

    /// The fastest kernel this CPU runs, unless `BITNET_PACKED_KERNEL` names another one that
    /// it runs (an unknown or unavailable name is ignored, with a line on stderr). Decided once
    /// per process: every layer built afterwards gets the same kernel.
    pub fn detect() -> Kernel {
        static CHOSEN: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| Kernel::choose(std::env::var(KERNEL_ENV).ok().as_deref()))
    }

    /// [`Self::detect`] with the override `name`.
    fn choose(name: Option<&str>) -> Kernel {
        if let Some(name) = name {
            match Kernel::from_name(name) {
                Some(k) if k.is_available() => return k,
                Some(_) => eprintln!("{KERNEL_ENV}={name}: this CPU cannot run it; detecting"),
                None => eprintln!(
                    "{KERNEL_ENV}={name}: unknown (scalar, avx2, avxvnni, avx512vnni, neon); detecting"
                ),
            }
        }
        Kernel::ALL
            .into_iter()
            .find(|k| k.is_available())
            .unwrap_or(Kernel::Scalar)
    }

    /// The kernel called `name` (lower case, as [`Self::name`] gives it).
    pub fn from_name(name: &str) -> Option<Kernel> {
        Kernel::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The kernel's name in `BITNET_PACKED_KERNEL`.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::Neon => "neon",
            Kernel::AvxVnni => "avxvnni",
            Kernel::Avx512Vnni => "avx512vnni",
        }
    }

    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("avxvnni")
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            // NEON is part of the aarch64 baseline.
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every kernel this CPU can run (for tests and benches), fastest first.
    pub fn available() -> Vec<Kernel> {
        Kernel::ALL
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
            Kernel::AvxVnni | Kernel::Avx512Vnni => self.dot_tile([w], [x])[0][0],
            _ => scalar::dot(w, x),
        }
    }

    /// Four dot products of one weight row with four activation rows: the weight codes are
    /// unpacked once and used four times (the batched path). Same contract as [`Self::dot`] for
    /// each `x`.
    pub fn dot4(self, w: &[u8], xs: [&[i8]; 4]) -> [i32; 4] {
        self.dot_tile([w], xs)[0]
    }

    /// `out[r][t] = sum(code(w[r]) * x[t])` for `R` weight rows and `T` activation rows: each
    /// block of codes is unpacked once for all `T` tokens and each block of activations loaded
    /// once for all `R` rows. Same contract as [`Self::dot`] for every pair; all `w` must have
    /// the same length.
    ///
    /// ```
    /// use bitnet_quant::packed::kernels::Kernel;
    /// let (w0, w1) = ([0b10_10_10_10u8; 32], [0b01_01_01_01u8; 32]); // all +1, all 0
    /// let (x0, x1, x2) = ([1i8; 128], [-2i8; 128], [3i8; 128]);
    /// let k = Kernel::detect();
    /// // Codes are level + 1: 2 and 1 here.
    /// let want = [[256, -512, 768], [128, -256, 384]];
    /// assert_eq!(k.dot_tile([&w0, &w1], [&x0, &x1, &x2]), want);
    /// ```
    pub fn dot_tile<const R: usize, const T: usize>(
        self,
        w: [&[u8]; R],
        x: [&[i8]; T],
    ) -> [[i32; T]; R] {
        for wr in w {
            assert_eq!(
                wr.len(),
                w[0].len(),
                "packed dot tile: rows of unequal length"
            );
            for xt in x {
                check(wr, xt);
            }
        }
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the features are present (checked just now, cached by std) and the checks
            // above ensured the lengths the kernels' unchecked loads rely on.
            Kernel::Avx512Vnni if self.is_available() => unsafe { vnni::tile_avx512(w, x) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Kernel::AvxVnni if self.is_available() => unsafe { vnni::tile_avxvnni(w, x) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Kernel::Avx2 if self.is_available() => unsafe { x86::tile_avx2(w, x) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: NEON is baseline on aarch64; the checks ensured the lengths.
            Kernel::Neon => w.map(|w| x.map(|x| unsafe { neon::dot_neon(w, x) })),
            _ => scalar::tile(w, x),
        }
    }

    /// The kernel that runs 1-bit weights for this one: the VNNI variants have no 1-bit kernel
    /// of their own (their CPUs all have AVX2).
    fn binary_kernel(self) -> Kernel {
        match self {
            Kernel::AvxVnni | Kernel::Avx512Vnni => Kernel::Avx2,
            k => k,
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
        match self.binary_kernel() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 is present (checked just now) and `check_binary` ensured the lengths
            // the kernel's unchecked loads rely on.
            Kernel::Avx2 if Kernel::Avx2.is_available() => unsafe { x86::dot_binary_avx2(w, x) },
            _ => scalar::dot_binary(w, x),
        }
    }

    /// Four [`Self::dot_binary`] products of one weight row, unpacking the bits once.
    pub fn dot4_binary(self, w: &[u8], xs: [&[i8]; 4]) -> [i32; 4] {
        for x in xs {
            check_binary(w, x);
        }
        match self.binary_kernel() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `dot_binary`.
            Kernel::Avx2 if Kernel::Avx2.is_available() => unsafe { x86::dot4_binary_avx2(w, xs) },
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

    /// Codes 0..=3 at random (3 never occurs in a packed weight, but the kernels must still be
    /// exact on every byte).
    fn random_codes(bytes: usize, rng: &mut impl Rng) -> Vec<u8> {
        (0..bytes).map(|_| rng.random()).collect()
    }

    /// `sum(code * x)` straight from the layout's definition: weight `i` of a block is bits
    /// `2 (i / 32)..` of byte `i % 32`.
    fn by_definition(w: &[u8], x: &[i8]) -> i32 {
        x.iter()
            .enumerate()
            .map(|(i, &xv)| {
                let (blk, o) = (i / BLOCK, i % BLOCK);
                let code = (w[blk * BLOCK_BYTES + o % 32] >> (2 * (o / 32))) & 3;
                code as i32 * xv as i32
            })
            .sum()
    }

    fn check_tile<const R: usize, const T: usize>(blocks: usize, seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let ws: Vec<Vec<u8>> = (0..R)
            .map(|_| random_codes(blocks * BLOCK_BYTES, &mut rng))
            .collect();
        let xs: Vec<Vec<i8>> = (0..T)
            .map(|_| (0..blocks * BLOCK).map(|_| rng.random()).collect())
            .collect();
        let w: [&[u8]; R] = std::array::from_fn(|r| &ws[r][..]);
        let x: [&[i8]; T] = std::array::from_fn(|t| &xs[t][..]);
        let want: [[i32; T]; R] =
            std::array::from_fn(|r| std::array::from_fn(|t| by_definition(&ws[r], &xs[t])));
        for k in Kernel::available() {
            assert_eq!(k.dot_tile(w, x), want, "{k:?} R={R} T={T} blocks={blocks}");
        }
    }

    #[test]
    fn every_tile_matches_the_definition() {
        for (blocks, seed) in [(1, 1), (2, 2), (3, 3), (7, 4), (112, 5)] {
            check_tile::<1, 1>(blocks, seed);
            check_tile::<1, 4>(blocks, seed);
            check_tile::<2, 3>(blocks, seed);
            check_tile::<2, 4>(blocks, seed);
            check_tile::<4, 1>(blocks, seed);
            check_tile::<4, 2>(blocks, seed);
            check_tile::<4, 3>(blocks, seed);
            check_tile::<4, 4>(blocks, seed);
            check_tile::<3, 5>(blocks, seed);
            check_tile::<8, 1>(blocks, seed);
        }
    }

    #[test]
    fn tiles_longer_than_a_lane_chunk_do_not_overflow() {
        // Code 3 against -128 everywhere is the largest product; 8197 blocks run past the
        // VNNI kernels' lane flush (every 8192 blocks).
        let blocks = 8197;
        let w = vec![0xFFu8; blocks * BLOCK_BYTES];
        let x = vec![-128i8; blocks * BLOCK];
        let want = -3 * 128 * (blocks * BLOCK) as i32;
        for k in Kernel::available() {
            assert_eq!(
                k.dot_tile([&w[..]; 4], [&x[..]; 2]),
                [[want; 2]; 4],
                "{k:?}"
            );
            assert_eq!(k.dot_tile([&w[..]], [&x[..]]), [[want]], "{k:?}");
        }
    }

    #[test]
    fn names_round_trip_and_the_override_picks_an_available_kernel() {
        for k in Kernel::ALL {
            assert_eq!(Kernel::from_name(k.name()), Some(k));
        }
        assert_eq!(Kernel::from_name("avx3"), None);
        let best = Kernel::choose(None);
        assert_eq!(best, Kernel::available()[0]);
        for k in Kernel::available() {
            assert_eq!(Kernel::choose(Some(k.name())), k);
        }
        assert_eq!(Kernel::choose(Some("no-such-kernel")), best);
        for k in Kernel::ALL.into_iter().filter(|k| !k.is_available()) {
            assert_eq!(Kernel::choose(Some(k.name())), best, "{k:?}");
        }
    }

    #[test]
    #[should_panic(expected = "unequal length")]
    fn tile_rows_of_unequal_length_panic() {
        Kernel::detect().dot_tile([&[0u8; 32][..], &[0u8; 64][..]], [&[0i8; 128][..]]);
    }
}
