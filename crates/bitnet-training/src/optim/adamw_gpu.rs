//! One fused AdamW step for an f32 parameter on a CUDA GPU: a [`CustomOp3`] over the parameter
//! and its two moments, holding the gradient, whose CUDA kernel reads `theta, m, v, g` once and
//! writes `[3, n]` = the new `theta, m, v` (the tensor-op path took about 12 launches per
//! parameter). Its `cpu_fwd` is the kernel transcribed to Rust line by line, so the tests check
//! the kernel's formula on every machine against the CPU optimizer's fused update (bit for bit:
//! the same f32 operations in the same order, and the kernel is compiled without FMA
//! contraction, with IEEE division and square root).

use super::kernels::AdamCoeffs;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// The fused step: `apply_op3_no_bwd(theta, m, v)` gives `[3, n]`.
pub(crate) struct AdamStep {
    /// The gradient, contiguous, of the parameter's shape.
    pub(crate) grad: Tensor,
    pub(crate) c: AdamCoeffs,
}

/// The contiguous f32 elements of one CPU operand.
fn cpu_f32<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let v = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: operands must be contiguous"),
    }
}

impl CustomOp3 for AdamStep {
    fn name(&self) -> &'static str {
        "qat-adamw-gpu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (theta, m, v) = (
            cpu_f32(op, s1, l1)?,
            cpu_f32(op, s2, l2)?,
            cpu_f32(op, s3, l3)?,
        );
        let (gs, gl) = self.grad.storage_and_layout();
        let candle_core::Storage::Cpu(gs) = &*gs else {
            candle_core::bail!("{op}: the gradient is not on the CPU");
        };
        let g = cpu_f32(op, gs, gl)?;
        let n = theta.len();
        if m.len() != n || v.len() != n || g.len() != n {
            candle_core::bail!("{op}: operands of different sizes");
        }
        let c = &self.c;
        let (has_clip, clip) = (c.clip.is_some(), c.clip.unwrap_or(0.0));
        let mut out = vec![0f32; 3 * n];
        // `bt_adamw`, one thread per element.
        for i in 0..n {
            let gi = g[i];
            let next_m = m[i] * c.beta1 + gi * c.one_minus_beta1;
            let next_v = v[i] * c.beta2 + (gi * gi) * c.one_minus_beta2;
            let m_hat = next_m * c.scale_m;
            let v_hat = next_v * c.scale_v;
            let adjusted = m_hat / (v_hat.sqrt() + c.eps);
            let mut next_t = theta[i] * c.decay - adjusted * c.lr;
            if has_clip {
                next_t = if next_t < -clip {
                    -clip
                } else if next_t > clip {
                    clip
                } else {
                    next_t
                };
            }
            out[i] = next_t;
            out[n + i] = next_m;
            out[2 * n + i] = next_v;
        }
        Ok((CpuStorage::F32(out), Shape::from((3, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::step(self, (s1, l1), (s2, l2), (s3, l3))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::AdamStep;
    use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::{CustomOp3, Layout, Result, Shape, Storage};
    use std::sync::OnceLock;

    const SRC: &str = r#"
typedef unsigned long long u64;

// One AdamW step per element, in the CPU kernel's (and candle-nn's) order of f32 operations;
// out = [theta | m | v].
extern "C" __global__ void bt_adamw(const float* theta, const float* m, const float* v, const float* g,
                                    u64 n, float beta1, float omb1, float beta2, float omb2, float scale_m,
                                    float scale_v, float decay, float lr, float eps, unsigned has_clip,
                                    float clip, float* out) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float gi = g[i];
        const float next_m = m[i] * beta1 + gi * omb1;
        const float next_v = v[i] * beta2 + (gi * gi) * omb2;
        const float m_hat = next_m * scale_m;
        const float v_hat = next_v * scale_v;
        const float adjusted = m_hat / (sqrtf(v_hat) + eps);
        float next_t = theta[i] * decay - adjusted * lr;
        if (has_clip) {
            next_t = next_t < -clip ? -clip : (next_t > clip ? clip : next_t);
        }
        out[i] = next_t;
        out[n + i] = next_m;
        out[2 * n + i] = next_v;
    }
}
"#;

    const MODULE: &str = "bitnet_training_adamw";
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();

    fn view<'a>(op: &str, s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, f32>> {
        match l.contiguous_offsets() {
            Some((a, b)) => Ok(s.as_cuda_slice::<f32>()?.slice(a..b)),
            None => candle_core::bail!("{op}: operands must be contiguous"),
        }
    }

    pub(super) fn step(
        op: &AdamStep,
        (s1, l1): (&CudaStorage, &Layout),
        (s2, l2): (&CudaStorage, &Layout),
        (s3, l3): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let name = op.name();
        let dev = &s1.device;
        let (theta, m, v) = (
            view(name, s1, l1)?,
            view(name, s2, l2)?,
            view(name, s3, l3)?,
        );
        let (gs, gl) = op.grad.storage_and_layout();
        let Storage::Cuda(gs) = &*gs else {
            candle_core::bail!("{name}: the gradient is not on the parameter's GPU");
        };
        let g = view(name, gs, gl)?;
        let n = theta.len();
        if m.len() != n || v.len() != n || g.len() != n {
            candle_core::bail!("{name}: operands of different sizes");
        }
        let ptx = PTX.get_or_init(|| {
            // No contraction into FMA: the CPU update rounds every product and sum.
            let opts = CompileOptions {
                fmad: Some(false),
                ..Default::default()
            };
            compile_ptx_with_opts(SRC, opts)
                .map(|p| p.to_src())
                .map_err(|e| format!("{e:?}"))
        });
        let ptx = match ptx {
            Ok(p) => p,
            Err(e) => candle_core::bail!("{MODULE}: NVRTC failed to compile the kernel: {e}"),
        };
        let f = dev
            .get_or_load_custom_func("bt_adamw", MODULE, ptx)?
            .into_cuda_function();
        // SAFETY: the kernel writes all 3 n values (a grid-stride loop over n) before any read.
        let mut out = unsafe { dev.alloc::<f32>(3 * n)? };
        let c = &op.c;
        let n_u = n as u64;
        let (has_clip, clip) = (u32::from(c.clip.is_some()), c.clip.unwrap_or(0.0));
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&theta).arg(&m).arg(&v).arg(&g).arg(&n_u);
        b.arg(&c.beta1).arg(&c.one_minus_beta1).arg(&c.beta2);
        b.arg(&c.one_minus_beta2).arg(&c.scale_m).arg(&c.scale_v);
        b.arg(&c.decay)
            .arg(&c.lr)
            .arg(&c.eps)
            .arg(&has_clip)
            .arg(&clip);
        b.arg(&mut out);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256).clamp(1, 132 * 8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument list matches the kernel's signature; every index is below n
        // (inputs) or 3 n (out).
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((3, n)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{ParamGroup, ParamsQatAdamW, QatAdamW};
    use candle_core::{Device, Var};
    use candle_nn::Optimizer;
    use rand::{Rng, SeedableRng};

    /// Five steps of the op (the kernel's transcription) equal five steps of the CPU optimizer's
    /// fused update bit for bit, with and without clipping, weight decay and a learning-rate
    /// scale; the gradients include zeros and large values.
    #[test]
    fn the_kernel_formula_is_the_cpu_update() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let n = 1000;
        for (clip, lr_scale) in [(None, 1.0), (Some(0.05f32), 0.5)] {
            let init: Vec<f32> = (0..n).map(|_| rng.random_range(-0.1..0.1)).collect();
            let var = Var::new(init.as_slice(), &Device::Cpu).unwrap();
            let mut group = ParamGroup::new(vec![var.clone()]).lr_scale(lr_scale);
            if let Some(c) = clip {
                group = group.clip(c);
            }
            let params = ParamsQatAdamW {
                lr: 0.01,
                weight_decay: 0.1,
                ..Default::default()
            };
            let mut opt = QatAdamW::with_groups(vec![group], params.clone()).unwrap();
            let (mut theta, mut m, mut v) = (
                Tensor::new(init.as_slice(), &Device::Cpu).unwrap(),
                Tensor::zeros(n, candle_core::DType::F32, &Device::Cpu).unwrap(),
                Tensor::zeros(n, candle_core::DType::F32, &Device::Cpu).unwrap(),
            );
            for t in 1..=5usize {
                let g: Vec<f32> = (0..n)
                    .map(|i| match i % 17 {
                        0 => 0.0,
                        1 => 1e4,
                        _ => rng.random_range(-1.0..1.0),
                    })
                    .collect();
                let g = Tensor::new(g.as_slice(), &Device::Cpu).unwrap();
                let lr = params.lr * lr_scale;
                let c = AdamCoeffs::new(
                    lr,
                    params.beta1,
                    params.beta2,
                    params.eps,
                    params.weight_decay,
                    t,
                    clip,
                );
                let op = AdamStep { grad: g.clone(), c };
                let out = theta.apply_op3_no_bwd(&m, &v, &op).unwrap();
                (theta, m, v) = (
                    out.get(0).unwrap(),
                    out.get(1).unwrap(),
                    out.get(2).unwrap(),
                );

                // d/dvar of sum(var * g) is g, exactly (ones times g).
                let loss = (var.as_tensor() * &g).unwrap().sum_all().unwrap();
                opt.backward_step(&loss).unwrap();
                let want = var.as_tensor().to_vec1::<f32>().unwrap();
                let got = theta.to_vec1::<f32>().unwrap();
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "step {t}, clip {clip:?}, element {i}"
                    );
                }
            }
        }
    }
}
