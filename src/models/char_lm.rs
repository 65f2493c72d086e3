//! A small decoder-only transformer over bytes in the BitNet b1.58 style, for
//! `examples/char_lm`: every linear layer of every block is a `QATLayer<BitLinear>` (its own RMSNorm
//! before the int8 activations, ternary weights, no bias), attention with rotary position
//! embeddings, a ReLU² feed-forward; the byte embedding, the final RMSNorm and the output head
//! stay in full precision.
//!
//! Block: `h = h + o(attn(qkv(h)))`, `h = h + down(relu(up(h))^2)`, where `qkv`, `o`, `up`, `down`
//! are the quantized layers (their inner norms play the role of the pre-norms).

use bitnet_quant::RmsNorm;
use bitnet_training::{QATConfig, QATLayer, TrainingError};
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

/// The model's shape. Byte-level: the vocabulary is the 256 byte values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CharLmConfig {
    /// Width of the residual stream.
    pub d_model: usize,
    /// Number of blocks.
    pub n_layers: usize,
    /// Attention heads; must divide `d_model`, and the head size must be even (rotary pairs).
    pub n_heads: usize,
    /// Hidden width of the feed-forward.
    pub ffn_hidden: usize,
    /// Context length the rotary tables and the causal mask are built for.
    pub seq_len: usize,
}

/// Bytes: every value a token.
pub const VOCAB: usize = 256;

impl CharLmConfig {
    /// About 1.4 M parameters (3 blocks of width 192): minutes per mode on 2 cores.
    pub fn small() -> Self {
        Self {
            d_model: 192,
            n_layers: 3,
            n_heads: 6,
            ffn_hidden: 768,
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
        let d = self.d_model;
        // qkv + o + up + down weights, and the four inner norms.
        let block = 4 * d * d + 2 * d * self.ffn_hidden + 3 * d + self.ffn_hidden;
        self.n_layers * block + 2 * VOCAB * d + d
    }
}

/// One block's four quantized layers.
#[derive(Debug)]
struct Block {
    qkv: QATLayer,
    o: QATLayer,
    up: QATLayer,
    down: QATLayer,
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
/// let lm = CharLm::new(CharLmConfig::tiny(), QATConfig::ternary(), vb)?;
/// let tokens = Tensor::new(&[[72u32, 105, 33]], &Device::Cpu)?; // "Hi!"
/// assert_eq!(lm.forward(&tokens)?.dims(), &[1, 3, 256]);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct CharLm {
    config: CharLmConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    head: Linear,
    cos: Tensor,
    sin: Tensor,
}

impl CharLm {
    /// A model under `qat` (e.g. `QATConfig::ternary()`, or `full_precision()` for the baseline),
    /// variables under `vb`: `embed`, `blocks.{i}.{qkv,o,up,down}`, `norm`, `head`.
    pub fn new(config: CharLmConfig, qat: QATConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let d = config.d_model;
        let embed = candle_nn::embedding(VOCAB, d, vb.pp("embed"))?;
        let blocks = (0..config.n_layers)
            .map(|i| {
                let vb = vb.pp(format!("blocks.{i}"));
                Ok(Block {
                    qkv: QATLayer::bitlinear(d, 3 * d, qat, vb.pp("qkv"))?,
                    o: QATLayer::bitlinear(d, d, qat, vb.pp("o"))?,
                    up: QATLayer::bitlinear(d, config.ffn_hidden, qat, vb.pp("up"))?,
                    down: QATLayer::bitlinear(config.ffn_hidden, d, qat, vb.pp("down"))?,
                })
            })
            .collect::<Result<_>>()?;
        let norm = RmsNorm::new(d, 1e-6, vb.pp("norm"))?;
        let head = candle_nn::linear_no_bias(d, VOCAB, vb.pp("head"))?;
        let (cos, sin) = rope_tables(config.seq_len, d / config.n_heads, vb.device())?;
        Ok(Self {
            config,
            embed,
            blocks,
            norm,
            head,
            cos,
            sin,
        })
    }

    /// The shape it was built with.
    pub fn config(&self) -> &CharLmConfig {
        &self.config
    }

    /// Every quantized layer, block by block (for `set_step`, state tracking, sensitivity).
    pub fn qat_layers(&self) -> Vec<&QATLayer> {
        self.blocks
            .iter()
            .flat_map(|b| [&b.qkv, &b.o, &b.up, &b.down])
            .collect()
    }

    /// Tells every quantized layer's schedules the training step.
    pub fn set_step(&self, step: usize) {
        self.qat_layers().iter().for_each(|l| l.set_step(step));
    }

    /// Logits `[batch, time, 256]` for byte tokens `[batch, time]` (u32), `time <= seq_len`.
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        if t == 0 || t > self.config.seq_len {
            candle_core::bail!(
                "CharLm::forward: {t} tokens, the model takes 1..={}",
                self.config.seq_len
            );
        }
        let mask = causal_mask(t, tokens.device())?;
        let (cos, sin) = (self.cos.narrow(0, 0, t)?, self.sin.narrow(0, 0, t)?);
        let mut h = self.embed.forward(tokens)?;
        for block in &self.blocks {
            let a = self.attention(block, &h, &mask, &cos, &sin, (b, t))?;
            h = (h + block.o.forward(&a)?)?;
            let f = block.up.forward(&h)?.relu()?.sqr()?;
            h = (h + block.down.forward(&f)?)?;
        }
        self.head.forward(&self.norm.forward(&h)?)
    }

    /// Causal multi-head attention of one block; returns `[b, t, d]` before the output layer.
    fn attention(
        &self,
        block: &Block,
        h: &Tensor,
        mask: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        (b, t): (usize, usize),
    ) -> Result<Tensor> {
        let (d, nh) = (self.config.d_model, self.config.n_heads);
        let hd = d / nh;
        let qkv = block.qkv.forward(h)?;
        let heads = |i: usize| -> Result<Tensor> {
            qkv.narrow(D::Minus1, i * d, d)?
                .reshape((b, t, nh, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = candle_nn::rotary_emb::rope_slow(&heads(0)?, cos, sin)?;
        let k = candle_nn::rotary_emb::rope_slow(&heads(1)?, cos, sin)?;
        let v = heads(2)?;
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))
    }
}

/// `0` on and below the diagonal, `-inf` above: position `i` attends to `0..=i`.
fn causal_mask(t: usize, dev: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..t * t)
        .map(|k| {
            if k % t > k / t {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(m, (t, t), dev)
}

/// Rotary tables `[seq_len, head_dim / 2]` with the LLaMA base 10000.
fn rope_tables(seq_len: usize, head_dim: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / head_dim as f32))
        .collect();
    let inv = Tensor::from_vec(inv, (1, half), dev)?;
    let pos = Tensor::arange(0u32, seq_len as u32, dev)?
        .to_dtype(DType::F32)?
        .reshape((seq_len, 1))?;
    let angles = pos.broadcast_mul(&inv)?;
    Ok((angles.cos()?, angles.sin()?))
}
