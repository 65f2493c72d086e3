//! QATLayer: estimators reach the latent weights, schedules apply, the learnable temperature
//! learns, and state tracking reports what happened.

use bitnet_training::progressive::LambdaSchedule;
use bitnet_training::state::{StateTracker, Tracked};
use bitnet_training::{QATConfig, QATLayer, STEConfig, STEVariant};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};

fn layer(cfg: QATConfig) -> (VarMap, QATLayer) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let l = QATLayer::bitlinear(6, 3, cfg, vb.pp("fc")).unwrap();
    bitnet_training::init::reseed(&vm, 3).unwrap();
    (vm, l)
}

#[test]
fn clipped_ste_gradient_reaches_the_latent_weight() {
    let mut cfg = QATConfig::ternary();
    cfg.activation = None;
    cfg.ste = STEConfig {
        variant: STEVariant::Clipped,
        clipping_threshold: 1.0,
        ..STEConfig::default()
    };
    let (vm, l) = layer(cfg);
    let w = vm.data().lock().unwrap()["fc.weight"].clone();
    let x = Tensor::randn(0f32, 1.0, (5, 6), &Device::Cpu).unwrap();
    let grads = l
        .forward(&x)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = grads.get(&w).unwrap().to_vec2::<f32>().unwrap();
    // dL/dWq = sum over the batch of the normalised inputs, per column; the clipped STE passes
    // it where |w / (mean|w| + eps)| <= 1 and zeroes it elsewhere.
    let xn = l.inner().norm().unwrap();
    let xn = xn
        .forward(&x)
        .unwrap()
        .sum(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let wv = w.to_vec2::<f32>().unwrap();
    let mean = wv.iter().flatten().map(|v| v.abs()).sum::<f32>() / 18.0;
    let mut clipped = 0;
    for o in 0..3 {
        for i in 0..6 {
            let pass = (wv[o][i] / (mean + 1e-5)).abs() <= 1.0;
            clipped += !pass as usize;
            let want = if pass { xn[i] } else { 0.0 };
            assert!(
                (g[o][i] - want).abs() < 1e-4,
                "[{o}][{i}] {} vs {want}",
                g[o][i]
            );
        }
    }
    assert!(clipped > 0, "the example should exercise the clip");
}

#[test]
fn lambda_schedule_moves_from_full_precision_to_quantized() {
    let mut cfg = QATConfig::ternary();
    cfg.lambda = LambdaSchedule::Linear { steps: 10 };
    let (_vm, l) = layer(cfg);
    let latent = l.inner().weight().clone();
    let hard = l.inner().quantized_weight().unwrap();
    for (step, lambda) in [(0, 0.0f32), (5, 0.5), (10, 1.0)] {
        l.set_step(step);
        let w = l.effective_weight().unwrap();
        let want = (&latent + ((&hard - &latent).unwrap() * lambda as f64).unwrap()).unwrap();
        let d = (w - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-6, "step {step}: {d}");
    }
}

#[test]
fn learnable_temperature_is_a_trained_variable() {
    let mut cfg = QATConfig::binary();
    cfg.ste = STEConfig {
        variant: STEVariant::Learnable,
        temperature: 2.0,
        ..STEConfig::default()
    };
    let (vm, l) = layer(cfg);
    let t = vm.data().lock().unwrap()["fc.ste_temperature"].clone();
    assert_eq!(t.to_vec1::<f32>().unwrap(), vec![2.0]);
    let x = Tensor::randn(0f32, 1.0, (5, 6), &Device::Cpu).unwrap();
    let grads = l
        .forward(&x)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gt = grads
        .get(&t)
        .expect("temperature got no gradient")
        .to_vec1::<f32>()
        .unwrap()[0];
    assert!(gt != 0.0 && gt.is_finite());
}

#[test]
fn full_precision_mode_quantizes_nothing() {
    let (_vm, l) = layer(QATConfig::full_precision());
    assert!(l.weight_quantizer().unwrap().is_none());
    assert_eq!(
        l.effective_weight().unwrap().to_vec2::<f32>().unwrap(),
        l.inner().weight().to_vec2::<f32>().unwrap()
    );
}

#[test]
fn state_tracker_reports_shares_flips_and_writes_json_lines() {
    let (vm, l) = layer(QATConfig::ternary());
    let dir = std::env::temp_dir().join(format!("bitnet-state-{}", std::process::id()));
    let path = dir.join("state.jsonl");
    let mut tracker = StateTracker::with_log(&path).unwrap();
    let layers: Vec<&dyn Tracked> = vec![&l];
    let first = tracker.record(0, &layers, None).unwrap();
    assert_eq!(first[0].flip_ratio, None);
    let shares: f64 = first[0].level_shares.iter().map(|(_, s)| s).sum();
    assert!((shares - 1.0).abs() < 1e-12);
    // Negate the first row: exactly its non-zero levels flip (6 of 18 weights, minus its zeros).
    let w = vm.data().lock().unwrap()["fc.weight"].clone();
    let (levels, _) = l
        .weight_quantizer()
        .unwrap()
        .unwrap()
        .levels(w.as_tensor())
        .unwrap();
    let nonzero_row0 = levels[..6].iter().filter(|&&v| v != 0).count();
    let mut wv = w.to_vec2::<f32>().unwrap();
    wv[0].iter_mut().for_each(|v| *v = -*v);
    w.set(&Tensor::new(wv, &Device::Cpu).unwrap()).unwrap();
    let second = tracker.record(1, &layers, None).unwrap();
    assert_eq!(second[0].flip_ratio, Some(nonzero_row0 as f64 / 18.0));
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["layer"], "fc");
    assert_eq!(lines[1]["step"], 1);
    assert!(tracker.summary_table().contains("fc"));
    std::fs::remove_dir_all(dir).unwrap();
}

/// At full hardness the learnable surrogate is the hard quantizer, whose output no longer
/// depends on the temperature: `t` gets exactly no gradient there, while the latent weights
/// still get the straight-through one (the first version kept giving `t` the soft part's).
#[test]
fn learnable_temperature_stops_learning_at_full_hardness() {
    let mut cfg = QATConfig::binary();
    cfg.ste = STEConfig {
        variant: STEVariant::Learnable,
        temperature: 2.0,
        ..STEConfig::default()
    };
    cfg.hardness = bitnet_training::progressive::HardnessSchedule {
        start: 0.0,
        steps: 10,
    };
    let (vm, l) = layer(cfg);
    let t = vm.data().lock().unwrap()["fc.ste_temperature"].clone();
    let w = vm.data().lock().unwrap()["fc.weight"].clone();
    let x = Tensor::randn(0f32, 1.0, (5, 6), &Device::Cpu).unwrap();
    for (step, t_learns) in [(0, true), (5, true), (10, false), (20, false)] {
        l.set_step(step);
        let loss = l.forward(&x).unwrap().sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let gt = grads.get(&t).unwrap().to_vec1::<f32>().unwrap()[0];
        assert_eq!(gt != 0.0, t_learns, "step {step}: dL/dt = {gt}");
        let gw = grads.get(&w).unwrap().abs().unwrap().sum_all().unwrap();
        assert!(gw.to_scalar::<f32>().unwrap() > 0.0, "step {step}");
    }
}

/// LSQ is reachable from the config: the layer holds one learned step size per output row as a
/// variable, initialised as in the paper, which the optimizer moves while the loss of a small
/// regression falls.
#[test]
fn lsq_steps_are_trained_variables_and_the_loss_falls() {
    use bitnet_quant::{Granularity, Scheme};
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};
    let mut cfg = QATConfig::ternary();
    cfg.weight = Some(Scheme::MultiBit { bits: 3 });
    cfg.weight_granularity = Granularity::PerChannel;
    cfg.activation = None;
    cfg.ste.variant = STEVariant::Lsq;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    // Seeded weights before the layer reads them for its initial steps.
    let inner = bitnet_quant::BitLinear::new(16, 4, vb.pp("fc")).unwrap();
    bitnet_training::init::reseed(&vm, 5).unwrap();
    let l = QATLayer::new(inner, cfg, vb.pp("fc")).unwrap();
    let steps = vm.data().lock().unwrap()["fc.lsq_step"].clone();
    let w = vm.data().lock().unwrap()["fc.weight"].clone();
    let init = steps.to_vec1::<f32>().unwrap();
    let mean_abs = w
        .abs()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(init.len(), 4, "one step per output row");
    for s in &init {
        assert!((s - 2.0 * mean_abs / 3f32.sqrt()).abs() < 1e-6, "{s}");
    }
    assert_eq!(l.lsq_steps().unwrap().dims(), &[4]);

    // A teacher on the student's grid: row o is an integer in -4..=3 times 0.1 (o + 1), so the
    // loss can reach 0 only once each row's step size has moved to its teacher's.
    let dev = Device::Cpu;
    let ints = |n: usize, seed: u64, lo: i64, span: u64| -> Vec<f32> {
        (0..n as u64)
            .map(|i| {
                let h = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed;
                let h = (h ^ (h >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                (lo + ((h >> 33) % span) as i64) as f32
            })
            .collect()
    };
    let levels = Tensor::from_vec(ints(64, 1, -4, 8), (4, 16), &dev).unwrap();
    let row_steps = Tensor::new(&[[0.1f32], [0.2], [0.3], [0.4]], &dev).unwrap();
    let teacher = levels.broadcast_mul(&row_steps).unwrap();
    let x = (Tensor::from_vec(ints(64 * 16, 2, -50, 101), (64, 16), &dev).unwrap() / 50.0).unwrap();
    let target = l
        .inner()
        .norm()
        .unwrap()
        .forward(&x)
        .unwrap()
        .matmul(&teacher.t().unwrap())
        .unwrap();
    let loss_of = |l: &QATLayer| {
        (l.forward(&x).unwrap() - &target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };
    let params = ParamsAdamW {
        lr: 1e-2,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = AdamW::new(vm.all_vars(), params).unwrap();
    let first = loss_of(&l).to_scalar::<f32>().unwrap();
    for _ in 0..300 {
        opt.backward_step(&loss_of(&l)).unwrap();
    }
    let last = loss_of(&l).to_scalar::<f32>().unwrap();
    assert!(last < 0.1 * first, "loss {first} -> {last}");
    let moved = steps.to_vec1::<f32>().unwrap();
    for (a, b) in init.iter().zip(&moved) {
        assert!((a - b).abs() > 0.05 * a, "step {a} -> {b}");
    }
    // The state tracker reports the learned steps and their levels, not absmax ones.
    let stats = StateTracker::new()
        .record(1, &[&l as &dyn Tracked], None)
        .unwrap()
        .remove(0);
    let mean_step = moved.iter().sum::<f32>() as f64 / 4.0;
    assert!(
        (stats.scale - mean_step).abs() < 1e-6,
        "{} vs {mean_step}",
        stats.scale
    );
    assert!(stats.level_shares.iter().all(|(k, _)| (-4..=3).contains(k)));
    // The forward is LSQ's: every weight is an integer in -4..=3 times its row's step.
    let wq = l.effective_weight().unwrap().to_vec2::<f32>().unwrap();
    for (row, s) in wq.iter().zip(&moved) {
        for v in row {
            let k = v / s;
            assert!(
                (k - k.round()).abs() < 1e-4 && (-4.0..=3.0).contains(&k.round()),
                "{v} / {s}"
            );
        }
    }
}

/// IR-Net's anneal drives the soft STE: at step `k` the weight quantizer's backward is the
/// error-decay estimator at `t(k)`, from 0.1 to 10 on a log scale.
#[test]
fn temperature_anneal_sets_the_estimator_at_each_step() {
    use bitnet_quant::Estimator;
    use bitnet_training::progressive::TemperatureAnneal;
    let mut cfg = QATConfig::binary();
    cfg.ste.variant = STEVariant::Soft;
    cfg.temperature_anneal = Some(TemperatureAnneal::new(0.1, 10.0, 100).unwrap());
    let (_vm, l) = layer(cfg);
    for (step, t) in [(0, 0.1f32), (50, 1.0), (100, 10.0), (400, 10.0)] {
        l.set_step(step);
        let Estimator::Ede { temperature } = l.weight_quantizer().unwrap().unwrap().estimator()
        else {
            panic!("step {step}: not the error-decay estimator");
        };
        assert!(
            (temperature - t).abs() < 1e-5 * t,
            "step {step}: {temperature}"
        );
    }
}
