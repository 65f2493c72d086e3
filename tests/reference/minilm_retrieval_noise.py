"""How far top-1 and top-5 retrieval agreement can get at a given mean cosine, on
ternarize_minilm's validation set: the teacher's (fp all-MiniLM-L6-v2) embeddings of the 500
validation lines, then students made by adding random isotropic noise to them, scaled to each
target mean cosine.

A cosine target and a retrieval target are only consistent if an error of that cosine leaves
the nearest neighbours in place. This measures that for noise with no structure; a trained
student's error is not isotropic, but a real student can be read against the same curve (its
agreement above or below the noise's at its own cosine).

Agreement as ternarize_minilm measures it: top-1, the student's nearest other line is the
teacher's; top-5, the teacher's nearest is among the student's 5 nearest.

    python3 tests/reference/minilm_retrieval_noise.py path/to/all-MiniLM-L6-v2 \
        data/shakespeare/shakespeare.txt.gz [--cosines 0.93,0.95] [--json OUT]

Needs numpy, safetensors, tokenizers. Takes a few minutes (the numpy encoder, in f64).
"""
import argparse
import gzip
import json
import math

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

import minilm_reference as ref

TRAIN_SHARE = 0.9  # bitnet::datasets::shakespeare::TRAIN_SHARE
VAL = 500
MAX_LEN = 64


def erf(x):
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): np.vectorize(math.erf) takes minutes here.
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
               + 0.254829592) * t * np.exp(-a * a)
    return s * y


ref.gelu = lambda x: 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def validation_lines(path):
    """As examples/ternarize_minilm.rs: the last 10 % of the bytes, lines of 5+ words, trimmed,
    first occurrence only, the first VAL of them."""
    raw = open(path, "rb").read()
    if path.endswith(".gz"):
        raw = gzip.decompress(raw)
    text = raw[int(len(raw) * TRAIN_SHARE):].decode("utf-8", errors="replace")
    seen, out = set(), []
    for line in text.split("\n"):
        line = line.rstrip("\r").strip()
        if len(line.split()) >= 5 and line not in seen:
            seen.add(line)
            out.append(line)
    return out[:VAL]


def nearest(e):
    s = e @ e.T
    np.fill_diagonal(s, -np.inf)
    return s.argmax(1), s


def agreement(student, nn, k):
    """Share of lines whose teacher neighbour nn[i] has fewer than k other lines above it in
    the student's similarities (the line itself excluded)."""
    _, s = nearest(student)
    at_nn = s[np.arange(len(nn)), nn]
    return float(np.mean((s > at_nn[:, None]).sum(1) < k))


def main(model_dir, corpus, targets, out):
    cfg = json.load(open(f"{model_dir}/config.json"))
    t = {k: v.astype(np.float64) for k, v in load_file(f"{model_dir}/model.safetensors").items()
         if v.dtype != np.int64}
    tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    tok.no_padding()
    lines = validation_lines(corpus)
    teacher = np.stack([ref.embed(t, cfg, tok.encode(s).ids[:MAX_LEN]) for s in lines])
    nn, sim = nearest(teacher)
    top = np.sort(sim, 1)[:, ::-1]
    gap = top[:, 0] - top[:, 1]
    print(f"{len(lines)} validation lines; teacher similarity to the nearest neighbour: median "
          f"{np.median(top[:, 0]):.3f}; gap to the second nearest: median {np.median(gap):.4f}, "
          f"under 0.01 for {np.mean(gap < 0.01) * 100:.0f} %, under 0.02 for "
          f"{np.mean(gap < 0.02) * 100:.0f} %")
    rows = []
    for target in targets:
        # One generator per target, seeded by it: a target's draw does not depend on which other
        # targets are in the list, so adding a point leaves the others' baselines as they were.
        rng = np.random.default_rng(int(round(target * 1e6)))
        # Noise orthogonal in expectation: cos = 1 / sqrt(1 + sigma^2 d), so sigma for the target.
        d = teacher.shape[1]
        sigma = math.sqrt((1.0 / target ** 2 - 1.0) / d)
        top1, top5, cos = [], [], []
        for _ in range(20):
            s = teacher + rng.normal(0.0, sigma, teacher.shape)
            s /= np.linalg.norm(s, axis=1, keepdims=True)
            cos.append(np.mean(np.sum(s * teacher, 1)))
            top1.append(agreement(s, nn, 1))
            top5.append(agreement(s, nn, 5))
        r = lambda v: round(float(v), 4)
        rows.append({"target_cosine": target, "mean_cosine": r(np.mean(cos)),
                     "retrieval_agreement": r(np.mean(top1)),
                     "agreement_min": r(np.min(top1)), "agreement_max": r(np.max(top1)),
                     "top5_agreement": r(np.mean(top5)),
                     "top5_min": r(np.min(top5)), "top5_max": r(np.max(top5))})
        print(json.dumps(rows[-1]))
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("corpus")
    p.add_argument("--cosines", default="0.90,0.93,0.95,0.97,0.98,0.99,0.995",
                   help="target mean cosines, comma-separated (default: %(default)s)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    a = p.parse_args()
    main(a.model_dir, a.corpus, [float(c) for c in a.cosines.split(",")], a.json)
