//! Which precision each encoder linear gets: a policy file, one the sensitivity analysis
//! proposes (within a bits budget, or the k most sensitive layers), or k random layers of the
//! same sizes as the k most sensitive (the baseline the ranking must beat).

use crate::args::Args;
use crate::data::encode;
use bitnet::models::bert::{BertConfig, BertEncoder};
use bitnet::quant::{Granularity, Scheme};
use bitnet::training::convert::Converter;
use bitnet::training::policy::PrecisionPolicy;
use bitnet::training::sensitivity::{self, SensitivityReport};
use bitnet::training::QATConfig;
use candle_core::{Result, Tensor};
use candle_nn::VarMap;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use tokenizers::Tokenizer;

/// What the precision choice needs from the run.
pub struct Inputs<'a> {
    pub args: &'a Args,
    pub config: &'a BertConfig,
    pub tensors: &'a HashMap<String, Tensor>,
    pub tok: &'a Tokenizer,
    pub train: &'a [String],
    pub teacher: &'a BertEncoder,
}

/// The policy in use and how it was chosen.
pub struct Choice {
    /// Lambda constant 1; the run sets its warmup.
    pub policy: PrecisionPolicy,
    /// `default`, `file`, `auto`, `sensitive` or `random`.
    pub source: &'static str,
    /// The sensitivity analysis, when one ran.
    pub report: Option<SensitivityReport>,
}

/// `(name, weight count)` of every encoder linear, in the encoder's order: the rank-2
/// `encoder.layer.*.weight` tensors.
pub fn linear_sizes(tensors: &HashMap<String, Tensor>) -> Vec<(String, usize)> {
    let mut v: Vec<(String, usize)> = tensors
        .iter()
        .filter(|(k, t)| k.starts_with("encoder.layer.") && k.ends_with(".weight") && t.rank() == 2)
        .map(|(k, t)| (k.trim_end_matches(".weight").to_string(), t.elem_count()))
        .collect();
    // Layer index numerically, then name: encoder.layer.10 after encoder.layer.9.
    v.sort_by_key(|(k, _)| {
        let idx: usize = k
            .split('.')
            .nth(2)
            .and_then(|i| i.parse().ok())
            .unwrap_or(0);
        (idx, k.clone())
    });
    v
}

/// The policy `args` ask for, over ternary weights and int8 tokens (per-row scales with
/// `--per-channel`).
pub fn choose(inp: &Inputs) -> Result<Choice> {
    let a = inp.args;
    let mut base = QATConfig::ternary();
    if a.per_channel {
        base.weight_granularity = Granularity::PerChannel;
    }
    let wide = Scheme::MultiBit { bits: a.wide_bits };
    if let Some(path) = &a.policy {
        let mut policy = PrecisionPolicy::load(path)?;
        policy.default.lambda = base.lambda;
        if a.per_channel {
            policy.default.weight_granularity = Granularity::PerChannel;
        }
        return Ok(Choice {
            policy,
            source: "file",
            report: None,
        });
    }
    if a.auto_policy.is_none() && a.keep_sensitive.is_none() && a.keep_random.is_none() {
        return Ok(Choice {
            policy: PrecisionPolicy::new(base),
            source: "default",
            report: None,
        });
    }
    let report = analyze(inp, base)?;
    println!(
        "sensitivity (1 - cos on {} training lines, one layer ternary at a time):\n{}",
        a.sensitivity_lines,
        report.table()
    );
    let (policy, source) = if let Some(bits) = a.auto_policy {
        (report.propose_within_bits(base, wide, bits)?, "auto")
    } else if let Some(k) = a.keep_sensitive {
        (report.propose_policy_at(base, k, wide), "sensitive")
    } else {
        let k = a.keep_random.expect("one of the precision flags is set");
        (random_like(&report, base, k, wide, a.seed), "random")
    };
    Ok(Choice {
        policy,
        source,
        report: Some(report),
    })
}

/// Each layer's sensitivity: `1 - mean cos` to the teacher's embeddings of
/// `--sensitivity-lines` training lines (spread evenly over the training set) with that layer
/// alone quantized under `base`.
fn analyze(inp: &Inputs, base: QATConfig) -> Result<SensitivityReport> {
    let vm = VarMap::new();
    let enc = BertEncoder::new(
        inp.config.clone(),
        &Converter::new(inp.tensors, &vm, PrecisionPolicy::new(base)),
    )?;
    let n = inp.args.sensitivity_lines.min(inp.train.len());
    let picked: Vec<&str> = (0..n)
        .map(|i| inp.train[i * inp.train.len() / n].as_str())
        .collect();
    let (ids, mask) = encode(inp.tok, &picked, inp.args.max_len)?;
    let target = inp.teacher.embed(&ids, &mask)?;
    let loss = || -> Result<f64> {
        let cos = (enc.embed(&ids, &mask)? * &target)?.sum(1)?.mean_all()?;
        Ok(1.0 - cos.to_scalar::<f32>()? as f64)
    };
    sensitivity::analyze(&enc.qat_layers(), loss)
}

/// `keep` layers drawn at random with the seed, as many of each size as among the `keep` most
/// sensitive layers (so the policy costs the same bits), at `wide`.
fn random_like(
    report: &SensitivityReport,
    base: QATConfig,
    keep: usize,
    wide: Scheme,
    seed: u64,
) -> PrecisionPolicy {
    let sensitive = report.propose_policy_at(base, keep, wide);
    let size_of = |name: &str| {
        report
            .layers
            .iter()
            .find(|l| l.name == name)
            .map_or(0, |l| l.weights)
    };
    let mut sizes: Vec<usize> = sensitive
        .rules
        .iter()
        .map(|r| size_of(&r.pattern))
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut policy = PrecisionPolicy::new(base);
    for size in sizes {
        let want = sensitive
            .rules
            .iter()
            .filter(|r| size_of(&r.pattern) == size)
            .count();
        let mut pool: Vec<&str> = report
            .layers
            .iter()
            .filter(|l| l.weights == size)
            .map(|l| l.name.as_str())
            .collect();
        pool.shuffle(&mut rng);
        for name in pool.into_iter().take(want) {
            policy = policy.rule(name, Some(wide), Some(Scheme::Int8PerToken));
        }
    }
    policy
}
