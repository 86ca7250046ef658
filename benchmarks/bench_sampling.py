"""Sampling micro-benchmark: the fused kernel vs HF's sort-based logits processors + multinomial vs
torch.compile(reference.sample), batch {1, 8, 64, 256} x vocab {32000, 128256}, bf16 logits.

python benchmarks/bench_sampling.py              # all shapes -> benchmarks/results/<device>-<date>/
python benchmarks/bench_sampling.py --quick      # a few shapes (smoke)

Needs a CUDA GPU and the compiled kernels; elsewhere it says so and exits.
"""

import argparse
import sys
from pathlib import Path

import torch

import llmkernels as lk
from llmkernels.perf import sampling
from llmkernels.perf.timing import results_dir


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default benchmarks/results/<device>-<date>)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer shapes (smoke)")
    args = parser.parse_args()
    if not lk.cuda_kernels_available():
        print(
            f"bench_sampling: needs a CUDA GPU and the compiled kernels (kernels: {lk.extension_status()}; "
            f"GPU visible: {torch.cuda.is_available()}); nothing to run."
        )
        return 0
    out_dir = Path(args.out) if args.out else results_dir(device="cuda")
    sampling.run(out_dir, quick=args.quick)
    print((out_dir / "sampling.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
