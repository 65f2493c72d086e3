"""Reference sentence embeddings of all-MiniLM-L6-v2 from an independent numpy implementation.

Used to write the expected values of tests/minilm.rs. Needs numpy, safetensors, tokenizers:
    python3 tests/reference/minilm_reference.py path/to/all-MiniLM-L6-v2
Prints, per sentence, the token ids, the embedding's first 8 values, and the pairwise cosines.
"""
import json
import math
import sys

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

SENTENCES = [
    "This is an example sentence",
    "Each sentence is converted",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome for kids.",
]


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def gelu(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def embed(t, cfg, ids):
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    hd, eps = h // nh, cfg["layer_norm_eps"]
    n = len(ids)
    x = t["embeddings.word_embeddings.weight"][ids]
    x = x + t["embeddings.position_embeddings.weight"][:n] + t["embeddings.token_type_embeddings.weight"][0]
    x = layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        lin = lambda name, y: y @ t[p + name + ".weight"].T + t[p + name + ".bias"]
        q = lin("attention.self.query", x).reshape(n, nh, hd).transpose(1, 0, 2)
        k = lin("attention.self.key", x).reshape(n, nh, hd).transpose(1, 0, 2)
        v = lin("attention.self.value", x).reshape(n, nh, hd).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
        s = np.exp(s - s.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
        ctx = (s @ v).transpose(1, 0, 2).reshape(n, h)
        x = layer_norm(lin("attention.output.dense", ctx) + x,
                       t[p + "attention.output.LayerNorm.weight"], t[p + "attention.output.LayerNorm.bias"], eps)
        f = gelu(lin("intermediate.dense", x))
        x = layer_norm(lin("output.dense", f) + x,
                       t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"], eps)
    m = x.mean(0)
    return m / np.linalg.norm(m)


def main(model_dir):
    cfg = json.load(open(f"{model_dir}/config.json"))
    t = {k: v.astype(np.float64) for k, v in load_file(f"{model_dir}/model.safetensors").items()
         if v.dtype != np.int64}
    tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    tok.no_padding()  # the file pads to 128; the embedding is the mean over real tokens only
    embs = []
    for s in SENTENCES:
        ids = tok.encode(s).ids
        e = embed(t, cfg, ids)
        embs.append(e)
        print(repr(s), ids, [round(float(v), 6) for v in e[:8]])
    for i in range(len(SENTENCES)):
        print([round(float(embs[i] @ embs[j]), 6) for j in range(len(SENTENCES))])


if __name__ == "__main__":
    main(sys.argv[1])
