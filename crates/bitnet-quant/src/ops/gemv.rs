//! `x w^T` for a few rows of `x` against a large f32, f16 or bf16 weight on the CPU: a language
//! model's output head (and 16-bit dense layers) at decode time.
//!
//! A decode step multiplies one token by every row of the head once, so its time is the time to
//! read the weight: bitnet-b1.58-2B-4T's tied 128256 x 2560 embedding is 1.3 GB in f32 and half
//! that in 16 bits. candle's CPU GEMM does not turn the halved bytes into speed (on bf16 it is
//! several times slower than on f32, on f16 barely faster), so this GEMV converts 16-bit weights
//! to f32 in registers as it streams them (AVX-512F; AVX2 with F16C and FMA; portable Rust
//! elsewhere) and splits the weight's rows over rayon's threads. Sums are f32 with four
//! accumulators per row, so results differ from candle's GEMM by rounding only.
//!
//! ```
//! use bitnet_quant::ops::gemv::linear_t;
//! use candle_core::{DType, Device, Tensor};
//! # fn main() -> candle_core::Result<()> {
//! let w = Tensor::new(&[[1f32, 2.0, 3.0], [0.5, -1.0, 0.0]], &Device::Cpu)?.to_dtype(DType::BF16)?;
//! let x = Tensor::new(&[[1f32, 1.0, 1.0]], &Device::Cpu)?;
//! assert_eq!(linear_t(&x, &w)?.to_vec2::<f32>()?, [[6.0, -0.5]]);
//! # Ok(()) }
//! ```

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor, D};
use half::{bf16, f16};
use rayon::prelude::*;

/// Rows of `x` up to which [`linear_t`] runs the GEMV on an f32 weight. With more, candle's GEMM
/// reuses each loaded weight across enough rows to be the faster one. 16-bit weights take the
/// GEMV in groups of this many rows whatever their number: candle's CPU GEMM is slower on them
/// than on f32 (bf16 ten times), and converting the weight to f32 would cost twice its bytes.
pub const MAX_ROWS: usize = 8;

/// Output features per rayon task: 64 rows of a 2560-wide weight are 320 KB in 16 bits, enough
/// work to hide the task's overhead, and 2004 tasks for a 128256-row head to balance the threads.
const CHUNK: usize = 64;

/// `x w^T` in f32: `x` `[.., k]` (any float dtype), `w` `[n, k]` (f32, f16 or bf16), result
/// `[.., n]` f32. On the CPU, with a contiguous `w`, nothing to differentiate, and a 16-bit `w`
/// or at most [`MAX_ROWS`] rows of `x`, the GEMV of this module (`x` in f32); otherwise candle's
/// matmul in `w`'s dtype, cast to f32.
pub fn linear_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, k) = w.dims2()?;
    let rows = match x.dim(D::Minus1)? {
        xk if xk == k && k > 0 => x.elem_count() / k,
        _ => 0,
    };
    let sixteen = matches!(w.dtype(), DType::F16 | DType::BF16);
    let fast = rows >= 1
        && (rows <= MAX_ROWS || sixteen)
        && x.device().is_cpu()
        && w.device().is_cpu()
        && w.is_contiguous()
        && !x.track_op()
        && !w.track_op();
    if !fast {
        return matmul_in_w_dtype(x, w);
    }
    let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let path = Path::detect();
    let (storage, layout) = w.storage_and_layout();
    let span = layout.start_offset()..layout.start_offset() + n * k;
    let out = match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => gemv_rows(path, &v[span], &xs, n, k),
        Storage::Cpu(CpuStorage::F16(v)) => gemv_rows(path, &v[span], &xs, n, k),
        Storage::Cpu(CpuStorage::BF16(v)) => gemv_rows(path, &v[span], &xs, n, k),
        _ => {
            drop(storage);
            return matmul_in_w_dtype(x, w);
        }
    };
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("x has a last dimension") = n;
    Tensor::from_vec(out, dims, &Device::Cpu)
}

/// What [`linear_t`] falls back to: candle's matmul in `w`'s dtype, cast to f32.
fn matmul_in_w_dtype(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.to_dtype(w.dtype())?
        .broadcast_matmul(&w.t()?)?
        .to_dtype(DType::F32)
}

/// The instruction set the dot products run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Path {
    fn detect() -> Path {
        static CHOSEN: std::sync::OnceLock<Path> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| Path::available().into_iter().next().unwrap_or(Path::Scalar))
    }

    /// Every path this CPU runs, fastest first.
    fn available() -> Vec<Path> {
        #[allow(unused_mut)]
        let mut paths = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                paths.push(Path::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                paths.push(Path::Avx2);
            }
        }
        paths.push(Path::Scalar);
        paths
    }
}

/// A weight element: f32, f16 or bf16, with the dot product of each path.
trait Elem: Copy + Send + Sync {
    fn to_f32(self) -> f32;
    fn dot(path: Path, w: &[Self], x: &[f32]) -> f32;
}

macro_rules! elem {
    ($t:ty, $conv:expr, $d512:ident, $d256:ident) => {
        impl Elem for $t {
            #[inline(always)]
            fn to_f32(self) -> f32 {
                $conv(self)
            }

            #[inline(always)]
            fn dot(path: Path, w: &[Self], x: &[f32]) -> f32 {
                match path {
                    Path::Scalar => dot_scalar(w, x),
                    // SAFETY: `Path::available` offered these paths only where the CPU has
                    // the features their functions enable; the slices have equal lengths.
                    #[cfg(target_arch = "x86_64")]
                    Path::Avx512 => unsafe { x86::$d512(w, x) },
                    #[cfg(target_arch = "x86_64")]
                    Path::Avx2 => unsafe { x86::$d256(w, x) },
                }
            }
        }
    };
}

elem!(f32, |v: f32| v, dot512_f32, dot256_f32);
elem!(f16, |v: f16| v.to_f32(), dot512_f16, dot256_f16);
elem!(bf16, |v: bf16| v.to_f32(), dot512_bf16, dot256_bf16);

/// The portable dot product: four accumulators, as the vector paths have lanes.
fn dot_scalar<E: Elem>(w: &[E], x: &[f32]) -> f32 {
    let mut acc = [0f32; 4];
    let mut wc = w.chunks_exact(4);
    let mut xc = x.chunks_exact(4);
    for (w4, x4) in (&mut wc).zip(&mut xc) {
        for j in 0..4 {
            acc[j] += w4[j].to_f32() * x4[j];
        }
    }
    let tail: f32 = wc
        .remainder()
        .iter()
        .zip(xc.remainder())
        .map(|(w, x)| w.to_f32() * x)
        .sum();
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// [`gemv`] over `x`'s rows [`MAX_ROWS`] at a time (each group reads `w` once), concatenated.
fn gemv_rows<E: Elem>(path: Path, w: &[E], x: &[f32], n: usize, k: usize) -> Vec<f32> {
    x.chunks(MAX_ROWS * k)
        .flat_map(|rows| gemv(path, w, rows, n, k))
        .collect()
}

/// `out[r * n + j] = dot(w row j, x row r)` for `rows = x.len() / k` rows of `x`.
fn gemv<E: Elem>(path: Path, w: &[E], x: &[f32], n: usize, k: usize) -> Vec<f32> {
    let rows = x.len() / k;
    // Feature-major while computing, so that each task writes one contiguous piece.
    let mut by_feature = vec![0f32; n * rows];
    by_feature
        .par_chunks_mut(CHUNK * rows)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (j, o) in chunk.chunks_mut(rows).enumerate() {
                let row = c * CHUNK + j;
                let wr = &w[row * k..(row + 1) * k];
                for (r, o) in o.iter_mut().enumerate() {
                    *o = E::dot(path, wr, &x[r * k..(r + 1) * k]);
                }
            }
        });
    if rows == 1 {
        return by_feature;
    }
    (0..rows * n)
        .map(|i| by_feature[(i % n) * rows + i / n])
        .collect()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    /// How far ahead of the loads the prefetch hint points, in bytes.
    const PREFETCH: usize = 2048;

    /// A dot product over `LANES`-wide vectors, four accumulators, the tail in scalar code;
    /// `$load` turns the element pointer `$p` into a vector of f32.
    macro_rules! dot {
        ($name:ident, $feat:literal, $t:ty, $vec:ty, $lanes:literal, $zero:ident, $fma:ident,
         $loadx:ident, $sum:ident, |$p:ident| $load:expr) => {
            #[target_feature(enable = $feat)]
            pub unsafe fn $name(w: &[$t], x: &[f32]) -> f32 {
                debug_assert_eq!(w.len(), x.len());
                let k = w.len();
                let (wp, xp) = (w.as_ptr(), x.as_ptr());
                let mut acc: [$vec; 4] = [$zero(); 4];
                let mut i = 0;
                while i + 4 * $lanes <= k {
                    // One core's stream of a large weight stalls on misses without a hint
                    // ahead of the hardware prefetcher (PREFETCH bytes on, past the row's end
                    // into the next row, which the same task reads next).
                    _mm_prefetch::<_MM_HINT_T0>(
                        (wp.wrapping_add(i) as *const i8).wrapping_add(PREFETCH),
                    );
                    for (a, acc) in acc.iter_mut().enumerate() {
                        let j = i + a * $lanes;
                        let $p = wp.add(j);
                        *acc = $fma($load, $loadx(xp.add(j)), *acc);
                    }
                    i += 4 * $lanes;
                }
                while i + $lanes <= k {
                    let $p = wp.add(i);
                    acc[0] = $fma($load, $loadx(xp.add(i)), acc[0]);
                    i += $lanes;
                }
                let mut s = $sum(acc);
                while i < k {
                    s += super::Elem::to_f32(w[i]) * x[i];
                    i += 1;
                }
                s
            }
        };
    }

    #[inline(always)]
    unsafe fn sum512(acc: [__m512; 4]) -> f32 {
        _mm512_reduce_add_ps(_mm512_add_ps(
            _mm512_add_ps(acc[0], acc[1]),
            _mm512_add_ps(acc[2], acc[3]),
        ))
    }

    #[inline(always)]
    unsafe fn sum256(acc: [__m256; 4]) -> f32 {
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)))
    }

    /// [`dot!`] on 16 lanes of AVX-512F.
    macro_rules! dot512 {
        ($name:ident, $t:ty, |$p:ident| $load:expr) => {
            dot!(
                $name,
                "avx512f",
                $t,
                __m512,
                16,
                _mm512_setzero_ps,
                _mm512_fmadd_ps,
                _mm512_loadu_ps,
                sum512,
                |$p| $load
            );
        };
    }

    /// [`dot!`] on 8 lanes of AVX2 with FMA and F16C.
    macro_rules! dot256 {
        ($name:ident, $t:ty, |$p:ident| $load:expr) => {
            dot!(
                $name,
                "avx2,fma,f16c",
                $t,
                __m256,
                8,
                _mm256_setzero_ps,
                _mm256_fmadd_ps,
                _mm256_loadu_ps,
                sum256,
                |$p| $load
            );
        };
    }

    dot512!(dot512_f32, f32, |p| _mm512_loadu_ps(p));
    dot512!(dot512_f16, f16, |p| _mm512_cvtph_ps(_mm256_loadu_si256(
        p as *const __m256i
    )));
    // bf16 is the top half of an f32: widen to 32 bits and shift.
    dot512!(dot512_bf16, bf16, |p| _mm512_castsi512_ps(
        _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
            p as *const __m256i
        )))
    ));
    dot256!(dot256_f32, f32, |p| _mm256_loadu_ps(p));
    dot256!(dot256_f16, f16, |p| _mm256_cvtph_ps(_mm_loadu_si128(
        p as *const __m128i
    )));
    dot256!(dot256_bf16, bf16, |p| _mm256_castsi256_ps(
        _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)))
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_values::uniform as values;

    /// Every path and dtype against an f64 sum over the same (rounded) weights, within the
    /// worst-case error of an f32 sum of `k` terms in any order, `k * 2^-24 * sum |w x|`
    /// (Higham's bound; the products are exact in the FMA): shapes with and without vector
    /// tails, one to eight rows, row counts that leave a partial task.
    #[test]
    fn every_path_and_dtype_is_the_f64_sum() {
        // (n, k, rows)
        let shapes = [
            (1, 1, 1),
            (5, 15, 2),
            (70, 64, 1),
            (130, 257, 3),
            (64, 1000, 8),
        ];
        for (n, k, rows) in shapes {
            let wv = values(n * k, (n * k) as u64);
            let xv = values(rows * k, 7 + k as u64);
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let w = Tensor::from_vec(wv.clone(), (n, k), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let wr: Vec<f32> = w
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for path in Path::available() {
                    let got = match dtype {
                        DType::F32 => gemv(path, &wr, &xv, n, k),
                        DType::F16 => {
                            let v: Vec<f16> = wr.iter().map(|&v| f16::from_f32(v)).collect();
                            gemv(path, &v, &xv, n, k)
                        }
                        _ => {
                            let v: Vec<bf16> = wr.iter().map(|&v| bf16::from_f32(v)).collect();
                            gemv(path, &v, &xv, n, k)
                        }
                    };
                    for r in 0..rows {
                        for j in 0..n {
                            let terms = (0..k).map(|i| wr[j * k + i] as f64 * xv[r * k + i] as f64);
                            let want: f64 = terms.clone().sum();
                            let scale: f64 = terms.map(f64::abs).sum();
                            let g = got[r * n + j] as f64;
                            assert!(
                                (g - want).abs() <= k as f64 * 2f64.powi(-24) * scale,
                                "{path:?} {dtype:?} {n}x{k} rows {rows}: [{r}, {j}] {g} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// `linear_t` gives candle's f32 matmul's numbers (within f32 rounding) on either side of
    /// [`MAX_ROWS`] (the GEMV, in row groups for 16-bit weights; candle's matmul for f32 with
    /// more rows), keeps leading dimensions, and refuses a width that does not match.
    #[test]
    fn linear_t_matches_the_matmul_and_keeps_the_shape() {
        let (n, k) = (100, 96);
        let w = Tensor::from_vec(values(n * k, 3), (n, k), &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let w = w.to_dtype(dtype).unwrap();
            for rows in [1, 3, MAX_ROWS, MAX_ROWS + 1, 3 * MAX_ROWS + 2] {
                let x = Tensor::from_vec(values(rows * k, rows as u64), (1, rows, k), &Device::Cpu)
                    .unwrap();
                let got = linear_t(&x, &w).unwrap();
                assert_eq!(got.dims(), &[1, rows, n]);
                assert_eq!(got.dtype(), DType::F32);
                let want = x
                    .broadcast_matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap())
                    .unwrap();
                // Two f32 sums of the same 96 products below 1 in magnitude, in other orders:
                // each within 96 * 2^-24 * 96 of the exact sum (Higham), so within 1.1e-3 of
                // each other; a wrong row or column is off by the sums' own size.
                let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
                let diff = diff.to_scalar::<f32>().unwrap();
                assert!(diff <= 1.1e-3, "{dtype:?} rows {rows}: {diff}");
            }
        }
        let x = Tensor::zeros((1, k + 1), DType::F32, &Device::Cpu).unwrap();
        assert!(linear_t(&x, &w).is_err());
    }
}
