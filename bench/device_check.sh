#!/usr/bin/env bash
# One-shot GPU check for batchllm on a machine with an NVIDIA GPU and NO network:
#   1. environment   (nvidia-smi, nvcc, python, torch)
#   2. build         (pip install --no-build-isolation --no-deps --no-index . for this card's architecture)
#   3. gpu tests     (pytest -m gpu)
#   4. benchmarks    (bench/bench_attention.py: decode kernel grid + paged prefill)
#   5. sanitizer     (compute-sanitizer memcheck + racecheck on two small kernel tests, if time is left)
#   6. end-to-end    (other engineers append their runs here, one section each, same pattern)
# Logs and JSON go to $OUT (default build/device_check_out). Budget: < 5 minutes in all; each step
# has its own timeout. The summary is printed last.
#
# Usage: OUT=/some/dir bash bench/device_check.sh      (PYTHON=... to pick the interpreter)
# Adding a section: write a function section_<name> that logs to "$OUT/<name>.log", then add
# `run_section <name> <timeout seconds> section_<name>` to the list at the bottom.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/build/device_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
SITE="$ROOT/build/device_check_site"   # the built package lives here (PYTHONPATH), not in the system env
export PYTHONPATH="$SITE"
export PYTHONDONTWRITEBYTECODE=1
SCRIPT_START=$(date +%s)
SUMMARY=()

log() { echo "[device_check $(date +%H:%M:%S)] $*"; }

# run_section NAME TIMEOUT_S FUNCTION: runs FUNCTION under a timeout, output to $OUT/NAME.log,
# and records "NAME: ok|FAILED (rc)|TIMEOUT, seconds" for the summary.
run_section() {
  local name="$1" limit="$2" fn="$3" start rc status
  start=$(date +%s)
  log "== $name (limit ${limit}s) -> $OUT/$name.log"
  timeout --kill-after=10 "$limit" bash -c "$(declare -f "$fn"); $(declare -p ROOT OUT PY SITE); export PYTHONPATH=\"$SITE\"; $fn" \
    >"$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status="ok" ;;
    124|137) status="TIMEOUT after ${limit}s" ;;
    *) status="FAILED (rc $rc)" ;;
  esac
  tail -n 5 "$OUT/$name.log" | sed "s/^/    [$name] /"
  SUMMARY+=("$(printf '%-14s %-24s %4ss' "$name" "$status" "$(( $(date +%s) - start ))")")
  return 0
}

# ---- 1. environment ---------------------------------------------------------------------------------
section_environment() {
  nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv
  nvcc --version | tail -n 2
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
  git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "commit unknown (no git metadata)"
}

# ---- 2. build -----------------------------------------------------------------------------------------
# The card's architecture from nvidia-smi (9.0 -> 90a: Hopper's arch-specific target; else e.g. 8.0 -> 80).
section_build() {
  set -e
  local cap arch
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' ')
  arch="${CUDA_ARCH:-${cap/./}}"   # CUDA_ARCH overrides (e.g. to try the build on a machine with no GPU)
  [[ "$arch" == "90" ]] && arch="90a"
  [[ -n "$arch" ]] || { echo "no GPU architecture: nvidia-smi gave no compute capability"; exit 1; }
  echo "compute capability ${cap:-?} -> CMAKE_CUDA_ARCHITECTURES=$arch"
  rm -rf "$SITE" && mkdir -p "$SITE"
  cd "$ROOT"
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$PY" -m pip install --no-build-isolation --no-deps --no-index \
    --target "$SITE" -Cbuild-dir=build/device_check \
    -Ccmake.define.BATCHLLM_CUDA=ON -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$arch" .
  "$PY" -c 'import batchllm_core as b; info = b.build_info(); print(info); assert info["cuda"], "no CUDA in build";
assert b.cuda_available(), "CUDA build but no usable device"; print("cuda head dims", b._C.cuda_kernel_head_dims())'
}

# ---- 3. gpu tests ---------------------------------------------------------------------------------------
section_gpu_tests() {
  cd "$ROOT/tests"
  "$PY" -m pytest -q -p no:cacheprovider -m gpu --continue-on-collection-errors \
    --junitxml="$OUT/gpu_tests.xml" python -rs 2>&1 | tail -n 60
}

# ---- 4. benchmarks ----------------------------------------------------------------------------------------
section_bench_attention() {
  cd "$ROOT"
  rm -f "$OUT/bench_attention.jsonl"
  "$PY" bench/bench_attention.py --json-out "$OUT/bench_attention.jsonl"
}

# ---- 5. sanitizer: out-of-bounds accesses and shared-memory races of the kernels on small cases -----------
section_sanitizer() {
  cd "$ROOT/tests"
  local select="test_cascade_cuda_matches_cpu_reference or test_prefill_attention_cuda_long_chunk_over_cache"
  for tool in memcheck racecheck; do
    echo "---- compute-sanitizer --tool $tool"
    compute-sanitizer --tool "$tool" --error-exitcode 99 --target-processes all \
      "$PY" -m pytest -q -p no:cacheprovider -x python/test_cuda_ops.py -k "$select" 2>&1 | tail -n 25
    [[ ${PIPESTATUS[0]} -eq 0 ]] || exit 99
  done
}

# ---- 6. end-to-end: whole workloads through LLM, llama-1b random weights (bench/e2e.py) --------------------
# Runs in priority order, each its own process so that what finished survives the section's timeout;
# JSON lines in $OUT/e2e.jsonl, the plot in $OUT/throughput.png. Reduced scales fit the budget:
# W1 1/4 (4 groups x 64), W2 1/4 (2 docs x 32), W5 1/8 (128 prompts); transformers: one batch of 64.
section_e2e() {
  cd "$ROOT"
  local json="$OUT/e2e.jsonl" e2e=("$PY" bench/e2e.py --model llama-1b --device cuda --json-out "$OUT/e2e.jsonl")
  rm -f "$json"
  "${e2e[@]}" --workload W1 --scale 0.25 --policy batchllm,fcfs-lru || return 1
  "${e2e[@]}" --workload W1 --scale 0.25 --policy batchllm --cuda-graphs || echo "e2e: cuda graphs run FAILED"
  "${e2e[@]}" --workload W1 --scale 0.25 --policy batchllm --cuda-graphs --overlap || echo "e2e: overlap run FAILED"
  "${e2e[@]}" --workload W2 --scale 0.25 --policy batchllm,fcfs-lru || echo "e2e: W2 FAILED"
  "${e2e[@]}" --workload W5 --scale 0.125 --policy batchllm,fcfs-lru || echo "e2e: W5 FAILED"
  "${e2e[@]}" --workload W1 --scale 0.25 --policy none --hf --hf-batches 1 || echo "e2e: transformers baseline FAILED"
  "$PY" bench/plot_throughput.py "$json" -o "$OUT/throughput.png" || true
  echo "e2e summary (workload policy seconds out_tok/s prefill_tokens time/floor):"
  "$PY" -c 'import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(r["workload"], r["policy"] + ("+graphs" if r.get("cuda_graphs") else "") + ("+overlap" if r.get("overlap") else ""), r["seconds"],
          r["output_tokens_per_s"], r["prefill_tokens"], r["time_over_floor"])' "$json"
}

# ---- 7. (append sections above this line and register them below) ------------------------------------------

run_section environment 30 section_environment
run_section build 150 section_build
if [[ "${SUMMARY[-1]}" == build*ok* ]]; then
  run_section gpu_tests 110 section_gpu_tests
  run_section bench_attention 120 section_bench_attention
  if (( $(date +%s) - SCRIPT_START < 200 )); then
    run_section sanitizer 80 section_sanitizer
  else
    SUMMARY+=("sanitizer      skipped: the time budget is spent")
  fi
  E2E_LEFT=$(( 295 - ($(date +%s) - SCRIPT_START) ))
  if (( E2E_LEFT >= 45 )); then
    run_section e2e "$E2E_LEFT" section_e2e
  else
    SUMMARY+=("e2e            skipped: ${E2E_LEFT}s left of the budget (run bench/e2e.py by hand)")
  fi
else
  SUMMARY+=("gpu_tests / benchmarks skipped: the build failed (see $OUT/build.log)")
fi

# ---- summary (printed last) -------------------------------------------------------------------------------
echo
echo "==== device_check summary ($(( $(date +%s) - SCRIPT_START ))s total; logs and JSON in $OUT) ===="
printf '%s\n' "${SUMMARY[@]}"
grep -E "passed|failed|error" "$OUT/gpu_tests.log" 2>/dev/null | tail -n 1 | sed 's/^/gpu tests: /'
if [[ -s "$OUT/bench_attention.log" ]]; then
  echo "bench_attention:"
  grep -vE "^JSON " "$OUT/bench_attention.log" | tail -n 10
fi
if [[ -s "$OUT/e2e.log" ]]; then
  echo "e2e:"
  sed -n '/^e2e summary/,$p' "$OUT/e2e.log" | tail -n 12
fi
