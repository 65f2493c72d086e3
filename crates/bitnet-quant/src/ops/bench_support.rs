//! Not part of the API (hidden from the docs; it may change in any release): two CPU kernels
//! with a choice of output buffer, so that `benches/output_buffers.rs` can time the same kernel
//! writing into fresh, uninitialised memory (what the ops do) and into `vec![0.0; n]` (what
//! zeroing every output first would cost) in one run.

use crate::error::QuantError;
use crate::ops::cpu_util::for_block_segments;
use crate::ops::{quantize, sparse, Kind};

/// The quantize op's CPU forward, `blend(x, q(x), lambda)` per value with `params` holding
/// `(scale, aux)` per block of `block` values, into a fresh buffer (`zeroed == false`, as the op
/// runs it) or into a zeroed one (the same segment kernel on the same parallel split).
///
/// Errors: `block` is 0 or does not divide `xs.len()`, or `params` is not two values per block.
pub fn quantize_forward(
    kind: Kind,
    xs: &[f32],
    params: &[f32],
    block: usize,
    lambda: f32,
    zeroed: bool,
) -> Result<Vec<f32>, QuantError> {
    const OP: &str = "bench_support::quantize_forward";
    if block == 0 || xs.len() % block != 0 || params.len() != 2 * (xs.len() / block) {
        let (n, p) = (xs.len(), params.len());
        let what = format!("{n} values in blocks of {block} with {p} params");
        return Err(QuantError::Shape { op: OP, what });
    }
    if !zeroed {
        return Ok(quantize::cpu::forward(kind, xs, params, block, lambda));
    }
    let mut out = vec![0f32; xs.len()];
    for_block_segments(&mut out, block, |_, start, seg| {
        quantize::cpu::forward_range(kind, xs, params, block, lambda, start, seg)
    });
    Ok(out)
}

/// [`sparse::transpose`], into a fresh buffer or (`zeroed`) into a zeroed one.
///
/// Errors: `src` is not `[rows, cols]`.
pub fn transpose(
    src: &[f32],
    rows: usize,
    cols: usize,
    zeroed: bool,
) -> Result<Vec<f32>, QuantError> {
    if !zeroed || Some(src.len()) != rows.checked_mul(cols) {
        // The public entry, which also reports a wrong shape.
        return sparse::transpose(src, rows, cols);
    }
    let mut out = vec![0f32; src.len()];
    sparse::transpose_into(src, rows, cols, &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both buffers receive the kernel's values (checked against the definitions), and a wrong
    /// shape is an error, not a panic.
    #[test]
    fn fresh_and_zeroed_buffers_hold_the_same_values() {
        let xs: Vec<f32> = (0..6 * 70).map(|i| (i as f32 * 0.37).sin()).collect();
        // Two blocks of 210 values: ternary absmean with scale 0.5 and 0.25.
        let params = [0.5, 0.0, 0.25, 0.0];
        let want: Vec<f32> = xs
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let s = params[2 * (i / 210)];
                s * (x / (s + crate::EPS)).round_ties_even().clamp(-1.0, 1.0)
            })
            .collect();
        let t_want: Vec<f32> = (0..xs.len()).map(|i| xs[(i % 6) * 70 + i / 6]).collect();
        for zeroed in [false, true] {
            let q = quantize_forward(Kind::Absmean, &xs, &params, 210, 1.0, zeroed).unwrap();
            assert_eq!(q, want, "quantize, zeroed {zeroed}");
            assert_eq!(transpose(&xs, 6, 70, zeroed).unwrap(), t_want);
            assert!(quantize_forward(Kind::Absmean, &xs, &params, 200, 1.0, zeroed).is_err());
            assert!(quantize_forward(Kind::Absmean, &xs, &params[..2], 210, 1.0, zeroed).is_err());
            assert!(transpose(&xs, 7, 70, zeroed).is_err());
        }
    }
}
