//! CUDA kernels of packed inference: the layer's packed codes, scales, bias and norm weight live
//! on the GPU ([`CudaPacked`], uploaded once by
//! [`PackedBitLinear::to_device`](super::PackedBitLinear::to_device)), and a forward runs on
//! candle's stream without synchronising with the host (unless the caller turned the
//! NaN/infinity check on, whose count is copied back):
//!
//! * up to 4 tokens whose levels fit 40 KiB (`gpu_plan::fused_plan`), one launch,
//!   `bq_packed_fused*`: every block quantizes the tokens into shared memory (the work of
//!   `bq_quant_token`, O(in) per block, small against the weight rows the block reads), then
//!   its warps take groups of rows in a grid-stride loop over at most 2 blocks per SM;
//! * more tokens, two launches:
//!   1. `bq_packed_quant`, one CUDA block per token: the same `bq_quant_token` into a global
//!      buffer;
//!   2. the matmul: from 16 tokens on a GPU of compute capability 8.0 or later,
//!      `bq_packed_mma*` on int8 tensor cores (see [`SRC_MMA`]); else `bq_packed_mm_*`, one
//!      warp per `R` output rows and `TT` tokens with `dp4a`.
//!
//! `bq_quant_token`: the optional RMSNorm, `max|x|`, and the int8 levels written in the
//! weight's padded segment layout (zeros in the padding), with the token's dequantizing factor
//! `m / 127`. Every float operation is the CPU path's, in the CPU path's order (the norm's sum
//! of squares in the same 8 interleaved lanes), so the levels are bit-identical to the CPU's.
//!
//! `bq_mm_warp`, the matmul of both paths: 16-byte loads of packed codes, `dp4a` on four codes
//! and four int8 activations at a time, exact `i32` sums per segment (a warp-shuffle
//! reduction), then the CPU's float expression `acc += sum * scale` over segments in order and
//! `acc * m / 127 + bias`. Each weight load is reused for `TT` tokens and each activation load
//! for `R` rows. Three shapes: batch 1 (GEMV, `R = 1, TT = 1`, 8 rows per 256-thread block), up
//! to 4 tokens (`R = 2, TT = 4`) and larger batches (`R = 4, TT = 8`, tiles of tokens along the
//! grid's y axis).
//!
//! Integer sums are exact and every float operation is rounded as on the CPU (the module is
//! compiled without fused multiply-add, see [`function`]), so the outputs equal the CPU layer's.
//! `cuda_emulation.rs` and `mma_emulation.rs` run host transcriptions of the kernels against the
//! CPU layer on every machine, GPU or not.

use super::gpu_plan::{fused_plan, uses_mma, FusedPlan, Variant, MAX_GRID_Y, MMA_TILE};
use super::layout::PackedTernary;
use crate::error::QuantError;
use crate::ops::cuda_util::{f32_view, function, function_for, wrap, THREADS};
use crate::scheme::Granularity;
use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape};
use std::sync::{Arc, OnceLock};

const SRC: &str = r#"
#define BQ_FULL 0xffffffffu

// Four signed byte products added to c. dp4a needs sm_61; the fallback keeps the module valid
// when NVRTC's default architecture is older (NVRTC 12 defaults to compute_52, 13 to sm_75).
__device__ __forceinline__ int bq_dp4a(int a, int b, int c) {
#if __CUDA_ARCH__ >= 610
    return __dp4a(a, b, c);
#else
    for (int k = 0; k < 32; k += 8) {
        c += (int)(signed char)((a >> k) & 0xff) * (int)(signed char)((b >> k) & 0xff);
    }
    return c;
#endif
}

// Int8 levels of the token xt in the padded segment layout [nseg][segp] of the weights, padding
// 0, written to qt by the whole block; *mt = m / 127 (NaN for a token holding a non-finite
// value, whose count goes to *nonfinite unless that is null). With has_norm, x is first
// RMS-normalised exactly as the CPU kernel does: sum(x^2) in 8 interleaved lanes over whole
// chunks of 8, the lanes added in order, then the tail's sum; y = x / sqrt(sum / n + eps) * w.
// Every thread of the block must call it (it holds barriers); shf, shu and lanes are the
// block's scratch.
__device__ __forceinline__ void bq_quant_token(const float* __restrict__ xt, const float* __restrict__ nw,
                                               float eps, unsigned has_norm, u64 inp, u64 seg, u64 segp,
                                               u64 nseg, signed char* qt, float* mt, unsigned* nonfinite,
                                               float* shf, unsigned* shu, float* lanes) {
    float denom = 1.0f;
    if (has_norm) {
        const u64 full = inp / 8 * 8;
        if (threadIdx.x < 8) {
            float a = 0.0f;
            for (u64 i = threadIdx.x; i < full; i += 8) {
                float v = xt[i];
                a += v * v;
            }
            lanes[threadIdx.x] = a;
        } else if (threadIdx.x == 8) {
            float a = 0.0f;
            for (u64 i = full; i < inp; ++i) {
                float v = xt[i];
                a += v * v;
            }
            lanes[8] = a;
        }
        __syncthreads();
        float total = 0.0f;
        for (int l = 0; l < 8; ++l) {
            total += lanes[l];
        }
        total += lanes[8];
        denom = sqrtf(total / (float)inp + eps);
        // The block reductions below hold barriers, so no thread rewrites `lanes` for the
        // next token before every thread has read it here.
    }
    float mx = 0.0f;
    unsigned bad = 0u;
    for (u64 i = threadIdx.x; i < inp; i += blockDim.x) {
        float y = has_norm ? xt[i] / denom * nw[i] : xt[i];
        float a = fabsf(y);
        mx = fmaxf(mx, a);
        // NaN fails the first test, infinity the second.
        bad += (a == a && a <= 3.402823466e38f) ? 0u : 1u;
    }
    mx = bq_block_max(mx, shf);
    bad = bq_block_sum<unsigned>(bad, shu);
    const float m = fmaxf(mx, BQ_EPS);
    const float inv = 127.0f / m;
    if (threadIdx.x == 0) {
        *mt = bad > 0u ? __int_as_float(0x7fc00000) : m / 127.0f;
        if (bad > 0u && nonfinite != nullptr) {
            atomicAdd(nonfinite, bad);
        }
    }
    const u64 xrow = nseg * segp;
    for (u64 p = threadIdx.x; p < xrow; p += blockDim.x) {
        const u64 s = p / segp, k = p % segp;
        float l = 0.0f;
        if (k < seg) {
            const u64 i = s * seg + k;
            float y = has_norm ? xt[i] / denom * nw[i] : xt[i];
            // round_clamped: clamp one step outside, round half to even, clamp.
            l = clampf(rintf(clampf(y * inv, -129.0f, 128.0f)), -128.0f, 127.0f);
        }
        qt[p] = (signed char)(int)l;
    }
}

// Int8 levels of one token per CUDA block (grid-stride over tokens) into global memory, for
// the two-launch path of larger batches; count_bad = 0 leaves *nonfinite alone.
extern "C" __global__ void bq_packed_quant(const float* __restrict__ x, const float* __restrict__ nw,
                                           float eps, unsigned has_norm, u64 tokens, u64 inp, u64 seg,
                                           u64 segp, u64 nseg, signed char* __restrict__ xq,
                                           float* __restrict__ mt, unsigned* nonfinite, unsigned count_bad) {
    __shared__ float shf[256];
    __shared__ unsigned shu[256];
    __shared__ float lanes[9];
    const u64 xrow = nseg * segp;
    for (u64 t = blockIdx.x; t < tokens; t += gridDim.x) {
        bq_quant_token(x + t * inp, nw, eps, has_norm, inp, seg, segp, nseg, xq + t * xrow, mt + t,
                       count_bad ? nonfinite : nullptr, shf, shu, lanes);
    }
}

// y[t, r] = (sum over segments s in order of isum(t, r, s) * scale(r, s)) * mt[t] + bias[r], with
// isum the exact integer dot product of the row's levels and the token's int8 levels over the
// segment. A warp computes R rows x TT tokens; lanes split each segment's 16-byte units (a
// 2-bit half block or a 1-bit block) in groups of g lanes (g = the units per segment rounded up
// to a power of two, at most 32), so one pass of the warp covers 32 / g segments.
//
// Codes enter dp4a unsigned (2-bit: level + 1; 1-bit: the bit, level = 2 bit - 1) next to the
// activation sum sx, and isum = dot - sx (2-bit) or 2 dot - sx (1-bit): the same identity as
// the CPU kernels, so no per-byte sign fix-up is needed in the inner loop.
//
// bq_mm_warp: one warp's R rows from r0 and TT tokens from t0 (rows and tokens past the ends skipped),
// activation levels xq [tokens][xrow] (global or shared memory), shw the warp's 32 * (R * TT + 1)
// ints of shared scratch.
template <int BITS, int R, int TT>
__device__ __forceinline__ void bq_mm_warp(const unsigned char* __restrict__ w, const signed char* xq,
                                           const float* mt, const float* __restrict__ scales, u64 srow,
                                           u64 sseg, const float* __restrict__ bias, unsigned has_bias,
                                           u64 out, u64 tokens, u64 nseg, u64 seg_bytes, u64 r0, u64 t0,
                                           int* shw, float* __restrict__ y) {
    constexpr int NJ = 8 / BITS;          // 32-bit slices of a code word: 4 (2-bit) or 8 (1-bit)
    constexpr int XSTRIDE = 128 / NJ;     // activation bytes between two slices
    constexpr unsigned MASK = BITS == 2 ? 0x03030303u : 0x01010101u;
    constexpr int RT = R * TT;
    const unsigned lane = threadIdx.x & 31u;
    const u64 row_bytes = nseg * seg_bytes;
    const u64 segp = seg_bytes * NJ;
    const u64 xrow = nseg * segp;
    const u64 units = seg_bytes >> 4;
    unsigned g = 1u;
    while (g < 32u && (u64)g < units) {
        g <<= 1;
    }
    const unsigned per = 32u / g;
    const unsigned gl = lane & (g - 1u), gi = lane / g;
    // Lane rt < RT owns output (rt / TT, rt % TT).
    const int my_r = (int)lane / TT, my_t = (int)lane % TT;
    float acc = 0.0f;
    for (u64 s0 = 0; s0 < nseg; s0 += per) {
        const u64 s = s0 + gi;
        int isum[R][TT];
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int t = 0; t < TT; ++t) {
                isum[r][t] = 0;
            }
        }
        if (s < nseg) {
            int dot[R][TT];
            int sx[TT];
#pragma unroll
            for (int t = 0; t < TT; ++t) {
                sx[t] = 0;
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    dot[r][t] = 0;
                }
            }
            for (u64 u = gl; u < units; u += g) {
                uint4 wv[R];
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    wv[r] = r0 + r < out
                        ? *reinterpret_cast<const uint4*>(w + (r0 + r) * row_bytes + s * seg_bytes + u * 16)
                        : make_uint4(0u, 0u, 0u, 0u);
                }
                // Activations of this unit: a 2-bit unit is half (u & 1) of block u / 2, a
                // 1-bit unit is block u.
                const u64 xoff = s * segp + (BITS == 2 ? (u >> 1) * 128 + (u & 1) * 16 : u * 128);
#pragma unroll
                for (int t = 0; t < TT; ++t) {
                    if (t0 + t < tokens) {
                        const signed char* xb = xq + (t0 + t) * xrow + xoff;
#pragma unroll
                        for (int j = 0; j < NJ; ++j) {
                            const int4 xv = *reinterpret_cast<const int4*>(xb + j * XSTRIDE);
                            sx[t] = bq_dp4a(xv.x, 0x01010101, sx[t]);
                            sx[t] = bq_dp4a(xv.y, 0x01010101, sx[t]);
                            sx[t] = bq_dp4a(xv.z, 0x01010101, sx[t]);
                            sx[t] = bq_dp4a(xv.w, 0x01010101, sx[t]);
#pragma unroll
                            for (int r = 0; r < R; ++r) {
                                const unsigned sh_ = BITS * j;
                                dot[r][t] = bq_dp4a((int)((wv[r].x >> sh_) & MASK), xv.x, dot[r][t]);
                                dot[r][t] = bq_dp4a((int)((wv[r].y >> sh_) & MASK), xv.y, dot[r][t]);
                                dot[r][t] = bq_dp4a((int)((wv[r].z >> sh_) & MASK), xv.z, dot[r][t]);
                                dot[r][t] = bq_dp4a((int)((wv[r].w >> sh_) & MASK), xv.w, dot[r][t]);
                            }
                        }
                    }
                }
            }
#pragma unroll
            for (int r = 0; r < R; ++r) {
#pragma unroll
                for (int t = 0; t < TT; ++t) {
                    isum[r][t] = (BITS == 2 ? dot[r][t] : 2 * dot[r][t]) - sx[t];
                }
            }
        }
        // Integer sums over each group of g lanes (xor offsets below g stay in the group).
        for (unsigned o = g >> 1; o > 0u; o >>= 1) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
#pragma unroll
                for (int t = 0; t < TT; ++t) {
                    isum[r][t] += __shfl_xor_sync(BQ_FULL, isum[r][t], o);
                }
            }
        }
        if (gl == 0u) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
#pragma unroll
                for (int t = 0; t < TT; ++t) {
                    shw[gi * (RT + 1) + r * TT + t] = isum[r][t];
                }
            }
        }
        __syncwarp();
        // The CPU's float fold, one segment at a time in order.
        if ((int)lane < RT && r0 + my_r < out) {
            const u64 row = r0 + my_r;
            for (unsigned k = 0; k < per && s0 + k < nseg; ++k) {
                const float sc = scales[row * srow + (s0 + k) * sseg];
                acc += (float)shw[k * (RT + 1) + lane] * sc;
            }
        }
        __syncwarp();
    }
    if ((int)lane < RT && r0 + my_r < out && t0 + my_t < tokens) {
        const u64 row = r0 + my_r, t = t0 + my_t;
        y[t * out + row] = acc * mt[t] + (has_bias ? bias[row] : 0.0f);
    }
}

// The two-launch path: a warp per R rows, token tiles along the grid's y axis, levels in
// global memory.
template <int BITS, int W, int R, int TT>
__device__ __forceinline__ void bq_packed_mm(const unsigned char* __restrict__ w,
                                             const signed char* __restrict__ xq,
                                             const float* __restrict__ mt,
                                             const float* __restrict__ scales, u64 srow, u64 sseg,
                                             const float* __restrict__ bias, unsigned has_bias, u64 out,
                                             u64 tokens, u64 nseg, u64 seg_bytes, float* __restrict__ y) {
    // Per-segment sums of each group's leader, padded by one int against bank conflicts.
    __shared__ int sh[W][32 * (R * TT + 1)];
    const unsigned wid = threadIdx.x >> 5;
    const u64 r0 = ((u64)blockIdx.x * W + wid) * R;
    if (r0 >= out) {
        return; // the whole warp: nothing below synchronises across warps
    }
    const u64 tiles = (tokens + TT - 1) / TT;
    for (u64 tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
        bq_mm_warp<BITS, R, TT>(w, xq, mt, scales, srow, sseg, bias, has_bias, out, tokens, nseg,
                                seg_bytes, r0, tile * TT, sh[wid], y);
    }
}

// The one-launch path for up to TT tokens: every block quantizes all tokens into dynamic
// shared memory (tokens * xrow bytes; O(inp) work per block against the weight rows it reads),
// then its warps take groups of R rows in a grid-stride loop. Only block 0 counts non-finite
// values (count_bad = 0: none), so the count is the CPU's.
extern __shared__ int4 bq_levels[];

template <int BITS, int W, int R, int TT>
__device__ __forceinline__ void bq_packed_fused(const float* __restrict__ x, const float* __restrict__ nw,
                                                float eps, unsigned has_norm, u64 inp, u64 seg,
                                                const unsigned char* __restrict__ w,
                                                const float* __restrict__ scales, u64 srow, u64 sseg,
                                                const float* __restrict__ bias, unsigned has_bias, u64 out,
                                                u64 tokens, u64 nseg, u64 seg_bytes, float* __restrict__ y,
                                                unsigned* nonfinite, unsigned count_bad) {
    __shared__ float shf[256];
    __shared__ unsigned shu[256];
    __shared__ float lanes[9];
    __shared__ float mts[TT];
    __shared__ int sh[W][32 * (R * TT + 1)];
    signed char* xs = reinterpret_cast<signed char*>(bq_levels);
    const u64 segp = seg_bytes * (8 / BITS);
    const u64 xrow = nseg * segp;
    unsigned* counter = (count_bad && blockIdx.x == 0) ? nonfinite : nullptr;
    for (u64 t = 0; t < tokens; ++t) {
        bq_quant_token(x + t * inp, nw, eps, has_norm, inp, seg, segp, nseg, xs + t * xrow, &mts[t],
                       counter, shf, shu, lanes);
    }
    __syncthreads();
    const unsigned wid = threadIdx.x >> 5;
    for (u64 rg = (u64)blockIdx.x * W + wid; rg * R < out; rg += (u64)gridDim.x * W) {
        bq_mm_warp<BITS, R, TT>(w, xs, mts, scales, srow, sseg, bias, has_bias, out, tokens, nseg,
                                seg_bytes, rg * R, 0, sh[wid], y);
    }
}

#define BQ_MM(NAME, BITS, W, R, TT)                                                                     \
    extern "C" __global__ void NAME(const unsigned char* w, const signed char* xq, const float* mt,      \
                                    const float* scales, u64 srow, u64 sseg, const float* bias,          \
                                    unsigned has_bias, u64 out, u64 tokens, u64 nseg, u64 seg_bytes,     \
                                    float* y) {                                                          \
        bq_packed_mm<BITS, W, R, TT>(w, xq, mt, scales, srow, sseg, bias, has_bias, out, tokens, nseg,   \
                                     seg_bytes, y);                                                      \
    }

BQ_MM(bq_packed_mm2_gemv, 2, 8, 1, 1)
BQ_MM(bq_packed_mm2_small, 2, 4, 2, 4)
BQ_MM(bq_packed_mm2_tile, 2, 4, 4, 8)
BQ_MM(bq_packed_mm1_gemv, 1, 8, 1, 1)
BQ_MM(bq_packed_mm1_small, 1, 4, 2, 4)
BQ_MM(bq_packed_mm1_tile, 1, 4, 4, 8)

#define BQ_FUSED(NAME, BITS, W, R, TT)                                                                  \
    extern "C" __global__ void NAME(const float* x, const float* nw, float eps, unsigned has_norm, u64 inp, \
                                    u64 seg, const unsigned char* w, const float* scales, u64 srow,       \
                                    u64 sseg, const float* bias, unsigned has_bias, u64 out, u64 tokens,  \
                                    u64 nseg, u64 seg_bytes, float* y, unsigned* nonfinite,               \
                                    unsigned count_bad) {                                                 \
        bq_packed_fused<BITS, W, R, TT>(x, nw, eps, has_norm, inp, seg, w, scales, srow, sseg, bias,     \
                                        has_bias, out, tokens, nseg, seg_bytes, y, nonfinite, count_bad); \
    }

BQ_FUSED(bq_packed_fused2_gemv, 2, 8, 1, 1)
BQ_FUSED(bq_packed_fused2_small, 2, 4, 2, 4)
BQ_FUSED(bq_packed_fused1_gemv, 1, 8, 1, 1)
BQ_FUSED(bq_packed_fused1_small, 1, 4, 2, 4)
"#;

const MODULE: &str = "bitnet_quant_packed";
static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();

/// CUDA C of the tensor-core matmul, a module of its own compiled for `compute_80` (inline
/// `mma.sync` of s8 needs sm_80); its levels come from `bq_packed_quant` of [`SRC`].
///
/// `bq_packed_mma{1,2}`: `y[t, r]` as `bq_mm_warp` computes it, with the integer sums per
/// segment from `mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32` on levels unpacked into
/// shared memory. A block of 4 warps computes a 64-row x 64-token tile; warp `(wm, wn) =
/// (wid / 2, wid % 2)` owns rows `32 wm..` (two m16 tiles) and tokens `32 wn..` (four n8
/// tiles). For each 128-value chunk of a segment the block unpacks its 64 weight rows to int8
/// levels in `sw` and copies its 64 tokens' levels to `sx` (rows of `BQ_LDS` = 144 bytes: the 16
/// bytes of padding put the 8 rows a fragment load touches on different banks), then each warp
/// does 4 k-steps of 32. After a segment's last chunk every thread folds its integer sums into
/// its float accumulators, `acc += (float)sum * scale`, in segment order as the CPU does.
/// `mma_emulation.rs` transcribes it, fragment layout included.
const SRC_MMA: &str = r#"
#define BQ_TM 64
#define BQ_TN 64
#define BQ_LDS 144

// D = A B + C on one warp's fragments (PTX ISA, "Matrix Fragments for mma.m16n8k32", .s8):
// with g = lane / 4 and q = lane % 4, a[0..3] hold A's (g, 4q..), (g + 8, 4q..), (g, 16 + 4q..),
// (g + 8, 16 + 4q..); b[0..1] hold B's column g, k = 4q.. and 16 + 4q..; c[0..3] hold C's
// (g, 2q), (g, 2q + 1), (g + 8, 2q), (g + 8, 2q + 1).
__device__ __forceinline__ void bq_mma_s8(int* c, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Four 2-bit codes (bytes 0..2) to levels code - 1, or four bits (bytes 0..1) to 2 bit - 1,
// per byte: adding 0x7f leaves every byte below 0x100 (no carry into the next), and flipping
// the top bit subtracts 0x80 modulo 256.
__device__ __forceinline__ unsigned bq_levels2(unsigned codes) {
    return (codes + 0x7f7f7f7fu) ^ 0x80808080u;
}
__device__ __forceinline__ unsigned bq_levels1(unsigned bits) {
    return ((bits << 1) + 0x7f7f7f7fu) ^ 0x80808080u;
}

template <int BITS>
__device__ __forceinline__ void bq_packed_mma(const unsigned char* __restrict__ w,
                                              const signed char* __restrict__ xq,
                                              const float* __restrict__ mt,
                                              const float* __restrict__ scales, u64 srow, u64 sseg,
                                              const float* __restrict__ bias, unsigned has_bias, u64 out,
                                              u64 tokens, u64 nseg, u64 seg_bytes, float* __restrict__ y) {
    __shared__ __align__(16) signed char sw[BQ_TM * BQ_LDS];
    __shared__ __align__(16) signed char sx[BQ_TN * BQ_LDS];
    const unsigned tid = threadIdx.x, lane = tid & 31u, wid = tid >> 5;
    const unsigned g = lane >> 2, q = lane & 3u;
    const unsigned wm = wid >> 1, wn = wid & 1u;
    const u64 row_bytes = nseg * seg_bytes;
    const u64 segp = seg_bytes * (8 / BITS);
    const u64 xrow = nseg * segp;
    const u64 chunks = segp / 128;
    const u64 cbytes = 128 * BITS / 8;
    const u64 r_base = (u64)blockIdx.x * BQ_TM;
    const u64 tiles = (tokens + BQ_TN - 1) / BQ_TN;
    // Thread tid loads half (tid & 1) of weight row tid / 2's chunk and of token tid / 2's.
    const unsigned rl = tid >> 1, h = tid & 1u;
    for (u64 tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
        const u64 t_base = tile * BQ_TN;
        float acc[2][4][4];
        int c[2][4][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    acc[mi][ni][e] = 0.0f;
                    c[mi][ni][e] = 0;
                }
            }
        }
        for (u64 s = 0; s < nseg; ++s) {
            for (u64 kc = 0; kc < chunks; ++kc) {
                __syncthreads(); // every warp has read the previous chunk's tiles
                {
                    const u64 row = r_base + rl;
                    const bool valid = row < out;
                    const unsigned char* src = w + row * row_bytes + s * seg_bytes + kc * cbytes;
                    signed char* dst = sw + rl * BQ_LDS;
                    if (BITS == 2) {
                        // Byte b of half h holds values 16 h + b + 32 j in bits 2 j.
                        const uint4 v = valid ? *reinterpret_cast<const uint4*>(src + h * 16)
                                              : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
                        for (int j = 0; j < 4; ++j) {
                            const unsigned m = 0x03030303u;
                            uint4 o;
                            o.x = valid ? bq_levels2((v.x >> (2 * j)) & m) : 0u;
                            o.y = valid ? bq_levels2((v.y >> (2 * j)) & m) : 0u;
                            o.z = valid ? bq_levels2((v.z >> (2 * j)) & m) : 0u;
                            o.w = valid ? bq_levels2((v.w >> (2 * j)) & m) : 0u;
                            *reinterpret_cast<uint4*>(dst + h * 16 + 32 * j) = o;
                        }
                    } else {
                        // Byte b of the chunk holds values b + 16 j in bit j.
                        const uint2 v = valid ? *reinterpret_cast<const uint2*>(src + h * 8)
                                              : make_uint2(0u, 0u);
#pragma unroll
                        for (int j = 0; j < 8; ++j) {
                            const unsigned m = 0x01010101u;
                            uint2 o;
                            o.x = valid ? bq_levels1((v.x >> j) & m) : 0u;
                            o.y = valid ? bq_levels1((v.y >> j) & m) : 0u;
                            *reinterpret_cast<uint2*>(dst + 8 * h + 16 * j) = o;
                        }
                    }
                }
                {
                    const u64 t = t_base + rl;
                    const int4* src = reinterpret_cast<const int4*>(xq + t * xrow + s * segp + kc * 128 + h * 64);
                    int4* dst = reinterpret_cast<int4*>(sx + rl * BQ_LDS + h * 64);
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        dst[i] = t < tokens ? src[i] : make_int4(0, 0, 0, 0);
                    }
                }
                __syncthreads();
#pragma unroll
                for (int ks = 0; ks < 4; ++ks) {
                    const int kb = ks * 32;
                    unsigned a[2][4], b[4][2];
#pragma unroll
                    for (int mi = 0; mi < 2; ++mi) {
                        const signed char* p = sw + (wm * 32 + mi * 16 + g) * BQ_LDS + kb + 4 * q;
                        a[mi][0] = *reinterpret_cast<const unsigned*>(p);
                        a[mi][1] = *reinterpret_cast<const unsigned*>(p + 8 * BQ_LDS);
                        a[mi][2] = *reinterpret_cast<const unsigned*>(p + 16);
                        a[mi][3] = *reinterpret_cast<const unsigned*>(p + 8 * BQ_LDS + 16);
                    }
#pragma unroll
                    for (int ni = 0; ni < 4; ++ni) {
                        const signed char* p = sx + (wn * 32 + ni * 8 + g) * BQ_LDS + kb + 4 * q;
                        b[ni][0] = *reinterpret_cast<const unsigned*>(p);
                        b[ni][1] = *reinterpret_cast<const unsigned*>(p + 16);
                    }
#pragma unroll
                    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
                        for (int ni = 0; ni < 4; ++ni) {
                            bq_mma_s8(c[mi][ni], a[mi], b[ni]);
                        }
                    }
                }
            }
            // The segment's sums are complete: the CPU's float fold.
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const u64 row = r_base + wm * 32 + mi * 16 + g + (e >= 2 ? 8 : 0);
                    const float sc = row < out ? scales[row * srow + s * sseg] : 0.0f;
#pragma unroll
                    for (int ni = 0; ni < 4; ++ni) {
                        acc[mi][ni][e] += (float)c[mi][ni][e] * sc;
                        c[mi][ni][e] = 0;
                    }
                }
            }
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const u64 row = r_base + wm * 32 + mi * 16 + g + (e >= 2 ? 8 : 0);
                    const u64 t = t_base + wn * 32 + ni * 8 + 2 * q + (e & 1);
                    if (row < out && t < tokens) {
                        y[t * out + row] = acc[mi][ni][e] * mt[t] + (has_bias ? bias[row] : 0.0f);
                    }
                }
            }
        }
    }
}

#define BQ_MMA(NAME, BITS)                                                                              \
    extern "C" __global__ void NAME(const unsigned char* w, const signed char* xq, const float* mt,      \
                                    const float* scales, u64 srow, u64 sseg, const float* bias,          \
                                    unsigned has_bias, u64 out, u64 tokens, u64 nseg, u64 seg_bytes,     \
                                    float* y) {                                                          \
        bq_packed_mma<BITS>(w, xq, mt, scales, srow, sseg, bias, has_bias, out, tokens, nseg, seg_bytes, \
                            y);                                                                          \
    }

BQ_MMA(bq_packed_mma2, 2)
BQ_MMA(bq_packed_mma1, 1)
"#;

const MODULE_MMA: &str = "bitnet_quant_packed_mma";
static PTX_MMA: OnceLock<std::result::Result<String, String>> = OnceLock::new();

/// The most CUDA blocks of the quantization kernel; it loops over further tokens.
const MAX_QUANT_BLOCKS: usize = 1 << 16;

/// A packed layer's tensors on one CUDA device, uploaded once.
pub(crate) struct CudaPacked {
    device: Device,
    dev: CudaDevice,
    data: CudaSlice<u8>,
    scales: CudaSlice<f32>,
    /// Scale index `r * srow + seg * sseg`: `(0, 0)` per tensor, `(1, 0)` per channel,
    /// `(segments, 1)` per group.
    scale_strides: (u64, u64),
    bias: Option<CudaSlice<f32>>,
    norm: Option<(CudaSlice<f32>, f32)>,
    out: usize,
    inp: usize,
    seg_len: usize,
    seg_padded: usize,
    segments: usize,
    seg_bytes: usize,
    bits: u8,
    /// Streaming multiprocessors, which size the one-launch kernel's grid.
    sms: usize,
    /// Compute capability `(major, minor)`: sm_80 and later get the tensor-core kernel.
    capability: (i32, i32),
}

impl std::fmt::Debug for CudaPacked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaPacked")
            .field("device", &self.device.location())
            .field("out", &self.out)
            .field("in", &self.inp)
            .field("bits", &self.bits)
            .field("bias", &self.bias.is_some())
            .field("norm", &self.norm.is_some())
            .finish()
    }
}

impl CudaPacked {
    /// Copies the packed codes, scales, bias and norm weight (f32) to `dev`.
    pub(crate) fn upload(
        dev: &CudaDevice,
        w: &PackedTernary,
        bias: Option<&[f32]>,
        norm: Option<(&[f32], f32)>,
    ) -> Result<Self> {
        let segments = w.segments_per_row();
        let scale_strides = match w.granularity() {
            Granularity::PerTensor => (0, 0),
            Granularity::PerChannel => (1, 0),
            Granularity::PerGroup(_) => (segments as u64, 1),
        };
        let norm = match norm {
            Some((nw, eps)) => Some((dev.clone_htod(nw)?, eps)),
            None => None,
        };
        Ok(Self {
            device: Device::Cuda(dev.clone()),
            dev: dev.clone(),
            data: dev.clone_htod(w.data())?,
            scales: dev.clone_htod(w.scales())?,
            scale_strides,
            bias: bias.map(|b| dev.clone_htod(b)).transpose()?,
            norm,
            out: w.out_features(),
            inp: w.in_features(),
            seg_len: w.segment_len(),
            seg_padded: w.segment_padded(),
            segments,
            seg_bytes: w.segment_padded() * w.bits() as usize / 8,
            bits: w.bits(),
            sms: dev
                .cuda_stream()
                .context()
                .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .w()?
                .max(1) as usize,
            capability: dev.cuda_stream().context().compute_capability().w()?,
        })
    }

    /// The device holding the tensors.
    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    /// The layer's output for `tokens` rows of f32 input (any layout), `[.., out]`.
    fn forward(
        &self,
        op: &'static str,
        s: &CudaStorage,
        l: &Layout,
        check_finite: bool,
    ) -> Result<(CudaStorage, Shape)> {
        if s.device.id() != self.dev.id() {
            return Err(QuantError::Device {
                op,
                layer: self.device.location(),
                input: Device::Cuda(s.device.clone()).location(),
            }
            .into());
        }
        let mut out_dims = l.dims().to_vec();
        if out_dims.last() != Some(&self.inp) {
            return Err(QuantError::Shape {
                op,
                what: format!("input {out_dims:?}, expected last dimension {}", self.inp),
            }
            .into());
        }
        *out_dims.last_mut().expect("checked above") = self.out;
        let tokens = l.shape().elem_count() / self.inp;
        if tokens == 0 {
            return Err(QuantError::Empty {
                op,
                shape: l.shape().clone(),
            }
            .into());
        }
        // The fewest rows per block of any matmul kernel (gemv 8 x 1, small 4 x 2).
        let rows_per_block = 8;
        if self.out.div_ceil(rows_per_block) > i32::MAX as usize {
            return Err(QuantError::Shape {
                op,
                what: format!("{} output rows exceed one CUDA grid", self.out),
            }
            .into());
        }
        let mut tmp = None;
        let x = f32_view(op, s, l, &mut tmp)?;
        let dev = &self.dev;
        // Counted only when the caller wants the error: the copy back is the one host
        // synchronisation of a forward.
        let mut nonfinite = if check_finite {
            Some(dev.alloc_zeros::<u32>(1)?)
        } else {
            None
        };
        // SAFETY: the kernels write all tokens * out outputs (every (row, token) pair has one
        // owning lane) before anything reads them.
        let mut y = unsafe { dev.alloc::<f32>(tokens * self.out)? };
        let xrow = self.segments * self.seg_padded;
        match fused_plan(tokens, xrow, self.out, self.sms) {
            Some(plan) => self.launch_fused(&x, tokens, plan, nonfinite.as_mut(), &mut y)?,
            None => self.launch_two(&x, tokens, nonfinite.as_mut(), &mut y)?,
        }
        if let Some(count) = nonfinite {
            // One small copy, which waits for the kernels: the price of the CPU path's error.
            let count = dev.clone_dtoh(&count)?[0] as usize;
            if count > 0 {
                return Err(QuantError::NonFinite { op, count }.into());
            }
        }
        Ok((wrap(y, dev), Shape::from_dims(&out_dims)))
    }

    /// The norm weight and epsilon, or a stand-in pointer (never read: its flag is 0).
    fn norm_args(&self) -> (&CudaSlice<f32>, f32, u32) {
        match &self.norm {
            Some((nw, eps)) => (nw, *eps, 1),
            None => (&self.scales, 0.0, 0),
        }
    }

    /// The bias, or a stand-in pointer (never read: its flag is 0).
    fn bias_args(&self) -> (&CudaSlice<f32>, u32) {
        match &self.bias {
            Some(b) => (b, 1),
            None => (&self.scales, 0),
        }
    }

    /// The one-launch forward of up to 4 tokens (`bq_packed_fused*`).
    fn launch_fused(
        &self,
        x: &CudaView<'_, f32>,
        tokens: usize,
        plan: FusedPlan,
        nonfinite: Option<&mut CudaSlice<u32>>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let dev = &self.dev;
        let stream = dev.cuda_stream();
        let (nw, eps, has_norm) = self.norm_args();
        let (bias, has_bias) = self.bias_args();
        let (srow, sseg) = self.scale_strides;
        let (inp_u, seg_u, out_u, tokens_u, nseg_u, seg_bytes_u) = (
            self.inp as u64,
            self.seg_len as u64,
            self.out as u64,
            tokens as u64,
            self.segments as u64,
            self.seg_bytes as u64,
        );
        let name = format!("bq_packed_fused{}_{}", self.bits, plan.variant.name);
        let f = function(dev, &PTX, MODULE, SRC, &name)?;
        let mut b = stream.launch_builder(&f);
        b.arg(x)
            .arg(nw)
            .arg(&eps)
            .arg(&has_norm)
            .arg(&inp_u)
            .arg(&seg_u);
        b.arg(&self.data).arg(&self.scales).arg(&srow).arg(&sseg);
        b.arg(bias).arg(&has_bias).arg(&out_u).arg(&tokens_u);
        b.arg(&nseg_u).arg(&seg_bytes_u).arg(y);
        let count_bad = u32::from(nonfinite.is_some());
        match nonfinite {
            Some(c) => b.arg(c),
            // Never written (count_bad = 0).
            None => b.arg(&self.scales),
        };
        b.arg(&count_bad);
        let cfg = LaunchConfig {
            grid_dim: (plan.blocks as u32, 1, 1),
            block_dim: (32 * plan.variant.warps as u32, 1, 1),
            shared_mem_bytes: plan.shared_bytes as u32,
        };
        // SAFETY: the argument list matches the kernel's signature; the block has the variant's
        // W warps (THREADS threads, as the block reductions need) and `tokens * xrow` bytes of
        // dynamic shared memory (checked by `fused_plan` against the default limit), tokens <=
        // TT. Global reads stay below `tokens * inp` (x), `inp` (nw), the packed rows and
        // scales; 16-byte loads are aligned as in the two-launch path, and the shared levels
        // start 16-byte aligned with rows of a multiple of 128 bytes.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }

    /// The two-launch forward: `bq_packed_quant` into a global buffer, then `bq_packed_mm*`.
    fn launch_two(
        &self,
        x: &CudaView<'_, f32>,
        tokens: usize,
        nonfinite: Option<&mut CudaSlice<u32>>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let dev = &self.dev;
        let stream = dev.cuda_stream();
        let xrow = self.segments * self.seg_padded;
        // SAFETY (both allocs): the quantization kernel writes every one of their values (each
        // token's block covers its whole padded row and its factor) before the matmul reads them.
        let mut xq = unsafe { dev.alloc::<i8>(tokens * xrow)? };
        let mut mt = unsafe { dev.alloc::<f32>(tokens)? };
        let (nw, eps, has_norm) = self.norm_args();
        let (tokens_u, inp_u, seg_u, segp_u, nseg_u) = (
            tokens as u64,
            self.inp as u64,
            self.seg_len as u64,
            self.seg_padded as u64,
            self.segments as u64,
        );
        let count_bad = u32::from(nonfinite.is_some());
        let f = function(dev, &PTX, MODULE, SRC, "bq_packed_quant")?;
        let mut b = stream.launch_builder(&f);
        b.arg(x).arg(nw).arg(&eps).arg(&has_norm);
        b.arg(&tokens_u)
            .arg(&inp_u)
            .arg(&seg_u)
            .arg(&segp_u)
            .arg(&nseg_u);
        b.arg(&mut xq).arg(&mut mt);
        match nonfinite {
            Some(c) => b.arg(c),
            // Never written (count_bad = 0).
            None => b.arg(&self.scales),
        };
        b.arg(&count_bad);
        let quant_cfg = LaunchConfig {
            grid_dim: (tokens.min(MAX_QUANT_BLOCKS) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument list matches the kernel's signature; the block reductions need
        // THREADS, a power of two <= 256, threads per block; every index stays below `tokens *
        // inp` (x), `inp` (nw), `tokens * xrow` (xq) and `tokens` (mt).
        unsafe { b.launch(quant_cfg) }.w()?;

        let (bias, has_bias) = self.bias_args();
        let (srow, sseg) = self.scale_strides;
        let (out_u, seg_bytes_u) = (self.out as u64, self.seg_bytes as u64);
        let mma = uses_mma(tokens, self.capability);
        let (f, blocks_x, blocks_y, threads) = if mma {
            let name = format!("bq_packed_mma{}", self.bits);
            let f = function_for(
                dev,
                &PTX_MMA,
                MODULE_MMA,
                SRC_MMA,
                &name,
                Some("compute_80"),
            )?;
            let blocks_y = tokens.div_ceil(MMA_TILE.1).min(MAX_GRID_Y);
            (f, self.out.div_ceil(MMA_TILE.0), blocks_y, 128)
        } else {
            let v = Variant::for_tokens(tokens);
            let name = format!("bq_packed_mm{}_{}", self.bits, v.name);
            let f = function(dev, &PTX, MODULE, SRC, &name)?;
            let blocks_y = tokens.div_ceil(v.tokens).min(MAX_GRID_Y);
            (
                f,
                self.out.div_ceil(v.warps * v.rows),
                blocks_y,
                32 * v.warps as u32,
            )
        };
        let mut b = stream.launch_builder(&f);
        b.arg(&self.data).arg(&xq).arg(&mt).arg(&self.scales);
        b.arg(&srow).arg(&sseg).arg(bias).arg(&has_bias);
        b.arg(&out_u)
            .arg(&tokens_u)
            .arg(&nseg_u)
            .arg(&seg_bytes_u)
            .arg(y);
        let mm_cfg = LaunchConfig {
            grid_dim: (blocks_x as u32, blocks_y as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: both kernels take the same arguments, matching their signatures. The dp4a
        // kernels get their W warps (their shared arrays are sized by W), the tensor-core
        // kernel its 4 warps (128 threads, one load slot per tile row half) on a device of
        // compute capability 8.0 or later (`uses_mma`). Loads stay in bounds: rows are checked
        // against `out`, tokens against `tokens`, units, chunks and segments against the row's
        // `nseg * seg_bytes` bytes and `xrow` activations; all vector loads are aligned because
        // rows, segments, chunks and token rows are multiples of 16 bytes from 256-byte
        // aligned buffers.
        unsafe { b.launch(mm_cfg) }.w()?;
        Ok(())
    }
}

/// The packed matmul as a candle op on CUDA storage: `x [.., in] -> y [.., out]`, f32.
pub(crate) struct PackedMatmul {
    /// The layer's tensors on the input's device.
    pub(crate) weights: Arc<CudaPacked>,
    /// Whether to copy the non-finite count back and fail on it (see
    /// [`PackedBitLinear::with_finite_check`](super::PackedBitLinear::with_finite_check)).
    pub(crate) check_finite: bool,
}

impl CustomOp1 for PackedMatmul {
    fn name(&self) -> &'static str {
        "PackedBitLinear::forward"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        Err(QuantError::Device {
            op: self.name(),
            layer: self.weights.device().location(),
            input: Device::Cpu.location(),
        }
        .into())
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        self.weights.forward(self.name(), s, l, self.check_finite)
    }
}
