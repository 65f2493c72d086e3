//! [`PackedTernary`]: ternary weights at 2 bits each, in the layout our kernels read, plus the
//! Hugging Face transformers layout for exchange.

use crate::error::{invalid, QuantError};
use crate::ops::math::Kind;
use crate::quantizer::Quantizer;
use crate::scheme::Granularity;
use bitnet_core::{current_pool, Category, PoolBuffer};
use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Weights per kernel block. 128 codes are 32 bytes, one 256-bit AVX2 register: a block is one
/// load, and its four 32-weight quarters come out with one shift and one mask each.
pub const BLOCK: usize = 128;

/// Bytes per kernel block (`BLOCK / 4`).
pub const BLOCK_BYTES: usize = BLOCK / 4;

/// Bytes per kernel block of 1-bit (binary) weights (`BLOCK / 8`).
pub const BLOCK_BYTES_1BIT: usize = BLOCK / 8;

/// The 2-bit code of the level 0; also what padding holds, so that padded weights add nothing.
pub const ZERO_CODE: u8 = 1;

/// A byte of four zero codes.
const ZERO_BYTE: u8 = 0b0101_0101;

/// Ternary weights `[out, in]` packed at 2 bits each, with their f32 scales.
///
/// # Layout (ours, read by [`crate::packed::kernels`])
///
/// * Code `level + 1`: 0, 1, 2 stand for -1, 0, +1; 3 never occurs.
/// * Row-major over output rows; each row is `row_bytes()` bytes.
/// * A row is cut into *segments* that share one scale: the whole row (per-tensor and
///   per-channel scales) or each group of `g` inputs (per-group scales). Each segment is padded
///   with zero codes to a multiple of [`BLOCK`] = 128 weights, so that a kernel never mixes two
///   scales in one integer sum and never needs a scalar tail.
/// * Inside a 128-weight block (32 bytes), byte `b` holds weights `b`, `b + 32`, `b + 64`,
///   `b + 96` of the block in bits `0..2`, `2..4`, `4..6`, `6..8`. Unpacking a quarter of the
///   block to one byte per weight is `(bytes >> 2 j) & 3` on the whole 32-byte vector, with no
///   shuffles, and the quarter lines up with 32 consecutive activations.
///
/// Size: `out * ceil(seg / 128) * 32 * (in / seg)` bytes plus 4 bytes per scale; 0.25 bytes per
/// weight plus padding when `in` is not a multiple of 128.
///
/// # Binary weights: 1 bit each
///
/// A binary weight quantizer packs at 1 bit per weight ([`Self::bits`] = 1): bit 1 for +1, 0 for
/// -1, with the same rows, segments, padding to 128 and scales. A 128-weight block is 16 bytes
/// ([`BLOCK_BYTES_1BIT`]); byte `b` holds weights `b + 16 j` in bit `j`, so that the AVX2 kernel
/// gets 32 consecutive weights from one shift per 128-bit lane. Padding bits are 0; they meet
/// zero activations, so they add nothing.
///
/// ```
/// use bitnet_quant::packed::PackedTernary;
/// use bitnet_quant::{Estimator, Quantizer, Scheme};
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let q = Quantizer::new(Scheme::TernaryAbsmean, Estimator::Identity)?;
/// let w = Tensor::randn(0f32, 1.0, (8, 300), &Device::Cpu)?;
/// let packed = PackedTernary::pack(&w, &q)?;
/// // Unpacking gives exactly what the training forward multiplies with.
/// let diff = (packed.unpack()? - q.quantize(&w)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert_eq!(diff, 0.0);
/// assert_eq!(packed.row_bytes(), 3 * 32); // 300 inputs padded to 384
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PackedTernary {
    out_features: usize,
    in_features: usize,
    granularity: Granularity,
    seg_len: usize,
    seg_padded: usize,
    /// Bits per weight: 2 (ternary codes) or 1 (binary).
    bits: u8,
    /// The codes, shared by clones: they never change once built, so a clone (and a move to the
    /// CPU) costs no allocation and cannot fail on the pool's cap.
    data: Arc<PoolBuffer>,
    scales: Vec<f32>,
}

/// Packed codes for writing while a weight is built. Codes shared with a clone are copied first
/// (from the same pool, so a full pool is an error here rather than a panic); the constructors
/// only ever write codes they hold alone, so clones of finished weights share theirs.
pub(crate) fn codes_mut(data: &mut Arc<PoolBuffer>) -> Result<&mut [u8]> {
    if Arc::get_mut(data).is_none() {
        let pool = data.pool();
        let mut copy = pool.allocate_slice::<u8>(data.len(), Category::PackedWeights)?;
        copy.as_mut_slice_of::<u8>()
            .copy_from_slice(data.as_slice_of::<u8>());
        *data = Arc::new(copy);
    }
    let data = Arc::get_mut(data).ok_or_else(|| {
        candle_core::Error::Msg("packed codes still shared after copying them".into())
    })?;
    Ok(data.as_mut_slice_of::<u8>())
}

/// The checks every packed weight rebuilt from raw parts needs: a non-empty shape, a valid
/// granularity, one scale per segment, and only finite scales.
pub(crate) fn check_raw(
    op: &'static str,
    out_features: usize,
    in_features: usize,
    granularity: Granularity,
    scales: &[f32],
) -> Result<()> {
    if out_features == 0 || in_features == 0 {
        return Err(shape_err(
            op,
            format!("empty weight [{out_features}, {in_features}]"),
        ));
    }
    granularity.validate()?;
    let n_scales = scale_count(out_features, in_features, granularity).ok_or_else(|| {
        shape_err(
            op,
            format!("{granularity:?} does not divide {in_features} inputs"),
        )
    })?;
    if scales.len() != n_scales {
        return Err(shape_err(
            op,
            format!(
                "{} scales, expected {n_scales} for {granularity:?}",
                scales.len()
            ),
        ));
    }
    if let Some(bad) = scales.iter().position(|s| !s.is_finite()) {
        return Err(QuantError::BadData {
            what: format!("{op}: scale {bad} is {}", scales[bad]),
        }
        .into());
    }
    Ok(())
}

pub(crate) fn shape_err(op: &'static str, what: impl Into<String>) -> candle_core::Error {
    QuantError::Shape {
        op,
        what: what.into(),
    }
    .into()
}

/// Segment length and padded segment length for a granularity.
fn segments(
    in_features: usize,
    granularity: Granularity,
) -> std::result::Result<(usize, usize), QuantError> {
    let seg = match granularity {
        Granularity::PerTensor | Granularity::PerChannel => in_features,
        Granularity::PerGroup(g) => {
            granularity.block_size(in_features, in_features)?;
            g
        }
    };
    Ok((seg, seg.div_ceil(BLOCK) * BLOCK))
}

/// The number of scales a `[out, in]` weight has at `granularity`.
pub(crate) fn scale_count(out: usize, inp: usize, granularity: Granularity) -> Option<usize> {
    match granularity {
        Granularity::PerTensor => Some(1),
        Granularity::PerChannel => Some(out),
        Granularity::PerGroup(g) if g > 0 && inp % g == 0 => out.checked_mul(inp / g),
        Granularity::PerGroup(_) => None,
    }
}

impl PackedTernary {
    /// Packs `w` (`[out, in]`, f32/f16/bf16/f64) with the levels and scales of the weight
    /// quantizer `q`, which must be binary or ternary with `lambda = 1` (a blended weight is not
    /// ternary). Any granularity of `q` is kept. Binary quantizers pack at 1 bit per weight,
    /// ternary ones at 2.
    pub fn pack(w: &Tensor, q: &Quantizer) -> Result<Self> {
        let (out, inp) = w.dims2().map_err(|_| {
            shape_err(
                "PackedTernary::pack",
                format!("expected a [out, in] weight, got {:?}", w.dims()),
            )
        })?;
        if out == 0 || inp == 0 {
            return Err(QuantError::Empty {
                op: "PackedTernary::pack",
                shape: w.shape().clone(),
            }
            .into());
        }
        if matches!(q.kind(), Kind::Int { .. }) {
            return Err(invalid(
                "weight.scheme",
                format!("{:?}", q.scheme()),
                "Binary, BinaryCentered, TernaryAbsmean or TernaryThreshold",
            )
            .into());
        }
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
        let granularity = q.granularity();
        let (seg_len, seg_padded) = segments(inp, granularity)?;
        let bits = match q.kind() {
            Kind::Binary { .. } | Kind::BinaryCentered => 1,
            _ => 2,
        };
        let mut packed = Self::zeroed(out, inp, granularity, seg_len, seg_padded, bits, scales)?;
        let row_bytes = packed.row_bytes();
        let data = packed.codes_mut()?;
        for (r, row) in levels.chunks_exact(inp).enumerate() {
            let dst = &mut data[r * row_bytes..(r + 1) * row_bytes];
            for (i, &l) in row.iter().enumerate() {
                let (byte, shift) = position(i, seg_len, seg_padded, bits);
                let (code, mask) = match bits {
                    1 => ((l > 0) as u8, 1),
                    _ => ((l + 1) as u8, 3),
                };
                dst[byte] = (dst[byte] & !(mask << shift)) | (code << shift);
            }
        }
        Ok(packed)
    }

    fn zeroed(
        out: usize,
        inp: usize,
        granularity: Granularity,
        seg_len: usize,
        seg_padded: usize,
        bits: u8,
        scales: Vec<f32>,
    ) -> Result<Self> {
        let row_bytes = (inp / seg_len) * seg_padded * bits as usize / 8;
        let len = out
            .checked_mul(row_bytes)
            .ok_or_else(|| shape_err("PackedTernary", format!("[{out}, {inp}] is too large")))?;
        let mut data = current_pool().allocate_slice::<u8>(len, Category::PackedWeights)?;
        data.as_mut_slice_of::<u8>()
            .fill(if bits == 1 { 0 } else { ZERO_BYTE });
        Ok(Self {
            out_features: out,
            in_features: inp,
            granularity,
            seg_len,
            seg_padded,
            bits,
            data: Arc::new(data),
            scales,
        })
    }

    /// The codes for writing while the weight is built (see [`codes_mut`]).
    fn codes_mut(&mut self) -> Result<&mut [u8]> {
        codes_mut(&mut self.data)
    }

    /// Rebuilds a 2-bit packed weight from its raw parts (our layout, as [`Self::data`] and
    /// [`Self::scales`] return them), checking every length, every code (3 is invalid) and that
    /// padding holds zero codes, and that scales are finite.
    pub fn from_raw(
        out_features: usize,
        in_features: usize,
        granularity: Granularity,
        data: &[u8],
        scales: &[f32],
    ) -> Result<Self> {
        Self::from_raw_bits(out_features, in_features, granularity, 2, data, scales)
    }

    /// [`Self::from_raw`] for either width: `bits` 2 (ternary codes) or 1 (binary; padding bits
    /// must be 0).
    pub fn from_raw_bits(
        out_features: usize,
        in_features: usize,
        granularity: Granularity,
        bits: u8,
        data: &[u8],
        scales: &[f32],
    ) -> Result<Self> {
        const OP: &str = "PackedTernary::from_raw";
        if bits != 1 && bits != 2 {
            return Err(invalid("bits", bits, "1 (binary) or 2 (ternary)").into());
        }
        check_raw(OP, out_features, in_features, granularity, scales)?;
        let (seg_len, seg_padded) = segments(in_features, granularity)?;
        let row_bytes = (in_features / seg_len)
            .checked_mul(seg_padded * bits as usize / 8)
            .ok_or_else(|| shape_err(OP, "row size overflows"))?;
        let expected = out_features
            .checked_mul(row_bytes)
            .ok_or_else(|| shape_err(OP, "size overflows"))?;
        if data.len() != expected {
            return Err(shape_err(
                OP,
                format!(
                    "{} packed bytes, expected {expected} ({out_features} rows of {row_bytes})",
                    data.len()
                ),
            ));
        }
        let mut packed = Self::zeroed(
            out_features,
            in_features,
            granularity,
            seg_len,
            seg_padded,
            bits,
            scales.to_vec(),
        )?;
        packed.codes_mut()?.copy_from_slice(data);
        packed.validate_codes()?;
        Ok(packed)
    }

    /// Every code is 0..=2 (2-bit), and every padding weight holds the zero code of its width
    /// (code 1 at 2 bits, bit 0 at 1 bit).
    fn validate_codes(&self) -> Result<()> {
        const OP: &str = "PackedTernary";
        let data = self.data();
        if self.bits == 2 {
            if let Some(i) = data
                .iter()
                .position(|&b| (0..4).any(|j| (b >> (2 * j)) & 3 == 3))
            {
                return Err(QuantError::BadData {
                    what: format!("{OP}: invalid 2-bit code 3 in packed byte {i}"),
                }
                .into());
            }
        }
        let (mask, zero) = match self.bits {
            1 => (1, 0),
            _ => (3, ZERO_CODE),
        };
        let row_bytes = self.row_bytes();
        for (r, row) in data.chunks_exact(row_bytes).enumerate() {
            for s in 0..self.in_features / self.seg_len {
                // Padding has no input index, so it is addressed within its segment directly.
                for k in self.seg_len..self.seg_padded {
                    let (byte, shift) = slot(s, k, self.seg_padded, self.bits);
                    if (row[byte] >> shift) & mask != zero {
                        let what = match self.bits {
                            1 => format!("{OP}: padding bit {k} of segment {s} in row {r} is set"),
                            _ => format!(
                                "{OP}: padding weight {k} of segment {s} in row {r} is not zero"
                            ),
                        };
                        return Err(QuantError::BadData { what }.into());
                    }
                }
            }
        }
        Ok(())
    }

    /// Bits per weight: 2 for ternary codes, 1 for binary weights.
    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// Output features (rows).
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Input features (columns, before padding).
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Which weights share a scale.
    pub fn granularity(&self) -> Granularity {
        self.granularity
    }

    /// Inputs per segment (one scale each), before padding.
    pub fn segment_len(&self) -> usize {
        self.seg_len
    }

    /// Inputs per segment after padding to a multiple of [`BLOCK`].
    pub fn segment_padded(&self) -> usize {
        self.seg_padded
    }

    /// Segments per row.
    pub fn segments_per_row(&self) -> usize {
        self.in_features / self.seg_len
    }

    /// Bytes per packed row.
    pub fn row_bytes(&self) -> usize {
        self.segments_per_row() * self.seg_padded * self.bits as usize / 8
    }

    /// The packed codes, `out * row_bytes()` bytes.
    pub fn data(&self) -> &[u8] {
        self.data.as_slice_of::<u8>()
    }

    /// The scales: 1 (per tensor), `out` (per channel) or `out * in / g` (per group, row-major).
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// The scale of segment `seg` of row `r`.
    #[inline(always)]
    pub fn scale(&self, r: usize, seg: usize) -> f32 {
        match self.granularity {
            Granularity::PerTensor => self.scales[0],
            Granularity::PerChannel => self.scales[r],
            Granularity::PerGroup(_) => self.scales[r * self.segments_per_row() + seg],
        }
    }

    /// Bytes held: packed codes plus scales.
    pub fn size_bytes(&self) -> usize {
        self.data.len() + 4 * self.scales.len()
    }

    /// [`Self::size_bytes`] per weight; 0.25 (0.125 for binary) plus padding and scales.
    pub fn bytes_per_weight(&self) -> f64 {
        self.size_bytes() as f64 / (self.out_features * self.in_features) as f64
    }

    /// The level (-1, 0 or 1) of weight `(r, i)`.
    #[inline]
    pub fn level(&self, r: usize, i: usize) -> i8 {
        let (byte, shift) = position(i, self.seg_len, self.seg_padded, self.bits);
        let b = self.data()[r * self.row_bytes() + byte] >> shift;
        match self.bits {
            1 => 2 * (b & 1) as i8 - 1,
            _ => (b & 3) as i8 - 1,
        }
    }

    /// All levels, row-major `[out, in]`.
    pub fn levels(&self) -> Vec<i8> {
        let mut out = Vec::with_capacity(self.out_features * self.in_features);
        for r in 0..self.out_features {
            for i in 0..self.in_features {
                out.push(self.level(r, i));
            }
        }
        out
    }

    /// The dequantized weight `[out, in]` in f32 on the CPU: `scale * level`, equal to what the
    /// weight quantizer's forward gave when packing.
    pub fn unpack(&self) -> Result<Tensor> {
        let mut v = Vec::with_capacity(self.out_features * self.in_features);
        for r in 0..self.out_features {
            for i in 0..self.in_features {
                v.push(self.scale(r, i / self.seg_len) * self.level(r, i) as f32);
            }
        }
        Tensor::from_vec(v, (self.out_features, self.in_features), &Device::Cpu)
    }

    /// The Hugging Face transformers layout (`integrations/bitnet.py`, `pack_weights`): a `u8`
    /// tensor `[ceil(out / 4), in]` where bits `2j..2j+2` of row `i` hold the code (`level + 1`)
    /// of original row `j * ceil(out / 4) + i` (unused slots of the last rows are 0 bits, as
    /// `pack_weights` leaves them), and the `weight_scale` tensor `[1]`, f32, in the convention
    /// of `class` (see [`HfLinearClass`]). transformers itself reads back only weights whose
    /// `out` is a multiple of 4. Per-tensor scales only: the HF layer has one scale.
    ///
    /// ```
    /// use bitnet_quant::packed::{HfLinearClass, PackedTernary};
    /// use bitnet_quant::{Estimator, Quantizer, Scheme};
    /// use candle_core::{Device, Tensor};
    /// # fn main() -> candle_core::Result<()> {
    /// let q = Quantizer::new(Scheme::TernaryAbsmeanHf, Estimator::Identity)?;
    /// let p = PackedTernary::pack(&Tensor::randn(0f32, 1.0, (8, 16), &Device::Cpu)?, &q)?;
    /// let (codes, scale) = p.to_hf(HfLinearClass::AutoBitLinear)?;
    /// assert_eq!(codes.dims(), &[2, 16]);
    /// assert_eq!(scale.to_vec1::<f32>()?, [p.scales()[0]]); // multiplied: the scale itself
    /// let back = PackedTernary::from_hf(&codes, &scale, 8, HfLinearClass::AutoBitLinear)?;
    /// assert_eq!((back.levels(), back.scales()), (p.levels(), p.scales()));
    /// # Ok(()) }
    /// ```
    pub fn to_hf(&self, class: HfLinearClass) -> Result<(Tensor, Tensor)> {
        if self.granularity != Granularity::PerTensor || self.bits != 2 {
            return Err(QuantError::Unsupported {
                op: "PackedTernary::to_hf",
                what: format!(
                    "{:?} scales at {} bits (the transformers layout has 2-bit codes and one scale per tensor)",
                    self.granularity, self.bits
                ),
            }
            .into());
        }
        let (out, inp) = (self.out_features, self.in_features);
        let rows = out.div_ceil(4);
        let mut bytes = vec![0u8; rows * inp];
        for r in 0..out {
            let (j, hr) = (r / rows, r % rows);
            for i in 0..inp {
                let code = (self.level(r, i) + 1) as u8;
                bytes[hr * inp + i] |= code << (2 * j);
            }
        }
        let packed = Tensor::from_vec(bytes, (rows, inp), &Device::Cpu)?;
        let ws = match class {
            HfLinearClass::AutoBitLinear => self.scales[0],
            HfLinearClass::BitLinear => 1.0 / self.scales[0],
        };
        let scale = Tensor::from_vec(vec![ws], 1, &Device::Cpu)?;
        Ok((packed, scale))
    }

    /// Reads the Hugging Face transformers layout (see [`Self::to_hf`]): `packed` is `u8`
    /// `[ceil(out_features / 4), in]`, `weight_scale` one finite value (any float dtype; HF
    /// checkpoints often store bf16) read in the convention of `class`: the scale itself for
    /// [`HfLinearClass::AutoBitLinear`] (>= 0), its reciprocal for [`HfLinearClass::BitLinear`]
    /// (> 0). Codes 3 are rejected.
    pub fn from_hf(
        packed: &Tensor,
        weight_scale: &Tensor,
        out_features: usize,
        class: HfLinearClass,
    ) -> Result<Self> {
        const OP: &str = "PackedTernary::from_hf";
        if packed.dtype() != DType::U8 {
            return Err(shape_err(
                OP,
                format!("packed weight has dtype {:?}, expected u8", packed.dtype()),
            ));
        }
        let (rows, inp) = packed.dims2().map_err(|_| {
            shape_err(
                OP,
                format!(
                    "packed weight has shape {:?}, expected [rows, in]",
                    packed.dims()
                ),
            )
        })?;
        if out_features == 0 || inp == 0 || rows != out_features.div_ceil(4) {
            return Err(shape_err(OP, format!("packed weight [{rows}, {inp}] does not hold {out_features} output rows (expected [{}, in > 0])", out_features.div_ceil(4))));
        }
        if !weight_scale.dtype().is_float() || weight_scale.elem_count() != 1 {
            return Err(shape_err(
                OP,
                format!(
                    "weight_scale must be one float value, got {:?} {:?}",
                    weight_scale.dtype(),
                    weight_scale.dims()
                ),
            ));
        }
        let ws = weight_scale
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?[0];
        let scale = match class {
            HfLinearClass::AutoBitLinear if ws.is_finite() && ws >= 0.0 => ws,
            HfLinearClass::BitLinear if ws.is_finite() && ws > 0.0 => 1.0 / ws,
            HfLinearClass::AutoBitLinear => {
                return Err(invalid("weight_scale", ws, "a finite number >= 0").into())
            }
            HfLinearClass::BitLinear => {
                return Err(invalid("weight_scale", ws, "a finite number > 0").into())
            }
        };
        let bytes = packed
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<u8>()?;
        let (seg_len, seg_padded) = segments(inp, Granularity::PerTensor)?;
        let mut out = Self::zeroed(
            out_features,
            inp,
            Granularity::PerTensor,
            seg_len,
            seg_padded,
            2,
            vec![scale],
        )?;
        let row_bytes = out.row_bytes();
        let data = out.codes_mut()?;
        // Row by row in parallel: a 2B-parameter checkpoint has 2 G codes to move.
        data.par_chunks_mut(row_bytes)
            .enumerate()
            .try_for_each(|(r, dst)| {
                let (j, hr) = (r / rows, r % rows);
                for (i, &b) in bytes[hr * inp..(hr + 1) * inp].iter().enumerate() {
                    let code = (b >> (2 * j)) & 3;
                    if code == 3 {
                        return Err(QuantError::BadData {
                            what: format!("{OP}: invalid 2-bit code 3 for weight ({r}, {i})"),
                        });
                    }
                    let (byte, shift) = position(i, seg_len, seg_padded, 2);
                    dst[byte] = (dst[byte] & !(3 << shift)) | (code << shift);
                }
                Ok(())
            })?;
        Ok(out)
    }
}

/// How a Hugging Face checkpoint's `weight_scale` is applied: transformers' two BitNet linear
/// classes (`quantization_config.linear_class`) store reciprocal conventions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HfLinearClass {
    /// `linear_class = "autobitlinear"`: the output is *multiplied* by `weight_scale`, which is
    /// the scale itself (`mean|W|` as the quantizer saw it).
    AutoBitLinear,
    /// The legacy `BitLinear` (`linear_class = "bitlinear"`, the default when the field is
    /// absent): the output is *divided* by `weight_scale`, which is `1 / mean|W|`.
    BitLinear,
}

/// Byte offset within a row and bit shift of input `i` at `bits` per weight.
#[inline(always)]
fn position(i: usize, seg_len: usize, seg_padded: usize, bits: u8) -> (usize, usize) {
    slot(i / seg_len, i % seg_len, seg_padded, bits)
}

/// Byte offset within a row and bit shift of weight `k` (padding included) of segment `s`.
#[inline(always)]
fn slot(s: usize, k: usize, seg_padded: usize, bits: u8) -> (usize, usize) {
    let (blk, o) = (k / BLOCK, k % BLOCK);
    match bits {
        1 => (
            s * seg_padded / 8 + blk * BLOCK_BYTES_1BIT + o % BLOCK_BYTES_1BIT,
            o / BLOCK_BYTES_1BIT,
        ),
        _ => (
            s * seg_padded / 4 + blk * BLOCK_BYTES + o % BLOCK_BYTES,
            2 * (o / BLOCK_BYTES),
        ),
    }
}
