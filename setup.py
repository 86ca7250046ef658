"""Build script: compiles `llmkernels._C` when a CUDA torch and a CUDA toolkit are both present.

Knobs (environment variables, printed at build time):
  LLMKERNELS_SKIP_CUDA_BUILD=1   never compile; install pure Python (reference ops only)
  LLMKERNELS_FORCE_CUDA_BUILD=1  compile or fail loudly (no silent pure-Python fallback)
  TORCH_CUDA_ARCH_LIST           e.g. "9.0" or "8.0;9.0"; default when unset and no GPU visible:
                                 "8.0;9.0+PTX": sm_80 code (A100; also runs on sm_86/sm_89), sm_90
                                 code (H100/H200) and compute_90 PTX, which the driver compiles for
                                 newer GPUs (sm_100, sm_120). Never torch's detection, which crashes
                                 with no GPU.
  LLMKERNELS_RESOURCE_USAGE=1    ptxas prints registers, spills, stack and shared memory of every
                                 kernel (what benchmarks/resource_gate.py reads from the build log)
  MAX_JOBS                       parallel compile jobs (ninja)
  CUDA_HOME                      toolkit root; else derived from `nvcc` on PATH

Install with `pip install --no-build-isolation .` so the extension is built against the torch
already installed (an isolated build environment has no torch and installs pure Python).
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
DEFAULT_ARCHS = "8.0;9.0+PTX"
KNOBS = (
    "LLMKERNELS_SKIP_CUDA_BUILD",
    "LLMKERNELS_FORCE_CUDA_BUILD",
    "TORCH_CUDA_ARCH_LIST",
    "LLMKERNELS_RESOURCE_USAGE",
    "MAX_JOBS",
    "CUDA_HOME",
)


def log(msg: str) -> None:
    print(f"[llmkernels build] {msg}", file=sys.stderr, flush=True)


def flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and Path(home, "bin", "nvcc").exists():
        return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        return str(Path(nvcc).resolve().parent.parent)
    return None


def write_build_info(built: bool, archs: str, reason: str, package_dir: Path | None = None) -> None:
    text = (
        "# Written by setup.py at build time.\n"
        f"CUDA_BUILD = {built!r}\n"
        f"CUDA_ARCHS = {archs!r}\n"
        f"BUILD_REASON = {reason!r}\n"
    )
    (package_dir or ROOT / "llmkernels").joinpath("_build_info.py").write_text(text)


def cuda_extension_plan():
    """Return (ext_modules, cmdclass); decide and print which build happens."""
    log("knobs: " + ", ".join(f"{k}={os.environ.get(k, '<unset>')}" for k in KNOBS))
    force = flag("LLMKERNELS_FORCE_CUDA_BUILD")

    def pure_python(reason: str):
        if force:
            raise RuntimeError(
                f"LLMKERNELS_FORCE_CUDA_BUILD=1 but the CUDA build is impossible: {reason}"
            )
        log(f"installing pure Python (reference ops only): {reason}")
        write_build_info(False, "", reason)
        return [], {}

    if flag("LLMKERNELS_SKIP_CUDA_BUILD"):
        if force:
            raise RuntimeError(
                "LLMKERNELS_SKIP_CUDA_BUILD and LLMKERNELS_FORCE_CUDA_BUILD both set"
            )
        return pure_python("LLMKERNELS_SKIP_CUDA_BUILD=1")
    try:
        import torch
    except ImportError:
        return pure_python(
            "torch is not importable at build time (use pip install --no-build-isolation)"
        )
    if torch.version.cuda is None:
        return pure_python(f"torch {torch.__version__} is a CPU build")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return pure_python("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    os.environ["CUDA_HOME"] = cuda_home

    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not archs:
        if torch.cuda.is_available():
            cap = torch.cuda.get_device_capability()
            archs = f"{cap[0]}.{cap[1]}"
        else:
            archs = DEFAULT_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = ["csrc/ops.cpp"] + sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu")
    )
    ext = CUDAExtension(
        name="llmkernels._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": [
                "-O3",
                "-lineinfo",
                "--expt-relaxed-constexpr",
                "-U__CUDA_NO_HALF_OPERATORS__",
                "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                "-U__CUDA_NO_HALF2_OPERATORS__",
            ]
            + (["--resource-usage"] if flag("LLMKERNELS_RESOURCE_USAGE") else []),
        },
    )
    log(
        f"building CUDA extension llmkernels._C with nvcc from {cuda_home} for archs {archs} "
        f"(torch {torch.__version__}, CUDA {torch.version.cuda}, {len(sources)} sources, "
        f"MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')})"
    )

    class BuildAndRecord(BuildExtension):
        def run(self):
            super().run()
            # Only once the compile succeeded. build_py has already copied the package into
            # build_lib (wheel builds), so record it there too, not only in the source tree.
            write_build_info(True, archs, "built")
            if not self.inplace:
                target = Path(self.build_lib) / "llmkernels"
                if target.is_dir():
                    write_build_info(True, archs, "built", target)

    write_build_info(False, archs, "the CUDA build did not finish")
    return [ext], {
        "build_ext": BuildAndRecord.with_options(use_ninja=shutil.which("ninja") is not None)
    }


ext_modules, cmdclass = cuda_extension_plan()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
