//! [`HfCheckpoint`]: an opened, checked Hugging Face BitNet checkpoint directory.

use crate::error::ModelError;
use crate::models::bitnet::model::{layer_norms, projection_shapes};
use crate::models::bitnet::{
    BitNetForCausalLM, Config, ProjectionWeight, Runtime, WeightForm, WeightSource,
};
use bitnet_quant::PackedTernary;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// What a tensor of the checkpoint must be.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    /// A float tensor (bf16, f16, f32) of this shape.
    Float(Vec<usize>),
    /// Packed codes: u8 `[out / 4, in]` of a projection with `out` rows.
    Packed { out: usize, inp: usize },
    /// One float value (`weight_scale`: shape `[1]` or `[]`).
    Scalar,
}

/// An opened checkpoint: its config, its memory-mapped safetensors files (every tensor checked
/// against the config), its tokenizer file if there is one. See the [module docs](super).
pub struct HfCheckpoint {
    dir: PathBuf,
    config: Config,
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// Tensor name -> index into `files`.
    routing: HashMap<String, usize>,
    tokenizer: Option<PathBuf>,
}

impl std::fmt::Debug for HfCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfCheckpoint")
            .field("dir", &self.dir)
            .field("config", &self.config)
            .field(
                "files",
                &self.files.iter().map(|f| &f.0).collect::<Vec<_>>(),
            )
            .field("tokenizer", &self.tokenizer)
            .finish()
    }
}

fn name_of(p: &Path) -> String {
    p.display().to_string()
}

/// Tensor name -> shard file name, from `model.safetensors.index.json`.
type ShardIndex = HashMap<String, String>;

/// The safetensors files of `dir`: `model.safetensors`, or the shards named by
/// `model.safetensors.index.json` (with the index's tensor -> file map).
fn weight_files(dir: &Path) -> Result<(Vec<PathBuf>, Option<ShardIndex>)> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::checkpoint(name_of(&index), format!("not JSON: {e}")))?;
        let map = v["weight_map"].as_object().ok_or_else(|| {
            ModelError::checkpoint(
                name_of(&index),
                "no `weight_map` object (tensor name -> file)",
            )
        })?;
        let mut routes = HashMap::new();
        let mut files: Vec<String> = Vec::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| {
                ModelError::checkpoint(
                    name_of(&index),
                    format!("weight_map[{tensor:?}] is {file}, expected a file name"),
                )
            })?;
            if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                return Err(ModelError::checkpoint(name_of(&index), format!("weight_map[{tensor:?}] = {file:?} is not a file in the checkpoint's folder")).into());
            }
            if !files.iter().any(|f| f == file) {
                files.push(file.to_string());
            }
            routes.insert(tensor.clone(), file.to_string());
        }
        files.sort();
        return Ok((
            files.into_iter().map(|f| dir.join(f)).collect(),
            Some(routes),
        ));
    }
    if single.is_file() {
        return Ok((vec![single], None));
    }
    Err(ModelError::checkpoint(
        name_of(dir),
        "holds neither model.safetensors nor model.safetensors.index.json",
    )
    .into())
}

/// Every tensor `cfg` needs, and what it must be; `optional` ones may be absent.
fn expected(cfg: &Config) -> (BTreeMap<String, Expect>, Vec<String>) {
    let (v, h) = (cfg.vocab_size, cfg.hidden_size);
    let mut e = BTreeMap::new();
    e.insert(
        "model.embed_tokens.weight".to_string(),
        Expect::Float(vec![v, h]),
    );
    e.insert("model.norm.weight".to_string(), Expect::Float(vec![h]));
    e.insert("lm_head.weight".to_string(), Expect::Float(vec![v, h]));
    // transformers drops a tied head when saving; some checkpoints keep it anyway (unused).
    let optional = match cfg.tie_word_embeddings {
        true => vec!["lm_head.weight".to_string()],
        false => Vec::new(),
    };
    let form = cfg.weight_form();
    for l in 0..cfg.num_hidden_layers {
        for (name, dim) in layer_norms(cfg) {
            e.insert(
                format!("model.layers.{l}.{name}.weight"),
                Expect::Float(vec![dim]),
            );
        }
        for (name, out, inp) in projection_shapes(cfg) {
            let pre = format!("model.layers.{l}.{name}");
            match form {
                WeightForm::Offline(_) => {
                    e.insert(format!("{pre}.weight"), Expect::Packed { out, inp });
                    e.insert(format!("{pre}.weight_scale"), Expect::Scalar);
                }
                _ => {
                    e.insert(format!("{pre}.weight"), Expect::Float(vec![out, inp]));
                }
            }
        }
    }
    (e, optional)
}

fn dtype_name(d: safetensors::Dtype) -> String {
    format!("{d:?}")
}

fn is_float(d: safetensors::Dtype) -> bool {
    matches!(
        d,
        safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16
    )
}

/// Checks one tensor's dtype and shape against `e`; the error names it.
fn check_tensor(
    name: &str,
    dtype: safetensors::Dtype,
    shape: &[usize],
    e: &Expect,
) -> std::result::Result<(), String> {
    match e {
        Expect::Float(want) => {
            if !is_float(dtype) {
                return Err(format!(
                    "tensor `{name}` has dtype {}, expected a float (F32, F16 or BF16)",
                    dtype_name(dtype)
                ));
            }
            if shape != want.as_slice() {
                return Err(format!(
                    "tensor `{name}` has shape {shape:?}, expected {want:?}"
                ));
            }
        }
        Expect::Packed { out, inp } => {
            if dtype != safetensors::Dtype::U8 {
                return Err(format!("tensor `{name}` has dtype {}, expected U8 (an offline checkpoint packs 4 ternary codes per byte)", dtype_name(dtype)));
            }
            if out % 4 != 0 {
                return Err(format!("tensor `{name}`: the layer has {out} output rows, not a multiple of 4, which the Hugging Face packed layout (4 rows per byte) cannot hold"));
            }
            if shape != [out / 4, *inp] {
                return Err(format!("tensor `{name}` has shape {shape:?}, expected [{}, {inp}] (the layer's {out} rows packed 4 per byte)", out / 4));
            }
        }
        Expect::Scalar => {
            if !is_float(dtype) {
                return Err(format!(
                    "tensor `{name}` has dtype {}, expected a float",
                    dtype_name(dtype)
                ));
            }
            if shape.iter().product::<usize>() != 1 || shape.len() > 1 {
                return Err(format!(
                    "tensor `{name}` has shape {shape:?}, expected one value ([1])"
                ));
            }
        }
    }
    Ok(())
}

/// Buffers transformers never loaded into a BitNet model; older checkpoints may carry them.
fn ignorable(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

impl HfCheckpoint {
    /// Opens `dir`: reads and validates `config.json`, memory-maps the safetensors, and checks
    /// that every tensor the config needs is there with the right dtype and shape and that there
    /// is no other (errors name the tensor or the field).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let config = Config::load(&dir.join("config.json"))?;
        let (paths, index) = weight_files(&dir)?;
        let mut files = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            if !p.is_file() {
                return Err(ModelError::checkpoint(
                    name_of(p),
                    "missing (listed by model.safetensors.index.json)",
                )
                .into());
            }
            // SAFETY: the file is mapped read-only; like candle's own loaders (and every
            // safetensors reader), this relies on nobody truncating it while it is mapped.
            let st = unsafe { MmapedSafetensors::new(p) }.map_err(|e| {
                ModelError::checkpoint(
                    name_of(p),
                    format!("not a valid safetensors file (truncated or corrupt?): {e}"),
                )
            })?;
            for (name, _) in st.tensors() {
                if routing.insert(name.clone(), i).is_some() {
                    return Err(ModelError::checkpoint(
                        name_of(&dir),
                        format!("tensor `{name}` is in two shards"),
                    )
                    .into());
                }
            }
            files.push((p.clone(), st));
        }
        if let Some(index) = index {
            for (tensor, file) in &index {
                let ok = routing.get(tensor).is_some_and(|&i| {
                    files[i]
                        .0
                        .file_name()
                        .is_some_and(|f| f.to_string_lossy() == *file)
                });
                if !ok {
                    return Err(ModelError::checkpoint(
                        name_of(&dir.join("model.safetensors.index.json")),
                        format!("lists tensor `{tensor}` in {file}, which does not hold it"),
                    )
                    .into());
                }
            }
        }
        let tokenizer = Some(dir.join("tokenizer.json")).filter(|p| p.is_file());
        let ckpt = Self {
            dir,
            config,
            files,
            routing,
            tokenizer,
        };
        ckpt.check_tensors()?;
        Ok(ckpt)
    }

    fn check_tensors(&self) -> Result<()> {
        let (expect, optional) = expected(&self.config);
        let file = name_of(&self.dir);
        let mut unknown: Vec<&String> = self
            .routing
            .keys()
            .filter(|n| !expect.contains_key(*n) && !ignorable(n))
            .collect();
        unknown.sort();
        if let Some(first) = unknown.first() {
            return Err(ModelError::checkpoint(
                file,
                format!(
                "unknown tensor `{first}`{} (not part of a {:?} BitNetForCausalLM with {} layers)",
                match unknown.len() {
                    1 => String::new(),
                    n => format!(" and {} more", n - 1),
                },
                self.config.weight_form(),
                self.config.num_hidden_layers
            ),
            )
            .into());
        }
        let missing: Vec<&String> = expect
            .keys()
            .filter(|n| !self.routing.contains_key(*n) && !optional.contains(n))
            .collect();
        if let Some(first) = missing.first() {
            return Err(ModelError::checkpoint(
                file,
                format!(
                    "missing tensor `{first}`{} (a {:?} checkpoint of this config needs it)",
                    match missing.len() {
                        1 => String::new(),
                        n => format!(" and {} more", n - 1),
                    },
                    self.config.weight_form()
                ),
            )
            .into());
        }
        // Rows that the packed layout cannot hold explain every later shape mismatch: first.
        let mut order: Vec<(&String, &Expect)> = expect.iter().collect();
        order.sort_by_key(|(_, e)| !matches!(e, Expect::Packed { out, .. } if out % 4 != 0));
        for (name, e) in order {
            let Some(&i) = self.routing.get(name) else {
                continue;
            };
            let view = self.files[i].1.get(name)?;
            check_tensor(name, view.dtype(), view.shape(), e)
                .map_err(|what| ModelError::checkpoint(name_of(&self.files[i].0), what))?;
        }
        Ok(())
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The validated `config.json`.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// `tokenizer.json`, when the directory has one.
    pub fn tokenizer_path(&self) -> Option<&Path> {
        self.tokenizer.as_deref()
    }

    /// The safetensors files and their total size in bytes.
    pub fn weight_files(&self) -> Vec<(PathBuf, u64)> {
        self.files
            .iter()
            .map(|(p, _)| (p.clone(), std::fs::metadata(p).map_or(0, |m| m.len())))
            .collect()
    }

    /// The dtype tensor `name` is stored in (`None`: no such tensor, or a type candle lacks).
    /// The embedding's tells which 16-bit type keeps it exactly
    /// ([`BitNetForCausalLM::to_weight_dtype`]).
    pub fn stored_dtype(&self, name: &str) -> Option<DType> {
        let i = *self.routing.get(name)?;
        let view = self.files[i].1.get(name).ok()?;
        DType::try_from(view.dtype()).ok()
    }

    /// Tensor `name` as stored (its own dtype), on the CPU.
    fn raw(&self, name: &str) -> Result<Tensor> {
        let i = *self.routing.get(name).ok_or_else(|| {
            ModelError::checkpoint(name_of(&self.dir), format!("missing tensor `{name}`"))
        })?;
        self.files[i].1.load(name, &Device::Cpu).map_err(|e| {
            ModelError::checkpoint(name_of(&self.files[i].0), format!("tensor `{name}`: {e}"))
                .into()
        })
    }

    /// The inference model ([`Runtime::Packed`], or [`Runtime::Dense`] for f32 weights), built
    /// one tensor at a time from the mapped files.
    pub fn load_model(&self, runtime: Runtime) -> Result<BitNetForCausalLM> {
        BitNetForCausalLM::from_source(&self.config, self, runtime)
    }

    /// Every tensor as an f32 `Var` in a fresh `VarMap` under transformers' names, for training:
    /// projections as latent weights (packed codes become `code * scale / p`, see
    /// [`ProjectionWeight::to_latent`], which the online quantizer maps back to the same codes
    /// and scale). Returns it with the config the training model should be built with (the
    /// online form of a quantized checkpoint). A tied head is not a separate variable.
    pub fn load_varmap(&self) -> Result<(Config, VarMap)> {
        let cfg = &self.config;
        let vm = VarMap::new();
        {
            let mut data = vm.data().lock().expect("a fresh VarMap is not poisoned");
            let (expect, _) = expected(cfg);
            for (name, e) in &expect {
                let t = match e {
                    Expect::Float(shape) => {
                        if name == "lm_head.weight" && cfg.tie_word_embeddings {
                            continue;
                        }
                        self.tensor(name, shape)?
                    }
                    Expect::Packed { out, inp } => {
                        let module = name
                            .strip_suffix(".weight")
                            .expect("projection weights end in .weight");
                        self.projection(module, *out, *inp)?.to_latent()?
                    }
                    Expect::Scalar => continue,
                };
                data.insert(name.clone(), Var::from_tensor(&t)?);
            }
        }
        let form = match cfg.weight_form() {
            WeightForm::FullPrecision => WeightForm::FullPrecision,
            _ => WeightForm::Online,
        };
        Ok((cfg.with_weight_form(form), vm))
    }
}

impl WeightSource for HfCheckpoint {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.raw(name)?;
        if t.dims() != shape {
            return Err(ModelError::checkpoint(
                name_of(&self.dir),
                format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    t.dims()
                ),
            )
            .into());
        }
        t.to_dtype(DType::F32)
    }

    fn projection(&self, module: &str, out: usize, inp: usize) -> Result<ProjectionWeight> {
        let name = format!("{module}.weight");
        match self.config.weight_form() {
            WeightForm::Offline(class) => {
                let codes = self.raw(&name)?;
                let scale = self.raw(&format!("{module}.weight_scale"))?;
                let packed = PackedTernary::from_hf(&codes, &scale, out, class).map_err(|e| {
                    ModelError::checkpoint(name_of(&self.dir), format!("tensor `{name}`: {e}"))
                })?;
                if packed.in_features() != inp {
                    return Err(ModelError::checkpoint(
                        name_of(&self.dir),
                        format!(
                            "tensor `{name}` has {} inputs, expected {inp}",
                            packed.in_features()
                        ),
                    )
                    .into());
                }
                Ok(ProjectionWeight::Packed(packed))
            }
            _ => Ok(ProjectionWeight::Latent(self.tensor(&name, &[out, inp])?)),
        }
    }
}
