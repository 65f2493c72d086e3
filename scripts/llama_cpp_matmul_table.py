"""Medians of scripts/llama-cpp-matmul.sh's runs as a markdown table.

usage: llama_cpp_matmul_table.py DIR TYPE... (DIR holds ours.<round>.txt, criterion's bencher
output, and <type>.<round>.txt, test-backend-ops perf output.)
"""

import glob
import re
import statistics
import sys

M, K = 4096, 14336


def ours(path):
    """{(kernel, n): GFLOPS} from lines like
    `test packed_llama_shapes/packed/avx512vnni/n8 ... bench:   1234567 ns/iter (+/- 89)`."""
    got = {}
    for line in open(path):
        m = re.search(r"packed/(\w+)/n(\d+)\s.*bench:\s+([\d,]+) ns/iter", line)
        if m:
            n, ns = int(m.group(2)), int(m.group(3).replace(",", ""))
            got[(m.group(1), n)] = 2 * M * n * K / ns
    return got


def theirs(path):
    """{n: GFLOPS} from test-backend-ops lines
    `MUL_MAT(type_a=tq2_0,...,m=4096,n=8,k=14336,...): 2 runs - 123 us/run - ... - 45.6 GFLOPS`."""
    got = {}
    for line in open(path):
        m = re.search(r"MUL_MAT\(.*m=4096,n=(\d+),k=14336.*?([\d.]+) (G|T|M)FLOPS", line)
        if m:
            scale = {"M": 1e-3, "G": 1.0, "T": 1e3}[m.group(3)]
            got[int(m.group(1))] = float(m.group(2)) * scale
    return got


def main():
    d, types = sys.argv[1], sys.argv[2:]
    runs = [ours(p) for p in sorted(glob.glob(f"{d}/ours.*.txt"))]
    keys = sorted({k for r in runs for k in r}, key=lambda k: (k[0], k[1]))
    other = {t: [theirs(p) for p in sorted(glob.glob(f"{d}/{t}.*.txt"))] for t in types}
    head = "| kernel | n | ours GFLOPS |" + "".join(f" {t} GFLOPS | ratio |" for t in types)
    print(head)
    print("|" + "---|" * (3 + 2 * len(types)))
    for kern, n in keys:
        o = statistics.median(r[(kern, n)] for r in runs if (kern, n) in r)
        row = f"| {kern} | {n} | {o:.1f} |"
        for t in types:
            vals = [r[n] for r in other[t] if n in r]
            if vals:
                v = statistics.median(vals)
                row += f" {v:.1f} | {o / v:.2f}x |"
            else:
                row += " - | - |"
        print(row)
    print(f"\n{len(runs)} rounds; medians of the per-round GFLOPS")


if __name__ == "__main__":
    main()
