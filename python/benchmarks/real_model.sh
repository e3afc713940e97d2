#!/usr/bin/env bash
# The real-model benchmark (SmolLM2-135M-Instruct and its shipped CLLM), as run for docs/results.md:
# held-out GSM8K questions in the chat template, batch 1, one torch thread, 128 new tokens, n=16.
# Each run fits in about 30 minutes on our 2-core CPU. The compiled rows run apart (each compiled
# state of a 30-layer model takes a while to compile on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-docs/results}
LIMIT=${LIMIT:-8}
B=python/benchmarks/bench_generate.py
python $B --pair smollm2 --dtype float32 --limit "$LIMIT" --threads 1 --sampling off --no-compile \
    --json "$OUT/bench_generate_smollm2_fp32.json"
python $B --pair smollm2 --dtype bfloat16 --limit "$LIMIT" --threads 1 --sampling off --no-compile \
    --json "$OUT/bench_generate_smollm2_bf16.json"
# The README's table of the two runs:
python python/benchmarks/real_model_table.py --fp32 "$OUT/bench_generate_smollm2_fp32.json" \
    --bf16 "$OUT/bench_generate_smollm2_bf16.json"
# Two torch threads, float32, the fixed n-gram block against the default (docs/results.md, "The default"): THREADS2=1.
if [[ "${THREADS2:-0}" == 1 ]]; then
    python $B --pair smollm2 --dtype float32 --limit "$LIMIT" --threads 2 --sampling off --no-compile \
        --methods engine_jacobi_ngram engine_auto --json "$OUT/bench_generate_smollm2_fp32_threads2.json"
fi
# Compiled rows: COMPILED=1. Not run for the 2026-12-07 results, for want of session time (engine_auto
# compiles six 30-layer step states per model, each an inductor compile on 2 cores).
if [[ "${COMPILED:-0}" == 1 ]]; then
    python $B --pair smollm2 --dtype bfloat16 --limit "$LIMIT" --threads 1 --sampling off \
        --methods hf_static_compile engine_jacobi_ngram engine_auto --json "$OUT/bench_generate_smollm2_bf16_compile.json"
fi
