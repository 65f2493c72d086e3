//! Convert a pretrained sentence encoder (all-MiniLM-L6-v2) to 1.58 bits, or to a mixed
//! precision with the most sensitive linears kept at 4 or 8 bits: post-training quantization,
//! QAT without a teacher, and QAT with embedding distillation, compared on Shakespeare lines the
//! training never saw.
//!
//! ```sh
//! cargo run --release --example ternarize_minilm -- --mode distill --steps 800 --lr 1e-3 \
//!     --hidden-weight 1 --per-channel --keep-sensitive 4 --wide-bits 4
//! ```
//! `--help` lists every flag with its default. Modes (`--mode`, default all):
//! * `ptq`: every encoder linear quantized (ternary absmean weights unless the policy says
//!   otherwise, int8 tokens), no training;
//! * `qat`: the same layers trained with lambda warmup on the model's own training objective
//!   (in-batch contrastive ranking, scale 20) over pairs of consecutive lines, no teacher;
//! * `distill`: trained to reproduce the frozen fp model's embeddings (loss `1 - cos`), plus
//!   per-layer hidden-state matching (`--hidden-weight`) and relation distillation
//!   (`--relation-weight`).
//!
//! Precision per linear: ternary by default; `--policy FILE` (a `PrecisionPolicy`, glob rules
//! over names such as `encoder.layer.3.output.dense`); `--auto-policy BITS` (the sensitivity
//! analysis keeps the most sensitive layers at `--wide-bits` within an average of BITS bits per
//! weight; ternary counts log2(3)); `--keep-sensitive K` (the K most sensitive); `--keep-random
//! K` (K random layers of the same sizes: the baseline the ranking must beat). The analysis
//! quantizes one layer at a time and measures `1 - cos` to the teacher on training lines.
//!
//! Reported per mode on `--val N` validation lines (from the last 10 % of the corpus, at least 5
//! words each): the mean cosine between student and teacher embeddings, top-1 retrieval
//! agreement (each line's nearest other line by the student is the teacher's) and top-5 (the
//! teacher's nearest is among the student's 5 nearest). Also the average bits per weight of the
//! linears, and the size of their packed file (`--out`; 2 bits per ternary weight, 4 or 8 per
//! wider one, one f32 scale per row or tensor, f32 biases). Embeddings, LayerNorms and biases
//! stay f32 (their size is reported apart); word embeddings are frozen unless
//! `--train-embeddings`.
//!
//! `--shards N` (distill mode; default one per rayon thread, 1 with `--relation-weight`) splits
//! each batch into N row blocks whose forward and backward run side by side
//! (`bitnet_training::data_parallel`); the hidden-state term is then normalised per shard.
//! `--save DIR` / `--resume DIR` checkpoint every `--eval-every` steps. The last line printed is
//! a JSON summary.

mod args;
#[path = "../common/mod.rs"]
mod common;
mod data;
mod metrics;
mod precision;

use args::{Args, Mode};
use bitnet::datasets::shakespeare;
use bitnet::models::bert::{pool, BertConfig, BertEncoder};
use bitnet::quant::packed::{save_packed_layers, PackedLayer};
use bitnet::training::checkpoint::{self, RngState, TrainingState};
use bitnet::training::convert::{load_safetensors, Converter};
use bitnet::training::data_parallel::sharded_backward;
use bitnet::training::distillation::relation_loss;
use bitnet::training::optim::{ParamsQatAdamW, QatAdamW};
use bitnet::training::policy::PrecisionPolicy;
use bitnet::training::progressive::LambdaSchedule;
use bitnet::training::state::append_json_line;
use bitnet::training::QATConfig;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{loss, Optimizer, VarMap};
use data::{embed_all, encode, lines};
use indicatif::{ProgressBar, ProgressStyle};
use metrics::Fidelity;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::time::Instant;
use tokenizers::Tokenizer;

/// Temperature of `--relation-weight`'s similarity softmax (embeddings are L2-normalised).
const RELATION_TEMPERATURE: f64 = 0.05;

/// Name of the (large) word embedding table, frozen unless `--train-embeddings`.
const WORD_EMBEDDINGS: &str = "embeddings.word_embeddings.weight";

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
    /// The precision of each linear (lambda 1; [`student`] sets the warmup).
    policy: &'a PrecisionPolicy,
    /// Row shards of each distillation batch.
    shards: usize,
}

/// A student converted from the pretrained tensors under the policy (lambda warmup over
/// `warmup` steps; 0 for post-training quantization).
fn student(s: &Setup, vm: &VarMap, warmup: usize) -> Result<BertEncoder> {
    let mut policy = s.policy.clone();
    if warmup > 0 {
        policy.default.lambda = LambdaSchedule::Linear { steps: warmup };
    }
    BertEncoder::new(s.config.clone(), &Converter::new(s.tensors, vm, policy))
}

/// Trains one mode; returns its fidelity on the validation lines, the training seconds and the
/// trained encoder.
fn train(s: &Setup, mode: Mode) -> Result<(Fidelity, f64, BertEncoder)> {
    let args = s.args;
    let name = mode.name();
    let warmup = args.warmup_steps.unwrap_or(args.steps / 4).max(1);
    let vm = VarMap::new();
    let enc = student(s, &vm, warmup)?;
    let word = vm.data().lock().expect("VarMap lock")[WORD_EMBEDDINGS]
        .as_tensor()
        .id();
    let vars: Vec<_> = checkpoint::sorted_vars(&vm)
        .into_iter()
        .filter(|v| args.train_embeddings || v.as_tensor().id() != word)
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
    bar.set_prefix(name);
    bar.set_position(start as u64);
    let t0 = Instant::now();
    let mut result = None;
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
            Mode::Distill => sharded_backward(&[&ids, &mask], s.shards, |b| {
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
            let f = Fidelity::measure(&sv, s.teacher_val)?;
            let rec = serde_json::json!({
                "mode": name, "step": step + 1, "loss": l.to_scalar::<f32>()?,
                "val_cosine": f.cosine, "val_top1": f.top1, "val_top5": f.top5,
                "seconds": t0.elapsed().as_secs_f64(),
            });
            bar.suspend(|| println!("{rec}"));
            append_json_line(&args.log, &rec)?;
            result = Some(f);
            if let Some(dir) = save {
                let state = TrainingState {
                    step: (step + 1) as u64,
                    extra: serde_json::json!({ "mode": name }),
                    rng: Some(RngState::capture(&rng)),
                };
                checkpoint::save_with_optimizer(dir, &vm, &opt, &state)?;
            }
        }
    }
    bar.finish_and_clear();
    // A resumed run that had nothing left to train is still measured.
    enc.set_step(args.steps);
    let f = match result {
        Some(f) => f,
        None => Fidelity::measure(&embed_all(&enc, s.tok, s.val, args.max_len)?, s.teacher_val)?,
    };
    Ok((f, t0.elapsed().as_secs_f64(), enc))
}

/// Writes the encoder's quantized linears to `--out` and returns the summary's size fields.
fn export(
    args: &Args,
    enc: &BertEncoder,
    tensors: &HashMap<String, Tensor>,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let layers = enc.qat_layers();
    let packed: Vec<PackedLayer> = layers
        .iter()
        .map(|l| l.to_packed_layer())
        .collect::<Result<_>>()?;
    let named: Vec<(&str, &PackedLayer)> = layers.iter().map(|l| l.name()).zip(&packed).collect();
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(candle_core::Error::wrap)?;
    }
    save_packed_layers(&args.out, &named)?;
    let packed_bytes = std::fs::metadata(&args.out)
        .map_err(candle_core::Error::wrap)?
        .len();
    let f32_bytes = |prefix: &str| -> usize {
        tensors
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, t)| t.elem_count() * 4)
            .sum()
    };
    // Linears: weights and biases of the encoder layers; LayerNorms are the rank-1 rest there.
    let linear_bytes: usize = precision::linear_sizes(tensors)
        .iter()
        .map(|(name, n)| {
            4 * (n + tensors
                .get(&format!("{name}.bias"))
                .map_or(0, |b| b.elem_count()))
        })
        .sum();
    let mut bits_histogram = serde_json::Map::new();
    for p in &packed {
        let e = bits_histogram
            .entry(p.bits().to_string())
            .or_insert(0.into());
        *e = (e.as_u64().unwrap_or(0) + 1).into();
    }
    println!(
        "packed linears: {packed_bytes} bytes ({:.1}x smaller than their {linear_bytes} f32 bytes) -> {}",
        linear_bytes as f64 / packed_bytes as f64,
        args.out.display()
    );
    let mut m = serde_json::Map::new();
    m.insert("packed_bytes".into(), packed_bytes.into());
    m.insert("packed_layers_by_bits".into(), bits_histogram.into());
    m.insert("f32_linear_bytes".into(), linear_bytes.into());
    m.insert(
        "f32_embedding_bytes".into(),
        f32_bytes("embeddings.").into(),
    );
    m.insert(
        "f32_layernorm_bytes".into(),
        (f32_bytes("encoder.layer.") - linear_bytes).into(),
    );
    Ok(m)
}

fn main() -> Result<()> {
    let args = Args::parse_checked();
    let model = args.model_dir().unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(2);
    });
    bitnet::core::host_alloc::keep_freed_memory();
    let shards = args.shards.unwrap_or(if args.relation_weight > 0.0 {
        1
    } else {
        common::rayon_threads()
    });
    // With a shard per core, candle's elementwise pool would compete with the shards for the
    // cores (see bitnet::core::host_threads); unsharded, its parallelism is what pays.
    if shards > 1 && args.mode != Mode::Qat {
        if let Err(e) = bitnet::core::host_threads::elementwise_on_caller() {
            eprintln!("note: {e}");
        }
    }
    let config = BertConfig::load(model.join("config.json"))?;
    let tensors = load_safetensors(model.join("model.safetensors"))?;
    let mut tok = Tokenizer::from_file(model.join("tokenizer.json")).map_err(|e| {
        candle_core::Error::msg(format!("{}: {e}", model.join("tokenizer.json").display()))
    })?;
    // The file pads every input to 128; batches are padded here, to their own longest line.
    tok.with_padding(None);
    let corpus = shakespeare::load(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/data/shakespeare/shakespeare.txt.gz"
        ),
        10_000,
    )?;
    let train_lines = lines(&corpus.train);
    let val_lines = lines(&corpus.valid);
    let val: Vec<&str> = val_lines
        .iter()
        .take(args.val)
        .map(String::as_str)
        .collect();
    println!(
        "{} training lines, {} validation lines, model {}",
        train_lines.len(),
        val.len(),
        model.display()
    );

    let tvm = VarMap::new();
    let fp = PrecisionPolicy::new(QATConfig::full_precision());
    let teacher = BertEncoder::new(config.clone(), &Converter::new(&tensors, &tvm, fp))?;
    let teacher_val = embed_all(&teacher, &tok, &val, args.max_len)?;
    let choice = precision::choose(&precision::Inputs {
        args: &args,
        config: &config,
        tensors: &tensors,
        tok: &tok,
        train: &train_lines,
        teacher: &teacher,
    })?;
    let sizes = precision::linear_sizes(&tensors);
    let avg_bits = choice
        .policy
        .average_bits(sizes.iter().map(|(n, c)| (n.as_str(), *c)));
    let wide: Vec<String> = sizes
        .iter()
        .filter(|(n, _)| choice.policy.config_for(n).weight != choice.policy.default.weight)
        .map(|(n, _)| n.clone())
        .collect();
    println!(
        "precision: {} policy, {} of {} linears not at the default scheme, {avg_bits:.4} bits per weight on average",
        choice.source,
        wide.len(),
        sizes.len()
    );
    if let Some(path) = &args.write_policy {
        let text = choice.policy.to_toml_string()?;
        std::fs::write(path, text)
            .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))?;
    }
    let setup = Setup {
        args: &args,
        config: &config,
        tensors: &tensors,
        tok: &tok,
        train: &train_lines,
        val: &val,
        teacher: &teacher,
        teacher_val: &teacher_val,
        policy: &choice.policy,
        shards,
    };
    let modes = match args.mode {
        Mode::All => vec![Mode::Ptq, Mode::Qat, Mode::Distill],
        m => vec![m],
    };
    let mut summary = serde_json::Map::new();
    let mut last: Option<BertEncoder> = None;
    for mode in modes {
        let (fid, secs) = if mode == Mode::Ptq {
            let vm = VarMap::new();
            let enc = student(&setup, &vm, 0)?;
            let f = Fidelity::measure(&embed_all(&enc, &tok, &val, args.max_len)?, &teacher_val)?;
            last = Some(enc);
            (f, 0.0)
        } else {
            let (f, s, enc) = train(&setup, mode)?;
            last = Some(enc);
            (f, s)
        };
        println!(
            "{:>8}: mean cosine {:.4}, top-1 agreement {:.1} %, top-5 {:.1} %, {secs:.0} s",
            mode.name(),
            fid.cosine,
            fid.top1 * 100.0,
            fid.top5 * 100.0
        );
        let mut rec = fid.json();
        rec["train_seconds"] = secs.round().into();
        append_json_line(
            &args.log,
            &serde_json::json!({ "mode": mode.name(), "final": rec }),
        )?;
        summary.insert(mode.name().to_string(), rec);
    }
    summary.insert("policy".into(), choice.source.into());
    summary.insert("avg_bits".into(), ((avg_bits * 1e4).round() / 1e4).into());
    summary.insert("wide_layers".into(), wide.into());
    if let Some(r) = &choice.report {
        let ranked: Vec<_> = r
            .ranked()
            .iter()
            .map(|l| serde_json::json!([l.name, (l.loss_delta * 1e6).round() / 1e6]))
            .collect();
        summary.insert("sensitivity".into(), ranked.into());
    }
    if let Some(enc) = last {
        summary.extend(export(&args, &enc, &tensors)?);
    }
    summary.insert(
        "command".into(),
        std::env::args()
            .skip(1)
            .collect::<Vec<_>>()
            .join(" ")
            .into(),
    );
    println!("{}", serde_json::Value::Object(summary));
    Ok(())
}
