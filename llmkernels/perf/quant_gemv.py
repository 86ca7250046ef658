"""Benchmarks of the weight-only GEMVs of decode: our ``int8_linear`` and ``int4_linear`` kernels
against ATen's packed kernels (``_weight_int8pack_mm``, tinygemm's ``_weight_int4pack_mm``) and
the bf16 GEMM, on Llama-2-7B's projections at decode batches 1, 4 and 8.

GB/s = the weight's bytes (codes plus scales and zeros) / median time: at these batches the
activations are a rounding error. Compared with the copy bandwidth measured in the same run.
Each timing has a cold L2 (:func:`llmkernels.perf.timing.time_fn`): every weight here but the
smallest int4 one is larger than an H200's L2 anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import ops
from ..quant import quantize_weight
from .timing import copy_bandwidth_gbps, time_fn, write_results

__all__ = ["run", "COLUMNS"]

# (name, out_features, in_features): Llama-2-7B's fused QKV, O, fused gate/up and down
SHAPES = (("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096), ("down", 4096, 11008))
COLUMNS = [
    "shape",
    "batch",
    "impl",
    "median_us",
    "p20_us",
    "p80_us",
    "gb_s",
    "pct_copy_bw",
    "x_bf16",
]


def _impls(
    w: torch.Tensor, x: torch.Tensor, q8, q4s
) -> dict[str, tuple[Callable[[], object], int]]:
    """impl -> (call, weight bytes it reads), for the weight w, its int8 form q8 and its int4
    forms q4s (group size -> QuantizedWeight)."""
    impls: dict[str, tuple[Callable[[], object], int]] = {
        "bf16 F.linear": (lambda: F.linear(x, w), w.numel() * 2)
    }
    impls["int8_linear (ours)"] = (
        lambda: ops.int8_linear(x, q8.qweight, q8.scales),
        q8.qweight.numel() + q8.scales.numel() * 4,
    )
    impls["int8 aten _weight_int8pack_mm"] = (
        lambda: torch.ops.aten._weight_int8pack_mm(x, q8.packed, q8.kernel_scales),
        q8.qweight.numel() + q8.kernel_scales.numel() * 2,
    )
    for group, q4 in q4s.items():
        # int4_linear's [out, in / G, 2] layout (kept on CUDA only; here for a CPU smoke run)
        rows = q4.scale_zero_rows
        if rows is None:
            rows = q4.scale_and_zero.transpose(0, 1).contiguous()
        nbytes = q4.qweight.numel() + rows.numel() * 2
        impls[f"int4_linear g{group} (ours)"] = (
            lambda q4=q4, rows=rows: ops.int4_linear(x, q4.qweight, rows),
            nbytes,
        )
        impls[f"int4 tinygemm g{group}"] = (
            lambda q4=q4: torch.ops.aten._weight_int4pack_mm(
                x, q4.packed, q4.group_size, q4.scale_and_zero
            ),
            nbytes,
        )
    return impls


def run(
    out_dir: str | Path, quick: bool = False, device: str | torch.device = "cuda"
) -> list[dict]:
    """Time every impl on every shape and batch, write ``quant_gemv.json`` / ``.md`` into
    ``out_dir`` and return the rows (quick: batch 1 and 8 only, fewer runs)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError("the quantized GEMV benchmark needs a CUDA GPU")
    torch.manual_seed(0)
    copy_bw = copy_bandwidth_gbps(device)
    iters, warmup = (30, 5) if quick else (100, 10)
    rows: list[dict] = []
    for name, out_features, in_features in SHAPES:
        w = torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16) / 64
        q8 = quantize_weight(w, "int8")
        q4s = {group: quantize_weight(w, "int4", group) for group in (32, 128)}
        for batch in (1, 8) if quick else (1, 4, 8):
            x = torch.randn(batch, in_features, device=device, dtype=torch.bfloat16)
            bf16_us = None
            for impl, (fn, nbytes) in _impls(w, x, q8, q4s).items():
                row = {
                    "shape": f"{name} {out_features}x{in_features}",
                    "batch": batch,
                    "impl": impl,
                }
                try:
                    stats = time_fn(fn, warmup=warmup, iters=iters, cold_l2=True, device=device)
                except Exception as exc:  # an ATen kernel missing on this GPU: report, keep going
                    rows.append({**row, "error": f"{type(exc).__name__}: {str(exc)[:160]}"})
                    continue
                bf16_us = bf16_us or stats["median_us"]
                gb_s = nbytes / (stats["median_us"] * 1e-6) / 1e9
                rows.append(
                    {
                        **row,
                        "median_us": stats["median_us"],
                        "p20_us": stats["p20_us"],
                        "p80_us": stats["p80_us"],
                        "gb_s": gb_s,
                        "pct_copy_bw": 100.0 * gb_s / copy_bw,
                        "x_bf16": bf16_us / stats["median_us"],
                    }
                )
    extra = {
        "copy_bandwidth_gbps": round(copy_bw, 1),
        "timing": f"CUDA events, median of {iters} runs after {warmup} warm-up, cold L2",
        "bytes": "codes + scales (+ zeros): int8 1, int4 g32 0.625, int4 g128 0.53 bytes per weight",
    }
    columns = COLUMNS + (["error"] if any("error" in r for r in rows) else [])
    write_results("quant_gemv", rows, out_dir, extra=extra, columns=columns)
    return rows
