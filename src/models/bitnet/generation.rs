//! Text generation: [`Sampler`] (greedy, temperature, top-k, top-p, seeded) and [`generate`]
//! (prefill the prompt as one batch, then one token at a time through the KV cache).

use super::model::{BitNetForCausalLM, Cache};
use crate::error::ModelError;
use candle_core::{DType, Device, Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateConfig {
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 is greedy (argmax).
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (before top-p); `None` keeps all.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p`; `None` or 1
    /// keeps all.
    pub top_p: Option<f64>,
    /// Seed of the sampling RNG (ChaCha8): the same seed gives the same tokens.
    pub seed: u64,
    /// Generation ends after any of these tokens (which is kept in the output).
    pub stop_tokens: Vec<u32>,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 32,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 42,
            stop_tokens: Vec::new(),
        }
    }
}

impl GenerateConfig {
    /// Rejects a negative or non-finite temperature, `top_k = 0` and `top_p` outside `(0, 1]`.
    pub fn validate(&self) -> std::result::Result<(), ModelError> {
        let bad =
            |field: &str, reason: String| Err(ModelError::config("GenerateConfig", field, reason));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(
                "temperature",
                format!(
                    "is {}, allowed: a finite number >= 0 (0 is greedy)",
                    self.temperature
                ),
            );
        }
        if self.top_k == Some(0) {
            return bad("top_k", "is 0, allowed: an integer >= 1".into());
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad("top_p", format!("is {p}, allowed: (0, 1]"));
            }
        }
        Ok(())
    }
}

/// Picks tokens from logits per a [`GenerateConfig`].
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: GenerateConfig,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler seeded with `cfg.seed`; the config is validated.
    pub fn new(cfg: GenerateConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            cfg,
        })
    }

    /// The next token for `logits` `[vocab]`: the argmax at temperature 0, else a draw from
    /// `softmax(logits / T)` restricted to the top-k, then the top-p nucleus (ties in the sort
    /// broken by the lower id, so that the result does not depend on the sort's stability).
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        let l = logits
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .to_vec1::<f32>()?;
        if l.is_empty() {
            candle_core::bail!("Sampler: empty logits");
        }
        if l.iter().any(|v| v.is_nan()) {
            candle_core::bail!("Sampler: the logits hold NaN");
        }
        if self.cfg.temperature == 0.0 {
            return Ok(argmax(&l));
        }
        let t = self.cfg.temperature as f32;
        let mut order: Vec<usize> = (0..l.len()).collect();
        order.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
        if let Some(k) = self.cfg.top_k {
            order.truncate(k.max(1));
        }
        let top = l[order[0]];
        let mut probs: Vec<f32> = order.iter().map(|&i| ((l[i] - top) / t).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(p) = self.cfg.top_p.filter(|&p| p < 1.0) {
            let mut acc = 0f32;
            let keep = probs
                .iter()
                .position(|&q| {
                    acc += q;
                    acc >= p as f32
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            order.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let r: f32 = self.rng.random::<f32>() * total;
        let mut acc = 0f32;
        for (&i, &p) in order.iter().zip(&probs) {
            acc += p;
            if r < acc {
                return Ok(i as u32);
            }
        }
        Ok(*order.last().expect("at least one token") as u32)
    }
}

fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in l.iter().enumerate() {
        if *v > l[best] {
            best = i;
        }
    }
    best as u32
}

/// What [`generate`] produced.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The new tokens (a stop token, when one ended the run, included).
    pub tokens: Vec<u32>,
    /// The logits at the prompt's last position, `[vocab]`.
    pub prompt_logits: Tensor,
    /// Seconds of the prompt's forward (prefill).
    pub prefill_secs: f64,
    /// Seconds of the one-token forwards and sampling after it.
    pub decode_secs: f64,
}

/// Continues `prompt` (batch 1): the prompt in one forward (prefill), then one token at a time
/// through the KV cache, calling `on_token` with each new token as soon as it is chosen (for
/// streaming; return `false` to stop).
///
/// ```
/// use bitnet::models::bitnet::{generate, BitNetForCausalLM, Config, GenerateConfig};
/// use bitnet::training::QATConfig;
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// # fn main() -> candle_core::Result<()> {
/// let cfg = Config::from_json_str(r#"{"vocab_size": 64, "hidden_size": 32,
///     "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
///     "num_key_value_heads": 2, "max_position_embeddings": 32}"#, "config")?;
/// let vm = VarMap::new();
/// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
/// let model = BitNetForCausalLM::new(&cfg, QATConfig::ternary_hf(), vb)?.to_packed()?;
/// let mut streamed = Vec::new();
/// let out = generate(&model, &[1, 2, 3], &GenerateConfig { max_new_tokens: 5, ..Default::default() },
///     |t| { streamed.push(t); Ok(true) })?;
/// assert_eq!((out.tokens.len(), streamed), (5, out.tokens.clone()));
/// # Ok(()) }
/// ```
pub fn generate(
    model: &BitNetForCausalLM,
    prompt: &[u32],
    cfg: &GenerateConfig,
    mut on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<Generation> {
    if prompt.is_empty() {
        candle_core::bail!(
            "generate: the prompt is empty (give at least a beginning-of-text token)"
        );
    }
    let max = model.config().max_position_embeddings;
    if prompt.len() + cfg.max_new_tokens > max {
        candle_core::bail!(
            "generate: {} prompt + {} new tokens exceed max_position_embeddings = {max}",
            prompt.len(),
            cfg.max_new_tokens
        );
    }
    let mut sampler = Sampler::new(cfg.clone())?;
    let mut cache = Cache::new(true, model.config());
    let t0 = Instant::now();
    let input = Tensor::new(prompt, model.device())?.unsqueeze(0)?;
    let prompt_logits = model.forward(&input, 0, &mut cache)?.squeeze(0)?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut tokens = Vec::with_capacity(cfg.max_new_tokens);
    let mut logits = prompt_logits.clone();
    for step in 0..cfg.max_new_tokens {
        let next = sampler.sample(&logits)?;
        tokens.push(next);
        let go_on = on_token(next)?;
        if !go_on || cfg.stop_tokens.contains(&next) || step + 1 == cfg.max_new_tokens {
            break;
        }
        let input = Tensor::new(&[[next]], model.device())?;
        logits = model
            .forward(&input, prompt.len() + step, &mut cache)?
            .squeeze(0)?;
    }
    Ok(Generation {
        tokens,
        prompt_logits,
        prefill_secs,
        decode_secs: t1.elapsed().as_secs_f64(),
    })
}
