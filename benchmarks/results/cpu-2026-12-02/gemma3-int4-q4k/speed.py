"""One-off: batch-1 greedy decode speed of the embedded Gemma-3-270M (Q4_K_M file) on CPU per
weight mode (exact fp32, int4, gguf = the file's own mix of int4 and int8, gguf with an int8
LM head). Prompt: 128 tokens of the perplexity text; 40 new tokens, EOS ignored; the four
engines loaded together and timed in turn, 5 rounds (the 2-core host's timings move by ~15%
from run to run); the median decode step.

    python benchmarks/results/cpu-2026-12-02/gemma3-int4-q4k/speed.py
"""

import json
import statistics
import time
from pathlib import Path

import torch

import llmkernels as lk
from llmkernels.perf import perplexity

out = Path(__file__).parent
modes = {
    "exact (fp32)": (None, False),
    "int4": ("int4", False),
    "gguf (int4 + int8)": ("gguf", False),
    "gguf + int8 LM head": ("gguf", True),
}
engines = {
    label: lk.Engine.from_pretrained(
        "gemma3-270m", device="cpu", max_seq_len=256, quantize=q, quantize_lm_head=head
    )
    for label, (q, head) in modes.items()
}
tok = next(iter(engines.values())).tokenizer
prompt = tok(perplexity.load_text(), return_tensors="pt").input_ids[:, :128]
steps = {label: [] for label in engines}
for eng in engines.values():
    eng.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up
for _ in range(5):
    for label, eng in engines.items():
        start = time.perf_counter()
        eng.generate(prompt, max_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        eng.generate(prompt, max_new_tokens=41, min_new_tokens=41, do_sample=False)
        steps[label].append((time.perf_counter() - start - prefill) / 40)
rows = [
    {
        "weights": label,
        "step_ms": 1e3 * statistics.median(s),
        "decode_tok_s": 1 / statistics.median(s),
    }
    for label, s in steps.items()
]
(out / "speed.json").write_text(
    json.dumps(
        {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "rows": rows,
            "steps_s": steps,
        },
        indent=2,
    )
)
lines = ["| weights | decode step ms (median of 5) | decode tok/s |", "|---|---|---|"]
lines += [f"| {r['weights']} | {r['step_ms']:.1f} | {r['decode_tok_s']:.1f} |" for r in rows]
(out / "speed.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
