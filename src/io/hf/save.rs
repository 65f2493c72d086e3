//! [`save`]: a model as a Hugging Face checkpoint directory that transformers loads.

use crate::error::ModelError;
use crate::models::bitnet::{BitNetForCausalLM, WeightForm};
use bitnet_quant::packed::HfLinearClass;
use candle_core::{DType, Result, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Which form [`save`] writes the projections in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveForm {
    /// Latent weights (`quantization_mode = "online"`, `linear_class = "autobitlinear"`); a
    /// full-precision model is saved as a plain `BitNetForCausalLM` with no
    /// `quantization_config`.
    Online,
    /// Ternary codes packed 4 per byte plus `weight_scale = mean|W|` (`"offline"`,
    /// `"autobitlinear"`): 0.25 bytes per projection weight. Needs every projection's row count
    /// to be a multiple of 4 (transformers' layout).
    Offline,
}

/// Writes `path` through a temporary file in the same folder and a rename, so that a crash
/// never leaves a half-written file in its place.
fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension()
            .map_or(String::new(), |e| e.to_string_lossy().into_owned())
    ));
    write(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e).into())
}

/// The name transformers gives a dtype in `config.json`.
fn dtype_name(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        other => {
            return Err(ModelError::config(
                "save",
                "dtype",
                format!("is {other:?}, allowed: F32, F16 or BF16"),
            )
            .into())
        }
    })
}

/// Writes `model` into `dir` (created if needed) as `config.json` and `model.safetensors`, the
/// projections in `form`, every other tensor (embedding, norms, untied head) and latent
/// projection weights in `dtype` (f32, f16 or bf16); copies `tokenizer` as `tokenizer.json` when
/// given. A packed model saved [`SaveForm::Online`] gets the latent weights of
/// [`crate::models::bitnet::ProjectionWeight::to_latent`], which transformers' online
/// quantizer maps back to the same codes and scales.
///
/// ```
/// use bitnet::io::hf::{save, HfCheckpoint, SaveForm};
/// use bitnet::models::bitnet::{BitNetForCausalLM, Config, Runtime};
/// use bitnet::training::QATConfig;
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// # fn main() -> candle_core::Result<()> {
/// let cfg = Config::from_json_str(r#"{"vocab_size": 64, "hidden_size": 32,
///     "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
///     "num_key_value_heads": 2}"#, "config")?;
/// let vm = VarMap::new();
/// let model = BitNetForCausalLM::new(&cfg, QATConfig::ternary_hf(), VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
/// let dir = std::env::temp_dir().join(format!("bitnet-save-doc-{}", std::process::id()));
/// save(&model, &dir, SaveForm::Offline, DType::F32, None)?;
/// let back = HfCheckpoint::open(&dir)?.load_model(Runtime::Packed)?;
/// assert_eq!(back.config().num_hidden_layers, 1);
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok(()) }
/// ```
pub fn save(
    model: &BitNetForCausalLM,
    dir: impl AsRef<Path>,
    form: SaveForm,
    dtype: DType,
    tokenizer: Option<&Path>,
) -> Result<()> {
    let dir = dir.as_ref();
    let dtype_str = dtype_name(dtype)?;
    let quantized = model.projections().iter().any(|(_, p)| p.quantized());
    let weight_form = match (quantized, form) {
        (false, SaveForm::Online) => WeightForm::FullPrecision,
        (false, SaveForm::Offline) => {
            return Err(ModelError::config(
                "save",
                "form",
                "is Offline, but the model is full precision (no ternary codes to pack); allowed: Online",
            )
            .into())
        }
        (true, SaveForm::Online) => WeightForm::Online,
        (true, SaveForm::Offline) => WeightForm::Offline(HfLinearClass::AutoBitLinear),
    };
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in model.named_tensors() {
        tensors.insert(name, t.detach().to_dtype(dtype)?.contiguous()?);
    }
    for (name, p) in model.projections() {
        let w = p.weight()?;
        match weight_form {
            WeightForm::Offline(class) => {
                let packed = w.to_packed()?;
                if packed.out_features() % 4 != 0 {
                    return Err(ModelError::checkpoint(
                        dir.display().to_string(),
                        format!("`{name}.weight` has {} rows, not a multiple of 4: the offline form cannot hold it (save it online)", packed.out_features()),
                    )
                    .into());
                }
                let (codes, scale) = packed.to_hf(class)?;
                tensors.insert(format!("{name}.weight"), codes);
                tensors.insert(format!("{name}.weight_scale"), scale.to_dtype(dtype)?);
            }
            _ => {
                tensors.insert(format!("{name}.weight"), w.to_latent()?.to_dtype(dtype)?);
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut config = serde_json::to_value(model.config().with_weight_form(weight_form))
        .map_err(|e| ModelError::config("save", "(json)", e.to_string()))?;
    let obj = config
        .as_object_mut()
        .expect("a struct serialises to an object");
    obj.insert(
        "architectures".into(),
        serde_json::json!(["BitNetForCausalLM"]),
    );
    obj.insert("model_type".into(), serde_json::json!("bitnet"));
    obj.insert("dtype".into(), serde_json::json!(dtype_str));
    let text = serde_json::to_string_pretty(&config).expect("JSON values serialise") + "\n";
    let weights = dir.join("model.safetensors");
    write_atomic(&weights, |tmp| {
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(&tensors, Some(metadata), tmp).map_err(|e| {
            ModelError::checkpoint(tmp.display().to_string(), format!("writing: {e}")).into()
        })
    })?;
    let cfg_path = dir.join("config.json");
    write_atomic(&cfg_path, |tmp| {
        std::fs::write(tmp, text.as_bytes()).map_err(|e| ModelError::io(tmp, e).into())
    })?;
    if let Some(tok) = tokenizer {
        let dst = dir.join("tokenizer.json");
        if tok != dst {
            write_atomic(&dst, |tmp| {
                std::fs::copy(tok, tmp)
                    .map(|_| ())
                    .map_err(|e| ModelError::io(tok, e).into())
            })?;
        }
    }
    Ok(())
}
