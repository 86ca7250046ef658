"""Benchmark decode attention: llmkernels' split-K kernel vs PyTorch SDPA vs the reference.

    python benchmarks/bench_attention.py [--quick] [--out DIR]

Writes ``attention.json`` and ``attention.md`` (default folder: benchmarks/results/<device>-<date>/)
and prints the table. Needs a CUDA GPU and the compiled kernels; elsewhere it says so and exits.
"""

from __future__ import annotations

import argparse
import sys

import torch

import llmkernels as lk
from llmkernels.perf import attention, timing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="batch 1, two contexts, default SDPA only"
    )
    parser.add_argument(
        "--out", default=None, help="results folder (default: benchmarks/results/<device>-<date>)"
    )
    args = parser.parse_args(argv)
    if not lk.cuda_kernels_available():
        print(
            "bench_attention: skipped, needs a CUDA GPU and the compiled kernels "
            f"(kernels: {lk.extension_status()}; GPU visible: {torch.cuda.is_available()})"
        )
        return 0
    out_dir = args.out or timing.results_dir()
    rows = attention.run(out_dir, quick=args.quick)
    print(timing.markdown_table(rows, attention.COLUMNS))
    print(f"results written to {out_dir}/attention.json and attention.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
