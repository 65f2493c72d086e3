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
