//! A host emulation of the tensor-core kernel `bq_packed_mma{1,2}` of `cuda.rs` (`SRC_MMA`).
//!
//! `mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32` is emulated from the PTX ISA's fragment
//! layout ("Matrix Fragments for mma.m16n8k32", integer types), written down here once
//! (`a_at`, `b_at`, `c_at`) and independently of the kernel's own addressing (`frag_a`,
//! `frag_b`, `c_kernel`, transcribed from the CUDA C). The tests check that the kernel's
//! addressing fed through the ISA's layout computes a plain integer matmul on random tiles —
//! what catches a wrong fragment mapping without a GPU — and that the whole kernel, emulated,
//! equals the CPU layer bit for bit.

// The loops transcribe the kernel's index loops (fragments, tiles, lanes) one for one.
#![allow(clippy::needless_range_loop)]

use super::cuda_emulation::{quant_token, Layer, Out};
use super::gpu_plan::{MAX_GRID_Y, MMA_TILE};

/// `BQ_LDS`: bytes per row of the shared tiles.
const LDS: usize = 144;

/// The ISA's A fragment (16 x 32, row-major) of `lane`, element `i` of 16: `(row, col)`.
fn a_at(lane: usize, i: usize) -> (usize, usize) {
    let (group, tig) = (lane >> 2, lane % 4);
    let row = if i < 4 || (8..12).contains(&i) {
        group
    } else {
        group + 8
    };
    let col = if i < 8 {
        tig * 4 + (i & 3)
    } else {
        tig * 4 + (i & 3) + 16
    };
    (row, col)
}

/// The ISA's B fragment (32 x 8, column-major) of `lane`, element `i` of 8: `(k, n)`.
fn b_at(lane: usize, i: usize) -> (usize, usize) {
    let (group, tig) = (lane >> 2, lane % 4);
    let k = if i < 4 {
        tig * 4 + (i & 3)
    } else {
        tig * 4 + (i & 3) + 16
    };
    (k, group)
}

/// The ISA's C/D fragment (16 x 8) of `lane`, element `i` of 4: `(row, col)`.
fn c_at(lane: usize, i: usize) -> (usize, usize) {
    let (group, tig) = (lane >> 2, lane % 4);
    let row = if i < 2 { group } else { group + 8 };
    (row, tig * 2 + (i & 1))
}

/// Byte `k` of a register as a signed value.
fn byte(v: u32, k: usize) -> i32 {
    (v >> (8 * k)) as u8 as i8 as i32
}

/// One `mma.sync` of the warp: `c += a b` on the lanes' fragments, through the ISA's layout.
fn mma(a: &[[u32; 4]; 32], b: &[[u32; 2]; 32], c: &mut [[i32; 4]; 32]) {
    let mut am = [[0i32; 32]; 16];
    let mut bm = [[0i32; 8]; 32];
    let mut cm = [[0i32; 8]; 16];
    for lane in 0..32 {
        for i in 0..16 {
            let (r, k) = a_at(lane, i);
            am[r][k] = byte(a[lane][i / 4], i % 4);
        }
        for i in 0..8 {
            let (k, n) = b_at(lane, i);
            bm[k][n] = byte(b[lane][i / 4], i % 4);
        }
        for i in 0..4 {
            let (r, n) = c_at(lane, i);
            cm[r][n] = c[lane][i];
        }
    }
    for lane in 0..32 {
        for i in 0..4 {
            let (r, n) = c_at(lane, i);
            c[lane][i] = cm[r][n] + (0..32).map(|k| am[r][k] * bm[k][n]).sum::<i32>();
        }
    }
}

/// A 32-bit shared-memory load.
fn ld32(sh: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(sh[at..at + 4].try_into().unwrap())
}

/// The kernel's A registers of `lane` for the m16 tile from row `row0`, k-step base `kb`.
fn frag_a(sw: &[u8], row0: usize, kb: usize, lane: usize) -> [u32; 4] {
    let (g, q) = (lane >> 2, lane & 3);
    let p = (row0 + g) * LDS + kb + 4 * q;
    [
        ld32(sw, p),
        ld32(sw, p + 8 * LDS),
        ld32(sw, p + 16),
        ld32(sw, p + 8 * LDS + 16),
    ]
}

/// The kernel's B registers of `lane` for the n8 tile from token `tok0`.
fn frag_b(sx: &[u8], tok0: usize, kb: usize, lane: usize) -> [u32; 2] {
    let (g, q) = (lane >> 2, lane & 3);
    let p = (tok0 + g) * LDS + kb + 4 * q;
    [ld32(sx, p), ld32(sx, p + 16)]
}

/// The kernel's `(row, token)` offsets of `lane`'s accumulator `e` within an m16 x n8 tile.
fn c_kernel(lane: usize, e: usize) -> (usize, usize) {
    let (g, q) = (lane >> 2, lane & 3);
    (g + if e >= 2 { 8 } else { 0 }, 2 * q + (e & 1))
}

/// `bq_levels2` / `bq_levels1`.
fn levels2(codes: u32) -> u32 {
    codes.wrapping_add(0x7f7f_7f7f) ^ 0x8080_8080
}
fn levels1(bits: u32) -> u32 {
    (bits << 1).wrapping_add(0x7f7f_7f7f) ^ 0x8080_8080
}

fn put32(sh: &mut [u8], at: usize, v: u32) {
    sh[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// `bq_packed_mma<BITS>` on its grid, after `bq_packed_quant` (levels and factors as the
/// two-launch path computes them).
fn mma_forward(l: &Layer, x: &[f32], tokens: usize) -> Vec<f32> {
    let (tm, tn) = MMA_TILE;
    let mut xq = Vec::new();
    let mut mt = Vec::new();
    for t in 0..tokens {
        let (q, m, _) = quant_token(l, &x[t * l.inp..(t + 1) * l.inp]);
        xq.extend(q.iter().map(|&v| v as u8));
        mt.push(m);
    }
    let row_bytes = l.nseg * l.seg_bytes;
    let segp = l.seg_bytes * (8 / l.bits);
    let xrow = l.nseg * segp;
    let chunks = segp / 128;
    let cbytes = 128 * l.bits / 8;
    let tiles = tokens.div_ceil(tn);
    let (blocks_x, blocks_y) = (l.out.div_ceil(tm), tiles.min(MAX_GRID_Y));
    let mut y = Out {
        y: vec![None; tokens * l.out],
        out: l.out,
    };
    let load = |at: usize| u32::from_le_bytes(l.data[at..at + 4].try_into().unwrap());
    for bx in 0..blocks_x {
        let r_base = bx * tm;
        for by in 0..blocks_y {
            for tile in (by..tiles).step_by(blocks_y) {
                let t_base = tile * tn;
                // Per warp, per lane: acc[mi][ni][e] and c[mi][ni][e].
                let mut acc = vec![[[[0f32; 4]; 4]; 2]; 4 * 32];
                let mut c = vec![[[[0i32; 4]; 4]; 2]; 4 * 32];
                for s in 0..l.nseg {
                    for kc in 0..chunks {
                        let mut sw = vec![0xAAu8; tm * LDS];
                        let mut sx = vec![0xAAu8; tn * LDS];
                        for tid in 0..128 {
                            let (rl, h) = (tid >> 1, tid & 1);
                            let row = r_base + rl;
                            let valid = row < l.out;
                            let src = row * row_bytes + s * l.seg_bytes + kc * cbytes;
                            let dst = rl * LDS;
                            if l.bits == 2 {
                                for j in 0..4 {
                                    for k in 0..4 {
                                        let o = if valid {
                                            let v = load(src + h * 16 + 4 * k);
                                            levels2((v >> (2 * j)) & 0x0303_0303)
                                        } else {
                                            0
                                        };
                                        put32(&mut sw, dst + h * 16 + 32 * j + 4 * k, o);
                                    }
                                }
                            } else {
                                for j in 0..8 {
                                    for k in 0..2 {
                                        let o = if valid {
                                            let v = load(src + h * 8 + 4 * k);
                                            levels1((v >> j) & 0x0101_0101)
                                        } else {
                                            0
                                        };
                                        put32(&mut sw, dst + 8 * h + 16 * j + 4 * k, o);
                                    }
                                }
                            }
                            let t = t_base + rl;
                            let dst = rl * LDS + h * 64;
                            for i in 0..64 {
                                sx[dst + i] = if t < tokens {
                                    xq[t * xrow + s * segp + kc * 128 + h * 64 + i]
                                } else {
                                    0
                                };
                            }
                        }
                        for wid in 0..4 {
                            let (wm, wn) = (wid >> 1, wid & 1);
                            for ks in 0..4 {
                                let kb = ks * 32;
                                for mi in 0..2 {
                                    for ni in 0..4 {
                                        let a: [[u32; 4]; 32] = std::array::from_fn(|lane| {
                                            frag_a(&sw, wm * 32 + mi * 16, kb, lane)
                                        });
                                        let b: [[u32; 2]; 32] = std::array::from_fn(|lane| {
                                            frag_b(&sx, wn * 32 + ni * 8, kb, lane)
                                        });
                                        let mut cf: [[i32; 4]; 32] =
                                            std::array::from_fn(|lane| c[wid * 32 + lane][mi][ni]);
                                        mma(&a, &b, &mut cf);
                                        for (lane, v) in cf.iter().enumerate() {
                                            c[wid * 32 + lane][mi][ni] = *v;
                                        }
                                    }
                                }
                            }
                        }
                    }
                    for wid in 0..4 {
                        for lane in 0..32 {
                            let th = wid * 32 + lane;
                            for mi in 0..2 {
                                for e in 0..4 {
                                    let row =
                                        r_base + (wid >> 1) * 32 + mi * 16 + c_kernel(lane, e).0;
                                    let sc = if row < l.out {
                                        l.scales[row * l.srow + s * l.sseg]
                                    } else {
                                        0.0
                                    };
                                    for ni in 0..4 {
                                        acc[th][mi][ni][e] += c[th][mi][ni][e] as f32 * sc;
                                        c[th][mi][ni][e] = 0;
                                    }
                                }
                            }
                        }
                    }
                }
                for wid in 0..4 {
                    let (wm, wn) = (wid >> 1, wid & 1);
                    for lane in 0..32 {
                        for mi in 0..2 {
                            for ni in 0..4 {
                                for e in 0..4 {
                                    let (dr, dt) = c_kernel(lane, e);
                                    let row = r_base + wm * 32 + mi * 16 + dr;
                                    let t = t_base + wn * 32 + ni * 8 + dt;
                                    if row < l.out && t < tokens {
                                        let b = l.bias.as_ref().map_or(0.0, |b| b[row]);
                                        let v = acc[wid * 32 + lane][mi][ni][e];
                                        y.put(t, row, v * mt[t] + b);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    y.done()
}

#[cfg(test)]
mod tests {
    use super::super::cuda_emulation::tests::{assert_bits, cpu, input, layer};
    use super::*;
    use crate::scheme::Granularity;
    use crate::{Estimator, Quantizer, Scheme};
    use rand::{Rng, SeedableRng};

    /// The kernel's fragment loads from its shared tiles, through the ISA's `mma`, and its
    /// accumulator mapping give `D = A B^T + C` for random s8 tiles at every offset the
    /// kernel uses (both m16 tiles of a warp's rows, the four n8 tiles, the four k-steps).
    #[test]
    fn fragments_compute_a_matmul() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(23);
        for trial in 0..8 {
            let sw: Vec<u8> = (0..64 * LDS).map(|_| rng.random::<u8>()).collect();
            let sx: Vec<u8> = (0..64 * LDS).map(|_| rng.random::<u8>()).collect();
            let (row0, tok0, kb) = (16 * (trial % 4), 8 * (trial % 8), 32 * (trial % 4));
            let a: [[u32; 4]; 32] = std::array::from_fn(|lane| frag_a(&sw, row0, kb, lane));
            let b: [[u32; 2]; 32] = std::array::from_fn(|lane| frag_b(&sx, tok0, kb, lane));
            let c0: [[i32; 4]; 32] = std::array::from_fn(|lane| {
                std::array::from_fn(|e| (lane * 4 + e) as i32 * 1000 - 50_000)
            });
            let mut c = c0;
            mma(&a, &b, &mut c);
            let mut seen = [[false; 8]; 16];
            for lane in 0..32 {
                for e in 0..4 {
                    let (r, t) = c_kernel(lane, e);
                    assert!(!seen[r][t], "({r}, {t}) held twice");
                    seen[r][t] = true;
                    let want: i32 = (0..32)
                        .map(|k| {
                            let w = sw[(row0 + r) * LDS + kb + k] as i8 as i32;
                            let x = sx[(tok0 + t) * LDS + kb + k] as i8 as i32;
                            w * x
                        })
                        .sum::<i32>()
                        + c0[lane][e];
                    assert_eq!(c[lane][e], want, "trial {trial}, lane {lane}, element {e}");
                }
            }
        }
    }

    /// The tensor-core kernel takes 16 tokens and more on sm_80 and later; older GPUs and
    /// smaller batches keep the `dp4a` kernels.
    #[test]
    fn kernel_choice() {
        use super::super::gpu_plan::{uses_mma, MMA_MIN_TOKENS};
        let cases = [
            (16, (8, 0), true),
            (15, (9, 0), false),
            (1, (9, 0), false),
            (128, (9, 0), true),
            (4096, (12, 0), true),
            (128, (7, 5), false),
            (128, (6, 1), false),
        ];
        for (tokens, cc, want) in cases {
            assert_eq!(
                uses_mma(tokens, cc),
                want,
                "{tokens} tokens on sm_{}{}",
                cc.0,
                cc.1
            );
        }
        assert_eq!(MMA_MIN_TOKENS, 16);
    }

    /// `bq_levels2` and `bq_levels1` give the level of every code in every byte.
    #[test]
    fn levels_per_byte() {
        for codes in 0..81u32 {
            let digits: [u32; 4] = std::array::from_fn(|k| codes / 3u32.pow(k as u32) % 3);
            let word = digits.iter().enumerate().map(|(k, d)| d << (8 * k)).sum();
            let got = levels2(word);
            for (k, d) in digits.iter().enumerate() {
                assert_eq!(byte(got, k), *d as i32 - 1, "codes {digits:?}");
            }
        }
        for bits in 0..16u32 {
            let word = (0..4).map(|k| ((bits >> k) & 1) << (8 * k)).sum();
            let got = levels1(word);
            for k in 0..4 {
                assert_eq!(
                    byte(got, k),
                    2 * ((bits >> k) & 1) as i32 - 1,
                    "bits {bits:04b}"
                );
            }
        }
    }

    /// The whole kernel equals the CPU layer bit for bit: ternary and binary weights, every
    /// granularity (segments of one and of several 128-value chunks), bias and norm, batches
    /// from the kernel's smallest (16) to several 64-token tiles, rows not a multiple of 64.
    #[test]
    fn kernel_equals_the_cpu_layer() {
        let mut checked = 0;
        for (inp, out, group) in [
            (300usize, 70usize, 100usize),
            (1024, 33, 256),
            (130, 129, 65),
        ] {
            for scheme in [Scheme::TernaryAbsmean, Scheme::Binary { scaled: true }] {
                for g in [
                    Granularity::PerTensor,
                    Granularity::PerChannel,
                    Granularity::PerGroup(group),
                ] {
                    let bias_norm: &[(bool, bool)] = if inp == 300 {
                        &[(false, false), (true, true)]
                    } else {
                        &[(true, false)]
                    };
                    for &(bias, norm) in bias_norm {
                        let q = Quantizer::new(scheme, Estimator::Identity)
                            .unwrap()
                            .with_granularity(g)
                            .unwrap();
                        let packed = layer(inp, out, q, bias, norm);
                        let l = Layer::of(&packed);
                        for tokens in [16usize, 17, 64, 130] {
                            let x = input(tokens, inp, (3 * inp + tokens) as u64);
                            let want = cpu(&packed, &x, tokens);
                            let got = mma_forward(&l, &x, tokens);
                            let what = format!(
                                "{scheme:?} {g:?} [{out}, {inp}] bias={bias} norm={norm} \
                                 tokens={tokens}"
                            );
                            assert_bits(&what, &got, &want);
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 2 * 3 * (2 + 1 + 1) * 4);
    }
}
