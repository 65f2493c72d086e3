//! The command line: every flag with its default in `--help`, bad values rejected by clap with
//! the flag's name, and the model directory looked up where a user would keep it.

use clap::{Parser, ValueEnum};
use std::path::{Path, PathBuf};

/// Convert all-MiniLM-L6-v2 to 1.58 bits (or a mixed precision) and measure how close the
/// student's sentence embeddings stay to the full-precision model's.
#[derive(Parser, Debug, Clone)]
#[command(name = "ternarize_minilm")]
pub struct Args {
    /// Model directory (config.json, model.safetensors, tokenizer.json). Unset: $BITNET_MINILM_DIR,
    /// then ../shared/models/all-MiniLM-L6-v2 from the current directory, then the Hugging Face
    /// cache (~/.cache/huggingface/hub/models--sentence-transformers--all-MiniLM-L6-v2).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// What to run: post-training quantization, QAT without a teacher, distillation, or all three.
    #[arg(long, value_enum, default_value_t = Mode::All)]
    pub mode: Mode,
    /// Training steps (qat and distill).
    #[arg(long, default_value_t = 200, value_parser = at_least::<1>)]
    pub steps: usize,
    /// Sentences per step.
    #[arg(long, default_value_t = 32, value_parser = at_least::<2>)]
    pub batch: usize,
    /// Tokens per sentence, at most (longer lines are cut).
    #[arg(long, default_value_t = 64, value_parser = at_least::<1>)]
    pub max_len: usize,
    /// Peak learning rate (cosine decay to 0).
    #[arg(long, default_value_t = 5e-4, value_parser = positive)]
    pub lr: f64,
    /// Steps of the lambda warmup (0 -> 1) [default: a quarter of --steps].
    #[arg(long, value_parser = at_least::<1>)]
    pub warmup_steps: Option<usize>,
    /// Seed of the batch draws (and of --keep-random's draw).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Validation lines (from the last 10 % of the corpus).
    #[arg(long, default_value_t = 500, value_parser = at_least::<6>)]
    pub val: usize,
    /// Evaluate (and checkpoint, with --save) every N steps.
    #[arg(long, default_value_t = 50, value_parser = at_least::<1>)]
    pub eval_every: usize,
    /// JSON-lines log of the evaluations.
    #[arg(long, default_value = "runs/minilm.jsonl")]
    pub log: PathBuf,
    /// Checkpoint directory (written every --eval-every steps).
    #[arg(long, value_name = "DIR")]
    pub save: Option<PathBuf>,
    /// Continue the run checkpointed in DIR (needs --mode qat or distill).
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// The packed linears of the last mode (any precision the policy uses).
    #[arg(long, default_value = "runs/minilm-packed.safetensors")]
    pub out: PathBuf,
    /// One absmean/absmax weight scale per output row instead of one per tensor.
    #[arg(long)]
    pub per_channel: bool,
    /// Weight of per-layer hidden-state matching in distill mode.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    pub hidden_weight: f64,
    /// Weight of relation distillation in distill mode (needs --shards 1).
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    pub relation_weight: f64,
    /// Row shards of each distillation batch, run side by side [default: one per rayon thread;
    /// 1 with --relation-weight].
    #[arg(long, value_parser = at_least::<1>)]
    pub shards: Option<usize>,
    /// Train the word embeddings too (frozen by default; they are 30522 x 384 values).
    #[arg(long)]
    pub train_embeddings: bool,
    /// Per-layer precision from a PrecisionPolicy file (TOML, or JSON by extension): glob rules
    /// over layer names such as encoder.layer.3.output.dense. Its lambda schedule is replaced by
    /// the warmup, and --per-channel applies to its default.
    #[arg(long, value_name = "FILE", group = "precision")]
    pub policy: Option<PathBuf>,
    /// The policy the sensitivity analysis proposes under an average of BITS bits per weight
    /// over the linears (ternary counts log2(3) = 1.58): the most sensitive layers at
    /// --wide-bits while the budget allows.
    #[arg(long, value_name = "BITS", value_parser = positive, group = "precision")]
    pub auto_policy: Option<f64>,
    /// The K layers the sensitivity analysis ranks most sensitive at --wide-bits, the rest ternary.
    #[arg(long, value_name = "K", group = "precision")]
    pub keep_sensitive: Option<usize>,
    /// K layers drawn at random (--seed) at --wide-bits, with the same sizes as the K most
    /// sensitive (so the same bits): the baseline the ranking must beat.
    #[arg(long, value_name = "K", group = "precision")]
    pub keep_random: Option<usize>,
    /// Weight bits of the layers kept wider by --auto-policy, --keep-sensitive, --keep-random.
    #[arg(long, default_value_t = 8, value_parser = four_or_eight)]
    pub wide_bits: u8,
    /// Sentences (from the training lines) the sensitivity analysis measures 1 - cos on.
    #[arg(long, default_value_t = 64, value_parser = at_least::<2>)]
    pub sensitivity_lines: usize,
    /// Write the policy in use to FILE (TOML), for --policy.
    #[arg(long, value_name = "FILE")]
    pub write_policy: Option<PathBuf>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Ptq,
    Qat,
    Distill,
    All,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Ptq => "ptq",
            Mode::Qat => "qat",
            Mode::Distill => "distill",
            Mode::All => "all",
        }
    }
}

fn at_least<const MIN: usize>(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(v) if v >= MIN => Ok(v),
        Ok(v) => Err(format!("must be at least {MIN}, got {v}")),
        Err(e) => Err(e.to_string()),
    }
}

fn four_or_eight(s: &str) -> Result<u8, String> {
    match s {
        "4" => Ok(4),
        "8" => Ok(8),
        _ => Err("must be 4 or 8 (the packed multi-bit widths)".into()),
    }
}

fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v >= 0.0 && v.is_finite() => Ok(v),
        Ok(v) => Err(format!("must be a finite number >= 0, got {v}")),
        Err(e) => Err(e.to_string()),
    }
}

fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        Ok(v) => Err(format!("must be a finite number > 0, got {v}")),
        Err(e) => Err(e.to_string()),
    }
}

impl Args {
    /// Parses the command line; combinations clap cannot express are checked here, with the
    /// same exit code (2) and the flags named.
    pub fn parse_checked() -> Self {
        let a = Self::parse();
        let fail = |msg: &str| -> ! {
            use clap::CommandFactory;
            Self::command()
                .error(clap::error::ErrorKind::ArgumentConflict, msg)
                .exit()
        };
        if a.relation_weight > 0.0 && a.shards.is_some_and(|n| n > 1) {
            fail("--relation-weight compares every pair of sentences in the batch: it needs --shards 1");
        }
        if a.resume.is_some() && !matches!(a.mode, Mode::Qat | Mode::Distill) {
            fail("--resume continues one mode: give --mode qat or --mode distill");
        }
        a
    }

    /// The model directory: `--model`, else the first of `$BITNET_MINILM_DIR`,
    /// `../shared/models/all-MiniLM-L6-v2` and the Hugging Face cache's snapshots that holds a
    /// `model.safetensors`; an error lists every place it looked.
    pub fn model_dir(&self) -> Result<PathBuf, String> {
        if let Some(dir) = &self.model {
            return Ok(dir.clone());
        }
        let mut candidates: Vec<PathBuf> = std::env::var_os("BITNET_MINILM_DIR")
            .map(PathBuf::from)
            .into_iter()
            .collect();
        candidates.push(PathBuf::from("../shared/models/all-MiniLM-L6-v2"));
        let hub = std::env::var_os("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HF_HOME").map(|h| Path::new(&h).join("hub")))
            .or_else(|| {
                std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/huggingface/hub"))
            });
        let snapshots = hub.map(|h| {
            h.join("models--sentence-transformers--all-MiniLM-L6-v2")
                .join("snapshots")
        });
        if let Some(s) = &snapshots {
            let mut found: Vec<PathBuf> = std::fs::read_dir(s)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .collect();
            found.sort();
            candidates.extend(found);
        }
        if let Some(dir) = candidates
            .iter()
            .find(|d| d.join("model.safetensors").is_file())
        {
            return Ok(dir.clone());
        }
        let mut looked: Vec<String> = candidates.iter().map(|d| d.display().to_string()).collect();
        if let Some(s) = snapshots {
            looked.push(format!("{}/*", s.display()));
        }
        Err(format!(
            "all-MiniLM-L6-v2 not found (no model.safetensors in: {}); pass --model DIR",
            looked.join(", ")
        ))
    }
}
