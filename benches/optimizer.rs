//! Optimizer step cost: our fused `QatAdamW` against candle-nn's `AdamW`, measured in the same run,
//! on the parameters of the MNIST MLP 784-256-256-10 (270 k parameters); and the fused kernel
//! sequential vs parallel at several sizes (how `DEFAULT_PAR_THRESHOLD` was chosen).
//!
//! `cargo bench --bench optimizer -- --warm-up-time 1 --measurement-time 3`
//! (`RAYON_NUM_THREADS=1` or `2` to compare thread counts).

use bitnet::training::optim::{ParamsQatAdamW, QatAdamW};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const MLP_SHAPES: [&[usize]; 6] = [&[256, 784], &[256], &[256, 256], &[256], &[10, 256], &[10]];

fn mlp_vars() -> Result<Vec<Var>> {
    MLP_SHAPES
        .iter()
        .map(|s| Var::randn(0f32, 0.05, *s, &Device::Cpu))
        .collect()
}

/// Gradients from a real backward pass of `sum(w * r)` over all vars (each gradient is `r`).
fn grads_by_backward(vars: &[Var]) -> Result<GradStore> {
    let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu)?;
    for v in vars {
        let r = Tensor::randn(0f32, 1.0, v.shape(), &Device::Cpu)?;
        loss = (loss + (v.as_tensor() * r)?.sum_all()?)?;
    }
    loss.backward()
}

/// Gradients as candle hands them over for `Linear` layers: weights' gradients transposed views.
fn transposed_grads(vars: &[Var]) -> Result<GradStore> {
    let mut g = GradStore::default();
    for v in vars {
        let t = match v.dims() {
            [r, c] => Tensor::randn(0f32, 1.0, (*c, *r), &Device::Cpu)?.t()?,
            _ => Tensor::randn(0f32, 1.0, v.shape(), &Device::Cpu)?,
        };
        g.insert(v.as_tensor(), t);
    }
    Ok(g)
}

fn bench_mlp(c: &mut Criterion) {
    let params = ParamsAdamW::default();
    let n: usize = MLP_SHAPES.iter().map(|s| s.iter().product::<usize>()).sum();
    let mut group = c.benchmark_group("cpu_adamw_step_mlp");
    group.throughput(Throughput::Elements(n as u64));

    let vars = mlp_vars().unwrap();
    let grads = grads_by_backward(&vars).unwrap();
    let mut theirs = AdamW::new(vars.clone(), params.clone()).unwrap();
    group.bench_function("candle_nn_adamw", |b| {
        b.iter(|| theirs.step(&grads).unwrap())
    });

    let vars = mlp_vars().unwrap();
    let grads = grads_by_backward(&vars).unwrap();
    let mut ours = QatAdamW::new(vars.clone(), ParamsQatAdamW::from(params.clone())).unwrap();
    group.bench_function("qat_adamw", |b| b.iter(|| ours.step(&grads).unwrap()));

    let vars = mlp_vars().unwrap();
    let grads = transposed_grads(&vars).unwrap();
    let mut ours = QatAdamW::new(vars.clone(), ParamsQatAdamW::from(params.clone())).unwrap();
    group.bench_function("qat_adamw_transposed_grads", |b| {
        b.iter(|| ours.step(&grads).unwrap())
    });

    let vars = mlp_vars().unwrap();
    let grads = transposed_grads(&vars).unwrap();
    let mut theirs = AdamW::new(vars.clone(), params).unwrap();
    group.bench_function("candle_nn_adamw_transposed_grads", |b| {
        b.iter(|| theirs.step(&grads).unwrap())
    });
    group.finish();
}

fn bench_threshold(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu_adamw_kernel_threshold");
    for n in [4 << 10, 16 << 10, 32 << 10, 64 << 10, 256 << 10] {
        group.throughput(Throughput::Elements(n as u64));
        for (label, threshold) in [("sequential", usize::MAX), ("parallel", 0)] {
            let var = Var::randn(0f32, 0.05, n, &Device::Cpu).unwrap();
            let grads = grads_by_backward(std::slice::from_ref(&var)).unwrap();
            let mut opt = QatAdamW::new(vec![var], ParamsQatAdamW::default()).unwrap();
            opt.set_parallel_threshold(threshold);
            group.bench_with_input(BenchmarkId::new(label, n), &n, |b, _| {
                b.iter(|| opt.step(&grads).unwrap())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_mlp, bench_threshold);
criterion_main!(benches);
