"""GGUF reference fixtures: llama.cpp's converter on a transformers BitNet model, and gguf-py's
reading of what our exporter writes. Writes tests/reference/gguf/ (read by tests/gguf.rs).

    PY=/work/venv-hf/bin/python      # torch, transformers, sentencepiece, gguf (gguf-py)
    $PY tests/reference/gguf_reference.py make --llama-src "$(../shared/tools/llama-cpp --src)"
    $PY tests/reference/gguf_reference.py check    # after `make`: exports with our converter,
                                                   # dequantizes with gguf-py, records the values

`make`:
* A seeded `BitNetForCausalLM` built as tests/reference/bitnet_hf_reference.py builds its models
  (norm weights drawn around 1), but with widths that are multiples of 256 (hidden 256,
  intermediate 512, 4 heads over 2 key/value heads, 2 layers): TQ1_0 and TQ2_0 blocks hold 256
  weights along a row, and llama.cpp's converter falls back to F16 for any other width, so the
  32/64-wide bitnet_hf fixture cannot become a ternary GGUF.
* What this llama.cpp version's converter needs (found by trying it on a transformers model): the
  sub-norms under their older names (`self_attn.inner_attn_ln`, `mlp.ffn_layernorm`), tied
  embeddings (its `bitnet` architecture has no output-head slot) and a sentencepiece
  `tokenizer.model`, here trained on the repository's Shakespeare copy with byte fallback.
* `convert_hf_to_gguf.py --outtype tq1_0` and `tq2_0` -> `tiny-tq1_0.gguf`, `tiny-tq2_0.gguf`.
* `expected.safetensors`: transformers' logits of the latent model for the prompt's ids
  (`logits_hf`), and of the same model with its ternary weights exactly as the GGUF files hold
  them (codes and the f16 block scale, as an offline checkpoint; `logits_gguf`), with greedy
  continuations of both (`greedy_hf`, `greedy_gguf`).
* `summary.json`: the prompt, its ids (from the GGUF's own tokenizer), and sentencepiece's ids for
  SAMPLES, which our tokenizer built from the GGUF metadata must reproduce.

`check` runs our `bitnet_convert` on the TQ2_0 fixture (`--to-gguf` as tq1_0, tq2_0 and i2_s;
the bitnet_hf fixture is 32/64 wide, which no ternary GGUF type holds), reads every exported file
with gguf-py's `GGUFReader`, dequantizes each tensor with
`gguf.quants.dequantize` (I2_S, which gguf-py does not know, by bitnet.cpp's layout written out
here, as gguf-py refuses files with that type) and records, per tensor, the sha256 of the f32
values and the first few in `exported/gguf_py.json`; the exported TQ2_0 file itself is committed
as `exported/tq2_0.gguf`, so that the Rust test compares our reading of it with gguf-py's numbers
without python.
"""
import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TORCHDYNAMO_DISABLE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "reference" / "gguf"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bitnet_hf_reference import PROJECTIONS, seeded_model, write_config  # noqa: E402

PROMPT = "ROMEO.\nBut soft, what light through yonder window"
SAMPLES = ["To be, or not to be: that is the question.", "  Whither, my lord?\n\nKING.  Ay"]
GREEDY_TOKENS = 12
SPM_VOCAB = 384


def train_spm(folder):
    import sentencepiece as spm
    with gzip.open(ROOT / "data" / "shakespeare" / "shakespeare.txt.gz", "rt", encoding="utf-8") as f:
        text = f.read()[:300_000]
    lines = [ln for ln in text.split("\n") if ln.strip()]
    src = folder / "corpus.txt"
    src.write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(src), model_prefix=str(folder / "tokenizer"), vocab_size=SPM_VOCAB,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2,
        # llama.cpp's tokenizer applies no normalizer (a GGUF file does not record one): train
        # without sentencepiece's default nmt_nfkc (newlines -> spaces) and space collapsing, so
        # that both sides define the same encoding.
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, pad_id=-1, num_threads=1, minloglevel=2)
    src.unlink()
    (folder / "tokenizer.vocab").unlink()
    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


def hf_model_dir(folder, sp):
    from transformers import BitNetConfig
    cfg = BitNetConfig(vocab_size=sp.get_piece_size(), hidden_size=256, intermediate_size=512,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=1,
                       eos_token_id=2, rms_norm_eps=1e-5)
    model = seeded_model(cfg, seed=7)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    state.pop("lm_head.weight", None)
    renamed = {}
    for k, v in state.items():
        k = k.replace("self_attn.attn_sub_norm", "self_attn.inner_attn_ln")
        k = k.replace("mlp.ffn_sub_norm", "mlp.ffn_layernorm")
        renamed[k] = v
    save_file(renamed, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = {**json.loads(model_dir_config(model)), "quantization_config": {
        "quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}}
    write_config(folder, cfg)
    # transformers' own names, loaded back through from_pretrained so that the projections are
    # its online AutoBitLinear (a model built from a config without quantization_config is float)
    ours = folder.parent / "hf-transformers"
    ours.mkdir()
    save_file(state, str(ours / "model.safetensors"), metadata={"format": "pt"})
    write_config(ours, cfg)
    from transformers import BitNetForCausalLM
    return BitNetForCausalLM.from_pretrained(str(ours), dtype=torch.float32).eval()


def convert(llama_src, hf_dir, outtype, out):
    subprocess.run([sys.executable, str(Path(llama_src) / "convert_hf_to_gguf.py"), str(hf_dir),
                    "--outtype", outtype, "--outfile", str(out)], check=True)


def gguf_tensors(path):
    """name -> float32 numpy array in our [out, in] (row-major) order, dequantized by gguf-py.
    gguf-py does not know bitnet.cpp's I2_S (type 36) and refuses such files, so those are read
    by `read_i2_s_file` below."""
    import gguf
    try:
        r = gguf.GGUFReader(str(path))
    except ValueError:
        return read_i2_s_file(path), None
    out = {}
    for t in r.tensors:
        vals = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = [int(x) for x in reversed(t.shape)]
        out[t.name] = np.ascontiguousarray(vals.reshape(shape).astype(np.float32))
    return out, r


def read_i2_s_file(path):
    """A GGUF v3 file with I2_S tensors: header read here (the GGUF spec), F32/F16 tensors with
    numpy, I2_S with `dequantize_i2_s`."""
    import struct
    b = Path(path).read_bytes()
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, b, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0]

    def string():
        nonlocal pos
        n = take("Q")
        s = b[pos:pos + n].decode("utf-8", "replace")
        pos += n
        return s

    sizes = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(t):
        if t == 8:
            return string()
        if t == 9:
            et, n = take("I"), take("Q")
            return [value(et) for _ in range(n)]
        return take(sizes[t])

    assert b[:4] == b"GGUF", path
    pos = 4
    assert take("I") == 3
    n_t, n_kv = take("Q"), take("Q")
    meta = {}
    for _ in range(n_kv):
        k = string()
        meta[k] = value(take("I"))
    align = meta.get("general.alignment", 32)
    infos = []
    for _ in range(n_t):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        infos.append((name, dims, take("I"), take("Q")))
    start = (pos + align - 1) // align * align
    out = {}
    for name, dims, t, off in infos:
        n = int(np.prod(dims))
        shape = list(reversed(dims))
        if t == 0:
            v = np.frombuffer(b, dtype="<f4", count=n, offset=start + off)
        elif t == 1:
            v = np.frombuffer(b, dtype="<f2", count=n, offset=start + off).astype(np.float32)
        elif t == 36:
            v = dequantize_i2_s(np.frombuffer(b, dtype=np.uint8, count=n // 4 + 32,
                                              offset=start + off), dims)
        else:
            raise ValueError(f"{name}: type {t}")
        out[name] = np.ascontiguousarray(v.reshape(shape).astype(np.float32))
    return out


def dequantize_i2_s(data, ggml_shape):
    """bitnet.cpp's I2_S (x86, ACT_PARALLEL; utils/convert-hf-to-gguf-bitnet.py quantize_to_i2_s):
    128-weight blocks over the flattened tensor, byte m of a block holds weights m, m+32, m+64,
    m+96 in bits 6-7, 4-5, 2-3, 0-1, codes 0, 1, 2 for -1, 0, +1; one f32 scale at byte n/4."""
    n = int(np.prod(ggml_shape))
    packed = data[: n // 4].reshape(-1, 32)
    scale = np.frombuffer(data[n // 4: n // 4 + 4].tobytes(), dtype=np.float32)[0]
    codes = np.stack([(packed >> s) & 3 for s in (6, 4, 2, 0)], axis=1).reshape(-1)
    return (codes.astype(np.float32) - 1.0) * scale


@torch.no_grad()
def run(model, ids):
    x = torch.tensor([ids])
    logits = model(x).logits[0].float()
    out = model.generate(x, max_new_tokens=GREEDY_TOKENS, do_sample=False, use_cache=True,
                         pad_token_id=0, eos_token_id=None)
    return logits, out[0, len(ids):].tolist()


def gguf_name(hf):
    """llama.cpp's name of a non-projection tensor of transformers' BitNetForCausalLM."""
    for a, b in [("model.embed_tokens", "token_embd"), ("lm_head", "token_embd"),
                 ("model.norm", "output_norm"), ("model.layers.", "blk."),
                 ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
                 ("self_attn.attn_sub_norm", "attn_sub_norm"), ("mlp.ffn_sub_norm", "ffn_sub_norm")]:
        hf = hf.replace(a, b)
    return hf


def latent_from_gguf(model, tensors):
    """A copy of `model` holding the GGUF's values: its embeddings and norms, and projections that
    compute the GGUF's codes and scale: latent weights
    `code * d / p` (`p` the share of nonzero codes), whose `mean|W|` is `d` (to float rounding),
    so transformers' online quantizer gives back exactly these codes and the scale `d`."""
    import copy
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    m = copy.deepcopy(model)
    with torch.no_grad():
        for k, p in m.named_parameters():
            proj = next((q for q in PROJECTIONS if k.endswith(q + ".weight")), None)
            if proj is None:
                # embeddings (F16 in a TQ file) and norms: the file's values
                p.copy_(torch.from_numpy(tensors[gguf_name(k)]))
                continue
            layer = int(k.split(".")[2])
            w = torch.from_numpy(tensors[f"blk.{layer}.{names[proj]}.weight"])
            d = w.abs().max()
            assert torch.all((w == 0) | (w.abs() == d)), k
            codes = torch.sign(w)
            share = (codes != 0).float().mean()
            p.copy_(codes * (d / share))
            q = p.abs().mean()
            assert torch.equal((p / q).round().clamp(-1, 1), codes), k
            assert abs(q.item() / d.item() - 1) < 1e-6, k
    return m


def model_dir_config(model):
    d = model.config.to_dict()
    for k in ["transformers_version", "quantization_config", "_name_or_path"]:
        d.pop(k, None)
    d["architectures"] = ["BitNetForCausalLM"]
    return json.dumps(d)


def make(llama_src):
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf = tmp / "hf"
        hf.mkdir()
        sp = train_spm(hf)
        model = hf_model_dir(hf, sp)
        for t in ["tq1_0", "tq2_0"]:
            convert(llama_src, hf, t, OUT / f"tiny-{t}.gguf")
        ids = [sp.bos_id()] + sp.encode(PROMPT)
        logits_hf, greedy_hf = run(model, ids)
        tensors1, _ = gguf_tensors(OUT / "tiny-tq1_0.gguf")
        tensors2, _ = gguf_tensors(OUT / "tiny-tq2_0.gguf")
        for k in tensors2:
            assert np.array_equal(tensors1[k], tensors2[k]), k
        gmodel = latent_from_gguf(model, tensors2)
        logits_gguf, greedy_gguf = run(gmodel, ids)
        save_file({
            "input_ids": torch.tensor(ids, dtype=torch.int64),
            "logits_hf": logits_hf.contiguous(),
            "logits_gguf": logits_gguf.contiguous(),
            "greedy_hf": torch.tensor(greedy_hf, dtype=torch.int64),
            "greedy_gguf": torch.tensor(greedy_gguf, dtype=torch.int64),
        }, str(OUT / "expected.safetensors"))
        rel = ((logits_hf - logits_gguf).abs().max() / logits_hf.abs().max()).item()
        summary = {
            "prompt": PROMPT,
            "input_ids": ids,
            "samples": [{"text": s, "ids": sp.encode(s)} for s in SAMPLES],
            "hf_vs_gguf_scales_max_rel_diff": rel,
        }
        (OUT / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"logits: latent model vs the GGUF's values: max |diff| / max |logit| = {rel:.3e}")
        print("greedy hf  ", greedy_hf)
        print("greedy gguf", greedy_gguf)


def check():
    import hashlib
    exported = OUT / "exported"
    if exported.exists():
        shutil.rmtree(exported)
    exported.mkdir()
    subprocess.run(["cargo", "build", "--example", "bitnet_convert"], cwd=ROOT, check=True)
    exe = ROOT / "target" / "debug" / "examples" / "bitnet_convert"
    record = {}
    with tempfile.TemporaryDirectory() as tmp:
        for t in ["tq1_0", "tq2_0", "i2_s"]:
            f = exported / f"{t}.gguf" if t == "tq2_0" else Path(tmp) / f"{t}.gguf"
            subprocess.run([str(exe), "--gguf", str(OUT / "tiny-tq2_0.gguf"), "--to-gguf", str(f),
                            "--type", t, "--name", "tiny"], check=True)
            tensors, _ = gguf_tensors(f)
            # The values themselves would be 5 MB a file: a digest of their f32 bytes checks
            # every one exactly, with the first few kept to show what differs.
            record[t] = {k: {"shape": list(v.shape),
                             "sha256": hashlib.sha256(v.astype("<f4").tobytes()).hexdigest(),
                             "first": [float(x) for x in v.reshape(-1)[:8]]}
                         for k, v in sorted(tensors.items())}
            print(f"{t}: {len(tensors)} tensors dequantized by gguf-py")
        # the other embedding types we write, with TQ2_0 projections
        for e in ["q8_0", "bf16", "f32"]:
            f = Path(tmp) / f"tq2_0-{e}.gguf"
            subprocess.run([str(exe), "--gguf", str(OUT / "tiny-tq2_0.gguf"), "--to-gguf", str(f),
                            "--type", "tq2_0", "--embed-type", e, "--name", "tiny"], check=True)
            tensors, _ = gguf_tensors(f)
            record[f"tq2_0+{e}"] = digest({"token_embd.weight": tensors["token_embd.weight"]})
            print(f"tq2_0 with {e} embeddings: read back by gguf-py")
    record["dtypes"] = dtypes_file(exported / "dtypes.gguf")
    (exported / "gguf_py.json").write_text(json.dumps(record, indent=1) + "\n")


def digest(tensors):
    import hashlib
    return {k: {"shape": list(v.shape),
                "sha256": hashlib.sha256(v.astype("<f4").tobytes()).hexdigest(),
                "first": [float(x) for x in v.reshape(-1)[:8]]}
            for k, v in sorted(tensors.items())}


def dtypes_file(path):
    """A small GGUF written by gguf-py with one tensor of every type we read: F32, F16, BF16 and
    Q8_0 quantized by gguf-py, Q6_K, TQ1_0 and TQ2_0 as random blocks (gguf-py has no Q6_K
    quantizer; random TQ blocks have a different f16 scale per block, our per-group path). Its
    values, dequantized by gguf-py, go into the record."""
    import gguf
    from gguf import GGMLQuantizationType as T
    rng = np.random.default_rng(5)
    w = gguf.GGUFWriter(str(path), "dtypes")

    def f16_scales(n):
        return (rng.uniform(0.01, 1.0, n)).astype(np.float16).view(np.uint8).reshape(n, 2)

    x = rng.standard_normal((3, 64)).astype(np.float32)
    w.add_tensor("f32", x)
    w.add_tensor("f16", x.astype(np.float16))
    for name, t in [("bf16", T.BF16), ("q8_0", T.Q8_0)]:
        q = gguf.quants.quantize(x, t)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=t)
    nb = 4  # blocks of 256: tensors [2, 512]
    q6 = rng.integers(0, 256, (nb, 210), dtype=np.uint8)
    q6[:, 208:] = f16_scales(nb)
    w.add_tensor("q6_k", q6.reshape(2, -1), raw_shape=(2, 2 * 210), raw_dtype=T.Q6_K)
    tq1 = rng.integers(0, 256, (nb, 54), dtype=np.uint8)
    tq1[:, 52:] = f16_scales(nb)
    w.add_tensor("tq1_0", tq1.reshape(2, -1), raw_shape=(2, 2 * 54), raw_dtype=T.TQ1_0)
    codes = rng.integers(0, 3, (nb, 256), dtype=np.uint8)
    tq2 = np.zeros((nb, 66), dtype=np.uint8)
    for half in range(2):
        c = codes[:, 128 * half:128 * (half + 1)].reshape(nb, 4, 32)
        tq2[:, 32 * half:32 * (half + 1)] = c[:, 0] | c[:, 1] << 2 | c[:, 2] << 4 | c[:, 3] << 6
    tq2[:, 64:] = f16_scales(nb)
    w.add_tensor("tq2_0", tq2.reshape(2, -1), raw_shape=(2, 2 * 66), raw_dtype=T.TQ2_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tensors, _ = gguf_tensors(path)
    return digest(tensors)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["make", "check"])
    ap.add_argument("--llama-src", default=None)
    a = ap.parse_args()
    if a.cmd == "make":
        if not a.llama_src:
            sys.exit("make needs --llama-src (../shared/tools/llama-cpp --src)")
        make(a.llama_src)
    else:
        check()
