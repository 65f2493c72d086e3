//! Training state tracking: per layer and step, the level shares, the flip ratio, the quantization
//! error, the scale and the norms of the latent weight and its gradient; written as JSON lines and
//! summarised in a table at the end.

use crate::error::TrainingError;
use crate::qat_layer::{QATLayer, QuantLinear};
use bitnet_quant::{metrics, Quantizer, EPS};
use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// What the tracker needs from a layer.
pub trait Tracked {
    fn name(&self) -> &str;
    fn latent_weight(&self) -> &Tensor;
    /// The weight quantizer at the current step, `None` in full precision.
    fn weight_quantizer(&self) -> Result<Option<Quantizer>>;
    /// The learned step sizes of an LSQ layer (one per block), which then replace the
    /// quantizer's own scales; `None` by default.
    fn lsq_steps(&self) -> Option<&Tensor> {
        None
    }
}

impl<M: QuantLinear> Tracked for QATLayer<M> {
    fn name(&self) -> &str {
        QATLayer::name(self)
    }
    fn latent_weight(&self) -> &Tensor {
        self.inner().latent_weight()
    }
    fn weight_quantizer(&self) -> Result<Option<Quantizer>> {
        QATLayer::weight_quantizer(self)
    }
    fn lsq_steps(&self) -> Option<&Tensor> {
        QATLayer::lsq_steps(self)
    }
}

/// `(q(w), levels, scales)` of `w` under `q`'s own scales, or under learned LSQ `steps`.
fn quantized(
    q: &Quantizer,
    w: &Tensor,
    steps: Option<&Tensor>,
) -> Result<(Tensor, Vec<i8>, Vec<f64>)> {
    let Some(steps) = steps else {
        let (levels, params) = q.levels(w)?;
        let scales = params.chunks(2).map(|p| p[0] as f64).collect();
        return Ok((q.quantize(&w.detach())?, levels, scales));
    };
    let qw = q.quantize_lsq(&w.detach(), &steps.detach())?;
    // The op's own floor of a step, so that `q / s` is the integer it multiplied.
    let s: Vec<f32> = steps
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|s| s.max(EPS))
        .collect();
    let values = qw.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let block = values.len() / s.len().max(1);
    let levels = values
        .iter()
        .enumerate()
        .map(|(i, v)| (v / s[i / block]).round() as i8)
        .collect();
    Ok((qw, levels, s.iter().map(|&s| s as f64).collect()))
}

/// One layer at one step.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LayerStats {
    pub step: usize,
    pub layer: String,
    /// `(level, share of weights)`, sorted by level; empty in full precision.
    pub level_shares: Vec<(i8, f64)>,
    /// Fraction of quantized weights whose level changed since this layer's previous record
    /// (Larq's flip ratio); `None` at the first record.
    pub flip_ratio: Option<f64>,
    /// `mean((w - q(w))^2)`.
    pub mse: f64,
    /// `10 log10(sum w^2 / sum (w - q(w))^2)`; JSON `null` when infinite.
    pub sqnr_db: f64,
    /// Mean of the block scales.
    pub scale: f64,
    /// L2 norm of the latent weight.
    pub latent_norm: f64,
    /// L2 norm of the latent weight's gradient, when a gradient store was given and has one.
    pub grad_norm: Option<f64>,
}

fn l2(t: &Tensor) -> Result<f64> {
    Ok(t.sqr()?
        .sum_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?
        .sqrt())
}

/// Records [`LayerStats`], keeps the previous levels for flip ratios, and optionally appends
/// every record as a JSON line to a file.
#[derive(Default)]
pub struct StateTracker {
    previous: BTreeMap<String, Vec<i8>>,
    latest: BTreeMap<String, LayerStats>,
    log: Option<(String, BufWriter<File>)>,
}

impl StateTracker {
    /// A tracker keeping records in memory only.
    pub fn new() -> Self {
        Self::default()
    }

    /// A tracker that also writes every record as one JSON line to `path` (created or truncated).
    pub fn with_log(path: impl AsRef<Path>) -> std::result::Result<Self, TrainingError> {
        let path = path.as_ref();
        create_parent(path)?;
        let file = File::create(path).map_err(io_at(path))?;
        Ok(Self {
            log: Some((path.display().to_string(), BufWriter::new(file))),
            ..Self::default()
        })
    }

    /// Computes one record per layer at `step`.
    pub fn record(
        &mut self,
        step: usize,
        layers: &[&dyn Tracked],
        grads: Option<&GradStore>,
    ) -> Result<Vec<LayerStats>> {
        let mut out = Vec::with_capacity(layers.len());
        for layer in layers {
            let stats = self.layer_stats(step, *layer, grads)?;
            if let Some((path, w)) = &mut self.log {
                let line = serde_json::to_string(&stats)
                    .map_err(|e| TrainingError::Parse(e.to_string()))?;
                writeln!(w, "{line}").map_err(|source| TrainingError::Io {
                    path: path.clone(),
                    source,
                })?;
            }
            self.latest.insert(stats.layer.clone(), stats.clone());
            out.push(stats);
        }
        if let Some((path, w)) = &mut self.log {
            // Flushed per record so that a crash loses nothing already recorded.
            w.flush().map_err(|source| TrainingError::Io {
                path: path.clone(),
                source,
            })?;
        }
        Ok(out)
    }

    fn layer_stats(
        &mut self,
        step: usize,
        layer: &dyn Tracked,
        grads: Option<&GradStore>,
    ) -> Result<LayerStats> {
        let w = layer.latent_weight();
        let grad_norm = grads.and_then(|g| g.get(w)).map(l2).transpose()?;
        let latent_norm = l2(w)?;
        let name = layer.name().to_string();
        let Some(q) = layer.weight_quantizer()? else {
            return Ok(LayerStats {
                step,
                layer: name,
                level_shares: vec![],
                flip_ratio: None,
                mse: 0.0,
                sqnr_db: f64::INFINITY,
                scale: 1.0,
                latent_norm,
                grad_norm,
            });
        };
        let (qw, levels, scales) = quantized(&q, w, layer.lsq_steps())?;
        let n = levels.len() as f64;
        let level_shares = metrics::level_histogram(&levels)
            .into_iter()
            .map(|(l, c)| (l, c as f64 / n))
            .collect();
        let flip_ratio = self
            .previous
            .get(&name)
            .filter(|p| p.len() == levels.len())
            .map(|prev| {
                let flips = prev.iter().zip(&levels).filter(|(a, b)| a != b).count();
                flips as f64 / n
            });
        let scale = scales.iter().sum::<f64>() / scales.len() as f64;
        let stats = LayerStats {
            step,
            layer: name.clone(),
            level_shares,
            flip_ratio,
            mse: metrics::mse(w, &qw)?,
            sqnr_db: metrics::sqnr_db(w, &qw)?,
            scale,
            latent_norm,
            grad_norm,
        };
        self.previous.insert(name, levels);
        Ok(stats)
    }

    /// The latest record of every layer.
    pub fn latest(&self) -> impl Iterator<Item = &LayerStats> {
        self.latest.values()
    }

    /// A plain-text table of the latest record of every layer.
    pub fn summary_table(&self) -> String {
        let mut s = format!(
            "{:<16} {:>7} {:>22} {:>8} {:>9} {:>8} {:>9} {:>9}\n",
            "layer", "step", "share -1/0/+1", "flips", "sqnr dB", "scale", "|w|", "|grad|"
        );
        for st in self.latest.values() {
            let share = |l: i8| {
                st.level_shares
                    .iter()
                    .find(|(x, _)| *x == l)
                    .map_or(0.0, |(_, v)| *v)
            };
            let shares = if st.level_shares.is_empty() {
                "fp".to_string()
            } else if st.level_shares.iter().all(|(l, _)| (-1..=1).contains(l)) {
                format!("{:.3}/{:.3}/{:.3}", share(-1), share(0), share(1))
            } else {
                format!("{} levels", st.level_shares.len())
            };
            let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
            s += &format!(
                "{:<16} {:>7} {:>22} {:>8} {:>9.2} {:>8.4} {:>9.3} {:>9}\n",
                st.layer,
                st.step,
                shares,
                opt(st.flip_ratio),
                st.sqnr_db,
                st.scale,
                st.latent_norm,
                opt(st.grad_norm)
            );
        }
        s
    }
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> TrainingError + '_ {
    move |source| TrainingError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Creates the directory `path` will live in, if it has one.
fn create_parent(path: &Path) -> std::result::Result<(), TrainingError> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => std::fs::create_dir_all(dir).map_err(io_at(path)),
        None => Ok(()),
    }
}

/// Appends `value` as one JSON line to the log at `path` (file and directory created if
/// missing), for training loops that log their own records beside [`StateTracker`]'s. Each call
/// opens, writes and closes, so a crash loses nothing already logged.
pub fn append_json_line(
    path: impl AsRef<Path>,
    value: &impl Serialize,
) -> std::result::Result<(), TrainingError> {
    let path = path.as_ref();
    create_parent(path)?;
    let line = serde_json::to_string(value).map_err(|e| TrainingError::Parse(e.to_string()))?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_at(path))?;
    writeln!(f, "{line}").map_err(io_at(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_append_and_create_the_directory() {
        let dir = std::env::temp_dir().join(format!("bitnet-jsonl-{}", std::process::id()));
        let path = dir.join("sub").join("log.jsonl");
        append_json_line(&path, &serde_json::json!({ "step": 1 })).unwrap();
        append_json_line(&path, &serde_json::json!({ "step": 2 })).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let steps: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, [1, 2]);
        std::fs::remove_dir_all(&dir).ok();
    }
}
