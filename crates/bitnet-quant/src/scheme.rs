//! What a quantizer computes: the scheme (forward), the granularity (which values share a scale)
//! and the estimator (backward).

use crate::error::{invalid, QuantError};
use serde::{Deserialize, Serialize};

/// Added to a mean before dividing by it, as in BitNet b1.58, so that an all-zero block stays finite.
pub const EPS: f32 = 1e-5;

/// How values are mapped to levels. `sign(0) = +1` everywhere; rounding is half-to-even (as
/// `torch.round`, so results match the PyTorch references).
///
/// Each scheme works on blocks given by the [`Granularity`]; `s` is the block's scale.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Scheme {
    /// `s * sign(x)`, `s = mean|x|` if `scaled` (XNOR-Net), else 1. Not centered: see
    /// [`Scheme::BinaryCentered`] for BitNet b1.
    Binary { scaled: bool },
    /// BitNet b1 (Wang et al. 2023, "BitNet: Scaling 1-bit Transformers"), the binary default.
    ///
    /// * Forward: `beta * sign(x - alpha)` with `alpha = mean(x)` and `beta = mean|x|`
    ///   (`||W||_1 / (n m)`, of the uncentered values), both per block; `sign(0) = +1`, i.e.
    ///   `x >= alpha` gives `+beta`. Centering moves only the threshold: the levels are still
    ///   `±beta`, so the weight packs at 1 bit like [`Scheme::Binary`].
    /// * Backward: the [`Estimator`] at `r = (x - alpha) / beta`, the distance to the threshold
    ///   (BitNet: the identity STE, `u`).
    /// * Reference: Wang et al. 2023, section 2.1 (arXiv 2310.11453): `W~ = Sign(W - alpha)`,
    ///   `alpha = sum W_ij / (n m)`, `beta = ||W||_1 / (n m)`.
    BinaryCentered,
    /// BitNet b1.58 as in the paper: `g * clamp(round(x / (g + 1e-5)), -1, 1)` with `g = mean|x|`.
    TernaryAbsmean,
    /// BitNet b1.58 as Hugging Face transformers computes it (`WeightQuant` of `AutoBitLinear`,
    /// the models saved as `BitNetForCausalLM`): with `g = max(mean|x|, 1e-5)` and `m = 1 / g`,
    /// `clamp(round(x * m), -1, 1) / m`.
    ///
    /// It differs from [`Scheme::TernaryAbsmean`] in two ways: the epsilon is a floor under the
    /// mean instead of an addend to it (so on weights whose mean is a few times `1e-5` the
    /// thresholds `±g / 2` sit where transformers puts them), and values are multiplied by the
    /// reciprocal scale, in f32, as transformers does, so that every level and every scale is
    /// bit for bit transformers' (a model loaded from a Hugging Face checkpoint reproduces its
    /// logits). The estimators normalise by `1 / m`.
    TernaryAbsmeanHf,
    /// `s * (x > D) - s * (x < -D)` (strict, so `|x| == D` gives 0). `s` is the mean of `|x|` over the
    /// values above `D` when `scaled`, else 1.
    TernaryThreshold { threshold: Threshold, scaled: bool },
    /// Symmetric `bits`-bit: `s * clamp(round(x / s), -2^(bits-1), 2^(bits-1) - 1)`,
    /// `s = max(max|x|, 1e-5) / (2^(bits-1) - 1)`. `bits` in 2..=8.
    MultiBit { bits: u8 },
    /// Activations, BitNet style: `clamp(round(x * 127 / m), -128, 127) * m / 127`,
    /// `m = max(max|x|, 1e-5)`; per row of the last dimension by default.
    Int8PerToken,
}

/// The threshold `D` of [`Scheme::TernaryThreshold`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Threshold {
    /// A fixed `D >= 0`.
    Fixed(f32),
    /// Ternary Weight Networks: `D = 0.7 * mean|x|` of the block.
    Twn,
}

/// Which values share one scale. Blocks always run along the last dimension, which is the input
/// dimension of a linear layer's `[out, in]` weight and the feature dimension of activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Granularity {
    /// One scale for the whole tensor.
    PerTensor,
    /// One scale per row of the last dimension (per output channel of a weight, per token of
    /// activations).
    PerChannel,
    /// One scale per `g` consecutive values of the last dimension; `g` must divide it.
    PerGroup(usize),
}

/// The backward of a quantizer: the gradient it lets through, with `u` the upstream gradient and
/// `r = x / n` the input normalised by its block's range `n` (`n = s` for binary and threshold
/// schemes, `g + 1e-5` for absmean, `1 / m` for the Hugging Face absmean, `m` for multi-bit and
/// int8; `n = 1` for unscaled binary, where `r = x` and the formulas are those of the papers).
/// For [`Scheme::BinaryCentered`], `r = (x - mean(x)) / n`: the distance to its threshold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Estimator {
    /// Straight-through: `u`.
    Identity,
    /// `u * 1[|r| <= clip]` (Courbariaux et al.; Larq's `ste_sign`).
    Clipped { clip: f32 },
    /// `u * t * (1 - tanh(t r)^2)`, the derivative of `tanh(t r)`.
    SoftTanh { temperature: f32 },
    /// `u * 2 t * sig(t r) * (1 - sig(t r))`, the derivative of `2 sig(t r) - 1`.
    SoftSigmoid { temperature: f32 },
    /// Bi-Real Net: `u * (2 - 2|r|) * 1[|r| <= 1]`.
    ApproxSign,
    /// BNN+: `u * b (2 - b r tanh(b r / 2)) / (1 + cosh(b r))`.
    SwishSign { beta: f32 },
    /// IR-Net's error-decay estimator (Qin et al. 2020): `u * max(t, 1) * (1 - tanh(t r)^2)`, the
    /// derivative of `k tanh(t r)` with `k = max(1 / t, 1)`. Close to the identity while `t` is
    /// small, close to `sign`'s while it is large; a schedule raises `t` during training
    /// (bitnet-training's `TemperatureAnneal`).
    Ede { temperature: f32 },
}

fn positive_finite(field: &'static str, v: f32) -> Result<(), QuantError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(invalid(field, v, "a finite number > 0"))
    }
}

impl Scheme {
    /// Rejects out-of-range parameters, naming the field.
    pub fn validate(&self) -> Result<(), QuantError> {
        match *self {
            Scheme::TernaryThreshold {
                threshold: Threshold::Fixed(d),
                ..
            } if !(d.is_finite() && d >= 0.0) => {
                Err(invalid("threshold", d, "a finite number >= 0"))
            }
            Scheme::MultiBit { bits } if !(2..=8).contains(&bits) => Err(invalid(
                "bits",
                bits,
                "2..=8 (use Scheme::Binary for 1 bit)",
            )),
            _ => Ok(()),
        }
    }

    /// The granularity a fresh quantizer of this scheme uses.
    pub fn default_granularity(&self) -> Granularity {
        match self {
            Scheme::Int8PerToken => Granularity::PerChannel,
            _ => Granularity::PerTensor,
        }
    }

    /// The integer levels a block's values map to (before multiplying by the scale).
    pub fn levels(&self) -> Vec<i32> {
        match *self {
            Scheme::Binary { .. } | Scheme::BinaryCentered => vec![-1, 1],
            Scheme::TernaryAbsmean | Scheme::TernaryAbsmeanHf | Scheme::TernaryThreshold { .. } => {
                vec![-1, 0, 1]
            }
            Scheme::MultiBit { bits } => {
                let h = 1i32 << (bits - 1);
                (-h..h).collect()
            }
            Scheme::Int8PerToken => (-128..128).collect(),
        }
    }
}

impl Estimator {
    /// Rejects out-of-range parameters, naming the field.
    pub fn validate(&self) -> Result<(), QuantError> {
        match *self {
            Estimator::Identity | Estimator::ApproxSign => Ok(()),
            Estimator::Clipped { clip } => positive_finite("clip", clip),
            Estimator::SoftTanh { temperature }
            | Estimator::SoftSigmoid { temperature }
            | Estimator::Ede { temperature } => positive_finite("temperature", temperature),
            Estimator::SwishSign { beta } => positive_finite("beta", beta),
        }
    }
}

impl Granularity {
    /// Rejects a zero group size.
    pub fn validate(&self) -> Result<(), QuantError> {
        match *self {
            Granularity::PerGroup(0) => Err(invalid(
                "group_size",
                0,
                "an integer >= 1 dividing the last dimension",
            )),
            _ => Ok(()),
        }
    }

    /// The number of consecutive values sharing a scale, for a tensor of `numel` values whose last
    /// dimension is `last`.
    pub fn block_size(&self, numel: usize, last: usize) -> Result<usize, QuantError> {
        match *self {
            Granularity::PerTensor => Ok(numel),
            Granularity::PerChannel => Ok(last),
            Granularity::PerGroup(g) if g > 0 && last % g == 0 => Ok(g),
            Granularity::PerGroup(g) => Err(invalid(
                "group_size",
                format!("{g} (last dimension {last})"),
                "an integer >= 1 dividing the last dimension",
            )),
        }
    }
}
