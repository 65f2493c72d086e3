//! What several benches build the same way: random packed ternary layers, and GPU timings that
//! cover the kernels rather than their launches.

use bitnet::quant::packed::PackedTernary;
use bitnet::quant::Granularity;
use rand::{Rng, SeedableRng};

/// An `[out, inp]` weight of uniformly random ternary codes with one scale per row (the
/// kernels' work does not depend on the values). Byte `b` of a 32-byte block holds the block's
/// weights `b + 32 j`; columns past `inp` in the last block hold the zero code.
#[allow(dead_code)] // not every bench that includes this module packs a layer
pub fn random_ternary(out: usize, inp: usize, seed: u64) -> PackedTernary {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let row = inp.div_ceil(128) * 32;
    let data: Vec<u8> = (0..out * row)
        .map(|i| {
            let (block, b) = ((i % row) / 32, i % 32);
            (0..4).fold(0u8, |acc, j| {
                let code = if block * 128 + b + 32 * j < inp {
                    rng.random_range(0..3u8)
                } else {
                    1
                };
                acc | (code << (2 * j))
            })
        })
        .collect();
    let scales: Vec<f32> = (0..out).map(|_| rng.random_range(0.01..0.05f32)).collect();
    PackedTernary::from_raw(out, inp, Granularity::PerChannel, &data, &scales).unwrap()
}

/// `iters` calls of `f` on `dev`, between two synchronizations, so that the time covers the
/// kernels and not only their launches (for criterion's `iter_custom`).
#[cfg(feature = "cuda")]
#[allow(dead_code)] // not every bench that includes this module runs on CUDA
pub fn synchronized<T>(
    dev: &candle_core::Device,
    iters: u64,
    f: impl Fn() -> T,
) -> std::time::Duration {
    dev.synchronize().unwrap();
    let start = std::time::Instant::now();
    for _ in 0..iters {
        std::hint::black_box(f());
    }
    dev.synchronize().unwrap();
    start.elapsed()
}
