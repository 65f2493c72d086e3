//! A host emulation of the CUDA packed forward of `cuda.rs`, checked bit for bit against the CPU
//! layer: NVRTC and the kernels only run on a GPU, and this is where their index arithmetic (the
//! lane groups over 16-byte units, the activation offsets of each code slice, the grid-stride
//! loops of the one-launch kernel) and their float order can go wrong. Each function names the
//! CUDA function it transcribes; lanes of a warp run one after the other, and a warp shuffle is
//! a read of every lane's value before any is written.

use super::gpu_plan::{fused_plan, Variant, MAX_GRID_Y};
use super::PackedBitLinear;
use crate::ops::gpu_emulation::tree;
use crate::scheme::Granularity;

/// `THREADS` of `cuda_util.rs`: every block of the packed kernels has 256 threads.
const BDIM: usize = 256;

/// The tensors `CudaPacked::upload` copies to the GPU, and the sizes it derives.
pub(super) struct Layer {
    pub(super) data: Vec<u8>,
    pub(super) scales: Vec<f32>,
    pub(super) srow: usize,
    pub(super) sseg: usize,
    pub(super) bias: Option<Vec<f32>>,
    norm: Option<(Vec<f32>, f32)>,
    pub(super) out: usize,
    pub(super) inp: usize,
    seg: usize,
    segp: usize,
    pub(super) nseg: usize,
    pub(super) seg_bytes: usize,
    pub(super) bits: usize,
}

impl Layer {
    pub(super) fn of(l: &PackedBitLinear) -> Layer {
        let w = l.weight();
        let nseg = w.segments_per_row();
        let (srow, sseg) = match w.granularity() {
            Granularity::PerTensor => (0, 0),
            Granularity::PerChannel => (1, 0),
            Granularity::PerGroup(_) => (nseg, 1),
        };
        Layer {
            data: w.data().to_vec(),
            scales: w.scales().to_vec(),
            srow,
            sseg,
            bias: l.bias().map(<[f32]>::to_vec),
            norm: l.norm().map(|n| {
                let nw = n.weight().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                (nw, n.eps() as f32)
            }),
            out: w.out_features(),
            inp: w.in_features(),
            seg: w.segment_len(),
            segp: w.segment_padded(),
            nseg,
            seg_bytes: w.segment_padded() * w.bits() as usize / 8,
            bits: w.bits() as usize,
        }
    }

    pub(super) fn xrow(&self) -> usize {
        self.nseg * self.segp
    }
}

/// `clampf`: NaN passes through, as Rust's `clamp`.
fn clampf(v: f32, lo: f32, hi: f32) -> f32 {
    if v < lo {
        lo
    } else if v > hi {
        hi
    } else {
        v
    }
}

/// `__dp4a(a, b, c)`: four signed byte products added to `c`.
fn dp4a(a: i32, b: i32, c: i32) -> i32 {
    (0..4).fold(c, |c, k| {
        c + ((a >> (8 * k)) as i8 as i32) * ((b >> (8 * k)) as i8 as i32)
    })
}

/// A little-endian `uint4` / `int4` load of 16 bytes.
fn load4(bytes: &[u8]) -> [u32; 4] {
    std::array::from_fn(|k| u32::from_le_bytes(bytes[4 * k..4 * k + 4].try_into().unwrap()))
}

/// `bq_quant_token`: the token's padded levels, `m / 127` (NaN for a non-finite token) and its
/// count of non-finite values. Threads of the block are the loops over `tid`.
pub(super) fn quant_token(l: &Layer, xt: &[f32]) -> (Vec<i8>, f32, u32) {
    let inp = l.inp;
    let denom = match &l.norm {
        Some((_, eps)) => {
            let full = inp / 8 * 8;
            let mut lanes = [0f32; 9];
            for (lane, a) in lanes.iter_mut().take(8).enumerate() {
                for i in (lane..full).step_by(8) {
                    *a += xt[i] * xt[i];
                }
            }
            for v in &xt[full..inp] {
                lanes[8] += v * v;
            }
            let mut total = 0f32;
            for v in &lanes[..8] {
                total += v;
            }
            total += lanes[8];
            (total / inp as f32 + eps).sqrt()
        }
        None => 1.0,
    };
    let y = |i: usize| match &l.norm {
        Some((nw, _)) => xt[i] / denom * nw[i],
        None => xt[i],
    };
    let mut maxes = vec![0f32; BDIM];
    let mut bads = vec![0u32; BDIM];
    for tid in 0..BDIM {
        for i in (tid..inp).step_by(BDIM) {
            let a = y(i).abs();
            // fmaxf, like f32::max, returns the other operand for NaN.
            maxes[tid] = maxes[tid].max(a);
            bads[tid] += u32::from(!a.is_finite());
        }
    }
    let mx = tree(maxes, f32::max);
    let bad = tree(bads, |a, b| a + b);
    let m = mx.max(1e-5);
    let inv = 127.0 / m;
    let mt = if bad > 0 { f32::NAN } else { m / 127.0 };
    let mut qt = vec![0i8; l.xrow()];
    for (p, q) in qt.iter_mut().enumerate() {
        let (s, k) = (p / l.segp, p % l.segp);
        let mut v = 0f32;
        if k < l.seg {
            v = clampf(
                clampf(y(s * l.seg + k) * inv, -129.0, 128.0).round_ties_even(),
                -128.0,
                127.0,
            );
        }
        // `(int)` of NaN is 0 on the GPU (cvt.rzi), as `as` is in Rust.
        *q = v as i32 as i8;
    }
    (qt, mt, bad)
}

/// Outputs written by the emulated kernels; a second write of one output is a bug of the
/// launch shape (two warps owning it), so it panics.
pub(super) struct Out {
    pub(super) y: Vec<Option<f32>>,
    pub(super) out: usize,
}

impl Out {
    pub(super) fn put(&mut self, t: usize, row: usize, v: f32) {
        let slot = &mut self.y[t * self.out + row];
        assert!(slot.is_none(), "output ({t}, {row}) written twice");
        *slot = Some(v);
    }

    /// Every output, each written once.
    pub(super) fn done(self) -> Vec<f32> {
        self.y
            .into_iter()
            .enumerate()
            .map(|(i, v)| v.unwrap_or_else(|| panic!("output {i} never written")))
            .collect()
    }
}

/// `bq_mm_warp<BITS, R, TT>`: one warp's `r` rows from `r0` and `tt` tokens from `t0`, levels
/// `xq [tokens][xrow]` and factors `mt`.
#[allow(clippy::too_many_arguments)]
fn mm_warp(
    l: &Layer,
    (r, tt): (usize, usize),
    xq: &[i8],
    mt: &[f32],
    tokens: usize,
    r0: usize,
    t0: usize,
    y: &mut Out,
) {
    let nj = 8 / l.bits;
    let xstride = 128 / nj;
    let mask: u32 = if l.bits == 2 {
        0x0303_0303
    } else {
        0x0101_0101
    };
    let rt = r * tt;
    let row_bytes = l.nseg * l.seg_bytes;
    let segp = l.seg_bytes * nj;
    let xrow = l.nseg * segp;
    let units = l.seg_bytes >> 4;
    let mut g = 1usize;
    while g < 32 && g < units {
        g <<= 1;
    }
    let per = 32 / g;
    let xbytes: Vec<u8> = xq.iter().map(|&v| v as u8).collect();
    let mut acc = [0f32; 32];
    let mut shw = vec![0i32; 32 * (rt + 1)];
    for s0 in (0..l.nseg).step_by(per) {
        let mut isum = vec![vec![0i32; rt]; 32];
        for (lane, isum) in isum.iter_mut().enumerate() {
            let (gl, gi) = (lane & (g - 1), lane / g);
            let s = s0 + gi;
            if s >= l.nseg {
                continue;
            }
            let mut dot = vec![0i32; rt];
            let mut sx = vec![0i32; tt];
            for u in (gl..units).step_by(g) {
                let wv: Vec<[u32; 4]> = (0..r)
                    .map(|k| {
                        if r0 + k < l.out {
                            let at = (r0 + k) * row_bytes + s * l.seg_bytes + u * 16;
                            load4(&l.data[at..at + 16])
                        } else {
                            [0; 4]
                        }
                    })
                    .collect();
                let xoff = s * segp
                    + if l.bits == 2 {
                        (u >> 1) * 128 + (u & 1) * 16
                    } else {
                        u * 128
                    };
                for t in 0..tt {
                    if t0 + t >= tokens {
                        continue;
                    }
                    let xb = (t0 + t) * xrow + xoff;
                    for j in 0..nj {
                        let at = xb + j * xstride;
                        let xv = load4(&xbytes[at..at + 16]).map(|v| v as i32);
                        for v in xv {
                            sx[t] = dp4a(v, 0x0101_0101, sx[t]);
                        }
                        for (k, wv) in wv.iter().enumerate() {
                            let sh = (l.bits * j) as u32;
                            for (wq, xv) in wv.iter().zip(xv) {
                                let d = &mut dot[k * tt + t];
                                *d = dp4a(((wq >> sh) & mask) as i32, xv, *d);
                            }
                        }
                    }
                }
            }
            for k in 0..r {
                for t in 0..tt {
                    let d = dot[k * tt + t];
                    isum[k * tt + t] = if l.bits == 2 { d } else { 2 * d } - sx[t];
                }
            }
        }
        // __shfl_xor_sync within each group of g lanes.
        let mut o = g >> 1;
        while o > 0 {
            let before = isum.clone();
            for (lane, v) in isum.iter_mut().enumerate() {
                for (a, b) in v.iter_mut().zip(&before[lane ^ o]) {
                    *a += b;
                }
            }
            o >>= 1;
        }
        for (lane, v) in isum.iter().enumerate() {
            if lane & (g - 1) == 0 {
                let gi = lane / g;
                shw[gi * (rt + 1)..gi * (rt + 1) + rt].copy_from_slice(v);
            }
        }
        for (lane, acc) in acc.iter_mut().enumerate().take(rt) {
            let row = r0 + lane / tt;
            if row >= l.out {
                continue;
            }
            for k in 0..per {
                if s0 + k >= l.nseg {
                    break;
                }
                let sc = l.scales[row * l.srow + (s0 + k) * l.sseg];
                *acc += shw[k * (rt + 1) + lane] as f32 * sc;
            }
        }
    }
    for (lane, acc) in acc.iter().enumerate().take(rt) {
        let (row, t) = (r0 + lane / tt, t0 + lane % tt);
        if row < l.out && t < tokens {
            let b = l.bias.as_ref().map_or(0.0, |b| b[row]);
            y.put(t, row, acc * mt[t] + b);
        }
    }
}

/// The one-launch forward (`bq_packed_fused<BITS, W, R, TT>`) on a GPU of `sms`
/// multiprocessors: `(y, the non-finite count block 0 adds)`.
fn fused(l: &Layer, x: &[f32], tokens: usize, sms: usize) -> (Vec<f32>, u32) {
    let plan = fused_plan(tokens, l.xrow(), l.out, sms).expect("a one-launch shape");
    let v = plan.variant;
    assert_eq!(plan.shared_bytes, tokens * l.xrow());
    let mut y = Out {
        y: vec![None; tokens * l.out],
        out: l.out,
    };
    let mut count = 0;
    for block in 0..plan.blocks {
        let mut xs = Vec::new();
        let mut mts = Vec::new();
        for t in 0..tokens {
            let (q, mt, bad) = quant_token(l, &x[t * l.inp..(t + 1) * l.inp]);
            xs.extend(q);
            mts.push(mt);
            if block == 0 {
                count += bad;
            }
        }
        for wid in 0..v.warps {
            let mut rg = block * v.warps + wid;
            while rg * v.rows < l.out {
                mm_warp(
                    l,
                    (v.rows, v.tokens),
                    &xs,
                    &mts,
                    tokens,
                    rg * v.rows,
                    0,
                    &mut y,
                );
                rg += plan.blocks * v.warps;
            }
        }
    }
    (y.done(), count)
}

/// The two-launch forward (`bq_packed_quant`, then `bq_packed_mm<BITS, W, R, TT>` on its grid).
fn two_launch(l: &Layer, x: &[f32], tokens: usize) -> (Vec<f32>, u32) {
    let mut xq = Vec::new();
    let mut mt = Vec::new();
    let mut count = 0;
    for t in 0..tokens {
        let (q, m, bad) = quant_token(l, &x[t * l.inp..(t + 1) * l.inp]);
        xq.extend(q);
        mt.push(m);
        count += bad;
    }
    let v = Variant::for_tokens(tokens);
    let blocks_x = l.out.div_ceil(v.warps * v.rows);
    let tiles = tokens.div_ceil(v.tokens);
    let blocks_y = tiles.min(MAX_GRID_Y);
    let mut y = Out {
        y: vec![None; tokens * l.out],
        out: l.out,
    };
    for bx in 0..blocks_x {
        for by in 0..blocks_y {
            for wid in 0..v.warps {
                let r0 = (bx * v.warps + wid) * v.rows;
                if r0 >= l.out {
                    continue;
                }
                for tile in (by..tiles).step_by(blocks_y) {
                    let shape = (v.rows, v.tokens);
                    mm_warp(l, shape, &xq, &mt, tokens, r0, tile * v.tokens, &mut y);
                }
            }
        }
    }
    (y.done(), count)
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::gpu_plan::{FUSED_BLOCKS_PER_SM, FUSED_MAX_LEVEL_BYTES};
    use super::*;
    use crate::{BitLinear, BitLinearConfig, Estimator, Quantizer, RmsNorm, Scheme};
    use candle_core::{Device, Module, Tensor};
    use rand::{Rng, SeedableRng};

    /// A packed layer `[out, inp]` of random weights with the given quantizer, bias and norm.
    pub(in crate::packed) fn layer(
        inp: usize,
        out: usize,
        q: Quantizer,
        bias: bool,
        norm: bool,
    ) -> PackedBitLinear {
        let mut rng = rand::rngs::StdRng::seed_from_u64((inp * 31 + out) as u64);
        let mut vals = |n: usize, lo: f32, hi: f32| -> Vec<f32> {
            (0..n).map(|_| rng.random_range(lo..hi)).collect()
        };
        let w = Tensor::from_vec(vals(out * inp, -0.1, 0.1), (out, inp), &Device::Cpu).unwrap();
        let b = bias.then(|| Tensor::from_vec(vals(out, -1.0, 1.0), out, &Device::Cpu).unwrap());
        let n = norm.then(|| {
            let nw = Tensor::from_vec(vals(inp, 0.5, 1.5), inp, &Device::Cpu).unwrap();
            RmsNorm::from_weight(nw, 1e-6)
        });
        let cfg = BitLinearConfig {
            bias,
            norm,
            weight: q,
            ..Default::default()
        };
        PackedBitLinear::from_trained(&BitLinear::from_parts(w, b, n, cfg)).unwrap()
    }

    /// Input with exact zeros and values on rounding ties of the int8 grid.
    pub(in crate::packed) fn input(tokens: usize, inp: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..tokens * inp)
            .map(|i| match i % 53 {
                3 => 0.0,
                7 => 63.5,
                _ => rng.random_range(-127.0..127.0f32),
            })
            .collect()
    }

    pub(in crate::packed) fn cpu(l: &PackedBitLinear, x: &[f32], tokens: usize) -> Vec<f32> {
        let (inp, _) = l.dims();
        let x = Tensor::from_vec(x.to_vec(), (tokens, inp), &Device::Cpu).unwrap();
        l.forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    pub(in crate::packed) fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                "{what}: output {i}: got {g}, want {w}"
            );
        }
    }

    /// Both paths of the CUDA forward, emulated, equal the CPU layer bit for bit: ternary and
    /// binary weights, every granularity (groups of several segments per warp pass, of one,
    /// and of several 16-byte units), bias and norm, batches on both sides of the one-launch
    /// limit, and grids with fewer blocks than row groups (the grid-stride loop).
    #[test]
    fn kernels_equal_the_cpu_layer() {
        let shapes = [
            (7usize, 5usize, 7usize),
            (130, 31, 65),
            (300, 1, 100),
            (1000, 37, 200),
            (2560, 21, 256),
        ];
        let mut checked = 0;
        for (inp, out, group) in shapes {
            for scheme in [Scheme::TernaryAbsmean, Scheme::Binary { scaled: true }] {
                for g in [
                    Granularity::PerTensor,
                    Granularity::PerChannel,
                    Granularity::PerGroup(group),
                ] {
                    for (bias, norm) in [(false, false), (true, true)] {
                        let q = Quantizer::new(scheme, Estimator::Identity)
                            .unwrap()
                            .with_granularity(g)
                            .unwrap();
                        let packed = layer(inp, out, q, bias, norm);
                        let l = Layer::of(&packed);
                        for tokens in [1usize, 2, 4, 5, 9] {
                            let x = input(tokens, inp, (inp + tokens) as u64);
                            let want = cpu(&packed, &x, tokens);
                            let what = format!(
                                "{scheme:?} {g:?} [{out}, {inp}] bias={bias} norm={norm} \
                                 tokens={tokens}"
                            );
                            let (got, bad) = two_launch(&l, &x, tokens);
                            assert_eq!(bad, 0);
                            assert_bits(&format!("two launches {what}"), &got, &want);
                            if tokens <= 4 {
                                for sms in [1, 3, 200] {
                                    let (got, bad) = fused(&l, &x, tokens, sms);
                                    assert_eq!(bad, 0);
                                    let w = format!("one launch, {sms} SMs, {what}");
                                    assert_bits(&w, &got, &want);
                                }
                            }
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 5 * 2 * 3 * 2 * 5);
    }

    /// Tokens holding NaN or infinity: their outputs are NaN (the unchecked CPU layer's), the
    /// other tokens' are the CPU's, and the count (block 0's only, in the one-launch kernel)
    /// is the CPU layer's, which counts after the norm (a NaN spreads to the whole token
    /// through its sum of squares; an infinity turns only itself into NaN).
    #[test]
    fn non_finite_tokens() {
        for norm in [false, true] {
            let q = Quantizer::new(Scheme::TernaryAbsmean, Estimator::Identity).unwrap();
            let packed = layer(300, 19, q, true, norm).with_finite_check(false);
            let l = Layer::of(&packed);
            let mut x = input(3, 300, 5);
            x[310] = f32::NAN;
            x[899] = f32::INFINITY;
            let want = cpu(&packed, &x, 3);
            assert!(want[19..38].iter().all(|v| v.is_nan()));
            assert!(want[38..].iter().all(|v| v.is_nan()));
            let xt = Tensor::from_vec(x.clone(), (3, 300), &Device::Cpu).unwrap();
            let e = packed.clone().with_finite_check(true).forward(&xt);
            let e = e.unwrap_err().to_string();
            let count = if norm { 301 } else { 2 };
            assert!(e.contains(&format!("contains {count} NaN")), "{e}");
            let (got, bad) = two_launch(&l, &x, 3);
            assert_eq!(bad, count, "norm={norm}");
            assert_bits("two launches", &got, &want);
            for sms in [1, 2] {
                let (got, bad) = fused(&l, &x, 3, sms);
                assert_eq!(bad, count, "norm={norm}, {sms} SMs");
                assert_bits("one launch", &got, &want);
            }
        }
    }

    /// The one-launch shape: up to 4 tokens whose levels fit the shared memory limit, a grid
    /// of at most `FUSED_BLOCKS_PER_SM` blocks per multiprocessor and at least one.
    #[test]
    fn fused_plans() {
        // (tokens, xrow, out, SMs, the variant and blocks or the two-launch path)
        type Case = (usize, usize, usize, usize, Option<(&'static str, usize)>);
        let cases: [Case; 7] = [
            (1, 2560, 6912, 132, Some(("gemv", 264))),
            (1, 14336, 4096, 132, Some(("gemv", 264))),
            (1, 128, 5, 132, Some(("gemv", 1))),
            (4, 6912, 2560, 132, Some(("small", 264))),
            (3, 6912, 40, 132, Some(("small", 5))),
            (2, 27648, 2560, 132, None),
            (5, 128, 5, 132, None),
        ];
        for (tokens, xrow, out, sms, want) in cases {
            let got = fused_plan(tokens, xrow, out, sms);
            assert_eq!(
                got.map(|p| (p.variant.name, p.blocks)),
                want,
                "{tokens} x {xrow} -> {out}"
            );
            if let Some(p) = got {
                assert!(p.shared_bytes <= FUSED_MAX_LEVEL_BYTES);
                assert!(p.blocks <= sms * FUSED_BLOCKS_PER_SM);
            }
        }
    }
}
