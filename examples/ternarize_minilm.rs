//! Convert a pretrained sentence encoder (all-MiniLM-L6-v2) to 1.58 bits: post-training
//! ternarisation, QAT without a teacher, and QAT with embedding distillation, compared on
//! Shakespeare lines the training never saw.
//!
//! ```sh
//! cargo run --release --example ternarize_minilm -- --model ../shared/models/all-MiniLM-L6-v2
//! ```
//! Modes (`--mode ptq|qat|distill|all`, default all):
//! * `ptq`: every encoder linear ternary (absmean weights, int8 tokens), no training;
//! * `qat`: the same layers trained with lambda warmup on the model's own training objective
//!   (in-batch contrastive ranking, scale 20) over pairs of consecutive lines, no teacher;
//! * `distill`: trained to reproduce the frozen fp model's embeddings (loss `1 - cos`).
//!
//! Reported per mode on `--val N` validation lines (from the last 10 % of the corpus, at least 5
//! words each): the mean cosine between student and teacher embeddings, and top-1 retrieval
//! agreement (each line's nearest other line by the student is the teacher's). Embeddings,
//! LayerNorms and biases stay full precision; word embeddings are frozen.
//!
//! `--hidden-weight X` (distill mode, default 0) adds per-layer hidden-state matching to the
//! embedding loss: for each encoder layer, the squared error between student and teacher hidden
//! states over the real tokens relative to the teacher's mean square, averaged over layers, times X.
//!
//! `--relation-weight X` (distill mode, default 0) adds relation distillation
//! (`bitnet_training::distillation::relation_loss`, temperature 0.05): each sentence's softmax over
//! its similarities to the rest of the batch, student against teacher, times X. It targets what
//! the retrieval metric reads: which sentences are each other's neighbours.
//!
//! `--shards N` (distill mode; default one per rayon thread, 1 with `--relation-weight`) splits
//! each batch into N row blocks whose forward and backward run side by side
//! (`bitnet_training::data_parallel`), with candle's elementwise ops kept on each shard's thread.
//! The hidden-state term is then normalised per shard.
//!
//! `--per-channel` gives every output row of a weight its own absmean scale (BitNet uses one per
//! tensor; pretrained rows differ in norm, and packing keeps one f32 per row).
//!
//! Other options: `--steps N` (200), `--batch N` (32), `--max-len N` (64), `--lr X` (5e-4, cosine
//! decay), `--warmup-steps N` (lambda 0 -> 1; default a quarter of the steps), `--seed N`,
//! `--log FILE` (JSON lines, default `runs/minilm.jsonl`), `--save DIR` / `--resume DIR`
//! (checkpoints every `--eval-every N` steps, 50), `--out FILE` (the packed ternary linears of the
//! last trained mode; default `runs/minilm-ternary.safetensors`). The last line is a JSON summary.

use bitnet::datasets::shakespeare;
use bitnet::models::bert::{pool, BertConfig, BertEncoder};
use bitnet::quant::packed::save_packed;
use bitnet::quant::{Granularity, PackedBitLinear};
use bitnet::training::checkpoint::{self, RngState, TrainingState};
use bitnet::training::convert::{load_safetensors, Converter};
use bitnet::training::data_parallel::sharded_backward;
use bitnet::training::distillation::relation_loss;
use bitnet::training::optim::{ParamsQatAdamW, QatAdamW};
use bitnet::training::policy::PrecisionPolicy;
use bitnet::training::progressive::LambdaSchedule;
use bitnet::training::state::append_json_line;
use bitnet::training::QATConfig;
use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{loss, Optimizer, VarMap};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;
use tokenizers::Tokenizer;

struct Args {
    model: PathBuf,
    mode: String,
    steps: usize,
    batch: usize,
    max_len: usize,
    lr: f64,
    warmup_steps: Option<usize>,
    seed: u64,
    val: usize,
    eval_every: usize,
    log: PathBuf,
    save: Option<PathBuf>,
    resume: Option<PathBuf>,
    out: PathBuf,
    per_channel: bool,
    hidden_weight: f64,
    relation_weight: f64,
    /// Row shards of each distillation batch (`None`: one per rayon thread, 1 with relations).
    shards: Option<usize>,
}

/// Temperature of `--relation-weight`'s similarity softmax (embeddings are L2-normalised).
const RELATION_TEMPERATURE: f64 = 0.05;

/// A loss weight: a finite number >= 0.
fn weight(flag: &str, v: String) -> std::result::Result<f64, String> {
    match v.parse::<f64>() {
        Ok(w) if w >= 0.0 && w.is_finite() => Ok(w),
        Ok(w) => Err(format!("{flag} must be a finite number >= 0, got {w}")),
        Err(e) => Err(format!("{flag}: {e}")),
    }
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut a = Args {
        model: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/models/all-MiniLM-L6-v2"),
        mode: "all".into(),
        steps: 200,
        batch: 32,
        max_len: 64,
        lr: 5e-4,
        warmup_steps: None,
        seed: 42,
        val: 500,
        eval_every: 50,
        log: PathBuf::from("runs/minilm.jsonl"),
        save: None,
        resume: None,
        out: PathBuf::from("runs/minilm-ternary.safetensors"),
        per_channel: false,
        hidden_weight: 0.0,
        relation_weight: 0.0,
        shards: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or(format!("{flag} needs a value"));
        let count = |v: String| v.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--model" => a.model = val()?.into(),
            "--mode" => a.mode = val()?,
            "--steps" => a.steps = count(val()?)?,
            "--batch" => a.batch = count(val()?)?,
            "--max-len" => a.max_len = count(val()?)?,
            "--lr" => a.lr = val()?.parse().map_err(|e| format!("--lr: {e}"))?,
            "--warmup-steps" => a.warmup_steps = Some(count(val()?)?),
            "--seed" => a.seed = val()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--val" => a.val = count(val()?)?,
            "--eval-every" => a.eval_every = count(val()?)?,
            "--log" => a.log = val()?.into(),
            "--save" => a.save = Some(val()?.into()),
            "--resume" => a.resume = Some(val()?.into()),
            "--out" => a.out = val()?.into(),
            "--per-channel" => a.per_channel = true,
            "--hidden-weight" => a.hidden_weight = weight("--hidden-weight", val()?)?,
            "--relation-weight" => a.relation_weight = weight("--relation-weight", val()?)?,
            "--shards" => a.shards = Some(count(val()?)?),
            "-h" | "--help" => {
                return Err("see the doc comment at the top of examples/ternarize_minilm.rs".into())
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    if !["ptq", "qat", "distill", "all"].contains(&a.mode.as_str()) {
        return Err(format!(
            "--mode must be ptq, qat, distill or all, got {}",
            a.mode
        ));
    }
    for (name, v) in [
        ("--steps", a.steps),
        ("--batch", a.batch),
        ("--max-len", a.max_len),
        ("--val", a.val),
        ("--eval-every", a.eval_every),
    ] {
        if v == 0 {
            return Err(format!("{name} must be at least 1"));
        }
    }
    if a.batch < 2 {
        return Err("--batch must be at least 2 (in-batch negatives)".into());
    }
    if a.shards == Some(0) {
        return Err("--shards must be at least 1".into());
    }
    if a.relation_weight > 0.0 && a.shards.is_some_and(|n| n > 1) {
        return Err(
            "--relation-weight compares every pair of sentences in the batch: it needs --shards 1"
                .into(),
        );
    }
    if a.resume.is_some() && a.mode == "all" {
        return Err("--resume continues one mode: give --mode qat or --mode distill".into());
    }
    Ok(a)
}

/// Lines of at least 5 words, trimmed, in corpus order, without repeats.
fn lines(text: &[u8]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    String::from_utf8_lossy(text)
        .lines()
        .map(str::trim)
        .filter(|l| l.split_whitespace().count() >= 5)
        .filter(|l| seen.insert(l.to_string()))
        .map(str::to_string)
        .collect()
}

/// Token ids and mask `[n, len]` (right-padded to the longest line, truncated to `max_len`).
fn encode(tok: &Tokenizer, lines: &[&str], max_len: usize) -> Result<(Tensor, Tensor)> {
    let enc = tok
        .encode_batch(lines.to_vec(), true)
        .map_err(|e| candle_core::Error::msg(format!("tokenizer: {e}")))?;
    let ids: Vec<&[u32]> = enc
        .iter()
        .map(|e| {
            let real = e.get_attention_mask().iter().filter(|&&m| m == 1).count();
            &e.get_ids()[..real.min(max_len)]
        })
        .collect();
    let len = ids.iter().map(|i| i.len()).max().unwrap_or(1).max(1);
    let (mut flat, mut mask) = (Vec::new(), Vec::new());
    for i in &ids {
        flat.extend(
            i.iter()
                .copied()
                .chain(std::iter::repeat_n(0, len - i.len())),
        );
        mask.extend((0..len).map(|k| (k < i.len()) as u32));
    }
    let shape = (ids.len(), len);
    Ok((
        Tensor::from_vec(flat, shape, &Device::Cpu)?,
        Tensor::from_vec(mask, shape, &Device::Cpu)?,
    ))
}

/// Embeddings of `lines` in batches of 64, `[n, hidden]`.
fn embed_all(enc: &BertEncoder, tok: &Tokenizer, lines: &[&str], max_len: usize) -> Result<Tensor> {
    let parts = lines
        .chunks(64)
        .map(|c| {
            let (ids, mask) = encode(tok, c, max_len)?;
            Ok(enc.embed(&ids, &mask)?.detach())
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}

/// Per-layer hidden-state matching: for each encoder layer, the mean squared difference between
/// student and teacher hidden states over the real tokens, divided by the teacher's mean square
/// there (so that every layer weighs the same whatever its scale), averaged over the layers.
fn hidden_loss(student: &[Tensor], teacher: &[Tensor], mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    let mut total = Tensor::zeros((), DType::F32, &Device::Cpu)?;
    for (s, t) in student.iter().zip(teacher) {
        let t = t.detach();
        let err = (s - &t)?.sqr()?.broadcast_mul(&m)?.sum_all()?;
        let scale = t
            .sqr()?
            .broadcast_mul(&m)?
            .sum_all()?
            .clamp(1e-12, f64::MAX)?;
        total = (total + (err / scale)?)?;
    }
    total / student.len().max(1) as f64
}

/// (mean cosine to the teacher, top-1 retrieval agreement with the teacher).
fn compare(student: &Tensor, teacher: &Tensor) -> Result<(f64, f64)> {
    let cos = (student * teacher)?
        .sum(1)?
        .mean_all()?
        .to_scalar::<f32>()? as f64;
    let n = student.dim(0)?;
    let eye = Tensor::eye(n, DType::F32, &Device::Cpu)?;
    let nearest = |e: &Tensor| -> Result<Vec<u32>> {
        (e.matmul(&e.t()?)? - (eye.clone() * 10.0)?)?
            .argmax(D::Minus1)?
            .to_vec1::<u32>()
    };
    let (s, t) = (nearest(student)?, nearest(teacher)?);
    let agree = s.iter().zip(&t).filter(|(a, b)| a == b).count();
    Ok((cos, agree as f64 / n as f64))
}

/// Everything a mode needs.
struct Setup<'a> {
    args: &'a Args,
    config: &'a BertConfig,
    tensors: &'a HashMap<String, Tensor>,
    tok: &'a Tokenizer,
    train: &'a [String],
    val: &'a [&'a str],
    teacher: &'a BertEncoder,
    teacher_val: &'a Tensor,
    /// Row shards of each distillation batch.
    shards: usize,
}

/// A ternary student converted from the pretrained tensors (lambda warmup over `warmup` steps;
/// 0 for post-training ternarisation).
fn student(s: &Setup, vm: &VarMap, warmup: usize) -> Result<BertEncoder> {
    let mut cfg = QATConfig::ternary();
    if s.args.per_channel {
        cfg.weight_granularity = Granularity::PerChannel;
    }
    if warmup > 0 {
        cfg.lambda = LambdaSchedule::Linear { steps: warmup };
    }
    BertEncoder::new(
        s.config.clone(),
        &Converter::new(s.tensors, vm, PrecisionPolicy::new(cfg)),
    )
}

/// Trains one mode; returns (cosine, retrieval, seconds) on the validation lines.
fn train(s: &Setup, mode: &str) -> Result<(f64, f64, f64, BertEncoder)> {
    let args = s.args;
    let warmup = args.warmup_steps.unwrap_or(args.steps / 4).max(1);
    let vm = VarMap::new();
    let enc = student(s, &vm, warmup)?;
    // Everything but the (large, frozen) word embeddings.
    let vars: Vec<_> = checkpoint::sorted_vars(&vm)
        .into_iter()
        .filter(|v| v.as_tensor().dims() != [30522, s.config.hidden_size])
        .collect();
    let mut opt = QatAdamW::new(
        vars,
        ParamsQatAdamW {
            lr: args.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let mut start = 0;
    if let Some(dir) = &args.resume {
        let st = checkpoint::resume(dir, &vm, &mut opt)?;
        start = st.step as usize;
        rng = match st.rng {
            Some(r) => r.restore()?,
            None => candle_core::bail!("{}: the checkpoint has no rng state", dir.display()),
        };
    }
    let save = args.save.as_ref().or(args.resume.as_ref());
    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}").expect("valid"),
    );
    bar.set_prefix(mode.to_string());
    bar.set_position(start as u64);
    let t0 = Instant::now();
    let mut result = (0.0, 0.0);
    for step in start..args.steps {
        enc.set_step(step);
        let t = step as f64 / args.steps as f64;
        opt.set_learning_rate(args.lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()));
        let picks: Vec<usize> = (0..args.batch)
            .map(|_| rng.random_range(0..s.train.len() - 1))
            .collect();
        let anchors: Vec<&str> = picks.iter().map(|&i| s.train[i].as_str()).collect();
        let (ids, mask) = encode(s.tok, &anchors, args.max_len)?;
        let (l, grads) = match mode {
            // Sentences are independent rows of the embedding loss, so the batch can be split
            // into shards that run side by side; the hidden-state term is then normalised by
            // each shard's teacher mean square instead of the batch's.
            "distill" => sharded_backward(&[&ids, &mask], s.shards, |b| {
                let (ids, mask) = (&b[0], &b[1]);
                let hs = enc.layer_outputs(ids, mask)?;
                let ht = s.teacher.layer_outputs(ids, mask)?;
                let e = pool(hs.last().expect("layers"), mask)?;
                let target = pool(ht.last().expect("layers"), mask)?.detach();
                let l = (1.0 - (&e * &target)?.sum(1)?.mean_all()?)?;
                let l = if args.hidden_weight > 0.0 {
                    (l + (hidden_loss(&hs[1..], &ht[1..], mask)? * args.hidden_weight)?)?
                } else {
                    l
                };
                if args.relation_weight > 0.0 {
                    l + (relation_loss(&e, &target, RELATION_TEMPERATURE)? * args.relation_weight)?
                } else {
                    Ok(l)
                }
            })?,
            _ => {
                let e = enc.embed(&ids, &mask)?;
                // Consecutive lines as positives, the rest of the batch as negatives.
                let next: Vec<&str> = picks.iter().map(|&i| s.train[i + 1].as_str()).collect();
                let (pi, pm) = encode(s.tok, &next, args.max_len)?;
                let p = enc.embed(&pi, &pm)?;
                let scores = (e.matmul(&p.t()?)? * 20.0)?;
                let labels = Tensor::arange(0u32, args.batch as u32, &Device::Cpu)?;
                let l = loss::cross_entropy(&scores, &labels)?;
                let grads = l.backward()?;
                (l, grads)
            }
        };
        opt.step(&grads)?;
        bar.set_message(format!("loss {:.4}", l.to_scalar::<f32>()?));
        bar.inc(1);
        if (step + 1) % args.eval_every == 0 || step + 1 == args.steps {
            let sv = embed_all(&enc, s.tok, s.val, args.max_len)?;
            result = compare(&sv, s.teacher_val)?;
            let rec = serde_json::json!({
                "mode": mode, "step": step + 1, "loss": l.to_scalar::<f32>()?,
                "val_cosine": result.0, "val_retrieval": result.1,
                "seconds": t0.elapsed().as_secs_f64(),
            });
            bar.suspend(|| println!("{rec}"));
            append_json_line(&args.log, &rec)?;
            if let Some(dir) = save {
                let state = TrainingState {
                    step: (step + 1) as u64,
                    extra: serde_json::json!({ "mode": mode }),
                    rng: Some(RngState::capture(&rng)),
                };
                checkpoint::save_with_optimizer(dir, &vm, &opt, &state)?;
            }
        }
    }
    bar.finish_and_clear();
    Ok((result.0, result.1, t0.elapsed().as_secs_f64(), enc))
}

fn main() -> Result<()> {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2);
    });
    bitnet::core::host_alloc::keep_freed_memory();
    let shards = args.shards.unwrap_or(if args.relation_weight > 0.0 {
        1
    } else {
        rayon::current_num_threads()
    });
    // With a shard per core, candle's elementwise pool would compete with the shards for the
    // cores (see bitnet::core::host_threads); unsharded, its parallelism is what pays.
    if shards > 1 && args.mode != "qat" {
        if let Err(e) = bitnet::core::host_threads::elementwise_on_caller() {
            eprintln!("note: {e}");
        }
    }
    let config = BertConfig::load(args.model.join("config.json"))?;
    let weights = args.model.join("model.safetensors");
    let tensors = load_safetensors(&weights)?;
    let mut tok = Tokenizer::from_file(args.model.join("tokenizer.json")).map_err(|e| {
        candle_core::Error::msg(format!(
            "{}: {e}",
            args.model.join("tokenizer.json").display()
        ))
    })?;
    // The file pads every input to 128; batches are padded here, to their own longest line.
    tok.with_padding(None);
    let corpus = shakespeare::load(shakespeare::default_path(), 10_000)?;
    let train_lines = lines(&corpus.train);
    let val_lines = lines(&corpus.valid);
    let val: Vec<&str> = val_lines
        .iter()
        .take(args.val)
        .map(String::as_str)
        .collect();
    println!(
        "{} training lines, {} validation lines",
        train_lines.len(),
        val.len()
    );

    let tvm = VarMap::new();
    let fp = PrecisionPolicy::new(QATConfig::full_precision());
    let teacher = BertEncoder::new(config.clone(), &Converter::new(&tensors, &tvm, fp))?;
    let teacher_val = embed_all(&teacher, &tok, &val, args.max_len)?;
    let setup = Setup {
        args: &args,
        config: &config,
        tensors: &tensors,
        tok: &tok,
        train: &train_lines,
        val: &val,
        teacher: &teacher,
        teacher_val: &teacher_val,
        shards,
    };
    let modes: Vec<&str> = match args.mode.as_str() {
        "all" => vec!["ptq", "qat", "distill"],
        m => vec![m],
    };
    let mut summary = serde_json::Map::new();
    let mut last: Option<BertEncoder> = None;
    for mode in modes {
        let (cos, ret, secs) = if mode == "ptq" {
            let vm = VarMap::new();
            let enc = student(&setup, &vm, 0)?;
            let (c, r) = compare(&embed_all(&enc, &tok, &val, args.max_len)?, &teacher_val)?;
            (c, r, 0.0)
        } else {
            let (c, r, s, enc) = train(&setup, mode)?;
            last = Some(enc);
            (c, r, s)
        };
        println!(
            "{mode:>8}: mean cosine {cos:.4}, retrieval agreement {:.1} %, {secs:.0} s",
            ret * 100.0
        );
        let rec = serde_json::json!({ "cosine": (cos * 1e4).round() / 1e4, "retrieval": (ret * 1e4).round() / 1e4, "train_seconds": secs.round() });
        append_json_line(
            &args.log,
            &serde_json::json!({ "mode": mode, "final": rec }),
        )?;
        summary.insert(mode.to_string(), rec);
    }
    if let Some(enc) = last {
        let packed: Vec<PackedBitLinear> = enc
            .qat_layers()
            .iter()
            .map(|l| l.to_packed())
            .collect::<Result<_>>()?;
        let names: Vec<String> = enc
            .qat_layers()
            .iter()
            .map(|l| l.name().to_string())
            .collect();
        let named: Vec<(&str, &PackedBitLinear)> =
            names.iter().map(String::as_str).zip(&packed).collect();
        if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(candle_core::Error::wrap)?;
        }
        save_packed(&args.out, &named)?;
        let packed_bytes = std::fs::metadata(&args.out)
            .map_err(candle_core::Error::wrap)?
            .len();
        let linear_bytes: usize = enc
            .qat_layers()
            .iter()
            .map(|l| {
                l.inner().weight().elem_count() * 4
                    + l.inner().bias().map_or(0, |b| b.elem_count() * 4)
            })
            .sum();
        let model_bytes = std::fs::metadata(&weights)
            .map_err(candle_core::Error::wrap)?
            .len();
        println!(
            "packed linears: {packed_bytes} bytes ({:.1}x smaller than their {linear_bytes} f32 bytes; the whole f32 file is {model_bytes}) -> {}",
            linear_bytes as f64 / packed_bytes as f64,
            args.out.display()
        );
        summary.insert("packed_bytes".into(), packed_bytes.into());
        summary.insert("f32_linear_bytes".into(), linear_bytes.into());
        summary.insert("f32_model_bytes".into(), model_bytes.into());
    }
    println!("{}", serde_json::Value::Object(summary));
    Ok(())
}
