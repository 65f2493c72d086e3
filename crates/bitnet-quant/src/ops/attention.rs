//! Causal softmax attention as one graph node whose backward recomputes the scores.
//!
//! Written as candle ops, `softmax(scale * q k^T + mask) v` leaves six `[rows, keys]` tensors in
//! the autograd graph of every layer (the product, the scaled and masked scores, and the four
//! intermediates of the differentiable softmax), and its backward makes as many again. At
//! sequence length 128 and head size 32 those score-sized tensors are four times the size of
//! `q`, and they are most of a small transformer's training memory: the char LM's step (16 x 128
//! bytes, 3 layers) peaked at 740 MB of live heap, 150 MB of it attention scores.
//!
//! This op keeps only its inputs and output, as a flash-attention backward does: the backward
//! recomputes `P = softmax(scale * q k^T + mask)` from `q` and `k` and then
//!
//! * `dv = P^T do`,
//! * `ds = P * (do v^T - rowsum(do * o))`,
//! * `dq = scale * ds k`, `dk = scale * ds^T q`
//!
//! (the softmax Jacobian applied through the saved output `o = P v`). Reference: the same
//! attention written as candle ops, whose autograd the tests compare with.
//!
//! The layout is grouped-query attention with the query heads that share a key/value head
//! stacked along the rows: `q` `[.., rep * queries, d]`, `k` and `v` `[.., keys, d]`, and row `r`
//! is query position `keys - queries + r % queries`, which attends to keys `0..=` that position.
//! f32 on the CPU; other devices and dtypes run the composed ops (same result, more memory).
//!
//! ```
//! use bitnet_quant::ops::attention::causal_attention;
//! use candle_core::{Device, Tensor, Var};
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! // Two query heads of 4 positions each (8 rows) over one key/value head of 4 positions.
//! let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 1, 8, 4), &dev)?)?;
//! let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 1, 4, 4), &dev)?)?;
//! let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 1, 4, 4), &dev)?)?;
//! let o = causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), 4, 0.5)?;
//! assert_eq!(o.dims(), &[1, 1, 8, 4]);
//! // The first query sees only the first key: its output is the first value row.
//! let first = o.get(0)?.get(0)?.get(0)?.to_vec1::<f32>()?;
//! assert_eq!(first, v.as_tensor().get(0)?.get(0)?.get(0)?.to_vec1::<f32>()?);
//! let grads = o.sqr()?.sum_all()?.backward()?;
//! assert!(grads.get(&q).is_some() && grads.get(&k).is_some() && grads.get(&v).is_some());
//! # Ok(()) }
//! ```

use crate::error::QuantError;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, D};

/// `softmax(scale * q k^T + causal mask) v` (see the module docs for the layout), as one graph
/// node on the CPU whose backward recomputes the scores instead of keeping them.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    queries: usize,
    scale: f64,
) -> Result<Tensor> {
    check(q, k, v, queries)?;
    let fused = q.device().is_cpu()
        && [q, k, v].iter().all(|t| t.dtype() == DType::F32)
        && (q.track_op() || k.track_op() || v.track_op());
    if !fused {
        return composed(q, k, v, queries, scale);
    }
    let op = CausalAttention { queries, scale };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// The same attention as candle ops: what runs off the CPU or without gradients, and the
/// reference of the tests.
pub fn composed(q: &Tensor, k: &Tensor, v: &Tensor, queries: usize, scale: f64) -> Result<Tensor> {
    check(q, k, v, queries)?;
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = match mask(q, k, queries)? {
        Some(m) => scores.broadcast_add(&m)?,
        None => scores,
    };
    let probs = match q.track_op() || k.track_op() {
        true => candle_nn::ops::softmax(&scores, D::Minus1)?,
        false => candle_nn::ops::softmax_last_dim(&scores)?,
    };
    probs.matmul(v)
}

fn check(q: &Tensor, k: &Tensor, v: &Tensor, queries: usize) -> Result<()> {
    let bad = |what: String| -> Result<()> {
        Err(QuantError::Shape {
            op: "causal_attention",
            what,
        }
        .into())
    };
    let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
    if qd.len() < 2 || kd != vd || qd.len() != kd.len() {
        return bad(format!(
            "q {qd:?}, k {kd:?}, v {vd:?}: expected [.., rows, d] and k, v [.., keys, d]"
        ));
    }
    let n = qd.len();
    let (rows, keys) = (qd[n - 2], kd[n - 2]);
    if qd[..n - 2] != kd[..n - 2] || qd[n - 1] != kd[n - 1] {
        return bad(format!("q {qd:?} and k {kd:?} differ outside the rows"));
    }
    if queries == 0 || rows % queries != 0 || queries > keys {
        return bad(format!(
            "{rows} query rows of {queries} queries each over {keys} keys: rows must be a \
             multiple of queries, and 1 <= queries <= keys"
        ));
    }
    Ok(())
}

/// `0` where row `r` may attend to key `j`, `-inf` after its position; `None` when nothing is
/// masked (one query, the newest position).
fn mask(q: &Tensor, k: &Tensor, queries: usize) -> Result<Option<Tensor>> {
    let (rows, keys) = (q.dim(D::Minus2)?, k.dim(D::Minus2)?);
    let past = keys - queries;
    if queries == 1 {
        return Ok(None);
    }
    let m: Vec<f32> = (0..rows * keys)
        .map(|i| match i % keys > past + (i / keys) % queries {
            true => f32::NEG_INFINITY,
            false => 0.0,
        })
        .collect();
    Ok(Some(Tensor::from_vec(m, (rows, keys), q.device())?))
}

struct CausalAttention {
    queries: usize,
    scale: f64,
}

impl CausalAttention {
    /// `P = softmax(scale * q k^T + mask)` for detached inputs.
    fn probs(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        let scores = (q.matmul(&k.t()?)? * self.scale)?;
        let scores = match mask(q, k, self.queries)? {
            Some(m) => scores.broadcast_add(&m)?,
            None => scores,
        };
        candle_nn::ops::softmax_last_dim(&scores)
    }
}

/// A detached CPU tensor holding a copy of an f32 storage's values.
fn detached(name: &'static str, s: &CpuStorage, l: &Layout) -> Result<Tensor> {
    let values = crate::ops::cpu_util::f32_values(name, s, l)?;
    Tensor::from_slice(&values, l.shape(), &Device::Cpu)
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "bitnet-causal-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        // Copies of q, k, v (each [rows or keys, d]) cost far less than the [rows, keys] work;
        // candle's own kernels then do the products and the softmax, and their temporaries are
        // gone when this returns.
        let (q, k, v) = (
            detached(self.name(), sq, lq)?,
            detached(self.name(), sk, lk)?,
            detached(self.name(), sv, lv)?,
        );
        let out = self.probs(&q, &k)?.matmul(&v)?;
        let shape = out.shape().clone();
        Ok((CpuStorage::F32(out.flatten_all()?.to_vec1()?), shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, o) = (q.detach(), k.detach(), v.detach(), out.detach());
        let p = self.probs(&q, &k)?;
        let dv = p.t()?.matmul(grad)?;
        let dp = grad.matmul(&v.t()?)?;
        let row = (grad * &o)?.sum_keepdim(D::Minus1)?;
        let ds = (p * dp.broadcast_sub(&row)?)?;
        let dq = (ds.matmul(&k)? * self.scale)?;
        let dk = (ds.t()?.matmul(&q)? * self.scale)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        // Deterministic values in [-1.5, 1.5) without a global RNG.
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 * 3.0 - 1.5
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = b.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
        a.iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
    }

    /// Output and all three gradients equal the composed ops' (candle's autograd), within 1e-5
    /// of the largest value, for plain, grouped-query, decode-like and cached-prefix shapes.
    #[test]
    fn equals_the_composed_ops_forward_and_backward() {
        // (batch dims, rep, queries, keys, head dim)
        let cases = [
            (vec![2, 3], 1, 16, 16, 8),
            (vec![1, 2], 3, 10, 10, 4),
            (vec![2, 1], 2, 5, 12, 6),
            (vec![1, 2], 4, 1, 9, 8),
        ];
        for (i, (lead, rep, queries, keys, d)) in cases.into_iter().enumerate() {
            let shape = |rows: usize| [lead.clone(), vec![rows, d]].concat();
            let q = Var::from_tensor(&randn(&shape(rep * queries), 3 * i as u64 + 1)).unwrap();
            let k = Var::from_tensor(&randn(&shape(keys), 3 * i as u64 + 2)).unwrap();
            let v = Var::from_tensor(&randn(&shape(keys), 3 * i as u64 + 3)).unwrap();
            let w = randn(&shape(rep * queries), 99);
            let scale = 1.0 / (d as f64).sqrt();
            let run = |f: fn(&Tensor, &Tensor, &Tensor, usize, f64) -> Result<Tensor>| {
                let o = f(q.as_tensor(), k.as_tensor(), v.as_tensor(), queries, scale).unwrap();
                let g = (&o * &w).unwrap().sum_all().unwrap().backward().unwrap();
                let grads = [&q, &k, &v].map(|x| g.get(x).unwrap().clone());
                (o, grads)
            };
            let (o1, g1) = run(causal_attention);
            let (o2, g2) = run(composed);
            assert!(max_rel(&o1, &o2) < 1e-5, "case {i}: output");
            for (name, (a, b)) in ["dq", "dk", "dv"].iter().zip(g1.iter().zip(&g2)) {
                let e = max_rel(a, b);
                assert!(e < 1e-5, "case {i}: {name} differs by {e}");
            }
        }
    }

    /// The key gradient against central differences of the loss, in f64 sums of f32 outputs.
    #[test]
    fn key_gradient_matches_finite_differences() {
        let (rows, keys, d, queries) = (6, 4, 3, 3); // two query heads over 3 queries, one cached key
        let q = randn(&[1, rows, d], 7);
        let kv = randn(&[1, keys, d], 8);
        let v = randn(&[1, keys, d], 9);
        let w = randn(&[1, rows, d], 10);
        let loss = |k: &Tensor| -> f64 {
            let o = causal_attention(&q, k, &v, queries, 0.7).unwrap();
            let p = (o * &w)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            p.iter().map(|&x| x as f64).sum()
        };
        let k = Var::from_tensor(&kv).unwrap();
        let o = causal_attention(&q, k.as_tensor(), &v, queries, 0.7).unwrap();
        let g = (o * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let got = g
            .get(&k)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let base = kv.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let h = 1e-2f32;
        for (i, &gi) in got.iter().enumerate() {
            let at = |delta: f32| {
                let mut p = base.clone();
                p[i] += delta;
                loss(&Tensor::from_vec(p, (1, keys, d), &Device::Cpu).unwrap())
            };
            let fd = (at(h) - at(-h)) / (2.0 * h as f64);
            assert!(
                (gi as f64 - fd).abs() < 2e-3 * (1.0 + fd.abs()),
                "dk[{i}]: {gi} vs finite difference {fd}"
            );
        }
    }

    #[test]
    fn bad_shapes_are_errors_naming_the_operands() {
        let t = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
        for (q, k, v, queries, want) in [
            (
                t(&[1, 4, 8]),
                t(&[1, 4, 8]),
                t(&[1, 5, 8]),
                4,
                "k [1, 4, 8], v [1, 5, 8]",
            ),
            (
                t(&[1, 4, 8]),
                t(&[1, 4, 6]),
                t(&[1, 4, 6]),
                4,
                "differ outside the rows",
            ),
            (
                t(&[1, 6, 8]),
                t(&[1, 4, 8]),
                t(&[1, 4, 8]),
                4,
                "multiple of queries",
            ),
            (
                t(&[1, 6, 8]),
                t(&[1, 2, 8]),
                t(&[1, 2, 8]),
                3,
                "queries <= keys",
            ),
            (t(&[8]), t(&[8]), t(&[8]), 1, "expected [.., rows, d]"),
        ] {
            let err = causal_attention(&q, &k, &v, queries, 1.0)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err}");
        }
    }
}
