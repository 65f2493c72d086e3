//! Our quantize op (forward + backward) against the same math as plain candle ops with the detach
//! trick, and against a plain copy of the tensor (the memory-bound floor), all in one run; and
//! what BitNet b1's centering costs: the centered binary forward (one more pass over the values,
//! for their signed mean) against the plain scaled sign.
//!
//! `cargo bench --bench quantize` (add `--features cuda` for the `cuda_` group)

use bitnet::quant::{Estimator, Quantizer, Scheme};
use candle_core::{Device, Result, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const N: usize = 4096;

/// BitNet's reference formulation: `x + (q(x) - x).detach()` with clipped STE written as a mask,
/// `g = mean|x|`, `q = g * clamp(round(x / (g + eps)), -1, 1)`.
fn candle_detach(x: &Tensor) -> Result<Tensor> {
    let g = x.abs()?.mean_all()?;
    let ge = (&g + 1e-5)?;
    let q = x
        .broadcast_div(&ge)?
        .round()?
        .clamp(-1f32, 1f32)?
        .broadcast_mul(&g)?;
    // Clipped STE: the gradient passes where |x / g| <= 1.
    let mask = x
        .broadcast_div(&ge)?
        .abs()?
        .le(1f64)?
        .to_dtype(candle_core::DType::F32)?;
    let xm = x.mul(&mask.detach())?;
    xm.add(&(q - &xm)?.detach())
}

/// The CUDA group: the same four benches on the GPU. Kernel launches return before the work is
/// done, so each timed loop ends with a device synchronisation (`iter_custom`), and one untimed
/// call first compiles the kernels with NVRTC and loads them.
#[cfg(feature = "cuda")]
fn bench_cuda(c: &mut Criterion) {
    use std::time::{Duration, Instant};
    let dev = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cuda_quantize_4096x4096: skipped, no CUDA device ({e})");
            return;
        }
    };
    let x = Var::from_tensor(&Tensor::randn(0f32, 0.05, (N, N), &dev).unwrap()).unwrap();
    let ours = Quantizer::new(Scheme::TernaryAbsmean, Estimator::Clipped { clip: 1.0 }).unwrap();
    ours.quantize(x.as_tensor()).unwrap().backward().unwrap();
    candle_detach(x.as_tensor()).unwrap().backward().unwrap();
    dev.synchronize().unwrap();
    let timed = |iters: u64, f: &dyn Fn()| -> Duration {
        let start = Instant::now();
        for _ in 0..iters {
            f();
        }
        dev.synchronize().unwrap();
        start.elapsed()
    };
    let mut g = c.benchmark_group("cuda_quantize_4096x4096");
    g.throughput(Throughput::Bytes((N * N * 4 * 2) as u64));
    g.sample_size(20);
    g.bench_function("ours_fwd", |b| {
        b.iter_custom(|i| {
            timed(i, &|| {
                ours.quantize(x.as_tensor()).unwrap();
            })
        })
    });
    g.bench_function("copy", |b| {
        b.iter_custom(|i| {
            timed(i, &|| {
                x.as_tensor().copy().unwrap();
            })
        })
    });
    g.bench_function("ours_fwd_bwd", |b| {
        b.iter_custom(|i| {
            timed(i, &|| {
                ours.quantize(x.as_tensor()).unwrap().backward().unwrap();
            })
        })
    });
    g.bench_function("candle_detach_fwd_bwd", |b| {
        b.iter_custom(|i| {
            timed(i, &|| {
                candle_detach(x.as_tensor()).unwrap().backward().unwrap();
            })
        })
    });
    g.finish();
}

/// Without the `cuda` feature there is no CUDA group.
#[cfg(not(feature = "cuda"))]
fn bench_cuda(_: &mut Criterion) {}

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 0.05, (N, N), &dev).unwrap()).unwrap();
    let ours = Quantizer::new(Scheme::TernaryAbsmean, Estimator::Clipped { clip: 1.0 }).unwrap();
    let mut g = c.benchmark_group("cpu_quantize_4096x4096");
    g.throughput(Throughput::Bytes((N * N * 4 * 2) as u64));
    g.sample_size(20);
    g.bench_function("ours_fwd", |b| {
        b.iter(|| ours.quantize(x.as_tensor()).unwrap())
    });
    g.bench_function("copy", |b| b.iter(|| x.as_tensor().copy().unwrap()));
    g.bench_function("ours_fwd_bwd", |b| {
        b.iter(|| ours.quantize(x.as_tensor()).unwrap().backward().unwrap())
    });
    g.bench_function("candle_detach_fwd_bwd", |b| {
        b.iter(|| candle_detach(x.as_tensor()).unwrap().backward().unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("cpu_binary_4096x4096");
    g.throughput(Throughput::Bytes((N * N * 4 * 2) as u64));
    g.sample_size(20);
    for (name, scheme) in [
        ("plain_fwd", Scheme::Binary { scaled: true }),
        ("centered_fwd", Scheme::BinaryCentered),
    ] {
        let q = Quantizer::new(scheme, Estimator::Identity).unwrap();
        g.bench_function(name, |b| b.iter(|| q.quantize(x.as_tensor()).unwrap()));
    }
    g.finish();
}

criterion_group!(benches, bench, bench_cuda);
criterion_main!(benches);
