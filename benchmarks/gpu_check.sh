#!/usr/bin/env bash
# One-call GPU verification (see ../shared/GPU.md): build against the device's torch, full test
# suite, compute-sanitizer memcheck + racecheck on the kernel tests, kernel micro-benchmarks and
# the end-to-end benchmark; logs and results into $OUT (at most 8 files come back).
#   device:  bash benchmarks/gpu_check.sh [quick]
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
quick=${1:-}
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/summary.txt"
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/summary.txt"
summary "commit $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"

t0=$SECONDS
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 LLMKERNELS_FORCE_CUDA_BUILD=1 \
  python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
summary "build: rc=$? in $((SECONDS - t0))s"
python3 -m llmkernels.cli info | tee -a "$OUT/summary.txt"

python3 -m pytest -q -ra tests/ > "$OUT/tests.log" 2>&1
summary "tests: rc=$? :: $(tail -1 "$OUT/tests.log")"

kernel_tests="tests/test_cuda_elementwise.py tests/test_cuda_attention.py tests/test_cuda_sampling.py"
for tool in memcheck racecheck; do
  compute-sanitizer --tool $tool --error-exitcode 99 python3 -m pytest -q -x -m "cuda and not slow" $kernel_tests \
    > "$OUT/sanitizer-$tool.log" 2>&1
  summary "compute-sanitizer $tool: rc=$? :: $(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/sanitizer-$tool.log" | tail -2 | tr '\n' ' ')"
done

if [ "$quick" != quick ]; then
  python3 -m llmkernels.cli bench --device cuda --kernels --out "$OUT/results" \
    --config tinyllama-1.1b llama-2-7b --batch 1 8 --prompt 128 2048 > "$OUT/bench.log" 2>&1
  summary "bench: rc=$?"
  tail -40 "$OUT/bench.log"
fi
# At most 8 files come back from the device: pack everything but the summary into one archive.
(cd "$OUT" && tar czf gpu_check.tar.gz --exclude=gpu_check.tar.gz --exclude=summary.txt . \
  && find . -mindepth 1 ! -name gpu_check.tar.gz ! -name summary.txt -delete)
cat "$OUT/summary.txt"
