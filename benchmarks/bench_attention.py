"""Benchmark decode attention: llmkernels' split-K kernel vs PyTorch SDPA vs the reference.

    python benchmarks/bench_attention.py [--quick] [--heads HQ:HK:D ...] [--out DIR]

Writes ``attention.json`` and ``attention.md`` (default folder: benchmarks/results/<device>-<date>/)
and prints the table. Needs a CUDA GPU and the compiled kernels; elsewhere it says so and exits.

Head layouts: ``llmkernels.perf.attention.HEADS`` plus ``EXTRA_HEADS`` below (head_dim 256, the
SIMT kernel, as Gemma-3-270M: 4 query heads, 1 kv head), or only those given with ``--heads``
(e.g. ``--heads 4:1:256 8:4:256``).
"""

from __future__ import annotations

import argparse
import sys

import torch

import llmkernels as lk
from llmkernels.perf import attention, timing

EXTRA_HEADS = ((4, 1, 256),)  # (Hq, Hk, D): Gemma-3-270M (head_dim 256)


def _heads(text: str) -> tuple[int, int, int]:
    """``"Hq:Hk:D"`` -> ``(Hq, Hk, D)``."""
    try:
        q_heads, kv_heads, head_dim = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected Hq:Hk:D (e.g. 4:1:256), got {text!r}") from None
    if min(q_heads, kv_heads, head_dim) < 1 or q_heads % kv_heads:
        raise argparse.ArgumentTypeError(f"need Hq, Hk, D >= 1 with Hq a multiple of Hk: {text!r}")
    return q_heads, kv_heads, head_dim


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="batch 1, two contexts, default SDPA only"
    )
    parser.add_argument(
        "--heads",
        nargs="+",
        type=_heads,
        metavar="HQ:HK:D",
        help="head layouts to run instead of the default ones (e.g. 4:1:256 for Gemma-3-270M)",
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
    heads = args.heads or [*attention.HEADS, *(h for h in EXTRA_HEADS if h not in attention.HEADS)]
    out_dir = args.out or timing.results_dir()
    default_heads = attention.HEADS
    attention.HEADS = tuple(heads)  # attention.run reads the layouts from the module
    try:
        rows = attention.run(out_dir, quick=args.quick)
    finally:
        attention.HEADS = default_heads
    print(timing.markdown_table(rows, attention.COLUMNS))
    print(f"results written to {out_dir}/attention.json and attention.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
