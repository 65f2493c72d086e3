//! Packed inference at 4 and 8 bits: [`PackedMultiBit`] weights (two's-complement integers, two
//! per byte at 4 bits) and [`PackedMultiBitLinear`], the inference form of a [`BitLinear`]
//! trained with [`Scheme::MultiBit`] weights, for the layers a mixed-precision policy keeps wider
//! than ternary.
//!
//! The kernel is scalar: these layers are the few a policy keeps wide, and what matters here is
//! that their size is real and their output is the training forward's.

use super::layout::{check_raw, codes_mut, shape_err};
use super::linear::{require_int8_activations, PAR_MIN_MACS};
use crate::error::{invalid, QuantError};
use crate::ops::math::Kind;
use crate::rms_norm::RmsNorm;
use crate::scheme::{Granularity, Scheme};
use crate::{BitLinear, Quantizer};
use bitnet_core::{current_pool, Category, PoolBuffer};
use candle_core::{DType, Device, Module, Result, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Weights `[out, in]` as `bits`-bit signed integers (4 or 8) with their f32 scales: weight
/// `(r, i)` is `level(r, i) * scale(r, segment of i)`, exactly what the multi-bit quantizer's
/// forward computes (up to f32 rounding of that product).
///
/// # Layout
///
/// * Row-major over output rows, `row_bytes()` bytes each, no padding beyond the last byte.
/// * 8 bits: one `i8` per weight.
/// * 4 bits: two's-complement nibbles, weight `2j` in the low and `2j + 1` in the high nibble
///   of byte `j` of the row; an odd row ends in a high nibble of 0.
/// * Scales as [`Granularity`] says: one, one per row, or one per group of `g` inputs of a row
///   (row-major), each `max|w| / (2^(bits-1) - 1)` of its block.
///
/// ```
/// use bitnet_quant::packed::PackedMultiBit;
/// use bitnet_quant::{Estimator, Granularity, Quantizer, Scheme};
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let q = Quantizer::new(Scheme::MultiBit { bits: 4 }, Estimator::Identity)?
///     .with_granularity(Granularity::PerChannel)?;
/// let w = Tensor::randn(0f32, 1.0, (8, 301), &Device::Cpu)?;
/// let packed = PackedMultiBit::pack(&w, &q)?;
/// assert_eq!(packed.row_bytes(), 151); // 301 nibbles
/// let diff = (packed.unpack()? - q.quantize(&w)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff < 1e-6);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PackedMultiBit {
    out_features: usize,
    in_features: usize,
    granularity: Granularity,
    seg_len: usize,
    bits: u8,
    /// Shared by clones, as [`super::PackedTernary`]'s codes are: they never change once built.
    data: Arc<PoolBuffer>,
    scales: Vec<f32>,
}

fn bad(what: String) -> candle_core::Error {
    QuantError::BadData { what }.into()
}

/// Bytes per row of `inp` weights at `bits`.
fn row_bytes(inp: usize, bits: u8) -> usize {
    match bits {
        4 => inp.div_ceil(2),
        _ => inp,
    }
}

impl PackedMultiBit {
    /// Packs `w` (`[out, in]`) with the levels and scales of `q`, which must be
    /// [`Scheme::MultiBit`] with 4 or 8 bits and `lambda = 1`; any granularity is kept.
    pub fn pack(w: &Tensor, q: &Quantizer) -> Result<Self> {
        const OP: &str = "PackedMultiBit::pack";
        let (out, inp) = w.dims2().map_err(|_| {
            shape_err(
                OP,
                format!("expected a [out, in] weight, got {:?}", w.dims()),
            )
        })?;
        if out == 0 || inp == 0 {
            return Err(QuantError::Empty {
                op: OP,
                shape: w.shape().clone(),
            }
            .into());
        }
        let bits = match q.scheme() {
            Scheme::MultiBit { bits: b @ (4 | 8) } => b,
            other => {
                return Err(invalid(
                    "weight.scheme",
                    format!("{other:?}"),
                    "MultiBit { bits: 4 or 8 }",
                )
                .into())
            }
        };
        if q.lambda() != 1.0 {
            return Err(invalid(
                "weight.lambda",
                q.lambda(),
                "1.0 (only fully quantized weights pack)",
            )
            .into());
        }
        let (levels, params) = q.levels(w)?;
        let scales: Vec<f32> = params.chunks_exact(2).map(|p| p[0]).collect();
        let mut packed = Self::zeroed(out, inp, q.granularity(), bits, scales)?;
        let rb = packed.row_bytes();
        let data = codes_mut(&mut packed.data)?;
        for (row, dst) in levels.chunks_exact(inp).zip(data.chunks_exact_mut(rb)) {
            match bits {
                8 => dst.iter_mut().zip(row).for_each(|(d, &l)| *d = l as u8),
                _ => {
                    for (d, pair) in dst.iter_mut().zip(row.chunks(2)) {
                        let hi = pair.get(1).map_or(0, |&l| (l as u8) & 0xF);
                        *d = ((pair[0] as u8) & 0xF) | (hi << 4);
                    }
                }
            }
        }
        Ok(packed)
    }

    fn zeroed(
        out: usize,
        inp: usize,
        granularity: Granularity,
        bits: u8,
        scales: Vec<f32>,
    ) -> Result<Self> {
        let seg_len = match granularity {
            Granularity::PerTensor | Granularity::PerChannel => inp,
            Granularity::PerGroup(g) => {
                granularity.block_size(inp, inp)?;
                g
            }
        };
        let len = out
            .checked_mul(row_bytes(inp, bits))
            .ok_or_else(|| shape_err("PackedMultiBit", format!("[{out}, {inp}] is too large")))?;
        let mut data = current_pool().allocate_slice::<u8>(len, Category::PackedWeights)?;
        data.as_mut_slice_of::<u8>().fill(0);
        Ok(Self {
            out_features: out,
            in_features: inp,
            granularity,
            seg_len,
            bits,
            data: Arc::new(data),
            scales,
        })
    }

    /// Rebuilds a packed weight from its raw parts ([`Self::data`], [`Self::scales`]), checking
    /// the width (4 or 8), every length, that an odd 4-bit row's last high nibble is 0, and that
    /// every scale is finite.
    pub fn from_raw(
        out_features: usize,
        in_features: usize,
        granularity: Granularity,
        bits: u8,
        data: &[u8],
        scales: &[f32],
    ) -> Result<Self> {
        const OP: &str = "PackedMultiBit::from_raw";
        if bits != 4 && bits != 8 {
            return Err(invalid("bits", bits, "4 or 8").into());
        }
        check_raw(OP, out_features, in_features, granularity, scales)?;
        let rb = row_bytes(in_features, bits);
        let expected = out_features
            .checked_mul(rb)
            .ok_or_else(|| shape_err(OP, "size overflows"))?;
        if data.len() != expected {
            return Err(shape_err(
                OP,
                format!(
                    "{} packed bytes, expected {expected} ({out_features} rows of {rb})",
                    data.len()
                ),
            ));
        }
        if bits == 4 && in_features % 2 == 1 {
            if let Some(r) = data.chunks_exact(rb).position(|row| row[rb - 1] >> 4 != 0) {
                return Err(bad(format!("{OP}: the padding nibble of row {r} is not 0")));
            }
        }
        let mut packed = Self::zeroed(
            out_features,
            in_features,
            granularity,
            bits,
            scales.to_vec(),
        )?;
        codes_mut(&mut packed.data)?.copy_from_slice(data);
        Ok(packed)
    }

    /// Bits per weight: 4 or 8.
    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// Output features (rows).
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Which weights share a scale.
    pub fn granularity(&self) -> Granularity {
        self.granularity
    }

    /// Bytes per packed row.
    pub fn row_bytes(&self) -> usize {
        row_bytes(self.in_features, self.bits)
    }

    /// The packed integers, `out * row_bytes()` bytes.
    pub fn data(&self) -> &[u8] {
        self.data.as_slice_of::<u8>()
    }

    /// The scales: 1 (per tensor), `out` (per channel) or `out * in / g` (per group, row-major).
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// The scale of segment `seg` of row `r`.
    #[inline]
    pub fn scale(&self, r: usize, seg: usize) -> f32 {
        match self.granularity {
            Granularity::PerTensor => self.scales[0],
            Granularity::PerChannel => self.scales[r],
            Granularity::PerGroup(_) => self.scales[r * (self.in_features / self.seg_len) + seg],
        }
    }

    /// Bytes held: packed integers plus scales.
    pub fn size_bytes(&self) -> usize {
        self.data.len() + 4 * self.scales.len()
    }

    /// The integer level of weight `(r, i)`.
    #[inline]
    pub fn level(&self, r: usize, i: usize) -> i8 {
        level_in(&self.data()[r * self.row_bytes()..], self.bits, i)
    }

    /// Every level, row-major.
    pub fn levels(&self) -> Vec<i8> {
        (0..self.out_features)
            .flat_map(|r| (0..self.in_features).map(move |i| (r, i)))
            .map(|(r, i)| self.level(r, i))
            .collect()
    }

    /// The dequantized weight `[out, in]` (f32, on the CPU): level times scale.
    pub fn unpack(&self) -> Result<Tensor> {
        let inp = self.in_features;
        let v: Vec<f32> = self
            .levels()
            .iter()
            .enumerate()
            .map(|(k, &l)| l as f32 * self.scale(k / inp, (k % inp) / self.seg_len))
            .collect();
        Tensor::from_vec(v, (self.out_features, inp), &Device::Cpu)
    }

    /// `sum_{i in from..to} level(r, i) * x[i - from]`, exact in i32: the scalar kernel.
    fn dot(&self, row: &[u8], from: usize, x: &[i8]) -> i32 {
        match self.bits {
            8 => row[from..from + x.len()]
                .iter()
                .zip(x)
                .map(|(&w, &a)| (w as i8) as i32 * a as i32)
                .sum(),
            _ => {
                let mut acc = 0i32;
                let mut i = 0;
                // An odd start (per-group segments of odd length) takes one high nibble first.
                if from % 2 == 1 && !x.is_empty() {
                    acc += level_in(row, 4, from) as i32 * x[0] as i32;
                    i = 1;
                }
                let bytes = &row[(from + i) / 2..];
                let pairs = (x.len() - i) / 2;
                for (b, xs) in bytes[..pairs].iter().zip(x[i..].chunks_exact(2)) {
                    let lo = ((b << 4) as i8 >> 4) as i32;
                    let hi = (*b as i8 >> 4) as i32;
                    acc += lo * xs[0] as i32 + hi * xs[1] as i32;
                }
                if (x.len() - i) % 2 == 1 {
                    let last = x.len() - 1;
                    acc += level_in(row, 4, from + last) as i32 * x[last] as i32;
                }
                acc
            }
        }
    }
}

/// The level of weight `i` of a packed row at `bits`.
#[inline]
fn level_in(row: &[u8], bits: u8, i: usize) -> i8 {
    match bits {
        8 => row[i] as i8,
        _ => {
            let b = row[i / 2] as i8;
            // Sign-extend the nibble with arithmetic shifts.
            if i % 2 == 0 {
                (b << 4) >> 4
            } else {
                b >> 4
            }
        }
    }
}

/// The inference form of a [`BitLinear`] with 4- or 8-bit weights: optional RMSNorm (f32), int8
/// absmax activations per token, packed integer weights, integer dot products per scale segment,
/// one dequantizing multiply per segment and per output, plus bias:
///
/// `y[t, r] = (sum_seg s[r, seg] * sum_i q[t, i] * level[r, i]) * m[t] / 127 + b[r]`,
/// `m[t] = max(max_i |x[t, i]|, 1e-5)`, `q = clamp(round_ties_even(x * 127 / m), -128, 127)`:
/// the training forward up to f32 rounding.
///
/// Runs on the CPU; input on another device is copied to the CPU and the output copied back.
/// Non-finite input is an error ([`QuantError::NonFinite`]).
///
/// ```
/// use bitnet_quant::packed::PackedMultiBitLinear;
/// use bitnet_quant::{BitLinear, BitLinearConfig, Estimator, Quantizer, Scheme};
/// use candle_core::{Device, Module, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let config = BitLinearConfig {
///     weight: Quantizer::new(Scheme::MultiBit { bits: 4 }, Estimator::Identity)?,
///     norm: false,
///     bias: true,
///     ..Default::default()
/// };
/// let w = Tensor::randn(0f32, 0.1, (24, 200), &dev)?;
/// let b = Tensor::randn(0f32, 0.1, 24, &dev)?;
/// let layer = BitLinear::from_parts(w, Some(b), None, config);
/// let packed = PackedMultiBitLinear::from_trained(&layer)?;
/// let x = Tensor::randn(0f32, 1.0, (3, 200), &dev)?;
/// let diff = (packed.forward(&x)? - layer.forward(&x)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff < 1e-4);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PackedMultiBitLinear {
    weight: PackedMultiBit,
    bias: Option<Vec<f32>>,
    norm: Option<RmsNorm>,
}

impl PackedMultiBitLinear {
    /// Packs a trained layer. Its weight quantizer must be 4- or 8-bit [`Scheme::MultiBit`]
    /// (any granularity) and its activation quantizer int8 per token, both with `lambda = 1`;
    /// anything else is an error naming the field.
    pub fn from_trained(layer: &BitLinear) -> Result<Self> {
        let cfg = layer.config();
        require_int8_activations(cfg.activation.as_ref())?;
        let weight = PackedMultiBit::pack(&layer.weight().detach(), &cfg.weight)?;
        let norm = layer
            .norm()
            .map(|n| RmsNorm::from_weight(n.weight().detach(), n.eps()));
        Self::from_parts(weight, layer.bias(), norm)
    }

    /// Assembles a layer from a packed weight, an optional bias `[out]` and an optional norm
    /// (weight `[in]`), checking their shapes.
    pub fn from_parts(
        weight: PackedMultiBit,
        bias: Option<&Tensor>,
        norm: Option<RmsNorm>,
    ) -> Result<Self> {
        const OP: &str = "PackedMultiBitLinear";
        let (inp, out) = (weight.in_features(), weight.out_features());
        let bias = match bias {
            Some(b) if b.dims() != [out] => {
                return Err(shape_err(
                    OP,
                    format!("bias {:?}, expected [{out}]", b.dims()),
                ))
            }
            Some(b) => Some(
                b.to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?
                    .to_vec1::<f32>()?,
            ),
            None => None,
        };
        let norm = match norm {
            Some(n) if n.weight().dims() != [inp] => {
                return Err(shape_err(
                    OP,
                    format!("norm weight {:?}, expected [{inp}]", n.weight().dims()),
                ))
            }
            Some(n) => {
                let w = n.weight().to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
                Some(RmsNorm::from_weight(w, n.eps()))
            }
            None => None,
        };
        Ok(Self { weight, bias, norm })
    }

    /// The packed weight.
    pub fn weight(&self) -> &PackedMultiBit {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// The RMSNorm applied before activation quantization, if any.
    pub fn norm(&self) -> Option<&RmsNorm> {
        self.norm.as_ref()
    }

    /// `(in, out)` features.
    pub fn dims(&self) -> (usize, usize) {
        (self.weight.in_features(), self.weight.out_features())
    }

    /// Output row `r` for every token: `xq` holds the tokens' int8 values, `m` their `m / 127`.
    fn row(&self, r: usize, xq: &[i8], m: &[f32], out: &mut [f32]) {
        let w = &self.weight;
        let (inp, seg) = (w.in_features, w.seg_len);
        let row = &w.data()[r * w.row_bytes()..(r + 1) * w.row_bytes()];
        let bias = self.bias.as_ref().map_or(0.0, |b| b[r]);
        for ((o, x), mt) in out.iter_mut().zip(xq.chunks_exact(inp)).zip(m) {
            let acc: f32 = (0..inp / seg)
                .map(|s| w.dot(row, s * seg, &x[s * seg..(s + 1) * seg]) as f32 * w.scale(r, s))
                .sum();
            *o = acc * mt + bias;
        }
    }
}

impl Module for PackedMultiBitLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        const OP: &str = "PackedMultiBitLinear::forward";
        let (device, dtype) = (x.device().clone(), x.dtype());
        if !dtype.is_float() {
            return Err(QuantError::DType { op: OP, dtype }.into());
        }
        let (inp, out) = self.dims();
        let dims = x.dims().to_vec();
        if dims.last() != Some(&inp) {
            return Err(shape_err(
                OP,
                format!("input {dims:?}, expected last dimension {inp}"),
            ));
        }
        let mut out_dims = dims;
        *out_dims.last_mut().expect("checked above") = out;
        let x = x.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let x = match &self.norm {
            Some(n) => n.forward(&x)?,
            None => x,
        };
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let bad = xs.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            return Err(QuantError::NonFinite { op: OP, count: bad }.into());
        }
        let tokens = xs.len() / inp;
        // The Int8PerToken quantizer's own formulas, so that the levels are the training ones.
        let kind = Kind::of(&Scheme::Int8PerToken);
        let mut xq = vec![0i8; xs.len()];
        let m: Vec<f32> = xs
            .chunks_exact(inp)
            .zip(xq.chunks_exact_mut(inp))
            .map(|(x, q)| {
                let (s, aux) = kind.params(0.0, x.iter().fold(0f32, |a, v| a.max(v.abs())), 0.0);
                q.iter_mut()
                    .zip(x)
                    .for_each(|(d, &v)| *d = kind.level(v, s, aux) as i8);
                aux / 127.0
            })
            .collect();
        // Rows outer, tokens inner: a weight row is read once per call.
        let mut yt = vec![0f32; out * tokens];
        if tokens > 0 {
            let work = |(r, o): (usize, &mut [f32])| self.row(r, &xq, &m, o);
            if tokens * out * inp >= PAR_MIN_MACS {
                yt.par_chunks_mut(tokens).enumerate().for_each(work);
            } else {
                yt.chunks_mut(tokens).enumerate().for_each(work);
            }
        }
        let mut y = vec![0f32; out * tokens];
        for (r, col) in yt.chunks_exact(tokens.max(1)).enumerate() {
            for (t, v) in col.iter().enumerate() {
                y[t * out + r] = *v;
            }
        }
        Tensor::from_vec(y, out_dims, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(&device)
    }
}

#[cfg(test)]
mod tests;
