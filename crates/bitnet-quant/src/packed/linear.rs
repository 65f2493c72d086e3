//! [`PackedBitLinear`]: the inference form of a trained [`BitLinear`].

use super::act_quant;
use super::kernels::Kernel;
use super::layout::PackedTernary;
use crate::error::{invalid, QuantError};
use crate::ops::math::Kind;
use crate::rms_norm::RmsNorm;
use crate::scheme::{Granularity, Scheme};
use crate::{BitLinear, Quantizer};
use bitnet_core::{current_pool, Category};
use candle_core::{CpuStorage, DType, Device, Module, Result, Storage, Tensor};
use rayon::prelude::*;

/// Below this many multiply-adds (`tokens * out * padded in`) the forward stays on the calling
/// thread: rayon's fork/join costs microseconds, more than a small layer's whole product.
pub const PAR_MIN_MACS: usize = 1 << 18;

/// Output rows per rayon task: enough work (16 rows x 4096 inputs = 16 KiB of codes) to
/// amortise the task, small enough to balance across cores.
const ROWS_PER_TASK: usize = 16;

/// BitNet b1.58 inference: RMSNorm (f32), int8 absmax activations per token, 2-bit ternary
/// weights, integer dot products, one dequantizing multiply per output, plus bias.
///
/// `y[t, r] = (sum_seg s[r, seg] * sum_i q[t, i] * level[r, i]) * m[t] / 127 + b[r]`, with
/// `m[t] = max(max_i |x[t, i]|, 1e-5)` and `q = clamp(round_ties_even(x * 127 / m), -128, 127)`,
/// exactly the training forward of [`BitLinear`] up to f32 rounding (the training forward
/// multiplies dequantized f32 values; here the sum is exact in i32).
///
/// Runs on the CPU: input on another device is copied to the CPU and the output copied back.
/// [`Self::to_device`] moves the layer to a CUDA GPU (feature `cuda`), where its forward runs
/// CUDA kernels with the same result (see [`Self::to_device`]).
///
/// ```
/// use bitnet_quant::packed::PackedBitLinear;
/// use bitnet_quant::BitLinear;
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// # fn main() -> candle_core::Result<()> {
/// let vm = VarMap::new();
/// let layer = BitLinear::new(200, 24, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
/// let packed = PackedBitLinear::from_trained(&layer)?;
/// let x = Tensor::randn(0f32, 1.0, (3, 200), &Device::Cpu)?;
/// let diff = (packed.forward(&x)? - layer.forward(&x)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff < 1e-4);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PackedBitLinear {
    weight: PackedTernary,
    bias: Option<Vec<f32>>,
    norm: Option<RmsNorm>,
    kernel: Kernel,
    /// Fail on NaN/infinite input; off, such tokens give NaN outputs; `None`, the device's
    /// default (see `with_finite_check`).
    check_finite: Option<bool>,
    /// The layer's tensors on a CUDA device, when it was moved there; shared by clones.
    #[cfg(feature = "cuda")]
    cuda: Option<std::sync::Arc<super::cuda::CudaPacked>>,
}

/// The activation quantizer every packed layer's integer kernels need: int8 per token
/// ([`Scheme::Int8PerToken`] per row) with `lambda = 1`; anything else is an error naming the
/// field.
pub(crate) fn require_int8_activations(activation: Option<&Quantizer>) -> Result<()> {
    match activation {
        Some(q)
            if q.scheme() == Scheme::Int8PerToken
                && q.granularity() == Granularity::PerChannel
                && q.lambda() == 1.0 =>
        {
            Ok(())
        }
        other => Err(invalid(
            "activation",
            format!("{other:?}"),
            "Some(Int8PerToken per token, lambda 1): the packed kernels multiply int8 activations",
        )
        .into()),
    }
}

impl PackedBitLinear {
    /// Packs a trained layer. Its weight quantizer must be binary or ternary (any granularity)
    /// and its activation quantizer int8 per token ([`Scheme::Int8PerToken`] per row), both with
    /// `lambda = 1`; other configurations have no integer inference path and are an error naming
    /// the field.
    pub fn from_trained(layer: &BitLinear) -> Result<Self> {
        let cfg = layer.config();
        require_int8_activations(cfg.activation.as_ref())?;
        let weight = PackedTernary::pack(&layer.weight().detach(), &cfg.weight)?;
        let bias = layer.bias().map(|b| b.detach());
        let norm = layer
            .norm()
            .map(|n| RmsNorm::from_weight(n.weight().detach(), n.eps()));
        Self::from_parts(weight, bias.as_ref(), norm)
    }

    /// Assembles a layer from a packed weight, an optional bias `[out]` and an optional norm
    /// (weight `[in]`), checking their shapes. Bias and norm weight are kept in f32.
    pub fn from_parts(
        weight: PackedTernary,
        bias: Option<&Tensor>,
        norm: Option<RmsNorm>,
    ) -> Result<Self> {
        const OP: &str = "PackedBitLinear";
        let bias = match bias {
            Some(b) => {
                if b.dims() != [weight.out_features()] {
                    return Err(QuantError::Shape {
                        op: OP,
                        what: format!("bias {:?}, expected [{}]", b.dims(), weight.out_features()),
                    }
                    .into());
                }
                Some(
                    b.to_dtype(DType::F32)?
                        .to_device(&Device::Cpu)?
                        .to_vec1::<f32>()?,
                )
            }
            None => None,
        };
        let norm = match norm {
            Some(n) => {
                if n.weight().dims() != [weight.in_features()] {
                    return Err(QuantError::Shape {
                        op: OP,
                        what: format!(
                            "norm weight {:?}, expected [{}]",
                            n.weight().dims(),
                            weight.in_features()
                        ),
                    }
                    .into());
                }
                let w = n.weight().to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
                Some(RmsNorm::from_weight(w, n.eps()))
            }
            None => None,
        };
        Ok(Self {
            weight,
            bias,
            norm,
            kernel: Kernel::detect(),
            check_finite: None,
            #[cfg(feature = "cuda")]
            cuda: None,
        })
    }

    /// The same layer on `device`, for [`Module::forward`] on input from that device.
    ///
    /// * [`Device::Cpu`]: the CPU layer (the form every constructor returns).
    /// * A CUDA device (feature `cuda`): the packed codes, scales, bias and norm weight are copied
    ///   to the GPU once, here; each forward then runs the CUDA kernels (up to 4 tokens: one
    ///   launch that quantizes the activations per token, with the optional norm, and does the
    ///   packed integer matmul; more tokens: the quantization and the matmul as two launches,
    ///   the matmul on int8 tensor cores from 16 tokens on compute capability 8.0 and later)
    ///   and returns a tensor on that GPU equal to the CPU layer's output (integer sums are
    ///   exact and every float operation is the CPU's, in the same order). The forward does not
    ///   synchronise with the host unless the NaN/infinity check is turned on with
    ///   [`Self::with_finite_check`] (off by default on CUDA). Input must be on the same device,
    ///   else [`QuantError::Device`]. The host copy stays, so [`Self::weight`],
    ///   [`save_packed`](super::save_packed) and `to_device(&Device::Cpu)` keep working.
    /// * Metal, or CUDA without the `cuda` feature: [`QuantError::Unsupported`].
    ///
    /// ```no_run
    /// # #[cfg(feature = "cuda")]
    /// # fn main() -> candle_core::Result<()> {
    /// use bitnet_quant::packed::PackedBitLinear;
    /// use bitnet_quant::BitLinear;
    /// use candle_core::{DType, Device, Module, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// let vm = VarMap::new();
    /// let layer = BitLinear::new(200, 24, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    /// let gpu = Device::new_cuda(0)?;
    /// let packed = PackedBitLinear::from_trained(&layer)?.to_device(&gpu)?;
    /// let y = packed.forward(&Tensor::randn(0f32, 1.0, (3, 200), &gpu)?)?; // on the GPU
    /// # Ok(()) }
    /// # #[cfg(not(feature = "cuda"))]
    /// # fn main() {}
    /// ```
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        const OP: &str = "PackedBitLinear::to_device";
        match device {
            Device::Cpu => Ok(Self {
                #[cfg(feature = "cuda")]
                cuda: None,
                ..self.clone()
            }),
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) => {
                if let Some(c) = &self.cuda {
                    if c.device().same_device(device) {
                        return Ok(self.clone());
                    }
                }
                let norm = match &self.norm {
                    Some(n) => Some((n.weight().flatten_all()?.to_vec1::<f32>()?, n.eps() as f32)),
                    None => None,
                };
                let on_gpu = super::cuda::CudaPacked::upload(
                    dev,
                    &self.weight,
                    self.bias.as_deref(),
                    norm.as_ref().map(|(w, eps)| (w.as_slice(), *eps)),
                )?;
                let mut l = self.clone();
                l.cuda = Some(std::sync::Arc::new(on_gpu));
                Ok(l)
            }
            other => Err(QuantError::Unsupported {
                op: OP,
                what: format!(
                    "device {:?}: packed inference runs on the CPU and, with the `cuda` feature, on CUDA GPUs",
                    other.location()
                ),
            }
            .into()),
        }
    }

    /// The device the layer computes on: the CPU, or the GPU given to [`Self::to_device`].
    pub fn device(&self) -> Device {
        #[cfg(feature = "cuda")]
        if let Some(c) = &self.cuda {
            return c.device().clone();
        }
        Device::Cpu
    }

    /// The same layer with the NaN/infinity check of the input on or off, on every device.
    ///
    /// With the check on, non-finite input (after the norm) is a [`QuantError::NonFinite`]
    /// error. With it off, a token holding NaN or infinity gets NaN in all of its outputs (the
    /// other tokens are unaffected), on every device.
    ///
    /// Without a call, each device has its default: on for the CPU, where the check is a scan
    /// of the input; off for CUDA, where it would copy a count back to the host, which waits
    /// for the kernels: one synchronisation per forward, most of a batch-1 call on a fast GPU.
    /// A CUDA forward with the check off never synchronises with the host.
    ///
    /// ```
    /// use bitnet_quant::packed::PackedBitLinear;
    /// use bitnet_quant::BitLinear;
    /// use candle_core::{DType, Device, Module, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// # fn main() -> candle_core::Result<()> {
    /// let vm = VarMap::new();
    /// let layer = BitLinear::new(4, 2, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    /// let packed = PackedBitLinear::from_trained(&layer)?;
    /// let x = Tensor::new(&[[1f32, 2.0, 3.0, 4.0], [f32::NAN, 0.0, 0.0, 0.0]], &Device::Cpu)?;
    /// assert!(packed.finite_check() && packed.forward(&x).is_err());
    /// let y = packed.with_finite_check(false).forward(&x)?.to_vec2::<f32>()?;
    /// assert!(y[0].iter().all(|v| v.is_finite()) && y[1].iter().all(|v| v.is_nan()));
    /// # Ok(()) }
    /// ```
    pub fn with_finite_check(mut self, check: bool) -> Self {
        self.check_finite = Some(check);
        self
    }

    /// Whether [`Module::forward`] fails on NaN/infinite input on the layer's device: the value
    /// given to [`Self::with_finite_check`], else the device's default (CPU on, CUDA off).
    pub fn finite_check(&self) -> bool {
        self.check_finite.unwrap_or(self.device().is_cpu())
    }

    /// The same layer computing with another kernel (an unavailable one falls back to
    /// [`Kernel::Scalar`]); for tests and benches.
    pub fn with_kernel(mut self, kernel: Kernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// The kernel in use.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// The packed weight.
    pub fn weight(&self) -> &PackedTernary {
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

    /// Quantizes `tokens` rows of `xs` into the padded segment layout of the weight, returning
    /// per-token `m / 127` and per-(token, segment) sums of the int8 values.
    fn quantize_input(&self, xs: &[f32], tokens: usize, xq: &mut [i8]) -> (Vec<f32>, Vec<i32>) {
        let w = &self.weight;
        let (inp, seg, segp, nseg) = (
            w.in_features(),
            w.segment_len(),
            w.segment_padded(),
            w.segments_per_row(),
        );
        let kind = Kind::of(&Scheme::Int8PerToken);
        let kernel = self.kernel;
        let mut m = vec![0f32; tokens];
        let mut sums = vec![0i32; tokens * nseg];
        // One token: (its input, its int8 codes) and (its dequant factor, its per-segment sums).
        type Token<'a> = ((&'a [f32], &'a mut [i8]), (&'a mut f32, &'a mut [i32]));
        let work = |((x, q), (mt, st)): Token| {
            // The same formulas as the Int8PerToken quantizer (`Kind::params`, `Kind::level`),
            // so the levels are identical.
            let (_, aux) = kind.params(0.0, act_quant::max_abs(kernel, x), 0.0);
            *mt = aux / 127.0;
            // `Kind::level`'s `qmax / aux` for Int8PerToken (qmax 127).
            let inv = 127.0 / aux;
            for (k, (xseg, qseg)) in x
                .chunks_exact(seg)
                .zip(q.chunks_exact_mut(segp))
                .enumerate()
            {
                st[k] = act_quant::quantize(kernel, xseg, inv, &mut qseg[..seg]);
                qseg[seg..].fill(0);
            }
        };
        if crate::ops::parallel(tokens * inp) {
            xs.par_chunks_exact(inp)
                .zip(xq.par_chunks_exact_mut(nseg * segp))
                .zip(m.par_iter_mut().zip(sums.par_chunks_exact_mut(nseg)))
                .for_each(work);
        } else {
            xs.chunks_exact(inp)
                .zip(xq.chunks_exact_mut(nseg * segp))
                .zip(m.iter_mut().zip(sums.chunks_exact_mut(nseg)))
                .for_each(work);
        }
        (m, sums)
    }

    /// The product for 1-bit weights, `[tokens, out]`: rows outer, tokens inner, so that each
    /// weight row is read from memory once per call and its codes are reused for every token
    /// while they sit in L1.
    fn binary_matmul(&self, xq: &[i8], m: &[f32], sums: &[i32], tokens: usize) -> Vec<f32> {
        let (_, out) = self.dims();
        let xrow = self.weight.segments_per_row() * self.weight.segment_padded();
        let mut yt = vec![0f32; out * tokens];
        if tokens * out * xrow >= PAR_MIN_MACS {
            yt.par_chunks_mut(ROWS_PER_TASK * tokens)
                .enumerate()
                .for_each(|(c, chunk)| {
                    for (k, o) in chunk.chunks_exact_mut(tokens).enumerate() {
                        self.row(c * ROWS_PER_TASK + k, xq, m, sums, o);
                    }
                });
        } else {
            for (r, o) in yt.chunks_exact_mut(tokens).enumerate() {
                self.row(r, xq, m, sums, o);
            }
        }
        if tokens == 1 {
            return yt;
        }
        let mut y = vec![0f32; out * tokens];
        for (r, col) in yt.chunks_exact(tokens).enumerate() {
            for (t, v) in col.iter().enumerate() {
                y[t * out + r] = *v;
            }
        }
        y
    }

    /// Output row `r` of 1-bit weights for all tokens into `out[t]`.
    fn row(&self, r: usize, xq: &[i8], m: &[f32], sums: &[i32], out: &mut [f32]) {
        let w = &self.weight;
        let (segp, nseg, rb) = (w.segment_padded(), w.segments_per_row(), w.row_bytes());
        let seg_bytes = segp * w.bits() as usize / 8;
        let row = &w.data()[r * rb..(r + 1) * rb];
        let xrow = nseg * segp;
        let bias = self.bias.as_ref().map_or(0.0, |b| b[r]);
        let tokens = out.len();
        let mut t = 0;
        let finish = |t: usize, acc: f32| acc * m[t] + bias;
        while t + 4 <= tokens {
            let mut acc = [0f32; 4];
            for s in 0..nseg {
                let wseg = &row[s * seg_bytes..(s + 1) * seg_bytes];
                let xs: [&[i8]; 4] = std::array::from_fn(|u| {
                    &xq[(t + u) * xrow + s * segp..(t + u) * xrow + (s + 1) * segp]
                });
                let d = self.kernel.dot4_binary(wseg, xs);
                let scale = w.scale(r, s);
                for (u, (a, d)) in acc.iter_mut().zip(d).enumerate() {
                    *a += (d - sums[(t + u) * nseg + s]) as f32 * scale;
                }
            }
            for (u, (o, a)) in out[t..t + 4].iter_mut().zip(acc).enumerate() {
                *o = finish(t + u, a);
            }
            t += 4;
        }
        while t < tokens {
            let mut acc = 0f32;
            for s in 0..nseg {
                let wseg = &row[s * seg_bytes..(s + 1) * seg_bytes];
                let x = &xq[t * xrow + s * segp..t * xrow + (s + 1) * segp];
                let d = self.kernel.dot_binary(wseg, x);
                acc += (d - sums[t * nseg + s]) as f32 * w.scale(r, s);
            }
            out[t] = finish(t, acc);
            t += 1;
        }
    }

    /// The forward of a layer moved to CUDA: input checks done by the caller, `out_dims` the
    /// output shape.
    #[cfg(feature = "cuda")]
    fn forward_cuda(
        &self,
        on_gpu: &std::sync::Arc<super::cuda::CudaPacked>,
        x: &Tensor,
        out_dims: Vec<usize>,
    ) -> Result<Tensor> {
        if !x.device().same_device(on_gpu.device()) {
            return Err(QuantError::Device {
                op: "PackedBitLinear::forward",
                layer: on_gpu.device().location(),
                input: x.device().location(),
            }
            .into());
        }
        let dtype = x.dtype();
        if x.elem_count() == 0 {
            return Tensor::zeros(out_dims, dtype, x.device());
        }
        let op = super::cuda::PackedMatmul {
            weights: on_gpu.clone(),
            check_finite: self.finite_check(),
        };
        x.to_dtype(DType::F32)?
            .apply_op1_no_bwd(&op)?
            .to_dtype(dtype)
    }
}

impl Module for PackedBitLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        const OP: &str = "PackedBitLinear::forward";
        let (device, dtype) = (x.device().clone(), x.dtype());
        if !dtype.is_float() {
            return Err(QuantError::DType { op: OP, dtype }.into());
        }
        let (inp, out) = self.dims();
        let dims = x.dims().to_vec();
        if dims.last() != Some(&inp) {
            return Err(QuantError::Shape {
                op: OP,
                what: format!("input {dims:?}, expected last dimension {inp}"),
            }
            .into());
        }
        let mut out_dims = dims.clone();
        *out_dims.last_mut().expect("checked above") = out;
        #[cfg(feature = "cuda")]
        if let Some(on_gpu) = &self.cuda {
            return self.forward_cuda(on_gpu, x, out_dims);
        }
        let x = x.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let x = match &self.norm {
            Some(n) => n.forward(&x)?,
            None => x,
        };
        // Read in place: a copy of 512 tokens x 14336 inputs is 29 MB of fresh pages per call.
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let xs: &[f32] = match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("{OP}: expected a contiguous f32 CPU tensor"),
        };
        let tokens = xs.len() / inp;
        if tokens == 0 {
            return Tensor::zeros(out_dims, dtype, &device);
        }
        let bad = xs.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 && self.finite_check() {
            return Err(QuantError::NonFinite { op: OP, count: bad }.into());
        }
        let w = &self.weight;
        let xrow = w.segments_per_row() * w.segment_padded();
        let mut xq_buf = current_pool().allocate_slice::<i8>(tokens * xrow, Category::Scratch)?;
        let xq = xq_buf.as_mut_slice_of::<i8>();
        let (mut m, sums) = self.quantize_input(xs, tokens, xq);
        if bad > 0 {
            // Unchecked: the result the CUDA kernels define, NaN for every output of a token
            // holding NaN or infinity, rather than whatever its zeroed levels would give.
            for (mt, x) in m.iter_mut().zip(xs.chunks_exact(inp)) {
                if x.iter().any(|v| !v.is_finite()) {
                    *mt = f32::NAN;
                }
            }
        }
        let xq: &[i8] = xq;
        let macs = tokens * out * xrow;
        let y = if w.bits() == 2 {
            let input = super::matmul::Input {
                q: xq,
                m: &m,
                sums: &sums,
                tokens,
            };
            super::matmul::matmul(
                w,
                self.kernel,
                self.bias.as_deref(),
                &input,
                macs >= PAR_MIN_MACS,
            )
        } else {
            self.binary_matmul(xq, &m, &sums, tokens)
        };
        Tensor::from_vec(y, out_dims, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(&device)
    }
}
