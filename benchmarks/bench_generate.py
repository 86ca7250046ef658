"""End-to-end generation benchmark vs transformers (same as `llmkernels bench`).

python benchmarks/bench_generate.py --config tinyllama-1.1b llama-2-7b --batch 1 8
python benchmarks/bench_generate.py --device cpu --config tiny      # CPU smoke
"""

import argparse
import sys

from llmkernels.cli import _resolve_device
from llmkernels.perf import generate

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    generate.add_arguments(parser)
    args = parser.parse_args()
    sys.exit(generate.main_from_cli(args, _resolve_device(args.device)))
