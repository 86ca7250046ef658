"""What top-p without top-k costs in the CPU sampling law, before and after sorting only the
nucleus.

Logits: the default model's (SmolLM2-135M-Instruct, CPU fp32) at 64 positions of the README
(teacher-forced), so the distributions are a real model's. For each setting the law
(`llmkernels.cpu.sampling_probs`, one `[1, 49152]` row at a time) is timed as it is (after: the
prefix `cpu._top_p_prefix` estimates is sorted) and with every non-zero probability sorted
(before), median over the positions of the best of 3 calls each; `torch.equal` to the reference
is checked at every position. Then `generate()` (batch 1, 64 new tokens) with each setting (top-p
after and before) against greedy, taking turns (3 warm-up rounds, 5 timed, median). Writes JSON
to argv[1].

Expected: a nucleus of tens to thousands of tokens, so the law from ~9 ms to ~1-3 ms (a pass
over the vocabulary for the estimate, then a topk of the prefix), and sampled decoding with
top-p alone at about plain sampling's cost."""

import json
import statistics
import sys
import time
from pathlib import Path

import torch

import llmkernels as lk
from llmkernels import cpu
from llmkernels import reference as ref

eng = lk.Engine.from_pretrained("default", max_batch_size=1, max_seq_len=512)
text = (Path(lk.__file__).parent.parent / "README.md").read_text()
ids = torch.tensor([eng.tokenizer(text)["input_ids"][:128]])
with torch.inference_mode():
    logits = eng.logits(ids)[0, 64:].float()  # [64, V]
EOS = eng.config.vocab_size - 1
estimate = cpu._top_p_prefix


def whole(probs, top_p):  # before: every non-zero probability (clamped to their count)
    return torch.full((probs.shape[0],), 1 << 30)


def best_of(fn, n=3):
    best = float("inf")
    for _ in range(n):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


out = {"threads": torch.get_num_threads(), "law": {}, "generate": {}}
for temperature, top_k, top_p in (
    (1.0, 0, 0.9),
    (0.8, 0, 0.9),
    (1.0, 0, 0.95),
    (1.2, 0, 0.99),
    (0.8, 50, 0.9),  # HF's default top-k: at most 4,096 candidates are sorted whole, as before
):
    row = {}
    for label, prefix in (("before", whole), ("after", estimate)):
        cpu._top_p_prefix = prefix
        took = []
        for pos in range(logits.shape[0]):
            one = logits[pos : pos + 1]
            law = cpu.sampling_probs(one, temperature, top_k, top_p)
            assert torch.equal(law, ref.sampling_probs(one, temperature, top_k, top_p))
            took.append(
                best_of(
                    lambda one=one, t=temperature, k=top_k, p=top_p: cpu.sampling_probs(
                        one, t, k, p
                    )
                )
            )
        row[label] = statistics.median(took) * 1e3
    cpu._top_p_prefix = estimate
    nucleus, sorted_ = [], []
    for pos in range(logits.shape[0]):
        law = cpu.sampling_probs(logits[pos : pos + 1], temperature, top_k, top_p)
        nucleus.append(int((law > 0).sum()))
        probs = torch.softmax(logits[pos : pos + 1] / temperature, dim=-1)
        if top_k:  # what top-k leaves (<= TOP_P_SORT_ALL) is sorted whole
            after_top_k = ref.sampling_probs(logits[pos : pos + 1], temperature, top_k)
            sorted_.append(int((after_top_k > 0).sum()))
        else:
            sorted_.append(int(estimate(probs, torch.tensor([top_p]))[0]))
    row.update(nucleus_median=statistics.median(nucleus), nucleus_max=max(nucleus))
    row.update(sorted_median=statistics.median(sorted_), sorted_max=max(sorted_))
    name = f"T {temperature} top_k {top_k} top_p {top_p}"
    out["law"][name] = row
    print(
        f"law {name:<28} before {row['before']:6.2f} ms  after {row['after']:6.2f} ms  "
        f"nucleus median {row['nucleus_median']} max {row['nucleus_max']}  "
        f"sorted median {row['sorted_median']} max {row['sorted_max']}",
        flush=True,
    )

settings = {
    "greedy": dict(do_sample=False),
    "sampling T 0.8, top_k 0 (no filter)": dict(do_sample=True, temperature=0.8, top_k=0, seed=0),
    "sampling T 0.8, top_k 0, top_p 0.9": dict(
        do_sample=True, temperature=0.8, top_k=0, top_p=0.9, seed=0
    ),
    "the same, before (whole sort)": dict(
        do_sample=True, temperature=0.8, top_k=0, top_p=0.9, seed=0
    ),
}
times = {name: {1: [], 65: []} for name in settings}
for round_ in range(8):
    for name, kw in settings.items():
        cpu._top_p_prefix = whole if "before" in name else estimate
        for new in (1, 65):
            start = time.perf_counter()
            got = eng.generate(ids, max_new_tokens=new, eos_token_id=EOS, **kw)
            took = time.perf_counter() - start
            assert got.shape[1] == ids.shape[1] + new, "an EOS ended the run early"
            if round_ >= 3:
                times[name][new].append(took)
for name in settings:
    first = statistics.median(times[name][1])
    decode_ms = (statistics.median(times[name][65]) - first) / 64 * 1e3
    out["generate"][name] = {"prefill_and_first_ms": first * 1e3, "decode_ms_per_token": decode_ms}
    print(f"generate {name:<40} decode {decode_ms:6.2f} ms/token", flush=True)
Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
