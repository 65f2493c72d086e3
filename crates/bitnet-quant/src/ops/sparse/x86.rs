//! AVX2 + FMA kernels of the sparse products. Both are load-bound: each multiply-add reads a
//! fresh row segment of `b`, so they keep as many independent accumulators in registers as the
//! loads can feed (eight for `axpys`, 4 entries x 2 for `dots`).

use crate::ops::slot::Slot;
use std::arch::x86_64::*;

/// Whether the CPU runs these kernels (cached by the std macro).
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// `out[t] = sum_e vs[e] * b[cs[e] * n + c0 + t]` for `t < out.len() <= 64` (`out` is only
/// written, so it may be fresh slots).
///
/// # Safety
/// AVX2 and FMA must be available; `cs.len() == vs.len()`, `c0 + out.len() <= n` and every
/// `(cs[e] + 1) * n <= b.len()`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn axpys<S: Slot<f32>>(
    out: &mut [S],
    cs: &[u32],
    vs: &[f32],
    b: &[f32],
    n: usize,
    c0: usize,
) {
    let w = out.len();
    debug_assert!(w <= 64 && c0 + w <= n);
    debug_assert!(cs.iter().all(|&c| (c as usize + 1) * n <= b.len()));
    let bp = b.as_ptr().add(c0);
    let op = S::first_ptr(out);
    if w == 64 {
        let mut acc = [_mm256_setzero_ps(); 8];
        for (&c, &v) in cs.iter().zip(vs) {
            let vb = _mm256_set1_ps(v);
            let p = bp.add(c as usize * n);
            for (t, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(vb, _mm256_loadu_ps(p.add(8 * t)), *a);
            }
        }
        for (t, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(op.add(8 * t), *a);
        }
        return;
    }
    let mut t0 = 0;
    while t0 + 8 <= w {
        let mut acc = _mm256_setzero_ps();
        for (&c, &v) in cs.iter().zip(vs) {
            let p = bp.add(c as usize * n + t0);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(v), _mm256_loadu_ps(p), acc);
        }
        _mm256_storeu_ps(op.add(t0), acc);
        t0 += 8;
    }
    for t in t0..w {
        let mut acc = 0f32;
        for (&c, &v) in cs.iter().zip(vs) {
            acc = v.mul_add(*bp.add(c as usize * n + t), acc);
        }
        op.add(t).write(acc);
    }
}

/// For each 8-bit mask, the lanes of its set bits in order (then zeros): the permutation that
/// packs a chunk's kept values to the front.
static PACK: [[u32; 8]; 256] = {
    let mut t = [[0u32; 8]; 256];
    let mut m = 0;
    while m < 256 {
        let (mut k, mut b) = (0, 0);
        while b < 8 {
            if m & (1 << b) != 0 {
                t[m][k] = b as u32;
                k += 1;
            }
            b += 1;
        }
        m += 1;
    }
    t
};

/// `out = sum_e vs[e] * b[cs[e] * n + c0 ..][..width]`, and the return value
/// `dot(w, sum_e ss[e] * b[cs[e] * n + c0 ..][..width])` (`width = out.len()`): 32 columns per
/// sweep, four accumulators for each sum, so every load of `b` feeds two multiply-adds.
///
/// # Safety
/// AVX2 and FMA must be available; `out.len() == w.len()`, `c0 + out.len() <= n`, `vs` and `ss`
/// as long as `cs`, and every `(cs[e] + 1) * n <= b.len()`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn axpys2(
    out: &mut [f32],
    cs: &[u32],
    vs: &[f32],
    ss: &[f32],
    b: &[f32],
    w: super::WRow<'_>,
    n: usize,
    c0: usize,
) -> f32 {
    let width = out.len();
    debug_assert!(w.len() == width && c0 + width <= n);
    debug_assert!(vs.len() == cs.len() && ss.len() == cs.len());
    debug_assert!(cs.iter().all(|&c| (c as usize + 1) * n <= b.len()));
    let (bp, op) = (b.as_ptr().add(c0), out.as_mut_ptr());
    // Eight weights from `t`: loaded, or levels widened and scaled (exact: the same bits).
    let load_w = |t: usize| match w {
        super::WRow::Values(w) => _mm256_loadu_ps(w.as_ptr().add(t)),
        super::WRow::Signs(s, c) => {
            let l = _mm256_cvtepi8_epi32(_mm_loadl_epi64(s.as_ptr().add(t) as *const __m128i));
            _mm256_mul_ps(_mm256_cvtepi32_ps(l), _mm256_loadu_ps(c.as_ptr().add(t)))
        }
    };
    let mut total = _mm256_setzero_ps();
    let mut t0 = 0;
    while t0 + 32 <= width {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut h = [_mm256_setzero_ps(); 4];
        for ((&c, &v), &s) in cs.iter().zip(vs).zip(ss) {
            let (vb, sb) = (_mm256_set1_ps(v), _mm256_set1_ps(s));
            let p = bp.add(c as usize * n + t0);
            for t in 0..4 {
                let x = _mm256_loadu_ps(p.add(8 * t));
                acc[t] = _mm256_fmadd_ps(vb, x, acc[t]);
                h[t] = _mm256_fmadd_ps(sb, x, h[t]);
            }
        }
        for t in 0..4 {
            _mm256_storeu_ps(op.add(t0 + 8 * t), acc[t]);
            total = _mm256_fmadd_ps(h[t], load_w(t0 + 8 * t), total);
        }
        t0 += 32;
    }
    while t0 + 8 <= width {
        let (mut acc, mut h) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for ((&c, &v), &s) in cs.iter().zip(vs).zip(ss) {
            let x = _mm256_loadu_ps(bp.add(c as usize * n + t0));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(v), x, acc);
            h = _mm256_fmadd_ps(_mm256_set1_ps(s), x, h);
        }
        _mm256_storeu_ps(op.add(t0), acc);
        total = _mm256_fmadd_ps(h, load_w(t0), total);
        t0 += 8;
    }
    let mut dot = hsum(total);
    for o in t0..width {
        let (mut acc, mut h) = (0f32, 0f32);
        for ((&c, &v), &s) in cs.iter().zip(vs).zip(ss) {
            let x = *bp.add(c as usize * n + o);
            acc = v.mul_add(x, acc);
            h = s.mul_add(x, h);
        }
        *op.add(o) = acc;
        dot = h.mul_add(w.get(o), dot);
    }
    dot
}

/// Appends the columns and values of `row`'s entries that are nonzero, or nonzero in `extra`.
/// Branch-free per chunk of 8: the kept lanes are packed with a permutation and all 8 lanes
/// stored, and the length advances by the count (a per-value branch mispredicts on real data).
///
/// # Safety
/// AVX2 must be available; `extra`, if given, is as long as `row`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn scan_row(
    row: &[f32],
    extra: Option<&[f32]>,
    col: &mut Vec<u32>,
    val: &mut Vec<f32>,
) {
    let n = row.len();
    // Full 8-lane stores may run 8 past the last kept entry.
    col.reserve(n + 8);
    val.reserve(n + 8);
    let mut len = col.len();
    debug_assert_eq!(len, val.len());
    let (cp, vp) = (col.as_mut_ptr(), val.as_mut_ptr());
    let zero = _mm256_setzero_ps();
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mut c0 = 0;
    while c0 + 8 <= n {
        let v = _mm256_loadu_ps(row.as_ptr().add(c0));
        // Unordered: NaN counts as nonzero, so a NaN input still reaches the output.
        let mut m = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NEQ_UQ>(v, zero)) as u32;
        if let Some(e) = extra {
            let x = _mm256_loadu_ps(e.as_ptr().add(c0));
            m |= _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NEQ_UQ>(x, zero)) as u32;
        }
        let perm = _mm256_loadu_si256(PACK[m as usize].as_ptr() as *const __m256i);
        _mm256_storeu_ps(vp.add(len), _mm256_permutevar8x32_ps(v, perm));
        let cols = _mm256_add_epi32(
            _mm256_permutevar8x32_epi32(lanes, perm),
            _mm256_set1_epi32(c0 as i32),
        );
        _mm256_storeu_si256(cp.add(len) as *mut __m256i, cols);
        len += m.count_ones() as usize;
        c0 += 8;
    }
    for c in c0..n {
        *cp.add(len) = c as u32;
        *vp.add(len) = row[c];
        len += (row[c] != 0.0 || extra.is_some_and(|e| e[c] != 0.0)) as usize;
    }
    // SAFETY: the first `len` values of both were written above (or were there before).
    col.set_len(len);
    val.set_len(len);
}

/// The 8 x 8 block at `src` (row stride `ss`), transposed: element `i` holds column `i`.
#[inline(always)]
unsafe fn transposed8(src: *const f32, ss: usize) -> [__m256; 8] {
    let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * ss)));
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// Transposes the 8 x 8 block at `src` (row stride `ss`) into `dst` (row stride `ds`).
///
/// # Safety
/// AVX2 must be available; 8 rows of 8 values readable at `src` with stride `ss` and writable at
/// `dst` with stride `ds`.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) unsafe fn transpose8(src: *const f32, ss: usize, dst: *mut f32, ds: usize) {
    for (i, v) in transposed8(src, ss).iter().enumerate() {
        _mm256_storeu_ps(dst.add(i * ds), *v);
    }
}

/// [`transpose8`] into `values` (if given) and the signs of the transposed values (-1, 0 or 1
/// as in [`super::signs`]: 0 for zeros and NaN) into `signs` (if given), both with row stride
/// `ds`.
///
/// # Safety
/// AVX2 must be available; 8 rows of 8 values readable at `src` with stride `ss`, and writable
/// at each given output with stride `ds`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn transpose8_signs(
    src: *const f32,
    ss: usize,
    values: Option<*mut f32>,
    signs: Option<*mut i8>,
    ds: usize,
) {
    let zero = _mm256_setzero_ps();
    for (i, v) in transposed8(src, ss).iter().enumerate() {
        if let Some(p) = values {
            _mm256_storeu_ps(p.add(i * ds), *v);
        }
        if let Some(p) = signs {
            // Ordered comparisons are false for NaN: its sign is 0. `-1 - 0` below zero,
            // `0 - -1` above it.
            let lt = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(*v, zero));
            let gt = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(*v, zero));
            let s = _mm256_sub_epi32(lt, gt);
            // i32 -> i8 in each 128-bit half; the halves' first 4 bytes are lanes 0-3 and 4-7.
            let w = _mm256_packs_epi32(s, s);
            let b = _mm256_packs_epi16(w, w);
            let lo = _mm256_cvtsi256_si32(b) as u32 as u64;
            let hi = _mm256_extract_epi32::<4>(b) as u32 as u64;
            std::ptr::write_unaligned(p.add(i * ds) as *mut u64, lo | (hi << 32));
        }
    }
}

/// [`super::signs`] compiled for AVX2 (same comparisons, 8 at a time).
///
/// # Safety
/// AVX2 must be available.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn signs(values: &[f32]) -> Vec<i8> {
    super::signs_body(values)
}

/// `dst[c * rows + r] = src[r * cols + c]`, in 8 x 8 register blocks (edges in scalar).
///
/// # Safety
/// AVX2 must be available; `src.len() == dst.len() == rows * cols`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn transpose<S: Slot<f32>>(src: &[f32], rows: usize, cols: usize, dst: &mut [S]) {
    debug_assert!(src.len() == rows * cols && dst.len() == rows * cols);
    let (rb, cb) = (rows / 8 * 8, cols / 8 * 8);
    let (sp, dp) = (src.as_ptr(), S::first_ptr(dst));
    // 64-row strips keep the destination lines being filled in L1.
    for r0 in (0..rb).step_by(64) {
        for c in (0..cb).step_by(8) {
            for r in (r0..(r0 + 64).min(rb)).step_by(8) {
                transpose8(sp.add(r * cols + c), cols, dp.add(c * rows + r), rows);
            }
        }
    }
    for r in 0..rows {
        let from = if r < rb { cb } else { 0 };
        for c in from..cols {
            dst[c * rows + r].put(src[r * cols + c]);
        }
    }
}

/// `totals[o] += sum_e round(vs[e] * inv) * signs[cs[e] * n + o]` in 16-bit lanes: per entry
/// and 16 outputs one sign-extending load, one `vpsignw` (the level times -1, 0 or 1) and one
/// add; widened into `totals` every 255 entries, before a 16-bit sum of levels up to 128 could
/// overflow.
///
/// # Safety
/// AVX2 must be available; `n % 16 == 0`, `totals.len() == n`, `cs.len() == vs.len()` and every
/// `(cs[e] + 1) * n <= signs.len()`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn level_sums(
    totals: &mut [i32],
    cs: &[u32],
    vs: &[f32],
    inv: f32,
    signs: &[i8],
    n: usize,
) {
    debug_assert!(n % 16 == 0 && totals.len() == n);
    debug_assert!(cs.iter().all(|&c| (c as usize + 1) * n <= signs.len()));
    let mut ob = 0;
    while ob + 128 <= n {
        level_block::<8>(&mut totals[ob..ob + 128], cs, vs, inv, signs, n, ob);
        ob += 128;
    }
    while ob < n {
        level_block::<1>(&mut totals[ob..ob + 16], cs, vs, inv, signs, n, ob);
        ob += 16;
    }
}

/// [`level_sums`] for the `16 * V` outputs from `ob`, in `V` registers.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn level_block<const V: usize>(
    totals: &mut [i32],
    cs: &[u32],
    vs: &[f32],
    inv: f32,
    signs: &[i8],
    n: usize,
    ob: usize,
) {
    let sp = signs.as_ptr().add(ob);
    let tp = totals.as_mut_ptr();
    let mut e = 0;
    while e < cs.len() {
        let end = (e + 255).min(cs.len());
        let mut acc = [_mm256_setzero_si256(); V];
        for k in e..end {
            let l = (*vs.get_unchecked(k) * inv).round_ties_even() as i16;
            let q = _mm256_set1_epi16(l);
            let p = sp.add(*cs.get_unchecked(k) as usize * n);
            for (t, a) in acc.iter_mut().enumerate() {
                let w = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(16 * t) as *const __m128i));
                *a = _mm256_add_epi16(*a, _mm256_sign_epi16(q, w));
            }
        }
        for (t, a) in acc.iter().enumerate() {
            let lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(*a));
            let hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(*a));
            let p0 = tp.add(16 * t) as *mut __m256i;
            let p1 = tp.add(16 * t + 8) as *mut __m256i;
            _mm256_storeu_si256(p0, _mm256_add_epi32(_mm256_loadu_si256(p0), lo));
            _mm256_storeu_si256(p1, _mm256_add_epi32(_mm256_loadu_si256(p1), hi));
        }
        e = end;
    }
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// `dot(u, b[c * n ..][..n])` in one register (the tail in scalar).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot1(u: *const f32, row: *const f32, n: usize) -> f32 {
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut t = 0;
    while t + 16 <= n {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(u.add(t)), _mm256_loadu_ps(row.add(t)), a0);
        a1 = _mm256_fmadd_ps(
            _mm256_loadu_ps(u.add(t + 8)),
            _mm256_loadu_ps(row.add(t + 8)),
            a1,
        );
        t += 16;
    }
    if t + 8 <= n {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(u.add(t)), _mm256_loadu_ps(row.add(t)), a0);
        t += 8;
    }
    let mut s = hsum(_mm256_add_ps(a0, a1));
    while t < n {
        s = (*u.add(t)).mul_add(*row.add(t), s);
        t += 1;
    }
    s
}

/// `out[e] = dot(u, b[cs[e] * n ..][..n])` for every entry.
///
/// # Safety
/// AVX2 and FMA must be available; `u.len() == n`, `out.len() == cs.len()` and every
/// `(cs[e] + 1) * n <= b.len()`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn dots<S: Slot<f32>>(out: &mut [S], cs: &[u32], u: &[f32], b: &[f32], n: usize) {
    debug_assert_eq!(u.len(), n);
    debug_assert!(out.len() == cs.len() && cs.iter().all(|&c| (c as usize + 1) * n <= b.len()));
    let (up, bp) = (u.as_ptr(), b.as_ptr());
    let mut quads = cs.chunks_exact(4);
    // Four entries at a time share each load of `u`: five loads per four multiply-adds.
    for (qi, q) in (&mut quads).enumerate() {
        let rows = [
            bp.add(q[0] as usize * n),
            bp.add(q[1] as usize * n),
            bp.add(q[2] as usize * n),
            bp.add(q[3] as usize * n),
        ];
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut t = 0;
        while t + 16 <= n {
            let (x0, x1) = (_mm256_loadu_ps(up.add(t)), _mm256_loadu_ps(up.add(t + 8)));
            for (e, r) in rows.iter().enumerate() {
                acc[2 * e] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(r.add(t)), acc[2 * e]);
                acc[2 * e + 1] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(r.add(t + 8)), acc[2 * e + 1]);
            }
            t += 16;
        }
        if t + 8 <= n {
            let x0 = _mm256_loadu_ps(up.add(t));
            for (e, r) in rows.iter().enumerate() {
                acc[2 * e] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(r.add(t)), acc[2 * e]);
            }
            t += 8;
        }
        for (e, r) in rows.iter().enumerate() {
            let mut s = hsum(_mm256_add_ps(acc[2 * e], acc[2 * e + 1]));
            for i in t..n {
                s = (*up.add(i)).mul_add(*r.add(i), s);
            }
            out[4 * qi + e].put(s);
        }
    }
    let done = cs.len() / 4 * 4;
    for (o, &c) in out[done..].iter_mut().zip(quads.remainder()) {
        o.put(dot1(up, bp.add(c as usize * n), n));
    }
}
