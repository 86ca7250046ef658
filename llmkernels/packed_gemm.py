"""oneDNN-packed weights for the CPU engine's GEMMs (fp32 and bf16).

At a few rows, MKL's ``sgemm`` (what ``F.linear`` runs on CPU) reads its weight far below the
rate of its one-row GEMV: it re-packs the weight on every call. A weight packed once into
oneDNN's blocked layout is read as it is, at any row count. On a 2-core AMD EPYC host (AVX-512),
SmolLM2-135M's 120 projections and LM head in fp32, ms per sweep (``benchmarks/bench_cpu_gemv.py``,
``benchmarks/results/cpu-2026-12-01/smollm2-gemv-onednn/``; input-major is what the engine ran
before, and runs where packs time slower):

============  ====  ====  ====
rows             1     4     8
============  ====  ====  ====
input-major   33.3  72.3  66.3
packed        26.4  23.3  27.7
============  ====  ====  ====

Greedy decoding there, tokens/s: batch 1 24.7 -> 25.7, batch 4 44.8 -> 101.7 (HF 42-47),
batch 8 90.1 -> 162.0.

torch exposes this only through the private ops inductor uses when it freezes CPU weights:
``mkldnn::_reorder_linear_weight`` packs a ``[out, in]`` weight (an opaque tensor without
storage) and ``mkldnn::_linear_pointwise`` multiplies by it, bias fused. :func:`ops_available`
checks their schemas, so a torch that changed them gets the plain GEMMs, and
``tests/test_packed_gemm.py`` fails loudly on any torch built with oneDNN.

Row ``i`` of a packed GEMM of ``N`` rows is bit-identical to the one-row GEMM of that row
(tested), so a speculative verify forward computes each token's projections exactly as decode
steps do. The packs replace the weights they are made from
(:func:`llmkernels.model.packed_weights`); :func:`use_packs` decides once per process and shape
set, by timing (see there).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from .cpu import first_is_faster

__all__ = ["PackedWeight", "ops_available", "packable", "use_packs", "ENV_VAR"]

# "1": pack wherever the ops exist; "0": never; unset or "auto": pack where it times faster
ENV_VAR = "LLMKERNELS_CPU_PACKED_GEMM"
TIMED_ROWS = (1, 8)  # a decode step at batch 1, and batched decode / speculative verify

_EXPECTED_SCHEMAS = {
    "_reorder_linear_weight": "mkldnn::_reorder_linear_weight(Tensor self, int? batch_size=None) -> Tensor Y",
    "_linear_pointwise": "mkldnn::_linear_pointwise(Tensor X, Tensor W, Tensor? B, str attr, Scalar?[] scalars, str? algorithm) -> Tensor Y",
}
_DTYPES = (torch.float32, torch.bfloat16)
# (shapes, dtype, threads) -> whether the packed GEMMs timed faster at every TIMED_ROWS
_FASTER: dict[tuple, bool] = {}


def ops_schemas() -> dict[str, str]:
    """The installed torch's schema of each ``torch.ops.mkldnn`` op used here ("missing" if
    absent)."""
    found = {}
    for name in _EXPECTED_SCHEMAS:
        try:
            found[name] = str(getattr(torch.ops.mkldnn, name).default._schema)
        except (AttributeError, RuntimeError):
            found[name] = "missing"
    return found


def ops_available() -> bool:
    """Whether this torch has oneDNN and its packing ops with the schemas this module expects."""
    return torch.backends.mkldnn.is_available() and ops_schemas() == _EXPECTED_SCHEMAS


class PackedWeight:
    """A ``[out, in]`` CPU weight in oneDNN's packed layout, standing in for it in ``x @ W^T``
    (:func:`llmkernels.model.linear`). Holds only the pack, not the weight it was made from."""

    def __init__(self, weight: torch.Tensor):
        if not packable(weight):
            raise ValueError(
                f"weight must be a 2-D fp32 or bf16 CPU tensor, got {weight.dtype} "
                f"{tuple(weight.shape)} on {weight.device}"
            )
        self.shape = tuple(weight.shape)  # (out_features, in_features)
        self.dtype, self.device = weight.dtype, weight.device
        self.pack = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())  # opaque

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W^T + bias``: x ``[N, in]`` in the weight's dtype (any strides), bias ``[out]``
        or None → ``[N, out]`` contiguous."""
        return torch.ops.mkldnn._linear_pointwise(x, self.pack, bias, "none", [], "")


def packable(weight) -> bool:
    """Whether ``weight`` is a tensor :class:`PackedWeight` takes: 2-D, fp32 or bf16, on CPU."""
    return (
        isinstance(weight, torch.Tensor)
        and weight.device.type == "cpu"
        and weight.dtype in _DTYPES
        and weight.dim() == 2
    )


def use_packs(shapes: list[tuple[int, int]], dtype: torch.dtype) -> bool:
    """Whether the engine should pack its CPU GEMM weights, timed on these ``[out, in]`` shapes
    (the first layer's projections, or the LM head's) in this dtype: never without the ops or
    for other dtypes; otherwise as ``LLMKERNELS_CPU_PACKED_GEMM`` says ("1" / "0"), or, unset,
    when the packed GEMMs of those shapes time faster than the plain ones at each of
    ``TIMED_ROWS`` rows here (once per process; :func:`_packs_are_faster`)."""
    if dtype not in _DTYPES or not ops_available():
        return False
    setting = os.environ.get(ENV_VAR, "auto").strip().lower()
    if setting in ("0", "1"):
        return setting == "1"
    if setting != "auto":
        raise ValueError(f"{ENV_VAR} must be 0, 1 or auto, got {setting!r}")
    key = (tuple(shapes), dtype, torch.get_num_threads())
    if key not in _FASTER:
        _FASTER[key] = _packs_are_faster(shapes, dtype)
    return _FASTER[key]


def _packs_are_faster(shapes: list[tuple[int, int]], dtype: torch.dtype) -> bool:
    """Time one call of each shape's GEMM, packed against what the engine runs otherwise
    (``F.linear`` on the fp32 input-major layout, or the row-major bf16 one), on stand-in weights
    (constant values: no RNG, and a GEMM's speed does not depend on them). Packs are kept only
    if faster at every row count of ``TIMED_ROWS``, by any margin (the default stays what the
    engine ran before them where the host says otherwise)."""
    plain_weights = []
    packed_weights = []
    for out_features, in_features in shapes:
        weight = torch.full((out_features, in_features), 0.01, dtype=dtype)
        packed_weights.append(PackedWeight(weight))
        if dtype == torch.float32:
            weight = weight.t().contiguous().t()
        plain_weights.append(weight)

    def packed(inputs: dict[int, torch.Tensor]) -> None:
        for w in packed_weights:
            w.linear(inputs[w.shape[1]])

    def plain(inputs: dict[int, torch.Tensor]) -> None:
        for w in plain_weights:
            F.linear(inputs[w.shape[1]], w)

    for rows in TIMED_ROWS:
        inputs = {n: torch.full((rows, n), 0.5, dtype=dtype) for _, n in shapes}
        if not first_is_faster(
            functools.partial(packed, inputs), functools.partial(plain, inputs), margin=1.0
        ):
            return False
    return True
