//! Tests of `bitnet_training::optim`: agreement with candle-nn's AdamW, hand-computed updates,
//! routing, schedules and bit-exact state resume.

use bitnet_training::optim::schedule::{
    bitnet_two_stage_lr, bitnet_two_stage_wd, Constant, Schedule, Sequence, WarmupCosine,
    WarmupLinear,
};
use bitnet_training::optim::{
    Bop, CaseOptimizer, Cases, OptimizerState, ParamGroup, ParamsBop, ParamsQatAdamW, ParamsSgd,
    QatAdamW, Selector, Sgd, DEFAULT_PAR_THRESHOLD,
};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

/// A small deterministic generator (xorshift64*), so the tests need no RNG crate API.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Uniform in [-1, 1).
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40; // 24 bits
        x as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next_f32()).collect()
    }
}

fn var_from(data: &[f32], shape: &Shape, dtype: DType) -> Result<Var> {
    Var::from_tensor(&Tensor::from_slice(data, shape, &Device::Cpu)?.to_dtype(dtype)?)
}

/// Random gradient of `shape`; when `transposed`, a non-contiguous view (as candle hands the
/// gradient of a `Linear` weight over).
fn grad(rng: &mut Rng, shape: &Shape, transposed: bool, dtype: DType) -> Result<Tensor> {
    let dims = shape.dims();
    let t = if transposed && dims.len() == 2 {
        Tensor::from_vec(
            rng.vec(shape.elem_count()),
            (dims[1], dims[0]),
            &Device::Cpu,
        )?
        .t()?
    } else {
        Tensor::from_vec(rng.vec(shape.elem_count()), shape, &Device::Cpu)?
    };
    if transposed && dims.len() == 2 {
        assert!(!t.is_contiguous());
    }
    t.to_dtype(dtype)
}

fn values(v: &Var) -> Result<Vec<f32>> {
    v.as_tensor()
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()
}

fn bits(v: &Var) -> Result<Vec<u32>> {
    Ok(values(v)?.into_iter().map(f32::to_bits).collect())
}

#[test]
fn qat_adamw_equals_candle_nn_adamw_after_10_steps() -> Result<()> {
    let above = (DEFAULT_PAR_THRESHOLD / 200) + 1; // rows so that 200 * rows > threshold
                                                   // (shape, transposed gradient, dtype): below and above the parallel threshold, strided
                                                   // gradients, and the tensor-op fallback (f64).
    let cases: Vec<(Vec<usize>, bool, DType)> = vec![
        (vec![1], false, DType::F32),
        (vec![10], false, DType::F32),
        (vec![17, 13], false, DType::F32),
        (vec![17, 13], true, DType::F32),
        (vec![above, 200], false, DType::F32),
        (vec![above, 200], true, DType::F32),
        (vec![4, 3, 5], false, DType::F32),
        (vec![17, 13], true, DType::F64),
    ];
    for (ci, (dims, transposed, dtype)) in cases.into_iter().enumerate() {
        let shape = Shape::from(dims.clone());
        let mut rng = Rng::new(ci as u64 + 1);
        let init = rng.vec(shape.elem_count());
        let ours = var_from(&init, &shape, dtype)?;
        let theirs = var_from(&init, &shape, dtype)?;
        let params = ParamsAdamW {
            lr: 0.01,
            ..Default::default()
        };
        let mut a = QatAdamW::new(vec![ours.clone()], params.clone().into())?;
        let mut b = AdamW::new(vec![theirs.clone()], params)?;
        for _ in 0..10 {
            let g = grad(&mut rng, &shape, transposed, dtype)?;
            let (mut ga, mut gb) = (GradStore::default(), GradStore::default());
            ga.insert(ours.as_tensor(), g.clone());
            gb.insert(theirs.as_tensor(), g);
            a.step(&ga)?;
            b.step(&gb)?;
        }
        let (x, y) = (values(&ours)?, values(&theirs)?);
        let moved = x.iter().zip(&init).any(|(a, b)| (a - b).abs() > 1e-3);
        assert!(moved, "case {ci}: the parameters did not move");
        for (i, (p, q)) in x.iter().zip(&y).enumerate() {
            let tol = 1e-6 * q.abs().max(1.0);
            assert!(
                (p - q).abs() <= tol,
                "case {ci} {dims:?}: element {i}: ours {p}, candle-nn {q}"
            );
        }
    }
    Ok(())
}

#[test]
fn qat_adamw_first_step_by_hand() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        let theta = var_from(&[1.0, -2.0, 0.5], &Shape::from(3), dtype)?;
        let params = ParamsQatAdamW {
            lr: 0.1,
            weight_decay: 0.01,
            ..Default::default()
        };
        let mut opt = QatAdamW::new(vec![theta.clone()], params)?;
        let mut g = GradStore::default();
        g.insert(
            theta.as_tensor(),
            Tensor::new(&[0.5f32, -1.0, 0.0], &Device::Cpu)?.to_dtype(dtype)?,
        );
        opt.step(&g)?;
        // Step 1: m_hat = g, v_hat = g^2, so the step is lr * g / (|g| + eps) = lr * sign(g)
        // (0 where g = 0); decay factor 1 - 0.1 * 0.01 = 0.999.
        // 1 * 0.999 - 0.1 = 0.899; -2 * 0.999 + 0.1 = -1.898; 0.5 * 0.999 = 0.4995.
        let expected = [0.899f32, -1.898, 0.4995];
        for (got, want) in values(&theta)?.iter().zip(expected) {
            assert!(
                (got - want).abs() < 1e-6,
                "{dtype:?}: got {got}, want {want}"
            );
        }
    }
    Ok(())
}

#[test]
fn param_groups_use_their_own_lr_and_weight_decay() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        let a = var_from(&[2.0], &Shape::from(1), dtype)?;
        let b = var_from(&[2.0], &Shape::from(1), dtype)?;
        let params = ParamsQatAdamW {
            lr: 0.1,
            weight_decay: 0.1,
            ..Default::default()
        };
        let groups = vec![
            ParamGroup::new(vec![a.clone()]),
            ParamGroup::new(vec![b.clone()])
                .lr_scale(0.5)
                .no_weight_decay(),
        ];
        let mut opt = QatAdamW::with_groups(groups, params)?;
        let mut g = GradStore::default();
        g.insert(
            a.as_tensor(),
            Tensor::new(&[1.0f32], &Device::Cpu)?.to_dtype(dtype)?,
        );
        g.insert(
            b.as_tensor(),
            Tensor::new(&[-1.0f32], &Device::Cpu)?.to_dtype(dtype)?,
        );
        opt.step(&g)?;
        // a: lr 0.1, wd 0.1: 2 * (1 - 0.01) - 0.1 = 1.88.  b: lr 0.05, wd 0: 2 + 0.05 = 2.05.
        assert!(
            (values(&a)?[0] - 1.88).abs() < 1e-6,
            "{dtype:?}: a = {:?}",
            values(&a)?
        );
        assert!(
            (values(&b)?[0] - 2.05).abs() < 1e-6,
            "{dtype:?}: b = {:?}",
            values(&b)?
        );
    }
    Ok(())
}

#[test]
fn clipping_keeps_latent_weights_in_range() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        let w = var_from(&[0.95, -0.95, 0.3, 0.0], &Shape::from(4), dtype)?;
        let free = var_from(&[0.95], &Shape::from(1), dtype)?;
        let params = ParamsQatAdamW {
            lr: 0.1,
            weight_decay: 0.0,
            ..Default::default()
        };
        let groups = vec![
            ParamGroup::new(vec![w.clone()]).clip(1.0),
            ParamGroup::new(vec![free.clone()]),
        ];
        let mut opt = QatAdamW::with_groups(groups, params)?;
        for _ in 0..5 {
            let mut g = GradStore::default();
            g.insert(
                w.as_tensor(),
                Tensor::new(&[-1.0f32, 1.0, 0.0, -1.0], &Device::Cpu)?.to_dtype(dtype)?,
            );
            g.insert(
                free.as_tensor(),
                Tensor::new(&[-1.0f32], &Device::Cpu)?.to_dtype(dtype)?,
            );
            opt.step(&g)?;
            assert!(
                values(&w)?.iter().all(|x| (-1.0..=1.0).contains(x)),
                "{dtype:?}: {:?}",
                values(&w)?
            );
        }
        // 0.95 + 0.1 clips to 1 at once; -0.95 to -1; 0.3 stays; 0 climbs 0.1 per step to 0.5.
        let got = values(&w)?;
        let want = [1.0f32, -1.0, 0.3, 0.5];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{dtype:?}: {got:?}");
        }
        // The unclipped group goes past 1: 0.95 + 5 * 0.1.
        assert!((values(&free)?[0] - 1.45).abs() < 1e-5);
    }
    Ok(())
}

#[test]
fn vars_without_gradient_are_skipped() -> Result<()> {
    let a = var_from(&[1.0], &Shape::from(1), DType::F32)?;
    let b = var_from(&[1.0], &Shape::from(1), DType::F32)?;
    let mut opt = QatAdamW::new(vec![a.clone(), b.clone()], ParamsQatAdamW::default())?;
    let mut g = GradStore::default();
    g.insert(a.as_tensor(), Tensor::new(&[1.0f32], &Device::Cpu)?);
    opt.step(&g)?;
    assert_ne!(values(&a)?[0], 1.0);
    assert_eq!(values(&b)?[0], 1.0);
    Ok(())
}

#[test]
fn bop_flips_the_expected_signs() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        let w = var_from(&[1.0, 1.0, -1.0, -1.0, 1.0, 1.0], &Shape::from(6), dtype)?;
        let mut opt = Bop::new(
            vec![w.clone()],
            ParamsBop {
                gamma: 0.5,
                threshold: 0.1,
            },
        )?;
        let steps: [([f32; 6], [f32; 6]); 3] = [
            // step 1: m = 0.5 g = [0.5, -0.5, -0.5, 0.5, 0.15, 0.05];
            // w * m = [0.5, -0.5, 0.5, -0.5, 0.15, 0.05] > 0.1 at 0, 2, 4.
            (
                [1.0, -1.0, -1.0, 1.0, 0.3, 0.1],
                [-1.0, 1.0, 1.0, -1.0, -1.0, 1.0],
            ),
            // step 2: m = m + 0.5 (g - m) = [0.25, -0.25, -0.25, 0.25, 0.075, 0.075];
            // w * m = [-0.25, -0.25, -0.25, -0.25, -0.075, 0.075]: no flip.
            (
                [0.0, 0.0, 0.0, 0.0, 0.0, 0.1],
                [-1.0, 1.0, 1.0, -1.0, -1.0, 1.0],
            ),
            // step 3: m = [-0.875, -0.125, -0.125, 0.125, 0.0375, 0.1875];
            // w * m = [0.875, -0.125, -0.125, -0.125, -0.0375, 0.1875]: flips 0 and 5.
            (
                [-2.0, 0.0, 0.0, 0.0, 0.0, 0.3],
                [1.0, 1.0, 1.0, -1.0, -1.0, -1.0],
            ),
        ];
        for (k, (g, want)) in steps.iter().enumerate() {
            let mut gs = GradStore::default();
            gs.insert(
                w.as_tensor(),
                Tensor::new(g, &Device::Cpu)?.to_dtype(dtype)?,
            );
            opt.step(&gs)?;
            assert_eq!(values(&w)?, want.to_vec(), "{dtype:?} step {}", k + 1);
        }
    }
    Ok(())
}

#[test]
fn sgd_momentum_follows_the_pytorch_formula() -> Result<()> {
    // (params, initial p, gradients per step, expected p after the last step)
    type Case = (ParamsSgd, Vec<f32>, Vec<Vec<f32>>, Vec<f32>);
    let cases: Vec<Case> = vec![
        // b = mu b + g; p -= lr b. b1 = [1, 2], p = [0.9, -1.2]; b2 = [1.4, 0.8], p = [0.76, -1.28];
        // b3 = [1.26, 0.72], p = [0.634, -1.352].
        (
            ParamsSgd {
                lr: 0.1,
                momentum: 0.9,
                ..Default::default()
            },
            vec![1.0, -1.0],
            vec![vec![1.0, 2.0], vec![0.5, -1.0], vec![0.0, 0.0]],
            vec![0.634, -1.352],
        ),
        // Nesterov: b1 = 1, p = 1 - 0.1 (1 + 0.9) = 0.81; b2 = 1.9, p = 0.81 - 0.1 (1 + 1.71) = 0.539.
        (
            ParamsSgd {
                lr: 0.1,
                momentum: 0.9,
                nesterov: true,
                ..Default::default()
            },
            vec![1.0],
            vec![vec![1.0], vec![1.0]],
            vec![0.539],
        ),
        // Weight decay, no momentum: g' = 0.5 p: p = 2 - 0.1; p = 1.9 - 0.095 = 1.805.
        (
            ParamsSgd {
                lr: 0.1,
                weight_decay: 0.5,
                ..Default::default()
            },
            vec![2.0],
            vec![vec![0.0], vec![0.0]],
            vec![1.805],
        ),
    ];
    for dtype in [DType::F32, DType::F64] {
        for (ci, (params, p0, gs, want)) in cases.iter().enumerate() {
            let p = var_from(p0, &Shape::from(p0.len()), dtype)?;
            let mut opt = Sgd::new(vec![p.clone()], params.clone())?;
            for g in gs {
                let mut store = GradStore::default();
                store.insert(
                    p.as_tensor(),
                    Tensor::new(g.as_slice(), &Device::Cpu)?.to_dtype(dtype)?,
                );
                opt.step(&store)?;
            }
            for (got, w) in values(&p)?.iter().zip(want) {
                assert!(
                    (got - w).abs() < 1e-6,
                    "{dtype:?} case {ci}: got {got}, want {w}"
                );
            }
        }
    }
    Ok(())
}

fn two_vars() -> Result<Vec<Var>> {
    Ok(vec![
        Var::ones((2, 3), DType::F32, &Device::Cpu)?,
        Var::zeros(3, DType::F32, &Device::Cpu)?,
    ])
}

#[test]
fn case_optimizer_routing_errors() -> Result<()> {
    let adam = |vars| QatAdamW::new(vars, ParamsQatAdamW::default());
    let bop = |vars| Bop::new(vars, ParamsBop::default());
    // Both predicates claim var #1 (shape [3]).
    let vars = two_vars()?;
    let cases = Cases::new()
        .case("bop", Selector::predicate(|_, _| true), bop)
        .case(
            "adam",
            Selector::predicate(|_, v: &Var| v.rank() == 1),
            adam,
        );
    let err = CaseOptimizer::new(vars, cases).unwrap_err().to_string();
    assert!(err.contains("parameter #1") && err.contains("[3]"), "{err}");
    assert!(
        err.contains("claimed by two cases, `bop` and `adam`"),
        "{err}"
    );

    // A var listed explicitly and matched by a predicate.
    let vars = two_vars()?;
    let cases = Cases::new()
        .case("bop", Selector::vars(vec![vars[0].clone()]), bop)
        .case("adam", Selector::predicate(|i, _| i == 0), adam);
    let err = CaseOptimizer::new(vars, cases).unwrap_err().to_string();
    assert!(
        err.contains("parameter #0") && err.contains("claimed by two cases"),
        "{err}"
    );

    // No Rest case: var #1 is claimed by none.
    let vars = two_vars()?;
    let cases = Cases::new().case("bop", Selector::predicate(|_, v: &Var| v.rank() == 2), bop);
    let err = CaseOptimizer::new(vars, cases).unwrap_err().to_string();
    assert!(
        err.contains("parameter #1") && err.contains("claimed by no case"),
        "{err}"
    );

    // A var given twice.
    let vars = two_vars()?;
    let dup = vec![vars[0].clone(), vars[0].clone()];
    let err = CaseOptimizer::new(dup, Cases::new().case("adam", Selector::Rest, adam))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("parameter #1") && err.contains("given twice"),
        "{err}"
    );

    // Routing works: the rank-2 var goes to Bop (flips), the other to AdamW.
    let vars = two_vars()?;
    let cases = Cases::new()
        .case(
            "bop",
            Selector::predicate(|_, v: &Var| v.rank() == 2),
            |vars| {
                Bop::new(
                    vars,
                    ParamsBop {
                        gamma: 1.0,
                        threshold: 0.0,
                    },
                )
            },
        )
        .case("adam", Selector::Rest, adam);
    let mut opt = CaseOptimizer::new(vars.clone(), cases)?;
    let loss = (vars[0].as_tensor().sum_all()? + vars[1].as_tensor().sum_all()?)?;
    opt.backward_step(&loss)?;
    assert_eq!(values(&vars[0])?, vec![-1.0; 6]); // m = g = 1, w * m = 1 > 0: all flip
    assert!(values(&vars[1])?.iter().all(|x| (x + 1e-3).abs() < 1e-6)); // AdamW: -lr
    assert!(opt.case_mut::<Bop>("adam").is_none());
    assert_eq!(
        opt.case_ref::<QatAdamW>("adam").map(|o| o.step_count()),
        Some(1)
    );
    Ok(())
}

#[test]
fn schedules_at_hand_picked_steps() -> Result<()> {
    let cosine = WarmupCosine::new(1.0, 10, 110, 0.1)?;
    let linear = WarmupLinear::new(2.0, 4, 24, 0.0)?;
    let lr = bitnet_two_stage_lr(1.5, 10, 100)?;
    let wd = bitnet_two_stage_wd(0.1, 100)?;
    let seq = Sequence::new(Constant::new(3.0)?, 2, &linear);
    let table: Vec<(&str, &dyn Schedule, usize, f64)> = vec![
        ("cosine", &cosine, 0, 0.0),
        ("cosine", &cosine, 5, 0.5),
        ("cosine", &cosine, 10, 1.0),
        // p = 0.25: 0.1 + 0.9 * (1 + cos(pi/4)) / 2 = 0.1 + 0.45 * 1.7071067811865475
        ("cosine", &cosine, 35, 0.868_198_051_533_946_4),
        ("cosine", &cosine, 60, 0.55),
        ("cosine", &cosine, 110, 0.1),
        ("cosine", &cosine, 1000, 0.1),
        ("linear", &linear, 2, 1.0),
        ("linear", &linear, 4, 2.0),
        ("linear", &linear, 14, 1.0),
        ("linear", &linear, 24, 0.0),
        // two-stage: warmup to 1.5 over 10 steps, linear to 0 at 50; restart at 1.0, to 0 at 100.
        ("bitnet lr", &lr, 5, 0.75),
        ("bitnet lr", &lr, 10, 1.5),
        ("bitnet lr", &lr, 30, 0.75),
        ("bitnet lr", &lr, 49, 0.0375),
        ("bitnet lr", &lr, 50, 1.0),
        ("bitnet lr", &lr, 75, 0.5),
        ("bitnet lr", &lr, 100, 0.0),
        ("bitnet wd", &wd, 0, 0.1),
        ("bitnet wd", &wd, 49, 0.1),
        ("bitnet wd", &wd, 50, 0.0),
        ("sequence", &seq, 1, 3.0),
        ("sequence", &seq, 4, 1.0), // linear at step 2
    ];
    for (name, s, step, want) in table {
        let got = s.value(step);
        assert!(
            (got - want).abs() < 1e-12,
            "{name} at step {step}: got {got}, want {want}"
        );
    }
    Ok(())
}

#[test]
fn bad_configs_name_the_field() {
    let var = || Var::zeros(2, DType::F32, &Device::Cpu).unwrap();
    let table: Vec<(&str, Result<()>)> = vec![
        ("peak", WarmupCosine::new(-1.0, 0, 10, 0.0).map(drop)),
        (
            "warmup_steps",
            WarmupCosine::new(1.0, 20, 10, 0.0).map(drop),
        ),
        ("total_steps", WarmupLinear::new(1.0, 0, 0, 0.0).map(drop)),
        ("min_value", WarmupLinear::new(1.0, 0, 10, 2.0).map(drop)),
        ("value", Constant::new(f64::NAN).map(drop)),
        ("warmup_steps", bitnet_two_stage_lr(1.0, 60, 100).map(drop)),
        (
            "lr",
            QatAdamW::new(
                vec![var()],
                ParamsQatAdamW {
                    lr: -1.0,
                    ..Default::default()
                },
            )
            .map(drop),
        ),
        (
            "beta1",
            QatAdamW::new(
                vec![var()],
                ParamsQatAdamW {
                    beta1: 1.0,
                    ..Default::default()
                },
            )
            .map(drop),
        ),
        (
            "eps",
            QatAdamW::new(
                vec![var()],
                ParamsQatAdamW {
                    eps: 0.0,
                    ..Default::default()
                },
            )
            .map(drop),
        ),
        (
            "ParamGroup.lr_scale",
            QatAdamW::with_groups(
                vec![ParamGroup::new(vec![var()]).lr_scale(-1.0)],
                Default::default(),
            )
            .map(drop),
        ),
        (
            "ParamGroup.clip",
            QatAdamW::with_groups(
                vec![ParamGroup::new(vec![var()]).clip(0.0)],
                Default::default(),
            )
            .map(drop),
        ),
        (
            "nesterov",
            Sgd::new(
                vec![var()],
                ParamsSgd {
                    nesterov: true,
                    ..Default::default()
                },
            )
            .map(drop),
        ),
        (
            "gamma",
            Bop::new(
                vec![var()],
                ParamsBop {
                    gamma: 2.0,
                    ..Default::default()
                },
            )
            .map(drop),
        ),
    ];
    for (field, result) in table {
        let err = result.expect_err(field).to_string();
        assert!(
            err.contains(&format!("`{field}`")),
            "expected field {field}: {err}"
        );
        assert!(err.contains("allowed"), "{err}");
    }
    // Integer parameters are rejected, naming the parameter.
    let ints = Var::from_tensor(&Tensor::new(&[1u32, 2], &Device::Cpu).unwrap()).unwrap();
    let err = QatAdamW::new(vec![var(), ints], Default::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("parameter #1") && err.contains("U32"), "{err}");
    // A var in two groups.
    let v = var();
    let groups = vec![ParamGroup::new(vec![v.clone()]), ParamGroup::new(vec![v])];
    let err = QatAdamW::with_groups(groups, Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("parameter #1") && err.contains("listed twice"),
        "{err}"
    );
}

/// Runs `steps` steps of `opt` on `vars` with gradients drawn from `rng`.
fn run_steps(
    step: &mut dyn FnMut(&GradStore) -> Result<()>,
    vars: &[Var],
    rng: &mut Rng,
    steps: usize,
) -> Result<()> {
    for _ in 0..steps {
        let mut g = GradStore::default();
        for v in vars {
            g.insert(
                v.as_tensor(),
                Tensor::from_vec(rng.vec(v.elem_count()), v.shape(), &Device::Cpu)?,
            );
        }
        step(&g)?;
    }
    Ok(())
}

fn fresh_vars(seed: u64) -> Result<Vec<Var>> {
    let mut rng = Rng::new(seed);
    let big = DEFAULT_PAR_THRESHOLD + 100; // parallel path too
    [vec![big], vec![7, 5], vec![3]]
        .into_iter()
        .map(|d| {
            let shape = Shape::from(d);
            var_from(&rng.vec(shape.elem_count()), &shape, DType::F32)
        })
        .collect()
}

/// Builds an optimizer over the vars, as a stepping closure plus state export / import.
trait Harness {
    fn build(&self, vars: Vec<Var>) -> Result<Box<dyn Resumable>>;
}

trait Resumable {
    fn advance(&mut self, g: &GradStore) -> Result<()>;
    fn export(&self) -> Result<Vec<(String, Tensor)>>;
    fn import(&mut self, s: &[(String, Tensor)]) -> Result<()>;
}

impl<T: Optimizer + OptimizerState> Resumable for T {
    fn advance(&mut self, g: &GradStore) -> Result<()> {
        Optimizer::step(self, g)
    }
    fn export(&self) -> Result<Vec<(String, Tensor)>> {
        self.state()
    }
    fn import(&mut self, s: &[(String, Tensor)]) -> Result<()> {
        self.load_state(s)
    }
}

struct CaseResumable(CaseOptimizer);

impl Resumable for CaseResumable {
    fn advance(&mut self, g: &GradStore) -> Result<()> {
        self.0.step(g)
    }
    fn export(&self) -> Result<Vec<(String, Tensor)>> {
        self.0.state()
    }
    fn import(&mut self, s: &[(String, Tensor)]) -> Result<()> {
        self.0.load_state(s)
    }
}

impl<F: Fn(Vec<Var>) -> Result<Box<dyn Resumable>>> Harness for F {
    fn build(&self, vars: Vec<Var>) -> Result<Box<dyn Resumable>> {
        self(vars)
    }
}

#[test]
fn state_export_import_resumes_bit_identically() -> Result<()> {
    let adam = |vars: Vec<Var>| -> Result<Box<dyn Resumable>> {
        let groups = vec![
            ParamGroup::new(vars[..2].to_vec()).clip(0.9),
            ParamGroup::new(vars[2..].to_vec())
                .lr_scale(0.3)
                .no_weight_decay(),
        ];
        Ok(Box::new(QatAdamW::with_groups(
            groups,
            ParamsQatAdamW {
                lr: 0.01,
                ..Default::default()
            },
        )?))
    };
    let sgd = |vars: Vec<Var>| -> Result<Box<dyn Resumable>> {
        let p = ParamsSgd {
            lr: 0.01,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 1e-3,
        };
        Ok(Box::new(Sgd::new(vars, p)?))
    };
    let bop = |vars: Vec<Var>| -> Result<Box<dyn Resumable>> {
        Ok(Box::new(Bop::new(
            vars,
            ParamsBop {
                gamma: 0.3,
                threshold: 0.05,
            },
        )?))
    };
    let case = |vars: Vec<Var>| -> Result<Box<dyn Resumable>> {
        let cases = Cases::new()
            .case("bop", Selector::predicate(|i, _| i == 0), |v| {
                Bop::new(
                    v,
                    ParamsBop {
                        gamma: 0.3,
                        threshold: 0.05,
                    },
                )
            })
            .case("adam", Selector::Rest, |v| {
                QatAdamW::new(
                    v,
                    ParamsQatAdamW {
                        lr: 0.01,
                        ..Default::default()
                    },
                )
            });
        Ok(Box::new(CaseResumable(CaseOptimizer::new(vars, cases)?)))
    };
    let harnesses: Vec<(&str, &dyn Harness)> = vec![
        ("adamw", &adam),
        ("sgd", &sgd),
        ("bop", &bop),
        ("case", &case),
    ];
    let (n, m) = (4, 5);
    for (name, h) in harnesses {
        // Straight: N + M steps.
        let straight = fresh_vars(7)?;
        let mut rng = Rng::new(99);
        let mut opt = h.build(straight.clone())?;
        run_steps(&mut |g| opt.advance(g), &straight, &mut rng, n + m)?;

        // Interrupted: N steps, export, a new optimizer, import, M steps.
        let resumed = fresh_vars(7)?;
        let mut rng = Rng::new(99);
        let mut first = h.build(resumed.clone())?;
        run_steps(&mut |g| first.advance(g), &resumed, &mut rng, n)?;
        let state = first.export()?;
        drop(first);
        let mut second = h.build(resumed.clone())?;
        second.import(&state)?;
        run_steps(&mut |g| second.advance(g), &resumed, &mut rng, m)?;
        for (a, b) in straight.iter().zip(&resumed) {
            assert_eq!(bits(a)?, bits(b)?, "{name}: resumed run differs");
        }

        // Without the import the result differs: the state matters.
        let cold = fresh_vars(7)?;
        let mut rng = Rng::new(99);
        let mut first = h.build(cold.clone())?;
        run_steps(&mut |g| first.advance(g), &cold, &mut rng, n)?;
        let mut second = h.build(cold.clone())?;
        run_steps(&mut |g| second.advance(g), &cold, &mut rng, m)?;
        let same = straight
            .iter()
            .zip(&cold)
            .all(|(a, b)| bits(a).unwrap() == bits(b).unwrap());
        assert!(
            !same,
            "{name}: a fresh optimizer gave the same result, the test proves nothing"
        );

        // Bad states: an entry missing, an unknown one, a wrong shape.
        let mut opt = h.build(fresh_vars(7)?)?;
        let mut missing = state.clone();
        let dropped = missing.pop().unwrap().0;
        let err = opt.import(&missing).unwrap_err().to_string();
        let short = dropped.rsplit('/').next().unwrap();
        assert!(
            err.contains(short) && err.contains("missing"),
            "{name}: {err}"
        );
        let mut unknown = state.clone();
        unknown.push(("bogus".to_string(), Tensor::new(0f32, &Device::Cpu)?));
        let err = opt.import(&unknown).unwrap_err().to_string();
        assert!(err.contains("bogus"), "{name}: {err}");
        let mut misshaped = state.clone();
        let last = misshaped.len() - 1;
        misshaped[last].1 = Tensor::zeros(5, DType::F32, &Device::Cpu)?;
        let err = opt.import(&misshaped).unwrap_err().to_string();
        assert!(err.contains("shape"), "{name}: {err}");
    }
    Ok(())
}
