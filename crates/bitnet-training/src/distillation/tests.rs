use super::*;
use crate::init::reseed;
use crate::{QATConfig, QATLayer};
use candle_core::{DType, Device, Var};
use candle_nn::{linear, Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::io::Read;

/// softmax([0, ln(3) / T]) = [1, 3^(1/T)] / (1 + 3^(1/T)), written from the definition.
fn p_student(t: f64) -> [f64; 2] {
    let e = 3f64.powf(1.0 / t);
    [1.0 / (1.0 + e), e / (1.0 + e)]
}

#[test]
fn kd_loss_and_its_gradient_by_hand() {
    let dev = Device::Cpu;
    let s = Var::new(&[[0f32, 3f32.ln()]], &dev).unwrap();
    let t = Tensor::new(&[[0f32, 0.0]], &dev).unwrap(); // teacher softmax [1/2, 1/2] at any T
    let y = Tensor::new(&[1u32], &dev).unwrap();
    let ce = -(0.75f64.ln());
    let kl = |temp: f64| {
        let p = p_student(temp);
        0.5 * (0.5 / p[0]).ln() + 0.5 * (0.5 / p[1]).ln()
    };
    for (temp, alpha) in [(1.0, 0.0), (1.0, 1.0), (2.0, 0.5), (4.0, 0.9), (0.5, 0.3)] {
        let loss = kd_loss(s.as_tensor(), &t, temp, alpha, &y).unwrap();
        let want = (1.0 - alpha) * ce + alpha * temp * temp * kl(temp);
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (got - want).abs() < 1e-5,
            "T {temp} a {alpha}: {got} vs {want}"
        );
        // d/ds: (1 - a) (softmax(s) - onehot(y)) + a T (softmax(s / T) - softmax(t / T)).
        let g = loss
            .backward()
            .unwrap()
            .get(&s)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let (p1, pt) = (p_student(1.0), p_student(temp));
        let want_g = [
            (1.0 - alpha) * p1[0] + alpha * temp * (pt[0] - 0.5),
            (1.0 - alpha) * (p1[1] - 1.0) + alpha * temp * (pt[1] - 0.5),
        ];
        for k in 0..2 {
            assert!(
                (g[0][k] as f64 - want_g[k]).abs() < 1e-5,
                "T {temp} a {alpha} grad {k}: {g:?} vs {want_g:?}"
            );
        }
    }
    // KL of identical distributions is 0; bad hyper-parameters are named.
    assert!(
        kl_divergence(&t, &t, 3.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .abs()
            < 1e-7
    );
    let cases = [
        (0.0, 0.5, "temperature"),
        (1.0, 1.5, "alpha"),
        (f64::NAN, 0.5, "temperature"),
    ];
    for (temp, alpha, field) in cases {
        let e = kd_loss(s.as_tensor(), &t, temp, alpha, &y)
            .unwrap_err()
            .to_string();
        assert!(e.contains(field), "{e}");
    }
    assert!(kd_loss(
        s.as_tensor(),
        &Tensor::zeros((1, 3), DType::F32, &dev).unwrap(),
        1.0,
        0.5,
        &y
    )
    .is_err());
}

#[test]
fn feature_loss_by_hand_and_teacher_gets_no_gradient() {
    let dev = Device::Cpu;
    let s = Var::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap();
    let t = Var::new(&[[0f32, 0.0], [3.0, 6.0]], &dev).unwrap();
    let l = feature_loss(s.as_tensor(), t.as_tensor()).unwrap();
    assert_eq!(l.to_scalar::<f32>().unwrap(), (1.0 + 4.0 + 0.0 + 4.0) / 4.0);
    let g = l.backward().unwrap();
    // d/ds mean((s - t)^2) = 2 (s - t) / 4; the teacher var gets nothing.
    assert_eq!(
        g.get(&s).unwrap().to_vec2::<f32>().unwrap(),
        [[0.5, 1.0], [0.0, -1.0]]
    );
    assert!(g.get(&t).is_none());

    let (tvm, svm) = (VarMap::new(), VarMap::new());
    let teacher = linear(4, 3, VarBuilder::from_varmap(&tvm, DType::F32, &dev)).unwrap();
    let student = QATLayer::bitlinear(
        4,
        3,
        QATConfig::ternary(),
        VarBuilder::from_varmap(&svm, DType::F32, &dev).pp("s"),
    )
    .unwrap();
    let d = Distiller::new(teacher, 3.0, 0.7).unwrap();
    let x = Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap();
    let y = Tensor::new(&[0u32, 1, 2, 1, 0], &dev).unwrap();
    let grads = d
        .loss(&x, &student.forward(&x).unwrap(), &y)
        .unwrap()
        .backward()
        .unwrap();
    assert!(tvm.all_vars().iter().all(|v| grads.get(v).is_none()));
    assert!(svm.all_vars().iter().any(|v| grads.get(v).is_some()));
}

/// scikit-learn's 8x8 digits (BSD-3-Clause, see data/digits/digits.rst): pixels / 16 and labels.
fn digits() -> (Vec<f32>, Vec<u32>) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../data/digits/digits.csv.gz"
    );
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for line in text.lines().filter(|l| !l.is_empty()) {
        let v: Vec<f32> = line.split(',').map(|f| f.trim().parse().unwrap()).collect();
        assert_eq!(v.len(), 65);
        x.extend(v[..64].iter().map(|p| p / 16.0));
        y.push(v[64] as u32);
    }
    (x, y)
}

struct Data {
    x: Tensor,
    y: Tensor,
}

fn split(x: &[f32], y: &[u32], range: std::ops::Range<usize>) -> Data {
    let n = range.len();
    Data {
        x: Tensor::from_slice(&x[range.start * 64..range.end * 64], (n, 64), &Device::Cpu).unwrap(),
        y: Tensor::from_slice(&y[range], n, &Device::Cpu).unwrap(),
    }
}

/// Minibatch index lists for `epochs` epochs, shuffled from `seed`.
fn batches(n: usize, batch: usize, epochs: usize, seed: u64) -> Vec<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    for _ in 0..epochs {
        let mut idx: Vec<u32> = (0..n as u32).collect();
        idx.shuffle(&mut rng);
        out.extend(
            idx.chunks(batch)
                .map(|c| Tensor::new(c, &Device::Cpu).unwrap()),
        );
    }
    out
}

fn accuracy(model: &dyn Module, d: &Data) -> f64 {
    let pred = model
        .forward(&d.x)
        .unwrap()
        .argmax(1)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    let y = d.y.to_vec1::<u32>().unwrap();
    pred.iter().zip(&y).filter(|(a, b)| a == b).count() as f64 / y.len() as f64
}

struct Mlp2<L> {
    a: L,
    b: L,
}

impl<L: Module> Module for Mlp2<L> {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.b.forward(&self.a.forward(x)?.relu()?)
    }
}

fn train(
    model: &dyn Module,
    vm: &VarMap,
    d: &Data,
    lr: f64,
    epochs: usize,
    seed: u64,
    kd: Option<&Distiller<Mlp2<Linear>>>,
) {
    let params = ParamsAdamW {
        lr,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = candle_nn::AdamW::new(vm.all_vars(), params).unwrap();
    for idx in batches(d.y.dim(0).unwrap(), 32, epochs, seed) {
        let (x, y) = (
            d.x.index_select(&idx, 0).unwrap(),
            d.y.index_select(&idx, 0).unwrap(),
        );
        let logits = model.forward(&x).unwrap();
        let loss = match kd {
            Some(kd) => kd.loss(&x, &logits, &y).unwrap(),
            None => candle_nn::loss::cross_entropy(&logits, &y).unwrap(),
        };
        opt.backward_step(&loss).unwrap();
    }
}

/// A ternary student (64-16-10, BitNet b1.58 layers) trained on few labelled digits, with and
/// without a full-precision teacher (64-128-10) trained on more: distillation must raise the
/// student's test accuracy, on average over three seeds.
#[test]
fn distillation_improves_a_ternary_student_on_digits() {
    let (x, y) = digits();
    let (teacher_set, student_set, test) = (
        split(&x, &y, 0..1200),
        split(&x, &y, 0..300),
        split(&x, &y, 1200..1797),
    );
    let dev = Device::Cpu;
    let tvm = VarMap::new();
    let tvb = VarBuilder::from_varmap(&tvm, DType::F32, &dev);
    let teacher = Mlp2 {
        a: linear(64, 128, tvb.pp("t1")).unwrap(),
        b: linear(128, 10, tvb.pp("t2")).unwrap(),
    };
    reseed(&tvm, 1).unwrap();
    train(&teacher, &tvm, &teacher_set, 3e-3, 30, 1, None);
    let teacher_acc = accuracy(&teacher, &test);
    let distiller = Distiller::new(teacher, 4.0, 0.7).unwrap();

    let student = |seed: u64| {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let m = Mlp2 {
            a: QATLayer::bitlinear(64, 16, QATConfig::ternary(), vb.pp("s1")).unwrap(),
            b: QATLayer::bitlinear(16, 10, QATConfig::ternary(), vb.pp("s2")).unwrap(),
        };
        reseed(&vm, seed).unwrap();
        (m, vm)
    };
    let (mut plain, mut kd) = (Vec::new(), Vec::new());
    for seed in [10, 11, 12] {
        let (m, vm) = student(seed);
        train(&m, &vm, &student_set, 5e-3, 40, seed, None);
        plain.push(accuracy(&m, &test));
        let (m, vm) = student(seed);
        train(&m, &vm, &student_set, 5e-3, 40, seed, Some(&distiller));
        kd.push(accuracy(&m, &test));
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!(
        "teacher {teacher_acc:.4} plain {plain:?} kd {kd:?} mean plain {:.4} kd {:.4}",
        mean(&plain),
        mean(&kd)
    );
    assert!(teacher_acc > 0.85, "teacher {teacher_acc}");
    assert!(
        mean(&kd) > mean(&plain) + 0.01,
        "kd {kd:?} vs plain {plain:?}"
    );
}

#[test]
fn relation_loss_by_hand() {
    let dev = Device::Cpu;
    let t = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [1.0, 1.0]], &dev).unwrap();
    let s = Tensor::new(&[[1f32, 0.0], [1.0, 0.0], [1.0, 1.0]], &dev).unwrap();
    // Teacher, rows 0 and 1: similarities 0 and 1 to the other two, so p = softmax(0, 1); row 2:
    // 1 and 1. Student: every row sees 1 and 1, so q = (1/2, 1/2). Row 2 agrees; rows 0 and 1
    // each contribute sum p ln(p / q).
    let p0 = 1.0 / (1.0 + 1f64.exp());
    let p1 = 1.0 - p0;
    let want = 2.0 / 3.0 * (p0 * (2.0 * p0).ln() + p1 * (2.0 * p1).ln());
    let got = relation_loss(&s, &t, 1.0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    // Temperature 0.5 doubles the logits: (0, 2) for the teacher's rows 0 and 1.
    let p0 = 1.0 / (1.0 + 2f64.exp());
    let p1 = 1.0 - p0;
    let want = 2.0 / 3.0 * (p0 * (2.0 * p0).ln() + p1 * (2.0 * p1).ln());
    let got = relation_loss(&s, &t, 0.5)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    assert!(
        relation_loss(&t, &t, 0.05)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .abs()
            < 1e-6
    );
    // One row, or mismatched shapes: an error, not a NaN.
    assert!(relation_loss(
        &s.narrow(0, 0, 1).unwrap(),
        &t.narrow(0, 0, 1).unwrap(),
        1.0
    )
    .is_err());
    assert!(relation_loss(&s, &t.narrow(0, 0, 2).unwrap(), 1.0).is_err());
    assert!(relation_loss(&s, &t, 0.0).is_err());
}

#[test]
fn relation_loss_gradient_matches_finite_differences_and_spares_the_teacher() {
    let dev = Device::Cpu;
    let s = Var::randn(0f64, 1.0, (4, 3), &dev).unwrap();
    let t = Var::randn(0f64, 1.0, (4, 3), &dev).unwrap();
    let f = |x: &Tensor| {
        relation_loss(x, t.as_tensor(), 0.7)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let g = relation_loss(s.as_tensor(), t.as_tensor(), 0.7)
        .unwrap()
        .backward()
        .unwrap();
    assert!(g.get(&t).is_none());
    let analytic = g
        .get(&s)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let base = s
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let h = 1e-5;
    for (i, &a) in analytic.iter().enumerate() {
        let shifted = |d: f64| {
            let mut v = base.clone();
            v[i] += d;
            Tensor::from_vec(v, (4, 3), &dev).unwrap()
        };
        let fd = (f(&shifted(h)) - f(&shifted(-h))) / (2.0 * h);
        assert!(
            (a - fd).abs() < 1e-6 * (1.0 + fd.abs()),
            "entry {i}: {a} vs {fd}"
        );
    }
}

#[test]
fn neighbour_agreement_counts_rows_whose_teacher_neighbour_the_student_ranks_within_k() {
    let dev = Device::Cpu;
    // Teacher: two pairs of near-duplicates (0-1, 2-3) and a loner (4) closest to 3.
    let teacher = Tensor::new(
        &[
            [1f32, 0.0, 0.0],
            [0.95, 0.31, 0.0],
            [0.0, 1.0, 0.0],
            [0.0, 0.95, 0.31],
            [0.0, 0.6, 0.8],
        ],
        &dev,
    )
    .unwrap();
    // Student: row 0 moves next to 4; the rest stay.
    let mut rows = teacher.to_vec2::<f32>().unwrap();
    rows[0] = vec![0.0, 0.55, 0.84];
    let student = Tensor::new(rows, &dev).unwrap();
    // Where the student ranks each row's teacher neighbour: row 0's (1) and row 1's (0) 4th,
    // row 4's (3) 2nd after 0, rows 2 and 3 each other's 1st.
    let cases = [
        (&teacher, 1, 1.0),
        (&student, 1, 2.0 / 5.0),
        (&student, 2, 3.0 / 5.0),
        (&student, 3, 3.0 / 5.0),
        (&student, 4, 1.0),
    ];
    for (s, k, want) in cases {
        let got = neighbour_agreement(s, &teacher, k).unwrap();
        assert!((got - want).abs() < 1e-12, "k {k}: {got} vs {want}");
    }
    for (k, s) in [(0, &teacher), (5, &teacher)] {
        let e = neighbour_agreement(s, &teacher, k).unwrap_err().to_string();
        assert!(e.contains("`k`"), "{e}");
    }
    let short = teacher.narrow(0, 0, 4).unwrap();
    let e = neighbour_agreement(&short, &teacher, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("neighbour_agreement"), "{e}");
}
