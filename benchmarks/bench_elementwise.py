"""Benchmark the memory-bound per-layer kernels (rms_norm, fused_add_rms_norm, rotary_embedding,
silu_and_mul, gelu_tanh_and_mul) against the PyTorch reference, eager and compiled. Needs a GPU.

    python benchmarks/bench_elementwise.py [--quick] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import sys

import torch

import llmkernels as lk
from llmkernels.perf import elementwise, timing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and iterations")
    parser.add_argument(
        "--out-dir",
        default=None,
        help="where to write elementwise.json/.md (default: timing.results_dir())",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not lk.cuda_kernels_available():
        print(
            "bench_elementwise: needs a CUDA GPU and the compiled kernels "
            f"(GPU visible: {torch.cuda.is_available()}; kernels: {lk.extension_status()})",
            file=sys.stderr,
        )
        return 1
    out_dir = args.out_dir or timing.results_dir()
    rows = elementwise.run(out_dir, quick=args.quick)
    print(timing.markdown_table(rows, elementwise.COLUMNS), end="")
    print(f"wrote {out_dir}/elementwise.json and elementwise.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
