"""Tensor-parallel decode: one process vs N ranks (llmkernels.perf.tensor_parallel). Run under
torchrun:

    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --config tinyllama-1.1b --layers 4
"""

import sys

from llmkernels.perf.tensor_parallel import main

if __name__ == "__main__":
    sys.exit(main())
