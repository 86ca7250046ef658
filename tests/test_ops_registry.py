"""The compiled extension registers every schema (identical to the Python copy) with a CUDA kernel.

These run wherever the extension is built, GPU or not (CI compiles it on a GPU-less machine)."""

import pytest
import torch

from llmkernels import ops
from llmkernels._schemas import SCHEMAS

requires_extension = pytest.mark.skipif(
    not ops._EXTENSION_LOADED, reason=f"CUDA extension not loaded: {ops.extension_status()}"
)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_is_registered(name):
    op = getattr(torch.ops.llmkernels, name).default
    assert str(op._schema) == str(torch._C.parse_schema("llmkernels::" + SCHEMAS[name]))


@requires_extension
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_extension_registers_cuda_kernel(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"llmkernels::{name}", "CUDA"), (
        f"no CUDA implementation registered for llmkernels::{name}"
    )


@requires_extension
def test_extension_defines_exactly_the_python_schemas():
    """csrc/ops.cpp and llmkernels/_schemas.py must declare the same ops."""
    registered = {
        str(s.name).split("::", 1)[1]
        for s in torch._C._jit_get_all_schemas()
        if str(s.name).startswith("llmkernels::")
    }
    assert registered == set(SCHEMAS)
