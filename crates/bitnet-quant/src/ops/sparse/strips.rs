//! The transpose of a matrix that is produced row by row (a quantized weight), built without
//! the matrix ever existing whole.
//!
//! The sparse forward needs the quantized weight transposed (`W^T: [in, out]`, and its signs for
//! the integer kernel). Quantizing the whole weight and then transposing it writes the
//! 800 KB `[256, 784]` matrix out past L2 and reads it back; the transposes cost 3.6x their
//! isolated time inside a training step. Here each strip of 8 rows is quantized into an
//! L1-sized buffer and transposed from there.

use crate::error::QuantError;
use rayon::prelude::*;

/// Rows per strip: each column's slice of a strip is 128 bytes of the transpose, two whole
/// cache lines, and a strip of 784 columns (100 KB) stays in L2.
const STRIP: usize = 32;

/// What [`transpose_rows`] returns: the transpose and/or its signs, each empty when not asked for.
pub struct Transposed {
    /// `[cols, rows]` row-major, or empty.
    pub values: Vec<f32>,
    /// `-1`, `0` or `1` per value of the transpose (as [`super::signs`]), or empty.
    pub signs: Vec<i8>,
}

/// The transpose (`[cols, rows]`) of the row-major `[rows, cols]` matrix whose rows `fill`
/// writes, with `want_values`, and the [`super::signs`] of that transpose, with `want_signs`.
/// `fill(r0, strip)` writes rows `r0..r0 + strip.len() / cols` (at most 32) into `strip`; what it
/// leaves unwritten reads as whatever an earlier strip left there. Equal to [`super::transpose`]
/// (and [`super::signs`] of it) of the filled matrix, bit for bit. Threads split the strips when
/// [`parallel`](crate::ops::parallel) says so.
///
/// Errors: `rows * cols` overflows `usize`.
pub fn transpose_rows(
    rows: usize,
    cols: usize,
    want_values: bool,
    want_signs: bool,
    fill: impl Fn(usize, &mut [f32]) + Sync,
) -> Result<Transposed, QuantError> {
    let Some(len) = rows.checked_mul(cols) else {
        let what = format!("[rows, cols] = [{rows}, {cols}] is more than usize::MAX values");
        return Err(super::shape("transpose_rows", what));
    };
    let mut values = Box::<[f32]>::new_uninit_slice(if want_values { len } else { 0 });
    let mut signs = Box::<[i8]>::new_uninit_slice(if want_signs { len } else { 0 });
    let out = Outputs {
        values: want_values.then_some(values.as_mut_ptr().cast::<f32>()),
        signs: want_signs.then_some(signs.as_mut_ptr().cast::<i8>()),
        rows,
        cols,
    };
    let strips = rows.div_ceil(STRIP);
    let run = |first: usize, last: usize| {
        // Initialised once per thread: `fill` writes into it as plain `f32`s.
        let mut buf = vec![0f32; STRIP.min(rows) * cols];
        for s in first..last {
            let r0 = s * STRIP;
            let height = STRIP.min(rows - r0);
            let strip = &mut buf[..height * cols];
            fill(r0, strip);
            // SAFETY: strip `s` owns rows `r0..r0 + height`: the positions `c * rows + r` it
            // writes are disjoint from every other strip's; the buffers hold `rows * cols`.
            unsafe { out.store(strip, r0, height) };
        }
    };
    if crate::ops::parallel(len) {
        let per = strips.div_ceil(rayon::current_num_threads());
        (0..strips.div_ceil(per))
            .into_par_iter()
            .for_each(|t| run(t * per, ((t + 1) * per).min(strips)));
    } else {
        run(0, strips);
    }
    // SAFETY: the strips cover rows `0..rows`, and `store` writes every column of each of their
    // rows into each output asked for; an output not asked for is empty.
    let (values, signs) = unsafe { (values.assume_init(), signs.assume_init()) };
    Ok(Transposed {
        values: values.into_vec(),
        signs: signs.into_vec(),
    })
}

/// The output buffers, shared by the threads that write disjoint positions of them.
struct Outputs {
    values: Option<*mut f32>,
    signs: Option<*mut i8>,
    rows: usize,
    cols: usize,
}

// SAFETY: the pointers are only written at positions that one strip owns (see `store`).
unsafe impl Sync for Outputs {}

impl Outputs {
    /// Writes `strip` (rows `r0..r0 + height` of the matrix) transposed into the outputs.
    ///
    /// # Safety
    /// The outputs hold `rows * cols` values; no other thread writes rows `r0..r0 + height`.
    unsafe fn store(&self, strip: &[f32], r0: usize, height: usize) {
        let (rows, cols) = (self.rows, self.cols);
        // Whole 8 x 8 blocks in registers; the column tail and the row tail one by one.
        #[cfg(target_arch = "x86_64")]
        let (full_rows, full_cols) = match super::x86::available() {
            true => {
                let (full_rows, full_cols) = (height / 8 * 8, cols / 8 * 8);
                for c in (0..full_cols).step_by(8) {
                    for i in (0..full_rows).step_by(8) {
                        super::x86::transpose8_signs(
                            strip.as_ptr().add(i * cols + c),
                            cols,
                            self.values.map(|p| p.add(c * rows + r0 + i)),
                            self.signs.map(|p| p.add(c * rows + r0 + i)),
                            rows,
                        );
                    }
                }
                (full_rows, full_cols)
            }
            false => (0, 0),
        };
        #[cfg(not(target_arch = "x86_64"))]
        let (full_rows, full_cols) = (0, 0);
        for c in 0..cols {
            let first = if c < full_cols { full_rows } else { 0 };
            for i in first..height {
                let v = strip[i * cols + c];
                let at = c * rows + r0 + i;
                if let Some(p) = self.values {
                    p.add(at).write(v);
                }
                if let Some(p) = self.signs {
                    p.add(at).write(super::sign(v));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::sparse::{signs, transpose};

    #[test]
    fn equals_transpose_and_signs_of_the_filled_matrix() {
        // Shapes with and without 8-row and 8-column tails; values with zeros, -0, NaN and
        // infinities so that the signs see every case.
        let shapes = [(1, 1), (3, 5), (8, 8), (17, 33), (256, 784), (256, 256)];
        // Miri (which interprets every load) checks the small shapes only.
        for &(rows, cols) in &shapes[..if cfg!(miri) { 4 } else { 6 }] {
            let a: Vec<f32> = (0..rows * cols)
                .map(|t| match t % 11 {
                    0 => 0.0,
                    1 => -0.0,
                    2 => f32::NAN,
                    3 => f32::INFINITY,
                    4 => f32::NEG_INFINITY,
                    _ => (t as f32 * 0.37).sin(),
                })
                .collect();
            let fill = |r0: usize, strip: &mut [f32]| {
                strip.copy_from_slice(&a[r0 * cols..r0 * cols + strip.len()])
            };
            let want = transpose(&a, rows, cols).unwrap();
            for (vals, sg) in [(true, true), (true, false), (false, true)] {
                let t = transpose_rows(rows, cols, vals, sg, fill).unwrap();
                match vals {
                    true => {
                        let same = t
                            .values
                            .iter()
                            .zip(&want)
                            .all(|(x, y)| x.to_bits() == y.to_bits());
                        assert!(same && t.values.len() == want.len(), "{rows}x{cols} values");
                    }
                    false => assert!(t.values.is_empty()),
                }
                match sg {
                    true => assert_eq!(t.signs, signs(&want), "{rows}x{cols} signs"),
                    false => assert!(t.signs.is_empty()),
                }
            }
        }
    }

    #[test]
    fn split_across_threads_gives_the_same_bits() {
        let (rows, cols) = (256, 784);
        let a: Vec<f32> = (0..rows * cols).map(|t| (t as f32 * 0.11).cos()).collect();
        let fill = |r0: usize, strip: &mut [f32]| {
            strip.copy_from_slice(&a[r0 * cols..r0 * cols + strip.len()])
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let t = pool.install(|| transpose_rows(rows, cols, true, true, fill).unwrap());
        assert_eq!(t.values, transpose(&a, rows, cols).unwrap());
        assert_eq!(t.signs, signs(&t.values));
    }
}
