//! Generation speed of a `BitNetForCausalLM` with microsoft/bitnet-b1.58-2B-4T's layer shapes
//! (hidden 2560, intermediate 6912, 20 heads over 5 key/value heads of 128; random weights,
//! ternarized by transformers' quantizer), packed 2-bit kernels against the same model with f32
//! weights and candle's GEMM, in the same run.
//!
//! * `decode/{packed,packed_bf16,f32}`: one new token at position 64 (the KV cache holds a
//!   64-token prompt); throughput in tokens/s. `packed_bf16` keeps the embedding and output head
//!   in bf16 (`to_weight_dtype`), which the head's GEMV reads at half the bytes.
//! * `prefill/{packed,packed_bf16,f32}`: a 128-token prompt in one forward; throughput in
//!   tokens/s.
//!
//! `BITNET_BENCH_LAYERS` layers (default 2; the real model has 30: time per layer is the
//! measured time over the layers, the embedding and head aside) and a vocabulary of
//! `BITNET_BENCH_VOCAB` (default 32000; the real 128256 adds an output head of 1.3 GB in f32 to
//! every token, the same in both runtimes). Threads: run once per count,
//! `RAYON_NUM_THREADS=1 cargo bench --bench bitnet_generate` and `RAYON_NUM_THREADS=2 ...`
//! (candle's GEMM and our kernels both read it); the bench names carry the count.
//!
//! `BITNET_BENCH_DEVICE=cuda` (with `--features cuda`) runs the same groups on the first CUDA GPU
//! instead, `decode_cuda_{L}layers_{V}vocab` and `prefill128_cuda_*`, with rows `packed` (f32 embedding and head),
//! `packed_bf16` (the head in bf16), `bf16` (every weight unpacked to bf16: the model as
//! transformers runs it in `torch.bfloat16`, cuBLAS GEMMs, the baseline) and `f32`. On a GPU
//! the real model's size is worth measuring whole: `BITNET_BENCH_LAYERS=30
//! BITNET_BENCH_VOCAB=128256`.

use bitnet::models::bitnet::{BitNetForCausalLM, Cache, Config};
use bitnet::training::QATConfig;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The packed and f32 runtimes of one random model.
fn models() -> (BitNetForCausalLM, BitNetForCausalLM) {
    let cfg = Config::b158_2b_shapes(
        env_usize("BITNET_BENCH_LAYERS", 2),
        env_usize("BITNET_BENCH_VOCAB", 32000),
    );
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let trained = BitNetForCausalLM::new(&cfg, QATConfig::ternary_hf(), vb).unwrap();
    let packed = trained.to_packed().unwrap();
    drop(trained);
    drop(vm);
    let dense = packed.to_dense().unwrap();
    (packed, dense)
}

fn ids(n: usize, vocab: usize) -> Tensor {
    let v: Vec<u32> = (0..n as u32)
        .map(|i| (i * 7919 + 13) % vocab as u32)
        .collect();
    Tensor::from_vec(v, (1, n), &Device::Cpu).unwrap()
}

fn bench(c: &mut Criterion) {
    if std::env::var("BITNET_BENCH_DEVICE").is_ok_and(|d| d != "cpu") {
        return gpu::bench(c);
    }
    let (packed, dense) = models();
    let packed16 = packed.to_weight_dtype(DType::BF16).unwrap();
    let cfg = packed.config().clone();
    let threads = rayon::current_num_threads();
    let tag = format!("{}layers_{}threads", cfg.num_hidden_layers, threads);
    let mut g = c.benchmark_group(format!("bitnet_2b_shapes/decode_{tag}"));
    g.sample_size(10).throughput(Throughput::Elements(1));
    let runs = [
        ("packed", &packed),
        ("packed_bf16", &packed16),
        ("f32", &dense),
    ];
    for (name, m) in runs {
        let mut prefilled = Cache::new(true, &cfg);
        m.forward(&ids(64, cfg.vocab_size), 0, &mut prefilled)
            .unwrap();
        let next = ids(1, cfg.vocab_size);
        g.bench_function(name, |b| {
            b.iter(|| {
                // Clones share the cache's buffers; every iteration writes the same slot 64.
                let mut cache = prefilled.clone();
                black_box(m.forward(&next, 64, &mut cache).unwrap())
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group(format!("bitnet_2b_shapes/prefill128_{tag}"));
    g.sample_size(10).throughput(Throughput::Elements(128));
    let prompt = ids(128, cfg.vocab_size);
    for (name, m) in runs {
        g.bench_function(name, |b| {
            b.iter(|| black_box(m.forward(&prompt, 0, &mut Cache::new(true, &cfg)).unwrap()))
        });
    }
    g.finish();
}

#[cfg(feature = "cuda")]
mod common;

#[cfg(feature = "cuda")]
mod gpu {
    use super::{ids, models};
    use bitnet::models::bitnet::{BitNetForCausalLM, Cache};
    use candle_core::{DType, Device, Tensor};
    use criterion::{Criterion, Throughput};

    pub fn bench(c: &mut Criterion) {
        let dev = Device::new_cuda(0).expect("BITNET_BENCH_DEVICE=cuda needs a CUDA GPU");
        let (packed, dense) = models();
        let cfg = packed.config().clone();
        let on = |m: &BitNetForCausalLM, dtype| {
            m.to_weight_dtype(dtype).unwrap().to_device(&dev).unwrap()
        };
        let runs: Vec<(&str, BitNetForCausalLM)> = vec![
            ("packed", on(&packed, DType::F32)),
            ("packed_bf16", on(&packed, DType::BF16)),
            ("bf16", on(&dense, DType::BF16)),
            ("f32", on(&dense, DType::F32)),
        ];
        drop((packed, dense));
        let to_dev = |t: Tensor| t.to_device(&dev).unwrap();
        let tag = format!(
            "cuda_{}layers_{}vocab",
            cfg.num_hidden_layers, cfg.vocab_size
        );
        // What each decode step reads at least once, for scripts/gpu_results.py's GB/s.
        for (name, m) in &runs {
            println!(
                "bitnet_generate: {tag}/{name}: weights {} bytes",
                m.weights_bytes()
            );
        }
        let mut g = c.benchmark_group(format!("bitnet_2b_shapes/decode_{tag}"));
        g.sample_size(20).throughput(Throughput::Elements(1));
        let next = to_dev(ids(1, cfg.vocab_size));
        for (name, m) in &runs {
            let mut prefilled = Cache::new(true, &cfg);
            m.forward(&to_dev(ids(64, cfg.vocab_size)), 0, &mut prefilled)
                .unwrap();
            g.bench_function(*name, |b| {
                b.iter_custom(|iters| {
                    super::common::synchronized(&dev, iters, || {
                        let mut cache = prefilled.clone();
                        m.forward(&next, 64, &mut cache).unwrap()
                    })
                })
            });
        }
        g.finish();
        let mut g = c.benchmark_group(format!("bitnet_2b_shapes/prefill128_{tag}"));
        g.sample_size(10).throughput(Throughput::Elements(128));
        let prompt = to_dev(ids(128, cfg.vocab_size));
        for (name, m) in &runs {
            g.bench_function(*name, |b| {
                b.iter_custom(|iters| {
                    super::common::synchronized(&dev, iters, || {
                        m.forward(&prompt, 0, &mut Cache::new(true, &cfg)).unwrap()
                    })
                })
            });
        }
        g.finish();
    }
}

#[cfg(not(feature = "cuda"))]
mod gpu {
    pub fn bench(_: &mut criterion::Criterion) {
        panic!("BITNET_BENCH_DEVICE: this build has no GPU backend; rebuild with --features cuda")
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
