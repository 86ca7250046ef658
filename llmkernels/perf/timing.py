"""Shared benchmarking utilities: CUDA-event timing, copy bandwidth, environment, result files.

Every benchmark reports the median with p20/p80 over many runs after warm-up, and compares
achieved GB/s with the device-to-device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

_L2_FLUSH_BYTES = 256 << 20  # larger than any current GPU's L2


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[idx]


def time_fn(
    fn: Callable[[], object],
    *,
    warmup: int = 10,
    iters: int = 100,
    cold_l2: bool = False,
    device: torch.device | str | None = None,
) -> dict:
    """Time ``fn()``: median, p20 and p80 in microseconds.

    On CUDA each run is bracketed by CUDA events (``cold_l2`` writes a 256 MiB buffer between runs,
    so small kernels are measured reading from HBM, not L2). On CPU, ``time.perf_counter``.
    """
    device = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    for _ in range(warmup):
        fn()
    times_us: list[float] = []
    if device.type == "cuda":
        flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if cold_l2 else None
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        torch.cuda.synchronize(device)
        for i in range(iters):
            if flush is not None:
                flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(device)
        times_us = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times_us.append((time.perf_counter() - t0) * 1e6)
    return {
        "median_us": statistics.median(times_us),
        "p20_us": _percentile(times_us, 0.2),
        "p80_us": _percentile(times_us, 0.8),
        "iters": iters,
    }


def copy_bandwidth_gbps(device: torch.device | str = "cuda", nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write bytes over time), median of runs.

    The buffers are far larger than L2, so this is the practical HBM roofline for our kernels."""
    device = torch.device(device)
    if device.type != "cuda":
        nbytes = min(nbytes, 256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    stats = time_fn(
        lambda: dst.copy_(src), warmup=5, iters=30 if device.type == "cuda" else 5, device=device
    )
    return 2 * nbytes / (stats["median_us"] * 1e-6) / 1e9


def git_sha() -> str:
    """The commit measured: ``$LLMKERNELS_COMMIT`` when set (the GPU machine receives the working
    tree with a stale .git, so gpu_check.sh passes the commit in), else ``git rev-parse``."""
    if os.environ.get("LLMKERNELS_COMMIT"):
        return os.environ["LLMKERNELS_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[2]
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    """The CPU's model name and the cores this process may use, e.g. "AMD EPYC (2 cores)": CPU
    results depend on it (MKL takes other code paths on other vendors' CPUs)."""
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model or 'cpu'} ({cores} cores)"


def environment(device: torch.device | str | None = None) -> dict:
    """Device name, torch/CUDA/transformers versions, git SHA, date: stamped on every result file."""
    import llmkernels

    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    device = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": tf_version,
        "llmkernels": llmkernels.__version__,
        "kernels": llmkernels.extension_status(),
        "git_sha": git_sha(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def results_dir(
    base: str | Path = "benchmarks/results", device: torch.device | str | None = None
) -> Path:
    """``<base>/<device>-<date>/``, created."""
    env = environment(device)
    slug = "".join(c if c.isalnum() else "-" for c in env["device"]).strip("-").lower() or "cpu"
    path = Path(base) / f"{slug}-{_dt.date.today().isoformat()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(
    name: str,
    rows: Sequence[dict],
    out_dir: str | Path,
    extra: dict | None = None,
    columns: Sequence[str] | None = None,
) -> tuple[Path, Path]:
    """Write ``<name>.json`` (environment + rows) and ``<name>.md`` (a table) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    payload = {"environment": env, **(extra or {}), "rows": list(rows)}
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2, default=str))
    header = (
        f"# {name}\n\n{env['device']} · torch {env['torch']} · CUDA {env['cuda']} · "
        f"commit {env['git_sha']} · {env['date']}\n\n"
    )
    extra_lines = "".join(f"- {k}: {v}\n" for k, v in (extra or {}).items())
    md_path = out_dir / f"{name}.md"
    md_path.write_text(
        header + extra_lines + ("\n" if extra_lines else "") + markdown_table(rows, columns)
    )
    return json_path, md_path
