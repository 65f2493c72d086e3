//! Reference models the examples train, export and test: [`MnistMlp`], [`char_lm::CharLm`],
//! [`bert::BertEncoder`] (a pretrained sentence encoder converted for QAT) and
//! [`bitnet::BitNetForCausalLM`] (Hugging Face's BitNet b1.58 decoder).

pub mod bert;
pub mod bitnet;
pub mod char_lm;

use bitnet_training::state::Tracked;
use bitnet_training::{QATConfig, QATLayer};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// The MNIST MLP of `examples/train_mnist`: 784-256-256-10, every layer a
/// `QATLayer<BitLinear>` named `fc1`, `fc2`, `fc3`, ReLU between them.
///
/// ```
/// use bitnet::models::MnistMlp;
/// use bitnet::training::QATConfig;
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// # fn main() -> candle_core::Result<()> {
/// let vm = VarMap::new();
/// let model = MnistMlp::new(QATConfig::ternary(), VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
/// let logits = model.forward(&Tensor::zeros((2, 784), DType::F32, &Device::Cpu)?)?;
/// assert_eq!(logits.dims(), &[2, 10]);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct MnistMlp {
    /// `fc1`, `fc2`, `fc3`.
    pub layers: Vec<QATLayer>,
}

impl MnistMlp {
    /// The layer sizes and names.
    pub const DIMS: [(usize, usize, &'static str); 3] =
        [(784, 256, "fc1"), (256, 256, "fc2"), (256, 10, "fc3")];

    /// Every layer under `cfg`, variables under `vb.pp(name)`.
    pub fn new(cfg: QATConfig, vb: VarBuilder) -> Result<Self> {
        let layers = Self::DIMS
            .iter()
            .map(|&(i, o, name)| QATLayer::bitlinear(i, o, cfg, vb.pp(name)))
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    /// Tells every layer's schedules the training step.
    pub fn set_step(&self, step: usize) {
        self.layers.iter().for_each(|l| l.set_step(step));
    }

    /// The layers as state-tracking sources.
    pub fn tracked(&self) -> Vec<&dyn Tracked> {
        self.layers.iter().map(|l| l as &dyn Tracked).collect()
    }

    /// The layers by reference (for [`bitnet_training::sensitivity::analyze`]).
    pub fn layer_refs(&self) -> Vec<&QATLayer> {
        self.layers.iter().collect()
    }
}

impl Module for MnistMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h)?;
            if i + 1 < self.layers.len() {
                // One pass each way instead of candle's five-op ReLU backward.
                h = bitnet_quant::ops::relu::relu(&h)?;
            }
        }
        Ok(h)
    }
}

/// The share of `labels` that `model` predicts (argmax of its logits), in chunks of 1000 rows.
pub fn accuracy(model: &impl Module, images: &Tensor, labels: &Tensor) -> Result<f64> {
    Ok(correct(model, images, labels)? as f64 / images.dim(0)? as f64)
}

/// How many of `labels` `model` predicts, in chunks of 1000 rows.
pub fn correct(model: &impl Module, images: &Tensor, labels: &Tensor) -> Result<usize> {
    let n = images.dim(0)?;
    let mut correct = 0usize;
    for start in (0..n).step_by(1000) {
        let len = 1000.min(n - start);
        let pred = model
            .forward(&images.narrow(0, start, len)?)?
            .argmax(D::Minus1)?;
        let ok = pred
            .eq(&labels.narrow(0, start, len)?)?
            .to_dtype(DType::F32)?;
        correct += ok.sum_all()?.to_scalar::<f32>()? as usize;
    }
    Ok(correct)
}
