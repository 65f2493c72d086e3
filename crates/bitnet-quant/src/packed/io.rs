//! A file of packed layers: safetensors, with the format, layout and version in the metadata.
//!
//! Per layer `name`: `name.weight_packed` (u8 `[out, row_bytes]`, our layout),
//! `name.weight_scale` (f32, one scale per segment), and optionally `name.norm_weight` (f32
//! `[in]`) and `name.bias` (f32 `[out]`). The metadata holds `format` ([`FORMAT`]), `version`
//! ([`VERSION`]), `layout` ([`LAYOUT`]), `scheme` (`ternary`, or `mixed` when a layer has 4- or
//! 8-bit weights) and `layers`, a JSON object mapping each name to its features, granularity,
//! norm epsilon, whether it has a bias, and its bits when they are not 2.
//!
//! [`save_packed`] / [`load_packed`] handle binary and ternary layers; [`save_packed_layers`] /
//! [`load_packed_layers`] any [`PackedLayer`], 4- and 8-bit ones included. A file without
//! multi-bit layers is the same bytes either way.

use super::layout::{scale_count, PackedTernary};
use super::linear::PackedBitLinear;
use super::mixed::PackedLayer;
use super::multibit::{PackedMultiBit, PackedMultiBitLinear};
use crate::error::QuantError;
use crate::rms_norm::RmsNorm;
use crate::scheme::Granularity;
use candle_core::{Device, Result, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

/// The `format` metadata value.
pub const FORMAT: &str = "bitnet-candle.packed";
/// The `version` metadata value this build writes and reads.
pub const VERSION: &str = "1";
/// The `layout` metadata value: 2-bit codes `level + 1`, blocks of 128 weights, byte `b` of a
/// block holding weights `b + 32 j` in bits `2j..2j+2` (see [`PackedTernary`]). A layer whose
/// `layers` entry has `"bits": 1` is binary in the 1-bit layout instead (16-byte blocks, byte `b`
/// holding weights `b + 16 j` in bit `j`); one with `"bits": 4` or `8` holds two's-complement
/// integers, row-major, two per byte at 4 bits (low nibble first), as [`PackedMultiBit`]
/// describes.
pub const LAYOUT: &str = "ternary2-block128-stride32";

/// The `scheme` metadata value of a file with only binary and ternary layers.
const SCHEME_TERNARY: &str = "ternary";
/// The `scheme` metadata value of a file with 4- or 8-bit layers.
const SCHEME_MIXED: &str = "mixed";

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct LayerMeta {
    in_features: usize,
    out_features: usize,
    granularity: Granularity,
    norm_eps: Option<f64>,
    bias: bool,
    /// 1 for binary weights in the 1-bit layout, 4 or 8 for multi-bit weights; absent (2)
    /// otherwise, so that 2-bit files are byte for byte what earlier builds wrote, and earlier
    /// builds reject other files (unknown field, or a `scheme` they do not know) instead of
    /// misreading them.
    #[serde(default = "two_bits", skip_serializing_if = "is_two")]
    bits: u8,
}

fn two_bits() -> u8 {
    2
}

fn is_two(b: &u8) -> bool {
    *b == 2
}

fn bad(what: impl Into<String>) -> candle_core::Error {
    QuantError::BadData { what: what.into() }.into()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes `layers` to `path` (a temporary file in the same directory, synced, then renamed over
/// `path`, so a crash never leaves a half-written file under the final name).
///
/// ```
/// use bitnet_quant::packed::{load_packed, save_packed, PackedBitLinear};
/// use bitnet_quant::BitLinear;
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// # fn main() -> candle_core::Result<()> {
/// let vm = VarMap::new();
/// let layer = BitLinear::new(64, 8, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
/// let packed = PackedBitLinear::from_trained(&layer)?;
/// let path = std::env::temp_dir().join(format!("doc-packed-{}.safetensors", std::process::id()));
/// save_packed(&path, &[("fc1", &packed)])?;
/// let loaded = load_packed(&path)?;
/// assert_eq!(loaded[0].0, "fc1");
/// assert_eq!(loaded[0].1.weight().data(), packed.weight().data());
/// # std::fs::remove_file(&path).ok();
/// # Ok(()) }
/// ```
pub fn save_packed(path: impl AsRef<Path>, layers: &[(&str, &PackedBitLinear)]) -> Result<()> {
    write_atomically(path.as_ref(), &to_bytes(layers)?)
}

/// [`save_packed`] for layers of any precision ([`PackedLayer`]), 4- and 8-bit included;
/// [`load_packed_layers`] reads the file back.
///
/// ```
/// use bitnet_quant::packed::{load_packed_layers, save_packed_layers, PackedLayer};
/// use bitnet_quant::{BitLinear, BitLinearConfig, Estimator, Quantizer, Scheme};
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let layer = |scheme| -> candle_core::Result<PackedLayer> {
///     let config = BitLinearConfig { weight: Quantizer::new(scheme, Estimator::Identity)?, ..Default::default() };
///     let w = Tensor::randn(0f32, 1.0, (8, 64), &Device::Cpu)?;
///     PackedLayer::from_trained(&BitLinear::from_parts(w, None, None, config))
/// };
/// let (a, b) = (layer(Scheme::TernaryAbsmean)?, layer(Scheme::MultiBit { bits: 4 })?);
/// let path = std::env::temp_dir().join(format!("doc-mixed-{}.safetensors", std::process::id()));
/// save_packed_layers(&path, &[("a", &a), ("b", &b)])?;
/// let loaded = load_packed_layers(&path)?;
/// assert_eq!(loaded.iter().map(|(_, l)| l.bits()).collect::<Vec<_>>(), [2, 4]);
/// # std::fs::remove_file(&path).ok();
/// # Ok(()) }
/// ```
pub fn save_packed_layers(path: impl AsRef<Path>, layers: &[(&str, &PackedLayer)]) -> Result<()> {
    write_atomically(path.as_ref(), &layers_to_bytes(layers)?)
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it over `path`.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| QuantError::Io {
        path: path.display().to_string(),
        source,
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| bad(format!("{} has no file name", path.display())))?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e).into());
    }
    Ok(())
}

/// What the writer needs of one layer, whichever its precision.
struct Parts<'a> {
    meta: LayerMeta,
    row_bytes: usize,
    data: &'a [u8],
    scales: &'a [f32],
    norm: Option<&'a RmsNorm>,
    bias: Option<&'a [f32]>,
}

/// The fields of a packed weight the writer reads, in the order of [`LayerMeta`]'s.
type WeightFields<'a> = (usize, usize, Granularity, u8, usize, &'a [u8], &'a [f32]);

/// [`WeightFields`] of a [`PackedTernary`] or a [`PackedMultiBit`] (same accessor names).
macro_rules! fields {
    ($w:expr) => {{
        let w = $w;
        let (i, o, g, b) = (w.in_features(), w.out_features(), w.granularity(), w.bits());
        (i, o, g, b, w.row_bytes(), w.data(), w.scales())
    }};
}

impl<'a> Parts<'a> {
    fn new(w: WeightFields<'a>, norm: Option<&'a RmsNorm>, bias: Option<&'a [f32]>) -> Self {
        let (in_features, out_features, granularity, bits, row_bytes, data, scales) = w;
        let meta = LayerMeta {
            in_features,
            out_features,
            granularity,
            norm_eps: norm.map(|n| n.eps()),
            bias: bias.is_some(),
            bits,
        };
        Self {
            meta,
            row_bytes,
            data,
            scales,
            norm,
            bias,
        }
    }

    fn of(layer: &'a PackedLayer) -> Self {
        match layer {
            PackedLayer::Ternary(l) => Self::ternary(l),
            PackedLayer::MultiBit(l) => Self::new(fields!(l.weight()), l.norm(), l.bias()),
        }
    }

    fn ternary(l: &'a PackedBitLinear) -> Self {
        Self::new(fields!(l.weight()), l.norm(), l.bias())
    }
}

/// The bytes [`save_packed`] writes.
pub fn to_bytes(layers: &[(&str, &PackedBitLinear)]) -> Result<Vec<u8>> {
    serialize(layers.iter().map(|(n, l)| (*n, Parts::ternary(l))))
}

/// The bytes [`save_packed_layers`] writes.
pub fn layers_to_bytes(layers: &[(&str, &PackedLayer)]) -> Result<Vec<u8>> {
    serialize(layers.iter().map(|(n, l)| (*n, Parts::of(l))))
}

fn serialize<'a>(layers: impl Iterator<Item = (&'a str, Parts<'a>)>) -> Result<Vec<u8>> {
    let mut meta = BTreeMap::new();
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut scheme = SCHEME_TERNARY;
    for (name, layer) in layers {
        if layer.meta.bits > 2 {
            scheme = SCHEME_MIXED;
        }
        let out = layer.meta.out_features;
        if meta.insert(name.to_string(), layer.meta).is_some() {
            return Err(bad(format!("layer name `{name}` appears twice")));
        }
        owned.push((
            format!("{name}.weight_packed"),
            Dtype::U8,
            vec![out, layer.row_bytes],
            layer.data.to_vec(),
        ));
        owned.push((
            format!("{name}.weight_scale"),
            Dtype::F32,
            vec![layer.scales.len()],
            f32_bytes(layer.scales),
        ));
        if let Some(n) = layer.norm {
            let v = n.weight().flatten_all()?.to_vec1::<f32>()?;
            owned.push((
                format!("{name}.norm_weight"),
                Dtype::F32,
                vec![v.len()],
                f32_bytes(&v),
            ));
        }
        if let Some(b) = layer.bias {
            owned.push((
                format!("{name}.bias"),
                Dtype::F32,
                vec![b.len()],
                f32_bytes(b),
            ));
        }
    }
    let mut info = HashMap::new();
    info.insert("format".to_string(), FORMAT.to_string());
    info.insert("version".to_string(), VERSION.to_string());
    info.insert("layout".to_string(), LAYOUT.to_string());
    info.insert("scheme".to_string(), scheme.to_string());
    info.insert(
        "layers".to_string(),
        serde_json::to_string(&meta).map_err(candle_core::Error::wrap)?,
    );
    let views = owned
        .iter()
        .map(|(n, d, s, b)| {
            Ok((
                n.clone(),
                TensorView::new(*d, s.clone(), b).map_err(candle_core::Error::wrap)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::tensor::serialize(views, Some(info)).map_err(candle_core::Error::wrap)
}

/// Reads a file written by [`save_packed`]; layers come back in name order. Every error names
/// what is wrong (missing or foreign metadata, wrong version or layout, a missing, unexpected or
/// misshapen tensor, a wrong dtype, an invalid code, a non-finite scale, a 4- or 8-bit layer,
/// which needs [`load_packed_layers`]).
pub fn load_packed(path: impl AsRef<Path>) -> Result<Vec<(String, PackedBitLinear)>> {
    let path = path.as_ref();
    load_packed_bytes(&read(path)?).map_err(|e| e.context(format!("loading {}", path.display())))
}

/// Reads a file written by [`save_packed_layers`] or [`save_packed`]: layers of any precision,
/// in name order, checked as [`load_packed`] checks them.
pub fn load_packed_layers(path: impl AsRef<Path>) -> Result<Vec<(String, PackedLayer)>> {
    let path = path.as_ref();
    load_packed_layers_bytes(&read(path)?)
        .map_err(|e| e.context(format!("loading {}", path.display())))
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| {
        QuantError::Io {
            path: path.display().to_string(),
            source,
        }
        .into()
    })
}

fn tensor<'a>(
    st: &'a SafeTensors,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
) -> Result<TensorView<'a>> {
    let t = st
        .tensor(name)
        .map_err(|_| bad(format!("missing tensor `{name}`")))?;
    if t.dtype() != dtype {
        return Err(bad(format!(
            "tensor `{name}` has dtype {:?}, expected {dtype:?}",
            t.dtype()
        )));
    }
    if t.shape() != shape {
        return Err(bad(format!(
            "tensor `{name}` has shape {:?}, expected {shape:?}",
            t.shape()
        )));
    }
    Ok(t)
}

fn f32s(t: &TensorView) -> Vec<f32> {
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// [`load_packed`] from bytes in memory.
pub fn load_packed_bytes(bytes: &[u8]) -> Result<Vec<(String, PackedBitLinear)>> {
    load_packed_layers_bytes(bytes)?
        .into_iter()
        .map(|(name, l)| match l {
            PackedLayer::Ternary(l) => Ok((name, l)),
            PackedLayer::MultiBit(l) => Err(bad(format!(
                "layer `{name}` has {}-bit weights: read the file with load_packed_layers",
                l.weight().bits()
            ))),
        })
        .collect()
}

/// A layer's packed weight, as its `bits` say.
enum Weight {
    Ternary(PackedTernary),
    MultiBit(PackedMultiBit),
}

/// [`load_packed_layers`] from bytes in memory.
pub fn load_packed_layers_bytes(bytes: &[u8]) -> Result<Vec<(String, PackedLayer)>> {
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let info = header
        .metadata()
        .as_ref()
        .ok_or_else(|| bad("no metadata (not a packed-weights file)"))?;
    let get = |k: &str| {
        info.get(k)
            .ok_or_else(|| bad(format!("metadata `{k}` missing")))
    };
    for (key, want) in [("format", FORMAT), ("version", VERSION), ("layout", LAYOUT)] {
        let got = get(key)?;
        if got != want {
            return Err(bad(format!(
                "metadata `{key}` is `{got}`, expected `{want}`"
            )));
        }
    }
    let scheme = get("scheme")?;
    if scheme != SCHEME_TERNARY && scheme != SCHEME_MIXED {
        return Err(bad(format!(
            "metadata `scheme` is `{scheme}`, expected `{SCHEME_TERNARY}` or `{SCHEME_MIXED}`"
        )));
    }
    let meta: BTreeMap<String, LayerMeta> = serde_json::from_str(get("layers")?)
        .map_err(|e| bad(format!("metadata `layers` is not valid: {e}")))?;
    let st =
        SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let mut expected: Vec<String> = Vec::new();
    let mut layers = Vec::with_capacity(meta.len());
    for (name, m) in &meta {
        let (inp, out) = (m.in_features, m.out_features);
        if inp == 0 || out == 0 {
            return Err(bad(format!("layer `{name}`: empty shape [{out}, {inp}]")));
        }
        m.granularity
            .validate()
            .and_then(|_| m.granularity.block_size(inp, inp))
            .map_err(|e| bad(format!("layer `{name}`: {e}")))?;
        let n_scales = scale_count(out, inp, m.granularity)
            .ok_or_else(|| bad(format!("layer `{name}`: scale count overflows")))?;
        let pw = st
            .tensor(&format!("{name}.weight_packed"))
            .map_err(|_| bad(format!("missing tensor `{name}.weight_packed`")))?;
        let row_bytes = pw.shape().get(1).copied().unwrap_or(0);
        let pw = tensor(
            &st,
            &format!("{name}.weight_packed"),
            Dtype::U8,
            &[out, row_bytes],
        )?;
        let sc = tensor(
            &st,
            &format!("{name}.weight_scale"),
            Dtype::F32,
            &[n_scales],
        )?;
        let (data, scales) = (pw.data(), f32s(&sc));
        // Multi-bit widths only in files that say so: a `ternary` file with `"bits": 4` is as
        // malformed as it would be to an earlier build.
        let weight = match m.bits {
            4 | 8 if scheme == SCHEME_MIXED => {
                PackedMultiBit::from_raw(out, inp, m.granularity, m.bits, data, &scales)
                    .map(Weight::MultiBit)
            }
            _ => PackedTernary::from_raw_bits(out, inp, m.granularity, m.bits, data, &scales)
                .map(Weight::Ternary),
        }
        .map_err(|e| e.context(format!("layer `{name}`")))?;
        expected.push(format!("{name}.weight_packed"));
        expected.push(format!("{name}.weight_scale"));
        let norm = match m.norm_eps {
            Some(eps) => {
                if !(eps.is_finite() && eps >= 0.0) {
                    return Err(bad(format!(
                        "layer `{name}`: norm_eps {eps} is not a finite number >= 0"
                    )));
                }
                let t = tensor(&st, &format!("{name}.norm_weight"), Dtype::F32, &[inp])?;
                expected.push(format!("{name}.norm_weight"));
                Some(RmsNorm::from_weight(
                    Tensor::from_vec(f32s(&t), inp, &Device::Cpu)?,
                    eps,
                ))
            }
            None => None,
        };
        let bias = if m.bias {
            let t = tensor(&st, &format!("{name}.bias"), Dtype::F32, &[out])?;
            expected.push(format!("{name}.bias"));
            Some(Tensor::from_vec(f32s(&t), out, &Device::Cpu)?)
        } else {
            None
        };
        let layer = match weight {
            Weight::Ternary(w) => {
                PackedLayer::Ternary(PackedBitLinear::from_parts(w, bias.as_ref(), norm)?)
            }
            Weight::MultiBit(w) => {
                PackedLayer::MultiBit(PackedMultiBitLinear::from_parts(w, bias.as_ref(), norm)?)
            }
        };
        layers.push((name.clone(), layer));
    }
    if let Some(extra) = st
        .names()
        .into_iter()
        .find(|n| !expected.iter().any(|k| k == n))
    {
        return Err(bad(format!(
            "unexpected tensor `{extra}` (not described by metadata `layers`)"
        )));
    }
    Ok(layers)
}
