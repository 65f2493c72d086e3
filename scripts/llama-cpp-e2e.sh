#!/usr/bin/env bash
# End-to-end generation speed against llama.cpp's llama-bench on the same TQ2_0 GGUF file, the
# same threads, interleaved rounds (docs/gguf.md, "End to end against llama-bench"). Builds a
# model with bitnet-b1.58-2B-4T's layer shapes (random ternary weights, LAYERS of its 30 layers),
# converts it, then alternates ours and llama-bench. Run it on an idle machine. Not part of CI.
#
#   scripts/llama-cpp-e2e.sh [ROUNDS=3] [LAYERS=4]
# OURS_FLAGS: more bitnet_generate flags (e.g. "--dtype f32": the head in f32 instead of the
# file's f16, which llama.cpp reads).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
layers=${2:-4}
bin=$(../shared/tools/llama-cpp | tail -1)
cargo build --release -q --example bitnet_random_checkpoint --example bitnet_convert --example bitnet_generate
ex=target/release/examples
dir=runs/bitnet-${layers}l
gguf=$dir.tq2_0.gguf
[ -d "$dir/offline" ] || "$ex/bitnet_random_checkpoint" --layers "$layers" --out "$dir" | tail -1
[ -f "$gguf" ] || "$ex/bitnet_convert" --hf "$dir/offline" --to-gguf "$gguf" --type tq2_0 --byte-vocab | tail -1
ids=$(python3 -c "print(','.join(str((i*7919+13)%32000) for i in range(128)))")
for round in $(seq "$rounds"); do
    for t in 1 2; do
        echo "round $round, $t thread(s), load $(cut -d' ' -f1 /proc/loadavg)"
        "$ex/bitnet_generate" --gguf "$gguf" --token-ids "$ids" --max-new-tokens 32 --threads "$t" ${OURS_FLAGS:-} 2>/dev/null \
            | tail -1 | python3 -c "import json,sys; d=json.load(sys.stdin); print(f\"  ours ({d['dtype']} head): prefill {d['prompt_tokens_per_s']:.1f} tokens/s, generation {d['tokens_per_s']:.2f} tokens/s\")"
        "$bin/llama-bench" -m "$gguf" -t "$t" -p 128 -n 32 -r 2 -o jsonl 2>/dev/null | python3 -c "
import json, sys
r = {('prefill' if d['n_prompt'] else 'generation'): d['avg_ts'] for d in map(json.loads, sys.stdin)}
print(f\"  llama.cpp: prefill {r['prefill']:.1f} tokens/s, generation {r['generation']:.2f} tokens/s\")"
    done
done
