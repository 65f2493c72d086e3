//! The optimizers on a CUDA GPU against the CPU (the reference); runs only with the `cuda`
//! feature, on a machine with a GPU.

#![cfg(feature = "cuda")]

use bitnet_training::optim::{OptimizerState, ParamGroup, ParamsQatAdamW, QatAdamW};
use candle_core::{Device, Result, Tensor, Var};
use candle_nn::Optimizer;

/// Deterministic values in [-1, 1) with exact zeros.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            if i % 31 == 0 {
                0.0
            } else {
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            }
        })
        .collect()
}

/// QatAdamW's fused CUDA kernel gives the CPU's fused update bit for bit: a clipped matrix
/// group with a learning-rate scale and a bias group without weight decay, four steps, the
/// gradients exact on both devices (`d/dw sum(w * G) = G`); parameters and both moments.
#[test]
fn qat_adamw_on_cuda_is_the_cpu_update() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let mut runs = Vec::new();
    for dev in [Device::Cpu, gpu] {
        let w = Var::from_tensor(&Tensor::from_vec(values(37 * 300, 1), (37, 300), &dev)?)?;
        let b = Var::from_tensor(&Tensor::from_vec(values(37, 2), 37, &dev)?)?;
        let groups = vec![
            ParamGroup::new(vec![w.clone()]).clip(0.9).lr_scale(0.5),
            ParamGroup::new(vec![b.clone()]).no_weight_decay(),
        ];
        let params = ParamsQatAdamW {
            lr: 0.01,
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = QatAdamW::with_groups(groups, params)?;
        for step in 0..4u64 {
            let gw = Tensor::from_vec(values(37 * 300, 10 + step), (37, 300), &dev)?;
            let gb = Tensor::from_vec(values(37, 20 + step), 37, &dev)?;
            let loss = ((w.as_tensor() * &gw)?.sum_all()? + (b.as_tensor() * &gb)?.sum_all()?)?;
            opt.backward_step(&loss)?;
        }
        let mut out = Vec::new();
        for t in [w.as_tensor().clone(), b.as_tensor().clone()] {
            out.push(t.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?);
        }
        for (_, t) in opt.state()?.into_iter().skip(1) {
            out.push(t.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?);
        }
        runs.push(out);
    }
    let names = ["w", "b", "m.0", "v.0", "m.1", "v.1"];
    for (k, (cpu, gpu)) in runs[0].iter().zip(&runs[1]).enumerate() {
        assert_eq!(cpu.len(), gpu.len(), "{}", names[k]);
        for (i, (c, g)) in cpu.iter().zip(gpu).enumerate() {
            assert_eq!(
                c.to_bits(),
                g.to_bits(),
                "{}[{i}]: cpu {c}, cuda {g}",
                names[k]
            );
        }
    }
    Ok(())
}
