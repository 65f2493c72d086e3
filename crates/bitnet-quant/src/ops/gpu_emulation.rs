//! What the host emulations of the GPU kernels (`scales/metal_emulation.rs`,
//! `packed/cuda_emulation.rs`) share: the kernels' block reductions, which both devices do as the
//! same shared-memory tree, so the emulations must add in the tree's order, not left to right.

/// `bq_block_sum` / `bq_block_max`: one value per thread, a tree over the block (a power of two
/// threads): thread `tid < s` adds `v[tid + s]` for `s` = half the block, then half that, and so on.
pub(crate) fn tree<T: Copy>(mut v: Vec<T>, add: impl Fn(T, T) -> T) -> T {
    let mut s = v.len() / 2;
    while s > 0 {
        for tid in 0..s {
            v[tid] = add(v[tid], v[tid + s]);
        }
        s /= 2;
    }
    v[0]
}
