//! Train a BitNet b1.58 MLP (784-256-256-10, every layer a `QATLayer<BitLinear>`) on MNIST.
//!
//! ```sh
//! cargo run --release --example train_mnist -- --mode ternary --epochs 10
//! # distillation from a full-precision teacher trained first (or --teacher DIR to load one):
//! cargo run --release --example train_mnist -- --mode ternary --distill
//! # the Hugging Face recipe's lambda warmup over the first epoch:
//! cargo run --release --example train_mnist -- --mode ternary --schedule linear
//! ```
//! Every flag with its default: `--help`. In short:
//! * `--mode fp|ternary|binary`, `--epochs N`, `--batch N`, `--lr X`, `--seed N`;
//! * `--data DIR` (default: the copy in `data/mnist`), `--train-limit N` (first N images only);
//! * `--device cpu|auto|cuda[:N]|metal[:N]` (default `cpu`; a GPU needs the `cuda` or `metal`
//!   feature, e.g. `cargo run --release --features cuda --example train_mnist -- --device cuda`);
//! * `--shards N`: each batch is split into N row blocks whose forward and backward run in
//!   parallel, one per core (`bitnet_training::data_parallel`); their summed gradients are the
//!   batch's. Default on the CPU: rayon's thread count (so `RAYON_NUM_THREADS=1` trains
//!   unsharded); on a GPU: 1.
//! * `--log FILE`: per-layer state (level shares, flip ratio, MSE, SQNR, norms) as JSON lines;
//! * `--save DIR`: a checkpoint after every epoch (weights, optimizer state, step), which
//!   `--teacher` and `examples/export_and_infer` read;
//! * `--distill`: train with Hinton KD from a full-precision teacher; `--teacher DIR` loads the
//!   teacher from a `--mode fp --save DIR` run instead of training it first; `--kd-temperature T`
//!   (default 4), `--kd-alpha A` (weight of the soft term, default 0.7);
//! * `--schedule constant|linear|exponential|sigmoid|step`: the progressive blend
//!   `x + lambda (q(x) - x)` with lambda rising over `--warmup-steps N` (default: one epoch);
//! * `--report`: after training, the per-layer sensitivity (loss on 1000 training images with
//!   only that layer quantized, against all in full precision) and the `PrecisionPolicy` it
//!   proposes (the most sensitive layer at 8 bits) as TOML. With `--mode fp` the layers are
//!   quantized to ternary: the post-training view that picks the policy before QAT.
//!
//! The last line printed is a JSON summary.

use bitnet::datasets::mnist;
use bitnet::models::{accuracy, MnistMlp};
use bitnet::prelude::*;
use bitnet::training::checkpoint::{self, TrainingState};
use bitnet::training::data_parallel::sharded_backward;
use bitnet::training::distillation::Distiller;
use bitnet::training::loss;
use bitnet::training::optim::{ParamsQatAdamW, QatAdamW};
use bitnet::training::progressive::LambdaSchedule;
use bitnet::training::sensitivity;
use bitnet::training::state::StateTracker;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::PathBuf;
use std::time::Instant;

mod common;
use common::Mode;

/// How lambda in the progressive blend `x + lambda (q(x) - x)` rises to 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Schedule {
    /// lambda = 1 from the first step.
    Constant,
    Linear,
    Exponential,
    Sigmoid,
    /// 0, then 1 after the warmup.
    Step,
}

/// Train a BitNet MLP (784-256-256-10, every layer a `QATLayer<BitLinear>`) on MNIST.
#[derive(Debug, clap::Parser)]
#[command(long_about = None)]
struct Args {
    /// Quantizer of every layer.
    #[arg(long, value_enum, default_value_t = Mode::Ternary)]
    mode: Mode,
    /// Training epochs.
    #[arg(long, default_value_t = 10, value_parser = common::positive_usize)]
    epochs: usize,
    /// Folder with the four MNIST idx files (gzip'd or not).
    #[arg(long, default_value_os_t = common::repo_data("mnist"))]
    data: PathBuf,
    /// Write per-layer state (level shares, flip ratio, MSE, SQNR, norms) as JSON lines here.
    #[arg(long)]
    log: Option<String>,
    /// Save a checkpoint here after every epoch (read by --teacher and export_and_infer).
    #[arg(long)]
    save: Option<PathBuf>,
    /// Batch size.
    #[arg(long, default_value_t = 128, value_parser = common::positive_usize)]
    batch: usize,
    /// Peak learning rate of Adam (cosine decay to 0).
    #[arg(long, default_value_t = 1e-3, value_parser = common::positive_f64)]
    lr: f64,
    /// Seed of the initial weights and the data order.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Train on the first N images only.
    #[arg(long, value_parser = common::positive_usize)]
    train_limit: Option<usize>,
    /// Hinton knowledge distillation from a full-precision teacher (trained first, or --teacher).
    #[arg(long)]
    distill: bool,
    /// Load the teacher from a `--mode fp --save DIR` run instead of training it (needs --distill).
    #[arg(long, requires = "distill")]
    teacher: Option<PathBuf>,
    /// Distillation temperature.
    #[arg(long, default_value_t = 4.0, value_parser = common::positive_f64)]
    kd_temperature: f64,
    /// Weight of the soft (teacher) term in the distillation loss.
    #[arg(long, default_value_t = 0.7, value_parser = common::unit_f64)]
    kd_alpha: f64,
    /// Progressive quantization: how lambda rises to 1 over --warmup-steps.
    #[arg(long, value_enum, default_value_t = Schedule::Constant)]
    schedule: Schedule,
    /// Steps of the lambda warmup [default: one epoch].
    #[arg(long, value_parser = common::positive_usize)]
    warmup_steps: Option<usize>,
    /// After training, print the per-layer sensitivity and the precision policy it proposes.
    #[arg(long)]
    report: bool,
    /// cpu, auto, cuda[:N] or metal[:N] (a GPU needs the `cuda` or `metal` feature).
    #[arg(long, default_value = "cpu")]
    device: bitnet::core::device::Preference,
    /// Row shards per batch, trained side by side [default: rayon's threads on the CPU, 1 on a GPU].
    #[arg(long, value_parser = common::positive_usize)]
    shards: Option<usize>,
}

/// The images and labels one run trains and tests on.
struct Data {
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
}

/// What one training run reports.
struct Report {
    test_accuracy: f64,
    epoch_seconds_median: f64,
}

/// One model to train: who it is in the printed lines, its variables, what it learns from and
/// where its checkpoints go.
struct Run<'a> {
    who: &'a str,
    mode: &'a str,
    model: &'a MnistMlp,
    vm: &'a VarMap,
    teacher: Option<&'a Distiller<MnistMlp>>,
    save: Option<&'a std::path::Path>,
}

/// Trains for `args.epochs` epochs with Adam and cosine decay, optionally against a teacher;
/// prints one line per epoch and saves a checkpoint after each when asked.
fn train(
    run: &Run,
    args: &Args,
    data: &Data,
    mut tracker: Option<&mut StateTracker>,
) -> Result<Report> {
    let Run {
        who,
        model,
        vm,
        teacher,
        ..
    } = *run;
    // Sorted, so that a saved optimizer state lines up with the variables on reload.
    let mut opt = QatAdamW::new(
        checkpoint::sorted_vars(vm),
        ParamsQatAdamW {
            lr: args.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let dev = data.train_x.device();
    let shards = args.shards.unwrap_or(if dev.is_cpu() {
        rayon::current_num_threads()
    } else {
        1
    });
    let n = data.train_x.dim(0)?;
    let steps_per_epoch = n.div_ceil(args.batch);
    let total = steps_per_epoch * args.epochs;
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut epoch_secs = Vec::new();
    let mut step = 0usize;
    let mut test_accuracy = 0.0;
    // On CUDA the quantizers' NaN/infinity counts stay on the GPU and are read once per step
    // below, instead of one host synchronisation per quantizer call.
    let _deferred = bitnet::quant::defer_finite_checks();
    for epoch in 1..=args.epochs {
        order.shuffle(&mut rng);
        let bar = ProgressBar::new(steps_per_epoch as u64);
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec}")
                .expect("valid template"),
        );
        bar.set_message(format!("{who} epoch {epoch}"));
        let t0 = Instant::now();
        let mut loss_sum = 0f64;
        for chunk in order.chunks(args.batch) {
            let idx = Tensor::from_slice(chunk, chunk.len(), dev)?;
            let x = data.train_x.index_select(&idx, 0)?;
            let y = data.train_y.index_select(&idx, 0)?;
            model.set_step(step);
            let lr =
                args.lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total as f64).cos());
            opt.set_learning_rate(lr);
            let (loss, grads) = sharded_backward(&[&x, &y], shards, |b| {
                let logits = model.forward(&b[0])?;
                match teacher {
                    Some(d) => d.loss(&b[0], &logits, &b[1]),
                    None => loss::cross_entropy(&logits, &b[1]),
                }
            })?;
            if let Some(t) = tracker.as_deref_mut() {
                if step % 100 == 0 {
                    t.record(step, &model.tracked(), Some(&grads))?;
                }
            }
            opt.step(&grads)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            bitnet::quant::check_deferred_finite(dev)?;
            step += 1;
            bar.inc(1);
        }
        bar.finish_and_clear();
        let secs = t0.elapsed().as_secs_f64();
        epoch_secs.push(secs);
        test_accuracy = accuracy(model, &data.test_x, &data.test_y)?;
        bitnet::quant::check_deferred_finite(dev)?;
        println!(
            "{who} epoch {epoch:>2}  loss {:.4}  test_accuracy {:.4}  seconds {secs:.2}",
            loss_sum / steps_per_epoch as f64,
            test_accuracy
        );
        if let Some(dir) = run.save {
            let state = TrainingState {
                step: step as u64,
                extra: serde_json::json!({ "mode": run.mode, "epoch": epoch }),
                rng: None,
            };
            checkpoint::save_with_optimizer(dir, vm, &opt, &state)?;
        }
    }
    if let Some(t) = tracker {
        t.record(step, &model.tracked(), None)?;
        print!("{}", t.summary_table());
    }
    epoch_secs.sort_by(|a, b| a.total_cmp(b));
    Ok(Report {
        test_accuracy,
        epoch_seconds_median: epoch_secs[epoch_secs.len() / 2],
    })
}

/// A full-precision teacher: loaded from a `--mode fp --save DIR` checkpoint, or trained here.
fn teacher(args: &Args, data: &Data, dev: &Device) -> Result<(MnistMlp, f64)> {
    let vm = VarMap::new();
    let model = MnistMlp::new(
        QATConfig::full_precision(),
        VarBuilder::from_varmap(&vm, DType::F32, dev),
    )?;
    match &args.teacher {
        Some(dir) => {
            let restored = checkpoint::load(dir, &vm)?;
            let mode = &restored.state.extra["mode"];
            if mode != "fp" {
                candle_core::bail!(
                    "--teacher {}: a checkpoint of a --mode fp run is needed, this one has mode {mode}",
                    dir.display()
                );
            }
            let acc = accuracy(&model, &data.test_x, &data.test_y)?;
            println!(
                "teacher loaded from {}  test_accuracy {acc:.4}",
                dir.display()
            );
            Ok((model, acc))
        }
        None => {
            bitnet::training::init::reseed(&vm, args.seed)?;
            let run = Run {
                who: "teacher",
                mode: "fp",
                model: &model,
                vm: &vm,
                teacher: None,
                save: None,
            };
            let report = train(&run, args, data, None)?;
            Ok((model, report.test_accuracy))
        }
    }
}

fn lambda_schedule(
    args: &Args,
    steps_per_epoch: usize,
) -> std::result::Result<LambdaSchedule, String> {
    let steps = args.warmup_steps.unwrap_or(steps_per_epoch);
    let s = match args.schedule {
        Schedule::Constant => LambdaSchedule::default(),
        Schedule::Linear => LambdaSchedule::Linear { steps },
        Schedule::Exponential => LambdaSchedule::Exponential { steps, k: 3.0 },
        Schedule::Sigmoid => LambdaSchedule::Sigmoid { steps, k: 10.0 },
        Schedule::Step => LambdaSchedule::Step { steps },
    };
    s.validate().map_err(|e| format!("--warmup-steps: {e}"))?;
    Ok(s)
}

/// Prints the per-layer sensitivity on the first 1000 training images and the policy it proposes,
/// for the trained weights in `vm` quantized as `cfg` says (ternary after an fp run: the
/// post-training view that decides which layers to keep at 8 bits before QAT).
fn print_sensitivity(vm: &VarMap, data: &Data, cfg: QATConfig) -> Result<()> {
    let model = MnistMlp::new(
        cfg,
        VarBuilder::from_varmap(vm, DType::F32, data.train_x.device()),
    )?;
    let n = data.train_x.dim(0)?.min(1000);
    let (x, y) = (data.train_x.narrow(0, 0, n)?, data.train_y.narrow(0, 0, n)?);
    let loss = || Ok(loss::cross_entropy(&model.forward(&x)?, &y)?.to_scalar::<f32>()? as f64);
    let r = sensitivity::analyze(&model.layer_refs(), loss)?;
    print!(
        "sensitivity (cross-entropy on {n} training images)\n{}",
        r.table()
    );
    let policy = r.propose_policy(cfg, 1);
    let toml = policy.to_toml_string().map_err(candle_core::Error::wrap)?;
    print!("proposed policy (the most sensitive layer at 8 bits):\n{toml}");
    Ok(())
}

fn main() -> Result<()> {
    let fail = |e: String| -> ! {
        eprintln!("{e}");
        std::process::exit(2);
    };
    let args = <Args as clap::Parser>::parse();
    if args.distill && args.mode == Mode::Fp {
        fail("--distill trains a quantized student: use --mode ternary or binary".into());
    }
    bitnet::core::host_alloc::keep_freed_memory();
    if let Err(e) = bitnet::core::host_threads::elementwise_on_caller() {
        eprintln!("note: {e}");
    }
    let selected = bitnet::core::device::select_with_reason(args.device)
        .unwrap_or_else(|e| fail(format!("--device: {e}")));
    println!("device: {} ({})", selected.info.name, selected.reason);
    let dev = selected.device;
    let mnist = mnist::load(&args.data, &dev)?;
    let (train_x, train_y) = match args.train_limit {
        Some(n) => (
            mnist.train_images.narrow(0, 0, n)?,
            mnist.train_labels.narrow(0, 0, n)?,
        ),
        None => (mnist.train_images.clone(), mnist.train_labels.clone()),
    };
    let data = Data {
        train_x,
        train_y,
        test_x: mnist.test_images,
        test_y: mnist.test_labels,
    };
    let mut cfg = match args.mode {
        Mode::Fp => QATConfig::full_precision(),
        Mode::Binary => QATConfig::binary(),
        Mode::Ternary => QATConfig::ternary(),
    };
    let steps_per_epoch = data.train_x.dim(0)?.div_ceil(args.batch);
    cfg.lambda = lambda_schedule(&args, steps_per_epoch).unwrap_or_else(|e| fail(e));

    let distiller = if args.distill {
        let (t, acc) = teacher(&args, &data, &dev)?;
        Some((Distiller::new(t, args.kd_temperature, args.kd_alpha)?, acc))
    } else {
        None
    };

    let vm = VarMap::new();
    let model = MnistMlp::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    bitnet::training::init::reseed(&vm, args.seed)?;
    let mut tracker = match &args.log {
        Some(p) => Some(StateTracker::with_log(p)?),
        None => None,
    };
    let who = if args.distill {
        "student"
    } else {
        args.mode.name()
    };
    let run = Run {
        who,
        mode: args.mode.name(),
        model: &model,
        vm: &vm,
        teacher: distiller.as_ref().map(|(d, _)| d),
        save: args.save.as_deref(),
    };
    let report = train(&run, &args, &data, tracker.as_mut())?;
    if args.report {
        let quantized = match args.mode {
            Mode::Fp => QATConfig::ternary(),
            _ => cfg,
        };
        print_sensitivity(&vm, &data, quantized)?;
    }
    println!(
        "{}",
        serde_json::json!({
            "mode": args.mode.name(),
            "epochs": args.epochs,
            "test_accuracy": (report.test_accuracy * 10000.0).round() / 10000.0,
            "epoch_seconds_median": (report.epoch_seconds_median * 100.0).round() / 100.0,
            "distill": args.distill,
            "teacher_accuracy": distiller.as_ref().map(|(_, a)| (a * 10000.0).round() / 10000.0),
            "schedule": format!("{:?}", args.schedule).to_lowercase(),
            "device": selected.info.name,
            "peak_rss_bytes": common::peak_rss_json(),
        })
    );
    Ok(())
}
