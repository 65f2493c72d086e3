use super::*;
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{VarBuilder, VarMap};

const EPS: f64 = 1e-6; // BitLinear's default norm epsilon

fn set(vm: &VarMap, name: &str, t: &Tensor) {
    vm.data().lock().unwrap()[name].set(t).unwrap();
}

/// `a` (8 -> 8) has weights of ±1 only, which absmean ternary quantization reproduces exactly, so
/// only its int8 activations lose anything; `b` (8 -> 4) has Gaussian weights with outliers.
fn two_layers(vm: &VarMap) -> (QATLayer, QATLayer) {
    let dev = Device::Cpu;
    let vb = VarBuilder::from_varmap(vm, DType::F32, &dev);
    let a = QATLayer::bitlinear(8, 8, QATConfig::ternary(), vb.pp("a")).unwrap();
    let b = QATLayer::bitlinear(8, 4, QATConfig::ternary(), vb.pp("b")).unwrap();
    let signs: Vec<f32> = (0..64)
        .map(|i| if (i * 7) % 3 == 0 { 1.0 } else { -1.0 })
        .collect();
    set(
        vm,
        "a.weight",
        &Tensor::from_vec(signs, (8, 8), &dev).unwrap(),
    );
    let mut g: Vec<f32> = (0..32).map(|i| ((i as f32) * 0.61).sin() * 0.3).collect();
    g[5] = 2.5;
    g[17] = -1.9;
    set(vm, "b.weight", &Tensor::from_vec(g, (4, 8), &dev).unwrap());
    (a, b)
}

#[test]
fn switched_off_layer_is_the_plain_norm_and_matmul() {
    let vm = VarMap::new();
    let (a, _) = two_layers(&vm);
    let x = Tensor::randn(0f32, 1.0, (5, 8), &Device::Cpu).unwrap();
    a.set_quantization_enabled(false);
    let got = a.forward(&x).unwrap();
    // RMSNorm with unit gain, then x w^T with the latent weight; no bias in BitLinear's default.
    let rms = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + EPS)
        .unwrap()
        .sqrt()
        .unwrap();
    let want = x
        .broadcast_div(&rms)
        .unwrap()
        .matmul(&a.inner().weight().t().unwrap())
        .unwrap();
    let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    a.set_quantization_enabled(true);
    assert!(a.quantization_enabled());
}

#[test]
fn ranks_the_outlier_layer_first_and_keeps_it_at_8_bits() {
    let vm = VarMap::new();
    let (a, b) = two_layers(&vm);
    // A fixed input: with a random one the margin below (b's loss over 10x a's) failed once in
    // this session's runs (an outlier in the draw coarsens a's int8 activations).
    let xs: Vec<f32> = (0..256)
        .map(|i| ((i as f32) * 0.7919).sin() * 1.3)
        .collect();
    let x = Tensor::from_vec(xs, (32, 8), &Device::Cpu).unwrap();
    let model = |x: &Tensor| b.forward(&a.forward(x).unwrap().relu().unwrap()).unwrap();
    // The loss is the distance to the full-precision output, so the base loss is exactly 0.
    a.set_quantization_enabled(false);
    b.set_quantization_enabled(false);
    let reference = model(&x);
    a.set_quantization_enabled(true);
    b.set_quantization_enabled(true);
    let loss = || {
        let d = (model(&x) - &reference)?.sqr()?.mean_all()?;
        Ok(d.to_scalar::<f32>()? as f64)
    };
    let report = analyze(&[&a, &b], loss).unwrap();
    assert_eq!(report.base_loss, 0.0);
    let (da, db) = (report.layers[0].loss_delta, report.layers[1].loss_delta);
    assert!(da > 0.0 && db > 10.0 * da, "a {da}, b {db}");
    assert_eq!(report.ranked()[0].name, "b");
    assert_eq!(
        (report.layers[0].weights, report.layers[1].weights),
        (64, 32)
    );
    assert!(report.quantized_loss >= db * 0.5);
    assert!(a.quantization_enabled() && b.quantization_enabled());

    let policy = report.propose_policy(QATConfig::ternary(), 1);
    assert_eq!(policy.rules.len(), 1);
    assert_eq!(
        policy.config_for("b").weight,
        Some(Scheme::MultiBit { bits: 8 })
    );
    assert_eq!(policy.config_for("a"), QATConfig::ternary());
    assert_eq!(
        report.propose_policy(QATConfig::ternary(), 5).rules.len(),
        2
    );
    let table = report.table();
    assert!(table.find("b ").unwrap() < table.find("a ").unwrap());
}

#[test]
fn layers_are_switched_back_on_when_the_loss_fails() {
    let vm = VarMap::new();
    let (a, b) = two_layers(&vm);
    let mut calls = 0;
    let loss = || {
        calls += 1;
        match calls {
            2 => candle_core::bail!("out of data"),
            _ => Ok(1.0),
        }
    };
    let err = analyze(&[&a, &b], loss).unwrap_err();
    assert!(err.to_string().contains("out of data"));
    assert!(a.quantization_enabled() && b.quantization_enabled());
}

/// A report over three layers of different sizes, most sensitive first: a (600 weights), b
/// (100), c (300); d lowered the loss when quantized.
fn sized_report() -> SensitivityReport {
    let layer = |name: &str, loss_delta: f64, weights| LayerSensitivity {
        name: name.into(),
        loss: 1.0 + loss_delta,
        loss_delta,
        weights,
    };
    SensitivityReport {
        base_loss: 1.0,
        quantized_loss: 2.0,
        layers: vec![
            layer("c", 0.1, 300),
            layer("a", 0.9, 600),
            layer("d", -0.2, 50),
            layer("b", 0.4, 100),
        ],
    }
}

#[test]
fn budgets_keep_the_most_sensitive_layers_that_fit() {
    let report = sized_report();
    let t = 3f64.log2();
    let total = 1050.0;
    // Average bits with the named layers (by weight count) at `bits`, the rest ternary.
    let avg = |wide: f64, kept: usize| (kept as f64 * wide + (1050 - kept) as f64 * t) / total;
    let b4 = Scheme::MultiBit { bits: 4 };
    let b8 = Scheme::MultiBit { bits: 8 };
    let cases: [(Scheme, f64, &[&str]); 7] = [
        (b4, t, &[]),
        // b alone (100 weights) fits; a (600) does not.
        (b4, avg(4.0, 100), &["b"]),
        (b4, avg(4.0, 400), &["b", "c"]),
        // a is taken first once it fits; then b fits too, c does not.
        (b4, avg(4.0, 700), &["a", "b"]),
        (b4, avg(4.0, 1000), &["a", "b", "c"]),
        // d lowered the loss: never kept, even with room for everything.
        (b4, 4.0, &["a", "b", "c"]),
        (b8, avg(8.0, 400), &["b", "c"]),
    ];
    for (wide, max_bits, want) in cases {
        let p = report
            .propose_within_bits(QATConfig::ternary(), wide, max_bits)
            .unwrap();
        let kept: Vec<&str> = p.rules.iter().map(|r| r.pattern.as_str()).collect();
        assert_eq!(kept, want, "{wide:?} within {max_bits}");
        let sizes = report.layers.iter().map(|l| (l.name.as_str(), l.weights));
        assert!(p.average_bits(sizes) <= max_bits + 1e-9);
        for r in &p.rules {
            assert_eq!(p.config_for(&r.pattern).weight, Some(wide));
            assert_eq!(
                p.config_for(&r.pattern).activation,
                Some(Scheme::Int8PerToken)
            );
        }
        assert_eq!(p.config_for("d"), QATConfig::ternary());
    }
    for bad in [1.0, f64::NAN, f64::NEG_INFINITY] {
        let e = report
            .propose_within_bits(QATConfig::ternary(), b4, bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_bits") && e.contains("1.5850"), "{bad}: {e}");
    }
}

#[test]
fn propose_policy_at_keeps_the_k_most_sensitive_at_the_given_bits() {
    let report = sized_report();
    let b4 = Scheme::MultiBit { bits: 4 };
    for (keep, want) in [
        (0, vec![]),
        (1, vec!["a"]),
        (2, vec!["a", "b"]),
        (9, vec!["a", "b", "c"]),
    ] {
        let p = report.propose_policy_at(QATConfig::ternary(), keep, b4);
        let kept: Vec<&str> = p.rules.iter().map(|r| r.pattern.as_str()).collect();
        assert_eq!(kept, want, "keep {keep}");
        assert!(p.rules.iter().all(|r| r.weight == Some(b4)));
    }
}
