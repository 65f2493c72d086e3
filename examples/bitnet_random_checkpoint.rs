//! Writes a `BitNetForCausalLM` checkpoint with random weights, for speed and memory
//! measurements of `bitnet_generate` where no real model is at hand: by default the layer shapes
//! of microsoft/bitnet-b1.58-2B-4T (hidden 2560, intermediate 6912, 20 heads over 5 key/value
//! heads), a few layers and a smaller vocabulary.
//!
//! ```sh
//! cargo run --release --example bitnet_random_checkpoint -- --layers 4 --out runs/bitnet-4l
//! cargo run --release --example bitnet_generate -- --hf runs/bitnet-4l/offline --token-ids 1,2,3
//! ```
//! Writes `OUT/online` (f32 latent weights) and `OUT/offline` (packed codes); the last line is
//! one JSON object with the files' sizes. Flags: `--help`.

use bitnet::io::hf::{save, SaveForm};
use bitnet::models::bitnet::{BitNetForCausalLM, Config};
use bitnet::training::QATConfig;
use candle_core::{DType, Device, Result};
use candle_nn::{VarBuilder, VarMap};
use clap::Parser;
use std::path::PathBuf;

mod common;

#[derive(Debug, Parser)]
#[command(
    about = "Write a random BitNetForCausalLM checkpoint with bitnet-b1.58-2B-4T's layer shapes"
)]
struct Args {
    /// Decoder layers (the real model has 30).
    #[arg(long, default_value_t = 4, value_parser = common::positive_usize)]
    layers: usize,
    /// Vocabulary size (the real model has 128256).
    #[arg(long, default_value_t = 32000, value_parser = common::positive_usize)]
    vocab: usize,
    /// Seed of the weights.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// The output folder (OUT/online, OUT/offline).
    #[arg(long)]
    out: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let cfg = Config::b158_2b_shapes(args.layers, args.vocab);
    let vm = VarMap::new();
    let model = BitNetForCausalLM::new(
        &cfg,
        QATConfig::ternary_hf(),
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )?;
    bitnet::training::init::reseed(&vm, args.seed)?;
    let mut sizes = serde_json::Map::new();
    for (form, name) in [(SaveForm::Online, "online"), (SaveForm::Offline, "offline")] {
        let dir = args.out.join(name);
        save(&model, &dir, form, DType::F32, None)?;
        let bytes = std::fs::metadata(dir.join("model.safetensors"))
            .map_err(candle_core::Error::wrap)?
            .len();
        println!("{}: {bytes} bytes", dir.display());
        sizes.insert(name.into(), bytes.into());
    }
    println!(
        "{}",
        serde_json::json!({"layers": args.layers, "vocab": args.vocab, "file_bytes": sizes})
    );
    Ok(())
}
