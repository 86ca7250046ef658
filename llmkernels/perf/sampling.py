"""Sampling benchmark: the fused kernel vs HF's logits processors + ``torch.multinomial`` vs
``torch.compile(reference.sample)``.

Shapes: batch in {1, 8, 64, 256} x vocab in {32000, 128256}, bf16 logits with an LM-like law (a
Zipf(1.1) head at random positions plus noise), two settings: T=0.7 / top-k 50 / top-p 0.9, and
top-p only (T=0.7, top-p 0.9). Contenders:

  llmkernels      ``lk.sample`` with per-row parameter tensors and an on-device RNG state
  hf              ``LogitsProcessorList([TemperatureLogitsWarper, TopKLogitsWarper,
                  TopPLogitsWarper])`` on fp32 scores (as HF generate casts them), softmax,
                  ``torch.multinomial``: the sort-based path of ``generate(do_sample=True)``
  torch.compile   ``torch.compile(reference.sample, dynamic=True)`` (eager calls only: the
                  reference branches on a device value, so it cannot be graph-captured)

Each runs as a captured CUDA graph ("graph": device time, what a graph-captured decode step pays)
and as called from Python ("eager": includes launch overhead and host work). CUDA events, cold L2,
median / p20 / p80 in microseconds; GB/s counts the logits read once (B * V * 2 bytes) and is also
given as % of the device-to-device copy bandwidth measured in the same run. ``speedup`` on a
contender's row is its median over llmkernels' median in the same mode.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .timing import copy_bandwidth_gbps, time_fn, write_results

BATCHES = (1, 8, 64, 256)
VOCABS = (32000, 128256)
SETTINGS = {  # name -> (temperature, top_k, top_p)
    "T0.7-k50-p0.9": (0.7, 50, 0.9),
    "T0.7-p0.9": (0.7, 0, 0.9),
}
COLUMNS = [
    "batch",
    "vocab",
    "setting",
    "impl",
    "mode",
    "median_us",
    "p20_us",
    "p80_us",
    "gb_s",
    "pct_copy_bw",
    "speedup",
]


def lm_like_logits(batch: int, vocab: int, device, seed: int = 0) -> torch.Tensor:
    """bf16 ``[batch, vocab]``: per row, ``-1.1 * log(rank)`` at a random permutation plus N(0, 0.3^2)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    base = -1.1 * torch.arange(1, vocab + 1, device=device, dtype=torch.float32).log() + 3.0
    perm = torch.argsort(torch.rand(batch, vocab, device=device, generator=gen), dim=-1)
    noise = 0.3 * torch.randn(batch, vocab, device=device, generator=gen)
    return (base[perm] + noise).to(torch.bfloat16)


def _ours(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> Callable[[], object]:
    import llmkernels as lk

    batch, device = logits.shape[0], logits.device
    t = torch.full((batch,), temperature, device=device)
    k = torch.full((batch,), top_k, dtype=torch.int32, device=device)
    p = torch.full((batch,), top_p, device=device)
    state = lk.new_rng_state(device, seed=0)
    out = torch.empty(batch, dtype=torch.int64, device=device)
    return lambda: lk.sample(logits, t, k, p, rng_state=state, check_values=False, out=out)


def _hf(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> Callable[[], object]:
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    processors = LogitsProcessorList(warpers)
    input_ids = torch.zeros(logits.shape[0], 1, dtype=torch.long, device=logits.device)

    def fn():
        scores = processors(input_ids, logits.float())
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1).squeeze(1)

    return fn


_COMPILED = None


def _compiled(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> Callable[[], object]:
    global _COMPILED
    from .. import reference

    if _COMPILED is None:
        _COMPILED = torch.compile(reference.sample, dynamic=True)
    batch, device = logits.shape[0], logits.device
    t = torch.full((batch,), temperature, device=device)
    k = torch.full((batch,), top_k, dtype=torch.int64, device=device)
    p = torch.full((batch,), top_p, device=device)
    return lambda: _COMPILED(logits, t, k, p)


def _graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """Capture fn() in a CUDA graph (after a warm-up on a side stream); return its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def run(
    out_dir: str | Path,
    quick: bool = False,
    name: str = "sampling",
    batches: tuple[int, ...] | None = None,
    vocabs: tuple[int, ...] | None = None,
    impls: tuple[str, ...] = ("llmkernels", "hf", "torch.compile"),
) -> list[dict]:
    """Run the sampling benchmark on the current CUDA device; write ``<name>.{json,md}``.

    batches, vocabs: instead of the default ones (fewer when quick); impls: the contenders."""
    import llmkernels as lk

    if not lk.cuda_kernels_available():
        print(
            f"[bench sampling] skipped: needs a CUDA GPU and the compiled kernels ({lk.extension_status()})",
            file=sys.stderr,
        )
        return []
    device = torch.device("cuda")
    batches = batches or ((1, 64) if quick else BATCHES)
    vocabs = vocabs or ((32000,) if quick else VOCABS)
    settings = dict(list(SETTINGS.items())[:1]) if quick else SETTINGS
    iters = 30 if quick else 100
    copy_bw = copy_bandwidth_gbps(device)
    contenders = {"llmkernels": _ours, "hf": _hf, "torch.compile": _compiled}
    contenders = {impl: contenders[impl] for impl in impls}
    rows: list[dict] = []
    for vocab in vocabs:
        for batch in batches:
            logits = lm_like_logits(batch, vocab, device)
            nbytes = logits.numel() * logits.element_size()
            for setting, (temperature, top_k, top_p) in settings.items():
                ours_us: dict[str, float] = {}
                for impl, make in contenders.items():
                    modes = ("graph", "eager") if impl != "torch.compile" else ("eager",)
                    for mode in modes:
                        row = dict(batch=batch, vocab=vocab, setting=setting, impl=impl, mode=mode)
                        try:
                            fn = make(logits, temperature, top_k, top_p)
                            fn()  # compile / first-call work outside the timing
                            if mode == "graph":
                                fn = _graphed(fn)
                            stats = time_fn(fn, warmup=10, iters=iters, cold_l2=True, device=device)
                        except Exception as exc:  # a contender failing must not hide the others
                            row["error"] = f"{type(exc).__name__}: {exc}"[:200]
                            rows.append(row)
                            print(f"[bench sampling] {row}", file=sys.stderr)
                            continue
                        median = stats["median_us"]
                        gbps = nbytes / (median * 1e-6) / 1e9
                        if impl == "llmkernels":
                            ours_us[mode] = median
                        speedup = median / ours_us[mode] if mode in ours_us else None
                        row.update(
                            median_us=median,
                            p20_us=stats["p20_us"],
                            p80_us=stats["p80_us"],
                            gb_s=gbps,
                            pct_copy_bw=100.0 * gbps / copy_bw,
                            speedup=speedup,
                        )
                        rows.append(row)
                        print(f"[bench sampling] {row}", file=sys.stderr)
    write_results(
        name,
        rows,
        out_dir,
        extra={
            "copy_bandwidth_gbps": round(copy_bw, 1),
            "logits": "bf16, per row -1.1*log(rank) at a random permutation + N(0, 0.3^2)",
            "speedup": "contender median / llmkernels median, same mode (graph or eager)",
        },
        columns=COLUMNS,
    )
    return rows
