#!/usr/bin/env bash
# Our packed ternary matmul against llama.cpp's TQ2_0 (and TQ1_0) CPU matmul on the rows that
# `test-backend-ops perf -o MUL_MAT` times: m=4096 outputs, k=14336 inputs, n = 1, 2, 3, 4, 5, 8,
# 512 tokens, one thread on a 2-core machine (test-backend-ops uses hardware_concurrency / 2;
# set THREADS to pin ours to another count). Runs alternate, ours then theirs, ROUNDS times, with
# `uptime` before each; prints the median GFLOPS of each and their ratio. Needs llama.cpp's tools
# (../shared/tools/llama-cpp builds them once); stays out of CI.
#
#   scripts/llama-cpp-matmul.sh [ROUNDS]        # default 3
#   KERNEL=avx2 scripts/llama-cpp-matmul.sh     # another of our kernels (default: detected)
#   TYPES="tq2_0" scripts/llama-cpp-matmul.sh   # llama.cpp types (default: tq2_0 tq1_0)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
types=${TYPES:-"tq2_0 tq1_0"}
threads=${THREADS:-$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))}
tool=${LLAMA_CPP_TOOL:-../shared/tools/llama-cpp}
bin=$("$tool" | tail -1)
out=target/llama-cpp-matmul
mkdir -p "$out"
rm -f "$out"/*.txt

nice cargo bench --bench packed_llama_shapes --no-run 2>"$out/build.log"
filter="packed/${KERNEL:-}"
for i in $(seq 1 "$rounds"); do
    echo "round $i: $(uptime)" | tee -a "$out/uptime.txt" >&2
    BITNET_BENCH_THREADS=$threads cargo bench -q --bench packed_llama_shapes -- \
        --output-format bencher --warm-up-time 1 --measurement-time 3 "$filter" \
        >"$out/ours.$i.txt" 2>>"$out/bench.log"
    for t in $types; do
        "$bin/test-backend-ops" perf -o MUL_MAT -b CPU -p "type_a=$t" >"$out/$t.$i.txt" 2>&1
    done
done
python3 scripts/llama_cpp_matmul_table.py "$out" $types
