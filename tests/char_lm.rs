//! The BitNet character model of `examples/char_lm`: it learns (a tiny config on real text, a few
//! dozen steps), attention is causal, and bad shapes are rejected.

use bitnet::datasets::shakespeare;
use bitnet::models::char_lm::{CharLm, CharLmConfig, VOCAB};
use bitnet::training::optim::{ParamsQatAdamW, QatAdamW};
use bitnet::training::QATConfig;
use candle_core::{DType, Device, Tensor};
use candle_nn::{loss, Optimizer, VarBuilder, VarMap};

mod common;

fn model(vm: &VarMap, qat: QATConfig) -> CharLm {
    let vb = VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu);
    let lm = CharLm::new(CharLmConfig::tiny(), qat, vb).unwrap();
    bitnet::training::init::reseed(vm, 7).unwrap();
    lm
}

#[test]
fn tiny_ternary_model_learns_shakespeare() {
    let text = shakespeare::load(common::repo_data("shakespeare/shakespeare.txt.gz"), 1000)
        .unwrap()
        .train;
    let text = &text[..4000];
    let vm = VarMap::new();
    let lm = model(&vm, QATConfig::ternary_hf());
    let before: Vec<Tensor> = lm
        .qat_layers()
        .iter()
        .map(|l| l.inner().weight().copy().unwrap())
        .collect();
    let mut opt = QatAdamW::new(
        vm.all_vars(),
        ParamsQatAdamW {
            lr: 3e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let (batch, seq) = (8, CharLmConfig::tiny().seq_len);
    let mut losses = Vec::new();
    for step in 0..60 {
        let mut x = Vec::new();
        let mut y = Vec::new();
        for b in 0..batch {
            let s = (step * 131 + b * 487) % (text.len() - seq - 1);
            x.extend(text[s..s + seq].iter().map(|&c| c as u32));
            y.extend(text[s + 1..s + seq + 1].iter().map(|&c| c as u32));
        }
        let x = Tensor::from_vec(x, (batch, seq), &Device::Cpu).unwrap();
        let y = Tensor::from_vec(y, batch * seq, &Device::Cpu).unwrap();
        let logits = lm.forward(&x).unwrap().reshape(((), VOCAB)).unwrap();
        let l = loss::cross_entropy(&logits, &y).unwrap();
        losses.push(l.to_scalar::<f32>().unwrap());
        opt.backward_step(&l).unwrap();
    }
    let mean = |s: &[f32]| s.iter().sum::<f32>() / s.len() as f32;
    let (first, last) = (mean(&losses[..5]), mean(&losses[55..]));
    // Uniform guessing over 256 bytes is ln 256 = 5.55 nats; English text is far more predictable.
    assert!(first > 4.5, "first losses {first}");
    assert!(last < first - 1.5, "loss fell only from {first} to {last}");
    for (l, w0) in lm.qat_layers().iter().zip(&before) {
        let moved = (l.inner().weight() - w0)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(
            moved.to_scalar::<f32>().unwrap() > 0.0,
            "{} did not learn",
            l.name()
        );
    }
}

#[test]
fn a_later_token_does_not_change_earlier_logits() {
    let vm = VarMap::new();
    let lm = model(&vm, QATConfig::ternary_hf());
    let a = Tensor::new(&[[10u32, 20, 30, 40, 50]], &Device::Cpu).unwrap();
    let b = Tensor::new(&[[10u32, 20, 30, 40, 99]], &Device::Cpu).unwrap();
    let (la, lb) = (lm.forward(&a).unwrap(), lm.forward(&b).unwrap());
    let head = |t: &Tensor| t.narrow(1, 0, 4).unwrap();
    let diff = (head(&la) - head(&lb))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    let last = (la.narrow(1, 4, 1).unwrap() - lb.narrow(1, 4, 1).unwrap()).unwrap();
    assert!(
        last.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
}

#[test]
fn bad_shapes_are_rejected_with_the_field_or_the_limit() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let cases = [
        (
            CharLmConfig {
                n_heads: 3,
                ..CharLmConfig::tiny()
            },
            "n_heads",
        ),
        (
            CharLmConfig {
                n_heads: 32,
                ..CharLmConfig::tiny()
            },
            "n_heads",
        ),
        (
            CharLmConfig {
                d_model: 0,
                ..CharLmConfig::tiny()
            },
            "d_model",
        ),
        (
            CharLmConfig {
                seq_len: 0,
                ..CharLmConfig::tiny()
            },
            "seq_len",
        ),
    ];
    for (cfg, field) in cases {
        let err = CharLm::new(cfg, QATConfig::ternary(), vb.clone()).unwrap_err();
        assert!(err.to_string().contains(field), "{cfg:?}: {err}");
    }
    let lm = model(&vm, QATConfig::full_precision());
    let too_long = Tensor::zeros((1, 17), DType::U32, &Device::Cpu).unwrap();
    assert!(lm
        .forward(&too_long)
        .unwrap_err()
        .to_string()
        .contains("1..=16"));
}

/// One training step on fixed windows of `text` (the same for every run).
fn step(lm: &CharLm, opt: &mut QatAdamW, text: &[u8], step: usize) {
    let (batch, seq) = (4, CharLmConfig::tiny().seq_len);
    let mut x = Vec::new();
    let mut y = Vec::new();
    for b in 0..batch {
        let s = (step * 97 + b * 311) % (text.len() - seq - 1);
        x.extend(text[s..s + seq].iter().map(|&c| c as u32));
        y.extend(text[s + 1..s + seq + 1].iter().map(|&c| c as u32));
    }
    let x = Tensor::from_vec(x, (batch, seq), &Device::Cpu).unwrap();
    let y = Tensor::from_vec(y, batch * seq, &Device::Cpu).unwrap();
    lm.set_step(step);
    let logits = lm.forward(&x).unwrap().reshape(((), VOCAB)).unwrap();
    opt.backward_step(&loss::cross_entropy(&logits, &y).unwrap())
        .unwrap();
}

fn all_weights(vm: &VarMap) -> Vec<(String, Vec<u32>)> {
    let mut w: Vec<(String, Vec<u32>)> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| {
            let bits = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (n.clone(), bits.into_iter().map(f32::to_bits).collect())
        })
        .collect();
    w.sort();
    w
}

#[test]
fn resuming_from_a_checkpoint_is_bit_identical_to_a_straight_run() {
    use bitnet::training::checkpoint::{resume, save_with_optimizer, sorted_vars, TrainingState};
    let text = shakespeare::load(common::repo_data("shakespeare/shakespeare.txt.gz"), 1000)
        .unwrap()
        .train;
    let text = &text[..3000];
    let params = ParamsQatAdamW {
        lr: 3e-3,
        ..Default::default()
    };
    let run = |vm: &VarMap| {
        let lm = model(vm, QATConfig::ternary_hf());
        let opt = QatAdamW::new(sorted_vars(vm), params.clone()).unwrap();
        (lm, opt)
    };
    let straight = VarMap::new();
    let (lm, mut opt) = run(&straight);
    (0..6).for_each(|s| step(&lm, &mut opt, text, s));
    let dir = std::env::temp_dir().join(format!("char-lm-resume-{}", std::process::id()));
    let first = VarMap::new();
    let (lm, mut opt) = run(&first);
    (0..3).for_each(|s| step(&lm, &mut opt, text, s));
    let state = TrainingState {
        step: 3,
        ..Default::default()
    };
    save_with_optimizer(&dir, &first, &opt, &state).unwrap();
    let second = VarMap::new();
    let (lm, mut opt) = run(&second);
    assert_eq!(resume(&dir, &second, &mut opt).unwrap().step, 3);
    (3..6).for_each(|s| step(&lm, &mut opt, text, s));
    assert_eq!(all_weights(&second), all_weights(&straight));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_trained_model_is_a_hugging_face_checkpoint() {
    use bitnet::io::hf::{save, HfCheckpoint, SaveForm};
    use bitnet::models::bitnet::Runtime;
    let vm = VarMap::new();
    let lm = model(&vm, QATConfig::ternary_hf());
    let x = Tensor::new(&[[72u32, 101, 108, 108, 111, 33]], &Device::Cpu).unwrap();
    let want = lm.forward(&x).unwrap();
    let dir = std::env::temp_dir().join(format!("char-lm-hf-{}", std::process::id()));
    for form in [SaveForm::Online, SaveForm::Offline] {
        save(lm.model(), &dir, form, DType::F32, None).unwrap();
        let packed = HfCheckpoint::open(&dir)
            .unwrap()
            .load_model(Runtime::Packed)
            .unwrap();
        let got = packed
            .forward_all(
                &x,
                0,
                &mut bitnet::models::bitnet::Cache::new(false, packed.config()),
            )
            .unwrap();
        let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
        let scale = want.abs().unwrap().max_all().unwrap();
        let rel = diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap();
        assert!(rel < 1e-4, "{form:?}: {rel}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
