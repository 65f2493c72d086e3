#!/usr/bin/env bash
# The MiniLM precision-fidelity sweep (docs/minilm.md, issue 20): each point distils the same student
# recipe for the same number of steps, only the precision of the linears differs.
#
#   scripts/minilm_sweep.sh OUT_DIR [POINT...]
#
# Runs the named points (default: all of them, in the order below) one after another with
# `nice -n 19`, writing OUT_DIR/POINT.out (the example's output, its last line the JSON
# summary), POINT.jsonl (evaluations), POINT.safetensors (the packed linears) and POINT.meta
# (wall seconds; the mean load average and number of rustc processes, sampled every 30 s,
# since timings on a shared machine depend on them). Points already finished in OUT_DIR are
# skipped. Environment: STEPS (default 800: about 15 minutes a point on an idle 2-core
# machine), EXTRA (flags appended to every point, e.g. "--train-embeddings"), BIN (a built
# ternarize_minilm to run instead of building target/release/examples/ternarize_minilm).
# Then: python3 scripts/minilm_tradeoff.py OUT_DIR
set -euo pipefail
out=${1:?usage: scripts/minilm_sweep.sh OUT_DIR [POINT...]}
shift
steps=${STEPS:-800}
recipe="--mode distill --steps $steps --lr 1e-3 --hidden-weight 1 --per-channel --eval-every 200 ${EXTRA:-}"

# name -> the flags that set its precision.
declare -A flags=(
  [ternary]=""
  [sens2-b4]="--keep-sensitive 2 --wide-bits 4"
  [sens4-b4]="--keep-sensitive 4 --wide-bits 4"
  [sens8-b4]="--keep-sensitive 8 --wide-bits 4"
  [random8-b4]="--keep-random 8 --wide-bits 4"
  [sens2-b8]="--keep-sensitive 2 --wide-bits 8"
  [sens4-b8]="--keep-sensitive 4 --wide-bits 8"
  [auto2.5-b4]="--auto-policy 2.5 --wide-bits 4"
  [all-4bit]="--policy docs/minilm/all-4bit.toml"
)
order=(ternary sens2-b4 sens4-b4 sens8-b4 random8-b4 sens2-b8 sens4-b8 auto2.5-b4 all-4bit)
points=("$@")
[ ${#points[@]} -eq 0 ] && points=("${order[@]}")

mkdir -p "$out"
if [ -z "${BIN:-}" ]; then
  cargo build --release --example ternarize_minilm
  BIN=target/release/examples/ternarize_minilm
fi
for p in "${points[@]}"; do
  [ -v "flags[$p]" ] || { echo "unknown point $p (known: ${order[*]})" >&2; exit 2; }
  if [ -s "$out/$p.out" ] && tail -n 1 "$out/$p.out" | grep -q '"command"'; then
    echo "$p: done already"
    continue
  fi
  echo "$p: $recipe ${flags[$p]}"
  # The load while it runs: the 1-minute load average and the number of rustc processes
  # (other builds on the same cores), every 30 s.
  ( while sleep 30; do echo "$(cut -d' ' -f1 /proc/loadavg) $(pgrep -c rustc || true)"; done ) > "$out/$p.load" &
  sampler=$!
  t0=$(date +%s)
  # shellcheck disable=SC2086 # the flag strings are meant to split
  nice -n 19 "$BIN" $recipe ${flags[$p]} \
    --log "$out/$p.jsonl" --out "$out/$p.safetensors" > "$out/$p.out" 2>&1 || status=$?
  t1=$(date +%s)
  kill "$sampler" 2>/dev/null || true
  awk -v p="$p" -v w=$((t1 - t0)) '{ l += $1; r += $2; n++ }
    END { printf "{\"point\":\"%s\",\"wall_seconds\":%d,\"load_mean\":%.2f,\"rustc_mean\":%.2f,\"samples\":%d}\n", p, w, n ? l / n : 0, n ? r / n : 0, n }' \
    "$out/$p.load" > "$out/$p.meta"
  if [ "${status:-0}" -ne 0 ]; then echo "$p failed ($status), see $out/$p.out" >&2; exit "$status"; fi
  tail -n 1 "$out/$p.out"
done
