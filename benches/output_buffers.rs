//! What writing kernel outputs into fresh, uninitialised memory saves over zeroing them first:
//! the quantize forward and the sparse transpose, each into a fresh `Box<[MaybeUninit<f32>]>`
//! (`fresh`, what the ops do) and into `vec![0.0; n]` (`zeroed`), in one run, at the MNIST
//! layer's size (`256x784`) and at `4096x4096`.
//!
//! The run calls `bitnet::core::host_alloc::keep_freed_memory()` first, as the examples do:
//! freed buffers up to 32 MiB are then reused from the heap, and a zeroed one costs a memset.
//! A `4096x4096` buffer (64 MiB) is always a fresh `mmap`, whose pages the kernel hands out
//! zeroed anyway (glibc's `calloc` skips the memset there), so that size shows the page faults
//! both forms pay and little else.
//!
//! `cargo bench --bench output_buffers` (`RAYON_NUM_THREADS=1` for one thread)

use bitnet::quant::ops::bench_support;
use bitnet::quant::ops::Kind;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};

fn bench(c: &mut Criterion) {
    bitnet::core::host_alloc::keep_freed_memory();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for (rows, cols) in [(256usize, 784usize), (4096, 4096)] {
        let xs: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-0.1f32..0.1))
            .collect();
        // Ternary absmean weights, one scale for the tensor (as BitNet b1.58's).
        let mean_abs = xs.iter().map(|x| x.abs() as f64).sum::<f64>() / xs.len() as f64;
        let params = [mean_abs as f32, 0.0];
        let quantize = |zeroed| {
            bench_support::quantize_forward(Kind::Absmean, &xs, &params, xs.len(), 1.0, zeroed)
                .unwrap()
        };
        let transpose = |zeroed| bench_support::transpose(&xs, rows, cols, zeroed).unwrap();
        // The two buffers must hold the same values: the comparison is of the buffers alone.
        assert_eq!(quantize(true), quantize(false), "quantize {rows}x{cols}");
        assert_eq!(transpose(true), transpose(false), "transpose {rows}x{cols}");
        let mut g = c.benchmark_group(format!("cpu_output_buffers_{rows}x{cols}"));
        g.throughput(Throughput::Bytes((rows * cols * 4) as u64));
        if rows * cols > 1 << 20 {
            g.sample_size(20);
        }
        // Each pair back to back, so that both see the same machine load.
        for (name, zeroed) in [("fresh", false), ("zeroed", true)] {
            g.bench_function(format!("quantize/{name}"), |b| b.iter(|| quantize(zeroed)));
        }
        for (name, zeroed) in [("fresh", false), ("zeroed", true)] {
            g.bench_function(format!("transpose/{name}"), |b| {
                b.iter(|| transpose(zeroed))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
