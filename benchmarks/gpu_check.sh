#!/usr/bin/env bash
# GPU verification on a lent device (see ../shared/GPU.md), in stages. One device call runs at
# most 600 s: every step runs under `timeout`, capped by a deadline 560 s after the start, so a
# call always returns its logs. Run one or two stages per call, `test` first.
#   bash benchmarks/gpu_check.sh [STAGE ...]      default: test
# Stages (the build runs first; skipped when csrc/ and setup.py hash as at the last build):
#   test       whole test suite                                       (330 s)
#   memcheck   compute-sanitizer memcheck, each kernel test file      (3 x 150 s)
#   racecheck  compute-sanitizer racecheck, each kernel test file     (3 x 150 s)
#   kernels    kernel micro-benchmarks                                (300 s)
#   bench      end-to-end vs transformers, batch 1: TinyLlama-1.1B and Llama-2-7B shapes (420 s)
#   bench8     the same at batch 8                                    (420 s)
# Results land in $OUT: summary.txt plus one archive per call (at most 8 files come back).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(test)
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
deadline=$((SECONDS + 560))
budget() { # timeout for a step: its own budget, or less when the deadline is nearer
  local left=$((deadline - SECONDS))
  echo $(( left < $1 ? (left > 1 ? left : 1) : $1 ))
}
kernel_tests=(tests/test_cuda_elementwise.py tests/test_cuda_attention.py tests/test_cuda_sampling.py)
bench_args=(--device cuda --new-tokens 128 --prompt 128 --config tinyllama-1.1b llama-2-7b)

build() {
  # The tree is copied afresh on every call (new file times): compare contents, not times.
  local hash stamp=build/gpu_check.hash
  hash=$(cat csrc/* setup.py | sha1sum | cut -d' ' -f1)
  if ls llmkernels/_C*.so > /dev/null 2>&1 && [ "$(cat $stamp 2>/dev/null)" = "$hash" ]; then
    return 0
  fi
  local t0=$SECONDS
  CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
    LLMKERNELS_FORCE_CUDA_BUILD=1 timeout "$(budget 400)" \
    python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/logs/build.log" 2>&1
  local rc=$?
  summary "build: rc=$rc in $((SECONDS - t0))s"
  [ $rc -eq 0 ] && mkdir -p build && echo "$hash" > $stamp
  python3 -m llmkernels.cli info | tee -a "$OUT/summary.txt"
}

sanitize() {  # $1 = memcheck | racecheck
  # No caching allocator under memcheck, so an overrun past a tensor is past its allocation
  # (graph capture needs the caching allocator: those tests are left out).
  local env=() filter=()
  [ "$1" = memcheck ] && env=(PYTORCH_NO_CUDA_MEMORY_CACHING=1) && filter=(-k "not graph")
  for f in "${kernel_tests[@]}"; do
    local log="$OUT/logs/$1-$(basename "$f" .py).log"
    env "${env[@]}" timeout "$(budget 150)" compute-sanitizer --tool "$1" --error-exitcode 99 \
      python3 -m pytest -q -x -m "cuda and not slow" "${filter[@]}" "$f" > "$log" 2>&1
    summary "$1 $f: rc=$? (124 = timed out: the tests run before it were checked);" \
      "$(grep -c '^========= ' "$log") sanitizer lines :: $(grep -E 'ERROR SUMMARY|passed|failed' "$log" | tail -2 | tr '\n' ' ')"
  done
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/summary.txt"
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" | tee -a "$OUT/summary.txt"
summary "commit $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown); stages: ${stages[*]}"
build
for stage in "${stages[@]}"; do
  t0=$SECONDS
  case $stage in
    test)
      timeout "$(budget 330)" python3 -m pytest -q -ra tests/ > "$OUT/logs/tests.log" 2>&1
      summary "tests: rc=$? :: $(tail -1 "$OUT/logs/tests.log")" ;;
    memcheck | racecheck) sanitize "$stage" ;;
    kernels)
      timeout "$(budget 300)" python3 -c "
from pathlib import Path
from llmkernels.perf import attention, elementwise, sampling
for m in (elementwise, attention, sampling):
    m.run(Path('$OUT/results'))" > "$OUT/logs/kernels.log" 2>&1
      summary "kernels: rc=$?" ;;
    bench | bench8)
      batch=1; [ "$stage" = bench8 ] && batch=8
      timeout "$(budget 420)" python3 -m llmkernels.cli bench "${bench_args[@]}" --batch $batch \
        --out "$OUT/results/b$batch" > "$OUT/logs/$stage.log" 2>&1
      summary "$stage: rc=$? (rows of finished shapes are saved even when cut short)"
      cat "$OUT/results/b$batch/generate.md" 2>/dev/null ;;
    *) summary "unknown stage $stage" ;;
  esac
  summary "stage $stage took $((SECONDS - t0))s"
done
# Pack all but the summary into one archive named by its stages.
name="gpu_check-$(IFS=-; echo "${stages[*]}").tar.gz"
(cd "$OUT" && tar czf "$name" logs $(ls -d results 2>/dev/null) && rm -rf logs results)
cat "$OUT/summary.txt"
