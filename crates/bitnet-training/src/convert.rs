//! Converting a pretrained full-precision model into a QAT model (the Hugging Face "fine-tune to
//! 1.58 bit" starting point).
//!
//! A [`Converter`] holds the pretrained tensors (e.g. a `model.safetensors`), a `VarMap` that
//! receives trainable copies of them **under the same names** (so checkpoints of the converted
//! model load into the original architecture and back), and a [`PrecisionPolicy`]. The model's
//! constructor asks it for each piece by name:
//!
//! * [`Converter::linear`]: `name.weight` (`[out, in]`) and, if present, `name.bias` become a
//!   `QATLayer<BitLinear>` when the policy gives the layer a weight scheme, else a plain
//!   `candle_nn::Linear` (full precision). The BitLinear has no inner RMSNorm (the pretrained
//!   function has none) and starts from the pretrained weight as its latent weight; with a lambda
//!   warmup from 0 the converted model starts out computing exactly the pretrained function.
//! * [`Converter::tensor`]: any other parameter (embeddings, norms), copied bit for bit and
//!   trained in full precision.
//!
//! ```
//! use bitnet_training::convert::Converter;
//! use bitnet_training::policy::PrecisionPolicy;
//! use bitnet_training::QATConfig;
//! use candle_core::{Device, Module, Tensor};
//! use candle_nn::VarMap;
//! use std::collections::HashMap;
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! let pretrained = HashMap::from([
//!     ("fc.weight".to_string(), Tensor::randn(0f32, 1.0, (4, 8), &dev)?),
//!     ("fc.bias".to_string(), Tensor::zeros(4, candle_core::DType::F32, &dev)?),
//!     ("head.weight".to_string(), Tensor::randn(0f32, 1.0, (2, 4), &dev)?),
//! ]);
//! let policy = PrecisionPolicy::new(QATConfig::ternary()).rule("head", None, None);
//! let vm = VarMap::new();
//! let conv = Converter::new(&pretrained, &vm, policy);
//! let (fc, head) = (conv.linear("fc")?, conv.linear("head")?);
//! assert!(fc.qat().is_some() && head.qat().is_none()); // head stays full precision
//! let y = head.forward(&fc.forward(&Tensor::ones((3, 8), candle_core::DType::F32, &dev)?)?)?;
//! assert_eq!(y.dims(), &[3, 2]);
//! assert_eq!(vm.all_vars().len(), 3); // trainable copies, under the pretrained names
//! # Ok(()) }
//! ```

use crate::policy::PrecisionPolicy;
use crate::qat_layer::QATLayer;
use bitnet_quant::{BitLinear, BitLinearConfig};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder, VarMap};
use std::collections::HashMap;
use std::path::Path;

/// Reads every tensor of a safetensors file into memory (on the CPU), for [`Converter::new`].
pub fn load_safetensors(path: impl AsRef<Path>) -> Result<HashMap<String, Tensor>> {
    let path = path.as_ref();
    candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))
}

/// See the module docs.
pub struct Converter<'a> {
    pretrained: &'a HashMap<String, Tensor>,
    vm: &'a VarMap,
    policy: PrecisionPolicy,
}

/// A converted linear layer: quantization-aware or full precision, as the policy said.
#[derive(Debug)]
pub enum ConvertedLinear {
    /// Trained with quantization in the loop (boxed: a QAT layer is large, a Linear two handles).
    Quantized(Box<QATLayer>),
    /// Kept in full precision.
    FullPrecision(candle_nn::Linear),
}

impl ConvertedLinear {
    /// The QAT layer, when the layer is quantized.
    pub fn qat(&self) -> Option<&QATLayer> {
        match self {
            ConvertedLinear::Quantized(q) => Some(q),
            ConvertedLinear::FullPrecision(_) => None,
        }
    }
}

impl Module for ConvertedLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            ConvertedLinear::Quantized(q) => q.forward(x),
            ConvertedLinear::FullPrecision(l) => l.forward(x),
        }
    }
}

impl<'a> Converter<'a> {
    /// A converter reading `pretrained` and writing trainable copies into `vm`.
    pub fn new(
        pretrained: &'a HashMap<String, Tensor>,
        vm: &'a VarMap,
        policy: PrecisionPolicy,
    ) -> Self {
        Self {
            pretrained,
            vm,
            policy,
        }
    }

    /// The policy layers are converted under.
    pub fn policy(&self) -> &PrecisionPolicy {
        &self.policy
    }

    /// The pretrained tensor `name` itself (not a trainable copy), e.g. for a frozen teacher.
    pub fn pretrained(&self, name: &str) -> Result<&Tensor> {
        self.pretrained
            .get(name)
            .ok_or_else(|| candle_core::Error::msg(format!("pretrained tensor `{name}` not found")))
    }

    /// A trainable f32 copy of the pretrained tensor `name`, registered in the `VarMap` under the
    /// same name; its values are bit-identical to the pretrained ones (f32 sources).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let src = self.pretrained(name)?.to_dtype(DType::F32)?;
        let var = self.vm.get(
            src.shape(),
            name,
            Init::Const(0.0),
            DType::F32,
            src.device(),
        )?;
        let data = self.vm.data().lock().expect("VarMap lock poisoned");
        data.get(name).expect("registered just above").set(&src)?;
        Ok(var)
    }

    /// The linear layer `name`; see the module docs.
    pub fn linear(&self, name: &str) -> Result<ConvertedLinear> {
        let weight = self.tensor(&format!("{name}.weight"))?;
        weight.dims2()?;
        let bias_name = format!("{name}.bias");
        let bias = match self.pretrained.contains_key(&bias_name) {
            true => Some(self.tensor(&bias_name)?),
            false => None,
        };
        let cfg = self.policy.config_for(name);
        if cfg.weight.is_none() && cfg.bit_schedule.is_none() {
            return Ok(ConvertedLinear::FullPrecision(candle_nn::Linear::new(
                weight, bias,
            )));
        }
        let inner = BitLinear::from_parts(
            weight,
            bias.clone(),
            None,
            BitLinearConfig {
                bias: bias.is_some(),
                norm: false,
                ..Default::default()
            },
        );
        let vb = VarBuilder::from_varmap(self.vm, DType::F32, inner.weight().device());
        Ok(ConvertedLinear::Quantized(Box::new(QATLayer::new(
            inner,
            cfg,
            vb.pp(name),
        )?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progressive::LambdaSchedule;
    use crate::QATConfig;
    use candle_core::Device;

    fn pretrained() -> HashMap<String, Tensor> {
        let dev = Device::Cpu;
        let t = |n: usize, shape: &[usize]| {
            let v: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
                .collect();
            Tensor::from_vec(v, shape, &dev).unwrap()
        };
        HashMap::from([
            ("enc.0.fc.weight".to_string(), t(24, &[4, 6])),
            ("enc.0.fc.bias".to_string(), t(4, &[4])),
            ("enc.0.norm.weight".to_string(), t(6, &[6])),
            ("head.weight".to_string(), t(12, &[3, 4])),
        ])
    }

    #[test]
    fn copies_are_bit_identical_trainable_and_keep_their_names() {
        let src = pretrained();
        let vm = VarMap::new();
        let conv = Converter::new(&src, &vm, PrecisionPolicy::new(QATConfig::ternary()));
        let norm = conv.tensor("enc.0.norm.weight").unwrap();
        let fc = conv.linear("enc.0.fc").unwrap();
        let head = conv.linear("head").unwrap();
        assert!(fc.qat().is_some() && head.qat().is_some());
        assert_eq!(fc.qat().unwrap().name(), "enc.0.fc");
        let mut names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
        names.sort();
        let mut want: Vec<String> = src.keys().cloned().collect();
        want.sort();
        assert_eq!(names, want);
        for (name, t) in &src {
            let copy = vm.data().lock().unwrap()[name].as_tensor().clone();
            let (a, b) = (copy.flatten_all().unwrap(), t.flatten_all().unwrap());
            let (a, b) = (a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{name}"
            );
        }
        // The copies are the variables: training them leaves the pretrained tensors alone.
        let bumped = (norm.clone() + 1.0).unwrap();
        vm.data().lock().unwrap()["enc.0.norm.weight"]
            .set(&bumped)
            .unwrap();
        let orig = src["enc.0.norm.weight"].to_vec1::<f32>().unwrap();
        assert_eq!(norm.to_vec1::<f32>().unwrap()[0], orig[0] + 1.0);
    }

    #[test]
    fn at_lambda_zero_the_converted_layer_is_the_pretrained_linear() {
        let src = pretrained();
        let vm = VarMap::new();
        let mut cfg = QATConfig::ternary();
        cfg.lambda = LambdaSchedule::Linear { steps: 100 };
        let conv = Converter::new(&src, &vm, PrecisionPolicy::new(cfg));
        let fc = conv.linear("enc.0.fc").unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, 6), &Device::Cpu).unwrap();
        // y = x W^T + b by hand.
        let want = x
            .matmul(&src["enc.0.fc.weight"].t().unwrap())
            .unwrap()
            .broadcast_add(&src["enc.0.fc.bias"])
            .unwrap();
        let diff = (fc.forward(&x).unwrap() - &want).unwrap().abs().unwrap();
        assert!(diff.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-5);
        // Fully quantized (lambda 1 at the end of the warmup) it differs.
        fc.qat().unwrap().set_step(100);
        let diff = (fc.forward(&x).unwrap() - &want).unwrap().abs().unwrap();
        assert!(diff.max_all().unwrap().to_scalar::<f32>().unwrap() > 1e-3);
    }

    #[test]
    fn policy_keeps_matching_layers_in_full_precision_and_missing_names_are_errors() {
        let src = pretrained();
        let vm = VarMap::new();
        let policy = PrecisionPolicy::new(QATConfig::ternary()).rule("head", None, None);
        let conv = Converter::new(&src, &vm, policy);
        assert!(conv.linear("head").unwrap().qat().is_none());
        assert!(conv.linear("enc.0.fc").unwrap().qat().is_some());
        let err = conv.linear("enc.1.fc").unwrap_err().to_string();
        assert!(err.contains("enc.1.fc.weight"), "{err}");
    }
}
