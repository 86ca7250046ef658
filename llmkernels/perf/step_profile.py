"""Where one decode step's time goes, op by op: the engine's eager step under torch.profiler.

On CUDA: the GPU time of each kernel per step, their sum, the step's wall time eager and as a
CUDA-graph replay (CUDA events), and the time the weights take at the copy bandwidth measured in
the same run. What the graph step spends beyond the kernels' sum is gaps between kernels; what
the kernels spend beyond the bandwidth time is kernels below the memory limit. On CPU: the self
time of each aten op per step (what a dry run can check).

    python -m llmkernels.perf.step_profile --config tinyllama-1.1b        # GPU, bf16, batch 1
    python -m llmkernels.perf.step_profile --device cpu --config tiny
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .timing import copy_bandwidth_gbps, results_dir, write_results


def _short(name: str, width: int = 70) -> str:
    """A kernel's name without its return type, anonymous namespaces and argument list, cut to
    ``width``. The argument list is the first ``(`` outside template brackets: kernels in an
    anonymous namespace (all of ours) have a ``(`` before their name."""
    name = name.replace("(anonymous namespace)::", "").removeprefix("void ")
    depth = 0
    for i, c in enumerate(name):
        depth += (c == "<") - (c == ">")
        if c == "(" and depth == 0:
            name = name[:i]
            break
    return name if len(name) <= width else name[: width - 3] + "..."


def _timed_ms(step, steps: int, device: torch.device) -> float:
    """Mean wall time of ``step`` in ms (CUDA events on CUDA)."""
    import time

    for _ in range(3):
        step()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) * 1e3 / steps


def profile_step(config: str, batch: int, prompt: int, steps: int, device, dtype, out_dir) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from ..generate import Engine
    from .generate import build_model

    cuda = device.type == "cuda"
    model, weight_bytes = build_model(config, dtype, device)
    max_seq = prompt + 4 * steps + 16
    ids = torch.randint(
        0, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0)
    )

    def fresh_step(use_graph: bool):
        engine = Engine.from_hf(
            model, max_batch_size=batch, max_seq_len=max_seq, use_cuda_graph=use_graph
        )
        engine.logits(ids.to(device))  # fills the cache with the prompt
        return engine, engine.decode_step(batch_size=batch)

    summary: dict = {"config": config, "batch": batch, "prompt": prompt, "dtype": str(dtype)}
    if cuda:
        graph_engine, graph_step = fresh_step(True)
        summary["graph_step_us"] = 1e3 * _timed_ms(graph_step, steps, device)
        del graph_engine, graph_step
    engine, step = fresh_step(False)
    summary["eager_step_us"] = 1e3 * _timed_ms(step, steps, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)

    rows = []
    for event in prof.key_averages():
        us = (event.self_device_time_total if cuda else event.self_cpu_time_total) / steps
        if cuda and getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        if us <= 0:
            continue
        rows.append(
            {"op": _short(event.key), "calls_per_step": event.count / steps, "us_per_step": us}
        )
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    for r in rows:
        r["share"] = r["us_per_step"] / total if total else None
    copy_gbps = copy_bandwidth_gbps(device)
    summary.update(
        ops_us_per_step=total,
        weight_MB=weight_bytes / 1e6,
        copy_bandwidth_GB_s=copy_gbps,
        weights_at_copy_bw_us=weight_bytes / (copy_gbps * 1e3) if copy_gbps else None,
    )
    write_results("step_profile", rows, out_dir, extra=summary)
    return {"summary": summary, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config", default=None, help="a bench config (default tinyllama-1.1b, CPU: tiny)"
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = (
        getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    )
    config = args.config or ("tinyllama-1.1b" if cuda else "tiny")
    out_dir = Path(args.out) if args.out else results_dir(device=device)
    result = profile_step(config, args.batch, args.prompt, args.steps, device, dtype, out_dir)
    print((out_dir / "step_profile.md").read_text())
    return 0 if result["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
