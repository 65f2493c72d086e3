//! Packed ternary matmul on the rows llama.cpp's `test-backend-ops perf -o MUL_MAT` times for
//! TQ2_0: a `[4096, 14336]` weight (4096 outputs, 14336 inputs) times n = 1, 2, 3, 4, 5, 8 and
//! 512 tokens, on one thread (what `test-backend-ops` uses on a 2-core machine:
//! `hardware_concurrency / 2`).
//!
//! The same work as llama.cpp's op: its time includes converting the f32 activations to
//! `q8_K` (ggml-cpu's `mul_mat` quantizes `src1` to the weight type's `vec_dot_type` inside the
//! op), so ours includes the int8 quantization of the activations, the integer product and the
//! dequantization, as [`PackedBitLinear::forward`] does them (no RMSNorm). Throughput is in
//! FLOPs as llama.cpp counts them (`2 * m * n * k`), so criterion's `Gelem/s` reads as GFLOPS.
//!
//! Rows `packed/<kernel>/n<n>`, one per kernel this CPU runs (the detected one is what
//! `PackedBitLinear` uses by default). `scripts/llama-cpp-matmul.sh` runs this bench and
//! llama.cpp's interleaved.
//!
//! Env: `BITNET_BENCH_N` (comma-separated n, default all seven), `BITNET_BENCH_KERNELS`
//! (comma-separated kernel names, default every available one but the scalar reference),
//! `BITNET_BENCH_THREADS` (default 1).

mod common;

use bitnet::quant::packed::{Kernel, PackedBitLinear};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

const M: usize = 4096;
const K: usize = 14336;
const NS: [usize; 7] = [1, 2, 3, 4, 5, 8, 512];

/// A `[M, K]` layer of uniformly random ternary codes with one scale per row.
fn layer() -> PackedBitLinear {
    PackedBitLinear::from_parts(common::random_ternary(M, K, 22), None, None).unwrap()
}

fn list<T>(var: &str, parse: impl Fn(&str) -> Option<T>) -> Option<Vec<T>> {
    let v = std::env::var(var).ok()?;
    Some(v.split(',').filter_map(|s| parse(s.trim())).collect())
}

fn bench(c: &mut Criterion) {
    let threads = std::env::var("BITNET_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let ns = list("BITNET_BENCH_N", |s| s.parse().ok()).unwrap_or(NS.to_vec());
    let kernels = list("BITNET_BENCH_KERNELS", Kernel::from_name)
        .unwrap_or_else(Kernel::available)
        .into_iter()
        .filter(|k| k.is_available() && *k != Kernel::Scalar)
        .collect::<Vec<_>>();
    let base = layer();
    eprintln!(
        "packed_llama_shapes: {M}x{K}, {threads} thread(s), detected kernel {}",
        Kernel::detect().name()
    );
    let mut g = c.benchmark_group("packed_llama_shapes");
    g.sample_size(10);
    for n in ns {
        let x = Tensor::randn(0f32, 1.0, (n, K), &Device::Cpu).unwrap();
        g.throughput(Throughput::Elements((2 * M * n * K) as u64));
        for &k in &kernels {
            let l = base.clone().with_kernel(k);
            g.bench_function(
                BenchmarkId::new(format!("packed/{}", k.name()), format!("n{n}")),
                |b| b.iter(|| pool.install(|| black_box(l.forward(&x).unwrap()))),
            );
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
