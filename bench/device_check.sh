#!/usr/bin/env bash
# One-shot GPU check for batchllm on a machine with an NVIDIA GPU and NO network:
#   1. environment   (nvidia-smi, nvcc, cmake, python, torch)
#   2. build         (pip install --no-build-isolation --no-deps --no-index . for this card's architecture)
#   3. gpu tests     (pytest -m gpu)
#   4. benchmarks    (bench/bench_attention.py: decode kernel grid + paged prefill; bench/bench_sampling.py;
#                    bench/bench_gemm.py)
#   5. end-to-end    (bench/e2e.py: W1, W2, W5 on llama-1b, policies, graphs, overlap, transformers)
#   6. ncu           (Nsight Compute counters and stall reasons of the default kernels)
#   7. e2e_w6        (W6 on the qwen2.5-7b shape, batchllm vs fcfs-lru, if 60 s are left)
#   7b. profile_quick (bench/profile_e2e.py: W1 1/4 step kinds and top kernels, W5 1/8 step kinds under
#                    both policies; log in e2e.log; what time is left)
#   8. sanitizer     (compute-sanitizer memcheck + racecheck on small kernel tests, if time is left)
# Logs and JSON go to $OUT (default build/device_check_out): one log per section plus
# bench_attention.jsonl and e2e.jsonl, 8 files at most (the device tool returns no more; make the
# plot here from e2e.jsonl: python bench/plot_throughput.py e2e.jsonl). Budget: BUDGET_S (default
# 295 s) in all; every section gets what is left of it, up to its own limit, so the summary is
# always printed. The summary is printed last. A session with a whole fresh 15-minute lease can run
# every section in one call: BUDGET_S=540 with the device tool's timeout_s at 570 (the machine's
# start takes about 30 s more); a warm machine goes back 30 s after a call, too soon for a fix.
#
# Usage: OUT=/some/dir bash bench/device_check.sh      (PYTHON=... to pick the interpreter)
#   SECTIONS="e2e sanitizer" runs only those (after environment), REUSE_BUILD=1 keeps an earlier
#   build of this tree (a second call on the same warm machine), BUDGET_S=... changes the budget.
# Adding a section: write a function section_<name> that logs to stdout, then add a
# `run_section <name> <limit seconds> <minimum seconds> section_<name>` line to the list at the bottom.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/build/device_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
SITE="$ROOT/build/device_check_site"   # the built package lives here (PYTHONPATH), not in the system env
export PYTHONPATH="$SITE"
export PYTHONDONTWRITEBYTECODE=1
SCRIPT_START=$(date +%s)
# The commit every JSON line names; "-dirty" where the tree differs from its git metadata (the device
# tool's copy once carried a stale .git: three runs of 2026-11-27 named the session's first commit).
if [[ -z "${BATCHLLM_COMMIT:-}" ]]; then
  BATCHLLM_COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  git -C "$ROOT" diff --quiet HEAD 2>/dev/null || BATCHLLM_COMMIT="$BATCHLLM_COMMIT-dirty"
fi
export BATCHLLM_COMMIT
SUMMARY=()

log() { echo "[device_check $(date +%H:%M:%S)] $*"; }

BUDGET_S="${BUDGET_S:-295}"
SECTIONS="${SECTIONS:-}"
left_s() { echo $(( BUDGET_S - ($(date +%s) - SCRIPT_START) )); }

# run_section NAME LIMIT_S MIN_S FUNCTION [LOG]: runs FUNCTION (with pipefail) under a timeout of
# LIMIT_S or what is left of the budget, whichever is less, output to $OUT/NAME.log (appended to
# $OUT/LOG.log when LOG is given: the device tool returns 8 files at most); skipped when under MIN_S
# is left or SECTIONS leaves it out. Records "NAME: ok|FAILED (rc)|TIMEOUT|skipped, seconds".
run_section() {
  local name="$1" limit="$2" minimum="$3" fn="$4" log_file="$OUT/$1.log" start rc status left
  [[ -n "${5:-}" ]] && log_file="$OUT/$5.log"
  if [[ -n "$SECTIONS" && "$name" != environment && " $SECTIONS " != *" $name "* ]]; then
    return 0
  fi
  left=$(( $(left_s) - 5 ))
  (( left < limit )) && limit=$left
  if (( limit < minimum )); then
    SUMMARY+=("$(printf '%-16s %s' "$name" "skipped: ${left}s left of the ${BUDGET_S}s budget")")
    return 0
  fi
  start=$(date +%s)
  log "== $name (limit ${limit}s) -> $log_file"
  timeout --kill-after=5 "$limit" bash -c "set -o pipefail; $(declare -f "$fn"); $(declare -p ROOT OUT PY SITE);
    export PYTHONPATH=\"$SITE\" PYTHONUNBUFFERED=1; $fn" >>"$log_file" 2>&1
  rc=$?
  case $rc in
    0) status="ok" ;;
    124|137) status="TIMEOUT after ${limit}s" ;;
    *) status="FAILED (rc $rc)" ;;
  esac
  tail -n 5 "$log_file" | sed "s/^/    [$name] /"
  SUMMARY+=("$(printf '%-16s %-24s %4ss' "$name" "$status" "$(( $(date +%s) - start ))")")
  return 0
}

# ---- 1. environment ---------------------------------------------------------------------------------
section_environment() {
  nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv
  nvcc --version | tail -n 2
  cmake --version | head -n 1
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
  echo "commit $BATCHLLM_COMMIT"
  git -C "$ROOT" status --short 2>/dev/null | head -n 5
}

# ---- 2. build -----------------------------------------------------------------------------------------
# The card's architecture from nvidia-smi (9.0 -> 90a: Hopper's arch-specific target; else e.g. 8.0 -> 80).
section_build() {
  set -e
  local cap arch
  if [[ "${REUSE_BUILD:-0}" == 1 ]] && "$PY" -c 'import batchllm_core as b; assert b.cuda_available()' 2>/dev/null; then
    echo "REUSE_BUILD=1: keeping the build in $SITE"; return 0
  fi
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
  "$PY" -m pytest -q -p no:cacheprovider -m gpu --continue-on-collection-errors -rfEs python
}

# ---- 4. benchmarks ----------------------------------------------------------------------------------------
# A variant whose failure kills the CUDA context (a fault is sticky) ends the process with 3 and a
# context_lost JSON line: the bench then resumes without it, keeping the shapes already measured.
section_bench_attention() {
  cd "$ROOT"
  local json="$OUT/bench_attention.jsonl" skip="" rc lost attempt
  rm -f "$json"
  for attempt in 1 2 3; do
    "$PY" bench/bench_attention.py --json-out "$json" --resume ${skip:+--skip-variants "$skip"}
    rc=$?
    (( rc == 3 )) || return "$rc"
    lost=$("$PY" -c 'import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print([r for r in rows if r.get("bench") == "context_lost"][-1]["variant"])' "$json") || return 3
    skip="${skip:+$skip,}$lost"
    echo "bench_attention: variant $lost lost the CUDA context; resuming without: $skip"
  done
  return 3
}

# ---- 4b. the sampler's fused pass against its torch path on decode-step logits (W1, W4, W6 shapes),
# then the model's GEMMs under cuBLAS and cuBLASLt (bench/bench_gemm.py: run 4's W1 decode GEMMs took
# ~2x their weights' read); log and JSON lines appended to bench_attention's (the device tool returns
# 8 files at most).
section_bench_sampling() {
  cd "$ROOT"
  "$PY" bench/bench_sampling.py --json-out "$OUT/bench_attention.jsonl" || echo "bench_sampling FAILED"
  "$PY" bench/bench_gemm.py --json-out "$OUT/bench_attention.jsonl"
}

# ---- 5. end-to-end: whole workloads through LLM, llama-1b random weights (bench/e2e.py) --------------------
# Runs in priority order, each its own process so that what finished survives the section's timeout;
# JSON lines in $OUT/e2e.jsonl (plot it here: bench/plot_throughput.py). Reduced scales fit the budget:
# W1 1/4 (4 groups x 64) and full (16 x 64), W2 1/4 (2 docs x 32), W5 1/8 (128 prompts); transformers:
# one batch of 64.
section_e2e() {
  cd "$ROOT"
  local json="$OUT/e2e.jsonl" e2e=("$PY" bench/e2e.py --model llama-1b --device cuda --json-out "$OUT/e2e.jsonl")
  rm -f "$json"
  local failed=0
  # e2e_run LABEL ARGS...: one run; a failure is logged and counted, the next run still goes.
  local run_env=(env)  # what e2e_run prefixes: env, and VAR=VALUE settings for a kernel variant
  e2e_run() { local label="$1"; shift; "${run_env[@]}" "${e2e[@]}" "$@" || { echo "e2e: $label FAILED"; failed=$((failed + 1)); }; }
  # The defaults on CUDA: CUDA graphs for decode steps, overlapped scheduling, the layer-op kernels.
  # --repeat: the job again on the same engine (seconds_runs; its graphs captured, every kernel loaded).
  e2e_run "W1" --workload W1 --scale 0.25 --policy batchllm,fcfs-lru --repeat 2
  # The headline target is stated at full scale (W1 >= 100,000 output tokens/s): 1,024 sequences.
  e2e_run "W1 full scale" --workload W1 --scale 1 --policy batchllm,fcfs-lru
  # Owned cascade tiles (session 15, BATCHLLM_CASCADE_LAUNCH=owned; right after the defaults they
  # compare with: the largest predicted gain of the pending variants): one launch a layer in which each
  # CTA takes 16 readers (64 rows) of one KV head through their prefix and their suffixes and writes
  # the outputs, against run 4's three launches (decode_rows 44 + prefix tiles 25 + combine 10 us a
  # W1 1/4 layer for ~22 us of KV bytes). Prediction: 25-35 us a layer; W1 1/4 0.61 -> 0.50-0.55 s,
  # W1 full -10..-15% (its 512 CTAs stream 268 MB of suffix KV a layer).
  run_env=(env BATCHLLM_CASCADE_LAUNCH=owned)
  e2e_run "W1 owned" --workload W1 --scale 0.25 --policy batchllm --repeat 2
  e2e_run "W1 full owned" --workload W1 --scale 1 --policy batchllm
  run_env=(env)
  e2e_run "W2" --workload W2 --scale 0.25 --policy batchllm,fcfs-lru --repeat 2
  # W2 at full scale (8 docs x 32 questions): its prefixes are 8 x 8,192 tokens x 2 KB = 134 MB of KV a
  # layer, past the H100's 50 MB L2, where fcfs-lru's re-reads of them (every decode row reading its
  # doc's 8,192 keys) come from HBM; at 1/4 scale (2 docs, 33 MB) they came from L2, and batchllm was
  # 1.51x fcfs-lru (run 4). Prediction: 2-4x at full scale (the R3 simulation's 4.66x prices every
  # re-read at HBM bandwidth; the target is 2x).
  e2e_run "W2 full scale" --workload W2 --scale 1 --policy batchllm,fcfs-lru
  # W5 (no sharing): run 4 settled it in both orders (batchllm median 1.04 s, fcfs-lru 1.20 s): one
  # order now, two runs each.
  e2e_run "W5" --workload W5 --scale 0.125 --policy batchllm,fcfs-lru --repeat 2
  # Piecewise CUDA graphs for prefill and mixed steps (piecewise_graphs.py, since session 13, on by
  # default) against the eager mixed steps they replace: run 4's eager mixed steps took as long on
  # the host as on the device (13-16 ms each at 2,048 tokens: host-bound). Prediction: W5 1/8
  # 0.97 -> 0.75-0.85 s, W1 full 1.95 -> 1.65-1.8 s; the eager rows as run 5's.
  run_env=(env BATCHLLM_MIXED_GRAPHS=0)
  e2e_run "W5 eager mixed steps" --workload W5 --scale 0.125 --policy batchllm --repeat 2
  e2e_run "W1 full eager mixed steps" --workload W1 --scale 1 --policy batchllm
  # Programmatic dependent launch (session 14, BATCHLLM_PDL=1): each of our kernels (~7 of a layer's
  # ~11) may start as the one before it ends, instead of after a graph's kernel-to-kernel gap.
  # Prediction: ~1-2 us a launch: W1 1/4 decode steps -3..-6%, e2e -2..-4%.
  run_env=(env BATCHLLM_PDL=1)
  e2e_run "W1 pdl" --workload W1 --scale 0.25 --policy batchllm --repeat 2
  # decode_rows' staged key loop (K/V tiles by cp.async, 3 ahead; session 13): run 4's decode_rows
  # moved W1's suffix KV at ~1.5 TB/s. W5's decode steps read ~800-key suffixes (KV-bound).
  # Prediction: decode_rows 44 -> 28-35 us a W1 layer; W1 1/4 -3..-6%, W5 1/8 -4..-8%.
  run_env=(env BATCHLLM_DECODE_ROWS=staged)
  e2e_run "W1 staged decode_rows" --workload W1 --scale 0.25 --policy batchllm --repeat 2
  e2e_run "W5 staged decode_rows" --workload W5 --scale 0.125 --policy batchllm --repeat 2
  # wgmma-k128 (session 14): the pipelined wgmma tiles on 128-key steps, Q in shared memory, for
  # prefill and prefixes at llama-1b's d = 64 (default: wgmma-pipe). Statically 358 against 416
  # instructions a warp per 64 keys (sass_loops, after session 14's copy change). Prediction: the
  # d = 64 prefill row -10..-20%; W5 1/8 (prefill-heavy) -3..-8%; W1 1/4 -1..-3%.
  run_env=(env BATCHLLM_ATTENTION_TILES=wgmma-k128)
  e2e_run "W5 wgmma-k128 tiles" --workload W5 --scale 0.125 --policy batchllm --repeat 2
  e2e_run "W1 wgmma-k128 tiles" --workload W1 --scale 0.25 --policy batchllm --repeat 2
  # The suffix kernel on a side stream beside the prefix tiles: W1's decode layer ran them one after
  # the other (decode_rows 44 us, prefix tiles 25 us in run 4); bench_attention's flat_d64 rows time
  # it at W1's groups.
  run_env=(env BATCHLLM_CASCADE_LAUNCH=streams)
  e2e_run "W1 streams" --workload W1 --scale 0.25 --policy batchllm --repeat 2
  # The 64-row mma tiles at llama-1b's d = 64, whose default is wgmma-pipe: run 4 had mma faster on
  # W1 1/4 (0.588 against 0.625 s, first runs); W5's prefill side is bench_attention's d = 64
  # prefill row now. (Answered and dropped since run 5: W5 in the swapped order, eager, wgmma64 and
  # plain wgmma tiles, torch layer ops: docs/BENCHMARKS.md.)
  run_env=(env BATCHLLM_ATTENTION_TILES=mma)
  e2e_run "W1 mma tiles" --workload W1 --scale 0.25 --policy batchllm --repeat 2
  run_env=(env)
  # cuBLASLt for every GEMM (torch's switch, read at start-up), if bench_gemm found it faster.
  if [[ -s "$OUT/bench_attention.jsonl" ]] && "$PY" -c 'import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
layer = [r for r in rows if r.get("bench") == "gemm" and r["model"] == "llama-1b" and r["rows"] == 256]
sys.exit(0 if layer and sum(r["cublaslt_ms"] for r in layer) < 0.97 * sum(r["cublas_ms"] for r in layer) else 1)' \
      "$OUT/bench_attention.jsonl"; then
    run_env=(env TORCH_BLAS_PREFER_CUBLASLT=1)
    e2e_run "W1 cublaslt" --workload W1 --scale 0.25 --policy batchllm --repeat 2
    run_env=(env)
  fi
  # The step's token budget: fewer, larger mixed steps (a bucket of 8192 tokens with the pieces).
  e2e_run "W5 budget 8192" --workload W5 --scale 0.125 --policy batchllm --max-num-batched-tokens 8192 --repeat 2
  # The attention kernels bench_attention found fastest over its grid, if not the defaults: W1 again
  # with them (the row records them in kernel_env).
  local fastest=()
  [[ -s "$OUT/bench_attention.jsonl" ]] && mapfile -t fastest < <("$PY" -c 'import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
summary = [r for r in rows if r.get("bench") == "decode_attention_summary"]
if summary and summary[-1]["fastest"] != "ours":
    for name, value in summary[-1]["variant_env"][summary[-1]["fastest"]].items():
        print(f"{name}={value}")' "$OUT/bench_attention.jsonl")
  if (( ${#fastest[@]} )); then
    echo "e2e: W1 with the fastest attention variant: ${fastest[*]}"
    run_env=(env "${fastest[@]}")
    e2e_run "W1, fastest kernels" --workload W1 --scale 0.25 --policy batchllm
    run_env=(env)
  fi
  # Top-p sampling (session 16): the one pass's tries (no sort, no host sync) against the torch
  # formulas the filtered rows ran before (torch.topk of 1,024 candidates and a host sync a step,
  # which stalls the overlapped loop). Random weights give nearly flat logits: every row's nucleus
  # reaches past the 1,024 candidates, so the torch way also sorts every row every step (its worst
  # case; a trained model's peaked rows rarely spill), and the tries' before-sets are large (~2x a
  # temperature-1 pass). Prediction: the torch rows 20-60% slower than the defaults.
  e2e_run "W1 top_p 0.9" --workload W1 --scale 0.25 --policy batchllm --temperature 1 --top-p 0.9 --repeat 2
  run_env=(env BATCHLLM_SAMPLER=torch)
  e2e_run "W1 top_p 0.9 torch sampler" --workload W1 --scale 0.25 --policy batchllm --temperature 1 --top-p 0.9 --repeat 2
  run_env=(env)
  e2e_run "transformers baseline" --workload W1 --scale 0.25 --policy none --hf --hf-batches 1
  echo "e2e summary (workload policy seconds out_tok/s prefill_tokens time/floor graph_captures capture_s" \
       "position seconds_runs budget top_p mixed_captures/replays sm_mhz/temp_c before-after):"
  [[ -s "$json" ]] && "$PY" -c 'import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(r["workload"], r["policy"] + ("+graphs" if r.get("cuda_graphs") else "") + ("+overlap" if r.get("overlap") else "")
          + "".join("+" + (v if not v.isdigit() else k.lower() + "=" + v) for k, v in sorted(r.get("kernel_env", {}).items())), r["seconds"],
          r["output_tokens_per_s"], r["prefill_tokens"], r["time_over_floor"], r.get("graph_captures"),
          r.get("graph_capture_s"), r.get("position"), r.get("seconds_runs"), "budget", r.get("max_num_batched_tokens"),
          "top_p", r.get("top_p"),
          "mixed", str(r.get("mixed_graph_captures")) + "/" + str(r.get("mixed_graph_replays")),
          "/".join(str((r.get(k) or {}).get("sm_mhz")) + "@" + str((r.get(k) or {}).get("temperature_c"))
                   for k in ("gpu_before", "gpu_after")))' "$json"
  echo "e2e: $failed run(s) failed"
  return "$failed"
}

# ---- 5b. end-to-end W6 (1/10 scale, qwen2.5-7b shape): batchllm vs fcfs-lru beside BatchLLM's published
# 1.3x-10.8x over vLLM. Rows append to $OUT/e2e.jsonl, the log to e2e.log. After the llama-1b runs,
# before profile_quick (a 7B model: the longest runs); a second call can ask for it: SECTIONS="e2e_w6".
section_e2e_w6() {
  cd "$ROOT"
  "$PY" bench/e2e.py --model qwen2.5-7b-shape --device cuda --json-out "$OUT/e2e.jsonl" --workload W6 --scale 1 \
    --policy batchllm,fcfs-lru
}

# ---- 6. sanitizer: out-of-bounds accesses and shared-memory races of the kernels on small cases -----------
# memcheck on a cascade and a prefill case; racecheck (slow: it tracks every shared-memory access) on
# the small cascade case only. Default kernels first (pipelined wgmma tiles on Hopper), then the
# variants (the merging suffix kernel; plain wgmma tiles; 4-warp mma tiles in the fused launch; 8-warp
# mma tiles with the merging suffix kernel; WMMA tiles; 64-row wgmma tiles), as far as the time goes.
section_sanitizer() {
  cd "$ROOT/tests"
  local cascade="test_cascade_cuda_matches_cpu_reference" prefill="test_prefill_attention_cuda_long_chunk_over_cache"
  local variant
  for variant in "" "BATCHLLM_CASCADE_LAUNCH=merge" \
                 "BATCHLLM_ATTENTION_TILES=wgmma" "BATCHLLM_ATTENTION_TILES=mma BATCHLLM_CASCADE_LAUNCH=fused" \
                 "BATCHLLM_ATTENTION_TILES=mma128 BATCHLLM_CASCADE_LAUNCH=merge" "BATCHLLM_ATTENTION_TILES=wmma" \
                 "BATCHLLM_ATTENTION_TILES=wgmma64" "BATCHLLM_ATTENTION_TILES=wgmma-k128" \
                 "BATCHLLM_CASCADE_LAUNCH=owned"; do
    echo "---- compute-sanitizer --tool memcheck ${variant:-(default kernels)}"
    env $variant compute-sanitizer --tool memcheck --error-exitcode 99 --target-processes all \
      "$PY" -m pytest -q -p no:cacheprovider -x python/test_cuda_ops.py -k "$cascade or $prefill" || exit 99
    echo "---- compute-sanitizer --tool racecheck ${variant:-(default kernels)}"
    env $variant compute-sanitizer --tool racecheck --error-exitcode 99 --target-processes all \
      "$PY" -m pytest -q -p no:cacheprovider -x python/test_cuda_ops.py -k "$cascade" || exit 99
  done
}

# ---- 6b. ncu: Nsight Compute's counters of the default kernels (bench/ncu_kernels.py: a W1 decode group
# at d = 64, the grid's (256, 8192, 128) decode, a 4,096-token prefill): throughput against the
# ceilings, occupancy and warp stall reasons, which say why a kernel takes its time (the first runs
# found every tile variant at the same ~3.5-4 us per key tile). Logged to tools.log with the sanitizer
# (the device tool returns 8 files at most).
section_ncu() {
  cd "$ROOT"
  ncu --clock-control none --profile-from-start off --target-processes all --set detailed \
    --kernel-name-base demangled "$PY" bench/ncu_kernels.py
}

# ---- 7. profile: where an e2e job's time goes (bench/profile_e2e.py): per-step host and device time
# by step kind, the top device kernels and host ops (torch.profiler), the top Python functions.
# Log in profile.log, JSON lines in profile.jsonl. Not in the default list: SECTIONS="build profile".
section_profile() {
  cd "$ROOT"
  local p=("$PY" bench/profile_e2e.py --model llama-1b --device cuda --json-out "$OUT/profile.jsonl")
  rm -f "$OUT/profile.jsonl"
  "${p[@]}" --workload W1 --scale 0.25 --rows 30 || echo "profile W1 graphs FAILED"
  "${p[@]}" --workload W2 --scale 0.25 --parts steps,kernels --rows 20 || echo "profile W2 FAILED"
  "${p[@]}" --workload W5 --scale 0.0625 --parts steps,kernels --rows 20 || echo "profile W5 FAILED"
  "${p[@]}" --workload W5 --scale 0.0625 --policy fcfs-lru --parts steps || echo "profile W5 fcfs FAILED"
}

# ---- 7b. profile_quick: where e2e time goes, in the default list: W1 full (step kinds incl. captures, top
# kernels, top Python functions: the vectorized layer ops' times, and whether the eager mixed steps are
# host-bound: run 4's W1 1/4 and W5 had their host and device times equal, 13-16 ms a step, where the
# emulated mixed step's Python is ~0.1 ms a layer), then W5 1/8's step kinds under both policies,
# and bench_host's W1 (the host's share of a step, on this machine's CPU).
# Logged to e2e.log, no JSON (a ninth file under $OUT would not come back).
section_profile_quick() {
  cd "$ROOT"
  local p=("$PY" bench/profile_e2e.py --model llama-1b --device cuda)
  # W1 at full scale (1,024 rows decoding): the headline target's shape, 3.1x its floor in run 4, never
  # profiled (run 4 profiled W1 1/4).
  "${p[@]}" --workload W1 --scale 1 --parts steps,kernels,python --rows 25 || echo "profile W1 FAILED"
  "${p[@]}" --workload W5 --scale 0.125 --parts steps || echo "profile W5 batchllm FAILED"
  "${p[@]}" --workload W5 --scale 0.125 --parts steps --policy fcfs-lru || echo "profile W5 fcfs-lru FAILED"
  # The host's share of a W1 step on this machine's CPU (the dev CPU: ~2 ms against the 3.5 ms floor).
  "$PY" bench/bench_host.py --workload W1 --scale 1 || echo "bench_host FAILED"
  # With a stop string on every request (checked only where a token can end it; session 16).
  "$PY" bench/bench_host.py --workload W1 --scale 1 --stop "@@" --bpe-tokenizer || echo "bench_host stop FAILED"
}

# ---- 8. (append sections above this line and register them below) ------------------------------------------

run_section environment 30 5 section_environment
BUILD_OK=1   # a SECTIONS list without build runs on an earlier build (REUSE_BUILD's)
if [[ -z "$SECTIONS" || " $SECTIONS " == *" build "* ]]; then
  run_section build 150 60 section_build
  [[ "${SUMMARY[-1]}" == build*ok* ]] || BUILD_OK=0
fi
if (( BUILD_OK )); then
  run_section gpu_tests 140 30 section_gpu_tests
  run_section bench_attention 110 30 section_bench_attention
  run_section bench_sampling 70 15 section_bench_sampling bench_attention
  run_section e2e 240 45 section_e2e
  # ncu before W6 and the profile: its stall reasons decide the next kernel change, and it has not
  # had a slot since run 3 (run 4: 1 s left for it). W6 took 36 s in run 4.
  run_section ncu 90 30 section_ncu tools
  run_section e2e_w6 200 60 section_e2e_w6 e2e
  run_section profile_quick 120 25 section_profile_quick e2e
  run_section sanitizer 90 40 section_sanitizer tools
  [[ " $SECTIONS " == *" profile "* ]] && run_section profile 200 30 section_profile
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
  grep -vE "^JSON " "$OUT/bench_attention.log" | tail -n 20
fi
if [[ -s "$OUT/e2e.log" ]]; then
  echo "e2e:"
  sed -n '/^e2e summary/,$p' "$OUT/e2e.log" | tail -n 12
fi
