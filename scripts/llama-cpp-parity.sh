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
# Env: LLAMA_BIN (the folder of llama.cpp's binaries; default ../shared/tools/llama-cpp's),
#      PY (a python with gguf-py; default ../shared/tools/llama-cpp --python), THREADS (2).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-16}
THREADS=${THREADS:-2}
BIN=${LLAMA_BIN:-$(../shared/tools/llama-cpp | tail -1)}
PY=${PY:-$(../shared/tools/llama-cpp --python)}
nice cargo build -q --example bitnet_convert --example bitnet_generate
EX=target/debug/examples
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

FIX=tests/reference/gguf
"$EX/bitnet_convert" --gguf "$FIX/tiny-tq2_0.gguf" --to-hf "$WORK/hf" >/dev/null
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
# ours: the same bytes of our new tokens (EOS, a control token, has none)
ours() {
    "$EX/bitnet_generate" --gguf "$1" --prompt "$2" --max-new-tokens "$N" --hidden-act silu \
        --threads "$THREADS" 2>/dev/null | to_bytes "$1"
}

echo "llama.cpp: $BIN"
echo "N=$N new tokens, greedy (both stop at EOS), $THREADS threads; uptime: $(uptime)"
echo "A: llama.cpp on llama.cpp's file   B: llama.cpp on our export"
echo "C: ours on llama.cpp's file        D: ours on our export"
total=0; ab=0; cd=0; ac=0
for t in tq2_0 tq1_0; do
    for p in "ROMEO." "To be, or not to be" "KING HENRY." "What light" "First Citizen:"; do
        llama "$FIX/tiny-$t.gguf" "$p" >"$WORK/a"
        llama "$WORK/ours-$t.gguf" "$p" >"$WORK/b"
        ours "$FIX/tiny-$t.gguf" "$p" >"$WORK/c"
        ours "$WORK/ours-$t.gguf" "$p" >"$WORK/d"
        total=$((total + 1))
        cmp -s "$WORK/a" "$WORK/b" && ab=$((ab + 1))
        cmp -s "$WORK/c" "$WORK/d" && cd=$((cd + 1))
        cmp -s "$WORK/a" "$WORK/c" && ac=$((ac + 1))
        "$PY" - "$t" "$p" "$WORK" <<'PY'
import sys
t, p, w = sys.argv[1:]
r = {k: open(f"{w}/{k}", "rb").read() for k in "abcd"}
same = lambda x, y: "=" if r[x] == r[y] else "!="
common = next((i for i, (x, y) in enumerate(zip(r["a"], r["c"])) if x != y), min(len(r["a"]), len(r["c"])))
print(f"{t} {p!r:24} A{same('a','b')}B  C{same('c','d')}D  A{same('a','c')}C  "
      f"(A and C agree on their first {common} bytes)")
print(f"    A: {r['a']!r}\n    C: {r['c']!r}")
if r["a"] != r["b"]:
    print(f"    B: {r['b']!r}")
PY
    done
done
echo "llama.cpp reads our export as its own file (A = B): $ab of $total"
echo "we read both files the same (C = D): $cd of $total"
echo "llama.cpp and we give the same continuation (A = C): $ac of $total"
echo "llama-completion runs repeated for lost output: $retries"
