"""Decode-attention benchmark: our split-K kernel vs PyTorch SDPA (each backend) vs the reference.

One new query token per sequence attends over ``ctx`` cached tokens (bf16), for every batch size,
context length and head layout below. Decode attention is memory-bound: the useful traffic is
the K and V bytes, ``2 * B * Hk * ctx * D * 2``, so each row reports GB/s of K+V read and its
percentage of the device-to-device copy bandwidth measured in the same run. Every run starts
with a cold L2 (the cache of a real decode step was last touched one layer-step ago).

SDPA variants: ``enable_gqa=True`` on the cache as is, and HF's ``repeat_kv`` (expand + reshape
copy of K and V to Hq heads, timed as part of the call, as HF's eager/SDPA attention does), each
under every SDPA backend that accepts the shapes. ``max_abs_err`` is each output's distance to the
reference computed in fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .. import ops
from .. import reference as ref
from . import timing

BATCHES = (1, 8, 32)
CONTEXTS = (512, 4096, 32768)
HEADS = ((32, 4, 64), (32, 8, 128), (9, 3, 64))  # (Hq, Hk, D)
COLUMNS = (
    "Hq",
    "Hk",
    "D",
    "B",
    "ctx",
    "impl",
    "median_us",
    "p20_us",
    "p80_us",
    "GB/s",
    "% copy bw",
    "x best SDPA",
    "max_abs_err",
    "note",
)
_ERRORS = (RuntimeError, NotImplementedError, ValueError, TypeError)


def _sdpa_backends() -> list[tuple[str, object]]:
    from torch.nn.attention import SDPBackend

    names = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
    return [
        (name.lower(), getattr(SDPBackend, name)) for name in names if hasattr(SDPBackend, name)
    ]


def _repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """HF ``repeat_kv``: ``[B, Hk, S, D] -> [B, Hk * group, S, D]`` (a copy)."""
    batch, kv_heads, seq, head_dim = x.shape
    if group == 1:
        return x
    return (
        x[:, :, None]
        .expand(batch, kv_heads, group, seq, head_dim)
        .reshape(batch, kv_heads * group, seq, head_dim)
    )


def _iters_for(fn, quick: bool) -> int:
    """Enough runs for ~0.3 s per row (5 to 100), from one timed call."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    per_call_ms = max(start.elapsed_time(end), 1e-3)
    return max(5, min(30 if quick else 100, int(300 / per_call_ms)))


def _free_bytes() -> int:
    return torch.cuda.mem_get_info()[0]


def run(out_dir: str | Path, quick: bool = False) -> list[dict]:
    """Benchmark decode attention on the current CUDA device; write ``attention.json``/``.md``.

    Parameters
    ----------
    out_dir : folder for the result files.
    quick : fewer shapes (batch 1, contexts 4096 and 32768), the default SDPA backend only, and
        fewer runs.

    Returns the result rows (one per implementation and shape): median/p20/p80 µs, GB/s of K+V
    read, % of the copy bandwidth, the speed-up of our kernel over the fastest SDPA variant, and
    the max abs error against the fp32 reference.
    """
    if not ops.cuda_kernels_available():
        raise RuntimeError(
            "the decode-attention benchmark needs a CUDA GPU and the compiled kernels "
            f"(kernels: {ops.extension_status()}; GPU visible: {torch.cuda.is_available()})"
        )
    device = torch.device("cuda")
    copy_bw = timing.copy_bandwidth_gbps(device)
    batches, contexts = ((1,), (4096, 32768)) if quick else (BATCHES, CONTEXTS)
    backends = [("default", None)] + ([] if quick else _sdpa_backends())
    rows: list[dict] = []
    skipped: list[str] = []

    for q_heads, kv_heads, head_dim in HEADS:
        group = q_heads // kv_heads
        for batch in batches:
            for ctx in contexts:
                shape = {"Hq": q_heads, "Hk": kv_heads, "D": head_dim, "B": batch, "ctx": ctx}
                kv_bytes = 2 * batch * kv_heads * ctx * head_dim * 2
                # caches + their fp32 copies for the reference output, with headroom
                if 3.5 * kv_bytes + (1 << 30) > _free_bytes():
                    skipped.append(f"B={batch} ctx={ctx} Hq={q_heads} Hk={kv_heads} D={head_dim}")
                    continue
                rows += _bench_shape(shape, group, kv_bytes, copy_bw, backends, quick)
                torch.cuda.empty_cache()

    extra = {
        "copy_bandwidth_gbps": round(copy_bw, 1),
        "dtype": "bfloat16",
        "bytes": "K + V read: 2 * B * Hk * ctx * D * 2 (the repeat_kv rows also copy them)",
        "timing": "CUDA events, cold L2, median with p20/p80",
    }
    if skipped:
        extra["skipped (memory)"] = "; ".join(skipped)
    timing.write_results("attention", rows, out_dir, extra=extra, columns=COLUMNS)
    return rows


def _bench_shape(
    shape: dict, group: int, kv_bytes: int, copy_bw: float, backends, quick: bool
) -> list[dict]:
    from torch.nn.attention import sdpa_kernel

    batch, q_heads, kv_heads, head_dim, ctx = (shape[k] for k in ("B", "Hq", "Hk", "D", "ctx"))
    dtype, device = torch.bfloat16, torch.device("cuda")
    scale = head_dim**-0.5
    q = torch.randn(batch, q_heads, head_dim, device=device).to(dtype)
    k_cache = torch.randn(batch, kv_heads, ctx, head_dim, device=device).to(dtype)
    v_cache = torch.randn(batch, kv_heads, ctx, head_dim, device=device).to(dtype)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    expected = ref.decode_attention(q.float(), k_cache.float(), v_cache.float(), seq_lens, scale)
    q4 = q[:, :, None, :]  # [B, Hq, 1, D]

    candidates = []
    out = torch.empty_like(q)
    workspace = ops.decode_attention_workspace(q, k_cache)
    splits = workspace.shape[2]

    def ours():
        return ops.decode_attention(
            q, k_cache, v_cache, seq_lens, scale, out=out, workspace=workspace
        )

    candidates.append(("llmkernels", ours, f"{splits} split(s)"))
    for name, backend in backends:

        def gqa(backend=backend):
            if backend is None:
                return F.scaled_dot_product_attention(
                    q4, k_cache, v_cache, scale=scale, enable_gqa=True
                )
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(
                    q4, k_cache, v_cache, scale=scale, enable_gqa=True
                )

        def repeated(backend=backend):
            k, v = _repeat_kv(k_cache, group), _repeat_kv(v_cache, group)
            if backend is None:
                return F.scaled_dot_product_attention(q4, k, v, scale=scale)
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q4, k, v, scale=scale)

        candidates.append((f"sdpa[{name}] enable_gqa", gqa, ""))
        candidates.append((f"sdpa[{name}] repeat_kv", repeated, "incl. the repeat_kv copy"))

    def reference():
        return ref.decode_attention(q, k_cache, v_cache, seq_lens, scale)

    candidates.append(("reference (PyTorch, fp32 math)", reference, ""))

    rows = []
    for impl, fn, note in candidates:
        # repeat_kv / math backends / the reference materialize up to `group`-fold or fp32 copies
        if impl != "llmkernels" and (group + 2) * kv_bytes + (1 << 30) > _free_bytes():
            rows.append({**shape, "impl": impl, "note": "skipped: not enough GPU memory"})
            continue
        try:
            result = fn()
            torch.cuda.synchronize()
        except _ERRORS as exc:
            rows.append({**shape, "impl": impl, "note": f"unsupported here ({type(exc).__name__})"})
            continue
        error = (result.reshape(batch, q_heads, head_dim).float() - expected).abs().max().item()
        del result
        stats = timing.time_fn(
            fn, warmup=3, iters=_iters_for(fn, quick), cold_l2=True, device=device
        )
        gbps = kv_bytes / (stats["median_us"] * 1e-6) / 1e9
        rows.append(
            {
                **shape,
                "impl": impl,
                "median_us": stats["median_us"],
                "p20_us": stats["p20_us"],
                "p80_us": stats["p80_us"],
                "GB/s": gbps,
                "% copy bw": 100 * gbps / copy_bw,
                "max_abs_err": error,
                "note": note,
            }
        )
    timed_sdpa = [r["median_us"] for r in rows if r["impl"].startswith("sdpa") and "median_us" in r]
    if timed_sdpa and "median_us" in rows[0]:
        rows[0]["x best SDPA"] = min(timed_sdpa) / rows[0]["median_us"]
    return rows
