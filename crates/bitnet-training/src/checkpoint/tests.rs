use super::*;
use crate::init::reseed;
use crate::optim::{ParamsQatAdamW, QatAdamW};
use crate::progressive::LambdaSchedule;
use crate::{QATConfig, QATLayer};
use candle_core::{DType, Module};
use candle_nn::{Optimizer, VarBuilder};
use rand::{Rng, SeedableRng};

/// A fresh, empty directory under the system temp dir, unique per test and process.
fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bitnet-ckpt-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    d
}

/// Two ternary QAT layers with a lambda warmup (so the schedule position matters), QatAdamW over
/// the variables in name order, and a data generator.
struct Run {
    vm: VarMap,
    layers: [QATLayer; 2],
    opt: QatAdamW,
    rng: ChaCha8Rng,
    step: u64,
}

impl Run {
    fn new() -> Self {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let cfg = QATConfig {
            lambda: LambdaSchedule::Linear { steps: 8 },
            ..QATConfig::ternary()
        };
        let layers = [
            QATLayer::bitlinear(8, 16, cfg, vb.pp("l0")).unwrap(),
            QATLayer::bitlinear(16, 4, cfg, vb.pp("l1")).unwrap(),
        ];
        reseed(&vm, 3).unwrap();
        let params = ParamsQatAdamW {
            lr: 1e-2,
            ..Default::default()
        };
        let opt = QatAdamW::new(sorted_vars(&vm), params).unwrap();
        Self {
            vm,
            layers,
            opt,
            rng: ChaCha8Rng::seed_from_u64(99),
            step: 0,
        }
    }

    fn train(&mut self, steps: usize) {
        for _ in 0..steps {
            self.layers
                .iter()
                .for_each(|l| l.set_step(self.step as usize));
            let x: Vec<f32> = (0..32 * 8)
                .map(|_| self.rng.random_range(-1.0..1.0))
                .collect();
            let y: Vec<u32> = (0..32).map(|_| self.rng.random_range(0..4)).collect();
            let x = Tensor::from_vec(x, (32, 8), &Device::Cpu).unwrap();
            let y = Tensor::from_vec(y, 32, &Device::Cpu).unwrap();
            let h = self.layers[0].forward(&x).unwrap().relu().unwrap();
            let logits = self.layers[1].forward(&h).unwrap();
            let loss = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
            self.opt.backward_step(&loss).unwrap();
            self.step += 1;
        }
    }

    fn state(&self) -> TrainingState {
        TrainingState {
            step: self.step,
            extra: serde_json::json!({ "lambda": self.layers[0].config().lambda.value(self.step as usize) }),
            rng: Some(RngState::capture(&self.rng)),
        }
    }

    fn save(&self, dir: &Path) -> Result<PathBuf> {
        save_with_optimizer(dir, &self.vm, &self.opt, &self.state())
    }

    fn resume(&mut self, dir: &Path) -> Result<()> {
        let st = resume(dir, &self.vm, &mut self.opt)?;
        self.step = st.step;
        self.rng = st.rng.unwrap().restore()?;
        Ok(())
    }

    /// Every variable's values, by name.
    fn weights(&self) -> Vec<(String, Vec<f32>)> {
        let data = self.vm.data().lock().unwrap();
        let mut v: Vec<_> = data
            .iter()
            .map(|(k, var)| {
                (
                    k.clone(),
                    var.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                )
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

#[test]
fn resume_is_bit_identical_to_an_uninterrupted_run() {
    let dir = temp_dir("resume");
    let mut straight = Run::new();
    straight.train(10);

    let mut first = Run::new();
    first.train(6);
    first.save(&dir).unwrap();
    let before = first.weights();
    drop(first);

    let mut resumed = Run::new();
    assert_ne!(
        resumed.weights(),
        before,
        "a fresh run starts elsewhere (the test would be vacuous)"
    );
    resumed.resume(&dir).unwrap();
    assert_eq!(resumed.weights(), before);
    assert_eq!(resumed.step, 6);
    resumed.train(4);
    // Bit-identical: exact f32 equality, not a tolerance.
    assert_eq!(resumed.weights(), straight.weights());
    assert_eq!(
        resumed.opt.state().unwrap().len(),
        straight.opt.state().unwrap().len()
    );
    for ((n1, a), (n2, b)) in resumed
        .opt
        .state()
        .unwrap()
        .iter()
        .zip(straight.opt.state().unwrap().iter())
    {
        assert_eq!(n1, n2);
        let (a, b) = (
            a.flatten_all().unwrap().to_dtype(DType::F64).unwrap(),
            b.flatten_all().unwrap().to_dtype(DType::F64).unwrap(),
        );
        assert_eq!(
            a.to_vec1::<f64>().unwrap(),
            b.to_vec1::<f64>().unwrap(),
            "{n1}"
        );
    }
    // The manifest carries the schedule position: lambda = 6 / 8.
    let text = std::fs::read_to_string(dir.join(MANIFEST)).unwrap();
    let m: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(m["extra"]["lambda"], 0.75);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn rng_state_round_trips() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    rng.set_stream(3);
    let _: [u64; 7] = rng.random();
    let st = RngState::capture(&rng);
    let mut back = st.restore().unwrap();
    let a: [u32; 9] = rng.random();
    let b: [u32; 9] = back.random();
    assert_eq!(a, b);
    let json = serde_json::to_string(&st).unwrap();
    assert_eq!(serde_json::from_str::<RngState>(&json).unwrap(), st);
    assert!(RngState {
        seed: "zz".into(),
        ..st
    }
    .restore()
    .is_err());
}

#[test]
fn failed_saves_keep_the_last_good_checkpoint() {
    let dir = temp_dir("faults");
    let mut run = Run::new();
    run.train(3);
    run.save(&dir).unwrap();
    let good = run.weights();
    run.train(2);
    let opt_state = run.opt.state().unwrap();
    for fault in [Fault::TornWeights, Fault::ManifestRename] {
        let e = save_with(&dir, &run.vm, &opt_state, &run.state(), fault)
            .unwrap_err()
            .to_string();
        assert!(e.contains(".tmp"), "{fault:?}: {e}");
        let mut other = Run::new();
        other.resume(&dir).unwrap();
        assert_eq!(other.step, 3, "{fault:?}");
        assert_eq!(other.weights(), good, "{fault:?}");
    }
    // A later successful save replaces it and removes the older weights file.
    run.save(&dir).unwrap();
    let mut other = Run::new();
    other.resume(&dir).unwrap();
    assert_eq!((other.step, other.weights()), (5, run.weights()));
    let weights_files = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("weights-")
        })
        .count();
    assert_eq!(weights_files, 1);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn corrupt_or_mismatched_checkpoints_are_errors_naming_the_file() {
    let dir = temp_dir("corrupt");
    let run = Run::new();
    run.save(&dir).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(MANIFEST)).unwrap()).unwrap();
    let weights = manifest["weights"].as_str().unwrap().to_string();
    let bytes = std::fs::read(dir.join(&weights)).unwrap();
    let manifest_text = std::fs::read(dir.join(MANIFEST)).unwrap();

    let mut flipped = bytes.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    // (what to write where, the file the error must name, a phrase it must contain)
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            weights.as_str(),
            bytes[..bytes.len() - 10].to_vec(),
            weights.as_str(),
            "truncated",
        ),
        (weights.as_str(), flipped, weights.as_str(), "corrupt"),
        (
            MANIFEST,
            b"{\"version\": 1, \"st".to_vec(),
            MANIFEST,
            "manifest",
        ),
    ];
    for (file, content, named, phrase) in cases {
        std::fs::write(dir.join(file), &content).unwrap();
        let e = load(&dir, &run.vm).unwrap_err().to_string();
        assert!(e.contains(named) && e.contains(phrase), "{file}: {e}");
        std::fs::write(dir.join(MANIFEST), &manifest_text).unwrap();
        std::fs::write(dir.join(&weights), &bytes).unwrap();
    }
    load(&dir, &run.vm).unwrap();

    // A model whose shapes differ is rejected, naming the variable, and left untouched.
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let l0 = QATLayer::bitlinear(8, 15, QATConfig::ternary(), vb.pp("l0")).unwrap();
    QATLayer::bitlinear(16, 4, QATConfig::ternary(), vb.pp("l1")).unwrap();
    let w0 = l0
        .inner()
        .weight()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let e = load(&dir, &vm).unwrap_err().to_string();
    assert!(e.contains("l0.weight") && e.contains(&weights), "{e}");
    assert_eq!(
        l0.inner()
            .weight()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        w0
    );
    let e = load(temp_dir("missing"), &vm).unwrap_err().to_string();
    assert!(e.contains(MANIFEST), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn read_state_gives_the_manifest_state_without_the_weights() {
    let dir = std::env::temp_dir().join(format!("bitnet-ckpt-state-{}", std::process::id()));
    let vm = VarMap::new();
    candle_nn::linear(
        3,
        2,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu).pp("fc"),
    )
    .unwrap();
    let state = TrainingState {
        step: 11,
        extra: serde_json::json!({ "mode": "ternary" }),
        rng: None,
    };
    save(&dir, &vm, &[], &state).unwrap();
    assert_eq!(read_state(&dir).unwrap(), state);
    std::fs::write(dir.join(MANIFEST), b"{ not json").unwrap();
    let err = read_state(&dir).unwrap_err().to_string();
    assert!(err.contains(MANIFEST), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
