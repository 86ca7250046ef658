"""The decode step's projections on CPU per weight formulation (fp32, input-major fp32, bf16,
oneDNN-packed bf16, int8, int4): ms per sweep, GB/s, % of the copy bandwidth.

    python benchmarks/bench_cpu_gemv.py --config smollm2-135m --rows 1 4
"""

import sys

from llmkernels.perf import cpu_gemv

if __name__ == "__main__":
    sys.exit(cpu_gemv.main())
