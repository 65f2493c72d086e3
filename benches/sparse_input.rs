//! The sparse-input kernels (`bitnet::quant::ops::sparse`) against candle's dense f32 GEMM on the
//! first MNIST layer's products (batch 128, 784 inputs, 256 outputs), at several input
//! densities, in one run. Each sparse row includes building its index (the op does that every
//! step). This is what sets `ops::sparse::MAX_DENSITY`.
//!
//! Rows: `forward` (f32 kernel), `forward_levels` (the integer kernel for int8 activations x
//! ternary weights), `weight_grad` (column-major copy of the index, product, transpose) and
//! `input_grad_sampled` (dot products at the nonzeros only, as the norm gradient needs), each
//! against the dense GEMM of the same product; `weight_and_norm_grad` (the first layer's
//! backward in one sweep: weight gradient and norm-weight gradient) against the weight- and
//! input-gradient GEMMs together.
//!
//! `RAYON_NUM_THREADS=1 cargo bench --bench sparse_input`

use bitnet::quant::ops::sparse::{signs, transpose, SparseRows, WeightT};
use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use rand::{Rng, SeedableRng};

const M: usize = 128;
const K: usize = 784;
const N: usize = 256;

fn values(len: usize, density: f64, rng: &mut rand::rngs::StdRng) -> Vec<f32> {
    (0..len)
        .map(|_| {
            if rng.random_bool(density) {
                rng.random_range(-1f32..1.0)
            } else {
                0.0
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    if let Err(e) = bitnet::core::host_threads::elementwise_on_caller() {
        eprintln!("note: {e}");
    }
    bitnet::core::host_alloc::keep_freed_memory();
    let dev = Device::Cpu;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let w = values(N * K, 1.0, &mut rng);
    let wt = transpose(&w, N, K).unwrap();
    let dy = values(M * N, 1.0, &mut rng);
    let w_t = Tensor::from_vec(w.clone(), (N, K), &dev).unwrap();
    let dy_t = Tensor::from_vec(dy.clone(), (M, N), &dev).unwrap();
    let mut group = c.benchmark_group("sparse_input_784x256_b128");
    {
        let x = values(M * K, 1.0, &mut rng);
        let x_t = Tensor::from_vec(x, (M, K), &dev).unwrap();
        group.bench_function("dense/forward", |b| {
            b.iter(|| x_t.matmul(&w_t.t().unwrap()).unwrap())
        });
        group.bench_function("dense/weight_grad", |b| {
            b.iter(|| dy_t.t().unwrap().matmul(&x_t).unwrap())
        });
        group.bench_function("dense/input_grad", |b| {
            b.iter(|| dy_t.matmul(&w_t).unwrap())
        });
    }
    // The two transposes a sparse step makes (W -> W^T in the forward, dW^T -> dW after the
    // weight gradient), against a plain copy of as many values.
    group.bench_function("transpose_256x784", |b| {
        b.iter(|| transpose(&w, N, K).unwrap())
    });
    group.bench_function("transpose_784x256", |b| {
        b.iter(|| transpose(&wt, K, N).unwrap())
    });
    group.bench_function("copy_200704", |b| b.iter(|| w.clone()));
    // The first layer's backward on 128 real MNIST images (their pattern: empty borders,
    // dense centres), as the training step sees it.
    {
        let m =
            bitnet::datasets::mnist::load(concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist"), &dev)
                .unwrap();
        let x: Vec<f32> = m
            .train_images
            .narrow(0, 0, M)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let s = SparseRows::from_dense(&x, K, 1.0, None).unwrap().unwrap();
        let second = s.gather_scaled(&x, &vec![1.0; M]).unwrap();
        group.bench_function("mnist/weight_and_norm_grad", |b| {
            b.iter(|| {
                let (st, second_t) = s.transposed_with(&second).unwrap();
                st.matmul_t_with_dots(&second_t, &dy, N, WeightT::Values(&wt))
                    .unwrap()
            })
        });
        // The same as the training step runs it for a first layer: the second values gathered
        // while the pattern is transposed, the weight as levels and one scale per output (a
        // quarter of the bytes).
        let (levels, scale, ones) = (signs(&wt), vec![0.5f32; N], vec![1f32; M]);
        group.bench_function("mnist/weight_and_norm_grad_signs", |b| {
            b.iter(|| {
                let (st, second_t) = s.transposed_gathered(&x, &ones).unwrap();
                let w = WeightT::Signs {
                    signs: &levels,
                    scale: &scale,
                };
                st.matmul_t_with_dots(&second_t, &dy, N, w).unwrap()
            })
        });
    }
    for density in [0.1, 0.2, 0.35, 0.5] {
        let x = values(M * K, density, &mut rng);
        let name = format!("sparse_{}pct", (density * 100.0) as u32);
        group.bench_function(format!("{name}/forward"), |b| {
            b.iter(|| {
                let s = SparseRows::from_dense(&x, K, 1.0, None).unwrap().unwrap();
                s.matmul(&wt, N).unwrap()
            })
        });
        // The integer kernel the op takes for int8 activations x ternary weights: levels of
        // x / step with step 1/127 (the values here are uniform in [-1, 1)), signs of W^T.
        let xl: Vec<f32> = x.iter().map(|v| (v * 127.0).round() / 127.0).collect();
        let signs: Vec<i8> = wt
            .iter()
            .map(|&v| (v > 0.0) as i8 - (v < 0.0) as i8)
            .collect();
        let (inv, col_scale) = (vec![127f32; M], vec![1f32; N]);
        group.bench_function(format!("{name}/forward_levels"), |b| {
            b.iter(|| {
                let s = SparseRows::from_dense(&xl, K, 1.0, None).unwrap().unwrap();
                s.matmul_levels(&signs, N, &inv, &col_scale).unwrap()
            })
        });
        group.bench_function(format!("{name}/index"), |b| {
            b.iter(|| SparseRows::from_dense(&x, K, 1.0, None).unwrap().unwrap())
        });
        let s = SparseRows::from_dense(&x, K, 1.0, None).unwrap().unwrap();
        group.bench_function(format!("{name}/forward_no_index"), |b| {
            b.iter(|| s.matmul(&wt, N).unwrap())
        });
        let st = s.transposed();
        group.bench_function(format!("{name}/weight_grad_no_transposes"), |b| {
            b.iter(|| st.matmul(&dy, N).unwrap())
        });
        group.bench_function(format!("{name}/weight_grad"), |b| {
            b.iter(|| transpose(&s.transposed().matmul(&dy, N).unwrap(), K, N).unwrap())
        });
        // The first layer's backward: weight gradient and norm-weight gradient in one sweep
        // (index transpose with the second values, product, dots); against the two GEMMs
        // `dense/weight_grad` + `dense/input_grad` it replaces.
        let second = s.gather_scaled(&x, &vec![1.0; M]).unwrap();
        group.bench_function(format!("{name}/weight_and_norm_grad"), |b| {
            b.iter(|| {
                let (st, second_t) = s.transposed_with(&second).unwrap();
                st.matmul_t_with_dots(&second_t, &dy, N, WeightT::Values(&wt))
                    .unwrap()
            })
        });
        group.bench_function(format!("{name}/input_grad_sampled"), |b| {
            b.iter(|| {
                let st = s.transposed();
                st.scatter_transposed(&st.sampled_dots(&dy, &wt, N).unwrap())
                    .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
