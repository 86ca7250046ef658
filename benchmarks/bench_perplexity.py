"""Perplexity of the exact, int8, int4 and int4 + int8 LM head engines on Shakespeare's Sonnets
(public domain).

python benchmarks/bench_perplexity.py                      # the default model, every mode
python benchmarks/bench_perplexity.py --modes exact int4 --tokens 2048
"""

import sys

from llmkernels.perf import perplexity

if __name__ == "__main__":
    sys.exit(perplexity.main())
