//! The output head of a decode step on the CPU: one token `[1, 2560]` times a `[vocab, 2560]`
//! weight transposed, our threaded GEMV (`bitnet_quant::ops::gemv::linear_t`) against candle's
//! GEMM on the same weight, in f32, f16 and bf16, in the same run.
//!
//! Rows `head_gemv/<vocab>x2560_<threads>threads/{gemv,candle}_{f32,f16,bf16}`, throughput in bytes
//! of weight read once per call. `BITNET_BENCH_VOCAB` (default 32000; bitnet-b1.58-2B-4T's is
//! 128256). Threads: `RAYON_NUM_THREADS=1` and `=2` (both sides read it).

use bitnet::quant::ops::gemv::linear_t;
use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let vocab = std::env::var("BITNET_BENCH_VOCAB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32000usize);
    let hidden = 2560;
    let w32 = Tensor::randn(0f32, 0.02, (vocab, hidden), &Device::Cpu).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, hidden), &Device::Cpu).unwrap();
    let threads = rayon::current_num_threads();
    let mut g = c.benchmark_group(format!("head_gemv/{vocab}x{hidden}_{threads}threads"));
    g.sample_size(20);
    for (name, dtype) in [
        ("f32", DType::F32),
        ("f16", DType::F16),
        ("bf16", DType::BF16),
    ] {
        let w = w32.to_dtype(dtype).unwrap();
        let xd = x.to_dtype(dtype).unwrap();
        g.throughput(Throughput::Bytes(
            (vocab * hidden * dtype.size_in_bytes()) as u64,
        ));
        g.bench_function(format!("gemv_{name}"), |b| {
            b.iter(|| black_box(linear_t(&x, &w).unwrap()))
        });
        let wt = w.t().unwrap();
        g.bench_function(format!("candle_{name}"), |b| {
            b.iter(|| black_box(xd.matmul(&wt).unwrap()))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
