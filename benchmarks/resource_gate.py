"""Resource gate: registers, spills, stack and shared memory of every CUDA kernel, from ptxas.

Reads the ``ptxas info`` lines of a build made with ``LLMKERNELS_RESOURCE_USAGE=1`` (nvcc's
``--resource-usage``; ``.ci/run`` keeps them in ``build/ptxas.log``), checks every kernel
instantiation for every required architecture, and writes the table
``benchmarks/results/ptxas.md`` (committed, so a change in register pressure shows in a diff).

Fails (exit 1) on: a spill store or load, a stack frame, registers above what the kernel's launch
bounds allow, shared memory (static + the largest dynamic amount the host code may request) above
the architecture's limit, a kernel missing from ``KERNELS`` below, or a required architecture
missing. No GPU needed.

    python benchmarks/resource_gate.py build/ptxas.log --arch 80 90
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REGISTER_FILE = 65536  # 32-bit registers per SM (sm_80, sm_90)
MAX_REGISTERS = 255  # per thread
DEFAULT_SMEM = 48 * 1024  # per block without the dynamic shared memory opt-in
OPTIN_SMEM = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # per block, opted in


@dataclass(frozen=True)
class Kernel:
    """What the host code launches a kernel with (csrc/*.cu): launch bounds and shared memory."""

    threads: int | None  # __launch_bounds__ max threads (None: no bounds)
    min_blocks: int = 1  # __launch_bounds__ min blocks per SM
    dynamic_smem: int = 0  # the largest dynamic shared memory the host requests, bytes
    optin_variant: str | None = None  # instantiations (name contains it) given the full opt-in


KERNELS = {
    "rms_norm_kernel": Kernel(threads=1024),
    "fused_add_rms_norm_kernel": Kernel(threads=1024),
    "rotary_kernel": Kernel(threads=None),
    "qk_norm_rotary_kernel": Kernel(threads=128),  # kQkWarps = 4 heads per block
    "gated_activation_kernel": Kernel(threads=None),  # silu_and_mul, gelu_tanh_and_mul
    "decode_attention_kernel": Kernel(threads=128, min_blocks=3),
    "decode_attention_simt_kernel": Kernel(threads=128, min_blocks=3),
    # the split weights: [num_splits] floats, num_splits <= kMaxSplits = 4096
    "decode_attention_merge_kernel": Kernel(threads=256, dynamic_smem=4096 * 4),
    "kv_cache_append_kernel": Kernel(threads=None),
    # <T, true> (slice cached in shared memory): opted in, the slice sized to (limit - static);
    # <T, false> (slice re-read from L2): static shared memory only, no opt-in
    "sample_kernel": Kernel(threads=512, optin_variant=", true>"),
    "advance_rng_kernel": Kernel(threads=None),
    "int8_linear_kernel": Kernel(threads=256),  # kWarps = 8 warps per block
    "int4_linear_kernel": Kernel(threads=256),
}


@dataclass
class Entry:
    name: str  # demangled, shortened
    base: str  # kernel name without template arguments
    arch: int
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    smem: int = 0  # static shared memory, bytes


def demangle(names: list[str]) -> dict[str, str]:
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(
        ["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True
    ).stdout.splitlines()
    return dict(zip(names, out))


def shorten(demangled: str) -> str:
    """``void llmkernels::(anonymous namespace)::k<__half, 8>(__half*, ...)`` -> ``k<fp16, 8>``."""
    name = demangled.replace("(anonymous namespace)::", "")
    name = re.sub(r"^void ", "", name)
    name = name.split("(")[0]  # the parameter list
    name = re.sub(r"^llmkernels::", "", name)
    for long, short in (("__nv_bfloat16", "bf16"), ("__half", "fp16"), ("float", "fp32")):
        name = re.sub(rf"\b{long}\b", short, name)
    return name.replace("(bool)1", "true").replace("(bool)0", "false")


def parse(log: str) -> list[Entry]:
    entries: dict[tuple[str, int], Entry] = {}
    current: Entry | None = None
    compiling = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)a?'")
    for line in log.splitlines():
        if m := compiling.search(line):
            mangled, arch = m.group(1), int(m.group(2))
            current = entries.setdefault((mangled, arch), Entry(mangled, "", arch))
        elif current is None:
            continue
        elif m := re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        ):
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        elif m := re.search(r"Used (\d+) registers", line):
            current.registers = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current.smem = int(smem.group(1)) if smem else 0
    names = demangle(sorted({e.name for e in entries.values()}))
    for e in entries.values():
        e.name = shorten(names[e.name])
        e.base = e.name.split("<")[0]
    return sorted(entries.values(), key=lambda e: (e.base, e.name, e.arch))


def register_cap(kernel: Kernel) -> int:
    if kernel.threads is None:
        return MAX_REGISTERS
    per_thread = REGISTER_FILE // (kernel.threads * kernel.min_blocks)
    return min(MAX_REGISTERS, per_thread // 8 * 8)  # allocated in units of 8 per thread


def check(entries: list[Entry], archs: list[int]) -> tuple[list[str], list[list[str]]]:
    problems, rows = [], []
    for arch in archs:
        if not any(e.arch == arch for e in entries):
            problems.append(f"no kernel compiled for sm_{arch} (build with TORCH_CUDA_ARCH_LIST)")
    for e in entries:
        kernel = KERNELS.get(e.base)
        if kernel is None:
            problems.append(
                f"{e.name}: not in benchmarks/resource_gate.py KERNELS (add its limits)"
            )
            continue
        cap = register_cap(kernel)
        optin = kernel.optin_variant is not None and kernel.optin_variant in e.name
        limit = OPTIN_SMEM.get(e.arch, DEFAULT_SMEM) if optin else DEFAULT_SMEM
        worst = e.smem + kernel.dynamic_smem
        where = f"{e.name} sm_{e.arch}"
        if e.spill_stores or e.spill_loads:
            problems.append(f"{where}: spills ({e.spill_stores} B stores, {e.spill_loads} B loads)")
        if e.stack:
            problems.append(f"{where}: {e.stack} B stack frame")
        if e.registers > cap:
            problems.append(f"{where}: {e.registers} registers > {cap} (launch bounds)")
        if worst > limit:
            problems.append(f"{where}: {worst} B shared memory > {limit} B")
        rows.append(
            [
                e.name,
                f"sm_{e.arch}",
                f"{e.registers} / {cap}",
                f"{e.spill_stores + e.spill_loads}",
                f"{e.stack}",
                f"{e.smem}",
                f"{worst} / {limit}",
            ]
        )
    return problems, rows


def table(rows: list[list[str]], source: str) -> str:
    header = [
        "kernel",
        "arch",
        "registers / cap",
        "spill bytes",
        "stack bytes",
        "static smem",
        "worst smem / limit",
    ]
    lines = [
        "# ptxas resource usage",
        "",
        f"Generated by `python benchmarks/resource_gate.py` from {source} (nvcc --resource-usage).",
        "The cap is what the kernel's launch bounds allow; the worst shared memory adds the largest",
        "dynamic amount the host code requests (the cached sampling kernel's slice is sized at run",
        "time to fit its opted-in limit, so its static part is what must leave room).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log", type=Path, help="build output holding nvcc --resource-usage lines")
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="required sm archs")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ptxas.md")
    args = ap.parse_args(argv)
    entries = parse(args.log.read_text(errors="replace"))
    if not entries:
        print(f"resource gate: no ptxas lines in {args.log}", file=sys.stderr)
        return 1
    problems, rows = check(entries, args.arch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table(rows, "the CI build"))
    kernels = len({e.name for e in entries})
    print(f"resource gate: {kernels} kernels x {len(args.arch)} archs -> {args.out}")
    for p in problems:
        print(f"  FAIL {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
