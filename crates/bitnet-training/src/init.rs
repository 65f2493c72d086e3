//! Seeded initialisation. candle's CPU random generator cannot be seeded, so runs that must be
//! reproducible (examples with `--seed`, tests, exact checkpoint resume) re-draw their variables
//! from a seeded generator with this module.

use candle_core::{Result, Tensor};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Standard normal samples (Box-Muller), reproducible for a given generator state.
fn normal(rng: &mut ChaCha8Rng, n: usize, std: f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
        })
        .collect()
}

/// Re-draws every 2-D variable of `vm` whose name ends in `weight` from candle-nn's default
/// Kaiming normal (`std = sqrt(2 / fan_in)`) and every `bias` uniformly in `±1/sqrt(fan_in)`
/// (fan-in taken from the matching weight), in name order, from `seed`. Other variables (norm
/// weights, temperatures) keep their constant initial values.
pub fn reseed(vm: &VarMap, seed: u64) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let data = vm.data().lock().expect("VarMap lock poisoned");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        if name.ends_with("weight") && dims.len() == 2 {
            let std = (2.0 / dims[1] as f64).sqrt();
            let v = normal(&mut rng, dims[0] * dims[1], std);
            var.set(
                &Tensor::from_vec(v, (dims[0], dims[1]), var.device())?.to_dtype(var.dtype())?,
            )?;
        } else if name.ends_with("bias") && dims.len() == 1 {
            let fan_in = name
                .strip_suffix("bias")
                .and_then(|p| data.get(&format!("{p}weight")))
                .and_then(|w| w.dims().get(1).copied())
                .unwrap_or(dims[0]);
            let bound = 1.0 / (fan_in as f64).sqrt();
            let v: Vec<f32> = (0..dims[0])
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect();
            var.set(&Tensor::from_vec(v, dims[0], var.device())?.to_dtype(var.dtype())?)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarBuilder;

    #[test]
    fn same_seed_same_weights_with_kaiming_std() {
        let build = |seed| {
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
            candle_nn::linear(400, 300, vb.pp("fc")).unwrap();
            reseed(&vm, seed).unwrap();
            let d = vm.data().lock().unwrap();
            (
                d["fc.weight"]
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
                d["fc.bias"].to_vec1::<f32>().unwrap(),
            )
        };
        let (a, ab) = build(7);
        let (b, _) = build(7);
        let (c, _) = build(8);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let n = a.len() as f64;
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / n;
        let std = (a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        let want = (2.0f64 / 400.0).sqrt();
        assert!(
            mean.abs() < 3e-3 && (std - want).abs() < 0.01 * want,
            "mean {mean} std {std} want {want}"
        );
        assert!(ab.iter().all(|&v| v.abs() <= 0.05) && ab.iter().any(|&v| v.abs() > 0.04));
    }
}
