"""The test harness itself: conftest's guard against a broken CUDA context (it acts only on a GPU
machine, so it is checked here with a stand-in for a CUDA error)."""

import os
import subprocess
import sys
from pathlib import Path


def test_a_broken_cuda_context_stops_the_run_naming_the_test(tmp_path):
    (tmp_path / "conftest.py").write_text((Path(__file__).parent / "conftest.py").read_text())
    (tmp_path / "test_fake_gpu.py").write_text(
        "import pytest, torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "def _broken():\n"
        "    raise RuntimeError('CUDA error: misaligned address')\n"
        "torch.cuda.synchronize = _broken\n"
        "def test_cpu_first():\n"
        "    pass\n"
        "@pytest.mark.cuda\n"
        "def test_breaks_the_context():\n"
        "    pass\n"
        "def test_never_reached():\n"
        "    pass\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "."],
        cwd=tmp_path,
        # not an xdist worker itself, whatever runs this test: no os._exit path
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 3, out
    assert "CUDA context unusable after test_fake_gpu.py::test_breaks_the_context" in out
    assert "2 passed" in out  # the CPU test and the cuda test ran; the third never did
