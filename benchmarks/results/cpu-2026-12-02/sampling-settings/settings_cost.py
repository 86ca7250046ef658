"""What this session's generation settings cost per decode step: generate() on the default
model (CPU fp32, batch 1, the README's first 128 tokens as the prompt, 64 new tokens; EOS is the
vocabulary's last id, which these runs never emit, so every setting watches EOS alike),
each setting against plain greedy decoding, taking turns in one process (3 warm-up rounds, 7
timed; median). Decode ms per token = (time of 65 tokens - time of 1 token) / 64. Writes JSON to
argv[1].

Expected: top_h and min_p cost the reference's sorts over the 49,152-token vocabulary (the
warped law); the length decay a few [V] ops; guidance a second cache row in the same step
(batch-2 GEMMs: less than 2x on a 2-core host) plus two log-softmaxes."""

import json
import statistics
import sys
import time
from pathlib import Path

import torch

import llmkernels as lk

eng = lk.Engine.from_pretrained("default", max_batch_size=2, max_seq_len=512)
text = (Path(lk.__file__).parent.parent / "README.md").read_text()
ids = torch.tensor([eng.tokenizer(text)["input_ids"][:128]])
EOS = eng.config.vocab_size - 1
sample = dict(do_sample=True, temperature=0.8, top_k=0, seed=0)
settings = {
    "greedy": dict(do_sample=False),
    "sampling (T 0.8)": sample,
    "sampling + top_h 0.4": dict(sample, top_h=0.4),
    "sampling + min_p 0.1": dict(sample, min_p=0.1),
    # factor 1: the same tokens as greedy, the work of the decay all the same
    "greedy + exponential_decay_length_penalty (8, 1.0)": dict(
        do_sample=False, exponential_decay_length_penalty=(8, 1.0)
    ),
    "greedy + guidance_scale 1.5": dict(do_sample=False, guidance_scale=1.5),
}


def run(kw: dict, new: int) -> float:
    start = time.perf_counter()
    out = eng.generate(ids, max_new_tokens=new, eos_token_id=EOS, **kw)
    took = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new, "an EOS ended the run early"
    return took


times = {name: {1: [], 65: []} for name in settings}
for round_ in range(10):
    for name, kw in settings.items():
        for new in (1, 65):
            took = run(kw, new)
            if round_ >= 3:
                times[name][new].append(took)
out = {"packed_gemms": eng.model.packed_weights, "threads": torch.get_num_threads(), "rows": {}}
for name in settings:
    first = statistics.median(times[name][1])
    decode_ms = (statistics.median(times[name][65]) - first) / 64 * 1e3
    out["rows"][name] = {"prefill_and_first_ms": first * 1e3, "decode_ms_per_token": decode_ms}
    print(f"{name:<55} first {first * 1e3:7.1f} ms  decode {decode_ms:6.2f} ms/token", flush=True)
Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
