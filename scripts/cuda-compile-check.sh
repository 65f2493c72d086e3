#!/usr/bin/env bash
# cuda-compile-check.sh: compile the CUDA C that the crates hand to NVRTC at run time, here, without a
# GPU: nvcc to PTX for each virtual architecture the code is loaded with, then ptxas to SASS for an
# H100/H200 (sm_90), so that a syntax error, a wrong type or an instruction the target lacks shows up
# before a GPU session. Needs the CUDA build env: eval "$(../shared/tools/cuda-env)".
#
#   bash scripts/cuda-compile-check.sh        (from the repository root)
#
# Each source is `MATH` (crates/bitnet-quant/src/ops/cuda_util.rs) plus one `SRC` string, compiled as
# the crates do (--fmad=false). The tensor-core module (`SRC_MMA`) is loaded as compute_80 only.
set -euo pipefail
command -v nvcc >/dev/null && command -v ptxas >/dev/null || {
  echo "cuda-compile-check: nvcc/ptxas not found; eval \"\$(../shared/tools/cuda-env)\" first" >&2
  exit 2
}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/cuda-check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

python3 - "$tmp" <<'PY'
import re, sys
out = sys.argv[1]
def raw(path, name):
    m = re.search(r'const ' + name + r': &str = r#"(.*?)"#;', open(path).read(), re.S)
    if not m:
        sys.exit(f"cuda-compile-check: no {name} in {path}")
    return m.group(1)
math = raw("crates/bitnet-quant/src/ops/cuda_util.rs", "MATH")
sources = {
    "packed": math + raw("crates/bitnet-quant/src/packed/cuda.rs", "SRC"),
    "packed_mma": math + raw("crates/bitnet-quant/src/packed/cuda.rs", "SRC_MMA"),
    "adamw": raw("crates/bitnet-training/src/optim/adamw_gpu.rs", "SRC"),
}
for op in ["quantize", "learnable", "lsq", "scales"]:
    sources[op] = math + raw(f"crates/bitnet-quant/src/ops/{op}/cuda.rs", "SRC")
for name, src in sources.items():
    open(f"{out}/{name}.cu", "w").write(src)
PY

fail=0
for f in "$tmp"/*.cu; do
  name=$(basename "$f" .cu)
  case $name in packed_mma) archs="compute_80" ;; *) archs="compute_75 compute_80" ;; esac
  for a in $archs; do
    if nvcc -arch="$a" -ptx --fmad=false "$f" -o "$tmp/$name.$a.ptx" 2>"$tmp/err" \
      && ptxas -arch=sm_90 "$tmp/$name.$a.ptx" -o /dev/null 2>>"$tmp/err"; then
      echo "ok    $name ($a -> sm_90)"
    else
      echo "FAIL  $name ($a -> sm_90)"; sed 's/^/      /' "$tmp/err"; fail=1
    fi
  done
done
exit "$fail"
