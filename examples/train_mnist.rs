//! Train a BitNet b1.58 MLP (784-256-256-10, every layer a `QATLayer<BitLinear>`) on MNIST.
//!
//! ```sh
//! cargo run --release --example train_mnist -- --mode ternary --epochs 10
//! ```
//! Options: `--mode fp|ternary|binary`, `--epochs N`, `--data DIR` (default: the copy in
//! `data/mnist`), `--log FILE` (per-layer JSON lines), `--batch N`, `--lr X`, `--seed N`,
//! `--train-limit N` (use the first N training images). The last line printed is a JSON summary.

use bitnet::datasets::mnist;
use bitnet::prelude::*;
use bitnet::training::optim::{ParamsQatAdamW, QatAdamW};
use bitnet::training::state::{StateTracker, Tracked};
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{loss, Optimizer, VarBuilder, VarMap};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::time::Instant;

struct Args {
    mode: String,
    epochs: usize,
    data: std::path::PathBuf,
    log: Option<String>,
    batch: usize,
    lr: f64,
    seed: u64,
    train_limit: Option<usize>,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut a = Args {
        mode: "ternary".into(),
        epochs: 10,
        data: mnist::default_dir(),
        log: None,
        batch: 128,
        lr: 1e-3,
        seed: 42,
        train_limit: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or(format!("{flag} needs a value"));
        let num = |v: String| v.parse::<f64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--mode" => a.mode = val()?,
            "--epochs" => a.epochs = num(val()?)? as usize,
            "--data" => a.data = val()?.into(),
            "--log" => a.log = Some(val()?),
            "--batch" => a.batch = num(val()?)? as usize,
            "--lr" => a.lr = num(val()?)?,
            "--seed" => a.seed = num(val()?)? as u64,
            "--train-limit" => a.train_limit = Some(num(val()?)? as usize),
            "-h" | "--help" => return Err("usage: train_mnist [--mode fp|ternary|binary] [--epochs N] [--data DIR] [--log FILE] [--batch N] [--lr X] [--seed N] [--train-limit N]".into()),
            other => return Err(format!("unknown option {other}")),
        }
    }
    if !["fp", "ternary", "binary"].contains(&a.mode.as_str()) {
        return Err(format!(
            "--mode must be fp, ternary or binary, got {}",
            a.mode
        ));
    }
    if a.batch == 0 || a.epochs == 0 {
        return Err("--batch and --epochs must be at least 1".into());
    }
    Ok(a)
}

struct Mlp {
    layers: Vec<QATLayer>,
}

impl Mlp {
    fn new(cfg: QATConfig, vb: VarBuilder) -> Result<Self> {
        let dims = [(784, 256, "fc1"), (256, 256, "fc2"), (256, 10, "fc3")];
        let layers = dims
            .iter()
            .map(|&(i, o, name)| QATLayer::bitlinear(i, o, cfg, vb.pp(name)))
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    fn set_step(&self, step: usize) {
        self.layers.iter().for_each(|l| l.set_step(step));
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h)?;
            if i + 1 < self.layers.len() {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
}

fn accuracy(model: &Mlp, images: &Tensor, labels: &Tensor) -> Result<f64> {
    let mut correct = 0usize;
    let n = images.dim(0)?;
    for start in (0..n).step_by(1000) {
        let len = 1000.min(n - start);
        let logits = model.forward(&images.narrow(0, start, len)?)?;
        let pred = logits.argmax(D::Minus1)?;
        let ok = pred
            .eq(&labels.narrow(0, start, len)?)?
            .to_dtype(DType::F32)?
            .sum_all()?;
        correct += ok.to_scalar::<f32>()? as usize;
    }
    Ok(correct as f64 / n as f64)
}

fn main() -> Result<()> {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let dev = Device::Cpu;
    let data = mnist::load(&args.data, &dev)?;
    let (train_x, train_y) = match args.train_limit {
        Some(n) => (
            data.train_images.narrow(0, 0, n)?,
            data.train_labels.narrow(0, 0, n)?,
        ),
        None => (data.train_images.clone(), data.train_labels.clone()),
    };
    let cfg = match args.mode.as_str() {
        "fp" => QATConfig::full_precision(),
        "binary" => QATConfig::binary(),
        _ => QATConfig::ternary(),
    };
    let vm = VarMap::new();
    let model = Mlp::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    bitnet::training::init::reseed(&vm, args.seed)?;
    let mut opt = QatAdamW::new(
        vm.all_vars(),
        ParamsQatAdamW {
            lr: args.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut tracker = match &args.log {
        Some(p) => StateTracker::with_log(p)?,
        None => StateTracker::new(),
    };
    let n = train_x.dim(0)?;
    let steps_per_epoch = n.div_ceil(args.batch);
    let total = steps_per_epoch * args.epochs;
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut epoch_secs = Vec::new();
    let mut step = 0usize;
    let mut test_acc = 0.0;
    for epoch in 1..=args.epochs {
        order.shuffle(&mut rng);
        let bar = ProgressBar::new(steps_per_epoch as u64);
        bar.set_style(
            ProgressStyle::with_template("epoch {msg} [{bar:30}] {pos}/{len} {per_sec}")
                .expect("valid template"),
        );
        bar.set_message(epoch.to_string());
        let t0 = Instant::now();
        let mut loss_sum = 0f64;
        for chunk in order.chunks(args.batch) {
            let idx = Tensor::from_slice(chunk, chunk.len(), &dev)?;
            let x = train_x.index_select(&idx, 0)?;
            let y = train_y.index_select(&idx, 0)?;
            model.set_step(step);
            let lr =
                args.lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total as f64).cos());
            opt.set_learning_rate(lr);
            let loss = loss::cross_entropy(&model.forward(&x)?, &y)?;
            let grads = loss.backward()?;
            if args.log.is_some() && step % 100 == 0 {
                let layers: Vec<&dyn Tracked> =
                    model.layers.iter().map(|l| l as &dyn Tracked).collect();
                tracker.record(step, &layers, Some(&grads))?;
            }
            opt.step(&grads)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            step += 1;
            bar.inc(1);
        }
        bar.finish_and_clear();
        let secs = t0.elapsed().as_secs_f64();
        epoch_secs.push(secs);
        test_acc = accuracy(&model, &data.test_images, &data.test_labels)?;
        println!(
            "epoch {epoch:>2}  loss {:.4}  test_accuracy {:.4}  seconds {secs:.2}",
            loss_sum / steps_per_epoch as f64,
            test_acc
        );
    }
    let layers: Vec<&dyn Tracked> = model.layers.iter().map(|l| l as &dyn Tracked).collect();
    tracker.record(step, &layers, None)?;
    print!("{}", tracker.summary_table());
    epoch_secs.sort_by(|a, b| a.total_cmp(b));
    let median = epoch_secs[epoch_secs.len() / 2];
    println!(
        "{}",
        serde_json::json!({
            "mode": args.mode,
            "epochs": args.epochs,
            "test_accuracy": (test_acc * 10000.0).round() / 10000.0,
            "epoch_seconds_median": (median * 100.0).round() / 100.0,
        })
    );
    Ok(())
}
