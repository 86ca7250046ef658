"""One-off: perplexity of the embedded Gemma-3-270M (Q4_K_M file) exact, int4 taking the file's
Q4_K blocks (the default since 2026-12-02), int4 requantizing every projection from fp32
(what quantize="int4" did before; forced here by emptying the GGUF mapping), and quantize="gguf"
(the file's own precision: its Q4_K blocks as int4, its 5-, 6- and 8-bit tensors as int8).

    python benchmarks/results/cpu-2026-12-02/gemma3-int4-q4k/run.py
"""

import json
import math
import sys
from pathlib import Path

import torch

import llmkernels.generate as generate
import llmkernels.loading as loading
from llmkernels.perf import perplexity

out = Path(__file__).parent
rows = []
exact_argmax = None
text_ids = None
for label, quantize, mapped in (
    ("exact", None, True),
    ("int4, the file's Q4_K blocks", "int4", True),
    ("int4, all requantized", "int4", False),
    ("gguf: the Q4_K blocks int4, the rest int8", "gguf", True),
):
    # "all requantized": no GGUF source for the int4 blocks (was generate.source_int4_projections
    # when these results were made; the blocks are now taken while loading)
    saved = loading.source_gguf_path
    if not mapped:
        loading.source_gguf_path = lambda path_or_id: None
    engine = generate.Engine.from_pretrained(
        "gemma3-270m", device="cpu", max_seq_len=1024, quantize=quantize
    )
    loading.source_gguf_path = saved
    if text_ids is None:
        text_ids = engine.tokenizer(perplexity.load_text(), return_tensors="pt").input_ids[0][:4096]
    result = perplexity.score(engine, text_ids, 1024, 512)
    mean_nll = result["nll"].mean().item()
    if exact_argmax is None:
        exact_argmax = result["argmax"]
    row = {
        "weights": label,
        "tokens_scored": result["nll"].numel(),
        "perplexity": math.exp(mean_nll),
        "top1_agreement_with_exact": (result["argmax"] == exact_argmax).float().mean().item(),
    }
    print(row, file=sys.stderr)
    rows.append(row)
    del engine
(out / "perplexity.json").write_text(
    json.dumps({"torch": torch.__version__, "rows": rows}, indent=2)
)
lines = ["| weights | perplexity | teacher-forced top-1 = exact |", "|---|---|---|"]
lines += [
    f"| {r['weights']} | {r['perplexity']:.2f} | {100 * r['top1_agreement_with_exact']:.1f}% |"
    for r in rows
]
(out / "perplexity.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
