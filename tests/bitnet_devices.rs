//! `BitNetForCausalLM::to_weight_dtype` and `to_device`: a 16-bit embedding and head (and dense
//! weights) change the logits by rounding only and halve those bytes; moving a model keeps its
//! numbers; the training runtime and other dtypes are refused with a message. The same model on a
//! CUDA GPU against the CPU: the last test, with the `cuda` feature.

use bitnet::io::gguf::GgufModel;
use bitnet::io::hf::HfCheckpoint;
use bitnet::models::bitnet::{BitNetForCausalLM, Cache, Config, Runtime};
use bitnet::training::QATConfig;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

mod bitnet_common;

fn cfg() -> Config {
    Config::from_json_str(
        r#"{"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 32, "tie_word_embeddings": false}"#,
        "config",
    )
    .unwrap()
}

/// A training model with fixed weights (candle's CPU generator has no seed): every matrix
/// uniform in `±sqrt(3 / columns)` from a generator seeded by its name, the norms at one.
fn trained(cfg: &Config) -> BitNetForCausalLM {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let model = BitNetForCausalLM::new(cfg, QATConfig::ternary_hf(), vb).unwrap();
    for (name, var) in vm.data().lock().unwrap().iter() {
        let dims = var.dims().to_vec();
        if dims.len() != 2 {
            continue;
        }
        let mut x = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        }) | 1;
        let a = (3.0 / dims[1] as f32).sqrt();
        let v: Vec<f32> = (0..dims[0] * dims[1])
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
            })
            .collect();
        var.set(&Tensor::from_vec(v, (dims[0], dims[1]), &Device::Cpu).unwrap())
            .unwrap();
    }
    model
}

/// Prefill logits of 5 tokens, then 2 one-token steps, concatenated, on the CPU.
fn logits(m: &BitNetForCausalLM) -> Tensor {
    let dev = m.device();
    let mut cache = Cache::new(true, m.config());
    let mut out = Vec::new();
    let prompt = Tensor::new(&[[3u32, 14, 15, 92, 65]], dev).unwrap();
    let mut l = m.forward(&prompt, 0, &mut cache).unwrap();
    for (pos, id) in [(5, 35u32), (6, 89)] {
        out.extend(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        l = m
            .forward(&Tensor::new(&[[id]], dev).unwrap(), pos, &mut cache)
            .unwrap();
    }
    out.extend(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    Tensor::new(out, &Device::Cpu).unwrap()
}

#[test]
fn sixteen_bit_weights_round_the_logits_and_halve_their_bytes() {
    let cfg = cfg();
    let model = trained(&cfg);
    let packed = model.to_packed().unwrap();
    let dense = model.to_dense().unwrap();
    let (v, h) = (cfg.vocab_size, cfg.hidden_size);
    let dense_proj: usize = dense
        .projections()
        .iter()
        .map(|(_, p)| p.weight_bytes())
        .sum();
    // (name, f32 model, dtype, bytes the conversion saves, bound). 16-bit rounding alone moves
    // a product by a few 2^-9; what moves the logits more is an activation crossing a rounding
    // boundary of the int8 quantizer, one level (1/127 of its token's largest value) at a time,
    // in every later layer: f16, with 8x finer rounding than bf16, moves these logits almost
    // as much (1.7 % against 1.8 % of the largest; dense bf16 2.3 %). 5 % bounds that; a wrong
    // head (another matrix, a missing transpose, a dropped cast) moves them by their own size.
    let cases = [
        ("packed bf16", &packed, DType::BF16, 2 * 2 * v * h, 0.05),
        ("packed f16", &packed, DType::F16, 2 * 2 * v * h, 0.05),
        (
            "dense bf16",
            &dense,
            DType::BF16,
            2 * 2 * v * h + dense_proj / 2,
            0.05,
        ),
        ("packed f32", &packed, DType::F32, 0, 0.0),
    ];
    for (name, m, dtype, saved, tol) in cases {
        let want = logits(m);
        let converted = m.to_weight_dtype(dtype).unwrap();
        assert_eq!(converted.weight_dtype(), dtype, "{name}");
        assert_eq!(converted.runtime(), m.runtime(), "{name}");
        assert_eq!(
            m.weights_bytes() - converted.weights_bytes(),
            saved,
            "{name}: bytes saved"
        );
        let got = logits(&converted);
        let err = bitnet_common::rel_diff(&got, &want);
        assert!(err <= tol, "{name}: logits moved by {err} of the largest");
        if tol > 0.0 {
            assert!(err > 0.0, "{name}: the conversion changed nothing");
        }
    }
}

#[test]
fn a_model_moved_to_the_cpu_computes_the_same() {
    let model = trained(&cfg());
    for m in [model.to_packed().unwrap(), model.to_dense().unwrap()] {
        let moved = m.to_device(&Device::Cpu).unwrap();
        assert!(moved.device().is_cpu());
        assert_eq!(
            logits(&moved).to_vec1::<f32>().unwrap(),
            logits(&m).to_vec1::<f32>().unwrap()
        );
        assert_eq!(
            bitnet_common::greedy(&moved, &[1, 2, 3], 6),
            bitnet_common::greedy(&m, &[1, 2, 3], 6)
        );
    }
}

#[test]
fn conversions_refuse_what_they_cannot_do() {
    let model = trained(&cfg());
    let packed = model.to_packed().unwrap();
    let cases: Vec<(&str, candle_core::Result<BitNetForCausalLM>, &str)> = vec![
        (
            "u8 weights",
            packed.to_weight_dtype(DType::U8),
            "allowed: F32, BF16, F16",
        ),
        (
            "training to_device",
            model.to_device(&Device::Cpu),
            "VarBuilder",
        ),
        (
            "training dtype",
            model.to_weight_dtype(DType::BF16),
            "VarMap's dtype",
        ),
    ];
    for (name, r, needle) in cases {
        let e = r
            .err()
            .unwrap_or_else(|| panic!("{name}: accepted"))
            .to_string();
        assert!(e.contains(needle), "{name}: {e}");
    }
}

/// A bf16 dense model packed again keeps the dtype of its large matrices and gives back the f32
/// model's codes: the nonzero weights of a per-tensor projection share one magnitude, rounded
/// to bf16 or not, so requantizing finds the same signs and zeros.
#[test]
fn sixteen_bit_models_convert_between_runtimes() {
    let model = trained(&cfg());
    let packed = model.to_packed().unwrap();
    let dense16 = packed
        .to_dense()
        .unwrap()
        .to_weight_dtype(DType::BF16)
        .unwrap();
    let repacked = dense16.to_packed().unwrap();
    assert_eq!(repacked.weight_dtype(), DType::BF16);
    for ((name, a), (_, b)) in packed.projections().iter().zip(repacked.projections()) {
        let (a, b) = (a.weight().unwrap(), b.weight().unwrap());
        let (a, b) = (a.to_packed().unwrap(), b.to_packed().unwrap());
        assert_eq!(a.levels(), b.levels(), "{name}: codes");
    }
}

/// The dtype a file stores a tensor in, as the committed fixtures hold them (read from their
/// headers by gguf-py and a safetensors header dump): transformers wrote the tied checkpoint's
/// embedding in bf16 and the untied one's in f32, llama.cpp's converter the GGUF embedding in f16;
/// quantized and missing tensors have none.
#[test]
fn stored_dtypes_are_the_files() {
    let hf = |rel: &str| HfCheckpoint::open(bitnet_common::reference(rel)).unwrap();
    let gguf = GgufModel::open(bitnet_common::reference("gguf/tiny-tq2_0.gguf")).unwrap();
    let (tied, untied) = (hf("bitnet_hf/tied/offline"), hf("bitnet_hf/untied/offline"));
    let embed = "model.embed_tokens.weight";
    let cases = [
        ("hf tied", tied.stored_dtype(embed), Some(DType::BF16)),
        ("hf untied", untied.stored_dtype(embed), Some(DType::F32)),
        ("hf missing", tied.stored_dtype("model.nothing"), None),
        (
            "gguf embedding",
            gguf.stored_dtype("token_embd.weight"),
            Some(DType::F16),
        ),
        (
            "gguf ternary",
            gguf.stored_dtype("blk.0.attn_q.weight"),
            None,
        ),
        ("gguf missing", gguf.stored_dtype("nothing"), None),
    ];
    for (name, got, want) in cases {
        assert_eq!(got, want, "{name}");
    }
}

/// In the 16-bit type its file stores the embedding in, a model keeps every value: the logits
/// are the f32 model's up to the order of the head's sums (1e-5 of the largest, against the
/// percent that rounding into another type costs, as in the test above). The GGUF fixture's
/// embedding is f16, the tied checkpoint's bf16.
#[test]
fn the_files_own_sixteen_bits_lose_nothing() {
    let hf = HfCheckpoint::open(bitnet_common::reference("bitnet_hf/tied/offline")).unwrap();
    let gguf = GgufModel::open(bitnet_common::reference("gguf/tiny-tq2_0.gguf")).unwrap();
    let cases = [
        (
            "hf bf16",
            hf.load_model(Runtime::Packed).unwrap(),
            DType::BF16,
        ),
        (
            "gguf f16",
            gguf.load_model(Runtime::Packed).unwrap(),
            DType::F16,
        ),
    ];
    for (name, model, dtype) in cases {
        let sixteen = model.to_weight_dtype(dtype).unwrap();
        let err = bitnet_common::rel_diff(&logits(&sixteen), &logits(&model));
        assert!(err <= 1e-5, "{name}: logits moved by {err} of the largest");
    }
}

/// The packed model (our CUDA kernels), the dense one in bf16 (cuBLAS) and in f32 on a CUDA GPU
/// against the same model on the CPU. The packed kernels give the CPU layer's numbers exactly;
/// the norms, rotary positions and attention are candle's CUDA ops, whose sums run in another
/// order, and an int8 activation that lands on the other side of a rounding boundary moves by
/// one level: the bound is the 16-bit test's. Generation runs there and a dense model packed on
/// the GPU stays there.
#[cfg(feature = "cuda")]
#[test]
fn the_model_on_cuda_computes_what_the_cpu_does() {
    let gpu = Device::new_cuda(0).unwrap();
    let model = trained(&cfg());
    let packed = model.to_packed().unwrap();
    let dense = model.to_dense().unwrap();
    let cases = [
        ("packed", packed.to_weight_dtype(DType::F32).unwrap()),
        (
            "packed bf16 head",
            packed.to_weight_dtype(DType::BF16).unwrap(),
        ),
        ("dense bf16", dense.to_weight_dtype(DType::BF16).unwrap()),
        ("dense f32", dense.to_weight_dtype(DType::F32).unwrap()),
    ];
    for (name, cpu) in cases {
        let on_gpu = cpu.to_device(&gpu).unwrap();
        assert!(on_gpu.device().same_device(&gpu), "{name}");
        let err = bitnet_common::rel_diff(&logits(&on_gpu), &logits(&cpu));
        assert!(err <= 0.05, "{name}: logits moved by {err} of the largest");
        assert_eq!(
            bitnet_common::greedy(&on_gpu, &[1, 2, 3], 6).len(),
            6,
            "{name}"
        );
        let repacked = on_gpu.to_packed().unwrap();
        assert!(repacked.device().same_device(&gpu), "{name}: to_packed");
    }
}
