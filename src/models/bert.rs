//! A BERT sentence encoder (the architecture of all-MiniLM-L6-v2: post-norm encoder layers,
//! erf GELU, mean pooling over the attention mask, L2 normalisation), built through a
//! [`Converter`] so that its linear layers are `QATLayer<BitLinear>` or plain linears as a
//! [`PrecisionPolicy`](bitnet_training::policy::PrecisionPolicy) says, and everything else
//! (embeddings, LayerNorms) is a bit-identical, trainable full-precision copy.
//!
//! Tokenisation is the caller's (the `tokenizers` crate and the model's `tokenizer.json`): the
//! encoder takes token ids and the attention mask, both `[batch, len]` u32.

use bitnet_training::convert::{ConvertedLinear, Converter};
use bitnet_training::QATLayer;
use candle_core::{DType, Module, Result, Tensor, D};
use serde::Deserialize;
use std::path::Path;

/// The fields of a Hugging Face BERT `config.json` the encoder uses.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Hidden width of the feed-forward.
    pub intermediate_size: usize,
    /// Epsilon of every LayerNorm.
    pub layer_norm_eps: f64,
    /// Longest input the position table covers.
    pub max_position_embeddings: usize,
    /// Must be "gelu" (erf GELU), the only activation implemented.
    pub hidden_act: String,
}

impl BertConfig {
    /// Reads `config.json`; an unsupported activation or head count is an error naming it.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))?;
        let c: Self = serde_json::from_str(&text)
            .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))?;
        if c.hidden_act != "gelu" {
            candle_core::bail!(
                "{}: hidden_act {:?}, only \"gelu\" is supported",
                path.display(),
                c.hidden_act
            );
        }
        if c.num_attention_heads == 0 || c.hidden_size % c.num_attention_heads != 0 {
            candle_core::bail!(
                "{}: num_attention_heads must divide hidden_size",
                path.display()
            );
        }
        Ok(c)
    }
}

/// LayerNorm from tensor ops, so that gradients reach its input, weight and bias (candle-nn's
/// fused CPU path has no backward).
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(conv: &Converter, name: &str, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: conv.tensor(&format!("{name}.weight"))?,
            bias: conv.tensor(&format!("{name}.bias"))?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + self.eps)?.sqrt()?)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

#[derive(Debug)]
struct Layer {
    query: ConvertedLinear,
    key: ConvertedLinear,
    value: ConvertedLinear,
    attn_out: ConvertedLinear,
    attn_norm: LayerNorm,
    intermediate: ConvertedLinear,
    output: ConvertedLinear,
    out_norm: LayerNorm,
}

/// The encoder; see the module docs.
#[derive(Debug)]
pub struct BertEncoder {
    config: BertConfig,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
}

impl BertEncoder {
    /// Builds the encoder from the tensors behind `conv` (names as in a Hugging Face
    /// `BertModel` safetensors file: `embeddings.*`, `encoder.layer.{i}.*`; the pooler is not
    /// used).
    pub fn new(config: BertConfig, conv: &Converter) -> Result<Self> {
        let eps = config.layer_norm_eps;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                Ok(Layer {
                    query: conv.linear(&format!("{p}.attention.self.query"))?,
                    key: conv.linear(&format!("{p}.attention.self.key"))?,
                    value: conv.linear(&format!("{p}.attention.self.value"))?,
                    attn_out: conv.linear(&format!("{p}.attention.output.dense"))?,
                    attn_norm: LayerNorm::new(
                        conv,
                        &format!("{p}.attention.output.LayerNorm"),
                        eps,
                    )?,
                    intermediate: conv.linear(&format!("{p}.intermediate.dense"))?,
                    output: conv.linear(&format!("{p}.output.dense"))?,
                    out_norm: LayerNorm::new(conv, &format!("{p}.output.LayerNorm"), eps)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            word: conv.tensor("embeddings.word_embeddings.weight")?,
            position: conv.tensor("embeddings.position_embeddings.weight")?,
            token_type: conv.tensor("embeddings.token_type_embeddings.weight")?,
            embed_norm: LayerNorm::new(conv, "embeddings.LayerNorm", eps)?,
            layers,
            config,
        })
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// The quantized linear layers, in order (for `set_step`, tracking, packing).
    pub fn qat_layers(&self) -> Vec<&QATLayer> {
        self.layers
            .iter()
            .flat_map(|l| {
                [
                    &l.query,
                    &l.key,
                    &l.value,
                    &l.attn_out,
                    &l.intermediate,
                    &l.output,
                ]
            })
            .filter_map(|c| c.qat())
            .collect()
    }

    /// Tells every quantized layer's schedules the training step.
    pub fn set_step(&self, step: usize) {
        self.qat_layers().iter().for_each(|l| l.set_step(step));
    }

    /// Hidden states `[batch, len, hidden]` of the last layer for `ids` and `mask` (`[batch, len]`
    /// u32, mask 1 for real tokens and 0 for padding).
    pub fn hidden_states(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let mut all = self.layer_outputs(ids, mask)?;
        Ok(all.pop().expect("the embedding output is always there"))
    }

    /// The embedding output followed by every encoder layer's output, each `[batch, len, hidden]`
    /// (what per-layer hidden-state distillation matches).
    pub fn layer_outputs(&self, ids: &Tensor, mask: &Tensor) -> Result<Vec<Tensor>> {
        let (b, t) = ids.dims2()?;
        if t > self.config.max_position_embeddings {
            candle_core::bail!(
                "BertEncoder: {t} tokens, at most {} fit the position table",
                self.config.max_position_embeddings
            );
        }
        let (h, nh) = (self.config.hidden_size, self.config.num_attention_heads);
        let hd = h / nh;
        let word = self
            .word
            .embedding(&ids.flatten_all()?)?
            .reshape((b, t, h))?;
        let pos = self.position.narrow(0, 0, t)?;
        let typ = self.token_type.get(0)?; // single-segment input: token type 0 everywhere
        let x = word.broadcast_add(&pos)?.broadcast_add(&typ)?;
        let mut x = self.embed_norm.forward(&x)?;
        let mut outputs = Vec::with_capacity(self.layers.len() + 1);
        // Padding keys get -10000 before the softmax, as in BERT.
        let bias = ((mask.to_dtype(DType::F32)? - 1.0)? * 10000.0)?.reshape((b, 1, 1, t))?;
        let heads = |y: Tensor| -> Result<Tensor> {
            y.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()
        };
        for l in &self.layers {
            outputs.push(x.clone());
            let q = heads(l.query.forward(&x)?)?;
            let k = heads(l.key.forward(&x)?)?;
            let v = heads(l.value.forward(&x)?)?;
            let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(&bias)?;
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
            let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?;
            x = l.attn_norm.forward(&(l.attn_out.forward(&ctx)? + &x)?)?;
            let f = l.intermediate.forward(&x)?.gelu_erf()?;
            x = l.out_norm.forward(&(l.output.forward(&f)? + &x)?)?;
        }
        outputs.push(x);
        Ok(outputs)
    }

    /// Sentence embeddings `[batch, hidden]`: the mean of the hidden states over the real tokens,
    /// L2-normalised (sentence-transformers' Pooling + Normalize).
    pub fn embed(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        pool(&self.hidden_states(ids, mask)?, mask)
    }
}

/// Mean pooling of hidden states `[batch, len, hidden]` over the real tokens of `mask`, then L2
/// normalisation: [`BertEncoder::embed`] from hidden states already computed.
pub fn pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    let sum = hidden.broadcast_mul(&m)?.sum(1)?;
    let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
    let mean = sum.broadcast_div(&count)?;
    let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    mean.broadcast_div(&norm)
}
