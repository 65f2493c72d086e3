//! A BitNet b1.58 character (byte) language model on Shakespeare: train, distil, compare, plot.
//! The model is Hugging Face's `BitNetForCausalLM` with a byte vocabulary (`--export` saves it
//! in that form).
//!
//! ```sh
//! cargo run --release --example char_lm -- --mode fp --save runs/lm-fp
//! cargo run --release --example char_lm -- --mode ternary
//! cargo run --release --example char_lm -- --mode ternary --distill --teacher runs/lm-fp
//! cargo run --release --example char_lm -- --mode ternary --schedule lambda-warmup
//! ```
//! Every run appends to the JSON-lines log (`--log`, default `runs/char_lm.jsonl`) and redraws the
//! plot next to it (`runs/char_lm.png`): validation bits per character against steps, one curve
//! per mode, the latest run of each. It ends with a generated sample and one JSON line.
//!
//! `--help` lists every option with its default. `--save DIR` checkpoints at every validation and
//! `--resume DIR` continues one (weights, optimizer state, step, data order); `--stop-after N`
//! ends a time-boxed run that resumes later. `--export DIR` writes the model as Hugging Face
//! `BitNetForCausalLM` checkpoints that transformers loads: `DIR/online` (latent weights) and
//! `DIR/offline` (packed). `--shards N` splits each batch's sequences into N blocks that run
//! forward and backward side by side (`bitnet_training::data_parallel`); with more than one,
//! candle's elementwise ops run on each shard's own thread (`elementwise_on_caller`), which is
//! what makes the shards pay: 1.5x the tokens/s of one shard on 2 cores. `--device cuda` (with
//! `--features cuda`) trains on a GPU, unsharded unless `--shards` says otherwise.

mod plot;

use bitnet::datasets::shakespeare::{self, Corpus};
use bitnet::io::hf::{save, SaveForm};
use bitnet::models::char_lm::{CharLm, CharLmConfig, VOCAB};
use bitnet::training::checkpoint::{self, RngState, TrainingState};
use bitnet::training::data_parallel::sharded_backward;
use bitnet::training::distillation::kd_loss;
use bitnet::training::optim::{ParamsQatAdamW, QatAdamW};
use bitnet::training::progressive::LambdaSchedule;
use bitnet::training::state::append_json_line;
use bitnet::training::QATConfig;
use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{loss, Optimizer, VarBuilder, VarMap};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[path = "../common/mod.rs"]
mod common;
use common::Mode;

/// How lambda in the progressive blend `x + lambda (q(x) - x)` rises to 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Schedule {
    /// lambda = 1 from the first step.
    Constant,
    /// lambda from 0 to 1 over --warmup-steps.
    LambdaWarmup,
}

/// Model sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Size {
    /// 3 layers of width 192 (1.43 M parameters).
    Small,
    /// A test-sized model.
    Tiny,
}

/// Train a BitNet b1.58 byte-level language model (Hugging Face's BitNetForCausalLM) on Shakespeare.
#[derive(Debug, Clone, clap::Parser)]
#[command(long_about = None)]
struct Args {
    /// Quantizer of every projection.
    #[arg(long, value_enum, default_value_t = Mode::Ternary)]
    mode: Mode,
    /// Training steps.
    #[arg(long, default_value_t = 300, value_parser = common::positive_usize)]
    steps: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 16, value_parser = common::positive_usize)]
    batch: usize,
    /// Peak learning rate (20-step warmup, cosine decay to a tenth).
    #[arg(long, default_value_t = 2e-3, value_parser = common::positive_f64)]
    lr: f64,
    /// Seed of the initial weights, the data order and the sample.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// The text (gzip'd or not); the last 10 % is the validation text.
    #[arg(long, default_value_os_t = common::repo_data("shakespeare/shakespeare.txt.gz"))]
    data: PathBuf,
    /// Model size.
    #[arg(long = "config", value_enum, default_value_t = Size::Small)]
    size: Size,
    /// Validate every N steps.
    #[arg(long, default_value_t = 50, value_parser = common::positive_usize)]
    eval_every: usize,
    /// Fixed validation batches per validation.
    #[arg(long, default_value_t = 8, value_parser = common::positive_usize)]
    eval_batches: usize,
    /// JSON-lines log every run appends to; the plot is drawn next to it (.png).
    #[arg(long, default_value = "runs/char_lm.jsonl")]
    log: PathBuf,
    /// Save a checkpoint here at every validation.
    #[arg(long)]
    save: Option<PathBuf>,
    /// Continue the checkpoint in DIR (weights, optimizer, step, data order), saving back into it.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Hinton knowledge distillation from a full-precision teacher (trained first, or --teacher).
    #[arg(long)]
    distill: bool,
    /// Load the teacher from a `--mode fp --save DIR` run instead of training it (needs --distill).
    #[arg(long, requires = "distill")]
    teacher: Option<PathBuf>,
    /// Distillation temperature.
    #[arg(long, default_value_t = 2.0, value_parser = common::positive_f64)]
    kd_temperature: f64,
    /// Weight of the soft (teacher) term in the distillation loss.
    #[arg(long, default_value_t = 0.5, value_parser = common::unit_f64)]
    kd_alpha: f64,
    /// Progressive quantization schedule.
    #[arg(long, value_enum, default_value_t = Schedule::Constant)]
    schedule: Schedule,
    /// Steps of the lambda warmup [default: a third of --steps].
    #[arg(long, value_parser = common::positive_usize)]
    warmup_steps: Option<usize>,
    /// Bytes of text to generate at the end (0: none).
    #[arg(long, default_value_t = 300)]
    sample: usize,
    /// End the run after step N (with a validation and a checkpoint), to resume later.
    #[arg(long, value_parser = common::positive_usize)]
    stop_after: Option<usize>,
    /// Blocks of each batch run forward and backward side by side [default: one per core on the
    /// CPU, 1 on a GPU].
    #[arg(long, value_parser = common::positive_usize)]
    shards: Option<usize>,
    /// cpu, auto, cuda[:N] or metal[:N] (a GPU needs the `cuda` or `metal` feature, e.g.
    /// `cargo run --release --features cuda --example char_lm -- --device cuda`).
    #[arg(long, default_value = "cpu")]
    device: bitnet::core::device::Preference,
    /// At the end, save the model as Hugging Face checkpoints: DIR/online and DIR/offline.
    #[arg(long)]
    export: Option<PathBuf>,
}

impl Args {
    fn config(&self) -> CharLmConfig {
        match self.size {
            Size::Small => CharLmConfig::small(),
            Size::Tiny => CharLmConfig::tiny(),
        }
    }

    /// Shards per batch: one per core on the CPU, one on a GPU (whose kernels already use the
    /// whole device), unless `--shards` says otherwise.
    fn shards(&self, dev: &Device) -> usize {
        self.shards.unwrap_or_else(|| {
            if dev.is_cpu() {
                common::rayon_threads()
            } else {
                1
            }
        })
    }

    /// The curve's name in the log and the plot: the mode plus what was added to it.
    fn label(&self) -> String {
        let mut l = self.mode.name().to_string();
        if self.distill {
            l += "+distill";
        }
        if self.schedule == Schedule::LambdaWarmup {
            l += "+warmup";
        }
        l
    }

    fn qat_config(&self) -> QATConfig {
        let mut cfg = match self.mode {
            Mode::Fp => QATConfig::full_precision(),
            Mode::Binary => QATConfig::binary(),
            // transformers' ternary quantizer, so that the exported model computes in
            // transformers what it computed here.
            Mode::Ternary => QATConfig::ternary_hf(),
        };
        if self.schedule == Schedule::LambdaWarmup {
            let steps = self.warmup_steps.unwrap_or(self.steps / 3).max(1);
            cfg.lambda = LambdaSchedule::Linear { steps };
        }
        cfg
    }

    /// Warmup over 20 steps, then cosine decay to a tenth of `--lr`.
    fn lr_at(&self, step: usize) -> f64 {
        let warm = 20.min(self.steps);
        if step < warm {
            return self.lr * (step + 1) as f64 / warm as f64;
        }
        let t = (step - warm) as f64 / (self.steps - warm).max(1) as f64;
        self.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
    }
}

/// `batch` windows of `seq + 1` bytes starting at `starts`: inputs and next-byte targets.
fn windows(text: &[u8], starts: &[usize], seq: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    let mut x = Vec::with_capacity(starts.len() * seq);
    let mut y = Vec::with_capacity(starts.len() * seq);
    for &s in starts {
        x.extend(text[s..s + seq].iter().map(|&b| b as u32));
        y.extend(text[s + 1..s + seq + 1].iter().map(|&b| b as u32));
    }
    let shape = (starts.len(), seq);
    Ok((
        Tensor::from_vec(x, shape, dev)?,
        Tensor::from_vec(y, shape, dev)?,
    ))
}

/// Mean cross-entropy (nats per byte) over fixed, evenly spaced validation windows.
fn validate(model: &CharLm, valid: &[u8], args: &Args, dev: &Device) -> Result<f64> {
    let seq = args.config().seq_len;
    let n = args.eval_batches * args.batch;
    let span = valid.len() - seq - 1;
    let starts: Vec<usize> = (0..n).map(|i| i * span / n).collect();
    let mut total = 0f64;
    for chunk in starts.chunks(args.batch) {
        let (x, y) = windows(valid, chunk, seq, dev)?;
        let logits = model.forward(&x)?.reshape(((), VOCAB))?;
        let l = loss::cross_entropy(&logits, &y.flatten_all()?)?;
        total += l.to_scalar::<f32>()? as f64 * chunk.len() as f64;
    }
    Ok(total / n as f64)
}

/// What a finished run reports.
struct Outcome {
    val_loss: f64,
    tokens_per_s: f64,
}

/// Trains `model` (variables `vm`) per `args`, against `teacher` when given.
fn train(
    model: &CharLm,
    vm: &VarMap,
    args: &Args,
    corpus: &Corpus,
    teacher: Option<&CharLm>,
    dev: &Device,
) -> Result<Outcome> {
    let (seq, label) = (args.config().seq_len, args.label());
    let mut opt = QatAdamW::new(
        checkpoint::sorted_vars(vm),
        ParamsQatAdamW {
            lr: args.lr,
            weight_decay: 0.01,
            ..Default::default()
        },
    )?;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let mut start = 0usize;
    // A run id that survives a resume, so that the plot joins both halves of a run.
    let mut run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    if let Some(dir) = &args.resume {
        let state = checkpoint::resume(dir, vm, &mut opt)?;
        start = state.step as usize;
        rng = match &state.rng {
            Some(r) => r.restore()?,
            None => candle_core::bail!("{}: the checkpoint has no rng state", dir.display()),
        };
        run = state.extra["run"].as_u64().unwrap_or(run);
        println!("resumed {} at step {start}", dir.display());
    }
    let save_dir = args.save.as_ref().or(args.resume.as_ref());
    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}").expect("valid"),
    );
    bar.set_prefix(label.clone());
    bar.set_position(start as u64);
    let (mut train_secs, mut tokens) = (0f64, 0usize);
    let mut val_loss = f64::NAN;
    let mut loss_sum = (0f64, 0usize);
    let end = args.stop_after.map_or(args.steps, |n| n.min(args.steps));
    for step in start..end {
        let t0 = Instant::now();
        model.set_step(step);
        opt.set_learning_rate(args.lr_at(step));
        let starts: Vec<usize> = (0..args.batch)
            .map(|_| rng.random_range(0..corpus.train.len() - seq - 1))
            .collect();
        let (x, y) = windows(&corpus.train, &starts, seq, dev)?;
        // Each sequence's tokens are independent rows of the mean loss: shards split sequences.
        let (l, grads) = sharded_backward(&[&x, &y], args.shards(dev), |b| {
            let (x, y) = (&b[0], b[1].flatten_all()?);
            let logits = model.forward(x)?.reshape(((), VOCAB))?;
            match teacher {
                Some(t) => {
                    let tl = t.forward(x)?.detach().reshape(((), VOCAB))?;
                    kd_loss(&logits, &tl, args.kd_temperature, args.kd_alpha, &y)
                }
                None => loss::cross_entropy(&logits, &y),
            }
        })?;
        opt.step(&grads)?;
        loss_sum = (loss_sum.0 + l.to_scalar::<f32>()? as f64, loss_sum.1 + 1);
        train_secs += t0.elapsed().as_secs_f64();
        tokens += args.batch * seq;
        bar.set_message(format!("{:.0} tok/s", tokens as f64 / train_secs));
        bar.inc(1);
        if (step + 1) % args.eval_every == 0 || step + 1 == end {
            val_loss = validate(model, &corpus.valid, args, dev)?;
            let record = serde_json::json!({
                "run": run, "label": label, "step": step + 1,
                "train_loss": loss_sum.0 / loss_sum.1 as f64,
                "val_loss": val_loss, "val_bpc": val_loss / std::f64::consts::LN_2,
                "tokens_per_s": tokens as f64 / train_secs,
            });
            loss_sum = (0.0, 0);
            bar.suspend(|| println!("{record}"));
            append_json_line(&args.log, &record)?;
            if let Some(dir) = save_dir {
                let state = TrainingState {
                    step: (step + 1) as u64,
                    extra: serde_json::json!({ "mode": args.mode.name(), "label": label, "run": run }),
                    rng: Some(RngState::capture(&rng)),
                };
                checkpoint::save_with_optimizer(dir, vm, &opt, &state)?;
            }
        }
    }
    bar.finish_and_clear();
    if val_loss.is_nan() {
        val_loss = validate(model, &corpus.valid, args, dev)?;
    }
    Ok(Outcome {
        val_loss,
        tokens_per_s: tokens as f64 / train_secs.max(1e-9),
    })
}

/// The fp teacher: loaded from a `--mode fp --save DIR` checkpoint, or trained here first.
fn teacher(args: &Args, corpus: &Corpus, dev: &Device) -> Result<CharLm> {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, dev);
    let model = CharLm::new(args.config(), QATConfig::full_precision(), vb)?;
    match &args.teacher {
        Some(dir) => {
            let r = checkpoint::load(dir, &vm)?;
            if r.state.extra["mode"] != "fp" {
                candle_core::bail!(
                    "--teacher {}: needs a --mode fp checkpoint, this one is {}",
                    dir.display(),
                    r.state.extra["mode"]
                );
            }
        }
        None => {
            let t_args = Args {
                mode: Mode::Fp,
                distill: false,
                teacher: None,
                schedule: Schedule::Constant,
                save: None,
                resume: None,
                ..args.clone()
            };
            train(&model, &vm, &t_args, corpus, None, dev)?;
        }
    }
    let v = validate(&model, &corpus.valid, args, dev)?;
    println!("teacher val_bpc {:.4}", v / std::f64::consts::LN_2);
    Ok(model)
}

/// `n` bytes continuing `prompt`, sampled at temperature 0.8 with a fixed seed.
fn sample(model: &CharLm, prompt: &[u8], n: usize, seed: u64, dev: &Device) -> Result<String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut text = prompt.to_vec();
    let seq = model.config().seq_len;
    for _ in 0..n {
        let ctx = &text[text.len().saturating_sub(seq)..];
        let x = Tensor::from_vec(
            ctx.iter().map(|&b| b as u32).collect::<Vec<_>>(),
            (1, ctx.len()),
            dev,
        )?;
        let last = model.forward(&x)?.get(0)?.get(ctx.len() - 1)?;
        let probs = candle_nn::ops::softmax(&(last / 0.8)?, D::Minus1)?.to_vec1::<f32>()?;
        let r: f32 = rng.random();
        let (mut acc, mut pick) = (0f32, probs.len() - 1);
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if r < acc {
                pick = i;
                break;
            }
        }
        text.push(pick as u8);
    }
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// The latest run of each label in the log: its `(step, val_bpc)` points and final bpc.
fn curves(log: &Path) -> Result<Vec<plot::Series>> {
    let text = std::fs::read_to_string(log)
        .map_err(|e| candle_core::Error::msg(format!("{}: {e}", log.display())))?;
    // (label, run id, points) of the newest run seen for each label.
    type Run = (String, u64, Vec<(f64, f64)>);
    let mut latest: Vec<Run> = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| candle_core::Error::msg(format!("{}: {e}", log.display())))?;
        let (Some(label), Some(run)) = (v["label"].as_str(), v["run"].as_u64()) else {
            continue;
        };
        let point = (
            v["step"].as_f64().unwrap_or(0.0),
            v["val_bpc"].as_f64().unwrap_or(f64::NAN),
        );
        match latest.iter_mut().find(|(l, _, _)| l == label) {
            Some(e) if e.1 == run => e.2.push(point),
            Some(e) if e.1 < run => *e = (label.to_string(), run, vec![point]),
            Some(_) => {}
            None => latest.push((label.to_string(), run, vec![point])),
        }
    }
    Ok(latest
        .into_iter()
        .map(|(label, _, mut points)| {
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            points.dedup_by(|a, b| a.0 == b.0);
            plot::Series { label, points }
        })
        .collect())
}

fn main() -> Result<()> {
    let args = <Args as clap::Parser>::parse();
    if args.distill && args.mode == Mode::Fp {
        use clap::CommandFactory;
        Args::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--distill trains a quantized student: use --mode ternary or binary",
            )
            .exit();
    }
    let selected = bitnet::core::device::select_with_reason(args.device)
        .map_err(|e| candle_core::Error::Msg(format!("--device: {e}")))?;
    println!("device: {} ({})", selected.info.name, selected.reason);
    let device_name = selected.info.name.clone();
    let dev = selected.device;
    bitnet::core::host_alloc::keep_freed_memory();
    // Shards keep every core busy on their own; candle's spinning elementwise pool would compete
    // with them (unsharded, that pool is what parallelises this model's large elementwise ops).
    if dev.is_cpu() && args.shards(&dev) > 1 {
        if let Err(e) = bitnet::core::host_threads::elementwise_on_caller() {
            eprintln!("note: {e}");
        }
    }
    let corpus = shakespeare::load(&args.data, 8 * args.config().seq_len)?;
    let teacher = match args.distill {
        true => Some(teacher(&args, &corpus, &dev)?),
        false => None,
    };
    let vm = VarMap::new();
    let model = CharLm::new(
        args.config(),
        args.qat_config(),
        VarBuilder::from_varmap(&vm, DType::F32, &dev),
    )?;
    bitnet::training::init::reseed(&vm, args.seed)?;
    println!(
        "{}: {} parameters, {} train / {} validation bytes",
        args.label(),
        args.config().parameters(),
        corpus.train.len(),
        corpus.valid.len()
    );
    let out = train(&model, &vm, &args, &corpus, teacher.as_ref(), &dev)?;
    let series = curves(&args.log)?;
    let png = args.log.with_extension("png");
    plot::write_png(
        &png,
        "char_lm: validation bits per character",
        "step",
        "val bpc",
        &series,
    )
    .map_err(candle_core::Error::msg)?;
    let mut exported = Vec::new();
    if let Some(dir) = &args.export {
        if args.mode == Mode::Binary {
            candle_core::bail!("--export: a binary model has no Hugging Face BitNet form");
        }
        let forms: &[(SaveForm, &str)] = match args.mode {
            Mode::Fp => &[(SaveForm::Online, "online")],
            _ => &[(SaveForm::Online, "online"), (SaveForm::Offline, "offline")],
        };
        for (form, name) in forms {
            save(model.model(), dir.join(name), *form, DType::F32, None)?;
            exported.push(dir.join(name).display().to_string());
        }
    }
    if args.sample > 0 {
        println!(
            "--- sample ---\n{}\n---",
            sample(&model, b"ROMEO.\n", args.sample, args.seed, &dev)?
        );
    }
    let modes: serde_json::Map<String, serde_json::Value> = series
        .iter()
        .filter_map(|s| {
            s.points
                .last()
                .map(|p| (s.label.clone(), serde_json::json!(p.1)))
        })
        .collect();
    let round = |v: f64| (v * 10000.0).round() / 10000.0;
    println!(
        "{}",
        serde_json::json!({
            "mode": args.mode.name(),
            "label": args.label(),
            "device": device_name,
            "steps": args.stop_after.map_or(args.steps, |n| n.min(args.steps)),
            "parameters": args.config().parameters(),
            "val_loss": round(out.val_loss),
            "val_bpc": round(out.val_loss / std::f64::consts::LN_2),
            "tokens_per_s": out.tokens_per_s.round(),
            "val_bpc_by_mode": modes,
            "plot": png.display().to_string(),
            "exported": exported,
            "peak_rss_bytes": bitnet::core::host_memory::peak_resident_bytes(),
        })
    );
    Ok(())
}
