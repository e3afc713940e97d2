#!/usr/bin/env bash
# The GPU check: one script, under 8 minutes on one H100 or H200 (torch, triton, transformers,
# pybind11, ninja, pytest preinstalled; no network).
#
#   bash python/benchmarks/gpu_check.sh [OUT_DIR]      (default: $OUT or ./gpu_check_out)
#
# Phases, each under its own time limit (they add up to PHASE_BUDGET_S < 480 s, checked below), each
# run whatever the previous ones did (only a failed build stops the GPU phases, which need it):
#   environment   GPU, driver, versions
#   build         CPU + CUDA extension for sm_90 (JACOBI_ENGINE_CUDA=1: a CUDA build that does not
#                 happen is a failure), then build_info()
#   gpu_tests     every CUDA and Triton test (tests marked gpu and every test parametrized on a cuda
#                 device: kernels against their references, the CUDA ops bit for bit against the CPU
#                 ops, op contracts, the engine against HF greedy in eager and CUDA-graph mode,
#                 candidates, compile=True), without -x: every failure is collected (gpu_tests.xml)
#   realistic     python/benchmarks/gpu_checks.py: verify at B=64, n=32, V=128,256 (fp32/fp16/bf16)
#                 against torch.argmax; the sampling and tree ops at V=128,256, CUDA against CPU bit
#                 for bit, mem_get_info around the first tree launch; Triton at head_dim 256, group
#                 16 against float64
#   overflow      gpu_checks.py --overflow-probe in its own process: attention over a cache whose
#                 rows pass 2**31 elements (~10 GB)
# Results: OUT_DIR/gpu_check.json (date, GPU, command, each phase's status, time and limit, the
# failing tests, the realistic checks), one log per phase, summary.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$out"
command_line="bash python/benchmarks/gpu_check.sh $*"
start=$SECONDS

# Phase limits (seconds). Their sum must stay under the 480 s budget, with room for start-up.
T_ENV=15
T_BUILD=120
T_TESTS=200
T_REALISTIC=80
T_OVERFLOW=45
PHASE_BUDGET_S=$((T_ENV + T_BUILD + T_TESTS + T_REALISTIC + T_OVERFLOW))
if [ "$PHASE_BUDGET_S" -ge 480 ]; then
  echo "phase limits add up to $PHASE_BUDGET_S s, over the 480 s budget" >&2
  exit 2
fi

: > "$out/phases.tsv"
: > "$out/summary.txt"
# run_phase NAME LIMIT COMMAND...: runs under `timeout`, logs to OUT/NAME.log, records the outcome.
run_phase() {
  local name=$1 limit=$2
  shift 2
  local began=$SECONDS
  echo "== $name (limit $limit s, at $((SECONDS - start)) s)" | tee -a "$out/summary.txt"
  timeout --kill-after=5 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local status=passed
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    status=timeout
  elif [ $rc -ne 0 ]; then
    status=failed
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - began))" "$limit" >> "$out/phases.tsv"
  tail -5 "$out/$name.log" | tee -a "$out/summary.txt"
  echo "   $name: $status (rc=$rc, $((SECONDS - began)) s)" | tee -a "$out/summary.txt"
  return $rc
}

run_phase environment "$T_ENV" bash -c '
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton, transformers; print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"transformers\", transformers.__version__)"'

export JACOBI_ENGINE_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS=16
built=0
if run_phase build "$T_BUILD" bash -c '
  python -m pip install --no-build-isolation --no-deps --no-index -e . &&
  python -c "import jacobi_engine, json; info = jacobi_engine.build_info(); print(json.dumps(info)); assert info[\"cuda_kernels\"], info"'; then
  built=1
fi

if [ $built -eq 1 ]; then
  # -k "cuda or gpu": tests marked gpu, and the cuda instances of tests parametrized on the device
  # (CPU-only tests ran in CI already). No -x: a failure does not hide the ones after it.
  run_phase gpu_tests "$T_TESTS" python -m pytest -q -p no:cacheprovider -rf --junitxml="$out/gpu_tests.xml" \
    -k "cuda or gpu" \
    tests/test_attention_op.py tests/test_verify_op.py tests/test_sampling_verify_op.py \
    tests/test_sampling_tree_op.py tests/test_op_contracts.py tests/test_pool.py tests/test_gpu_engine.py \
    tests/test_build.py
  run_phase realistic "$T_REALISTIC" python python/benchmarks/gpu_checks.py --json "$out/realistic.json"
  run_phase overflow "$T_OVERFLOW" python python/benchmarks/gpu_checks.py --overflow-probe --json "$out/overflow.json"
else
  for name in gpu_tests realistic overflow; do
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "not run (build failed)" "-" "0" "0" >> "$out/phases.tsv"
  done
fi

OUT_DIR="$out" COMMAND_LINE="$command_line" TOTAL_S=$((SECONDS - start)) BUDGET_S="$PHASE_BUDGET_S" python - <<'EOF'
import datetime, json, os, subprocess, xml.etree.ElementTree as ET

out = os.environ["OUT_DIR"]
def gpu_name():
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except Exception:
        return None
phases = []
for line in open(os.path.join(out, "phases.tsv")):
    name, status, rc, seconds, limit = line.rstrip("\n").split("\t")
    phases.append(dict(name=name, status=status, rc=rc, seconds=int(seconds), limit_s=int(limit)))
failures = []
junit = os.path.join(out, "gpu_tests.xml")
if os.path.exists(junit):
    for case in ET.parse(junit).iter("testcase"):
        for kind in ("failure", "error"):
            for problem in case.iter(kind):
                failures.append(dict(test=f"{case.get('classname')}::{case.get('name')}", kind=kind,
                                     message=(problem.get("message") or "")[:500]))
def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None
result = dict(
    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    gpu=gpu_name(),
    command=os.environ["COMMAND_LINE"],
    total_seconds=int(os.environ["TOTAL_S"]),
    phase_budget_s=int(os.environ["BUDGET_S"]),
    phases=phases,
    failed_tests=failures,
    realistic=load("realistic.json"),
    overflow=load("overflow.json"),
    ok=all(p["status"] == "passed" for p in phases) and not failures,
)
json.dump(result, open(os.path.join(out, "gpu_check.json"), "w"), indent=2)
print(f"gpu_check.json: ok={result['ok']}, {len(failures)} failing test(s), {result['total_seconds']} s")
EOF
status=$?
failed_phases=$(awk -F'\t' '$2 != "passed"' "$out/phases.tsv" | wc -l)
echo "== done in $((SECONDS - start)) s: $failed_phases phase(s) not passed" | tee -a "$out/summary.txt"
[ "$failed_phases" -eq 0 ] && [ $status -eq 0 ] && python -c "import json,sys; sys.exit(0 if json.load(open('$out/gpu_check.json'))['ok'] else 1)"
