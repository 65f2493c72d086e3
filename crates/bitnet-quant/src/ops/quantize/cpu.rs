//! CPU kernels of the quantize op: forward map and estimator backward.

use crate::ops::cpu_util::{block_segments_from, for_block_segments};
use crate::ops::math::{blend, EstKind, Kind};
use crate::ops::slot::Slot;

/// `blend(x, q(x), lambda)` for every value, `params` holding `(s, aux)` per block.
pub(crate) fn forward(
    kind: Kind,
    xs: &[f32],
    params: &[f32],
    block: usize,
    lambda: f32,
) -> Vec<f32> {
    let mut out = Box::<[f32]>::new_uninit_slice(xs.len());
    for_block_segments(&mut out, block, block_segment(kind, xs, params, lambda));
    // SAFETY: the segments cover `out` and `map` writes every value of each.
    unsafe { out.assume_init() }.into_vec()
}

/// The per-segment work of [`forward`] and [`forward_range`]: segment `seg` of block `b`,
/// from index `start` of `xs`.
fn block_segment<'a, S: Slot<f32>>(
    kind: Kind,
    xs: &'a [f32],
    params: &'a [f32],
    lambda: f32,
) -> impl Fn(usize, usize, &mut [S]) + Sync + 'a {
    move |b, start, seg| {
        let (s, aux) = (params[2 * b], params[2 * b + 1]);
        segment(kind, seg, &xs[start..start + seg.len()], (s, aux), lambda);
    }
}

/// [`forward`]'s values `start..start + out.len()` into `out`, on the calling thread (the same
/// bits: the same segment kernel on the same blocks).
pub(crate) fn forward_range<S: Slot<f32>>(
    kind: Kind,
    xs: &[f32],
    params: &[f32],
    block: usize,
    lambda: f32,
    start: usize,
    out: &mut [S],
) {
    block_segments_from(start, out, block, &block_segment(kind, xs, params, lambda));
}

/// One segment of a block: `out[i] = blend(xs[i], q(xs[i]), lambda)`.
fn segment<S: Slot<f32>>(kind: Kind, out: &mut [S], xs: &[f32], params: (f32, f32), lambda: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is available (checked above).
        return unsafe { segment_avx2(kind, out, xs, params, lambda) };
    }
    segment_body(kind, out, xs, params, lambda);
}

/// [`segment`] compiled for AVX2: the same operations per value (divisions and adds are exact
/// in any width, and there is no FMA), so the same bits, eight values per instruction instead of
/// four. The default x86-64 target is SSE2; the weights are quantized every step.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn segment_avx2<S: Slot<f32>>(
    kind: Kind,
    out: &mut [S],
    xs: &[f32],
    params: (f32, f32),
    lambda: f32,
) {
    segment_body(kind, out, xs, params, lambda);
}

#[inline(always)]
fn segment_body<S: Slot<f32>>(
    kind: Kind,
    out: &mut [S],
    xs: &[f32],
    (s, aux): (f32, f32),
    lambda: f32,
) {
    // One arm per kind so that each inner loop is branch-free and vectorises.
    match kind {
        Kind::Binary { .. } => map(out, xs, lambda, |x| {
            Kind::Binary { scaled: true }.quantize(x, s, aux)
        }),
        Kind::BinaryCentered => map(out, xs, lambda, |x| {
            Kind::BinaryCentered.quantize(x, s, aux)
        }),
        Kind::Absmean => map(out, xs, lambda, |x| Kind::Absmean.quantize(x, s, aux)),
        Kind::AbsmeanHf => map(out, xs, lambda, |x| Kind::AbsmeanHf.quantize(x, s, aux)),
        Kind::Threshold { .. } => map(out, xs, lambda, |x| {
            Kind::Threshold {
                fixed: None,
                scaled: true,
            }
            .quantize(x, s, aux)
        }),
        Kind::Int { qmax } => map(out, xs, lambda, |x| Kind::Int { qmax }.quantize(x, s, aux)),
    }
}

#[inline(always)]
fn map<S: Slot<f32>>(out: &mut [S], xs: &[f32], lambda: f32, q: impl Fn(f32) -> f32) {
    if lambda == 1.0 {
        for (o, &x) in out.iter_mut().zip(xs) {
            o.put(q(x));
        }
    } else {
        for (o, &x) in out.iter_mut().zip(xs) {
            o.put(blend(x, q(x), lambda));
        }
    }
}

/// `u * ((1 - lambda) + lambda * e'((x - c) / n))` for every value (`c` the kind's
/// [`center`](Kind::center)): the gradient of the blended quantizer with the estimator standing
/// in for `dq/dx`.
pub(crate) fn backward(
    kind: Kind,
    est: EstKind,
    xs: &[f32],
    params: &[f32],
    us: &[f32],
    block: usize,
    lambda: f32,
) -> Vec<f32> {
    let mut out = vec![0f32; xs.len()];
    for_block_segments(&mut out, block, |b, start, seg| {
        let (s, aux) = (params[2 * b], params[2 * b + 1]);
        let inv_n = 1.0 / kind.normalizer(s, aux);
        let c = kind.center(aux);
        let xs = &xs[start..start + seg.len()];
        let us = &us[start..start + seg.len()];
        for ((o, &x), &u) in seg.iter_mut().zip(xs).zip(us) {
            *o = u * ((1.0 - lambda) + lambda * est.derivative((x - c) * inv_n));
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The AVX2 build must give the portable build's values to the bit (the GPU kernels were
    /// verified against the latter), for every kind, blended or not, at rounding ties too.
    #[test]
    fn the_avx2_build_gives_the_same_bits() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let kinds = [
            (Kind::Binary { scaled: true }, (0.7, 0.0)),
            (Kind::BinaryCentered, (0.7, -0.75)),
            (Kind::Absmean, (0.5, 0.0)),
            (
                Kind::Threshold {
                    fixed: None,
                    scaled: true,
                },
                (0.8, 0.35),
            ),
            (Kind::Int { qmax: 127.0 }, (2.0 / 127.0, 2.0)),
            (Kind::Int { qmax: 7.0 }, (1.5 / 7.0, 1.5)),
        ];
        for len in [1usize, 7, 8, 9, 100, 1031] {
            let mut xs: Vec<f32> = (0..len).map(|_| rng.random_range(-2f32..2.0)).collect();
            // Exact ties of both rounding grids.
            xs[0] = 0.25;
            if len > 2 {
                xs[1] = 1.5 / 127.0 * 2.0;
                xs[2] = -0.75;
            }
            for &(kind, params) in &kinds {
                for lambda in [1.0, 0.5] {
                    let mut want = vec![0f32; len];
                    segment_body(kind, &mut want, &xs, params, lambda);
                    let mut got = vec![0f32; len];
                    segment(kind, &mut got, &xs, params, lambda);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "{kind:?} lambda {lambda} len {len}"
                    );
                }
            }
        }
    }

    /// Any range of `forward_range` equals the same values of `forward`, across block edges
    /// (blocks of 1, 7, 64 values and one block of all).
    #[test]
    fn a_range_equals_the_same_values_of_the_whole() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let xs: Vec<f32> = (0..448).map(|_| rng.random_range(-2f32..2.0)).collect();
        for block in [1usize, 7, 64, 448] {
            let params: Vec<f32> = (0..448 / block + 1)
                .flat_map(|b| [0.3 + 0.01 * b as f32, 0.0])
                .collect();
            let whole = forward(Kind::Absmean, &xs, &params, block, 1.0);
            for (start, len) in [(0, 448), (0, 8), (5, 60), (63, 130), (440, 8)] {
                let mut out = vec![f32::NAN; len];
                forward_range(Kind::Absmean, &xs, &params, block, 1.0, start, &mut out);
                assert_eq!(
                    out,
                    whole[start..start + len],
                    "block {block} range {start}+{len}"
                );
            }
        }
    }
}
