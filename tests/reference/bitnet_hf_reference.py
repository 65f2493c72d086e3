"""Reference logits of small BitNetForCausalLM checkpoints, computed by Hugging Face transformers.

Writes the fixture that tests/bitnet_hf.rs reads (tests/reference/bitnet_hf/), and checks that
transformers loads the checkpoints our code saves. Needs torch, transformers (5.x), safetensors,
tokenizers, numpy.

    python3 tests/reference/bitnet_hf_reference.py make          # writes tests/reference/bitnet_hf/
    python3 tests/reference/bitnet_hf_reference.py check         # builds and runs our examples,
                                                                 # then reloads what they saved
    python3 tests/reference/bitnet_hf_reference.py check-dir runs/lm-hf   # a `char_lm --export` model

Two seeded models, each saved in both weight forms:
* `untied/`: 2 layers, hidden 64, 4 heads over 2 key/value heads (grouped-query attention), untied
  lm_head, float32. `online/` holds the latent weights (`linear_class = "autobitlinear"`,
  `quantization_mode = "online"`), `offline/` the ternary codes packed 4 per byte with
  `weight_scale = mean|W|` (`"autobitlinear"`, `"offline"`).
* `tied/`: 2 layers, hidden 32, 4 heads over 1 key/value head, tied embeddings, a config in the
  older style (`rope_theta` at the top level, an explicit `head_dim`, a list of eos ids).
  `online/` stores bfloat16 latent weights; `offline/` the legacy `BitLinear` form (no
  `linear_class`), which divides by `weight_scale = 1 / mean|W|`.
Every norm weight is drawn around 1 (not all ones), so that a norm applied to the wrong tensor
shows. Logits are computed in float32 (`dtype=torch.float32`, so the bfloat16 checkpoint is
upcast before any arithmetic) and with torch.compile off: transformers' eager definition.

`expected.safetensors` in each model folder holds `input_ids` [T], `logits_online` and
`logits_offline` [T, vocab] for the fixed prompt, and `greedy_online` / `greedy_offline`: the
prompt's greedy continuation of GREEDY_TOKENS tokens (with the KV cache, as `generate` runs).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# transformers wraps the BitNet quantizers in torch.compile; the reference is their eager
# definition (and a C++ toolchain for inductor is not needed).
os.environ["TORCHDYNAMO_DISABLE"] = "1"

import gzip  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import BitNetConfig, BitNetForCausalLM  # noqa: E402
from transformers.integrations.bitnet import pack_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "reference" / "bitnet_hf"
PROMPT = "ROMEO.\nBut soft, what light through yonder window"
GREEDY_TOKENS = 12
VOCAB = 320
PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def train_tokenizer(path):
    """A byte-level BPE of VOCAB entries trained on the repository's Shakespeare copy."""
    with gzip.open(ROOT / "data" / "shakespeare" / "shakespeare.txt.gz", "rt", encoding="utf-8") as f:
        text = f.read()[:400_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    tok.save(str(path))
    return tok


def seeded_model(cfg, seed):
    torch.manual_seed(seed)
    model = BitNetForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.5 * torch.randn_like(p))
    return model


def weight_quant(w):
    """transformers' WeightQuant on a float32 copy: (codes, scale) with w ~ codes * scale."""
    w = w.float()
    scale = 1.0 / w.abs().mean().clamp(min=1e-5)
    codes = (w * scale).round().clamp(-1, 1)
    return codes, (1.0 / scale).reshape(1)


def write_config(folder, cfg_dict):
    (folder / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")


def save_forms(model, folder, online_dtype, offline_class, legacy_config):
    """Saves `model`'s weights as the online and offline checkpoints under `folder`."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    cfg = model.config.to_dict()
    for k in ["transformers_version", "quantization_config", "_name_or_path"]:
        cfg.pop(k, None)
    cfg["architectures"] = ["BitNetForCausalLM"]
    if legacy_config:
        theta = cfg.pop("rope_parameters")["rope_theta"]
        cfg["rope_theta"] = theta
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
        cfg["eos_token_id"] = [cfg["eos_token_id"], 0]
        cfg.pop("dtype", None)
        cfg["torch_dtype"] = "bfloat16" if online_dtype == torch.bfloat16 else "float32"
    # online: the latent weights themselves
    on = folder / "online"
    on.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(online_dtype) for k, v in state.items()}, str(on / "model.safetensors"),
              metadata={"format": "pt"})
    write_config(on, {**cfg, "quantization_config": {
        "quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}})
    # offline: codes of the weights as the online checkpoint stores them
    off = folder / "offline"
    off.mkdir(parents=True, exist_ok=True)
    packed = {}
    for k, v in state.items():
        if any(k.endswith(p + ".weight") for p in PROJECTIONS):
            codes, s = weight_quant(v.to(online_dtype))
            packed[k] = pack_weights(codes.to(torch.int8).clone())
            packed[k[: -len("weight")] + "weight_scale"] = s if offline_class == "autobitlinear" else 1.0 / s
        else:
            packed[k] = v.to(online_dtype)
    save_file(packed, str(off / "model.safetensors"), metadata={"format": "pt"})
    qc = {"quant_method": "bitnet", "quantization_mode": "offline"}
    if offline_class == "autobitlinear":
        qc["linear_class"] = "autobitlinear"
    write_config(off, {**cfg, "quantization_config": qc})


def load(folder):
    return BitNetForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


@torch.no_grad()
def logits_and_greedy(folder, ids, new_tokens=GREEDY_TOKENS):
    model = load(folder)
    x = torch.tensor([ids])
    logits = model(x).logits[0].float()
    out = model.generate(x, max_new_tokens=new_tokens, do_sample=False, use_cache=True,
                         pad_token_id=0, eos_token_id=None)
    return logits, out[0, len(ids):].tolist()


def make():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    tok = train_tokenizer(OUT / "tokenizer.json")
    ids = tok.encode(PROMPT).ids
    bos, eos = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|end_of_text|>")
    specs = {
        "untied": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie=False,
                       online=torch.float32, offline="autobitlinear", legacy=False, seed=1),
        "tied": dict(hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=1, tie=True,
                     online=torch.bfloat16, offline="bitlinear", legacy=True, seed=2),
    }
    summary = {"prompt": PROMPT, "input_ids": ids}
    for name, s in specs.items():
        cfg = BitNetConfig(
            vocab_size=VOCAB, hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
            num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
            num_key_value_heads=s["num_key_value_heads"], max_position_embeddings=128,
            rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=s["tie"], bos_token_id=bos, eos_token_id=eos,
        )
        model = seeded_model(cfg, s["seed"])
        folder = OUT / name
        save_forms(model, folder, s["online"], s["offline"], s["legacy"])
        shutil.copy(OUT / "tokenizer.json", folder / "online" / "tokenizer.json")
        expected = {"input_ids": torch.tensor(ids, dtype=torch.int64)}
        for form in ["online", "offline"]:
            logits, greedy = logits_and_greedy(folder / form, ids)
            expected[f"logits_{form}"] = logits.contiguous()
            expected[f"greedy_{form}"] = torch.tensor(greedy, dtype=torch.int64)
            summary[f"{name}/{form}"] = {"greedy": greedy, "logits_last_first8": logits[-1, :8].tolist()}
        diff = (expected["logits_online"] - expected["logits_offline"]).abs().max().item()
        summary[f"{name}/online_vs_offline_max_abs_diff"] = diff
        save_file(expected, str(folder / "expected.safetensors"))
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"fixture: {total} bytes")


def cargo_example(name, *args):
    cmd = ["cargo", "run", "--release", "-q", "--example", name, "--", *map(str, args)]
    print("+", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@torch.no_grad()
def check():
    """Our examples fine-tune each fixture model a few steps (and zero steps) and save it in both
    forms; transformers must load every saved checkpoint and give the logits our code gives."""
    ids = json.loads((OUT / "summary.json").read_text())["input_ids"]
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name in ["untied", "tied"]:
            for source in ["online", "offline"]:
                for steps in [0, 3]:
                    saved = Path(tmp) / f"{name}-{source}-{steps}"
                    cargo_example("bitnet_finetune", "--hf", OUT / name / source, "--steps", steps,
                                  "--batch", 2, "--seq-len", 32, "--eval-batches", 1,
                                  "--save", saved)
                    for form in ["online", "offline"]:
                        ours = cargo_example("bitnet_generate", "--hf", saved / form, "--token-ids",
                                             ",".join(map(str, ids)), "--max-new-tokens", GREEDY_TOKENS,
                                             "--logits", VOCAB)
                        logits, greedy = logits_and_greedy(saved / form, ids)
                        theirs = logits[-1]
                        ref = torch.tensor(ours["prompt_last_logits"])
                        rel = ((ref - theirs).abs().max() / theirs.abs().max()).item()
                        worst = max(worst, rel)
                        same = greedy == ours["new_tokens"]
                        print(f"{name} from {source}, {steps} steps, saved {form}: transformers "
                              f"loads it; last-position logits max rel diff {rel:.2e}; greedy "
                              f"tokens {'equal' if same else 'DIFFER'}", flush=True)
                        assert rel < 1e-4, rel
                        assert same, (greedy, ours["new_tokens"])
                        if steps == 0 and form == source:
                            fixture = load_file(str(OUT / name / "expected.safetensors"))
                            orig = fixture[f"logits_{source}"][-1]
                            assert (orig - theirs).abs().max() / orig.abs().max() < 1e-5
    print(f"check: every checkpoint we saved loads in transformers; worst rel diff {worst:.2e}")


@torch.no_grad()
def check_dir():
    """`check-dir DIR [PROMPT]`: a byte-vocabulary checkpoint we exported (`char_lm --export DIR`
    writes DIR/online and DIR/offline), loaded by transformers and by `bitnet_generate`: the
    prompt's bytes are the token ids; last-position logits and 40 greedy bytes must agree.

    Each form is compared with the runtime that does transformers' arithmetic for it: online
    checkpoints run in floats (`--f32`: fake-quantized activations times ternarized weights),
    offline ones in integers (packed). The two orders round differently, and a rounding
    difference that moves one activation across an int8 rounding boundary changes the logits
    by about 1e-3 relative; transformers' own online and offline forms of the same model differ
    that way too, which this prints."""
    root = Path(sys.argv[2])
    prompt = sys.argv[3] if len(sys.argv) > 3 else "ROMEO.\nBut soft"
    ids = list(prompt.encode())
    forms = [f for f in ["online", "offline"] if (root / f / "config.json").exists()]
    assert forms, f"{root}: no online/ or offline/ checkpoint"
    last = {}
    for form in forms:
        runtime = ["--f32"] if form == "online" else []
        ours = cargo_example("bitnet_generate", "--hf", root / form, "--token-ids",
                             ",".join(map(str, ids)), "--max-new-tokens", 40, "--logits", 256,
                             *runtime)
        logits, greedy = logits_and_greedy(root / form, ids, 40)
        theirs = last[form] = logits[-1]
        rel = ((torch.tensor(ours["prompt_last_logits"]) - theirs).abs().max()
               / theirs.abs().max()).item()
        same = greedy == ours["new_tokens"]
        text = bytes(ids + greedy).decode("utf-8", "replace")
        print(f"{root.name} {form} ({'f32' if runtime else 'packed'} runtime): transformers "
              f"loads it; last logits max rel diff {rel:.2e}; greedy 40 bytes equal: {same}; "
              f"text {text!r}", flush=True)
        assert rel < 1e-4, rel
        assert same, (greedy, ours["new_tokens"])
    if len(last) == 2:
        a, b = last["online"], last["offline"]
        print(f"transformers' own online vs offline forms: max rel diff "
              f"{((a - b).abs().max() / a.abs().max()).item():.2e}")


if __name__ == "__main__":
    modes = {"make": make, "check": check, "check-dir": check_dir}
    modes[sys.argv[1] if len(sys.argv) > 1 else "make"]()
