"""The decode step's projections on CPU, one formulation at a time: which weight layout and dtype
reads the model fastest at a few rows.

One sweep is what a decode step multiplies: every layer's fused QKV, O, gate/up and down
weights, then the LM head, each a distinct matrix (so the sweep streams the weights from memory
as the real step does; a single matrix timed in a loop sits in the last-level cache and reads
up to twice as fast). Formulations:

  fp32            ``F.linear`` on ``[out, in]`` weights (MKL)
  fp32-in-major   ``x @ W`` on ``[in, out]`` weights (the engine's fp32 CPU layout without packs)
  fp32-onednn     oneDNN's packed fp32 linear (:class:`llmkernels.packed_gemm.PackedWeight`:
                  ``torch.ops.mkldnn._reorder_linear_weight`` + ``_linear_pointwise``, what
                  inductor emits for frozen weights; the engine's CPU layout where it times faster)
  bf16            ``F.linear`` with bf16 weights and activations
  bf16-onednn     the same packs in bf16
  int8, int4      :class:`llmkernels.quant.QuantizedWeight` (ATen's packed weight-only kernels)

Reported: ms per sweep (median), MB of weights read, GB/s, % of the copy bandwidth measured in
the same run, and the speed relative to fp32.

    python benchmarks/bench_cpu_gemv.py --config smollm2-135m --rows 1
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..packed_gemm import PackedWeight
from . import timing
from .generate import CONFIGS

__all__ = ["FORMULATIONS", "projection_shapes", "sweep", "run", "main"]

FORMULATIONS = ("fp32", "fp32-in-major", "fp32-onednn", "bf16", "bf16-onednn", "int8", "int4")


def projection_shapes(config: str) -> list[tuple[int, int]]:
    """``(out, in)`` of every matrix one decode step multiplies, in order (LM head last)."""
    c = CONFIGS[config]
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim", hidden // heads)
    layer = [
        ((heads + 2 * kv_heads) * head_dim, hidden),  # fused QKV
        (hidden, heads * head_dim),  # O
        (2 * inter, hidden),  # fused gate / up
        (hidden, inter),  # down
    ]
    return layer * c["num_hidden_layers"] + [(c["vocab_size"], hidden)]


def _matmul(formulation: str, weight: torch.Tensor) -> tuple[Callable, int]:
    """``(x -> x @ weight^T in this formulation, bytes it reads)``; weight fp32 ``[out, in]``."""
    from ..quant import quantize_weight

    if formulation == "fp32":
        return (lambda x: F.linear(x, weight)), weight.numel() * 4
    if formulation == "fp32-in-major":
        w = weight.t().contiguous()
        return (lambda x: x @ w), w.numel() * 4
    if formulation == "bf16":
        w = weight.bfloat16()
        return (lambda x: F.linear(x.bfloat16(), w)), w.numel() * 2
    if formulation == "fp32-onednn":
        return PackedWeight(weight).linear, weight.numel() * 4
    if formulation == "bf16-onednn":
        packed = PackedWeight(weight.bfloat16())
        return (lambda x: packed.linear(x.bfloat16())), weight.numel() * 2
    q = quantize_weight(weight, formulation, 32)  # packed for the kernel
    scales = q.kernel_scales if formulation == "int8" else q.scale_and_zero
    return q.matmul, sum(t.numel() * t.element_size() for t in (q.packed, scales))


def sweep(config: str, formulation: str, rows: int, iters: int = 15) -> dict:
    """Time one sweep of ``config``'s projections in ``formulation`` at ``rows`` rows."""
    gen = torch.Generator().manual_seed(0)
    steps, nbytes = [], 0
    for out_features, in_features in projection_shapes(config):
        weight = torch.randn(out_features, in_features, generator=gen) * in_features**-0.5
        fn, size = _matmul(formulation, weight)
        x = torch.randn(rows, in_features, generator=gen)
        steps.append((fn, x))
        nbytes += size
    del weight

    def run_sweep() -> None:
        for fn, x in steps:
            fn(x)

    with torch.inference_mode():
        stats = timing.time_fn(run_sweep, warmup=3, iters=iters, device="cpu")
    ms = stats["median_us"] / 1e3
    return {"formulation": formulation, "ms": ms, "MB": nbytes / 1e6, "GB_s": nbytes / ms / 1e6}


def run(config: str, rows_list, formulations, out_dir) -> list[dict]:
    copy_gbps = timing.copy_bandwidth_gbps("cpu")
    rows = []
    for n in rows_list:
        base = None
        for formulation in formulations:
            try:
                row = sweep(config, formulation, n)
            except (RuntimeError, AttributeError) as exc:  # e.g. a torch without oneDNN
                row = {"formulation": formulation, "error": str(exc).splitlines()[0][:120]}
            row = {"config": config, "rows": n, **row}
            if "ms" in row:
                row["pct_copy_bw"] = round(100 * row["GB_s"] / copy_gbps, 1)
                if formulation == "fp32":
                    base = row["ms"]
                row["speed_vs_fp32"] = round(base / row["ms"], 2) if base else None
            rows.append(row)
            print(f"[cpu_gemv] {row}", file=sys.stderr)
            gc.collect()
    timing.write_results(
        "cpu_gemv",
        rows,
        out_dir,
        extra={"copy_bandwidth_GB_s": round(copy_gbps, 1), "threads": torch.get_num_threads()},
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="smollm2-135m", choices=sorted(CONFIGS))
    p.add_argument("--rows", type=int, nargs="+", default=[1], help="activation rows (batch)")
    p.add_argument("--formulations", nargs="+", default=list(FORMULATIONS), choices=FORMULATIONS)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/...)")
    args = p.parse_args(argv)
    out_dir = Path(args.out) if args.out else timing.results_dir(device="cpu")
    run(args.config, args.rows, args.formulations, out_dir)
    print((out_dir / "cpu_gemv.md").read_text())
    return 0
