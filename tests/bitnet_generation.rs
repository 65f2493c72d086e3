//! Sampling and generation of `models::bitnet`: greedy is the argmax, top-k / top-p restrict
//! the draw, the seed fixes it, the frequencies follow softmax(logits / T), stop tokens end a run,
//! and bad settings are rejected naming the field.

use bitnet::models::bitnet::{generate, BitNetForCausalLM, Config, GenerateConfig, Sampler};
use bitnet::training::QATConfig;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

fn logits(v: &[f32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

fn draws(cfg: GenerateConfig, l: &[f32], n: usize) -> Vec<u32> {
    let mut s = Sampler::new(cfg).unwrap();
    (0..n).map(|_| s.sample(&logits(l)).unwrap()).collect()
}

#[test]
fn sampler_settings_pick_what_they_should() {
    let l = [0.1f32, 2.0, -1.0, 1.9, 0.5];
    let t = |temperature| GenerateConfig {
        temperature,
        ..Default::default()
    };
    // (setting, allowed tokens)
    let cases: Vec<(&str, GenerateConfig, Vec<u32>)> = vec![
        ("greedy", t(0.0), vec![1]),
        (
            "top-k 1",
            GenerateConfig {
                top_k: Some(1),
                ..t(1.0)
            },
            vec![1],
        ),
        (
            "top-k 2",
            GenerateConfig {
                top_k: Some(2),
                ..t(1.0)
            },
            vec![1, 3],
        ),
        (
            "top-p small",
            GenerateConfig {
                top_p: Some(0.01),
                ..t(1.0)
            },
            vec![1],
        ),
        // p(1) and p(3) are 0.43 and 0.39 at T = 1: 0.6 needs both.
        (
            "top-p 0.6",
            GenerateConfig {
                top_p: Some(0.6),
                ..t(1.0)
            },
            vec![1, 3],
        ),
    ];
    for (name, cfg, allowed) in cases {
        let got = draws(cfg, &l, 200);
        assert!(got.iter().all(|x| allowed.contains(x)), "{name}: {got:?}");
        assert!(
            allowed.iter().all(|a| got.contains(a)),
            "{name}: {got:?} misses some of {allowed:?}"
        );
    }
}

#[test]
fn frequencies_follow_the_tempered_softmax_and_the_seed_repeats_them() {
    // softmax([0, ln 3]) = [0.25, 0.75]; at T = 2 the logits halve: [1, sqrt 3] / (1 + sqrt 3).
    let l = [0.0f32, 3f32.ln()];
    for (temperature, p1) in [(1.0, 0.75), (2.0, 3f64.sqrt() / (1.0 + 3f64.sqrt()))] {
        let cfg = GenerateConfig {
            temperature,
            seed: 7,
            ..Default::default()
        };
        let got = draws(cfg.clone(), &l, 8000);
        let share = got.iter().filter(|&&x| x == 1).count() as f64 / got.len() as f64;
        // Binomial standard deviation at n = 8000 is about 0.005.
        assert!(
            (share - p1).abs() < 0.02,
            "T = {temperature}: {share} vs {p1}"
        );
        assert_eq!(draws(cfg.clone(), &l, 50), got[..50]);
        let other = draws(GenerateConfig { seed: 8, ..cfg }, &l, 50);
        assert_ne!(other, got[..50]);
    }
}

#[test]
fn bad_settings_and_logits_are_errors() {
    let bad = [
        (
            GenerateConfig {
                temperature: -1.0,
                ..Default::default()
            },
            "temperature",
        ),
        (
            GenerateConfig {
                temperature: f64::NAN,
                ..Default::default()
            },
            "temperature",
        ),
        (
            GenerateConfig {
                top_k: Some(0),
                ..Default::default()
            },
            "top_k",
        ),
        (
            GenerateConfig {
                top_p: Some(0.0),
                ..Default::default()
            },
            "top_p",
        ),
        (
            GenerateConfig {
                top_p: Some(1.5),
                ..Default::default()
            },
            "top_p",
        ),
    ];
    for (cfg, field) in bad {
        let err = Sampler::new(cfg).unwrap_err().to_string();
        assert!(err.contains(field), "{err}");
    }
    let mut s = Sampler::new(GenerateConfig::default()).unwrap();
    assert!(s.sample(&logits(&[0.0, f32::NAN])).is_err());
}

#[test]
fn generation_streams_every_token_and_stops_at_a_stop_token() {
    let cfg = Config::from_json_str(
        r#"{"vocab_size": 32, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 40}"#,
        "config",
    )
    .unwrap();
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let model = BitNetForCausalLM::new(&cfg, QATConfig::ternary_hf(), vb)
        .unwrap()
        .to_packed()
        .unwrap();
    let sampled = GenerateConfig {
        max_new_tokens: 30,
        temperature: 1.0,
        seed: 3,
        ..Default::default()
    };
    let mut streamed = Vec::new();
    let free = generate(&model, &[1, 2, 3], &sampled, |t| {
        streamed.push(t);
        Ok(true)
    })
    .unwrap();
    assert_eq!(free.tokens, streamed);
    assert_eq!(free.tokens.len(), 30);
    // Stop at the first occurrence of the third token drawn: the run ends there, token kept.
    let stop = free.tokens[2];
    let first = free.tokens.iter().position(|&t| t == stop).unwrap();
    let stopped = generate(
        &model,
        &[1, 2, 3],
        &GenerateConfig {
            stop_tokens: vec![stop],
            ..sampled.clone()
        },
        |_| Ok(true),
    )
    .unwrap();
    assert_eq!(stopped.tokens, free.tokens[..=first]);
    // The callback can stop it too.
    let two = generate(&model, &[1, 2, 3], &sampled, |_| Ok(false)).unwrap();
    assert_eq!(two.tokens.len(), 1);
    // Past the context: an error, not a panic.
    let long = GenerateConfig {
        max_new_tokens: 38,
        ..sampled
    };
    assert!(generate(&model, &[1, 2, 3], &long, |_| Ok(true)).is_err());
}
