"""Benchmark speculative decoding (prompt lookup) on a real model against the plain engine and
transformers' generate with and without prompt_lookup_num_tokens, on grounded and open-ended
prompts. Runs on CPU or CUDA.

    python benchmarks/bench_speculative.py [--model default] [--device cpu] [--quick] [--prompts tuning|held-out|all]
        [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import sys

from llmkernels.perf import speculative, timing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="as llmkernels --model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--lookup", type=int, default=10, help="prompt_lookup_num_tokens")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per contender")
    parser.add_argument("--quick", action="store_true", help="one prompt of each kind")
    parser.add_argument(
        "--prompts",
        default="tuning",
        choices=sorted(speculative.PROMPT_SETS),
        help="tuning: the prompts the proposer's rule was chosen on; held-out: new ones",
    )
    parser.add_argument(
        "--out-dir", default=None, help="default: timing.results_dir() for the device"
    )
    args = parser.parse_args(argv)
    import torch

    out_dir = args.out_dir or timing.results_dir(device=torch.device(args.device))
    rows = speculative.run(
        args.model,
        args.device,
        args.new_tokens,
        args.lookup,
        args.repeats,
        out_dir,
        quick=args.quick,
        prompts=args.prompts,
    )
    print(timing.markdown_table(rows, speculative.COLUMNS), end="")
    print(f"wrote {out_dir}/speculative.json and speculative.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
