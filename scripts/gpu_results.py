#!/usr/bin/env python3
"""Turn the output of `benches/cuda_packed.rs` (and `benches/bitnet_generate.rs` on CUDA) into rows of docs/gpu_results.json.

    python3 scripts/gpu_results.py --device "NVIDIA H200" --log bench.log [--log generate.log] [--json docs/gpu_results.json]

Reads criterion's lines `cuda_packed/<op>/<out>x<in>/b<batch> ... time: [lo mid hi]` (the name on
the same line or the one before) and the bench's `cuda_packed: <out>x<in>: packed <n> bytes` notes.
Each row: device, op, shape [out, in], batch, us (criterion's middle estimate), GB/s of weights read
once per call (packed bytes for `packed`, 4 or 2 bytes per weight for cuBLAS f32 / bf16), % of the
HBM bandwidth (--hbm-gbs, default the H200's 4800 GB/s) and, for `packed`, the time ratios
cuBLAS / packed (above 1: packed is faster). Rows already in the file for the same device, op,
shape and batch are replaced; the others are kept. Prints the rows it wrote as a table.
`cpu_packed` rows (the GPU machine's CPU) carry the kernel it chose and how many times faster the
GPU's `packed` row is, instead of a share of the HBM bandwidth.

Generation rows (`bitnet_2b_shapes/{decode,prefill128}_cuda_<L>layers_<V>vocab/<runtime>`): op
`bitnet_decode_<runtime>` or `bitnet_prefill128_<runtime>`, shape [layers, vocab], batch the
tokens of one forward (1 or 128), us per forward, tokens/s, and for decode the GB/s of the model's
weights (the bench's `weights N bytes` notes: each decode step reads every weight once) and the
ratio against the `bf16` runtime's time (above 1: faster than bf16).
"""

import argparse
import json
import os
import re
import sys

UNITS = {"ps": 1e-6, "ns": 1e-3, "us": 1.0, "\u00b5s": 1.0, "\u03bcs": 1.0, "ms": 1e3, "s": 1e6}
NAME = re.compile(r"^(cuda_packed/(\w+)/(\d+)x(\d+)/b(\d+))\b")
TIME = re.compile(r"time:\s+\[\s*([\d.]+)\s*(\S+)\s+([\d.]+)\s*(\S+)\s+([\d.]+)\s*(\S+)\s*\]")
NOTE = re.compile(r"cuda_packed: (\d+)x(\d+): packed (\d+) bytes")
CPU_NOTE = re.compile(r"cuda_packed: cpu kernel (\S+), (\d+) threads")
GEN = re.compile(r"^bitnet_2b_shapes/(decode|prefill128)_cuda_(\d+)layers_(\d+)vocab/(\w+)\b")
GEN_NOTE = re.compile(r"bitnet_generate: cuda_(\d+)layers_(\d+)vocab/(\w+): weights (\d+) bytes")


def parse(lines):
    """(op, out, inp, batch) -> microseconds, and (out, inp) -> packed bytes."""
    times, packed_bytes, pending = {}, {}, None
    for line in lines:
        line = line.rstrip("\n")
        note = NOTE.search(line)
        if note:
            packed_bytes[(int(note.group(1)), int(note.group(2)))] = int(note.group(3))
            continue
        note = CPU_NOTE.search(line)
        if note:
            packed_bytes["cpu_kernel"] = f"{note.group(1)} ({note.group(2)} threads)"
            continue
        note = GEN_NOTE.search(line)
        if note:
            packed_bytes[("bitnet", int(note.group(1)), int(note.group(2)), note.group(3))] = int(note.group(4))
            continue
        name = NAME.match(line.strip())
        if name:
            pending = (name.group(2), int(name.group(3)), int(name.group(4)), int(name.group(5)))
        gen = GEN.match(line.strip())
        if gen:
            kind, runtime = gen.group(1), gen.group(4)
            pending = (f"bitnet_{kind}_{runtime}", int(gen.group(2)), int(gen.group(3)),
                       1 if kind == "decode" else 128)
        t = TIME.search(line)
        if t and pending:
            value, unit = float(t.group(3)), t.group(4)
            if unit not in UNITS:
                sys.exit(f"gpu_results: unknown time unit {unit!r} in: {line}")
            times[pending] = value * UNITS[unit]
            pending = None
    return times, packed_bytes


def rows(device, times, packed_bytes, hbm_gbs):
    out_rows = []
    for (op, out, inp, batch), us in sorted(times.items()):
        if op.startswith("bitnet_"):
            out_rows.append(generation_row(device, op, out, inp, batch, us, times, packed_bytes, hbm_gbs))
            continue
        if op in ("packed", "cpu_packed"):
            if (out, inp) not in packed_bytes:
                sys.exit(f"gpu_results: no 'packed N bytes' note for {out}x{inp}")
            nbytes = packed_bytes[(out, inp)]
        elif op == "cublas_f32":
            nbytes = out * inp * 4
        elif op == "cublas_bf16":
            nbytes = out * inp * 2
        else:
            sys.exit(f"gpu_results: unknown op {op!r}")
        row = base_row(device, op, [out, inp], batch, us)
        row.update(bandwidth(nbytes, us, hbm_gbs))
        if op == "cpu_packed":
            # The host's CPU: no share of the GPU's bandwidth; the kernel it chose instead.
            del row["pct_hbm"]
            row["cpu_kernel"] = packed_bytes.get("cpu_kernel", "unknown")
            gpu = times.get(("packed", out, inp, batch))
            if gpu is not None:
                row["ratio_gpu_packed_vs_this"] = round(us / gpu, 3)
        if op == "packed":
            for base in ("cublas_f32", "cublas_bf16"):
                t = times.get((base, out, inp, batch))
                if t is not None:
                    row[f"ratio_vs_{base}"] = round(t / us, 3)
        out_rows.append(row)
    return out_rows


def base_row(device, op, shape, batch, us):
    return {"device": device, "op": op, "shape": shape, "batch": batch, "us": round(us, 3)}


def bandwidth(nbytes, us, hbm_gbs):
    """GB/s of nbytes read once in us, and its share of the HBM bandwidth."""
    gbs = nbytes / (us * 1e3)
    return {"gb_per_s": round(gbs, 1), "pct_hbm": round(100.0 * gbs / hbm_gbs, 2)}


def generation_row(device, op, layers, vocab, tokens, us, times, packed_bytes, hbm_gbs):
    row = base_row(device, op, [layers, vocab], tokens, us)
    row["tokens_per_s"] = round(tokens / (us * 1e-6), 1)
    kind, runtime = op[len("bitnet_"):].split("_", 1)
    nbytes = packed_bytes.get(("bitnet", layers, vocab, runtime))
    if kind == "decode" and nbytes is not None:
        row.update(bandwidth(nbytes, us, hbm_gbs))
    base = times.get((f"bitnet_{kind}_bf16", layers, vocab, tokens))
    if base is not None and runtime != "bf16":
        row["ratio_vs_bf16"] = round(base / us, 3)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", required=True, help="GPU name, as nvidia-smi prints it")
    ap.add_argument("--log", required=True, action="append",
                    help="a bench's output (stdout and stderr); repeat for several")
    ap.add_argument("--json", default="docs/gpu_results.json")
    ap.add_argument("--hbm-gbs", type=float, default=4800.0, help="HBM bandwidth in GB/s")
    a = ap.parse_args()
    lines = []
    for path in a.log:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines.extend(f)
    times, packed_bytes = parse(lines)
    new = rows(a.device, times, packed_bytes, a.hbm_gbs)
    if not new:
        sys.exit(f"gpu_results: no bench rows in {', '.join(a.log)}")
    old = []
    if os.path.exists(a.json):
        with open(a.json, encoding="utf-8") as f:
            old = json.load(f)
    key = lambda r: (r["device"], r["op"], tuple(r["shape"]), r["batch"])
    fresh = {key(r) for r in new}
    merged = [r for r in old if key(r) not in fresh] + new
    tmp = a.json + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(merged, f, indent=1)
        f.write("\n")
    os.replace(tmp, a.json)
    print(f"{'op':26} {'shape':>12} {'batch':>5} {'us':>9} {'GB/s':>8} {'% HBM':>6} {'x f32':>6} {'x bf16':>6}")
    for r in new:
        shape = "x".join(map(str, r["shape"]))
        f32 = r.get("ratio_vs_cublas_f32", "")
        bf16 = r.get("ratio_vs_cublas_bf16", r.get("ratio_vs_bf16", ""))
        print(f"{r['op']:26} {shape:>12} {r['batch']:>5} {r['us']:>9} {r.get('gb_per_s', ''):>8} "
              f"{r.get('pct_hbm', ''):>6} {f32:>6} {bf16:>6}")


if __name__ == "__main__":
    main()
