#!/usr/bin/env bash
# gpu-run.sh: everything a lent GPU machine should run, each step under its own time limit, results
# appended to $OUT as each step ends (a step that times out still leaves the earlier ones).
#
# Here (the CPU machine), once, from the repository root:
#   ../shared/tools/gpu-bundle --workspace --lib --tests --bench cuda_packed --bench bitnet_generate
#   echo .gpu-bundle >> .git/info/exclude
# Then the device tool: run, carry [".gpu-bundle"], timeout_s 600. All steps take longer than one
# call's 600 s, so make two calls while the machine is warm:
#   GPU_RUN_STEPS="gpu tests" bash scripts/gpu-run.sh
#   GPU_RUN_STEPS="bench generate" bash scripts/gpu-run.sh
#
# Steps (limits in seconds, env overrides):
#   gpu      nvidia-smi and the CPU's flags (AVX-512 / VNNI decide the CPU packed kernel) -> gpu.txt
#   tests    every test binary of the bundle (GPU_RUN_TESTS_S, default 300)                -> tests.log
#   bench    benches/cuda_packed.rs with short criterion times (GPU_RUN_BENCH_S, 200)       -> bench.log
#            then scripts/gpu_results.py -> gpu_results.json (docs/gpu_results.json merged) and
#            gpu_results.txt: copy the json to docs/ and commit it.
#   generate benches/bitnet_generate.rs on the GPU (BITNET_BENCH_DEVICE=cuda) at the real
#            bitnet-b1.58-2B-4T size, 30 layers and 128256 tokens (GPU_RUN_GENERATE_S, 240):
#            packed against bf16 and f32 -> generate.log, rows in gpu_results.json too
# Not here: char_lm --device cuda (gpu-bundle packs test and bench binaries, not examples).
# steps.log: one line per step with its exit status and seconds (124: the step hit its limit).
# Env: OUT (default gpu-results), GPU_BUNDLE (default .gpu-bundle), GPU_RUN_STEPS (default
# "gpu tests bench": a subset to run fewer).
set -uo pipefail

OUT=${OUT:-gpu-results}
BUNDLE=${GPU_BUNDLE:-.gpu-bundle}
STEPS=${GPU_RUN_STEPS:-gpu tests bench generate}
mkdir -p "$OUT"
log() { echo "gpu-run: $*" | tee -a "$OUT/steps.log" >&2; }

[ -f "$BUNDLE/run.sh" ] && [ -f "$BUNDLE/tests.tar.xz" ] || {
  log "no bundle at $BUNDLE (build it with gpu-bundle, see the top of this script)"
  exit 2
}
# The CUDA library path the bundle's run.sh computes (the snippet gpu-bundle embedded there).
eval "$(sed -n '/^# --- bitnet cuda-env: LD_LIBRARY_PATH/,/^# --- end bitnet cuda-env snippet/p' "$BUNDLE/run.sh")"

BIN=$(mktemp -d "${TMPDIR:-/tmp}/gpu-run.XXXXXX")
trap 'rm -rf "$BIN"' EXIT
tar -xJf "$BUNDLE/tests.tar.xz" -C "$BIN" || { log "cannot unpack $BUNDLE/tests.tar.xz"; exit 2; }
chmod +x "$BIN"/*

# The bundled binary of target NAME of kind KIND (tests.tsv: file, package dir, kind, name).
binary() { awk -F'\t' -v k="$1" -v n="$2" '$3 == k && $4 == n { print $1; exit }' "$BUNDLE/tests.tsv"; }

# step NAME LIMIT CMD...: runs CMD with a time limit, its output to $OUT/NAME.log. CMD may be one
# of the functions below (exported: `timeout` runs it in a child bash).
step() {
  local name=$1 limit=$2 start rc
  shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  start=$(date +%s)
  timeout "$limit" bash -c '"$@"' step "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  log "$name: exit $rc after $(( $(date +%s) - start ))s (limit ${limit}s)"
  return "$rc"
}

gpu_info() {
  nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv
  nvidia-smi
  echo "cpu flags (avx512* / vnni):"
  grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E 'avx512|vnni|avx2' | sort | tr '\n' ' '
  echo
  nproc
}
export -f gpu_info
step gpu 30 gpu_info
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
DEVICE=${DEVICE:-unknown GPU}

# Every test binary, as gpu-bundle's run.sh runs them (from its package folder). OUT is unset for
# it so that its own log does not land in $OUT twice.
step tests "${GPU_RUN_TESTS_S:-300}" env -u OUT bash "$BUNDLE/run.sh"

bench() {
  local b
  b=$(binary bench cuda_packed)
  [ -n "$b" ] || { echo "benches/cuda_packed.rs is not in the bundle (gpu-bundle ... --bench cuda_packed)"; return 3; }
  "$BIN/$b" --bench --warm-up-time 0.5 --measurement-time 2 --noplot
}
generate() {
  local b
  b=$(binary bench bitnet_generate)
  [ -n "$b" ] || { echo "benches/bitnet_generate.rs is not in the bundle (gpu-bundle ... --bench bitnet_generate)"; return 3; }
  BITNET_BENCH_DEVICE=cuda BITNET_BENCH_LAYERS=30 BITNET_BENCH_VOCAB=128256 \
    "$BIN/$b" --bench --warm-up-time 0.5 --measurement-time 3 --noplot
}
export -f bench generate binary
export BIN BUNDLE
step bench "${GPU_RUN_BENCH_S:-200}" bench
step generate "${GPU_RUN_GENERATE_S:-240}" generate
logs=()
for l in bench generate; do
  case " $STEPS " in *" $l "*) [ -s "$OUT/$l.log" ] && logs+=(--log "$OUT/$l.log") ;; esac
done
if [ ${#logs[@]} -gt 0 ]; then
  [ -f docs/gpu_results.json ] && cp docs/gpu_results.json "$OUT/gpu_results.json"
  # Whatever rows the benches finished before a timeout still become results.
  python3 scripts/gpu_results.py --device "$DEVICE" "${logs[@]}" \
    --json "$OUT/gpu_results.json" >"$OUT/gpu_results.txt" 2>&1
  log "gpu_results: exit $? ($(grep -c . "$OUT/gpu_results.txt") lines in gpu_results.txt)"
fi

log "done; results in $OUT ($(ls "$OUT" | tr '\n' ' '))"
