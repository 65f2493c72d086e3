//! Storage access shared by the CPU kernels.

use crate::error::QuantError;
use bitnet_core::{current_pool, Category, PoolBuffer};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};

/// An op's input values in logical (row-major) order: borrowed from the storage when it is
/// contiguous, else gathered into scratch from [`current_pool`] (category `Scratch`; the global pool
/// unless the caller chose another with [`bitnet_core::with_pool`]),
/// which takes the buffer back when this is dropped, ready for the next op's gather.
pub(crate) enum Values<'a> {
    Borrowed(&'a [f32]),
    Gathered(PoolBuffer),
}

impl std::ops::Deref for Values<'_> {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        match self {
            Values::Borrowed(s) => s,
            Values::Gathered(b) => b.as_slice_of::<f32>(),
        }
    }
}

/// The values of an f32 storage (see [`Values`]): transposes, broadcasts and narrows are gathered
/// through their strides.
pub(crate) fn f32_values<'a>(
    op: &'static str,
    s: &'a CpuStorage,
    l: &Layout,
) -> Result<Values<'a>> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        other => {
            return Err(QuantError::DType {
                op,
                dtype: other.dtype(),
            }
            .into())
        }
    };
    if let Some((a, b)) = l.contiguous_offsets() {
        return Ok(Values::Borrowed(&data[a..b]));
    }
    let n = l.shape().elem_count();
    if n == 0 {
        return Ok(Values::Borrowed(&[]));
    }
    let mut buf = current_pool().allocate_slice::<f32>(n, Category::Scratch)?;
    gather(
        data,
        l.dims(),
        l.stride(),
        l.start_offset(),
        buf.as_mut_slice_of::<f32>(),
    );
    Ok(Values::Gathered(buf))
}

/// Side of the square tiles of [`gather_transposed`]: 32 x 32 f32 (4 KiB each way) stays in L1.
const TILE: usize = 32;

/// Writes the strided view (`dims`, `stride`, `offset` into `data`) to `out` in row-major order;
/// `out` has exactly the view's element count.
fn gather(data: &[f32], dims: &[usize], stride: &[usize], offset: usize, out: &mut [f32]) {
    let n = out.len();
    if n == 0 {
        return;
    }
    if let ([rows, cols], [1, ld]) = (dims, stride) {
        if *ld >= *rows && *cols > 1 {
            return gather_transposed(data, *rows, *cols, *ld, offset, out);
        }
    }
    let (inner, inner_stride) = match (dims.last(), stride.last()) {
        (Some(&d), Some(&s)) => (d, s),
        _ => (1, 1),
    };
    let outer = &dims[..dims.len().saturating_sub(1)];
    let mut idx = vec![0usize; outer.len()];
    let mut pos = offset;
    for row in out.chunks_exact_mut(inner) {
        // The innermost dimension in one tight loop: a slice copy, a broadcast fill or a stride.
        match inner_stride {
            1 => row.copy_from_slice(&data[pos..pos + inner]),
            0 => row.fill(data[pos]),
            s => row
                .iter_mut()
                .enumerate()
                .for_each(|(i, o)| *o = data[pos + i * s]),
        }
        // Odometer increment over the outer dimensions.
        for d in (0..outer.len()).rev() {
            idx[d] += 1;
            pos += stride[d];
            if idx[d] < outer[d] {
                break;
            }
            pos -= stride[d] * outer[d];
            idx[d] = 0;
        }
    }
}

/// The gather of a transposed matrix (`[rows, cols]` with strides `[1, ld]`, e.g. `w.t()` or
/// the gradient candle hands a `Linear` weight): element `(r, c)` is `data[offset + r + c * ld]`.
/// The row-by-row walk would read with a stride of `ld` floats, one cache line per value; square
/// tiles read each source row as contiguous runs and write within a few cache lines.
fn gather_transposed(
    data: &[f32],
    rows: usize,
    cols: usize,
    ld: usize,
    offset: usize,
    out: &mut [f32],
) {
    for rr in (0..rows).step_by(TILE) {
        let r_hi = (rr + TILE).min(rows);
        for cc in (0..cols).step_by(TILE) {
            for c in cc..(cc + TILE).min(cols) {
                let src = &data[offset + c * ld + rr..offset + c * ld + r_hi];
                for (k, &v) in src.iter().enumerate() {
                    out[(rr + k) * cols + c] = v;
                }
            }
        }
    }
}

/// Values per parallel work item: 64 KiB of f32, large enough to amortise rayon's scheduling and
/// small enough to keep both cores busy on a 256x784 layer.
pub(crate) const CHUNK: usize = 1 << 14;

/// Calls `f(block, start, out_segment)` for every piece of `out` that lies inside one block of
/// `block` consecutive values, where `start` is the segment's first index. Runs in parallel chunks
/// when [`parallel`](super::parallel) says so, on the calling thread otherwise. `out` holds
/// fresh slots or initialised values ([`Slot`](super::slot::Slot)).
pub(crate) fn for_block_segments<S, F>(out: &mut [S], block: usize, f: F)
where
    S: Send,
    F: Fn(usize, usize, &mut [S]) + Sync,
{
    let work = |start: usize, chunk: &mut [S]| block_segments_from(start, chunk, block, &f);
    if super::parallel(out.len()) {
        use rayon::prelude::*;
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(i, c)| work(i * CHUNK, c));
    } else {
        work(0, out);
    }
}

/// [`for_block_segments`] over `out` holding the values from index `start` on (a piece of a
/// longer run), on the calling thread.
pub(crate) fn block_segments_from<S, F>(start: usize, out: &mut [S], block: usize, f: &F)
where
    F: Fn(usize, usize, &mut [S]),
{
    let mut pos = 0;
    while pos < out.len() {
        let g = start + pos;
        let b = g / block;
        let end = ((b + 1) * block - start).min(out.len());
        f(b, g, &mut out[pos..end]);
        pos = end;
    }
}

/// Rejects empty tensors, which have no scale.
pub(crate) fn non_empty(op: &'static str, l: &Layout) -> Result<()> {
    if l.shape().elem_count() == 0 {
        return Err(QuantError::Empty {
            op,
            shape: l.shape().clone(),
        }
        .into());
    }
    Ok(())
}

/// The last dimension, 1 for a scalar.
pub(crate) fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cover_every_index_once_with_its_block() {
        for (n, block) in [
            (10, 3),
            (10, 10),
            (100_000, 7),
            (100_000, 100_000),
            (70_000, 20_000),
        ] {
            let mut out = vec![-1.0f32; n];
            for_block_segments(&mut out, block, |b, start, seg| {
                for (i, o) in seg.iter_mut().enumerate() {
                    assert_eq!((start + i) / block, b);
                    assert_eq!(*o, -1.0, "index {} visited twice", start + i);
                    *o = b as f32;
                }
            });
            assert!(out
                .iter()
                .enumerate()
                .all(|(i, &o)| o == (i / block) as f32));
        }
    }

    fn gather(data: &[f32], dims: &[usize], stride: &[usize], offset: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; dims.iter().product()];
        super::gather(data, dims, stride, offset, &mut out);
        out
    }

    #[test]
    fn gathered_values_come_from_the_callers_pool_and_go_back() {
        let data: Vec<f32> = (0..64 * 48).map(|i| i as f32).collect();
        let storage = CpuStorage::F32(data.clone());
        let layout = Layout::contiguous((64, 48)).transpose(0, 1).unwrap();
        // A private pool: the global one is shared with the other tests running in parallel.
        let pool = bitnet_core::HybridMemoryPool::new(bitnet_core::PoolConfig::default()).unwrap();
        let scratch = |p: &bitnet_core::HybridMemoryPool| *p.stats().category(Category::Scratch);
        bitnet_core::with_pool(&pool, || {
            let v = f32_values("test", &storage, &layout).unwrap();
            assert!(matches!(v, Values::Gathered(_)));
            assert_eq!(v[1], data[48]); // (0, 1) of the transpose is (1, 0) of the original
            assert_eq!(scratch(&pool).total_allocations, 1);
            assert_eq!(scratch(&pool).bytes_in_use, 64 * 48 * 4);
            drop(v);
            assert_eq!(scratch(&pool).bytes_in_use, 0, "the buffer went back");
            let contiguous = f32_values("test", &storage, &Layout::contiguous((64, 48))).unwrap();
            assert!(matches!(contiguous, Values::Borrowed(_)));
            assert_eq!(
                scratch(&pool).total_allocations,
                1,
                "no copy of contiguous input"
            );
        });
    }

    #[test]
    fn gather_follows_strides() {
        // A 2x3 row-major buffer read as its transpose (3x2, strides [1, 3]).
        let data = [0., 1., 2., 3., 4., 5.];
        assert_eq!(
            gather(&data, &[3, 2], &[1, 3], 0),
            vec![0., 3., 1., 4., 2., 5.]
        );
        // Larger transposes take the tiled path (partial tiles, an offset, ld > rows): compare with
        // the definition.
        for (rows, cols, ld, offset) in [(37, 70, 37, 0), (33, 65, 40, 5), (256, 10, 256, 0)] {
            let data: Vec<f32> = (0..offset + cols * ld).map(|i| i as f32).collect();
            let want: Vec<f32> = (0..rows * cols)
                .map(|i| data[offset + i / cols + (i % cols) * ld])
                .collect();
            assert_eq!(
                gather(&data, &[rows, cols], &[1, ld], offset),
                want,
                "{rows}x{cols}"
            );
        }
        // A broadcast row (stride 0) and an offset.
        assert_eq!(gather(&data, &[2, 2], &[0, 1], 4), vec![4., 5., 4., 5.]);
    }
}
