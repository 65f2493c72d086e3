//! Convert BitNet models between Hugging Face checkpoint directories and GGUF files.
//!
//! ```sh
//! # HF -> GGUF (llama.cpp's `bitnet` architecture; tq2_0, tq1_0 or bitnet.cpp's i2_s)
//! cargo run --release --example bitnet_convert -- --hf DIR --to-gguf model.gguf --type tq2_0
//! # GGUF -> HF (offline form: packed codes and weight_scale, which transformers loads)
//! cargo run --release --example bitnet_convert -- --gguf model.gguf --to-hf DIR
//! # GGUF -> GGUF of another type (keeps the tokenizer metadata)
//! cargo run --release --example bitnet_convert -- --gguf model.gguf --to-gguf m1.gguf --type tq1_0
//! ```
//! The tokenizer: a GGUF source's `tokenizer.*` metadata is copied; for an HF source pass
//! `--tokenizer-from FILE.gguf` to copy another file's (this converter does not translate
//! tokenizer.json into GGUF metadata), or `--byte-vocab` for a byte-level model such as
//! `char_lm`'s (token `i` is byte `i`: a sentencepiece vocabulary of `<0xNN>` byte tokens).
//! The last line is JSON: `{"out": .., "bytes": .., "tensors": ..}`.

use bitnet::io::gguf::{
    export, tokenizer_metadata, ExportOptions, GgmlType, GgufFile, GgufModel, Value,
};
use bitnet::io::hf::{save, HfCheckpoint, SaveForm};
use bitnet::models::bitnet::{BitNetForCausalLM, Runtime};
use candle_core::{DType, Result};
use clap::Parser;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(about = "Convert BitNet models between Hugging Face checkpoints and GGUF files")]
struct Args {
    /// A Hugging Face checkpoint directory to read.
    #[arg(long, conflicts_with = "gguf", required_unless_present = "gguf")]
    hf: Option<PathBuf>,
    /// A GGUF file to read.
    #[arg(long)]
    gguf: Option<PathBuf>,
    /// Write a GGUF file here.
    #[arg(long, conflicts_with = "to_hf", required_unless_present = "to_hf")]
    to_gguf: Option<PathBuf>,
    /// Write a Hugging Face checkpoint directory here.
    #[arg(long)]
    to_hf: Option<PathBuf>,
    /// The GGUF projection type: tq2_0, tq1_0 or i2_s.
    #[arg(long = "type", default_value = "tq2_0", value_parser = ternary_type)]
    ttype: GgmlType,
    /// The GGUF embedding type: f16 (llama.cpp's converter's choice), f32, bf16 or q8_0.
    #[arg(long, default_value = "f16", value_parser = float_type)]
    embed_type: GgmlType,
    /// Copy the `tokenizer.*` metadata of this GGUF file.
    #[arg(long, conflicts_with = "byte_vocab")]
    tokenizer_from: Option<PathBuf>,
    /// Write a byte-level vocabulary: token i is byte i (`<0xNN>`), as char_lm's models use.
    #[arg(long)]
    byte_vocab: bool,
    /// Write an untied output head as `output.weight` (llama.cpp's `bitnet` does not load it).
    #[arg(long)]
    untied_head: bool,
    /// `general.name`.
    #[arg(long, default_value = "bitnet")]
    name: String,
}

fn ternary_type(s: &str) -> std::result::Result<GgmlType, String> {
    match s {
        "tq2_0" => Ok(GgmlType::TQ2_0),
        "tq1_0" => Ok(GgmlType::TQ1_0),
        "i2_s" => Ok(GgmlType::I2S),
        _ => Err(format!("{s:?}: allowed tq2_0, tq1_0, i2_s")),
    }
}

fn float_type(s: &str) -> std::result::Result<GgmlType, String> {
    match s {
        "f16" => Ok(GgmlType::F16),
        "f32" => Ok(GgmlType::F32),
        "bf16" => Ok(GgmlType::BF16),
        "q8_0" => Ok(GgmlType::Q8_0),
        _ => Err(format!("{s:?}: allowed f16, f32, bf16, q8_0")),
    }
}

/// A sentencepiece vocabulary of `n` tokens whose first 256 are the bytes (`<0xNN>`, type BYTE),
/// so that llama.cpp's tokenizer maps every byte of a prompt to the token of that byte; any
/// further tokens are control tokens (`<ctrl_i>`).
fn byte_vocab(n: usize) -> Vec<(String, Value)> {
    let tokens = (0..n).map(|i| match i {
        0..=255 => format!("<0x{i:02X}>"),
        _ => format!("<ctrl_{i}>"),
    });
    let types = (0..n).map(|i| if i < 256 { 6 } else { 3 });
    vec![
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        ("tokenizer.ggml.tokens".into(), Value::strings(tokens)),
        (
            "tokenizer.ggml.scores".into(),
            Value::f32s((0..n).map(|_| 0.0)),
        ),
        ("tokenizer.ggml.token_type".into(), Value::i32s(types)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        ("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false)),
    ]
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (model, mut meta): (BitNetForCausalLM, Vec<(String, Value)>) = match (&args.hf, &args.gguf)
    {
        (Some(dir), _) => (
            HfCheckpoint::open(dir)?.load_model(Runtime::Packed)?,
            Vec::new(),
        ),
        (None, Some(f)) => {
            let g = GgufModel::open(f)?;
            (g.load_model(Runtime::Packed)?, tokenizer_metadata(g.file()))
        }
        (None, None) => candle_core::bail!("give --hf DIR or --gguf FILE"),
    };
    if let Some(f) = &args.tokenizer_from {
        meta = tokenizer_metadata(&GgufFile::open(f)?);
    }
    if args.byte_vocab {
        meta = byte_vocab(model.config().vocab_size);
    }
    let (out, bytes, tensors) = match (&args.to_gguf, &args.to_hf) {
        (Some(path), _) => {
            let opts = ExportOptions {
                ternary: args.ttype,
                embeddings: args.embed_type,
                name: args.name.clone(),
                untied_head: args.untied_head,
                extra_metadata: meta,
            };
            let w = export(&model, &opts)?;
            w.write(path)?;
            let f = GgufFile::open(path)?;
            (
                path.display().to_string(),
                std::fs::metadata(path).map_or(0, |m| m.len()),
                f.tensors().len(),
            )
        }
        (None, Some(dir)) => {
            save(&model, dir, SaveForm::Offline, DType::F32, None)?;
            let ckpt = HfCheckpoint::open(dir)?;
            let bytes = ckpt.weight_files().iter().map(|f| f.1).sum();
            (
                dir.display().to_string(),
                bytes,
                model.named_tensors().len() + model.projections().len(),
            )
        }
        (None, None) => candle_core::bail!("give --to-gguf FILE or --to-hf DIR"),
    };
    println!(
        "{}",
        serde_json::json!({"out": out, "bytes": bytes, "tensors": tensors})
    );
    Ok(())
}
