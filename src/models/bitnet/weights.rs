//! Where a model's tensors come from, whatever the file format: [`WeightSource`] and the two
//! forms a projection's weight comes in, [`ProjectionWeight`].

use bitnet_quant::{Estimator, PackedTernary, Quantizer, Scheme};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

/// A decoder projection's weight `[out, in]`, as a checkpoint stores it.
#[derive(Debug, Clone)]
pub enum ProjectionWeight {
    /// Latent full-precision values, ternarized by [`Scheme::TernaryAbsmeanHf`] in the forward.
    Latent(Tensor),
    /// Ternary codes with their scales, ready for the integer kernels.
    Packed(PackedTernary),
}

/// The weight quantizer of every projection of a Hugging Face BitNet model.
pub fn hf_weight_quantizer() -> Quantizer {
    Quantizer::new(Scheme::TernaryAbsmeanHf, Estimator::Identity)
        .expect("a valid scheme and estimator")
}

impl ProjectionWeight {
    /// The packed form: latent weights are quantized as transformers' `WeightQuant` does.
    pub fn to_packed(&self) -> Result<PackedTernary> {
        match self {
            ProjectionWeight::Packed(p) => Ok(p.clone()),
            ProjectionWeight::Latent(w) => PackedTernary::pack(w, &hf_weight_quantizer()),
        }
    }

    /// The latent form, f32 on the CPU. For packed per-tensor codes it is `code * scale / p`,
    /// with `p` the share of nonzero codes: then `mean|W| = scale`, so the online quantizer gives
    /// back exactly these codes and this scale, and the model computes what the packed one did.
    /// (`code * scale` alone would have `mean|W| = p * scale` and shrink every output by `p`.)
    /// Packed weights with several scales (per channel or per group, from other formats) become
    /// `code * scale`, which the per-tensor online quantizer can only approximate.
    pub fn to_latent(&self) -> Result<Tensor> {
        match self {
            ProjectionWeight::Latent(w) => w.to_dtype(DType::F32)?.to_device(&Device::Cpu),
            ProjectionWeight::Packed(p) => {
                let w = p.unpack()?;
                if p.scales().len() != 1 {
                    return Ok(w);
                }
                let levels = p.levels();
                let nonzero = levels.iter().filter(|&&l| l != 0).count();
                if nonzero == 0 {
                    return Ok(w);
                }
                w.affine(levels.len() as f64 / nonzero as f64, 0.0)
            }
        }
    }

    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            ProjectionWeight::Latent(w) => w.dims2(),
            ProjectionWeight::Packed(p) => Ok((p.out_features(), p.in_features())),
        }
    }
}

/// A source of named tensors for [`super::BitNetForCausalLM::from_source`]: a Hugging Face
/// checkpoint ([`crate::io::hf::HfCheckpoint`]), a [`VarBuilder`], or any other format that can
/// name its tensors as transformers does (`model.embed_tokens.weight`,
/// `model.layers.{i}.self_attn.q_proj`, `model.norm.weight`, `lm_head.weight`).
pub trait WeightSource {
    /// The full-precision tensor `name` of `shape` (embedding, norms, output head), f32 on the
    /// CPU; a wrong shape is an error naming the tensor.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor>;

    /// The weight of the projection `module` (without the `.weight` suffix), `[out, in]`.
    fn projection(&self, module: &str, out: usize, inp: usize) -> Result<ProjectionWeight>;
}

/// Latent weights and full-precision tensors from any `VarBuilder` (a `VarMap` being trained, or
/// safetensors files), converted to f32.
impl WeightSource for VarBuilder<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get(shape, name)?.to_dtype(DType::F32)
    }

    fn projection(&self, module: &str, out: usize, inp: usize) -> Result<ProjectionWeight> {
        Ok(ProjectionWeight::Latent(
            self.get((out, inp), &format!("{module}.weight"))?
                .to_dtype(DType::F32)?,
        ))
    }
}
