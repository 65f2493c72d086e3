//! Generate text with a Hugging Face BitNet b1.58 model (`BitNetForCausalLM`, e.g.
//! microsoft/bitnet-b1.58-2B-4T) on our packed 2-bit kernels.
//!
//! ```sh
//! cargo run --release --example bitnet_generate -- --hf path/to/checkpoint --prompt "Hello"
//! cargo run --release --features hub --example bitnet_generate -- \
//!     --hf-repo microsoft/bitnet-b1.58-2B-4T --prompt "The capital of France is"
//! # the same model with f32 weights and candle's GEMM, for comparison:
//! cargo run --release --example bitnet_generate -- --hf path/to/checkpoint --prompt "Hello" --f32
//! # a GGUF file of llama.cpp's `bitnet` architecture (TQ1_0, TQ2_0, I2_S), its tokenizer from
//! # the file's metadata; the blocks are converted to our packed layout at load:
//! cargo run --release --example bitnet_generate -- --gguf model-tq2_0.gguf --prompt "Hello"
//! # on a CUDA GPU, packed kernels against the same model in bf16 with cuBLAS:
//! cargo run --release --features cuda --example bitnet_generate -- --hf DIR --prompt "Hello" --device cuda
//! cargo run --release --features cuda --example bitnet_generate -- --hf DIR --prompt "Hello" --device cuda --f32 --dtype bf16
//! ```
//! The text is streamed as it is generated; the last line is one JSON object:
//! `{"prompt_tokens": [...], "new_tokens": [...], "prompt_last_logits": [first K logits at the prompt's last position],
//! "prompt_tokens_per_s": .., "tokens_per_s": .., "threads": .., "weights_bytes": ..,
//! "peak_rss_bytes": ..}`. Every flag with its default: `--help`.

use bitnet::io::gguf::{GgufModel, SpmTokenizer};
use bitnet::io::hf::HfCheckpoint;
use bitnet::models::bitnet::{generate, BitNetForCausalLM, GenerateConfig, Runtime};
use candle_core::{DType, Result};
use clap::Parser;
use std::io::Write;
use std::path::PathBuf;

mod common;

#[derive(Debug, Parser)]
#[command(about = "Generate text with a Hugging Face BitNet b1.58 model on packed 2-bit kernels")]
struct Args {
    /// A checkpoint directory (config.json, model.safetensors or shards, tokenizer.json).
    #[arg(long, required_unless_present_any = ["hf_repo", "gguf"], conflicts_with_all = ["hf_repo", "gguf"])]
    hf: Option<PathBuf>,
    /// A GGUF file of llama.cpp's `bitnet` architecture (tokenizer from its metadata).
    #[arg(long, conflicts_with = "hf_repo")]
    gguf: Option<PathBuf>,
    /// With --gguf: the feed-forward activation, `relu2` (transformers' BitNetForCausalLM, the
    /// default) or `silu` (what llama.cpp's `bitnet` graph computes; the file does not say).
    #[arg(long, requires = "gguf", default_value = "relu2")]
    hidden_act: String,
    /// A Hugging Face Hub repository, fetched into the local Hub cache (needs `--features hub`).
    #[arg(long)]
    hf_repo: Option<String>,
    /// The prompt, tokenized with the checkpoint's tokenizer.json.
    #[arg(
        long,
        required_unless_present = "token_ids",
        conflicts_with = "token_ids"
    )]
    prompt: Option<String>,
    /// The prompt as token ids, e.g. `1,2,3`.
    #[arg(long, value_delimiter = ',')]
    token_ids: Option<Vec<u32>>,
    /// Tokens to generate.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative_f64)]
    temperature: f64,
    /// Nucleus sampling: keep the most likely tokens up to this probability (1 keeps all).
    #[arg(long, default_value_t = 1.0, value_parser = common::unit_f64)]
    top_p: f64,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Threads for the kernels and candle (default: all cores).
    #[arg(long, value_parser = common::positive_usize)]
    threads: Option<usize>,
    /// How many of the prompt's last-position logits the JSON line reports.
    #[arg(long, default_value_t = 8)]
    logits: usize,
    /// Run the same model with f32 weights (scale * code) and candle's GEMM instead of the
    /// packed kernels (with `--dtype bf16`, bf16 weights).
    #[arg(long)]
    f32: bool,
    /// cpu, auto, cuda[:N] (packed inference runs on the CPU and, with the `cuda` feature, on
    /// CUDA GPUs; `--f32` also on metal[:N] with the `metal` feature).
    #[arg(long, default_value = "cpu")]
    device: bitnet::core::device::Preference,
    /// The dtype of the embedding and output head, and with `--f32` of every projection's
    /// weight: `auto` (the file's own 16-bit type for the embedding when it has one, which keeps
    /// every value and halves the head's reads per token; f32 with `--f32`), f32, bf16 or f16.
    #[arg(long, value_enum, default_value_t = WeightDtype::Auto)]
    dtype: WeightDtype,
}

/// `--dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum WeightDtype {
    Auto,
    F32,
    Bf16,
    F16,
}

impl WeightDtype {
    /// The dtype, given the one the file stores the embedding in and whether `--f32` is on.
    fn resolve(self, stored: Option<DType>, dense: bool) -> DType {
        match (self, stored) {
            (WeightDtype::F32, _) => DType::F32,
            (WeightDtype::Bf16, _) => DType::BF16,
            (WeightDtype::F16, _) => DType::F16,
            (WeightDtype::Auto, Some(d @ (DType::BF16 | DType::F16))) if !dense => d,
            (WeightDtype::Auto, _) => DType::F32,
        }
    }
}

fn non_negative_f64(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        Ok(v) => Err(format!("{v} is not a finite number >= 0")),
        Err(e) => Err(format!("{e} (expected a finite number >= 0)")),
    }
}

fn checkpoint_dir(args: &Args) -> Result<PathBuf> {
    match (&args.hf, &args.hf_repo) {
        (Some(dir), _) => Ok(dir.clone()),
        (None, Some(repo)) => hub(repo),
        (None, None) => candle_core::bail!("give --hf DIR or --hf-repo ID"),
    }
}

#[cfg(feature = "hub")]
fn hub(repo: &str) -> Result<PathBuf> {
    bitnet::io::hf::hub::download(repo)
}

#[cfg(not(feature = "hub"))]
fn hub(repo: &str) -> Result<PathBuf> {
    candle_core::bail!("--hf-repo {repo}: this build has no Hub client; rebuild with `--features hub`, or download the repository and pass --hf DIR")
}

/// The prompt's tokenizer: a checkpoint's tokenizer.json, or a GGUF file's sentencepiece.
enum Tok {
    Hf(Box<tokenizers::Tokenizer>),
    Spm(Box<SpmTokenizer>),
}

impl Tok {
    fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Tok::Hf(t) => t.decode(ids, true).map_err(candle_core::Error::msg),
            Tok::Spm(t) => Ok(t.decode(ids, false)),
        }
    }
}

/// What [`load`] gives: the model, its tokenizer, the prompt's ids from `--prompt` or
/// `--token-ids`, and the dtype the file stores the embedding in.
type Loaded = (BitNetForCausalLM, Option<Tok>, Vec<u32>, Option<DType>);

fn load(args: &Args, runtime: Runtime) -> Result<Loaded> {
    if let Some(path) = &args.gguf {
        let g = GgufModel::open(path)?.with_hidden_act(&args.hidden_act)?;
        let tok = g.tokenizer()?;
        let prompt = match (&args.prompt, &args.token_ids, &tok) {
            (_, Some(ids), _) => ids.clone(),
            (Some(text), None, Some(t)) => {
                let mut ids: Vec<u32> = t.bos.filter(|_| t.add_bos).into_iter().collect();
                ids.extend(t.encode(text));
                ids
            }
            (Some(_), None, None) => candle_core::bail!(
                "--prompt: {} has no tokenizer metadata; give --token-ids",
                path.display()
            ),
            (None, None, _) => candle_core::bail!("give --prompt TEXT or --token-ids 1,2,3"),
        };
        return Ok((
            g.load_model(runtime)?,
            tok.map(|t| Tok::Spm(Box::new(t))),
            prompt,
            g.stored_dtype("token_embd.weight"),
        ));
    }
    let dir = checkpoint_dir(args)?;
    let ckpt = HfCheckpoint::open(&dir)?;
    let tokenizer = match ckpt.tokenizer_path() {
        Some(p) => Some(tokenizers::Tokenizer::from_file(p).map_err(candle_core::Error::msg)?),
        None => None,
    };
    let prompt: Vec<u32> = match (&args.prompt, &args.token_ids) {
        (_, Some(ids)) => ids.clone(),
        (Some(text), None) => {
            let tok = tokenizer.as_ref().ok_or_else(|| {
                candle_core::Error::msg(format!(
                    "--prompt: {} has no tokenizer.json; give --token-ids",
                    dir.display()
                ))
            })?;
            let mut ids = tok
                .encode(text.as_str(), true)
                .map_err(candle_core::Error::msg)?
                .get_ids()
                .to_vec();
            // Llama-3-style tokenizers add the beginning-of-text token themselves; others don't.
            if let Some(bos) = ckpt.config().bos_token_id {
                if ids.first() != Some(&bos) && tok.id_to_token(bos).is_some() {
                    ids.insert(0, bos);
                }
            }
            ids
        }
        (None, None) => candle_core::bail!("give --prompt TEXT or --token-ids 1,2,3"),
    };
    Ok((
        ckpt.load_model(runtime)?,
        tokenizer.map(|t| Tok::Hf(Box::new(t))),
        prompt,
        ckpt.stored_dtype("model.embed_tokens.weight"),
    ))
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(n) = args.threads {
        // Before any thread starts: candle's GEMM reads the variable, our kernels use rayon.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(candle_core::Error::wrap)?;
    }
    let runtime = if args.f32 {
        Runtime::Dense
    } else {
        Runtime::Packed
    };
    let selected = bitnet::core::device::select_with_reason(args.device)
        .map_err(|e| candle_core::Error::Msg(format!("--device: {e}")))?;
    eprintln!("device: {} ({})", selected.info.name, selected.reason);
    let (model, tokenizer, prompt, stored) = load(&args, runtime)?;
    let dtype = args.dtype.resolve(stored, args.f32);
    let model = model
        .to_weight_dtype(dtype)?
        .to_device(&selected.device)
        .map_err(|e| candle_core::Error::Msg(format!("--device {}: {e}", selected.info.name)))?;
    let cfg = GenerateConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: None,
        top_p: Some(args.top_p),
        seed: args.seed,
        stop_tokens: model.config().eos_token_ids(),
    };
    let mut stdout = std::io::stdout();
    let mut so_far: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let out = generate(&model, &prompt, &cfg, |t| {
        so_far.push(t);
        match &tokenizer {
            Some(tok) => {
                // Decode the whole continuation and print what is new: a token may complete a
                // multi-byte character only together with the next one.
                let text = tok.decode(&so_far)?;
                if text.len() > printed
                    && text.is_char_boundary(printed)
                    && !text.ends_with('\u{fffd}')
                {
                    print!("{}", &text[printed..]);
                    printed = text.len();
                }
            }
            None => print!("{t} "),
        }
        stdout.flush().map_err(candle_core::Error::wrap)?;
        Ok(true)
    })?;
    println!();
    let k = args.logits.min(model.config().vocab_size);
    let logits = out.prompt_logits.narrow(0, 0, k)?.to_vec1::<f32>()?;
    let decoded = out.tokens.len().saturating_sub(1);
    println!(
        "{}",
        serde_json::json!({
            "prompt_tokens": prompt,
            "new_tokens": out.tokens,
            "prompt_last_logits": logits,
            "prompt_tokens_per_s": prompt.len() as f64 / out.prefill_secs.max(1e-9),
            // The first new token comes from the prefill's logits; the others each cost one
            // forward of one token.
            "tokens_per_s": if decoded > 0 { decoded as f64 / out.decode_secs.max(1e-9) } else { 0.0 },
            "threads": rayon::current_num_threads(),
            "weights_bytes": model.weights_bytes(),
            "runtime": if args.f32 { "f32" } else { "packed" },
            "device": selected.info.name,
            "dtype": format!("{dtype:?}").to_lowercase(),
            "peak_rss_bytes": common::peak_rss_json(),
        })
    );
    Ok(())
}
