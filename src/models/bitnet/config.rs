//! [`Config`]: the `config.json` of a Hugging Face `BitNetForCausalLM`, read with serde.

use crate::error::ModelError;
use bitnet_quant::packed::HfLinearClass;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The model's shape and numerics, as transformers' `BitNetConfig` writes them. Unknown fields are
/// ignored; the shape fields are required ([`Config::from_json_str`] names a missing one).
///
/// ```
/// use bitnet::models::bitnet::Config;
/// let cfg = Config::from_json_str(
///     r#"{"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
///         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
///         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}"#,
///     "config.json",
/// ).unwrap();
/// assert_eq!((cfg.head_dim(), cfg.rope_theta()), (16, 10000.0));
/// let err = Config::from_json_str(r#"{"vocab_size": 256}"#, "config.json").unwrap_err();
/// assert!(err.to_string().contains("hidden_size"));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Tokens in the vocabulary (rows of the embedding and of the output head).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the feed-forward's gate and up projections.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); divides `num_attention_heads`.
    pub num_key_value_heads: usize,
    /// Size of one head; `hidden_size / num_attention_heads` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Epsilon of every RMSNorm (transformers' default 1e-5).
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// The feed-forward activation: BitNet b1.58's `relu2` (ReLU squared), or `silu` (the older
    /// 1bitLLM BitNet models, and what llama.cpp's `bitnet` graph applies).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Longest sequence the rotary tables cover.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// The rotary base in the older config style (transformers 4.x).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// The rotary parameters in the transformers 5.x style.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    /// Whether the output head reuses the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Beginning-of-text token.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-text token(s): one id or a list.
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Biases on the attention projections; BitNet has none (true is rejected).
    #[serde(default)]
    pub attention_bias: bool,
    /// How the projections are quantized; absent for a plain full-precision model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<QuantizationConfig>,
}

/// `rope_parameters` (transformers 5.x).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    /// Only `"default"` (plain RoPE) is supported.
    #[serde(default = "default_rope_type")]
    pub rope_type: String,
    /// The rotary base.
    pub rope_theta: f64,
}

/// One token id or several (transformers writes either for `eos_token_id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

/// `quantization_config` of a BitNet checkpoint (transformers' `BitNetQuantConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizationConfig {
    /// Must be `"bitnet"`.
    pub quant_method: String,
    /// `"autobitlinear"` or `"bitlinear"` (the default, the legacy class).
    #[serde(default = "default_linear_class")]
    pub linear_class: String,
    /// `"online"` (latent weights, quantized at every forward) or `"offline"` (packed codes and
    /// `weight_scale`; the default).
    #[serde(default = "default_mode")]
    pub quantization_mode: String,
    /// An RMSNorm inside every projection; not used by BitNet models (true is rejected).
    #[serde(default)]
    pub use_rms_norm: bool,
    /// Modules left as plain linear layers; may not name a decoder projection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_not_convert: Option<Vec<String>>,
}

/// How a checkpoint stores its projection weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightForm {
    /// No `quantization_config`: plain full-precision linear layers.
    FullPrecision,
    /// Latent weights, ternarized by transformers' `WeightQuant` at every forward.
    Online,
    /// 2-bit codes packed 4 per byte plus a `weight_scale`, in the convention of the class.
    Offline(HfLinearClass),
}

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "relu2".into()
}
fn default_max_positions() -> usize {
    2048
}
fn default_rope_type() -> String {
    "default".into()
}
fn default_linear_class() -> String {
    "bitlinear".into()
}
fn default_mode() -> String {
    "offline".into()
}

/// transformers' `BitNetConfig.default_theta`.
pub const DEFAULT_ROPE_THETA: f64 = 500_000.0;

/// Every decoder projection, as named under `model.layers.{i}`.
pub const PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// The fields whose absence is an error.
const REQUIRED: [&str; 6] = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
];

/// The JSON type a field must have.
#[derive(Clone, Copy)]
enum Kind {
    Count,
    Number,
    Text,
    Flag,
}

const TYPED: [(&str, Kind); 14] = [
    ("vocab_size", Kind::Count),
    ("hidden_size", Kind::Count),
    ("intermediate_size", Kind::Count),
    ("num_hidden_layers", Kind::Count),
    ("num_attention_heads", Kind::Count),
    ("num_key_value_heads", Kind::Count),
    ("head_dim", Kind::Count),
    ("rms_norm_eps", Kind::Number),
    ("hidden_act", Kind::Text),
    ("max_position_embeddings", Kind::Count),
    ("rope_theta", Kind::Number),
    ("tie_word_embeddings", Kind::Flag),
    ("bos_token_id", Kind::Count),
    ("attention_bias", Kind::Flag),
];

/// Checks `obj[name]` (absent or null passes) against `kind`, naming `path` when it fails.
fn check_type(file: &str, path: &str, v: Option<&Value>, kind: Kind) -> Result<(), ModelError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(());
    };
    let (ok, want) = match kind {
        Kind::Count => (
            v.as_u64().is_some_and(|n| n <= u32::MAX as u64),
            "an integer in 0..=4294967295",
        ),
        Kind::Number => (v.is_number(), "a number"),
        Kind::Text => (v.is_string(), "a string"),
        Kind::Flag => (v.is_boolean(), "true or false"),
    };
    match ok {
        true => Ok(()),
        false => Err(ModelError::config(
            file,
            path,
            format!("is {v}, expected {want}"),
        )),
    }
}

impl Config {
    /// Parses and validates a `config.json` text; `file` names it in errors. A missing required
    /// field, a field of the wrong type and a value outside what the model supports are errors
    /// naming the field.
    pub fn from_json_str(text: &str, file: &str) -> Result<Self, ModelError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| ModelError::config(file, "(json)", e.to_string()))?;
        let obj = value
            .as_object()
            .ok_or_else(|| ModelError::config(file, "(json)", "the top level is not an object"))?;
        for name in REQUIRED {
            if obj.get(name).is_none_or(Value::is_null) {
                return Err(ModelError::config(file, name, "missing (a required field)"));
            }
        }
        for (name, kind) in TYPED {
            check_type(file, name, obj.get(name), kind)?;
        }
        check_eos(file, obj)?;
        check_nested(file, obj)?;
        let cfg: Config = serde_json::from_value(value)
            .map_err(|e| ModelError::config(file, "(json)", e.to_string()))?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// Reads and validates `path` (see [`Self::from_json_str`]).
    pub fn load(path: &std::path::Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Rejects what the model cannot run, naming the field and the allowed values; `file` names
    /// the source in the message.
    pub fn validate(&self, file: &str) -> Result<(), ModelError> {
        let bad = |field: &str, reason: String| Err(ModelError::config(file, field, reason));
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(field, "is 0, allowed: an integer >= 1".into());
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return bad(
                "num_key_value_heads",
                format!(
                    "is {}, allowed: a divisor of num_attention_heads ({})",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            );
        }
        let hd = match self.head_dim {
            Some(hd) => hd,
            None if self.hidden_size % self.num_attention_heads == 0 => {
                self.hidden_size / self.num_attention_heads
            }
            None => {
                return bad(
                    "num_attention_heads",
                    format!(
                        "is {}, allowed: a divisor of hidden_size ({})",
                        self.num_attention_heads, self.hidden_size
                    ),
                )
            }
        };
        // attn_sub_norm normalises the heads' concatenation with a hidden_size-wide weight.
        if hd == 0 || hd % 2 != 0 || hd * self.num_attention_heads != self.hidden_size {
            return bad(
                "head_dim",
                format!(
                    "is {hd}, allowed: an even size with head_dim * num_attention_heads = hidden_size ({})",
                    self.hidden_size
                ),
            );
        }
        if self.hidden_act != "relu2" && self.hidden_act != "silu" {
            return bad(
                "hidden_act",
                format!("is {:?}, allowed: \"relu2\" or \"silu\"", self.hidden_act),
            );
        }
        if self.attention_bias {
            return bad("attention_bias", "is true, allowed: false".into());
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(
                "rms_norm_eps",
                format!("is {}, allowed: a finite number > 0", self.rms_norm_eps),
            );
        }
        if let Some(r) = &self.rope_parameters {
            if r.rope_type != "default" {
                return bad(
                    "rope_parameters.rope_type",
                    format!("is {:?}, allowed: \"default\"", r.rope_type),
                );
            }
        }
        let theta = self.rope_theta();
        if !(theta.is_finite() && theta > 0.0) {
            return bad(
                "rope_parameters.rope_theta",
                format!("is {theta}, allowed: a finite number > 0"),
            );
        }
        if let Some(q) = &self.quantization_config {
            if q.quant_method != "bitnet" {
                return bad(
                    "quantization_config.quant_method",
                    format!("is {:?}, allowed: \"bitnet\"", q.quant_method),
                );
            }
            if !["bitlinear", "autobitlinear"].contains(&q.linear_class.as_str()) {
                return bad(
                    "quantization_config.linear_class",
                    format!(
                        "is {:?}, allowed: \"bitlinear\" or \"autobitlinear\"",
                        q.linear_class
                    ),
                );
            }
            if !["online", "offline"].contains(&q.quantization_mode.as_str()) {
                return bad(
                    "quantization_config.quantization_mode",
                    format!(
                        "is {:?}, allowed: \"online\" or \"offline\"",
                        q.quantization_mode
                    ),
                );
            }
            if q.quantization_mode == "online" && q.linear_class != "autobitlinear" {
                return bad(
                    "quantization_config.quantization_mode",
                    "is \"online\", which transformers runs with linear_class \"autobitlinear\" only".into(),
                );
            }
            if q.use_rms_norm {
                return bad(
                    "quantization_config.use_rms_norm",
                    "is true, allowed: false (BitNet models place attn_sub_norm / ffn_sub_norm themselves)".into(),
                );
            }
            for m in q.modules_to_not_convert.iter().flatten() {
                if PROJECTIONS.iter().any(|p| m.ends_with(p) || m.contains(p)) {
                    return bad(
                        "quantization_config.modules_to_not_convert",
                        format!("names {m:?}, a decoder projection; allowed: modules outside the decoder layers (lm_head)"),
                    );
                }
            }
        }
        Ok(())
    }

    /// The size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The rotary base: `rope_parameters.rope_theta`, else `rope_theta`, else transformers'
    /// BitNet default ([`DEFAULT_ROPE_THETA`]).
    pub fn rope_theta(&self) -> f64 {
        match (&self.rope_parameters, self.rope_theta) {
            (Some(r), _) => r.rope_theta,
            (None, Some(t)) => t,
            (None, None) => DEFAULT_ROPE_THETA,
        }
    }

    /// The end-of-text ids (empty when the config has none).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            None => Vec::new(),
            Some(TokenIds::One(t)) => vec![*t],
            Some(TokenIds::Many(ts)) => ts.clone(),
        }
    }

    /// How the checkpoint stores its projections.
    pub fn weight_form(&self) -> WeightForm {
        match &self.quantization_config {
            None => WeightForm::FullPrecision,
            Some(q) if q.quantization_mode == "online" => WeightForm::Online,
            Some(q) => WeightForm::Offline(match q.linear_class.as_str() {
                "autobitlinear" => HfLinearClass::AutoBitLinear,
                _ => HfLinearClass::BitLinear,
            }),
        }
    }

    /// The same config stating another weight form (what [`crate::io::hf::save`] writes).
    pub fn with_weight_form(&self, form: WeightForm) -> Self {
        let q = |class: &str, mode: &str| QuantizationConfig {
            quant_method: "bitnet".into(),
            linear_class: class.into(),
            quantization_mode: mode.into(),
            use_rms_norm: false,
            modules_to_not_convert: None,
        };
        let quantization_config = match form {
            WeightForm::FullPrecision => None,
            WeightForm::Online => Some(q("autobitlinear", "online")),
            WeightForm::Offline(HfLinearClass::AutoBitLinear) => {
                Some(q("autobitlinear", "offline"))
            }
            WeightForm::Offline(HfLinearClass::BitLinear) => Some(q("bitlinear", "offline")),
        };
        Self {
            quantization_config,
            ..self.clone()
        }
    }

    /// A small config in the shape of microsoft/bitnet-b1.58-2B-4T's layers (hidden 2560,
    /// intermediate 6912, 20 heads over 5 key/value heads of 128) with `layers` layers and a
    /// vocabulary of `vocab_size`: what the speed benches run.
    pub fn b158_2b_shapes(layers: usize, vocab_size: usize) -> Self {
        Self {
            vocab_size,
            hidden_size: 2560,
            intermediate_size: 6912,
            num_hidden_layers: layers,
            num_attention_heads: 20,
            num_key_value_heads: 5,
            head_dim: None,
            rms_norm_eps: 1e-5,
            hidden_act: "relu2".into(),
            max_position_embeddings: 4096,
            rope_theta: None,
            rope_parameters: Some(RopeParameters {
                rope_type: "default".into(),
                rope_theta: DEFAULT_ROPE_THETA,
            }),
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_id: None,
            attention_bias: false,
            quantization_config: None,
        }
        .with_weight_form(WeightForm::Online)
    }
}

/// `eos_token_id`: an id, a list of ids, or null.
fn check_eos(file: &str, obj: &Map<String, Value>) -> Result<(), ModelError> {
    match obj.get("eos_token_id") {
        None | Some(Value::Null) => Ok(()),
        Some(v) if v.as_u64().is_some_and(|n| n <= u32::MAX as u64) => Ok(()),
        Some(Value::Array(a))
            if a.iter()
                .all(|v| v.as_u64().is_some_and(|n| n <= u32::MAX as u64)) =>
        {
            Ok(())
        }
        Some(v) => Err(ModelError::config(
            file,
            "eos_token_id",
            format!("is {v}, expected a token id or a list of them"),
        )),
    }
}

/// The nested objects: `rope_parameters` and `quantization_config`.
fn check_nested(file: &str, obj: &Map<String, Value>) -> Result<(), ModelError> {
    if let Some(r) = obj.get("rope_parameters").filter(|v| !v.is_null()) {
        let r = r.as_object().ok_or_else(|| {
            ModelError::config(
                file,
                "rope_parameters",
                format!("is {r}, expected an object"),
            )
        })?;
        if r.get("rope_theta").is_none_or(Value::is_null) {
            return Err(ModelError::config(
                file,
                "rope_parameters.rope_theta",
                "missing (a required field)",
            ));
        }
        check_type(
            file,
            "rope_parameters.rope_theta",
            r.get("rope_theta"),
            Kind::Number,
        )?;
        check_type(
            file,
            "rope_parameters.rope_type",
            r.get("rope_type"),
            Kind::Text,
        )?;
    }
    if let Some(q) = obj.get("quantization_config").filter(|v| !v.is_null()) {
        let q = q.as_object().ok_or_else(|| {
            ModelError::config(
                file,
                "quantization_config",
                format!("is {q}, expected an object"),
            )
        })?;
        if q.get("quant_method").is_none_or(Value::is_null) {
            return Err(ModelError::config(
                file,
                "quantization_config.quant_method",
                "missing (a required field)",
            ));
        }
        for (name, kind) in [
            ("quant_method", Kind::Text),
            ("linear_class", Kind::Text),
            ("quantization_mode", Kind::Text),
            ("use_rms_norm", Kind::Flag),
        ] {
            check_type(
                file,
                &format!("quantization_config.{name}"),
                q.get(name),
                kind,
            )?;
        }
        if let Some(m) = q.get("modules_to_not_convert").filter(|v| !v.is_null()) {
            if !m.as_array().is_some_and(|a| a.iter().all(Value::is_string)) {
                return Err(ModelError::config(
                    file,
                    "quantization_config.modules_to_not_convert",
                    format!("is {m}, expected a list of module names"),
                ));
            }
        }
    }
    Ok(())
}
