//! `sharded_backward`: the shards' summed gradients are the whole batch's, for every shard count,
//! on a ternary QAT model with int8 activations and cross-entropy.

use bitnet_training::data_parallel::sharded_backward;
use bitnet_training::{QATConfig, QATLayer};
use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::{loss, VarBuilder, VarMap};

struct Mlp(QATLayer, QATLayer);

impl Mlp {
    fn new(cfg: QATConfig) -> (VarMap, Mlp) {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let a = QATLayer::bitlinear(20, 16, cfg, vb.pp("fc1")).unwrap();
        let b = QATLayer::bitlinear(16, 5, cfg, vb.pp("fc2")).unwrap();
        bitnet_training::init::reseed(&vm, 11).unwrap();
        (vm, Mlp(a, b))
    }

    fn loss(&self, b: &[Tensor]) -> Result<Tensor> {
        let h = self.0.forward(&b[0])?.relu()?;
        loss::cross_entropy(&self.1.forward(&h)?, &b[1])
    }
}

fn batch(rows: usize) -> (Tensor, Tensor) {
    let x = Tensor::randn(0f32, 1.0, (rows, 20), &Device::Cpu).unwrap();
    let y: Vec<u32> = (0..rows as u32).map(|i| (i * 7) % 5).collect();
    (x, Tensor::new(y, &Device::Cpu).unwrap())
}

fn vars(vm: &VarMap) -> Vec<(String, Var)> {
    let mut v: Vec<_> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn weights_only(mut cfg: QATConfig) -> QATConfig {
    cfg.activation = None;
    cfg
}

fn assert_close(what: &str, g: &Tensor, want: &Tensor, rel: f32) {
    let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let max = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(max > 0.0, "{what}: zero gradient");
    if let Some(i) = g
        .iter()
        .zip(&want)
        .position(|(a, b)| (a - b).abs() > rel * max)
    {
        panic!("{what}[{i}]: {} vs {}", g[i], want[i]);
    }
}

/// Without activation quantization the model is a smooth function of each row, so the shards'
/// gradients must add up to the whole batch's, whatever the shard sizes (37 rows: most counts
/// leave unequal shards, which only the per-row weighting gets right).
#[test]
fn shards_sum_to_the_whole_batch_gradient() {
    let rows = 37;
    for (name, cfg) in [
        ("fp", QATConfig::full_precision()),
        ("ternary weights", weights_only(QATConfig::ternary())),
        ("binary weights", weights_only(QATConfig::binary())),
    ] {
        let (vm, model) = Mlp::new(cfg);
        let (x, y) = batch(rows);
        let whole = model.loss(&[x.clone(), y.clone()]).unwrap();
        let want = whole.backward().unwrap();
        let want_loss = whole.to_scalar::<f32>().unwrap();
        for shards in [1usize, 2, 3, 4, 7, 36, 37, 500] {
            let (loss, grads) = sharded_backward(&[&x, &y], shards, |b| model.loss(b)).unwrap();
            let l = loss.to_scalar::<f32>().unwrap();
            assert!(
                (l - want_loss).abs() <= 1e-6 * want_loss.abs(),
                "{name} shards={shards}: loss {l} vs {want_loss}"
            );
            for (k, v) in vars(&vm) {
                let what = format!("{name} shards={shards} {k}");
                match (grads.get(v.as_tensor()), want.get(v.as_tensor())) {
                    (Some(g), Some(w)) => assert_close(&what, g, w, 1e-5),
                    (g, w) => assert_eq!(g.is_some(), w.is_some(), "{what}"),
                }
            }
        }
    }
}

/// With int8 activations a last-bit difference in a GEMM (a shard and the whole batch are
/// blocked differently) can move a value across the next quantizer's rounding boundary, a
/// whole step, as any change of batch composition can. So the reference here is the shards
/// run one by one: their row-weighted gradients, added in order.
#[test]
fn quantized_activations_match_the_shards_run_one_by_one() {
    let rows = 37;
    for (name, cfg) in [
        ("ternary", QATConfig::ternary()),
        ("binary", QATConfig::binary()),
    ] {
        let (vm, model) = Mlp::new(cfg);
        let (x, y) = batch(rows);
        for (shards, sizes) in [
            (2, vec![19, 18]),
            (3, vec![13, 12, 12]),
            (5, vec![8, 8, 7, 7, 7]),
        ] {
            let (loss, grads) = sharded_backward(&[&x, &y], shards, |b| model.loss(b)).unwrap();
            let mut start = 0;
            let mut want_loss = 0f32;
            let mut want: Vec<Option<Tensor>> = vec![None; vars(&vm).len()];
            for len in sizes {
                let b = [
                    x.narrow(0, start, len).unwrap(),
                    y.narrow(0, start, len).unwrap(),
                ];
                let l = (model.loss(&b).unwrap() * (len as f64 / rows as f64)).unwrap();
                want_loss += l.to_scalar::<f32>().unwrap();
                let g = l.backward().unwrap();
                for (slot, (_, v)) in want.iter_mut().zip(vars(&vm)) {
                    let gi = g.get(v.as_tensor()).unwrap().clone();
                    *slot = Some(match slot.take() {
                        Some(acc) => (acc + gi).unwrap(),
                        None => gi,
                    });
                }
                start += len;
            }
            assert_eq!(start, rows);
            let l = loss.to_scalar::<f32>().unwrap();
            assert!(
                (l - want_loss).abs() <= 1e-6 * want_loss.abs(),
                "{name}: {l} vs {want_loss}"
            );
            for ((k, v), w) in vars(&vm).into_iter().zip(&want) {
                let g = grads.get(v.as_tensor()).unwrap();
                assert_close(
                    &format!("{name} shards={shards} {k}"),
                    g,
                    w.as_ref().unwrap(),
                    1e-6,
                );
            }
        }
    }
}

#[test]
fn shard_results_do_not_depend_on_the_thread_count() {
    let (vm, model) = Mlp::new(QATConfig::ternary());
    let (x, y) = batch(64);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let (_, g) = sharded_backward(&[&x, &y], 4, |b| model.loss(b)).unwrap();
            vars(&vm)
                .iter()
                .map(|(_, v)| g.get(v.as_tensor()).unwrap().flatten_all().unwrap())
                .map(|t| t.to_vec1::<f32>().unwrap())
                .collect::<Vec<_>>()
        })
    };
    assert_eq!(run(1), run(3));
}

#[test]
fn bad_batches_are_rejected_with_the_field_named() {
    let (_, model) = Mlp::new(QATConfig::ternary());
    let (x, y) = batch(8);
    let short = y.narrow(0, 0, 5).unwrap();
    let empty = x.narrow(0, 0, 0).unwrap();
    let cases: [(&[&Tensor], usize, &str); 4] = [
        (&[&x, &y], 0, "`shards` = 0"),
        (&[], 2, "`batch`"),
        (&[&x, &short], 2, "same, non-zero first dimension"),
        (&[&empty], 2, "same, non-zero first dimension"),
    ];
    for (b, shards, want) in cases {
        let e = sharded_backward(b, shards, |b| model.loss(b))
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
    for shards in [1, 2] {
        let per_row = |b: &[Tensor]| model.0.forward(&b[0])?.sqr()?.sum(1);
        let e = sharded_backward(&[&x], shards, per_row)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`loss`") && e.contains("one value"), "{e}");
    }
}
