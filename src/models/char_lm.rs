//! A small byte-level language model for `examples/char_lm`: Hugging Face's `BitNetForCausalLM`
//! ([`crate::models::bitnet`]) with a vocabulary of the 256 byte values, so that what it trains
//! is a checkpoint transformers loads ([`crate::io::hf::save`]). Every projection of every layer
//! is a `QATLayer<BitLinear>` (no inner norm: the layers' `attn_sub_norm` / `ffn_sub_norm` and
//! pre-norms surround them), attention with rotary position embeddings, the gated ReLU²
//! feed-forward; the byte embedding, the norms and the output head stay in full precision.

use crate::models::bitnet::{self, BitNetForCausalLM, Cache, RopeParameters, WeightForm};
use bitnet_training::{QATConfig, QATLayer, TrainingError};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// The model's shape. Byte-level: the vocabulary is the 256 byte values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CharLmConfig {
    /// Width of the residual stream.
    pub d_model: usize,
    /// Number of decoder layers.
    pub n_layers: usize,
    /// Attention heads; must divide `d_model`, and the head size must be even (rotary pairs).
    pub n_heads: usize,
    /// Width of the feed-forward's gate and up projections.
    pub ffn_hidden: usize,
    /// Context length the rotary tables are built for.
    pub seq_len: usize,
}

/// Bytes: every value a token.
pub const VOCAB: usize = 256;

impl CharLmConfig {
    /// About 1.4 M parameters (3 layers of width 192, a gated feed-forward of 512): minutes per
    /// mode on 2 cores.
    pub fn small() -> Self {
        Self {
            d_model: 192,
            n_layers: 3,
            n_heads: 6,
            ffn_hidden: 512,
            seq_len: 128,
        }
    }

    /// A toy size for tests.
    pub fn tiny() -> Self {
        Self {
            d_model: 32,
            n_layers: 1,
            n_heads: 2,
            ffn_hidden: 64,
            seq_len: 16,
        }
    }

    /// Rejects zero sizes, heads that do not divide the width, and odd head sizes.
    pub fn validate(&self) -> std::result::Result<(), TrainingError> {
        let bad = |field, value: usize, allowed| {
            Err(TrainingError::InvalidConfig {
                field,
                value: value.to_string(),
                allowed,
            })
        };
        for (field, v) in [
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("ffn_hidden", self.ffn_hidden),
            ("seq_len", self.seq_len),
        ] {
            if v == 0 {
                return bad(field, v, "an integer >= 1");
            }
        }
        if self.d_model % self.n_heads != 0 || (self.d_model / self.n_heads) % 2 != 0 {
            return bad(
                "n_heads",
                self.n_heads,
                "a divisor of d_model leaving an even head size",
            );
        }
        Ok(())
    }

    /// The number of parameters (latent weights, norms, embedding and head).
    pub fn parameters(&self) -> usize {
        let (d, f) = (self.d_model, self.ffn_hidden);
        // q, k, v, o + gate, up, down; input, post-attention and attention sub-norms of width d,
        // the feed-forward sub-norm of width f.
        let layer = 4 * d * d + 3 * d * f + 3 * d + f;
        self.n_layers * layer + 2 * VOCAB * d + d
    }

    /// The `BitNetForCausalLM` configuration this model is (`quantized`: with an online
    /// `quantization_config`, as transformers needs to ternarize it; otherwise a plain model).
    pub fn to_bitnet(&self, quantized: bool) -> bitnet::Config {
        let cfg = bitnet::Config {
            vocab_size: VOCAB,
            hidden_size: self.d_model,
            intermediate_size: self.ffn_hidden,
            num_hidden_layers: self.n_layers,
            num_attention_heads: self.n_heads,
            num_key_value_heads: self.n_heads,
            head_dim: None,
            rms_norm_eps: 1e-6,
            hidden_act: "relu2".into(),
            max_position_embeddings: self.seq_len,
            rope_theta: None,
            rope_parameters: Some(RopeParameters {
                rope_type: "default".into(),
                rope_theta: 10_000.0,
            }),
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_id: None,
            attention_bias: false,
            quantization_config: None,
        };
        match quantized {
            true => cfg.with_weight_form(WeightForm::Online),
            false => cfg,
        }
    }
}

/// The model; see the module docs.
///
/// ```
/// use bitnet::models::char_lm::{CharLm, CharLmConfig};
/// use bitnet::training::QATConfig;
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// # fn main() -> candle_core::Result<()> {
/// let vm = VarMap::new();
/// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
/// let lm = CharLm::new(CharLmConfig::tiny(), QATConfig::ternary_hf(), vb)?;
/// let tokens = Tensor::new(&[[72u32, 105, 33]], &Device::Cpu)?; // "Hi!"
/// assert_eq!(lm.forward(&tokens)?.dims(), &[1, 3, 256]);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct CharLm {
    config: CharLmConfig,
    model: BitNetForCausalLM,
}

impl CharLm {
    /// A model under `qat` (`QATConfig::ternary_hf()` for transformers' BitNet numerics,
    /// `full_precision()` for the baseline), variables under `vb` with transformers' names
    /// (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`, ...).
    pub fn new(config: CharLmConfig, qat: QATConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let model = BitNetForCausalLM::new(&config.to_bitnet(qat.weight.is_some()), qat, vb)?;
        Ok(Self { config, model })
    }

    /// The shape it was built with.
    pub fn config(&self) -> &CharLmConfig {
        &self.config
    }

    /// The `BitNetForCausalLM` it is (for saving with [`crate::io::hf::save`], packing,
    /// generation).
    pub fn model(&self) -> &BitNetForCausalLM {
        &self.model
    }

    /// Every quantized layer, layer by layer (for `set_step`, state tracking, sensitivity).
    pub fn qat_layers(&self) -> Vec<&QATLayer> {
        self.model.qat_layers()
    }

    /// Tells every quantized layer's schedules the training step.
    pub fn set_step(&self, step: usize) {
        self.model.set_step(step)
    }

    /// Logits `[batch, time, 256]` for byte tokens `[batch, time]` (u32), `time <= seq_len`.
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        let (_, t) = tokens.dims2()?;
        if t == 0 || t > self.config.seq_len {
            candle_core::bail!(
                "CharLm::forward: {t} tokens, the model takes 1..={}",
                self.config.seq_len
            );
        }
        self.model
            .forward_all(tokens, 0, &mut Cache::new(false, self.model.config()))
    }
}
