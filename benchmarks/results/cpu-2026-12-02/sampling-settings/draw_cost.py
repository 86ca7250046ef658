"""What one CPU draw costs, piece by piece: the law (`ops.sampling_probs`, as the engine passes the
settings: per-row tensors, every later filter a tensor) and the draw from it
(`ops.sample_from_probs`: the sampler on its log), for plain sampling and the warped settings, on
one `[1, 49152]` row of random logits (randn x 3). Best of 50 calls each, ms. Prints a table;
argv[1]: a label for it.

Expected (after `reference.log_or_minus_inf` and no one-hot without greedy rows): the law's two
logs of mostly-zero probabilities (eta's entropy, the draw's log; ~0.4 ms each, a log of 0 costs
30x a log of a positive number here) and the greedy rows' argmax / one-hot (~0.15 ms) gone."""

import sys
import time

import torch

from llmkernels import ops

torch.manual_seed(0)
logits = torch.randn(1, 49152) * 3
rng = ops.new_rng_state(logits.device, 0)
rows = [torch.tensor([0.8]), torch.tensor([0]), torch.tensor([1.0])]
off = [torch.tensor([v]) for v in (0.0, 1.0, 0.0, 0.0, 0.0)]  # min_p typical eps eta top_h
warps = {"all off": off, "min_p 0.1": [torch.tensor([0.1])] + off[1:]}
warps["top_h 0.4"] = off[:4] + [torch.tensor([0.4])]


def best(fn, n=50):
    fn()
    b = float("inf")
    for _ in range(n):
        start = time.perf_counter()
        fn()
        b = min(b, time.perf_counter() - start)
    return b * 1e3


print(f"## {sys.argv[1] if len(sys.argv) > 1 else ''}")
print("| what | ms |\n|---|---|")
print(
    f"| plain sampling, `ops.sample` (law and draw) | {best(lambda: ops.sample(logits, *rows, rng_state=rng)):.2f} |"
)
for name, w in warps.items():
    law = best(lambda w=w: ops.sampling_probs(logits, *rows, *w))
    probs = ops.sampling_probs(logits, *rows, *w)
    draw = best(lambda p=probs: ops.sample_from_probs(p, rng_state=rng))
    print(f"| warped, {name}: the law | {law:.2f} |")
    print(f"| warped, {name}: the draw from it | {draw:.2f} |")
