"""Perplexity of the exact, int8 and int4 engine on Shakespeare's Sonnets (public domain).

python benchmarks/bench_perplexity.py                      # the default model, every mode
python benchmarks/bench_perplexity.py --modes exact int4 --tokens 2048
"""

import sys

from llmkernels.perf import perplexity

if __name__ == "__main__":
    sys.exit(perplexity.main())
