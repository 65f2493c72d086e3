//! The CUDA packed forward against candle's cuBLAS matmul in f32 and bf16, in the same run, on
//! BitNet b1.58 2B4T's projection shapes (`[out, in]` = 2560x6912, 6912x2560, 2560x2560) and
//! llama's 4096x14336, at batch 1, 16 and 128.
//!
//! Rows `cuda_packed/<op>/<out>x<in>/b<batch>`, criterion throughput in bytes of weights read
//! once per call (what bounds batch 1):
//! * `packed`: [`PackedBitLinear::forward`] of a ternary layer (no norm) moved to the GPU, with
//!   the default settings: no NaN/infinity check, so no host synchronisation inside the call;
//!   one launch at batch 1, the tensor-core kernel at 16 and 128 on sm_80 and later.
//! * `cublas_f32`, `cublas_bf16`: `x.matmul(&w.t())` with the dequantized weight in f32 and in
//!   bf16 (input of the same dtype), the baselines.
//! * `cpu_packed` (batch 1 and 128 only): the same layer on the GPU machine's CPU, all its threads,
//!   with the kernel `Kernel::detect` chose there (printed as `cuda_packed: cpu kernel ...`):
//!   issue 23 asks what that machine's CPU runs.
//!
//! Each timing ends with a device synchronize, so it covers the kernels, not their launches.
//! `scripts/gpu_results.py` turns the output into `docs/gpu_results.json` rows (µs, GB/s, % of
//! the H200's 4.8 TB/s, ratio against cuBLAS); `scripts/gpu-run.sh` runs it on a lent GPU.
//!
//! Without the `cuda` feature, or without a CUDA device, the bench says so and measures nothing.
//! Env: `BITNET_BENCH_SHAPES` (comma-separated `OUTxIN`, default all four).

mod common;

use criterion::{criterion_group, criterion_main, Criterion};

/// `[out, in]` of every row.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const SHAPES: [(usize, usize); 4] = [(2560, 6912), (6912, 2560), (2560, 2560), (4096, 14336)];
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const BATCHES: [usize; 3] = [1, 16, 128];

#[cfg(feature = "cuda")]
fn bench(c: &mut Criterion) {
    use bitnet::quant::packed::PackedBitLinear;
    use candle_core::{DType, Device, Module, Tensor};
    use criterion::{BenchmarkId, Throughput};

    let dev = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cuda_packed: no CUDA device, nothing measured: {e}");
            return;
        }
    };
    let shapes: Vec<(usize, usize)> = match std::env::var("BITNET_BENCH_SHAPES") {
        Ok(v) => v
            .split(',')
            .filter_map(|s| {
                let (o, i) = s.trim().split_once('x')?;
                Some((o.parse().ok()?, i.parse().ok()?))
            })
            .collect(),
        Err(_) => SHAPES.to_vec(),
    };
    let timed = |iters: u64, f: &dyn Fn() -> Tensor| common::synchronized(&dev, iters, f);
    eprintln!(
        "cuda_packed: cpu kernel {:?}, {} threads",
        bitnet::quant::packed::Kernel::detect(),
        rayon::current_num_threads()
    );
    let mut g = c.benchmark_group("cuda_packed");
    g.sample_size(20);
    for (out, inp) in shapes {
        let w = common::random_ternary(out, inp, (out * 7 + inp) as u64);
        let wq = w.unpack().unwrap();
        let bytes = w.size_bytes() as u64;
        let on_cpu = PackedBitLinear::from_parts(w, None, None).unwrap();
        let packed = on_cpu.to_device(&dev).unwrap();
        let wt32 = wq.to_device(&dev).unwrap().t().unwrap();
        let wt16 = wt32.to_dtype(DType::BF16).unwrap();
        eprintln!(
            "cuda_packed: {out}x{inp}: packed {bytes} bytes, f32 {} bytes",
            out * inp * 4
        );
        for batch in BATCHES {
            let x = Tensor::randn(0f32, 1.0, (batch, inp), &dev).unwrap();
            let x16 = x.to_dtype(DType::BF16).unwrap();
            let id = format!("{out}x{inp}/b{batch}");
            g.throughput(Throughput::Bytes(bytes));
            g.bench_function(BenchmarkId::new("packed", &id), |b| {
                b.iter_custom(|n| timed(n, &|| packed.forward(&x).unwrap()))
            });
            g.throughput(Throughput::Bytes((out * inp * 4) as u64));
            g.bench_function(BenchmarkId::new("cublas_f32", &id), |b| {
                b.iter_custom(|n| timed(n, &|| x.matmul(&wt32).unwrap()))
            });
            g.throughput(Throughput::Bytes((out * inp * 2) as u64));
            g.bench_function(BenchmarkId::new("cublas_bf16", &id), |b| {
                b.iter_custom(|n| timed(n, &|| x16.matmul(&wt16).unwrap()))
            });
            if batch != 16 {
                let xc = x.to_device(&Device::Cpu).unwrap();
                g.throughput(Throughput::Bytes(bytes));
                g.bench_function(BenchmarkId::new("cpu_packed", &id), |b| {
                    b.iter(|| on_cpu.forward(&xc).unwrap())
                });
            }
        }
    }
    g.finish();
}

#[cfg(not(feature = "cuda"))]
fn bench(_: &mut Criterion) {
    eprintln!("cuda_packed: built without the `cuda` feature, nothing measured");
}

criterion_group!(benches, bench);
criterion_main!(benches);
