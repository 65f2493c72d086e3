//! Ternary GGUF tensors (TQ1_0, TQ2_0, I2_S) to and from [`PackedTernary`], code for code.
//!
//! * **TQ2_0** (llama.cpp `block_tq2_0`): 256 weights, 64 bytes of codes then an f16 scale `d`.
//!   Each 32-byte half covers 128 weights; byte `m` holds weights `m`, `m+32`, `m+64`, `m+96` in
//!   bits 0-1, 2-3, 4-5, 6-7 as `level + 1`: exactly our 128-weight block, so rows copy as they
//!   are.
//! * **TQ1_0** (`block_tq1_0`): 256 weights as base-3 digits: `qs[0..32]` hold five trits each
//!   (weights `m + 32 n`), `qs[32..48]` five each (weights `160 + m + 16 n`), `qh[0..4]` four
//!   each (weights `240 + j + 4 n`), the first trit most significant, the byte stored as
//!   `ceil(q * 256 / 243)` so that trit `n` is `((q * 3^n) mod 256) * 3 >> 8`; then an f16 `d`.
//! * **I2_S** (bitnet.cpp, x86 `ACT_PARALLEL` layout, what its `convert-hf-to-gguf-bitnet.py`
//!   writes): the tensor flattened row-major in 128-weight blocks of 32 bytes, byte `m` holding
//!   weights `m`, `m+32`, `m+64`, `m+96` in bits 6-7, 4-5, 2-3, 0-1 (the reverse of ours), codes
//!   `level + 1`; then one f32 scale at byte `n / 4` in a 32-byte tail.
//!
//! Scales: a TQ block's `d` is f16. llama.cpp's quantizer stores `d = max|w|` of the block, which
//! for ternary weights `level * s` is `s` rounded to f16 (a relative change of at most 2^-11)
//! in every block that has a nonzero weight. Reading, blocks whose nonzero `d` all agree give one
//! per-tensor scale; otherwise each block keeps its own (`PerGroup(256)`). Writing, every block
//! gets the f16 of its segment's scale. I2_S keeps the f32 scale exactly.

use super::types::GgmlType;
use bitnet_quant::packed::PackedTernary;
use bitnet_quant::Granularity;
use candle_core::Result;
use half::f16;

const QK: usize = 256;
const POW3: [u8; 6] = [1, 3, 9, 27, 81, 243];

/// Trit `n` (0, 1 or 2) of a TQ1_0 byte.
#[inline]
fn trit(q: u8, n: usize) -> u8 {
    ((q.wrapping_mul(POW3[n]) as u16 * 3) >> 8) as u8
}

/// The 256 codes (`level + 1`) of a TQ1_0 block, in weight order.
fn tq1_codes(block: &[u8]) -> [u8; QK] {
    let (qs, qh) = (&block[..48], &block[48..52]);
    let mut c = [0u8; QK];
    for n in 0..5 {
        for m in 0..32 {
            c[n * 32 + m] = trit(qs[m], n);
        }
        for m in 0..16 {
            c[160 + n * 16 + m] = trit(qs[32 + m], n);
        }
    }
    for n in 0..4 {
        for j in 0..4 {
            c[240 + n * 4 + j] = trit(qh[j], n);
        }
    }
    c
}

/// A TQ1_0 block's 52 code bytes from 256 codes, as llama.cpp's `quantize_row_tq1_0_ref` packs.
fn tq1_pack(c: &[u8; QK], out: &mut [u8]) {
    let pack = |trits: &mut dyn Iterator<Item = u8>, extra: bool| -> u8 {
        let mut q: u16 = 0;
        for t in trits {
            q = q * 3 + t as u16;
        }
        if extra {
            q *= 3;
        }
        (q * 256).div_ceil(243) as u8
    };
    for m in 0..32 {
        out[m] = pack(&mut (0..5).map(|n| c[m + n * 32]), false);
    }
    for m in 0..16 {
        out[32 + m] = pack(&mut (0..5).map(|n| c[160 + m + n * 16]), false);
    }
    for j in 0..4 {
        out[48 + j] = pack(&mut (0..4).map(|n| c[240 + j + n * 4]), true);
    }
}

/// Our 2-bit code bytes for 128 codes in weight order.
fn our_block(codes: &[u8], out: &mut [u8]) {
    for m in 0..32 {
        out[m] = codes[m] | codes[m + 32] << 2 | codes[m + 64] << 4 | codes[m + 96] << 6;
    }
}

/// `b` with its four 2-bit fields in reverse order (I2_S <-> ours).
#[inline]
fn reverse_fields(b: u8) -> u8 {
    (b >> 6) | ((b >> 2) & 0b1100) | ((b << 2) & 0b11_0000) | (b << 6)
}

/// A ternary tensor `[out, inp]` of `dtype` (its bytes checked in size by the reader) as packed
/// weights. `name` is for errors.
pub fn to_packed(
    name: &str,
    dtype: GgmlType,
    out: usize,
    inp: usize,
    bytes: &[u8],
) -> std::result::Result<PackedTernary, String> {
    let elements = (out as u64).checked_mul(inp as u64);
    let want = elements.and_then(|n| dtype.tensor_bytes(inp as u64, n));
    if !dtype.is_ternary() || out == 0 || want != Some(bytes.len() as u64) {
        return Err(format!(
            "tensor `{name}`: {} bytes of {dtype} for [{out}, {inp}], expected {want:?} (rows of whole {}-weight blocks)",
            bytes.len(),
            dtype.block_size()
        ));
    }
    let row_bytes = inp / 4;
    let mut data = vec![0u8; out * row_bytes];
    let mut scales: Vec<f32>;
    match dtype {
        GgmlType::TQ2_0 | GgmlType::TQ1_0 => {
            let nb = inp / QK;
            let bb = dtype.block_bytes();
            scales = Vec::with_capacity(out * nb);
            let mut nonzero = Vec::with_capacity(out * nb);
            for r in 0..out {
                for b in 0..nb {
                    let blk = &bytes[(r * nb + b) * bb..(r * nb + b + 1) * bb];
                    let dst = &mut data[r * row_bytes + b * 64..r * row_bytes + (b + 1) * 64];
                    let d = f16::from_le_bytes([blk[bb - 2], blk[bb - 1]]).to_f32();
                    if dtype == GgmlType::TQ2_0 {
                        dst.copy_from_slice(&blk[..64]);
                    } else {
                        let c = tq1_codes(blk);
                        our_block(&c[..128], &mut dst[..32]);
                        our_block(&c[128..], &mut dst[32..]);
                    }
                    nonzero.push(dst.iter().any(|&x| x != 0x55));
                    scales.push(d);
                }
            }
            let mut used = scales.iter().zip(&nonzero).filter(|(_, &nz)| nz);
            let first = used
                .next()
                .map_or(scales.first().copied().unwrap_or(0.0), |s| *s.0);
            if used.all(|(s, _)| s.to_bits() == first.to_bits()) {
                return build(name, out, inp, Granularity::PerTensor, &data, &[first]);
            }
            build(name, out, inp, Granularity::PerGroup(QK), &data, &scales)
        }
        GgmlType::I2S => {
            let n = out * inp;
            for (d, &s) in data.iter_mut().zip(&bytes[..n / 4]) {
                *d = reverse_fields(s);
            }
            let scale = f32::from_le_bytes([
                bytes[n / 4],
                bytes[n / 4 + 1],
                bytes[n / 4 + 2],
                bytes[n / 4 + 3],
            ]);
            scales = vec![scale];
            build(name, out, inp, Granularity::PerTensor, &data, &scales)
        }
        other => Err(format!("tensor `{name}` is {other}, not a ternary type")),
    }
}

fn build(
    name: &str,
    out: usize,
    inp: usize,
    g: Granularity,
    data: &[u8],
    scales: &[f32],
) -> std::result::Result<PackedTernary, String> {
    PackedTernary::from_raw(out, inp, g, data, scales).map_err(|e| format!("tensor `{name}`: {e}"))
}

/// The codes of row `r` of `p` in weight order (`level + 1`).
fn row_codes(p: &PackedTernary, r: usize) -> Vec<u8> {
    (0..p.in_features())
        .map(|i| (p.level(r, i) + 1) as u8)
        .collect()
}

/// `p` encoded as `dtype` (TQ1_0, TQ2_0 or I2_S): rows must be whole blocks (256 weights for TQ,
/// 128 for I2_S), every TQ block must lie within one scale segment, I2_S needs one scale.
pub fn from_packed(p: &PackedTernary, dtype: GgmlType) -> Result<Vec<u8>> {
    let (out, inp) = (p.out_features(), p.in_features());
    let bs = dtype.block_size();
    if p.bits() != 2 || !dtype.is_ternary() {
        candle_core::bail!("{dtype}: only 2-bit ternary weights encode as a ternary GGUF type");
    }
    if inp % bs != 0 {
        candle_core::bail!(
            "{dtype} needs rows that are multiples of {bs} weights; this weight's rows have {inp} (llama.cpp's converter falls back to F16 for such tensors)"
        );
    }
    match dtype {
        GgmlType::I2S => {
            if p.granularity() != Granularity::PerTensor {
                candle_core::bail!(
                    "i2_s holds one scale per tensor; this weight has {:?} scales",
                    p.granularity()
                );
            }
            let n = out * inp;
            let mut bytes = vec![0u8; n / 4 + 32];
            for r in 0..out {
                let c = row_codes(p, r);
                for (k, blk) in c.chunks_exact(128).enumerate() {
                    let dst = &mut bytes[(r * inp + k * 128) / 4..][..32];
                    for m in 0..32 {
                        dst[m] = blk[m] << 6 | blk[m + 32] << 4 | blk[m + 64] << 2 | blk[m + 96];
                    }
                }
            }
            bytes[n / 4..n / 4 + 4].copy_from_slice(&p.scales()[0].to_le_bytes());
            Ok(bytes)
        }
        _ => {
            if p.segment_len() % QK != 0 {
                candle_core::bail!(
                    "{dtype} has one scale per 256 weights; this weight's scale segments are {} long",
                    p.segment_len()
                );
            }
            let nb = inp / QK;
            let bb = dtype.block_bytes();
            let mut bytes = vec![0u8; out * nb * bb];
            for r in 0..out {
                let c = row_codes(p, r);
                for b in 0..nb {
                    let dst = &mut bytes[(r * nb + b) * bb..(r * nb + b + 1) * bb];
                    let codes: &[u8; QK] = c[b * QK..(b + 1) * QK]
                        .try_into()
                        .expect("a 256-code block");
                    if dtype == GgmlType::TQ2_0 {
                        our_block(&codes[..128], &mut dst[..32]);
                        our_block(&codes[128..], &mut dst[32..64]);
                    } else {
                        tq1_pack(codes, dst);
                    }
                    let d = f16::from_f32(p.scale(r, b * QK / p.segment_len()));
                    dst[bb - 2..].copy_from_slice(&d.to_le_bytes());
                }
            }
            Ok(bytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tq1_trits_round_trip_every_five_trit_byte() {
        // Every combination of five trits packs to a byte that decodes to the same trits.
        for v in 0..243u16 {
            let t: Vec<u8> = (0..5)
                .rev()
                .map(|n| ((v / 3u16.pow(n)) % 3) as u8)
                .collect();
            let mut q: u16 = 0;
            for &x in &t {
                q = q * 3 + x as u16;
            }
            let b = (q * 256).div_ceil(243) as u8;
            let back: Vec<u8> = (0..5).map(|n| trit(b, n)).collect();
            assert_eq!(back, t, "value {v}");
        }
    }

    #[test]
    fn sizes_that_do_not_fit_the_shape_are_errors() {
        let cases: [(GgmlType, usize, usize, usize); 5] = [
            (GgmlType::TQ2_0, 2, 256, 10),
            (GgmlType::TQ2_0, 2, 100, 66),
            (GgmlType::TQ1_0, 1, 256, 66),
            (GgmlType::I2S, 1, 128, 32),
            (GgmlType::F16, 1, 256, 512),
        ];
        for (t, out, inp, len) in cases {
            let err = to_packed("w", t, out, inp, &vec![0x55; len]).unwrap_err();
            assert!(
                err.contains("tensor `w`"),
                "{t} [{out}, {inp}] {len}: {err}"
            );
        }
        // The right sizes: zero codes (0x55 is four of them in our and TQ2_0's layout).
        assert!(to_packed("w", GgmlType::TQ2_0, 2, 256, &[0x55; 132]).is_ok());
        assert!(to_packed("w", GgmlType::I2S, 1, 128, &[0x55; 64]).is_ok());
    }

    #[test]
    fn reverse_fields_swaps_the_four_codes() {
        assert_eq!(reverse_fields(0b00_01_10_00), 0b00_10_01_00);
        assert_eq!(reverse_fields(0b10_00_00_01), 0b01_00_00_10);
        for b in 0..=255u8 {
            assert_eq!(reverse_fields(reverse_fields(b)), b);
        }
    }
}
