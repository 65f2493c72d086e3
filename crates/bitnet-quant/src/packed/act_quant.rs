//! Int8 absmax quantization of activation rows for the packed matmul: `max|x|`, then
//! `clamp(round_ties_even(x * 127 / m), -128, 127)` and the sum of the levels. At 512 tokens of
//! 14336 inputs this is 7 M values per call, a tenth of the product's time in plain Rust (the
//! baseline build has no vector instructions wider than SSE2), so CPUs with AVX-512 get a
//! vector version with identical results.

use super::kernels::Kernel;
use crate::ops::math::round_clamped;

/// `max|x|` over `x` (0 for an empty row); NaN values are skipped as `f32::max` skips them,
/// except where the vector version meets one first (callers treat rows holding NaN apart).
pub(crate) fn max_abs(kernel: Kernel, x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx512Vnni && kernel.is_available() {
        // SAFETY: AVX-512 F is present (part of the kernel's check).
        return unsafe { x86::max_abs(x) };
    }
    let _ = kernel;
    x.iter().fold(0f32, |a, v| a.max(v.abs()))
}

/// Writes `q[i] = clamp(round_ties_even(x[i] * inv), -128, 127)` and returns the sum of the
/// levels. `q` must be as long as `x`.
pub(crate) fn quantize(kernel: Kernel, x: &[f32], inv: f32, q: &mut [i8]) -> i32 {
    assert_eq!(x.len(), q.len(), "activation quantization: lengths");
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx512Vnni && kernel.is_available() {
        // SAFETY: AVX-512 F/BW are present (part of the kernel's check); lengths checked above.
        return unsafe { x86::quantize(x, inv, q) };
    }
    let _ = kernel;
    quantize_scalar(x, inv, q)
}

fn quantize_scalar(x: &[f32], inv: f32, q: &mut [i8]) -> i32 {
    let mut sum = 0i32;
    for (v, d) in x.iter().zip(q.iter_mut()) {
        let l = round_clamped(v * inv, -128.0, 127.0) as i32;
        *d = l as i8;
        sum += l;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512 F must be available.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn max_abs(x: &[f32]) -> f32 {
        let mut acc = _mm512_setzero_ps();
        let chunks = x.chunks_exact(16);
        let tail = chunks.remainder();
        for c in chunks {
            acc = _mm512_max_ps(acc, _mm512_abs_ps(_mm512_loadu_ps(c.as_ptr())));
        }
        let m = _mm512_reduce_max_ps(acc);
        tail.iter().fold(m, |a, v| a.max(v.abs()))
    }

    /// # Safety
    /// AVX-512 F/BW must be available and `q.len() == x.len()`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn quantize(x: &[f32], inv: f32, q: &mut [i8]) -> i32 {
        let vinv = _mm512_set1_ps(inv);
        let (lo, hi) = (_mm512_set1_epi32(-128), _mm512_set1_epi32(127));
        let mut sum = _mm512_setzero_si512();
        let n = x.len() / 16 * 16;
        for i in (0..n).step_by(16) {
            // SAFETY: i + 16 <= n <= x.len() == q.len().
            let v = _mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(i)), vinv);
            // Round to nearest, ties to even, as `round_clamped`; out-of-range and NaN
            // become i32::MIN, which the clamp turns into -128 (never reached for finite rows:
            // |x * 127 / max|x|| <= 127).
            let r =
                _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            let r = _mm512_max_epi32(_mm512_min_epi32(r, hi), lo);
            sum = _mm512_add_epi32(sum, r);
            _mm_storeu_si128(
                q.as_mut_ptr().add(i) as *mut __m128i,
                _mm512_cvtepi32_epi8(r),
            );
        }
        _mm512_reduce_add_epi32(sum) + super::quantize_scalar(&x[n..], inv, &mut q[n..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn every_kernel_quantizes_as_the_formula() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        // Halves land on ties at inv = 1 (127 / 127): 2.5 -> 2, 3.5 -> 4, -0.5 -> 0.
        let ties: Vec<f32> = (-254..=254).map(|k| k as f32 * 0.5).collect();
        let rows: Vec<(Vec<f32>, f32)> = vec![
            (ties, 1.0),
            (
                (0..1000).map(|_| rng.random_range(-3.0..3.0f32)).collect(),
                127.0 / 3.0,
            ),
            (
                (0..37).map(|_| rng.random_range(-1.0..1.0f32)).collect(),
                127.0,
            ),
            (vec![1e-7, -1e-7, 0.0], 127.0 / 1e-5),
            // Beyond the range: clamped.
            (vec![200.0, -300.0, 127.6, -128.4, -128.6], 1.0),
        ];
        for (x, inv) in &rows {
            let want: Vec<i8> = x
                .iter()
                .map(|v| (v * inv).round_ties_even().clamp(-128.0, 127.0) as i8)
                .collect();
            let want_sum: i32 = want.iter().map(|&v| v as i32).sum();
            let want_max = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            for k in Kernel::available() {
                let mut q = vec![0i8; x.len()];
                assert_eq!(quantize(k, x, *inv, &mut q), want_sum, "{k:?}");
                assert_eq!(q, want, "{k:?}");
                assert_eq!(max_abs(k, x), want_max, "{k:?}");
            }
        }
    }
}
