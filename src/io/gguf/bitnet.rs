//! llama.cpp's `bitnet` architecture: [`GgufModel`] reads a GGUF of it into a
//! [`BitNetForCausalLM`], [`export`] writes one.
//!
//! What llama.cpp's `convert_hf_to_gguf.py` (`BitnetModel`, a `TextModel` that does not permute
//! the q/k rows: llama.cpp runs `bitnet` with NEOX-style rope, transformers' `rotate_half`) writes
//! for a `BitNetForCausalLM`, and what `llama-arch.cpp` / `models/bitnet.cpp` load:
//! * `general.architecture = "bitnet"`; `bitnet.block_count`, `.context_length`,
//!   `.embedding_length`, `.feed_forward_length`, `.attention.head_count`,
//!   `.attention.head_count_kv`, `.rope.freq_base`, `.attention.layer_norm_rms_epsilon`,
//!   `.rope.scaling.type = "linear"`, `.rope.scaling.factor = 1`; `general.file_type`.
//! * Tensors: `token_embd`, `output_norm`, and per layer `blk.N.attn_norm`, `attn_q`, `attn_k`,
//!   `attn_v`, `attn_output`, `attn_sub_norm`, `ffn_norm`, `ffn_gate`, `ffn_up`, `ffn_down`,
//!   `ffn_sub_norm` (all `.weight`). There is no output head: llama.cpp multiplies by
//!   `token_embd` (tied embeddings). An untied head is written as `output.weight` only when asked
//!   ([`ExportOptions::untied_head`]); our reader loads it, llama.cpp ignores it.
//! * The converter stores the projections after transformers' absmean ternarization
//!   (`weight_quant`), then quantizes them to the requested type; embeddings go to F16 for the
//!   TQ types.
//!
//! One difference in what llama.cpp computes from such a file: its `bitnet` graph applies SiLU to
//! the gate (`LLM_FFN_SILU`, right for the older 1bitLLM models), while transformers'
//! `BitNetForCausalLM` applies ReLU² (`relu2`, bitnet-b1.58-2B-4T's activation). The file does
//! not record the activation; [`GgufModel`] builds the transformers model (ReLU²), whose logits
//! the tests match, and [`GgufModel::with_hidden_act`] gives `"silu"`, what llama.cpp computes.

use super::dequant::{dequantize, encode_float};
use super::read::GgufFile;
use super::ternary;
use super::tokenizer::SpmTokenizer;
use super::types::GgmlType;
use super::value::Value;
use super::write::GgufWriter;
use crate::error::ModelError;
use crate::models::bitnet::config::PROJECTIONS;
use crate::models::bitnet::model::{layer_norms, projection_shapes};
use crate::models::bitnet::{BitNetForCausalLM, Config, ProjectionWeight, Runtime, WeightSource};
use bitnet_quant::packed::PackedTernary;
use bitnet_quant::Granularity;
use candle_core::{DType, Device, Result, Tensor};
use std::path::Path;

/// The architecture name.
pub const ARCH: &str = "bitnet";

/// The longest `context_length` a file may state (rotary tables are sized by it): 256 Ki
/// positions, twice the longest context of today's llama.cpp models.
pub const MAX_CONTEXT: usize = 1 << 18;

/// llama.cpp's names of the projections, in transformers' order (`config::PROJECTIONS`).
const GGUF_PROJECTIONS: [&str; 7] = [
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

/// llama.cpp's names of the layer norms, in the order of `model::layer_norms`.
const GGUF_NORMS: [&str; 4] = ["attn_norm", "ffn_norm", "attn_sub_norm", "ffn_sub_norm"];

/// The GGUF name of a transformers tensor name of `BitNetForCausalLM` (`None`: no such tensor).
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let module = rest.strip_suffix(".weight")?;
    let names = [
        "input_layernorm",
        "post_attention_layernorm",
        "self_attn.attn_sub_norm",
        "mlp.ffn_sub_norm",
    ];
    let g = PROJECTIONS
        .iter()
        .position(|p| *p == module)
        .map(|k| GGUF_PROJECTIONS[k])
        .or_else(|| {
            names
                .iter()
                .position(|n| *n == module)
                .map(|k| GGUF_NORMS[k])
        })?;
    Some(format!("blk.{layer}.{g}.weight"))
}

/// A GGUF file of the `bitnet` architecture with its model config. See the [module docs](self).
#[derive(Debug)]
pub struct GgufModel {
    file: GgufFile,
    config: Config,
}

fn count(file: &GgufFile, key: &str) -> Result<usize> {
    match file.get(key) {
        None => Err(file.err(format!("missing metadata `{key}`"))),
        Some(v) => v
            .as_u64()
            .filter(|&n| n > 0 && n <= u32::MAX as u64)
            .map(|n| n as usize)
            .ok_or_else(|| {
                file.err(format!(
                    "`{key}` is {v:?}, expected an integer in 1..=4294967295"
                ))
            }),
    }
}

fn number(file: &GgufFile, key: &str, default: Option<f64>) -> Result<f64> {
    match (file.get(key), default) {
        (None, Some(d)) => Ok(d),
        (None, None) => Err(file.err(format!("missing metadata `{key}`"))),
        (Some(v), _) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| file.err(format!("`{key}` is {v:?}, expected a finite number"))),
    }
}

impl GgufModel {
    /// Memory-maps `path` and reads its config from the metadata; checks that every tensor the
    /// model needs is there with the right shape and nothing else is.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_file(GgufFile::open(path)?)
    }

    /// [`Self::open`] on a parsed file.
    pub fn from_file(file: GgufFile) -> Result<Self> {
        match file.get("general.architecture").and_then(Value::as_str) {
            Some(ARCH) => {}
            other => {
                return Err(file.err(format!(
                    "general.architecture is {other:?}, expected \"{ARCH}\""
                )))
            }
        }
        let k = |s: &str| format!("{ARCH}.{s}");
        let hidden = count(&file, &k("embedding_length"))?;
        let heads = count(&file, &k("attention.head_count"))?;
        let kv = match file.get(&k("attention.head_count_kv")) {
            None => heads,
            Some(_) => count(&file, &k("attention.head_count_kv"))?,
        };
        let head_dim = match file.get(&k("attention.key_length")) {
            None => None,
            Some(_) => Some(count(&file, &k("attention.key_length"))?),
        };
        let (vocab, embd_dim) = match file.tensor_info("token_embd.weight").map(|t| t.shape()) {
            Some(s) if s.len() == 2 => (s[0], s[1]),
            other => {
                return Err(file.err(format!(
                    "tensor `token_embd.weight` is {other:?}, expected [vocab, {hidden}]"
                )))
            }
        };
        if embd_dim != hidden {
            return Err(file.err(format!(
                "tensor `token_embd.weight` is [{vocab}, {embd_dim}], expected [vocab, {hidden}] ({ARCH}.embedding_length)"
            )));
        }
        // The rotary tables are built for every position up front: a bound keeps a corrupt
        // field from sizing a huge allocation (2B4T has 4096, long-context models 128 Ki).
        let context = count(&file, &k("context_length"))?;
        if context > MAX_CONTEXT {
            return Err(file.err(format!(
                "`{}` is {context}, allowed 1..={MAX_CONTEXT}",
                k("context_length")
            )));
        }
        // Each layer has 11 tensors: a count the file cannot hold is an error before anything
        // is sized by it.
        let layers = count(&file, &k("block_count"))?;
        if layers > file.tensors().len() / 11 {
            return Err(file.err(format!(
                "`{}` is {layers}, but the file's {} tensors hold at most {} layers of 11",
                k("block_count"),
                file.tensors().len(),
                file.tensors().len() / 11
            )));
        }
        let tok_id = |key: &str| file.get(key).and_then(Value::as_u64).map(|v| v as u32);
        let config = serde_json::json!({
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": count(&file, &k("feed_forward_length"))?,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": head_dim,
            "rms_norm_eps": number(&file, &k("attention.layer_norm_rms_epsilon"), None)?,
            "rope_theta": number(&file, &k("rope.freq_base"), Some(10000.0))?,
            "max_position_embeddings": context,
            "tie_word_embeddings": file.tensor_info("output.weight").is_none(),
            "bos_token_id": tok_id("tokenizer.ggml.bos_token_id"),
            "eos_token_id": tok_id("tokenizer.ggml.eos_token_id"),
            "hidden_act": "relu2",
            "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                    "quantization_mode": "offline"},
        });
        let config = Config::from_json_str(&config.to_string(), file.name())?;
        let model = Self { file, config };
        model.check_tensors()?;
        Ok(model)
    }

    fn check_tensors(&self) -> Result<()> {
        let cfg = &self.config;
        let mut want = vec![
            (
                "token_embd.weight".to_string(),
                vec![cfg.vocab_size, cfg.hidden_size],
            ),
            ("output_norm.weight".to_string(), vec![cfg.hidden_size]),
        ];
        if !cfg.tie_word_embeddings {
            want.push((
                "output.weight".into(),
                vec![cfg.vocab_size, cfg.hidden_size],
            ));
        }
        for l in 0..cfg.num_hidden_layers {
            for ((_, dim), g) in layer_norms(cfg).into_iter().zip(GGUF_NORMS) {
                want.push((format!("blk.{l}.{g}.weight"), vec![dim]));
            }
            for ((_, out, inp), g) in projection_shapes(cfg).into_iter().zip(GGUF_PROJECTIONS) {
                want.push((format!("blk.{l}.{g}.weight"), vec![out, inp]));
            }
        }
        for (name, shape) in &want {
            let t = self.file.tensor_info(name).ok_or_else(|| {
                self.file.err(format!(
                    "missing tensor `{name}` (a {ARCH} model of {} layers needs it)",
                    cfg.num_hidden_layers
                ))
            })?;
            if t.shape() != *shape {
                return Err(self.file.err(format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    t.shape()
                )));
            }
        }
        if let Some(extra) = self
            .file
            .tensors()
            .iter()
            .find(|t| !want.iter().any(|(n, _)| *n == t.name))
        {
            return Err(self.file.err(format!(
                "unknown tensor `{}` (not part of a {ARCH} model; llama.cpp's optional per-projection `.scale` tensors are not supported)",
                extra.name
            )));
        }
        Ok(())
    }

    /// The same file read with another feed-forward activation (`"relu2"`, the default, or
    /// `"silu"`, what llama.cpp's `bitnet` graph computes).
    pub fn with_hidden_act(mut self, act: &str) -> Result<Self> {
        self.config.hidden_act = act.to_string();
        self.config.validate(self.file.name())?;
        Ok(self)
    }

    /// The model config read from the metadata (offline `autobitlinear` form, ReLU²).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The parsed file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The tokenizer in the metadata (`None` when the file has none).
    pub fn tokenizer(&self) -> Result<Option<SpmTokenizer>> {
        SpmTokenizer::from_gguf(&self.file)
    }

    /// The inference model: ternary tensors become packed weights ([`Runtime::Packed`]), or f32
    /// ones for [`Runtime::Dense`].
    pub fn load_model(&self, runtime: Runtime) -> Result<BitNetForCausalLM> {
        BitNetForCausalLM::from_source(&self.config, self, runtime)
    }

    fn values(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let (info, bytes) = self.file.tensor_bytes(name)?;
        let shape = info.shape();
        let v = dequantize(name, info.dtype, &shape, bytes).map_err(|e| self.file.err(e))?;
        Ok((shape, v))
    }

    /// The float dtype tensor `name` (GGUF name) is stored in; `None` for a quantized type or a
    /// missing tensor. The embedding's tells which 16-bit type keeps it exactly
    /// ([`BitNetForCausalLM::to_weight_dtype`]).
    pub fn stored_dtype(&self, name: &str) -> Option<DType> {
        match self.file.tensor_info(name)?.dtype {
            GgmlType::F32 => Some(DType::F32),
            GgmlType::F16 => Some(DType::F16),
            GgmlType::BF16 => Some(DType::BF16),
            _ => None,
        }
    }

    /// Tensor `name` (GGUF name) as f32 values in candle's shape, dequantized as llama.cpp does.
    pub fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        let (shape, v) = self.values(name)?;
        Tensor::from_vec(v, shape, &Device::Cpu)
    }
}

/// Whether every value is 0 or ±a for one `a > 0`: then it is `Some(a)`.
fn ternary_scale(v: &[f32]) -> Option<f32> {
    let a = v.iter().find(|x| **x != 0.0)?.abs();
    v.iter().all(|x| *x == 0.0 || x.abs() == a).then_some(a)
}

impl WeightSource for GgufModel {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let g = match name {
            // A tied head is the embedding (llama.cpp has no output slot).
            "lm_head.weight" if self.config.tie_word_embeddings => "token_embd.weight".into(),
            _ => gguf_name(name)
                .ok_or_else(|| self.file.err(format!("no GGUF tensor for `{name}`")))?,
        };
        let t = self.tensor_f32(&g)?;
        if t.dims() != shape {
            return Err(self.file.err(format!(
                "tensor `{g}` has shape {:?}, expected {shape:?}",
                t.dims()
            )));
        }
        Ok(t)
    }

    fn projection(&self, module: &str, out: usize, inp: usize) -> Result<ProjectionWeight> {
        let hf = format!("{module}.weight");
        let g =
            gguf_name(&hf).ok_or_else(|| self.file.err(format!("no GGUF tensor for `{hf}`")))?;
        let (info, bytes) = self.file.tensor_bytes(&g)?;
        if info.shape() != [out, inp] {
            return Err(self.file.err(format!(
                "tensor `{g}` has shape {:?}, expected [{out}, {inp}]",
                info.shape()
            )));
        }
        if info.dtype.is_ternary() {
            let p = ternary::to_packed(&g, info.dtype, out, inp, bytes)
                .map_err(|e| self.file.err(e))?;
            return Ok(ProjectionWeight::Packed(p));
        }
        // Float projections (llama.cpp's converter falls back to F16 for rows that are not whole
        // TQ blocks) hold `level * s` after its ternarization: pack them with that one scale, so
        // the model multiplies by exactly what llama.cpp does. Other values stay latent.
        let (_, v) = self.values(&g)?;
        match ternary_scale(&v) {
            Some(a) => {
                let levels: Vec<f32> = v.iter().map(|x| (x / a).round()).collect();
                let w = Tensor::from_vec(levels, (out, inp), &Device::Cpu)?;
                let q = bitnet_quant::Quantizer::new(
                    bitnet_quant::Scheme::TernaryAbsmeanHf,
                    bitnet_quant::Estimator::Identity,
                )?;
                let p = PackedTernary::pack(&w, &q)?;
                let data = p.data().to_vec();
                let p = PackedTernary::from_raw(out, inp, Granularity::PerTensor, &data, &[a])?;
                Ok(ProjectionWeight::Packed(p))
            }
            None => Ok(ProjectionWeight::Latent(Tensor::from_vec(
                v,
                (out, inp),
                &Device::Cpu,
            )?)),
        }
    }
}

/// What [`export`] writes.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// The type of the projections: TQ1_0, TQ2_0 or I2_S.
    pub ternary: GgmlType,
    /// The type of the embedding (and an untied head): F32, F16 (llama.cpp's converter's choice
    /// with TQ types), BF16 or Q8_0.
    pub embeddings: GgmlType,
    /// `general.name`.
    pub name: String,
    /// Write an untied output head as `output.weight` (which llama.cpp's `bitnet` architecture
    /// does not load) instead of refusing the model.
    pub untied_head: bool,
    /// Metadata to copy (the `tokenizer.*` keys of another GGUF file, for instance).
    pub extra_metadata: Vec<(String, Value)>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            ternary: GgmlType::TQ2_0,
            embeddings: GgmlType::F16,
            name: "bitnet".into(),
            untied_head: false,
            extra_metadata: Vec::new(),
        }
    }
}

/// llama.cpp's `general.file_type` (`llama_ftype`) of a file whose projections are `t`.
fn file_type(t: GgmlType) -> u32 {
    match t {
        GgmlType::TQ1_0 => 36,
        GgmlType::TQ2_0 => 37,
        // bitnet.cpp's LLAMA_FTYPE_MOSTLY_I2_S.
        GgmlType::I2S => 40,
        GgmlType::F16 => 1,
        GgmlType::BF16 => 32,
        GgmlType::Q8_0 => 7,
        _ => 0,
    }
}

/// `model` (any runtime) as a GGUF file of the `bitnet` architecture. See [`ExportOptions`].
pub fn export(model: &BitNetForCausalLM, opts: &ExportOptions) -> Result<GgufWriter> {
    let cfg = model.config();
    let bad =
        |what: String| -> candle_core::Error { ModelError::config("export", "gguf", what).into() };
    if !opts.ternary.is_ternary() {
        return Err(bad(format!(
            "projection type {} is not tq1_0, tq2_0 or i2_s",
            opts.ternary
        )));
    }
    if !matches!(
        opts.embeddings,
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0
    ) {
        return Err(bad(format!(
            "embedding type {} is not f32, f16, bf16 or q8_0",
            opts.embeddings
        )));
    }
    let named = model.named_tensors();
    let has_head = named.iter().any(|(n, _)| n == "lm_head.weight");
    if has_head && !opts.untied_head {
        return Err(bad("the model has an untied lm_head, which llama.cpp's bitnet architecture cannot hold (it multiplies by token_embd); tie the embeddings, or allow writing it as `output.weight`, which only this reader loads".into()));
    }
    let mut w = GgufWriter::new();
    let k = |s: &str| format!("{ARCH}.{s}");
    w.set("general.architecture", Value::String(ARCH.into()));
    w.set("general.type", Value::String("model".into()));
    w.set("general.name", Value::String(opts.name.clone()));
    w.set(k("block_count"), Value::U32(cfg.num_hidden_layers as u32));
    w.set(
        k("context_length"),
        Value::U32(cfg.max_position_embeddings as u32),
    );
    w.set(k("embedding_length"), Value::U32(cfg.hidden_size as u32));
    w.set(
        k("feed_forward_length"),
        Value::U32(cfg.intermediate_size as u32),
    );
    w.set(
        k("attention.head_count"),
        Value::U32(cfg.num_attention_heads as u32),
    );
    w.set(
        k("attention.head_count_kv"),
        Value::U32(cfg.num_key_value_heads as u32),
    );
    if cfg.head_dim() * cfg.num_attention_heads != cfg.hidden_size {
        w.set(k("attention.key_length"), Value::U32(cfg.head_dim() as u32));
        w.set(
            k("attention.value_length"),
            Value::U32(cfg.head_dim() as u32),
        );
    }
    w.set(k("rope.freq_base"), Value::F32(cfg.rope_theta() as f32));
    w.set(
        k("attention.layer_norm_rms_epsilon"),
        Value::F32(cfg.rms_norm_eps as f32),
    );
    w.set("general.file_type", Value::U32(file_type(opts.ternary)));
    w.set(k("rope.scaling.type"), Value::String("linear".into()));
    w.set(k("rope.scaling.factor"), Value::F32(1.0));
    w.set("general.quantization_version", Value::U32(2));
    for (key, v) in &opts.extra_metadata {
        w.set(key.clone(), v.clone());
    }
    for (name, t) in &named {
        let g = gguf_name(name).ok_or_else(|| bad(format!("no GGUF name for `{name}`")))?;
        let shape = t.dims().to_vec();
        let v = t
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        let dtype = match shape.len() {
            1 => GgmlType::F32,
            _ => opts.embeddings,
        };
        let row = *shape.last().unwrap_or(&1);
        let bytes = encode_float(dtype, &v, row).map_err(|e| bad(format!("`{g}`: {e}")))?;
        w.add_tensor(g, &shape, dtype, bytes)?;
    }
    for (name, p) in model.projections() {
        let g = gguf_name(&format!("{name}.weight")).expect("projection names map");
        let packed = match p.weight()? {
            ProjectionWeight::Packed(p) => p,
            latent => latent.to_packed()?,
        };
        let bytes = ternary::from_packed(&packed, opts.ternary).map_err(|e| {
            bad(format!(
                "`{g}` [{}, {}]: {e}",
                packed.out_features(),
                packed.in_features()
            ))
        })?;
        w.add_tensor(
            g,
            &[packed.out_features(), packed.in_features()],
            opts.ternary,
            bytes,
        )?;
    }
    Ok(w)
}

/// The `tokenizer.*` metadata of `file`, to copy into an exported file.
pub fn tokenizer_metadata(file: &GgufFile) -> Vec<(String, Value)> {
    file.metadata()
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .cloned()
        .collect()
}
