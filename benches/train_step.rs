//! One full training step (forward, cross-entropy, backward, optimizer step) of the MNIST MLP
//! 784-256-256-10 on a batch of 128 real MNIST images, several ways, in the same run:
//!
//! * `ternary_qat_adamw`: every layer a `QATLayer<BitLinear>` (BitNet b1.58: RMSNorm, absmean
//!   ternary weights, int8 per-token activations, identity STE), updated by our fused `QatAdamW`,
//!   with our one-node ReLU and cross-entropy (`ops::relu`, `training::loss`; every ternary row);
//! * `fp_linear_adamw`: candle-nn `Linear` layers and candle-nn `AdamW`, the plain candle baseline;
//! * `fp_linear_qat_adamw`: the same `Linear` layers updated by `QatAdamW` (isolates the optimizer);
//! * `ternary_qat_adamw_2_shards`: the ternary step with the batch split into two row blocks whose
//!   forward and backward run side by side (`bitnet_training::data_parallel`), the same
//!   gradients summed; it pays with 2 threads and costs with 1;
//! * `ternary_qat_adamw_dense_input`: the ternary step on uniform random pixels instead of the
//!   MNIST batch: no zeros, so the first layer runs the dense GEMMs instead of the sparse
//!   kernels (`bitnet::quant::ops::sparse`);
//! * `ternary_separate_ops_adamw`: the ternary layers run as separate ops
//!   (`BitLinear::forward_separate`: norm, scales, quantizers, GEMM as six graph nodes) instead of
//!   the fused `ops::bitlinear` op, to measure what the fusion saves.
//!
//! `cpu_relu_128x256` and `cpu_cross_entropy_128x10` compare our one-node ReLU and
//! cross-entropy with candle's (forward + backward).
//!
//! `cpu_train_step_parts` splits each step into forward (including the loss), backward and
//! optimizer step, so that the total can be read as a sum. `cpu_rms_norm_784` compares the fused
//! RMSNorm op with the same norm from candle tensor ops (forward + backward of the first layer's
//! input, `[128, 784]`).
//!
//! `cpu_train_step_glibc_default` runs first, with glibc's default allocator settings; every later
//! group runs after `bitnet::core::host_alloc::keep_freed_memory()`, which the examples also call
//! (it keeps freed tensor memory in the process instead of unmapping and re-faulting it each step).
//!
//! Every group runs with `bitnet::core::host_threads::elementwise_on_caller()` (as the examples
//! do), set before the first candle op, unless `BITNET_BENCH_CANDLE_POOL=1` asks for candle's
//! default spinning elementwise pool, to measure what that costs.
//!
//! `RAYON_NUM_THREADS=1 cargo bench --bench train_step -- --warm-up-time 1 --measurement-time 3`
//! (and `=2` to compare thread counts).

use bitnet::quant::{BitLinear, RmsNorm};
use bitnet::training::data_parallel::sharded_backward;
use bitnet::training::optim::{ParamsQatAdamW, QatAdamW};
use bitnet::training::{QATConfig, QATLayer};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{loss, AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

/// The repository's MNIST copy.
const MNIST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist");

const DIMS: [(usize, usize, &str); 3] = [(784, 256, "fc1"), (256, 256, "fc2"), (256, 10, "fc3")];
const BATCH: usize = 128;

/// The MLP: layers with a ReLU between them. The ternary models use our one-node ReLU and
/// cross-entropy (`ops::relu`, `training::loss`) as `train_mnist` does; the candle-nn baselines
/// candle's `Tensor::relu` and `candle_nn::loss::cross_entropy` (`ours == false`).
struct Mlp(Vec<Box<dyn Module + Send + Sync>>, bool);

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, l) in self.0.iter().enumerate() {
            h = l.forward(&h)?;
            if i + 1 < self.0.len() {
                h = match self.1 {
                    true => bitnet::quant::ops::relu::relu(&h)?,
                    false => h.relu()?,
                };
            }
        }
        Ok(h)
    }
}

fn ternary_mlp(vm: &VarMap) -> Result<Mlp> {
    let vb = VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu);
    let layers = DIMS
        .iter()
        .map(|&(i, o, name)| {
            let l: QATLayer<BitLinear> =
                QATLayer::bitlinear(i, o, QATConfig::ternary(), vb.pp(name))?;
            Ok(Box::new(l) as Box<dyn Module + Send + Sync>)
        })
        .collect::<Result<_>>()?;
    Ok(Mlp(layers, true))
}

/// A BitLinear layer run as separate ops (the path before the fused op).
struct Separate(BitLinear);

impl Module for Separate {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = self.0.config();
        self.0.forward_separate(x, &c.weight, c.activation.as_ref())
    }
}

fn separate_mlp(vm: &VarMap) -> Result<Mlp> {
    let vb = VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu);
    let layers = DIMS
        .iter()
        .map(|&(i, o, name)| {
            let l = Separate(BitLinear::new(i, o, vb.pp(name))?);
            Ok(Box::new(l) as Box<dyn Module + Send + Sync>)
        })
        .collect::<Result<_>>()?;
    Ok(Mlp(layers, true))
}

fn linear_mlp(vm: &VarMap) -> Result<Mlp> {
    let vb = VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu);
    let layers = DIMS
        .iter()
        .map(|&(i, o, name)| {
            Ok(Box::new(candle_nn::linear(i, o, vb.pp(name))?) as Box<dyn Module + Send + Sync>)
        })
        .collect::<Result<_>>()?;
    Ok(Mlp(layers, false))
}

/// The first 128 MNIST training images and labels (the repository's copy), loaded once.
/// Real pixels matter: 81 % of them are zero, which the first layer's sparse kernels use.
fn batch() -> Result<(Tensor, Tensor)> {
    static BATCH_CACHE: std::sync::OnceLock<(Tensor, Tensor)> = std::sync::OnceLock::new();
    if let Some(b) = BATCH_CACHE.get() {
        return Ok(b.clone());
    }
    let m = bitnet::datasets::mnist::load(MNIST, &Device::Cpu)?;
    let b = (
        m.train_images.narrow(0, 0, BATCH)?.contiguous()?,
        m.train_labels.narrow(0, 0, BATCH)?.contiguous()?,
    );
    Ok(BATCH_CACHE.get_or_init(|| b).clone())
}

/// A synthetic batch: uniform random pixels (no zeros: the dense GEMM path throughout), labels
/// `0, 1, ..., 9, 0, ...`.
fn dense_batch() -> Result<(Tensor, Tensor)> {
    let x = Tensor::rand(0f32, 1.0, (BATCH, 784), &Device::Cpu)?;
    let y: Vec<u32> = (0..BATCH as u32).map(|i| i % 10).collect();
    Ok((x, Tensor::from_vec(y, BATCH, &Device::Cpu)?))
}

fn loss_of(model: &Mlp, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let logits = model.forward(x)?;
    match model.1 {
        true => bitnet::training::loss::cross_entropy(&logits, y),
        false => loss::cross_entropy(&logits, y),
    }
}

/// A model, its variables and an optimizer over them, built fresh for each bench function.
type Setup<O> = fn() -> Result<(Mlp, O)>;

fn ternary_qat() -> Result<(Mlp, QatAdamW)> {
    let vm = VarMap::new();
    let model = ternary_mlp(&vm)?;
    let opt = QatAdamW::new(vm.all_vars(), ParamsQatAdamW::from(ParamsAdamW::default()))?;
    Ok((model, opt))
}

fn ternary_separate() -> Result<(Mlp, QatAdamW)> {
    let vm = VarMap::new();
    let model = separate_mlp(&vm)?;
    let opt = QatAdamW::new(vm.all_vars(), ParamsQatAdamW::from(ParamsAdamW::default()))?;
    Ok((model, opt))
}

fn linear_adamw() -> Result<(Mlp, AdamW)> {
    let vm = VarMap::new();
    let model = linear_mlp(&vm)?;
    let opt = AdamW::new(vm.all_vars(), ParamsAdamW::default())?;
    Ok((model, opt))
}

fn linear_qat() -> Result<(Mlp, QatAdamW)> {
    let vm = VarMap::new();
    let model = linear_mlp(&vm)?;
    let opt = QatAdamW::new(vm.all_vars(), ParamsQatAdamW::from(ParamsAdamW::default()))?;
    Ok((model, opt))
}

fn bench_full<O: Optimizer>(c: &mut Criterion, name: &str, setup: Setup<O>) {
    bench_full_on(c, name, setup, batch)
}

fn bench_full_on<O: Optimizer>(
    c: &mut Criterion,
    name: &str,
    setup: Setup<O>,
    batch: fn() -> Result<(Tensor, Tensor)>,
) {
    let (x, y) = batch().unwrap();
    let (model, mut opt) = setup().unwrap();
    c.benchmark_group("cpu_train_step")
        .bench_function(name, |b| {
            b.iter(|| {
                let loss = loss_of(&model, &x, &y).unwrap();
                let grads = loss.backward().unwrap();
                opt.step(&grads).unwrap();
            })
        });
}

/// The ternary step with the batch split into `shards` row blocks that run forward and backward
/// in parallel (`bitnet_training::data_parallel::sharded_backward`).
fn bench_sharded(c: &mut Criterion, name: &str, shards: usize) {
    let (x, y) = batch().unwrap();
    let (model, mut opt) = ternary_qat().unwrap();
    c.benchmark_group("cpu_train_step")
        .bench_function(name, |b| {
            b.iter(|| {
                let (_, grads) =
                    sharded_backward(&[&x, &y], shards, |b| loss_of(&model, &b[0], &b[1])).unwrap();
                opt.step(&grads).unwrap();
            })
        });
}

fn bench_parts<O: Optimizer>(c: &mut Criterion, name: &str, setup: Setup<O>) {
    let (x, y) = batch().unwrap();
    let (model, mut opt) = setup().unwrap();
    let mut group = c.benchmark_group("cpu_train_step_parts");
    group.bench_function(format!("{name}/forward"), |b| {
        b.iter(|| loss_of(&model, &x, &y).unwrap())
    });
    group.bench_function(format!("{name}/backward"), |b| {
        b.iter_batched(
            || loss_of(&model, &x, &y).unwrap(),
            |loss| loss.backward().unwrap(),
            BatchSize::SmallInput,
        )
    });
    let grads = loss_of(&model, &x, &y).unwrap().backward().unwrap();
    group.bench_function(format!("{name}/step"), |b| {
        b.iter(|| opt.step(&grads).unwrap())
    });
    group.finish();
}

/// Must stay the first group: the tuning below is process-wide and cannot be undone.
fn train_step_glibc_default(c: &mut Criterion) {
    if std::env::var_os("BITNET_BENCH_CANDLE_POOL").is_none() {
        if let Err(e) = bitnet::core::host_threads::elementwise_on_caller() {
            eprintln!("note: {e}");
        }
    }
    let (x, y) = batch().unwrap();
    let mut group = c.benchmark_group("cpu_train_step_glibc_default");
    let (model, mut opt) = ternary_qat().unwrap();
    group.bench_function("ternary_qat_adamw", |b| {
        b.iter(|| {
            let grads = loss_of(&model, &x, &y).unwrap().backward().unwrap();
            opt.step(&grads).unwrap();
        })
    });
    let (model, mut opt) = linear_adamw().unwrap();
    group.bench_function("fp_linear_adamw", |b| {
        b.iter(|| {
            let grads = loss_of(&model, &x, &y).unwrap().backward().unwrap();
            opt.step(&grads).unwrap();
        })
    });
    group.finish();
}

fn train_step(c: &mut Criterion) {
    bitnet::core::host_alloc::keep_freed_memory();
    bench_full(c, "ternary_qat_adamw", ternary_qat);
    bench_full_on(c, "ternary_qat_adamw_dense_input", ternary_qat, dense_batch);
    bench_sharded(c, "ternary_qat_adamw_2_shards", 2);
    bench_full(c, "ternary_separate_ops_adamw", ternary_separate);
    bench_full(c, "fp_linear_adamw", linear_adamw);
    bench_full(c, "fp_linear_qat_adamw", linear_qat);
}

fn train_step_parts(c: &mut Criterion) {
    bitnet::core::host_alloc::keep_freed_memory();
    bench_parts(c, "ternary_qat_adamw", ternary_qat);
    bench_parts(c, "ternary_separate_ops_adamw", ternary_separate);
    bench_parts(c, "fp_linear_adamw", linear_adamw);
    bench_parts(c, "fp_linear_qat_adamw", linear_qat);
}

fn rms_norm(c: &mut Criterion) {
    bitnet::core::host_alloc::keep_freed_memory();
    let x = candle_core::Var::rand(0f32, 1.0, (BATCH, 784), &Device::Cpu).unwrap();
    let w = candle_core::Var::ones(784, DType::F32, &Device::Cpu).unwrap();
    let norm = RmsNorm::from_weight(w.as_tensor().clone(), 1e-6);
    let r = Tensor::rand(0f32, 1.0, (BATCH, 784), &Device::Cpu).unwrap();
    let mut group = c.benchmark_group("cpu_rms_norm_784");
    group.bench_function("fused", |b| {
        b.iter(|| {
            let y = norm.forward(x.as_tensor()).unwrap();
            (y * &r).unwrap().sum_all().unwrap().backward().unwrap()
        })
    });
    group.bench_function("composed", |b| {
        b.iter(|| {
            let y = norm.forward_composed(x.as_tensor()).unwrap();
            (y * &r).unwrap().sum_all().unwrap().backward().unwrap()
        })
    });
    group.finish();
}

/// The MLP's activation and loss, forward + backward: our one-node ops against candle's
/// (`Tensor::relu`, `candle_nn::loss::cross_entropy`), on the step's shapes.
fn relu_and_loss(c: &mut Criterion) {
    bitnet::core::host_alloc::keep_freed_memory();
    let dev = Device::Cpu;
    let h = candle_core::Var::randn(0f32, 1.0, (BATCH, 256), &dev).unwrap();
    let r = Tensor::randn(0f32, 1.0, (BATCH, 256), &dev).unwrap();
    let mut group = c.benchmark_group("cpu_relu_128x256");
    group.bench_function("ours", |b| {
        b.iter(|| {
            let y = bitnet::quant::ops::relu::relu(h.as_tensor()).unwrap();
            (y * &r).unwrap().sum_all().unwrap().backward().unwrap()
        })
    });
    group.bench_function("candle", |b| {
        b.iter(|| {
            let y = h.as_tensor().relu().unwrap();
            (y * &r).unwrap().sum_all().unwrap().backward().unwrap()
        })
    });
    group.finish();
    let logits = candle_core::Var::randn(0f32, 1.0, (BATCH, 10), &dev).unwrap();
    let y = Tensor::from_vec((0..BATCH as u32).map(|i| i % 10).collect(), BATCH, &dev).unwrap();
    let mut group = c.benchmark_group("cpu_cross_entropy_128x10");
    group.bench_function("ours", |b| {
        b.iter(|| {
            let l = bitnet::training::loss::cross_entropy(logits.as_tensor(), &y).unwrap();
            l.backward().unwrap()
        })
    });
    group.bench_function("candle_nn", |b| {
        b.iter(|| {
            loss::cross_entropy(logits.as_tensor(), &y)
                .unwrap()
                .backward()
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    train_step_glibc_default,
    train_step,
    train_step_parts,
    rms_norm,
    relu_and_loss
);
criterion_main!(benches);
