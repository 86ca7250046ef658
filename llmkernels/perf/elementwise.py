"""Benchmarks of the per-layer memory-bound ops: rms_norm, fused_add_rms_norm, rotary_embedding,
silu_and_mul, and Gemma's variants (rms_norm with unit_offset, gelu_tanh_and_mul) (bf16), our
CUDA kernels against the PyTorch reference, eager and under ``torch.compile``.

Shapes: decode (1, 8, 64 rows) and prefill (4096 rows) at hidden 2048 and 4096 (Llama 3.2 1B and
Llama 3 8B; their MLP widths 8192 and 14336 for silu_and_mul), and at Gemma-3-270M's hidden 640
(MLP width 2048) for the Gemma variants; RoPE on q/k heads 32/8 x 128 and 32/4 x 64 (q and k are
views of a fused QKV output, as in the model).

Each timing is the median (p20, p80) over many runs with a cold L2 (see
:func:`llmkernels.perf.timing.time_fn`); the flush before each run also hides the host's launch
overhead, so the numbers are GPU time. GB/s = (bytes read + bytes written) / median time, compared
with the device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import ops as lk
from .. import reference as ref
from .timing import copy_bandwidth_gbps, time_fn, write_results

__all__ = ["run"]

DTYPE = torch.bfloat16
EPS = 1e-5
DECODE_ROWS = (1, 8, 64)
PREFILL_ROWS = (4096,)
HIDDEN_TO_INTERMEDIATE = {2048: 8192, 4096: 14336}  # Llama 3.2 1B, Llama 3 8B
GEMMA_HIDDEN, GEMMA_INTERMEDIATE = 640, 2048  # Gemma-3-270M
ROPE_HEADS = ((32, 8, 128), (32, 4, 64))  # (q heads, kv heads, head dim)
COLUMNS = [
    "op",
    "shape",
    "rows",
    "impl",
    "median_us",
    "p20_us",
    "p80_us",
    "gbps",
    "pct_copy_bw",
    "speedup_vs_compile",
]


@dataclass
class _Case:
    op: str
    shape: str
    rows: int
    nbytes: int  # bytes read + written by one call
    impls: dict[str, Callable[[], object]]


def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def _cases(device: torch.device, quick: bool) -> Iterator[_Case]:
    rows_list = (1, 64, 4096) if quick else DECODE_ROWS + PREFILL_ROWS
    hidden_list = (4096,) if quick else tuple(HIDDEN_TO_INTERMEDIATE)
    esize = torch.empty((), dtype=DTYPE).element_size()

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=torch.float32).to(DTYPE)

    compiled_rms = _compiled(ref.rms_norm)
    compiled_fused = _compiled(ref.fused_add_rms_norm)
    compiled_rotary = _compiled(ref.rotary_embedding)
    compiled_silu = _compiled(ref.silu_and_mul)
    compiled_gelu = _compiled(ref.gelu_tanh_and_mul)
    p = functools.partial

    hidden, inter = GEMMA_HIDDEN, GEMMA_INTERMEDIATE
    weight = (0.1 * torch.randn(hidden, device=device)).to(DTYPE)  # Gemma stores scale - 1
    for rows in rows_list:
        x, out = randn(rows, hidden), torch.empty(rows, hidden, device=device, dtype=DTYPE)
        yield _Case(
            "rms_norm unit_offset",
            f"{rows}x{hidden}",
            rows,
            (2 * rows * hidden + hidden) * esize,
            {
                "llmkernels": p(lk.rms_norm, x, weight, EPS, out=out, unit_offset=True),
                "torch eager": p(ref.rms_norm, x, weight, EPS, True),
                "torch.compile": p(compiled_rms, x, weight, EPS, True),
            },
        )
        x, out = randn(rows, 2 * inter), torch.empty(rows, inter, device=device, dtype=DTYPE)
        yield _Case(
            "gelu_tanh_and_mul",
            f"{rows}x{inter}",
            rows,
            3 * rows * inter * esize,
            {
                "llmkernels": p(lk.gelu_tanh_and_mul, x, out=out),
                "torch eager": p(ref.gelu_tanh_and_mul, x),
                "torch.compile": p(compiled_gelu, x),
            },
        )

    for hidden in hidden_list:
        weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(DTYPE)
        for rows in rows_list:
            x, out = randn(rows, hidden), torch.empty(rows, hidden, device=device, dtype=DTYPE)
            yield _Case(
                "rms_norm",
                f"{rows}x{hidden}",
                rows,
                (2 * rows * hidden + hidden) * esize,
                {
                    "llmkernels": p(lk.rms_norm, x, weight, EPS, out=out),
                    "torch eager": p(ref.rms_norm, x, weight, EPS),
                    "torch.compile": p(compiled_rms, x, weight, EPS),
                },
            )
            x, residual = randn(rows, hidden), randn(rows, hidden)
            yield _Case(
                "fused_add_rms_norm",
                f"{rows}x{hidden}",
                rows,
                (4 * rows * hidden + hidden) * esize,
                {
                    "llmkernels": p(lk.fused_add_rms_norm, x, residual, weight, EPS),
                    "torch eager": p(ref.fused_add_rms_norm, x, residual, weight, EPS),
                    "torch.compile": p(compiled_fused, x, residual, weight, EPS),
                },
            )
            inter = HIDDEN_TO_INTERMEDIATE[hidden]
            x, out = randn(rows, 2 * inter), torch.empty(rows, inter, device=device, dtype=DTYPE)
            yield _Case(
                "silu_and_mul",
                f"{rows}x{inter}",
                rows,
                3 * rows * inter * esize,
                {
                    "llmkernels": p(lk.silu_and_mul, x, out=out),
                    "torch eager": p(ref.silu_and_mul, x),
                    "torch.compile": p(compiled_silu, x),
                },
            )

    for num_q_heads, num_kv_heads, head_dim in ROPE_HEADS:
        config = {
            "hidden_size": num_q_heads * head_dim,
            "num_attention_heads": num_q_heads,
            "head_dim": head_dim,
            "rope_theta": 500000.0,
            "max_position_embeddings": 8192,
        }
        cache = lk.rope_cos_sin_cache(config, device=device)
        for tokens in rows_list:
            qkv = randn(tokens, (num_q_heads + 2 * num_kv_heads) * head_dim)
            q = qkv[:, : num_q_heads * head_dim].view(tokens, num_q_heads, head_dim)
            k = qkv[:, num_q_heads * head_dim : (num_q_heads + num_kv_heads) * head_dim]
            k = k.view(tokens, num_kv_heads, head_dim)
            positions = torch.randint(0, 8192, (tokens,), device=device)
            nbytes = (
                2 * tokens * (num_q_heads + num_kv_heads) * head_dim * esize  # q, k read + written
                + tokens * head_dim * 4  # cos | sin rows (fp32)
                + tokens * 8  # positions
            )
            yield _Case(
                "rotary_embedding",
                f"{tokens}x({num_q_heads}+{num_kv_heads})x{head_dim}",
                tokens,
                nbytes,
                {
                    "llmkernels": p(lk.rotary_embedding, positions, q, k, cache, True),
                    "torch eager": p(ref.rotary_embedding, positions, q, k, cache, True),
                    "torch.compile": p(compiled_rotary, positions, q, k, cache, True),
                },
            )


def _set_recompile_limit(limit: int) -> int | None:
    """Let each compiled reference specialize to every benchmark shape (returns the old limit)."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            old = getattr(config, name)
            setattr(config, name, max(old, limit))
            return old
    return None


def run(
    out_dir: str | Path, quick: bool = False, device: str | torch.device = "cuda"
) -> list[dict]:
    """Time every op and shape (ours, reference eager, ``torch.compile(reference)``), write
    ``elementwise.json`` / ``elementwise.md`` into ``out_dir`` and return the rows.

    Each row: op, shape, rows, impl, median_us, p20_us, p80_us, gbps (bytes read + written per
    second), pct_copy_bw (of the copy bandwidth measured in this run), speedup_vs_compile
    (torch.compile time / this time). quick: fewer shapes and iterations. ``device`` other than
    CUDA only smoke-tests the script (all three then run PyTorch code).
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the elementwise benchmark needs a CUDA GPU")
    torch.manual_seed(0)
    _set_recompile_limit(64)
    copy_bw = copy_bandwidth_gbps(device)
    iters, warmup = (30, 5) if quick else (100, 10)
    rows: list[dict] = []
    for case in _cases(device, quick):
        timed: dict[str, dict] = {}
        for impl, fn in case.impls.items():
            try:
                timed[impl] = time_fn(fn, warmup=warmup, iters=iters, cold_l2=True, device=device)
            except Exception as exc:  # e.g. torch.compile unavailable: report, keep going
                timed[impl] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        compile_us = timed.get("torch.compile", {}).get("median_us")
        for impl, stats in timed.items():
            row = {"op": case.op, "shape": case.shape, "rows": case.rows, "impl": impl}
            if "error" in stats:
                rows.append({**row, "error": stats["error"]})
                continue
            gbps = case.nbytes / (stats["median_us"] * 1e-6) / 1e9
            rows.append(
                {
                    **row,
                    "median_us": stats["median_us"],
                    "p20_us": stats["p20_us"],
                    "p80_us": stats["p80_us"],
                    "gbps": gbps,
                    "pct_copy_bw": 100.0 * gbps / copy_bw,
                    "speedup_vs_compile": compile_us / stats["median_us"] if compile_us else None,
                    "bytes": case.nbytes,
                }
            )
    extra = {
        "dtype": str(DTYPE).replace("torch.", ""),
        "copy_bandwidth_gbps": round(copy_bw, 1),
        "timing": f"median of {iters} runs after {warmup} warm-up, cold L2 (256 MiB flush per run)",
    }
    columns = COLUMNS + (["error"] if any("error" in r for r in rows) else [])
    write_results("elementwise", rows, out_dir, extra=extra, columns=columns)
    return rows
