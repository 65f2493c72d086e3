//! Packed ternary inference vs candle's f32 matmul, on the same weights in the same run.
//!
//! * `packed`: [`PackedBitLinear::forward`] of a layer built *without* the RMSNorm, so it
//!   measures activation quantization (int8 per token) + the integer matmul + dequantization;
//!   the norm is the same f32 op in both paths and would only blur the comparison.
//! * `packed_binary`: the same layer with binary weights (`mean|w| * sign(w)`), packed at 1 bit.
//! * `f32`: `x.matmul(&w.t())` with candle's gemm on the dequantized f32 weight.
//! * `memcpy`: a 256 MiB copy, for the memory bandwidth that bounds batch 1: the packed
//!   weight must be read once per call, so `packed bytes / read bandwidth` is the floor.
//!
//! Shapes `[out, in]`: 4096x4096 and 2560x6912 (BitNet-2B's FFN down projection is 2560x6912);
//! batch 1, 8 and 128 tokens.
//!
//! With `--features cuda` and a GPU, the same layers moved to the GPU with
//! [`PackedBitLinear::to_device`] (`cuda_` rows), timed with a device synchronize after each
//! batch of iterations and reported as GB/s of packed weights read:
//! * `cuda_packed`, `cuda_packed_binary`: the default forward on CUDA, without the NaN/infinity
//!   check and so without a host synchronisation inside the forward: the kernels' own
//!   throughput.
//! * `cuda_packed_checked`: the ternary layer with `with_finite_check(true)`, which copies the
//!   non-finite count back to the host (one synchronisation per call, as a caller of the
//!   checked forward pays it).
//! * `cuda_f32`: candle's (cuBLAS) f32 matmul on the dequantized weight, throughput in f32
//!   weight bytes; the baseline.

mod common;

use bitnet::quant::packed::PackedBitLinear;
use bitnet::quant::{BitLinear, BitLinearConfig, Estimator, Quantizer, Scheme};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

/// Shapes `[out, in]` and batch sizes of every row, CPU and CUDA.
const SHAPES: [(usize, usize); 2] = [(4096, 4096), (2560, 6912)];
const BATCHES: [usize; 3] = [1, 8, 128];

/// The ternary and binary packed layers (no norm) of one random weight, and the dequantized f32
/// ternary weight, on the CPU.
fn layers(out: usize, inp: usize) -> (PackedBitLinear, PackedBitLinear, Tensor) {
    let w = Tensor::randn(0f32, 0.02, (out, inp), &Device::Cpu).unwrap();
    let cfg = BitLinearConfig {
        norm: false,
        ..Default::default()
    };
    let layer = BitLinear::from_parts(w.clone(), None, None, cfg);
    let packed = PackedBitLinear::from_trained(&layer).unwrap();
    let binary = BitLinearConfig {
        weight: Quantizer::new(Scheme::Binary { scaled: true }, Estimator::Identity).unwrap(),
        ..cfg
    };
    let packed_binary =
        PackedBitLinear::from_trained(&BitLinear::from_parts(w, None, None, binary)).unwrap();
    (packed, packed_binary, layer.quantized_weight().unwrap())
}

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut g = c.benchmark_group("packed_matmul");
    g.sample_size(10);
    for (out, inp) in SHAPES {
        let (packed, packed_binary, wq) = layers(out, inp);
        eprintln!(
            "{out}x{inp}: packed {} bytes ({:.4} bytes/weight), f32 {} bytes, kernel {:?}",
            packed.weight().size_bytes(),
            packed.weight().bytes_per_weight(),
            out * inp * 4,
            packed.kernel()
        );
        eprintln!(
            "{out}x{inp}: binary packed {} bytes ({:.4} bytes/weight)",
            packed_binary.weight().size_bytes(),
            packed_binary.weight().bytes_per_weight(),
        );
        for batch in BATCHES {
            let x = Tensor::randn(0f32, 1.0, (batch, inp), &dev).unwrap();
            let id = format!("{out}x{inp}/b{batch}");
            g.throughput(Throughput::Elements((batch * out * inp) as u64));
            g.bench_function(BenchmarkId::new("packed", &id), |b| {
                b.iter(|| black_box(packed.forward(&x).unwrap()))
            });
            g.bench_function(BenchmarkId::new("packed_binary", &id), |b| {
                b.iter(|| black_box(packed_binary.forward(&x).unwrap()))
            });
            g.bench_function(BenchmarkId::new("f32", &id), |b| {
                b.iter(|| black_box(x.matmul(&wq.t().unwrap()).unwrap()))
            });
        }
    }
    let n = 256 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    g.throughput(Throughput::Bytes(n as u64));
    g.bench_function("memcpy/256MiB", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(&dst);
        })
    });
    g.finish();
}

/// The `cuda_` rows: the CPU rows' layers and shapes on CUDA device 0 (skipped, with a note, when
/// there is none).
#[cfg(feature = "cuda")]
fn bench_cuda(c: &mut Criterion) {
    let dev = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("packed_matmul: no CUDA device, cuda_ rows skipped: {e}");
            return;
        }
    };
    let timed = |iters: u64, f: &dyn Fn() -> Tensor| common::synchronized(&dev, iters, f);
    let mut g = c.benchmark_group("packed_matmul");
    g.sample_size(20);
    for (out, inp) in SHAPES {
        let (packed, packed_binary, wq) = layers(out, inp);
        let ternary = packed.to_device(&dev).unwrap();
        let checked = ternary.clone().with_finite_check(true);
        let binary = packed_binary.to_device(&dev).unwrap();
        let wq = wq.to_device(&dev).unwrap();
        let wt = wq.t().unwrap();
        let (tb, bb) = (
            packed.weight().size_bytes() as u64,
            packed_binary.weight().size_bytes() as u64,
        );
        for batch in BATCHES {
            let x = Tensor::randn(0f32, 1.0, (batch, inp), &dev).unwrap();
            let id = format!("{out}x{inp}/b{batch}");
            g.throughput(Throughput::Bytes(tb));
            g.bench_function(BenchmarkId::new("cuda_packed", &id), |b| {
                b.iter_custom(|n| timed(n, &|| ternary.forward(&x).unwrap()))
            });
            g.bench_function(BenchmarkId::new("cuda_packed_checked", &id), |b| {
                b.iter_custom(|n| timed(n, &|| checked.forward(&x).unwrap()))
            });
            g.throughput(Throughput::Bytes(bb));
            g.bench_function(BenchmarkId::new("cuda_packed_binary", &id), |b| {
                b.iter_custom(|n| timed(n, &|| binary.forward(&x).unwrap()))
            });
            g.throughput(Throughput::Bytes((out * inp * 4) as u64));
            g.bench_function(BenchmarkId::new("cuda_f32", &id), |b| {
                b.iter_custom(|n| timed(n, &|| x.matmul(&wt).unwrap()))
            });
        }
    }
    g.finish();
}

#[cfg(feature = "cuda")]
criterion_group!(benches, bench, bench_cuda);
#[cfg(not(feature = "cuda"))]
criterion_group!(benches, bench);
criterion_main!(benches);
