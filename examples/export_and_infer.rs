//! From a trained QAT model to packed integer inference on MNIST (2-bit ternary or 1-bit binary).
//!
//! ```sh
//! # train and save a checkpoint, then pack it:
//! cargo run --release --example train_mnist -- --mode ternary --save runs/ternary
//! cargo run --release --example export_and_infer -- --checkpoint runs/ternary
//! # or let this example train a quick model itself (2 epochs) when no checkpoint is given:
//! cargo run --release --example export_and_infer
//! ```
//! Every flag with its default: `--help`.
//!
//! It prints the size of the f32 model (latent weights and norm gains as safetensors) against the
//! packed file's, the test accuracy of the QAT
//! model and of the packed model loaded back from disk (they must agree; the process exits with
//! an error otherwise), and images per second of both forwards. The last line is a JSON summary.

use bitnet::datasets::mnist;
use bitnet::models::{correct, MnistMlp};
use bitnet::quant::packed::{load_packed, save_packed};
use bitnet::quant::PackedBitLinear;
use bitnet::training::checkpoint;
use bitnet::training::optim::{ParamsQatAdamW, QatAdamW};
use bitnet::training::QATConfig;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{loss, Optimizer, VarBuilder, VarMap};
use std::path::PathBuf;
use std::time::Instant;

mod common;

/// Pack a trained MNIST QAT model and run it with integer kernels.
#[derive(Debug, clap::Parser)]
#[command(long_about = None)]
struct Args {
    /// A `train_mnist --save` directory (mode ternary or binary) [default: train 2 epochs here].
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Where to write the packed model [default: mnist.packed.safetensors in the temp dir].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Epochs to train when no --checkpoint is given.
    #[arg(long, default_value_t = 2, value_parser = common::positive_usize)]
    epochs: usize,
    /// Folder with the four MNIST idx files.
    #[arg(long, default_value_os_t = common::repo_data("mnist"))]
    data: PathBuf,
}

/// The packed model: the three packed layers with ReLU between them.
struct PackedMlp(Vec<PackedBitLinear>);

impl Module for PackedMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, l) in self.0.iter().enumerate() {
            h = l.forward(&h)?;
            if i + 1 < self.0.len() {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
}

/// A quick ternary model when no checkpoint is given: Adam 1e-3, batch 128, data in file order.
fn train_quick(model: &MnistMlp, vm: &VarMap, data: &mnist::Mnist, epochs: usize) -> Result<()> {
    let mut opt = QatAdamW::new(
        checkpoint::sorted_vars(vm),
        ParamsQatAdamW {
            lr: 1e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let n = data.train_images.dim(0)?;
    for epoch in 1..=epochs {
        for start in (0..n).step_by(128) {
            let len = 128.min(n - start);
            let x = data.train_images.narrow(0, start, len)?;
            let y = data.train_labels.narrow(0, start, len)?;
            opt.backward_step(&loss::cross_entropy(&model.forward(&x)?, &y)?)?;
        }
        println!("trained epoch {epoch}/{epochs}");
    }
    Ok(())
}

/// Images per second of `model` over the test set, in batches of `batch`.
fn throughput(model: &impl Module, images: &Tensor, batch: usize, limit: usize) -> Result<f64> {
    let n = images.dim(0)?.min(limit);
    let t0 = Instant::now();
    for start in (0..n).step_by(batch) {
        model.forward(&images.narrow(0, start, batch.min(n - start))?)?;
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

fn file_size(p: &std::path::Path) -> Result<u64> {
    Ok(std::fs::metadata(p)
        .map_err(|e| candle_core::Error::msg(format!("{}: {e}", p.display())))?
        .len())
}

fn main() -> Result<()> {
    let args = <Args as clap::Parser>::parse();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("mnist.packed.safetensors"));
    bitnet::core::host_alloc::keep_freed_memory();
    if let Err(e) = bitnet::core::host_threads::elementwise_on_caller() {
        eprintln!("note: {e}");
    }
    let dev = Device::Cpu;
    let data = mnist::load(&args.data, &dev)?;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);

    // 1. The trained QAT model.
    let model = match &args.checkpoint {
        Some(dir) => {
            let state = checkpoint::read_state(dir)?;
            let cfg = match state.extra["mode"].as_str() {
                Some("ternary") => QATConfig::ternary(),
                Some("binary") => QATConfig::binary(),
                other => candle_core::bail!(
                    "{}: mode {other:?}; only ternary or binary checkpoints can be packed",
                    dir.display()
                ),
            };
            let model = MnistMlp::new(cfg, vb)?;
            checkpoint::load(dir, &vm)?;
            model
        }
        None => {
            let model = MnistMlp::new(QATConfig::ternary(), vb)?;
            bitnet::training::init::reseed(&vm, 42)?;
            train_quick(&model, &vm, &data, args.epochs)?;
            model
        }
    };
    // The f32 model as a plain safetensors file (latent weights and norm gains, no optimizer
    // state): what shipping the unpacked model would take.
    let f32_path = out.with_extension("f32.safetensors");
    vm.save(&f32_path)?;
    let f32_bytes = file_size(&f32_path)?;

    // 2. Pack, write, read back.
    let packed: Vec<PackedBitLinear> = model
        .layers
        .iter()
        .map(|l| l.to_packed())
        .collect::<Result<_>>()?;
    let named: Vec<(&str, &PackedBitLinear)> = MnistMlp::DIMS
        .iter()
        .map(|d| d.2)
        .zip(packed.iter())
        .collect();
    save_packed(&out, &named)?;
    let packed_bytes = file_size(&out)?;
    let loaded = PackedMlp(load_packed(&out)?.into_iter().map(|(_, l)| l).collect());
    let weights: usize = MnistMlp::DIMS.iter().map(|&(i, o, _)| i * o).sum();

    // 3. Accuracy of both; they must agree.
    let n = data.test_images.dim(0)?;
    let qat_ok = correct(&model, &data.test_images, &data.test_labels)?;
    let packed_ok = correct(&loaded, &data.test_images, &data.test_labels)?;
    let qat_pred = model.forward(&data.test_images)?.argmax(1)?;
    let packed_pred = loaded.forward(&data.test_images)?.argmax(1)?;
    let agree = qat_pred
        .eq(&packed_pred)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()? as usize;

    // 4. Throughput at batch 1 (first 2000 images) and batch 1000 (all).
    let qat_b1 = throughput(&model, &data.test_images, 1, 2000)?;
    let packed_b1 = throughput(&loaded, &data.test_images, 1, 2000)?;
    let qat_b1000 = throughput(&model, &data.test_images, 1000, n)?;
    let packed_b1000 = throughput(&loaded, &data.test_images, 1000, n)?;

    println!(
        "f32 model        {f32_bytes:>9} bytes ({:.2} bytes/weight)",
        f32_bytes as f64 / weights as f64
    );
    println!(
        "packed file      {packed_bytes:>9} bytes ({:.3} bytes/weight, {:.1}x smaller) -> {}",
        packed_bytes as f64 / weights as f64,
        f32_bytes as f64 / packed_bytes as f64,
        out.display()
    );
    println!(
        "test accuracy    QAT {:.4}  packed {:.4}  (predictions agree on {agree}/{n})",
        qat_ok as f64 / n as f64,
        packed_ok as f64 / n as f64
    );
    println!("images/s b=1     QAT {qat_b1:>9.0}  packed {packed_b1:>9.0}");
    println!("images/s b=1000  QAT {qat_b1000:>9.0}  packed {packed_b1000:>9.0}");
    println!(
        "{}",
        serde_json::json!({
            "f32_bytes": f32_bytes,
            "packed_bytes": packed_bytes,
            "packed_bytes_per_weight": (packed_bytes as f64 / weights as f64 * 1000.0).round() / 1000.0,
            "qat_accuracy": qat_ok as f64 / n as f64,
            "packed_accuracy": packed_ok as f64 / n as f64,
            "agree": agree,
            "peak_rss_bytes": common::peak_rss_json(),
            "images_per_s": { "qat_b1": qat_b1.round(), "packed_b1": packed_b1.round(),
                              "qat_b1000": qat_b1000.round(), "packed_b1000": packed_b1000.round() },
        })
    );
    if qat_ok != packed_ok {
        candle_core::bail!(
            "packed accuracy differs from the QAT model's: {packed_ok} vs {qat_ok} of {n}"
        );
    }
    Ok(())
}
