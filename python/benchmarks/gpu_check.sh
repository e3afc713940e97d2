#!/usr/bin/env bash
# The GPU check: build, GPU tests, microbenchmarks, step benchmark. One script, < 8 minutes on a
# bare H200 machine (torch, triton, transformers, pybind11, ninja preinstalled; no network).
#
#   bash python/benchmarks/gpu_check.sh [OUT_DIR]      (default: $OUT or ./gpu_check_out)
#
# Writes OUT_DIR/{build.log,tests.log,bench_kernels.json,bench_kernels.txt,bench_step.json,
# bench_step.txt,summary.txt}. Each phase has its own time limit so that one hang cannot eat the
# budget; the script goes on and reports what failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$out"
start=$SECONDS
status=0
phase() { echo "== $1 ($((SECONDS - start)) s)" | tee -a "$out/summary.txt"; }

phase "environment"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee -a "$out/summary.txt"

phase "build (CPU + CUDA, sm_90)"
export JACOBI_ENGINE_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS=16
if ! timeout 300 python -m pip install --no-build-isolation --no-deps --no-index -e . > "$out/build.log" 2>&1; then
  echo "BUILD FAILED (see build.log)" | tee -a "$out/summary.txt"
  tail -30 "$out/build.log"
  exit 1
fi
python -c "import jacobi_engine, json; print(json.dumps(jacobi_engine.build_info()))" 2>&1 | tee -a "$out/summary.txt"

phase "GPU tests (kernels vs references on CUDA incl. the sampling verify op bit for bit, engine vs HF greedy, CUDA graphs, candidates, compile=True)"
timeout 240 python -m pytest -q -x -p no:cacheprovider \
  tests/test_attention_op.py tests/test_verify_op.py tests/test_sampling_verify_op.py tests/test_sampling_tree_op.py \
  tests/test_gpu_engine.py \
  tests/test_pool.py \
  tests/test_build.py \
  tests/test_engine_exactness.py -k "not ragged3 or llama" > "$out/tests.log" 2>&1
rc=$?
tail -5 "$out/tests.log" | tee -a "$out/summary.txt"
[ $rc -eq 0 ] || { echo "TESTS FAILED (rc=$rc, see tests.log)" | tee -a "$out/summary.txt"; status=1; }

phase "kernel microbenchmarks"
timeout 150 python python/benchmarks/bench_kernels.py --device cuda --json "$out/bench_kernels.json" \
  > "$out/bench_kernels.txt" 2>&1 || { echo "bench_kernels failed" | tee -a "$out/summary.txt"; status=1; }
tail -3 "$out/bench_kernels.txt" | tee -a "$out/summary.txt"

phase "Jacobi step of a 1B bf16 Llama-shaped model: eager, compiled, CUDA graph, compiled + CUDA graph"
# Two inductor compiles of the 1B model (n = 1 and 16; the CUDA-graph rows reuse them from the FX cache).
timeout 210 python python/benchmarks/bench_step.py --device cuda --steps 32 --repeats 3 --json "$out/bench_step.json" \
  > "$out/bench_step.txt" 2>&1 || { echo "bench_step failed" | tee -a "$out/summary.txt"; status=1; }
cat "$out/bench_step.txt" | tail -12 | tee -a "$out/summary.txt"

phase "done, status $status"
exit $status
