//! [`BitNetForCausalLM`]: embedding, decoder layers, final norm, output head; and its [`Cache`].

use super::attention::{Attention, RotaryEmbedding};
use super::linear::Projection;
use super::mlp::{FfnAct, Mlp};
use super::weights::WeightSource;
use super::{Config, WeightForm};
use bitnet_quant::RmsNorm;
use bitnet_training::{QATConfig, QATLayer};
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::kv_cache::KvCache;
use candle_nn::{Embedding, VarBuilder};

/// Which computation the projections run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// `QATLayer<BitLinear>` projections with latent weights: the forward is differentiable.
    Training,
    /// `PackedBitLinear` projections: 2-bit codes and integer kernels.
    Packed,
    /// The packed model's weights unpacked to f32 and multiplied by candle's GEMM.
    Dense,
}

/// One decoder layer (transformers' `BitNetDecoderLayer`):
/// `h = x + attn(input_layernorm(x))`, `h + mlp(post_attention_layernorm(h))`.
#[derive(Debug)]
pub struct DecoderLayer {
    /// Self-attention.
    pub self_attn: Attention,
    /// Feed-forward.
    pub mlp: Mlp,
    /// Pre-attention norm.
    pub input_layernorm: RmsNorm,
    /// Pre-feed-forward norm.
    pub post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn forward(
        &self,
        x: &Tensor,
        rope: &RotaryEmbedding,
        index_pos: usize,
        kv: Option<&mut KvCache>,
        train: bool,
    ) -> Result<Tensor> {
        let a = self.self_attn.forward(
            &self.input_layernorm.forward(x)?,
            rope,
            index_pos,
            kv,
            train,
        )?;
        let h = (x + a)?;
        let f = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&h)?)?;
        h + f
    }

    fn projections(&self) -> [&Projection; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }

    fn map(&self, cfg: &Config, f: impl Fn(&Projection) -> Result<Projection>) -> Result<Self> {
        let p = self.projections();
        let attn = Attention::new(
            cfg,
            [f(p[0])?, f(p[1])?, f(p[2])?, f(p[3])?],
            self.self_attn.attn_sub_norm.clone(),
        );
        Ok(Self {
            self_attn: attn,
            mlp: Mlp {
                gate_proj: f(p[4])?,
                up_proj: f(p[5])?,
                down_proj: f(p[6])?,
                ffn_sub_norm: self.mlp.ffn_sub_norm.clone(),
                act: self.mlp.act,
            },
            input_layernorm: self.input_layernorm.clone(),
            post_attention_layernorm: self.post_attention_layernorm.clone(),
        })
    }
}

/// The key/value cache of every layer, for generation: the prompt goes through
/// [`BitNetForCausalLM::forward`] at `index_pos = 0`, then each new token at the next position.
#[derive(Debug, Clone)]
pub struct Cache {
    kvs: Option<Vec<KvCache>>,
}

/// Positions a cache allocates at a time (it grows by as many when full).
const CACHE_CHUNK: usize = 256;

impl Cache {
    /// A cache for `cfg`'s layers; with `use_kv_cache = false` nothing is kept and every forward
    /// attends only within its own input (training, scoring whole sequences).
    pub fn new(use_kv_cache: bool, cfg: &Config) -> Self {
        let kvs = use_kv_cache.then(|| {
            (0..cfg.num_hidden_layers)
                .map(|_| KvCache::new(2, CACHE_CHUNK.min(cfg.max_position_embeddings)))
                .collect()
        });
        Self { kvs }
    }

    /// Forgets every position (for a new prompt).
    pub fn reset(&mut self) {
        self.kvs.iter_mut().flatten().for_each(KvCache::reset);
    }

    /// Positions held.
    pub fn seq_len(&self) -> usize {
        self.kvs
            .as_ref()
            .and_then(|k| k.first())
            .map_or(0, KvCache::current_seq_len)
    }
}

/// Hugging Face's `BitNetForCausalLM` (BitNet b1.58, e.g. microsoft/bitnet-b1.58-2B-4T): token
/// embedding, `num_hidden_layers` [`DecoderLayer`]s, a final RMSNorm and the output head (tied to
/// the embedding or not). Every projection computes what transformers' `AutoBitLinear` computes:
/// int8 absmax activations per token and ternary weights with the scale `1 / max(mean|W|, 1e-5)`
/// ([`bitnet_quant::Scheme::TernaryAbsmeanHf`]).
///
/// Three [`Runtime`]s share this module tree: [`Self::new`] builds the training one from a
/// `VarBuilder`, [`Self::from_source`] an inference one from any [`WeightSource`] (a checkpoint),
/// and [`Self::to_packed`] / [`Self::to_dense`] convert.
///
/// ```
/// use bitnet::models::bitnet::{BitNetForCausalLM, Cache, Config};
/// use bitnet::training::QATConfig;
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// # fn main() -> candle_core::Result<()> {
/// let cfg = Config::from_json_str(r#"{"vocab_size": 64, "hidden_size": 32,
///     "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
///     "num_key_value_heads": 2, "max_position_embeddings": 16}"#, "config")?;
/// let vm = VarMap::new();
/// let model = BitNetForCausalLM::new(&cfg, QATConfig::ternary_hf(), VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
/// let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu)?;
/// let logits = model.forward_all(&ids, 0, &mut Cache::new(false, &cfg))?;
/// assert_eq!(logits.dims(), &[1, 3, 64]);
/// // The same model for integer inference, one token at a time with a KV cache.
/// let packed = model.to_packed()?;
/// let mut cache = Cache::new(true, &cfg);
/// let first = packed.forward(&ids, 0, &mut cache)?;       // prefill: last position's logits
/// let next = packed.forward(&Tensor::new(&[[4u32]], &Device::Cpu)?, 3, &mut cache)?;
/// assert_eq!((first.dims(), next.dims()), (&[1, 64][..], &[1, 64][..]));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct BitNetForCausalLM {
    config: Config,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `None`: tied to the embedding.
    lm_head: Option<Tensor>,
    rope: RotaryEmbedding,
    runtime: Runtime,
}

/// `(name under model.layers.{i}, out, in)` of every projection of `cfg`.
pub fn projection_shapes(cfg: &Config) -> [(&'static str, usize, usize); 7] {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (
        cfg.num_attention_heads * cfg.head_dim(),
        cfg.num_key_value_heads * cfg.head_dim(),
    );
    let p = super::config::PROJECTIONS;
    [
        (p[0], q, h),
        (p[1], kv, h),
        (p[2], kv, h),
        (p[3], h, q),
        (p[4], i, h),
        (p[5], i, h),
        (p[6], h, i),
    ]
}

/// The norms of layer `i`: `(name, width)`.
pub fn layer_norms(cfg: &Config) -> [(&'static str, usize); 4] {
    [
        ("input_layernorm", cfg.hidden_size),
        ("post_attention_layernorm", cfg.hidden_size),
        ("self_attn.attn_sub_norm", cfg.hidden_size),
        ("mlp.ffn_sub_norm", cfg.intermediate_size),
    ]
}

impl BitNetForCausalLM {
    /// The training runtime: every projection a `QATLayer<BitLinear>` under `qat` (no inner
    /// norm; [`QATConfig::ternary_hf`] for transformers' numerics, `full_precision()` for a plain
    /// model), every tensor from `vb` under transformers' names (created in a fresh `VarMap`).
    pub fn new(cfg: &Config, qat: QATConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate("config")?;
        let eps = cfg.rms_norm_eps;
        let embed_tokens =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("model.embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let vb = vb.pp(format!("model.layers.{l}"));
                let shapes = projection_shapes(cfg);
                let p =
                    |k: usize| Projection::qat(shapes[k].2, shapes[k].1, qat, vb.pp(shapes[k].0));
                let norm = |k: usize| -> Result<RmsNorm> {
                    let (name, dim) = layer_norms(cfg)[k];
                    RmsNorm::new(dim, eps, vb.pp(name))
                };
                Ok(DecoderLayer {
                    self_attn: Attention::new(cfg, [p(0)?, p(1)?, p(2)?, p(3)?], norm(2)?),
                    mlp: Mlp {
                        gate_proj: p(4)?,
                        up_proj: p(5)?,
                        down_proj: p(6)?,
                        ffn_sub_norm: norm(3)?,
                        act: FfnAct::of(cfg),
                    },
                    input_layernorm: norm(0)?,
                    post_attention_layernorm: norm(1)?,
                })
            })
            .collect::<Result<_>>()?;
        let norm = RmsNorm::new(cfg.hidden_size, eps, vb.pp("model.norm"))?;
        let lm_head = match cfg.tie_word_embeddings {
            true => None,
            false => Some(vb.get_with_hints(
                (cfg.vocab_size, cfg.hidden_size),
                "lm_head.weight",
                candle_nn::init::DEFAULT_KAIMING_NORMAL,
            )?),
        };
        Ok(Self {
            rope: RotaryEmbedding::new(cfg, vb.device())?,
            config: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            runtime: Runtime::Training,
        })
    }

    /// An inference runtime ([`Runtime::Packed`] or [`Runtime::Dense`]) from `src`: the entry
    /// point for any file format. Latent weights are quantized as transformers does; packed ones
    /// are used as they are. A config without `quantization_config` is a full-precision model,
    /// whose projections stay f32 in either runtime. Tensors are read one at a time, so that a
    /// projection's latent form never outlives its packing.
    pub fn from_source(cfg: &Config, src: &dyn WeightSource, runtime: Runtime) -> Result<Self> {
        cfg.validate("config")?;
        if runtime == Runtime::Training {
            candle_core::bail!("BitNetForCausalLM::from_source builds the Packed or Dense runtime; train with BitNetForCausalLM::new on a VarMap (crate::io::hf::HfCheckpoint::load_varmap)");
        }
        let quantized = cfg.weight_form() != WeightForm::FullPrecision;
        let dense = runtime == Runtime::Dense;
        let eps = cfg.rms_norm_eps;
        let norm = |name: String, dim: usize| -> Result<RmsNorm> {
            Ok(RmsNorm::from_weight(src.tensor(&name, &[dim])?, eps))
        };
        let embed = src.tensor(
            "model.embed_tokens.weight",
            &[cfg.vocab_size, cfg.hidden_size],
        )?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let pre = format!("model.layers.{l}");
            let mut proj = Vec::with_capacity(7);
            for (name, out, inp) in projection_shapes(cfg) {
                let w = src.projection(&format!("{pre}.{name}"), out, inp)?;
                proj.push(Projection::inference(&w, quantized, dense)?);
            }
            let norms = layer_norms(cfg);
            let mut n = norms
                .iter()
                .map(|(name, dim)| norm(format!("{pre}.{name}.weight"), *dim));
            let (input_layernorm, post_attention_layernorm, attn_sub, ffn_sub) = (
                n.next().expect("four norms")?,
                n.next().expect("four norms")?,
                n.next().expect("four norms")?,
                n.next().expect("four norms")?,
            );
            let mut p = proj.into_iter();
            let mut next = || p.next().expect("seven projections");
            let attn = Attention::new(cfg, [next(), next(), next(), next()], attn_sub);
            layers.push(DecoderLayer {
                self_attn: attn,
                mlp: Mlp {
                    gate_proj: next(),
                    up_proj: next(),
                    down_proj: next(),
                    ffn_sub_norm: ffn_sub,
                    act: FfnAct::of(cfg),
                },
                input_layernorm,
                post_attention_layernorm,
            });
        }
        let lm_head = match cfg.tie_word_embeddings {
            true => None,
            false => Some(src.tensor("lm_head.weight", &[cfg.vocab_size, cfg.hidden_size])?),
        };
        Ok(Self {
            rope: RotaryEmbedding::new(cfg, &Device::Cpu)?,
            config: cfg.clone(),
            embed_tokens: Embedding::new(embed, cfg.hidden_size),
            layers,
            norm: norm("model.norm.weight".into(), cfg.hidden_size)?,
            lm_head,
            runtime,
        })
    }

    /// A copy with every projection through `f`, the norms' weights through `norm`, the embedding
    /// and the untied head through `table`, the rotary tables onto `device` (where `f`, `norm`
    /// and `table` put the rest).
    fn map_parts(
        &self,
        runtime: Runtime,
        device: &Device,
        f: impl Fn(&Projection) -> Result<Projection>,
        norm: impl Fn(&Tensor) -> Result<Tensor>,
        table: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Self> {
        let norm = |n: &RmsNorm| -> Result<RmsNorm> {
            Ok(RmsNorm::from_weight(norm(n.weight())?, n.eps()))
        };
        Ok(Self {
            config: self.config.clone(),
            embed_tokens: Embedding::new(
                table(self.embed_tokens.embeddings())?,
                self.config.hidden_size,
            ),
            layers: self
                .layers
                .iter()
                .map(|l| {
                    let mut m = l.map(&self.config, &f)?;
                    m.input_layernorm = norm(&l.input_layernorm)?;
                    m.post_attention_layernorm = norm(&l.post_attention_layernorm)?;
                    m.self_attn.attn_sub_norm = norm(&l.self_attn.attn_sub_norm)?;
                    m.mlp.ffn_sub_norm = norm(&l.mlp.ffn_sub_norm)?;
                    Ok(m)
                })
                .collect::<Result<_>>()?,
            norm: norm(&self.norm)?,
            lm_head: self.lm_head.as_ref().map(table).transpose()?,
            rope: self.rope.to_device(device)?,
            runtime,
        })
    }

    /// [`Self::map_parts`] on this model's device (a projection `f` builds elsewhere, as packing
    /// does on the CPU, is moved back), with the other tensors shared, detached.
    fn map_projections(
        &self,
        runtime: Runtime,
        f: impl Fn(&Projection) -> Result<Projection>,
    ) -> Result<Self> {
        let device = self.device();
        let detach = |t: &Tensor| Ok(t.detach());
        let f = |p: &Projection| f(p)?.to_device(device);
        self.map_parts(runtime, device, f, detach, detach)
    }

    /// The packed inference runtime of this model: training projections are packed with their
    /// quantizers at the current step; other tensors are shared, detached.
    pub fn to_packed(&self) -> Result<Self> {
        self.map_projections(Runtime::Packed, Projection::to_packed)
    }

    /// The same inference with f32 weights (`scale * code`) and candle's GEMM, for comparison.
    pub fn to_dense(&self) -> Result<Self> {
        self.map_projections(Runtime::Dense, Projection::to_dense)
    }

    /// This inference model (packed or dense) on `device`, for generation on a GPU: packed
    /// projections run our CUDA kernels (the `cuda` feature; packed inference has no Metal
    /// kernels yet), everything else candle's ops on that device. Input ids go to the same
    /// device ([`Self::device`]); [`super::generate`] puts them there. The training runtime is an
    /// error: build it on the device through its `VarBuilder` instead, and
    /// [`Self::to_packed`] keeps the device.
    ///
    /// ```
    /// # use bitnet::models::bitnet::{BitNetForCausalLM, Cache, Config};
    /// # use bitnet::training::QATConfig;
    /// # use candle_core::{DType, Device, Tensor};
    /// # use candle_nn::{VarBuilder, VarMap};
    /// # fn main() -> candle_core::Result<()> {
    /// # let cfg = Config::from_json_str(r#"{"vocab_size": 64, "hidden_size": 32,
    /// #     "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
    /// #     "num_key_value_heads": 2, "max_position_embeddings": 16}"#, "config")?;
    /// # let vm = VarMap::new();
    /// # let model = BitNetForCausalLM::new(&cfg, QATConfig::ternary_hf(), VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    /// // `Device::cuda_if_available(0)?` with the `cuda` feature; the CPU here.
    /// let device = Device::Cpu;
    /// let packed = model.to_packed()?.to_device(&device)?;
    /// let ids = Tensor::new(&[[1u32, 2, 3]], packed.device())?;
    /// let logits = packed.forward(&ids, 0, &mut Cache::new(true, &cfg))?;
    /// assert!(logits.device().same_device(&device));
    /// # Ok(()) }
    /// ```
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        if self.runtime == Runtime::Training {
            candle_core::bail!("BitNetForCausalLM::to_device moves an inference model (to_packed or to_dense); a training model learns in its VarMap: build it on the device through its VarBuilder");
        }
        let move_to = |t: &Tensor| t.detach().to_device(device);
        self.map_parts(
            self.runtime,
            device,
            |p| p.to_device(device),
            move_to,
            move_to,
        )
    }

    /// This inference model with its large full-precision matrices stored as `dtype` (F32,
    /// BF16 or F16): the embedding, the output head, and in the dense runtime the projections'
    /// weights. Products with them run in `dtype` (candle's GEMM, cuBLAS on a GPU); the residual
    /// stream, the norms and the attention stay f32. A 16-bit head halves the bytes every token
    /// reads (128256 x 2560 values in bitnet-b1.58-2B-4T); the dense runtime in BF16 is the
    /// model as transformers runs it in `torch.bfloat16`, the baseline of the packed kernels.
    /// On the CPU the head's product (and a 16-bit dense projection's) is
    /// [`bitnet_quant::ops::gemv::linear_t`], which keeps the activations in f32; on a GPU it is
    /// cuBLAS in `dtype`.
    pub fn to_weight_dtype(&self, dtype: DType) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            candle_core::bail!(
                "BitNetForCausalLM::to_weight_dtype: dtype is {dtype:?}, allowed: F32, BF16, F16"
            );
        }
        if self.runtime == Runtime::Training {
            candle_core::bail!("BitNetForCausalLM::to_weight_dtype converts an inference model (to_packed or to_dense); a training model keeps its VarMap's dtype");
        }
        let detach = |t: &Tensor| Ok(t.detach());
        let cast = |t: &Tensor| t.detach().to_dtype(dtype);
        self.map_parts(
            self.runtime,
            self.device(),
            |p| p.to_weight_dtype(dtype),
            detach,
            cast,
        )
    }

    /// The device the model computes on (where its input ids go).
    pub fn device(&self) -> &Device {
        self.embed_tokens.embeddings().device()
    }

    /// The dtype of the embedding and output head ([`Self::to_weight_dtype`]).
    pub fn weight_dtype(&self) -> DType {
        self.embed_tokens.embeddings().dtype()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The runtime the projections run.
    pub fn runtime(&self) -> Runtime {
        self.runtime
    }

    /// The decoder layers.
    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// Every projection as `(name, layer)`, layer by layer in transformers' order.
    pub fn projections(&self) -> Vec<(String, &Projection)> {
        let names = projection_shapes(&self.config);
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(l, layer)| {
                layer
                    .projections()
                    .into_iter()
                    .zip(names)
                    .map(move |(p, (name, _, _))| (format!("model.layers.{l}.{name}"), p))
            })
            .collect()
    }

    /// Every full-precision tensor (embedding, norms, untied head) by its transformers name.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.embeddings().clone(),
        )];
        for (l, layer) in self.layers.iter().enumerate() {
            let norms = [
                &layer.input_layernorm,
                &layer.post_attention_layernorm,
                &layer.self_attn.attn_sub_norm,
                &layer.mlp.ffn_sub_norm,
            ];
            for ((name, _), n) in layer_norms(&self.config).into_iter().zip(norms) {
                out.push((
                    format!("model.layers.{l}.{name}.weight"),
                    n.weight().clone(),
                ));
            }
        }
        out.push(("model.norm.weight".into(), self.norm.weight().clone()));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".into(), h.clone()));
        }
        out
    }

    /// The training layers (empty for an inference runtime), for schedules and state tracking.
    pub fn qat_layers(&self) -> Vec<&QATLayer> {
        self.projections()
            .into_iter()
            .filter_map(|(_, p)| p.qat_layer())
            .collect()
    }

    /// Tells every training layer's schedules the step.
    pub fn set_step(&self, step: usize) {
        self.qat_layers().iter().for_each(|l| l.set_step(step));
    }

    /// Bytes of every weight the model holds (packed codes count 2 bits, f32 values 4 bytes).
    pub fn weights_bytes(&self) -> usize {
        let dense: usize = self
            .named_tensors()
            .iter()
            .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        dense
            + self
                .projections()
                .iter()
                .map(|(_, p)| p.weight_bytes())
                .sum::<usize>()
    }

    /// The final hidden states `[b, t, hidden]` of `input_ids` `[b, t]` (u32) at positions
    /// `index_pos..`, appending to `cache`.
    fn hidden(&self, input_ids: &Tensor, index_pos: usize, cache: &mut Cache) -> Result<Tensor> {
        let (_, t) = input_ids.dims2()?;
        if t == 0 {
            candle_core::bail!("BitNetForCausalLM: empty input");
        }
        if let Some(kvs) = &cache.kvs {
            if kvs.len() != self.layers.len() || cache.seq_len() != index_pos {
                candle_core::bail!(
                    "BitNetForCausalLM: the cache holds {} positions of {} layers, the input starts at index_pos {index_pos} of {} layers",
                    cache.seq_len(),
                    kvs.len(),
                    self.layers.len()
                );
            }
        }
        let vocab = self.config.vocab_size as u32;
        let max_id = input_ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max_id >= vocab {
            candle_core::bail!(
                "BitNetForCausalLM: token id {max_id} is outside the vocabulary of {vocab}"
            );
        }
        let train = self.runtime == Runtime::Training;
        let mut h = self.embed_tokens.forward(input_ids)?.to_dtype(DType::F32)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let kv = cache.kvs.as_mut().map(|k| &mut k[i]);
            h = layer.forward(&h, &self.rope, index_pos, kv, train)?;
        }
        self.norm.forward(&h)
    }

    fn head(&self, h: &Tensor) -> Result<Tensor> {
        let w = self
            .lm_head
            .as_ref()
            .unwrap_or(self.embed_tokens.embeddings());
        // A decode step's head on the CPU: a threaded GEMV that reads 16-bit weights as they are.
        bitnet_quant::ops::gemv::linear_t(h, w)
    }

    /// The logits `[b, vocab]` at the last position of `input_ids` `[b, t]`, the tokens at
    /// positions `index_pos..index_pos + t`; earlier positions come from `cache` (and these are
    /// added to it). As candle-transformers' llama: prefill with the prompt at 0, then one token
    /// at a time.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        index_pos: usize,
        cache: &mut Cache,
    ) -> Result<Tensor> {
        let h = self.hidden(input_ids, index_pos, cache)?;
        let t = h.dim(1)?;
        self.head(&h.narrow(1, t - 1, 1)?)?.squeeze(1)
    }

    /// The logits `[b, t, vocab]` at every position (training, scoring).
    pub fn forward_all(
        &self,
        input_ids: &Tensor,
        index_pos: usize,
        cache: &mut Cache,
    ) -> Result<Tensor> {
        let h = self.hidden(input_ids, index_pos, cache)?;
        self.head(&h)
    }

    /// The mean next-token cross-entropy of `input_ids` `[b, t]` (nats per token), with no cache.
    pub fn loss(&self, input_ids: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let logits = self.forward_all(input_ids, 0, &mut Cache::new(false, &self.config))?;
        let v = self.config.vocab_size;
        candle_nn::loss::cross_entropy(&logits.reshape(((), v))?, &targets.flatten_all()?)
    }
}

/// The index of the largest logit of `logits` `[vocab]`.
pub fn argmax(logits: &Tensor) -> Result<u32> {
    logits
        .to_dtype(DType::F32)?
        .argmax(D::Minus1)?
        .to_scalar::<u32>()
}
