"""Equal rows prefilled once (Engine._prefill) against every row prefilled (as before and as
HF), in one process, taking turns: generate() on the default model (CPU fp32), 4 beams or
num_return_sequences=4 (sampling, seed 0), prompts of the README's first 128 / 512 tokens,
1 and 32 new tokens, EOS off; best of 3. Writes JSON to argv[1]."""

import json
import sys
import time
from pathlib import Path

import torch

import llmkernels as lk
import llmkernels.generate as G

eng = lk.Engine.from_pretrained("default", max_batch_size=8, max_seq_len=2048)
text = (Path(lk.__file__).parent.parent / "README.md").read_text()
tokens = eng.tokenizer(text)["input_ids"]
modes = {"once": G._first_equal_rows, "every_row": lambda ids, mask: None}
out = {"packed_gemms": eng.model.packed_weights, "threads": torch.get_num_threads()}
for plen in (128, 512):
    ids = torch.tensor([tokens[:plen]])
    for name, kw in (
        ("beams4", dict(num_beams=4)),
        ("samples4", dict(do_sample=True, num_return_sequences=4, seed=0)),
    ):
        for new in (1, 32):
            best, seqs = {}, {}
            for _ in range(3):
                for mode, fn in modes.items():
                    G._first_equal_rows = fn
                    start = time.perf_counter()
                    seq = eng.generate(ids, max_new_tokens=new, eos_token_id=None, **kw)
                    took = time.perf_counter() - start
                    best[mode] = min(best.get(mode, took), took)
                    seqs[mode] = seq[:, plen:].tolist()
            key = f"{name}_prompt{plen}_new{new}"
            out[key] = {"s": best, "same_tokens": seqs["once"] == seqs["every_row"]}
            print(
                key, {m: round(t, 3) for m, t in best.items()}, out[key]["same_tokens"], flush=True
            )
G._first_equal_rows = modes["once"]
Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
