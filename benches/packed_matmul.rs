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

use bitnet::quant::packed::PackedBitLinear;
use bitnet::quant::{BitLinear, BitLinearConfig, Estimator, Quantizer, Scheme};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut g = c.benchmark_group("packed_matmul");
    g.sample_size(10);
    for (out, inp) in [(4096usize, 4096usize), (2560, 6912)] {
        let w = Tensor::randn(0f32, 0.02, (out, inp), &dev).unwrap();
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
        let wq = layer.quantized_weight().unwrap();
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
        for batch in [1usize, 8, 128] {
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

criterion_group!(benches, bench);
criterion_main!(benches);
