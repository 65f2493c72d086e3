#!/usr/bin/env bash
# llama-cpp-parity: llama.cpp and our packed runtime run the same GGUF files greedily and the
# continuations are compared byte for byte. Not part of CI (it needs llama.cpp's tools).
#
#   scripts/llama-cpp-parity.sh            # N=16 new tokens per prompt
#   N=32 scripts/llama-cpp-parity.sh
#
# Files: the llama.cpp-converted fixtures (tests/reference/gguf/tiny-tq{1,2}_0.gguf: llama.cpp's
# converter, our reader), and the same model exported by our converter (GGUF -> HF -> GGUF, as
# tq2_0 and tq1_0: our writer, llama.cpp's reader). llama.cpp: `llama-completion -m F -p P -n N
# --temp 0`; ours: `bitnet_generate --gguf F --prompt P --max-new-tokens N --hidden-act silu`
# (llama.cpp's `bitnet` graph applies SiLU to the gate, not transformers' ReLU², and the file does
# not record which: this runs the same function on both sides). Our new token ids are turned into
# bytes with the file's vocabulary (gguf-py) and compared with llama.cpp's output bytes.
# When a python with torch and transformers is there (TORCH_PY, default ../venv-hf/bin/python),
# transformers runs the same model too (T: the HF export of the file, with hidden_act = "silu"):
# the reference for which of llama.cpp and us computes BitNetForCausalLM's numerics.
# Env: LLAMA_BIN (the folder of llama.cpp's binaries; default ../shared/tools/llama-cpp's),
#      PY (a python with gguf-py; default ../shared/tools/llama-cpp --python), THREADS (2).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-16}
THREADS=${THREADS:-2}
BIN=${LLAMA_BIN:-$(../shared/tools/llama-cpp | tail -1)}
PY=${PY:-$(../shared/tools/llama-cpp --python)}
TORCH_PY=${TORCH_PY:-../venv-hf/bin/python}
nice cargo build -q --example bitnet_convert --example bitnet_generate
EX=target/debug/examples
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

FIX=tests/reference/gguf
"$EX/bitnet_convert" --gguf "$FIX/tiny-tq2_0.gguf" --to-hf "$WORK/hf" >/dev/null
# transformers' model of what llama.cpp's bitnet graph computes: the same weights with SiLU
mkdir "$WORK/hf-silu"
cp "$WORK/hf/model.safetensors" "$WORK/hf-silu/"
"$PY" -c 'import json, sys
c = json.load(open(sys.argv[1])); c["hidden_act"] = "silu"
json.dump(c, open(sys.argv[2], "w"))' "$WORK/hf/config.json" "$WORK/hf-silu/config.json"
have_torch=no
if [ -x "$TORCH_PY" ] && "$TORCH_PY" -c "import torch, transformers" 2>/dev/null; then have_torch=yes; fi
for t in tq2_0 tq1_0; do
    "$EX/bitnet_convert" --hf "$WORK/hf" --to-gguf "$WORK/ours-$t.gguf" --type "$t" \
        --tokenizer-from "$FIX/tiny-tq2_0.gguf" --name tiny >/dev/null
done

# bytes of token ids (JSON list on stdin's last line, key new_tokens) in file $1's vocabulary
to_bytes() {
    "$PY" -c '
import json, sys, gguf
r = gguf.GGUFReader(sys.argv[1])
f = r.fields
toks = [bytes(f["tokenizer.ggml.tokens"].parts[i]).decode() for i in f["tokenizer.ggml.tokens"].data]
types = [int(f["tokenizer.ggml.token_type"].parts[i][0]) for i in f["tokenizer.ggml.token_type"].data]
ids = json.loads(sys.stdin.read().strip().splitlines()[-1])["new_tokens"]
out = b""
for i in ids:
    t, ty = toks[i], types[i]
    if ty == 3:
        continue
    if ty == 6:
        out += bytes([int(t[3:5], 16)])
    else:
        out += t.replace("\u2581", " ").encode()
sys.stdout.buffer.write(out)
' "$1"
}

# llama.cpp's stdout: the continuation, then " [end of text]\n" when it stopped at EOS, then
# "\n\n". On this 2-core machine llama-completion now and then loses the end of its stdout (or
# all of it; through a pipe more often than into a file) while computing the same tokens, so a
# run whose output lacks the final "\n\n" is repeated (at most 5 times; `retries` counts them).
retries=0
llama() {
    local k
    for k in 1 2 3 4 5; do
        "$BIN/llama-completion" -m "$1" -p "$2" -n "$N" --temp 0 -no-cnv --no-display-prompt \
            --simple-io -t "$THREADS" -c 128 2>/dev/null </dev/null >"$WORK/raw" || true
        if "$PY" -c 'import sys; sys.exit(0 if open(sys.argv[1], "rb").read().endswith(b"\n\n") else 1)' "$WORK/raw"; then
            break
        fi
        retries=$((retries + 1))
    done
    "$PY" -c 'import sys
b = open(sys.argv[1], "rb").read()
b = b[:-2] if b.endswith(b"\n\n") else b
b = b[:-len(b" [end of text]\n")] if b.endswith(b" [end of text]\n") else b
sys.stdout.buffer.write(b)' "$WORK/raw"
}
# ours: the same bytes of our new tokens (EOS, a control token, has none); the JSON line kept
ours() {
    "$EX/bitnet_generate" --gguf "$1" --prompt "$2" --max-new-tokens "$N" --hidden-act silu \
        --threads "$THREADS" 2>/dev/null | tail -1 >"$WORK/ours.json"
    to_bytes "$1" <"$WORK/ours.json"
}
# transformers, greedy from our prompt ids (the tokenizer test checks them against sentencepiece)
transformers() {
    "$TORCH_PY" -c '
import json, os, sys
os.environ["TORCHDYNAMO_DISABLE"] = "1"
import torch
from transformers import BitNetForCausalLM
m = BitNetForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = json.load(open(sys.argv[2]))["prompt_tokens"]
out = m.generate(torch.tensor([ids]), max_new_tokens=int(sys.argv[3]), do_sample=False,
                 pad_token_id=0, eos_token_id=2)[0, len(ids):].tolist()
if out and out[-1] == 2:
    out = out[:-1]
print(json.dumps({"new_tokens": out}))' "$WORK/hf-silu" "$WORK/ours.json" "$N" 2>/dev/null | to_bytes "$1"
}

echo "llama.cpp: $BIN"
echo "N=$N new tokens, greedy (both stop at EOS), $THREADS threads; uptime: $(uptime)"
echo "A: llama.cpp on llama.cpp's file   B: llama.cpp on our export"
echo "C: ours on llama.cpp's file        D: ours on our export"
echo "T: transformers, the same weights with SiLU (torch python: $have_torch)"
total=0; ab=0; cd=0; ac=0; tc=0; ta=0
for t in tq2_0 tq1_0; do
    for p in "ROMEO." "To be, or not to be" "KING HENRY." "What light" "First Citizen:"; do
        llama "$FIX/tiny-$t.gguf" "$p" >"$WORK/a"
        llama "$WORK/ours-$t.gguf" "$p" >"$WORK/b"
        ours "$FIX/tiny-$t.gguf" "$p" >"$WORK/c"
        ours "$WORK/ours-$t.gguf" "$p" >"$WORK/d"
        : >"$WORK/t"
        if [ $have_torch = yes ]; then
            transformers "$FIX/tiny-$t.gguf" >"$WORK/t"
            cmp -s "$WORK/t" "$WORK/c" && tc=$((tc + 1))
            cmp -s "$WORK/t" "$WORK/a" && ta=$((ta + 1))
        fi
        total=$((total + 1))
        cmp -s "$WORK/a" "$WORK/b" && ab=$((ab + 1))
        cmp -s "$WORK/c" "$WORK/d" && cd=$((cd + 1))
        cmp -s "$WORK/a" "$WORK/c" && ac=$((ac + 1))
        "$PY" - "$t" "$p" "$WORK" <<'PY'
import sys
t, p, w = sys.argv[1:]
r = {k: open(f"{w}/{k}", "rb").read() for k in "abcdt"}
same = lambda x, y: "=" if r[x] == r[y] else "!="
common = next((i for i, (x, y) in enumerate(zip(r["a"], r["c"])) if x != y), min(len(r["a"]), len(r["c"])))
print(f"{t} {p!r:24} A{same('a','b')}B  C{same('c','d')}D  A{same('a','c')}C  T{same('t','c')}C  "
      f"(A and C agree on their first {common} bytes)")
print(f"    A: {r['a']!r}\n    C: {r['c']!r}")
if r["t"] != r["c"]:
    print(f"    T: {r['t']!r}")
if r["a"] != r["b"]:
    print(f"    B: {r['b']!r}")
PY
    done
done
echo "llama.cpp reads our export as its own file (A = B): $ab of $total"
echo "we read both files the same (C = D): $cd of $total"
echo "llama.cpp and we give the same continuation (A = C): $ac of $total"
[ $have_torch = no ] || echo "transformers gives our continuation (T = C): $tc of $total; llama.cpp's (T = A): $ta of $total"
echo "llama-completion runs repeated for lost output: $retries"
