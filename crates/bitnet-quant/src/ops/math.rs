//! The scalar formulas every kernel implements. The CPU kernels call these functions directly; the
//! CUDA and Metal sources transcribe them line by line, and the device tests compare against them.

use crate::scheme::{Estimator, Scheme, Threshold, EPS};

/// A [`Scheme`] reduced to what a kernel needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// `s * sign(x)`; `s = mean|x|` when scaled, else 1.
    Binary { scaled: bool },
    /// `s * sign(x - c)` with `s = mean|x|` and the center `c = mean(x)` in `aux` (BitNet b1).
    BinaryCentered,
    /// `g * clamp(round(x / (g + eps)), -1, 1)`.
    Absmean,
    /// Hugging Face's absmean: `s * clamp(round(x * m), -1, 1)` with `m = 1 / max(g, eps)` and
    /// `s = 1 / m` (transformers' `round(x * m).clamp(-1, 1) / m`, bit for bit).
    AbsmeanHf,
    /// `s * (x > D) - s * (x < -D)`; `fixed = None` means TWN's `D = 0.7 mean|x|`.
    Threshold { fixed: Option<f32>, scaled: bool },
    /// Symmetric integer grid `-(qmax + 1)..=qmax` with absmax scale (multi-bit and int8).
    Int { qmax: f32 },
}

impl Kind {
    /// The kernel view of a scheme.
    pub fn of(s: &Scheme) -> Kind {
        match *s {
            Scheme::Binary { scaled } => Kind::Binary { scaled },
            Scheme::BinaryCentered => Kind::BinaryCentered,
            Scheme::TernaryAbsmean => Kind::Absmean,
            Scheme::TernaryAbsmeanHf => Kind::AbsmeanHf,
            Scheme::TernaryThreshold { threshold, scaled } => Kind::Threshold {
                fixed: match threshold {
                    Threshold::Fixed(d) => Some(d),
                    Threshold::Twn => None,
                },
                scaled,
            },
            Scheme::MultiBit { bits } => Kind::Int {
                qmax: ((1u32 << (bits - 1)) - 1) as f32,
            },
            Scheme::Int8PerToken => Kind::Int { qmax: 127.0 },
        }
    }

    /// Whether the block parameters need the second pass over values above the threshold.
    pub fn needs_above_pass(&self) -> bool {
        matches!(self, Kind::Threshold { scaled: true, .. })
    }

    /// Whether the block parameters need the signed mean of the block (the center of
    /// [`Kind::BinaryCentered`]).
    pub fn needs_mean(&self) -> bool {
        matches!(self, Kind::BinaryCentered)
    }

    /// The threshold from the block's `mean|x|` (threshold kinds only).
    pub fn threshold(&self, mean_abs: f32) -> f32 {
        match *self {
            Kind::Threshold { fixed: Some(d), .. } => d,
            _ => 0.7 * mean_abs,
        }
    }

    /// Block parameters `(s, aux)` from the block's `mean|x|`, `max|x|` and, for scaled
    /// threshold kinds, the mean of `|x|` over values above the threshold (`above_mean`, 0 when
    /// none is above). `aux` is the threshold `D` for threshold kinds, the clamped absmax `m`
    /// for integer kinds, the reciprocal scale `m` for [`Kind::AbsmeanHf`], 0 otherwise.
    /// [`Kind::BinaryCentered`] needs the signed mean too: use [`Kind::params_with_mean`] (here
    /// its center is 0).
    pub fn params(&self, mean_abs: f32, max_abs: f32, above_mean: f32) -> (f32, f32) {
        self.params_with_mean(mean_abs, max_abs, above_mean, 0.0)
    }

    /// [`Kind::params`] with the block's signed `mean(x)`, the center (`aux`) of
    /// [`Kind::BinaryCentered`]; the other kinds ignore it.
    pub fn params_with_mean(
        &self,
        mean_abs: f32,
        max_abs: f32,
        above_mean: f32,
        mean: f32,
    ) -> (f32, f32) {
        match *self {
            Kind::Binary { scaled: true } => (mean_abs, 0.0),
            Kind::BinaryCentered => (mean_abs, mean),
            Kind::Binary { scaled: false } => (1.0, 0.0),
            Kind::Absmean => (mean_abs, 0.0),
            Kind::AbsmeanHf => {
                let m = 1.0 / mean_abs.max(EPS);
                (1.0 / m, m)
            }
            Kind::Threshold { scaled, .. } => {
                let s = if scaled { above_mean } else { 1.0 };
                (s, self.threshold(mean_abs))
            }
            Kind::Int { qmax } => {
                let m = max_abs.max(EPS);
                (m / qmax, m)
            }
        }
    }

    /// The quantized value of `x` in a block with parameters `(s, aux)`.
    #[inline(always)]
    pub fn quantize(&self, x: f32, s: f32, aux: f32) -> f32 {
        match *self {
            Kind::Binary { .. } => {
                if x >= 0.0 {
                    s
                } else {
                    -s
                }
            }
            // `x >= c` rather than `x - c >= 0`: the same in IEEE arithmetic, and still right on
            // a GPU that flushes a subnormal difference to zero.
            Kind::BinaryCentered => {
                if x >= aux {
                    s
                } else {
                    -s
                }
            }
            Kind::Absmean => s * round_clamped(x / (s + EPS), -1.0, 1.0),
            // A level of +-1 times s is exactly transformers' +-1 / m: s = 1 / m.
            Kind::AbsmeanHf => s * round_clamped(x * aux, -1.0, 1.0),
            Kind::Threshold { .. } => {
                if x > aux {
                    s
                } else if x < -aux {
                    -s
                } else {
                    0.0
                }
            }
            Kind::Int { qmax } => {
                let inv = qmax / aux;
                round_clamped(x * inv, -qmax - 1.0, qmax) / inv
            }
        }
    }

    /// The integer level of `x` (the value before the scale multiplies it).
    #[inline(always)]
    pub fn level(&self, x: f32, s: f32, aux: f32) -> i32 {
        match *self {
            Kind::Binary { .. } => {
                if x >= 0.0 {
                    1
                } else {
                    -1
                }
            }
            Kind::BinaryCentered => {
                if x >= aux {
                    1
                } else {
                    -1
                }
            }
            Kind::Absmean => round_clamped(x / (s + EPS), -1.0, 1.0) as i32,
            Kind::AbsmeanHf => round_clamped(x * aux, -1.0, 1.0) as i32,
            Kind::Threshold { .. } => {
                if x > aux {
                    1
                } else if x < -aux {
                    -1
                } else {
                    0
                }
            }
            Kind::Int { qmax } => round_clamped(x * (qmax / aux), -qmax - 1.0, qmax) as i32,
        }
    }

    /// The range `n` that normalises `x` for the estimators (`r = x / n`); never 0.
    #[inline(always)]
    pub fn normalizer(&self, s: f32, aux: f32) -> f32 {
        let n = match *self {
            Kind::Binary { .. }
            | Kind::BinaryCentered
            | Kind::Threshold { .. }
            | Kind::AbsmeanHf => s,
            Kind::Absmean => s + EPS,
            Kind::Int { .. } => aux,
        };
        // A zero scale only happens when every value of the block is 0, where r = 0 either way.
        if n > 0.0 {
            n
        } else {
            1.0
        }
    }

    /// The point the estimators measure `x` from (`r = (x - center) / n`): the block's mean for
    /// [`Kind::BinaryCentered`], whose threshold it is, 0 for every other kind.
    #[inline(always)]
    pub fn center(&self, aux: f32) -> f32 {
        match *self {
            Kind::BinaryCentered => aux,
            _ => 0.0,
        }
    }

    /// A stable integer code for device kernels: (code, fixed threshold or 0, qmax or 0).
    pub fn device_code(&self) -> (u32, f32, f32) {
        match *self {
            Kind::Binary { scaled } => (scaled as u32, 0.0, 0.0),
            Kind::Absmean => (2, 0.0, 0.0),
            Kind::Threshold { fixed, scaled } => (
                3 + 2 * fixed.is_none() as u32 + scaled as u32,
                fixed.unwrap_or(0.0),
                0.0,
            ),
            Kind::Int { qmax } => (7, 0.0, qmax),
            Kind::BinaryCentered => (8, 0.0, 0.0),
            Kind::AbsmeanHf => (9, 0.0, 0.0),
        }
    }
}

/// An [`Estimator`] reduced to what a kernel needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EstKind {
    Identity,
    Clipped(f32),
    SoftTanh(f32),
    SoftSigmoid(f32),
    ApproxSign,
    SwishSign(f32),
    Ede(f32),
}

impl EstKind {
    /// The kernel view of an estimator.
    pub fn of(e: &Estimator) -> EstKind {
        match *e {
            Estimator::Identity => EstKind::Identity,
            Estimator::Clipped { clip } => EstKind::Clipped(clip),
            Estimator::SoftTanh { temperature } => EstKind::SoftTanh(temperature),
            Estimator::SoftSigmoid { temperature } => EstKind::SoftSigmoid(temperature),
            Estimator::ApproxSign => EstKind::ApproxSign,
            Estimator::SwishSign { beta } => EstKind::SwishSign(beta),
            Estimator::Ede { temperature } => EstKind::Ede(temperature),
        }
    }

    /// The local derivative `dq/dx` at the normalised input `r` (multiply by the upstream `u`).
    #[inline(always)]
    pub fn derivative(&self, r: f32) -> f32 {
        match *self {
            EstKind::Identity => 1.0,
            EstKind::Clipped(c) => {
                if r.abs() <= c {
                    1.0
                } else {
                    0.0
                }
            }
            EstKind::SoftTanh(t) => {
                let th = (t * r).tanh();
                t * (1.0 - th * th)
            }
            EstKind::SoftSigmoid(t) => {
                let sg = 1.0 / (1.0 + (-t * r).exp());
                2.0 * t * sg * (1.0 - sg)
            }
            EstKind::ApproxSign => {
                let a = r.abs();
                if a <= 1.0 {
                    2.0 - 2.0 * a
                } else {
                    0.0
                }
            }
            EstKind::SwishSign(b) => {
                let br = b * r;
                b * (2.0 - br * (br / 2.0).tanh()) / (1.0 + br.cosh())
            }
            EstKind::Ede(t) => {
                let th = (t * r).tanh();
                t.max(1.0) * (1.0 - th * th)
            }
        }
    }

    /// A stable integer code for device kernels: (code, parameter).
    pub fn device_code(&self) -> (u32, f32) {
        match *self {
            EstKind::Identity => (0, 0.0),
            EstKind::Clipped(c) => (1, c),
            EstKind::SoftTanh(t) => (2, t),
            EstKind::SoftSigmoid(t) => (3, t),
            EstKind::ApproxSign => (4, 0.0),
            EstKind::SwishSign(b) => (5, b),
            EstKind::Ede(t) => (6, t),
        }
    }
}

/// `clamp(round_ties_even(v), lo, hi)` for integer bounds with `|lo|, |hi| < 2^21`.
///
/// `f32::round_ties_even` is a library call on baseline x86-64 (no SSE4.1 `roundps`), which keeps
/// the quantize loops from vectorising; adding and subtracting `1.5 * 2^23` rounds to nearest
/// even in the default rounding mode with two vectorisable adds. Clamping to one step outside the
/// range first keeps `v` small enough for the trick and changes nothing after the final clamp.
#[inline(always)]
pub fn round_clamped(v: f32, lo: f32, hi: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    let v = v.clamp(lo - 1.0, hi + 1.0);
    ((v + MAGIC) - MAGIC).clamp(lo, hi)
}

/// The progressive blend `x + lambda (q - x)`; exactly `q` at `lambda = 1`.
#[inline(always)]
pub fn blend(x: f32, q: f32, lambda: f32) -> f32 {
    if lambda == 1.0 {
        q
    } else {
        x + lambda * (q - x)
    }
}

#[cfg(test)]
mod tests {
    use super::round_clamped;

    #[test]
    fn round_clamped_is_round_ties_even_then_clamp() {
        let mut v = -300.0f32;
        while v <= 300.0 {
            for (lo, hi) in [(-1.0, 1.0), (-128.0, 127.0), (-2.0, 1.0)] {
                for x in [v, v + 0.5, v - 1e-3, v + 1e-3] {
                    assert_eq!(
                        round_clamped(x, lo, hi),
                        x.round_ties_even().clamp(lo, hi),
                        "{x} in [{lo}, {hi}]"
                    );
                }
            }
            v += 0.25;
        }
        for x in [1e30f32, -1e30, f32::MAX, 0.5, -0.5, 1.5, 2.5, -2.5] {
            assert_eq!(
                round_clamped(x, -128.0, 127.0),
                x.round_ties_even().clamp(-128.0, 127.0)
            );
        }
        assert!(round_clamped(f32::NAN, -1.0, 1.0).is_nan());
    }
}
