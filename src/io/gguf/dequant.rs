//! Full-precision values of GGUF tensors (F32, F16, BF16, Q8_0, Q6_K and the ternary types), and
//! the encoders of the float types this module writes (F32, F16, BF16, Q8_0). The arithmetic is
//! llama.cpp's `dequantize_row_*` (`ggml-quants.c`): f16 scales widened to f32, one f32 product
//! per weight, so the values equal gguf-py's `gguf.quants.dequantize` bit for bit.

use super::ternary;
use super::types::GgmlType;
use half::{bf16, f16};

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn q6k_block(b: &[u8], y: &mut Vec<f32>) {
    let (ql, qh, sc) = (&b[..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    let mut out = [0f32; 256];
    for half in 0..2 {
        let (ql, qh, sc) = (&ql[64 * half..], &qh[32 * half..], &sc[8 * half..]);
        let y = &mut out[128 * half..];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 as i32 - 32;
            y[l] = d * sc[is] as i8 as f32 * q1 as f32;
            y[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
            y[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
            y[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
        }
    }
    y.extend_from_slice(&out);
}

/// The values of a tensor of `dtype` with `shape` (candle order) from its bytes, row-major; a
/// size that does not match the shape is an error.
pub fn dequantize(
    name: &str,
    dtype: GgmlType,
    shape: &[usize],
    bytes: &[u8],
) -> std::result::Result<Vec<f32>, String> {
    let n = shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
        .unwrap_or(u64::MAX);
    let row = shape.last().copied().unwrap_or(0) as u64;
    let want = dtype.tensor_bytes(row, n);
    if want != Some(bytes.len() as u64) {
        return Err(format!(
            "tensor `{name}`: {} bytes of {dtype} for {shape:?}, expected {want:?}",
            bytes.len()
        ));
    }
    let mut y = Vec::with_capacity(n as usize);
    match dtype {
        GgmlType::F32 => y.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        GgmlType::F16 => y.extend(bytes.chunks_exact(2).map(|c| f16_at(c, 0))),
        GgmlType::BF16 => y.extend(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        GgmlType::Q8_0 => {
            for blk in bytes.chunks_exact(34) {
                let d = f16_at(blk, 0);
                y.extend(blk[2..].iter().map(|&q| q as i8 as f32 * d));
            }
        }
        GgmlType::Q6K => bytes.chunks_exact(210).for_each(|b| q6k_block(b, &mut y)),
        GgmlType::TQ1_0 | GgmlType::TQ2_0 | GgmlType::I2S => {
            let (out, inp) = match shape {
                [o, i] => (*o, *i),
                [i] => (1, *i),
                _ => return Err(format!("tensor `{name}`: {dtype} with shape {shape:?}")),
            };
            let p = ternary::to_packed(name, dtype, out, inp, bytes)?;
            for r in 0..out {
                for i in 0..inp {
                    y.push(p.level(r, i) as f32 * p.scale(r, i / p.segment_len()));
                }
            }
        }
    }
    Ok(y)
}

/// `values` (rows of `row` weights) encoded as the float type `dtype` (F32, F16, BF16, Q8_0).
/// F16 and BF16 round to nearest, ties to even (as numpy and torch do). Q8_0 takes gguf-py's
/// `quantize` path: `d = max|x| / 127`, `q = round(x / d)` half away from zero, `d` stored as f16.
pub fn encode_float(dtype: GgmlType, values: &[f32], row: usize) -> candle_core::Result<Vec<u8>> {
    Ok(match dtype {
        GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        GgmlType::BF16 => values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect(),
        GgmlType::Q8_0 => {
            if row % 32 != 0 {
                candle_core::bail!("q8_0 needs rows that are multiples of 32, got {row}");
            }
            let mut out = Vec::with_capacity(values.len() / 32 * 34);
            for blk in values.chunks_exact(32) {
                let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(blk.iter().map(|&v| (v * id).round() as i8 as u8));
            }
            out
        }
        other => candle_core::bail!("{other} is not a float type this writer encodes"),
    })
}
