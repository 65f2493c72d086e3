//! Fine-tune a Hugging Face BitNet b1.58 model (`BitNetForCausalLM`) with quantization-aware
//! training on a text file, and save it back in Hugging Face form.
//!
//! ```sh
//! cargo run --release --example bitnet_finetune -- --hf path/to/checkpoint --steps 100 --save runs/ft
//! # distilling from the loaded model as a frozen teacher, with a lambda warmup:
//! cargo run --release --example bitnet_finetune -- --hf path/to/checkpoint --distill \
//!     --schedule lambda-warmup --save runs/ft
//! ```
//! The checkpoint may be online (latent weights) or offline (packed codes, which become the
//! latent weights `code * scale / p` that the online quantizer maps back to the same codes).
//! Every projection trains as a `QATLayer<BitLinear>` with transformers' quantizers
//! (`QATConfig::ternary_hf`), `QatAdamW`, a warmup and cosine decay of the learning rate.
//! The text (default: the repository's Shakespeare copy) is tokenized with the checkpoint's
//! tokenizer.json (bytes are the tokens of a model without one and a vocabulary of 256 or more);
//! its last 10 % is the validation text. The validation loss is reported before and after.
//! `--save DIR` writes `DIR/online` and `DIR/offline` (transformers loads both; a
//! full-precision model only the first). The last line is one JSON object. Flags: `--help`.

use bitnet::datasets::shakespeare;
use bitnet::io::hf::{save, HfCheckpoint, SaveForm};
use bitnet::models::bitnet::{BitNetForCausalLM, Cache, Runtime};
use bitnet::training::checkpoint::sorted_vars;
use bitnet::training::distillation::kd_loss;
use bitnet::training::optim::{ParamsQatAdamW, QatAdamW};
use bitnet::training::progressive::LambdaSchedule;
use bitnet::training::QATConfig;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Optimizer, VarBuilder};
use clap::Parser;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;
use std::time::Instant;

mod common;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Schedule {
    /// Fully quantized from the first step.
    Constant,
    /// The blend `x + lambda (q(x) - x)` with lambda rising from 0 to 1 over --warmup-steps.
    LambdaWarmup,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SaveDtype {
    F32,
    Bf16,
}

#[derive(Debug, Parser)]
#[command(about = "Fine-tune a Hugging Face BitNet b1.58 model with QAT and save it in HF form")]
struct Args {
    /// The checkpoint directory to start from (online or offline).
    #[arg(long)]
    hf: PathBuf,
    /// The training text (the last 10 % validates).
    #[arg(long, default_value_os_t = common::repo_data("shakespeare/shakespeare.txt.gz"))]
    data: PathBuf,
    /// Optimizer steps (0: evaluate and save only).
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 8, value_parser = common::positive_usize)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128, value_parser = common::positive_usize)]
    seq_len: usize,
    /// Peak learning rate (20-step warmup, cosine decay to a tenth).
    #[arg(long, default_value_t = 2e-4, value_parser = common::positive_f64)]
    lr: f64,
    /// Seed of the data order.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Validation batches (of --batch sequences, evenly spaced over the validation text).
    #[arg(long, default_value_t = 4, value_parser = common::positive_usize)]
    eval_batches: usize,
    /// Distil from the loaded model (frozen, packed) as the teacher.
    #[arg(long)]
    distill: bool,
    /// Distillation temperature.
    #[arg(long, default_value_t = 2.0, value_parser = common::positive_f64)]
    kd_temperature: f64,
    /// Weight of the distillation term (the rest is cross-entropy).
    #[arg(long, default_value_t = 0.5, value_parser = common::unit_f64)]
    kd_alpha: f64,
    /// Progressive quantization schedule.
    #[arg(long, value_enum, default_value_t = Schedule::Constant)]
    schedule: Schedule,
    /// Steps of the lambda warmup (default: a third of --steps).
    #[arg(long, value_parser = common::positive_usize)]
    warmup_steps: Option<usize>,
    /// Where to save the fine-tuned model (DIR/online, DIR/offline).
    #[arg(long)]
    save: Option<PathBuf>,
    /// The dtype of the saved float tensors.
    #[arg(long, value_enum, default_value_t = SaveDtype::F32)]
    save_dtype: SaveDtype,
}

/// The corpus as tokens: (train, valid).
fn tokens(args: &Args, ckpt: &HfCheckpoint) -> Result<(Vec<u32>, Vec<u32>)> {
    let corpus = shakespeare::load(&args.data, 8 * (args.seq_len + 1))?;
    let vocab = ckpt.config().vocab_size;
    match ckpt.tokenizer_path() {
        Some(p) => {
            let tok = tokenizers::Tokenizer::from_file(p).map_err(candle_core::Error::msg)?;
            let enc = |b: &[u8]| -> Result<Vec<u32>> {
                let text = String::from_utf8_lossy(b);
                Ok(tok
                    .encode(text.as_ref(), false)
                    .map_err(candle_core::Error::msg)?
                    .get_ids()
                    .to_vec())
            };
            Ok((enc(&corpus.train)?, enc(&corpus.valid)?))
        }
        None if vocab >= 256 => {
            let b = |v: &[u8]| v.iter().map(|&c| c as u32).collect();
            Ok((b(&corpus.train), b(&corpus.valid)))
        }
        None => candle_core::bail!(
            "{}: no tokenizer.json, and a vocabulary of {vocab} cannot hold bytes",
            ckpt.dir().display()
        ),
    }
}

/// Inputs and next-token targets `[starts.len(), seq]` from windows of `text`.
fn windows(text: &[u32], starts: &[usize], seq: usize) -> Result<(Tensor, Tensor)> {
    let x: Vec<u32> = starts
        .iter()
        .flat_map(|&s| text[s..s + seq].to_vec())
        .collect();
    let y: Vec<u32> = starts
        .iter()
        .flat_map(|&s| text[s + 1..s + seq + 1].to_vec())
        .collect();
    let shape = (starts.len(), seq);
    Ok((
        Tensor::from_vec(x, shape, &Device::Cpu)?,
        Tensor::from_vec(y, shape, &Device::Cpu)?,
    ))
}

/// Mean next-token cross-entropy over fixed windows of the validation text.
fn validate(model: &BitNetForCausalLM, valid: &[u32], args: &Args, seq: usize) -> Result<f64> {
    let n = args.eval_batches * args.batch;
    let span = valid.len() - seq - 1;
    let starts: Vec<usize> = (0..n).map(|i| i * span / n).collect();
    let mut total = 0f64;
    for chunk in starts.chunks(args.batch) {
        let (x, y) = windows(valid, chunk, seq)?;
        total += model.loss(&x, &y)?.to_scalar::<f32>()? as f64 * chunk.len() as f64;
    }
    Ok(total / n as f64)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let ckpt = HfCheckpoint::open(&args.hf)?;
    let (train, valid) = tokens(&args, &ckpt)?;
    let seq = args.seq_len.min(ckpt.config().max_position_embeddings);
    if train.len() <= seq + 1 || valid.len() <= seq + 1 {
        candle_core::bail!(
            "--data: {} / {} tokens of training / validation text, too few for --seq-len {seq}",
            train.len(),
            valid.len()
        );
    }
    let (cfg, vm) = ckpt.load_varmap()?;
    let mut qat = match cfg.quantization_config {
        Some(_) => QATConfig::ternary_hf(),
        None => QATConfig::full_precision(),
    };
    if args.schedule == Schedule::LambdaWarmup {
        let steps = args.warmup_steps.unwrap_or(args.steps / 3).max(1);
        qat.lambda = LambdaSchedule::Linear { steps };
    }
    let model = BitNetForCausalLM::new(
        &cfg,
        qat,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )?;
    let teacher = match args.distill {
        true => Some(ckpt.load_model(Runtime::Packed)?),
        false => None,
    };
    let val_before = validate(&model, &valid, &args, seq)?;
    println!(
        "{}: {} train / {} validation tokens; validation loss before {val_before:.4}",
        args.hf.display(),
        train.len(),
        valid.len()
    );
    let mut opt = QatAdamW::new(
        sorted_vars(&vm),
        ParamsQatAdamW {
            lr: args.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let (mut secs, mut tokens_seen) = (0f64, 0usize);
    for step in 0..args.steps {
        let t0 = Instant::now();
        model.set_step(step);
        let warm = 20.min(args.steps);
        let lr = match step < warm {
            true => args.lr * (step + 1) as f64 / warm as f64,
            false => {
                let t = (step - warm) as f64 / (args.steps - warm).max(1) as f64;
                args.lr * (0.1 + 0.45 * (1.0 + (std::f64::consts::PI * t).cos()))
            }
        };
        opt.set_learning_rate(lr);
        let starts: Vec<usize> = (0..args.batch)
            .map(|_| rng.random_range(0..train.len() - seq - 1))
            .collect();
        let (x, y) = windows(&train, &starts, seq)?;
        let loss = match &teacher {
            None => model.loss(&x, &y)?,
            Some(t) => {
                let v = cfg.vocab_size;
                let s = model
                    .forward_all(&x, 0, &mut Cache::new(false, &cfg))?
                    .reshape(((), v))?;
                let tl = t
                    .forward_all(&x, 0, &mut Cache::new(false, &cfg))?
                    .reshape(((), v))?;
                kd_loss(
                    &s,
                    &tl,
                    args.kd_temperature,
                    args.kd_alpha,
                    &y.flatten_all()?,
                )?
            }
        };
        opt.backward_step(&loss)?;
        secs += t0.elapsed().as_secs_f64();
        tokens_seen += args.batch * seq;
        if (step + 1) % 10 == 0 || step + 1 == args.steps {
            println!(
                "step {}: loss {:.4}, {:.0} tokens/s",
                step + 1,
                loss.to_scalar::<f32>()?,
                tokens_seen as f64 / secs
            );
        }
    }
    let val_after = validate(&model, &valid, &args, seq)?;
    let dtype = match args.save_dtype {
        SaveDtype::F32 => DType::F32,
        SaveDtype::Bf16 => DType::BF16,
    };
    let mut saved = Vec::new();
    if let Some(dir) = &args.save {
        let quantized = cfg.quantization_config.is_some();
        let forms: &[(SaveForm, &str)] = match quantized {
            true => &[(SaveForm::Online, "online"), (SaveForm::Offline, "offline")],
            false => &[(SaveForm::Online, "online")],
        };
        for (form, name) in forms {
            let out = dir.join(name);
            save(&model, &out, *form, dtype, ckpt.tokenizer_path())?;
            saved.push(out.display().to_string());
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "steps": args.steps,
            "val_loss_before": val_before,
            "val_loss_after": val_after,
            "tokens_per_s": if secs > 0.0 { tokens_seen as f64 / secs } else { 0.0 },
            "saved": saved,
            "peak_rss_bytes": common::peak_rss_json(),
        })
    );
    Ok(())
}
