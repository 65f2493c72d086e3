"""Collects the points of scripts/minilm_sweep.sh into docs/minilm_tradeoff.json, plots cosine
and top-5 agreement against bits per weight (docs/minilm_tradeoff.png), and prints the
README-ready table (README and docs/minilm.md).

    python3 scripts/minilm_tradeoff.py RUN_DIR [RUN_DIR...] \\
        [--model ../shared/models/all-MiniLM-L6-v2] [--corpus data/shakespeare/shakespeare.txt.gz]

Each RUN_DIR holds POINT.out (the example's output; its last line the JSON summary) and
POINT.meta (wall time and load). The isotropic-noise baseline at each point's cosine comes from
tests/reference/minilm_retrieval_noise.py (run here; a few minutes). Needs numpy and
matplotlib (and what the noise script needs: safetensors, tokenizers).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# Paths of the run's own files: not part of the command a reader reruns.
RUN_FLAGS = ("--log", "--out", "--write-policy", "--save", "--resume")


def command(flags):
    words, out, skip = flags.split(), [], False
    for w in words:
        if skip:
            skip = False
        elif w in RUN_FLAGS:
            skip = True
        else:
            out.append(w)
    return "cargo run --release --example ternarize_minilm -- " + " ".join(out)


def load_points(dirs):
    points = []
    for d in dirs:
        for name in sorted(os.listdir(d)):
            if not name.endswith(".out"):
                continue
            stem = name[:-4]
            with open(os.path.join(d, name)) as f:
                last = f.read().strip().splitlines()[-1]
            s = json.loads(last)
            meta_path = os.path.join(d, stem + ".meta")
            meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
            flags = s["command"].split()
            steps = int(flags[flags.index("--steps") + 1])
            d_ = s["distill"]
            points.append({
                "point": stem,
                "run": os.path.basename(os.path.normpath(d)),
                "steps": steps,
                "policy": s["policy"],
                "wide_layers": s["wide_layers"],
                "avg_bits": s["avg_bits"],
                "packed_bytes": s["packed_bytes"],
                "packed_layers_by_bits": s["packed_layers_by_bits"],
                "f32_linear_bytes": s["f32_linear_bytes"],
                "f32_embedding_bytes": s["f32_embedding_bytes"],
                "f32_layernorm_bytes": s["f32_layernorm_bytes"],
                "cosine": d_["cosine"],
                "top1": d_["top1"],
                "top5": d_["top5"],
                "train_seconds": d_["train_seconds"],
                "wall_seconds": meta.get("wall_seconds"),
                "load_mean": meta.get("load_mean"),
                "rustc_mean": meta.get("rustc_mean"),
                "command": command(s["command"]),
            })
    return points


def noise_baseline(points, model, corpus):
    cosines = sorted({p["cosine"] for p in points})
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "noise.json")
        subprocess.run([sys.executable, os.path.join(REPO, "tests/reference/minilm_retrieval_noise.py"),
                        model, corpus, "--cosines", ",".join(str(c) for c in cosines), "--json", out],
                       check=True)
        rows = {r["target_cosine"]: r for r in json.load(open(out))}
    for p in points:
        r = rows[p["cosine"]]
        p["noise_top1"] = r["retrieval_agreement"]
        p["noise_top5"] = r["top5_agreement"]


def plot(points, path):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for p in points:
        random = p["policy"] == "random"
        long = p["steps"] > min(q["steps"] for q in points)
        marker = "x" if random else ("s" if long else "o")
        color = "tab:red" if random else ("tab:green" if long else "tab:blue")
        label = p["point"] + (f" ({p['steps']} steps)" if long else "")
        ax1.scatter(p["avg_bits"], p["cosine"], marker=marker, color=color)
        ax1.annotate(label, (p["avg_bits"], p["cosine"]), fontsize=7, xytext=(4, -3), textcoords="offset points")
        ax2.scatter(p["avg_bits"], p["top5"], marker=marker, color=color)
        ax2.annotate(label, (p["avg_bits"], p["top5"]), fontsize=7, xytext=(4, -3), textcoords="offset points")
        if "noise_top5" in p:
            ax2.scatter(p["avg_bits"], p["noise_top5"], marker="_", color="gray", s=120)
    for ax, target, what in [(ax1, 0.97, "cosine"), (ax2, 0.90, "top-5 agreement")]:
        ax.axhline(target, color="gray", lw=0.8, ls="--")
        ax.axvline(2.5, color="gray", lw=0.8, ls=":")
        ax.set_xlabel("average bits per weight of the 36 linears (ternary = 1.58)")
        ax.set_ylabel(what + " to the fp teacher")
        ax.grid(alpha=0.3)
    ax1.set_title("mean cosine (target 0.97 at <= 2.5 bits)")
    ax2.set_title("top-5 agreement (target 90 %)\ngray dash: isotropic noise at the same cosine", fontsize=10)
    short = min(p["steps"] for p in points)
    budgets = sorted({p["steps"] for p in points if p["steps"] > short})
    longer = f", green squares {' and '.join(map(str, budgets))} steps" if budgets else ""
    fig.suptitle(f"all-MiniLM-L6-v2 distilled to fewer bits: blue {short} steps{longer}, red x random layers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(points):
    lines = ["| point | avg bits/weight (linears) | packed linears | cosine | top-1 | top-5 | noise top-1 / top-5 at that cosine | steps | command |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        noise = f"{p['noise_top1'] * 100:.1f} / {p['noise_top5'] * 100:.1f} %" if "noise_top1" in p else "n/a"
        lines.append(f"| {p['point']} | {p['avg_bits']:.2f} | {p['packed_bytes'] / 1e6:.2f} MB | {p['cosine']:.4f} | "
                     f"{p['top1'] * 100:.1f} % | {p['top5'] * 100:.1f} % | {noise} | {p['steps']} | `{p['command']}` |")
    return "\n".join(lines)


def main():
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("runs", nargs="+", help="run directories of scripts/minilm_sweep.sh")
    a.add_argument("--model", default="../shared/models/all-MiniLM-L6-v2")
    a.add_argument("--corpus", default=os.path.join(REPO, "data/shakespeare/shakespeare.txt.gz"))
    a.add_argument("--json", default=os.path.join(REPO, "docs/minilm_tradeoff.json"))
    a.add_argument("--png", default=os.path.join(REPO, "docs/minilm_tradeoff.png"))
    a.add_argument("--recipes", nargs="*", default=[],
                   help="run directories of recipe variants at one precision (other flags, same "
                        "bits): written to the JSON and tabled apart, not plotted")
    a.add_argument("--no-noise", action="store_true", help="skip the noise baseline")
    args = a.parse_args()
    points = load_points(args.runs)
    points.sort(key=lambda p: (p["steps"], p["avg_bits"], p["point"]))
    recipes = load_points(args.recipes)
    if not args.no_noise:
        noise_baseline(points + recipes, args.model, args.corpus)
    with open(args.json, "w") as f:
        json.dump({"points": points, "recipes": recipes}, f, indent=1)
        f.write("\n")
    plot(points, args.png)
    print(table(points))
    if recipes:
        print()
        print(table(recipes))


if __name__ == "__main__":
    main()
