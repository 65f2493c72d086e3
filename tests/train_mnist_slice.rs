//! A small ternary model trained on a slice of MNIST: accuracy clearly above chance, and the
//! latent weights moved (gradients arrived through the quantizers).

use bitnet::datasets::mnist;
use bitnet::prelude::*;
use bitnet::training::optim::{ParamsQatAdamW, QatAdamW};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{loss, Optimizer, VarBuilder, VarMap};

mod common;

#[test]
fn ternary_mlp_learns_mnist_slice() {
    let dev = Device::Cpu;
    let data = mnist::load(common::repo_data("mnist"), &dev).unwrap();
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let l1 = QATLayer::bitlinear(784, 64, QATConfig::ternary(), vb.pp("fc1")).unwrap();
    let l2 = QATLayer::bitlinear(64, 10, QATConfig::ternary(), vb.pp("fc2")).unwrap();
    bitnet::training::init::reseed(&vm, 1).unwrap();
    let w0 = l1.inner().weight().copy().unwrap();
    let forward = |x: &Tensor| l2.forward(&l1.forward(x).unwrap().relu().unwrap()).unwrap();
    let mut opt = QatAdamW::new(
        vm.all_vars(),
        ParamsQatAdamW {
            lr: 2e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let batch = 64;
    for step in 0..300 {
        let start = (step * batch) % 6000;
        let x = data.train_images.narrow(0, start, batch).unwrap();
        let y = data.train_labels.narrow(0, start, batch).unwrap();
        let loss = loss::cross_entropy(&forward(&x), &y).unwrap();
        opt.backward_step(&loss).unwrap();
    }
    let x = data.test_images.narrow(0, 0, 2000).unwrap();
    let y = data.test_labels.narrow(0, 0, 2000).unwrap();
    let pred = forward(&x).argmax(D::Minus1).unwrap();
    let acc = pred
        .eq(&y)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(acc > 0.80, "test accuracy {acc}");
    let moved = (l1.inner().weight() - &w0)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(moved > 1e-3, "latent weights did not move: {moved}");
}
