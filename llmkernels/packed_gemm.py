"""MKL-packed copies of fp32 CPU weights for the GEMMs of a speculative verify forward.

A verify forward multiplies 8-12 rows (the pending token and up to 11 guesses) by every weight.
MKL's ``sgemm`` re-packs its ``B`` operand on each such call, so at these row counts it runs at
about half the rate of the one-row GEMV, while a weight packed once (``cblas_sgemm_pack``) is
read as it is. Measured on a 2-core AVX-512 host, SmolLM2-135M's 121 projections and LM head
(input-major, :func:`llmkernels.model.input_major_weights`), in ms:

- plain GEMM at 7 / 8 / 9 / 10 / 11 / 12 rows: 35.3 / 38.5 / 42.2 / 43.4 / 43.5 / 44.3; packed
  for 12 rows: 33.1;
- whole verify forward of 9 / 11 / 12 tokens: 61.0 / 61.4 / 63.8 -> 55.2 / 53.8 / 53.3, with
  bit-identical logits;
- from 7 rows down the plain GEMM is about as fast, so fewer rows are not sent here.

A pack is made for a row count ``m`` (``cblas_sgemm_pack``'s argument); ``_mkl_linear`` uses it
only for exactly that many rows (else it falls back to ``F.linear``), and MKL does not document
its use with another count. So a forward of ``MIN_ROWS..PACK_ROWS`` rows is zero-padded to
``PACK_ROWS``; each output row is its own dot products, so padding changes no value.

torch exposes the pack only through the private ``torch.ops.mkl`` ops that inductor uses when it
freezes weights. :func:`ops_available` checks their schemas, and the engine falls back to the
plain GEMM when they are missing or changed; ``tests/test_packed_gemm.py`` then fails loudly on
any torch built with MKL. The packs cost one more copy of the packed weights (+100% of them),
built on the first speculative ``generate`` on CPU in fp32 (SmolLM2: +555 MB, 0.7 s with the
speed check, which drops them where they time slower than the plain GEMM).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .cpu import first_is_faster

__all__ = ["PackedGemms", "ops_available", "PACK_ROWS", "MIN_ROWS"]

PACK_ROWS = 12  # rows each weight is packed for: verify forwards of up to 11 guesses
MIN_ROWS = 8  # fewer rows keep the plain GEMM (about as fast from 7 down, measured above)

_EXPECTED_SCHEMAS = {
    "_mkl_reorder_linear_weight": "mkl::_mkl_reorder_linear_weight(Tensor X, int batch_size) -> Tensor",
    "_mkl_linear": "mkl::_mkl_linear(Tensor X, Tensor MKL_W, Tensor ORI_W, Tensor? B, int batch_size) -> Tensor",
}


def ops_schemas() -> dict[str, str]:
    """The installed torch's schema of each ``torch.ops.mkl`` op used here ("missing" if absent)."""
    found = {}
    for name in _EXPECTED_SCHEMAS:
        try:
            found[name] = str(getattr(torch.ops.mkl, name).default._schema)
        except (AttributeError, RuntimeError):
            found[name] = "missing"
    return found


def ops_available() -> bool:
    """Whether this torch has MKL and its pack ops with the schemas this module was written for."""
    return bool(torch._C.has_mkl) and ops_schemas() == _EXPECTED_SCHEMAS


class PackedGemms:
    """``x @ W^T`` for ``MIN_ROWS..PACK_ROWS`` rows of x from an MKL-packed copy of each weight.

    weights: fp32 CPU ``[out, in]`` tensors (any strides); others are skipped. A weight is found
    again by identity, so pass the tensors the model multiplies by. With ``check_speed`` the
    packed GEMMs of all the weights are timed against ``F.linear``, and the packs are dropped
    where they are slower (:attr:`enabled` says which; see :func:`_packs_are_faster`).
    """

    def __init__(self, weights: Iterable[torch.Tensor], check_speed: bool = True):
        self._packs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (weight, pack)
        self.calls = 0  # GEMMs served from a pack (tests read it)
        candidates = [
            w
            for w in weights
            if isinstance(w, torch.Tensor)
            and w.device.type == "cpu"
            and w.dtype == torch.float32
            and w.dim() == 2
        ]
        if not candidates or not ops_available():
            return
        packs = {}
        for w in candidates:
            if id(w) not in packs:
                packs[id(w)] = (w, _pack(w))
        if check_speed and not _packs_are_faster(list(packs.values())):
            return
        self._packs = packs

    @property
    def enabled(self) -> bool:
        return bool(self._packs)

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """``x @ weight^T + bias`` (x ``[N, in]`` → ``[N, out]``) from weight's pack, or None when
        weight has none or N is outside ``MIN_ROWS..PACK_ROWS`` (the caller runs its own GEMM)."""
        rows = x.shape[0]
        entry = self._packs.get(id(weight))
        if entry is None or entry[0] is not weight or not MIN_ROWS <= rows <= PACK_ROWS:
            return None
        if x.dtype != torch.float32 or x.device.type != "cpu":
            return None
        padded = x.new_zeros(PACK_ROWS, x.shape[1])  # [PACK_ROWS, in]
        padded[:rows] = x
        self.calls += 1
        y = torch.ops.mkl._mkl_linear(padded, entry[1], weight, None, PACK_ROWS)[:rows]
        return y if bias is None else y.add_(bias)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``[out, in]`` packed by MKL for GEMMs of ``PACK_ROWS`` rows (an opaque tensor)."""
    return torch.ops.mkl._mkl_reorder_linear_weight(weight.contiguous(), PACK_ROWS)


def _packs_are_faster(packs: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Whether the packed GEMMs time faster than ``F.linear`` at ``PACK_ROWS`` rows here, summed
    over every ``(weight, pack)`` (the forward's own mix), by any margin: the check only keeps
    packs off a host where they are slower. Asking for 10% had been noise here: the packs' gain
    in a timing loop is about that (SmolLM2 in the engine's process, 12 rows: 41 vs 45.5 ms;
    best-of-3 ratios 0.85-0.97), while verify forwards of 9-11 tokens take 54 ms with the packs
    and 60-63 without. With the LM head alone against ``F.linear`` at ``MIN_ROWS`` rows and a
    10% margin, about one cold process in four had kept no packs."""
    x = {n: torch.ones(PACK_ROWS, n) for n in {w.shape[1] for w, _ in packs}}  # not randn: RNG

    def packed() -> None:
        for w, pack in packs:
            torch.ops.mkl._mkl_linear(x[w.shape[1]], pack, w, None, PACK_ROWS)

    def plain() -> None:
        for w, _ in packs:
            F.linear(x[w.shape[1]], w)

    return first_is_faster(packed, plain, margin=1.0)
