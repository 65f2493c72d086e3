//! Causal grouped-query self-attention with rotary positions and transformers' `attn_sub_norm`.

use super::linear::Projection;
use super::Config;
use bitnet_quant::ops::attention::causal_attention;
use bitnet_quant::RmsNorm;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::kv_cache::KvCache;

/// Rotary tables `[max_position_embeddings, head_dim / 2]` (transformers' `BitNetRotaryEmbedding`
/// with the default rope type: `inv_freq[i] = 1 / theta^(2i / head_dim)` in f32).
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryEmbedding {
    /// The tables for `cfg` on `device`.
    pub fn new(cfg: &Config, device: &Device) -> Result<Self> {
        let dim = cfg.head_dim();
        let theta = cfg.rope_theta() as f32;
        let inv: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / dim as f32))
            .collect();
        let n = cfg.max_position_embeddings;
        let inv = Tensor::from_vec(inv, (1, dim / 2), device)?;
        let pos = Tensor::arange(0u32, n as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((n, 1))?;
        let freqs = pos.broadcast_mul(&inv)?;
        Ok(Self {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
        })
    }

    /// The same tables on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            cos: self.cos.to_device(device)?,
            sin: self.sin.to_device(device)?,
        })
    }

    /// Rotates `x` `[b, heads, t, head_dim]` at positions `index_pos..index_pos + t`.
    /// `differentiable` takes candle's composed rope (with a backward) instead of the fused one.
    pub fn apply(&self, x: &Tensor, index_pos: usize, differentiable: bool) -> Result<Tensor> {
        let t = x.dim(2)?;
        let max = self.cos.dim(0)?;
        if index_pos + t > max {
            candle_core::bail!(
                "BitNet: positions {index_pos}..{} exceed max_position_embeddings = {max}",
                index_pos + t
            );
        }
        let (cos, sin) = (
            self.cos.narrow(0, index_pos, t)?,
            self.sin.narrow(0, index_pos, t)?,
        );
        match differentiable {
            true => candle_nn::rotary_emb::rope_slow(x, &cos, &sin),
            false => candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin),
        }
    }
}

/// One layer's attention: q/k/v projections, RoPE, causal GQA softmax attention, `attn_sub_norm`
/// over the heads' concatenation, `o_proj`.
#[derive(Debug)]
pub struct Attention {
    /// Queries `[hidden -> heads * head_dim]`.
    pub q_proj: Projection,
    /// Keys `[hidden -> kv_heads * head_dim]`.
    pub k_proj: Projection,
    /// Values `[hidden -> kv_heads * head_dim]`.
    pub v_proj: Projection,
    /// Output `[heads * head_dim -> hidden]`.
    pub o_proj: Projection,
    /// RMSNorm before `o_proj` (BitNet's SubLN; not in Llama).
    pub attn_sub_norm: RmsNorm,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// Assembles the attention of `cfg` from its parts.
    pub fn new(
        cfg: &Config,
        [q_proj, k_proj, v_proj, o_proj]: [Projection; 4],
        attn_sub_norm: RmsNorm,
    ) -> Self {
        Self {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            attn_sub_norm,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim(),
        }
    }

    /// `x` `[b, t, hidden]` at positions `index_pos..`; `kv` holds the earlier keys and values
    /// (and receives these), `None` attends within `x` only. `train` keeps every op
    /// differentiable.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &RotaryEmbedding,
        index_pos: usize,
        kv: Option<&mut KvCache>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let heads = |p: &Projection, n: usize| -> Result<Tensor> {
            p.forward(x)?
                .reshape((b, t, n, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = rope.apply(&heads(&self.q_proj, h)?, index_pos, train)?;
        let k = rope.apply(&heads(&self.k_proj, kvh)?, index_pos, train)?;
        let v = heads(&self.v_proj, kvh)?;
        let (k, v) = match kv {
            Some(cache) => cache.append(&k.contiguous()?, &v)?,
            None => (k, v),
        };
        // Grouped-query attention without copying keys: the `rep` query heads that share a
        // key/value head are stacked along the rows of one product. The fused op keeps no
        // [rows, keys] scores for the backward (it recomputes them), most of a training step's
        // memory at this size; without gradients it is the same candle ops as before.
        let rep = h / kvh;
        let q = q.contiguous()?.reshape((b, kvh, rep * t, d))?;
        let scale = 1.0 / (d as f64).sqrt();
        let out = causal_attention(&q, &k.contiguous()?, &v.contiguous()?, t, scale)?;
        let out = out
            .reshape((b, h, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, h * d))?;
        self.o_proj.forward(&self.attn_sub_norm.forward(&out)?)
    }
}
