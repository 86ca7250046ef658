"""Weight-only quantization for decode: int8 per output channel, int4 in groups along the input.

Batch-1 decode reads every weight once per token, so bytes per weight bound its speed. A
:class:`QuantizedWeight` stands in for a ``[out, in]`` weight in ``model.linear``; its matmul is
``x @ dequantize()^T``, computed by PyTorch's packed weight-only kernels, with bf16 activations:

- int8: ``W[o, i] = q[o, i] * scale[o]`` (q in [-127, 127]); ``aten._weight_int8pack_mm`` on
  CPU; on CUDA our ``int8_linear`` kernel at decode sizes (ATen's CUDA int8 kernel decoded 12x
  slower than bf16 on an H200) and a dense bf16 GEMM on the codes for prefill.
- int4: groups of ``group_size`` inputs, ``W[o, i] = (q[o, i] - 8) * scale[o, g] + zero[o, g]``
  (q in [0, 15], g = i // group_size, asymmetric: min/max of the group);
  ``aten._weight_int4pack_mm_for_cpu`` on CPU; on CUDA our ``int4_linear`` kernel at decode sizes
  (tinygemm, ATen's ``aten._weight_int4pack_mm``, decoded at 39% of copy bandwidth on an H200,
  slower than int8) and tinygemm for prefill.

Those ``aten._weight_*`` ops are PyTorch internals (torchao and gpt-fast use them): their
schemas are checked here on first use (:func:`check_packed_ops`), and tests/test_quant.py checks
their results against :meth:`QuantizedWeight.dequantize`, so a change fails loudly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import ops

__all__ = [
    "QuantizedWeight",
    "quantize_weight",
    "quantize_model_weights",
    "check_packed_ops",
    "int4_weight",
    "gguf_int4_groups",
    "GGUF_INT4_BLOCKS",
    "MODES",
    "GGUF_MODE",
    "INT4_GROUP_SIZES",
    "PROJECTIONS",
]

MODES = ("int8", "int4")
# the engine's quantize="gguf": a GGUF's projections at their stored precision, made while
# loading (llmkernels.loading.projection_quantizer), before quantize_model_weights
GGUF_MODE = "gguf"
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the packed int4 kernels accept
_CUDA_INNER_K_TILES = 8  # tinygemm's packing: in_features must be a multiple of 8 * 16

_EXPECTED_SCHEMAS = {
    "_weight_int8pack_mm": "aten::_weight_int8pack_mm(Tensor self, Tensor mat2, Tensor scales) -> Tensor",
    "_weight_int4pack_mm_for_cpu": (
        "aten::_weight_int4pack_mm_for_cpu(Tensor self, Tensor mat2, int qGroupSize, "
        "Tensor qScaleAndZeros) -> Tensor"
    ),
    "_convert_weight_to_int4pack_for_cpu": (
        "aten::_convert_weight_to_int4pack_for_cpu(Tensor self, int innerKTiles) -> Tensor"
    ),
    "_weight_int4pack_mm": (
        "aten::_weight_int4pack_mm(Tensor self, Tensor mat2, int qGroupSize, "
        "Tensor qScaleAndZeros) -> Tensor"
    ),
    "_convert_weight_to_int4pack": (
        "aten::_convert_weight_to_int4pack(Tensor self, int innerKTiles) -> Tensor"
    ),
}
_CHECKED = False


def check_packed_ops() -> None:
    """Raise ``RuntimeError`` naming the op if an ``aten._weight_*`` op this module relies on is
    missing or has another schema in the installed torch."""
    global _CHECKED
    if _CHECKED:
        return
    for name, expected in _EXPECTED_SCHEMAS.items():
        op = getattr(torch.ops.aten, name, None)
        found = str(op.default._schema) if op is not None else "missing"
        if found != expected:
            raise RuntimeError(
                f"llmkernels quantization relies on torch's aten.{name} ({expected}); torch "
                f"{torch.__version__} has {found}"
            )
    _CHECKED = True


@dataclass
class QuantizedWeight:
    """A weight-only quantized ``[out, in]`` matrix standing in for a weight in ``x @ W^T``."""

    mode: str  # "int8" or "int4"
    shape: tuple[int, int]  # (out_features, in_features)
    group_size: int  # int4: inputs per scale; int8: in_features (one scale per output)
    qweight: torch.Tensor  # int8 [out, in]; int4: uint8 [out, in / 2], two codes per byte
    scales: torch.Tensor  # int8: [out]; int4: [out, in / group_size] (fp32)
    zeros: torch.Tensor | None = None  # int4: [out, in / group_size] (fp32)
    packed: torch.Tensor | None = None  # the packed kernel's layout (see packed_now)
    scale_and_zero: torch.Tensor | None = None  # int4: bf16 [in / G, out, 2], ATen's layout
    scale_zero_rows: torch.Tensor | None = None  # int4, CUDA: bf16 [out, in / G, 2], ours
    kernel_scales: torch.Tensor | None = None  # int8: bf16 [out]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        """Bytes read per matmul (codes plus scales and zeros)."""
        tensors = [self.qweight, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def codes(self) -> torch.Tensor:
        """The integer codes, int32 ``[out, in]`` (int8: [-127, 127], int4: [0, 15])."""
        if self.mode == "int8":
            return self.qweight.to(torch.int32)
        high, low = (self.qweight >> 4).to(torch.int32), (self.qweight & 15).to(torch.int32)
        return torch.stack((high, low), dim=-1).view(self.shape)  # even input first

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The reference: the ``[out, in]`` matrix the codes stand for, in fp32 (then dtype)."""
        q = self.codes().float()
        if self.mode == "int8":
            return (q * self.scales[:, None]).to(dtype)
        out_features, in_features = self.shape
        groups = q.view(out_features, in_features // self.group_size, self.group_size)
        w = (groups - 8) * self.scales[..., None] + self.zeros[..., None]
        return w.view(self.shape).to(dtype)

    def _pack(self) -> None:
        check_packed_ops()
        if self.mode == "int8":
            self.packed = self.qweight
            self.kernel_scales = self.scales.to(torch.bfloat16)
            return
        # bf16 scales and zeros: [out, in / G, 2] for int4_linear (CUDA only: not kept on CPU,
        # 1/8 byte per weight), [in / G, out, 2] for ATen's
        rows = torch.stack((self.scales, self.zeros), dim=-1).to(torch.bfloat16)
        self.scale_and_zero = rows.transpose(0, 1).contiguous()
        if self.device.type == "cuda":
            self.scale_zero_rows = rows
            self.packed = torch.ops.aten._convert_weight_to_int4pack(
                self.qweight, _CUDA_INNER_K_TILES
            )
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes(), 1)

    def packed_now(self) -> QuantizedWeight:
        """Build the kernel layout now (not at the first matmul, which may be inside a CUDA-graph
        capture); returns self."""
        if self.packed is None:
            self._pack()
        return self

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T`` for x ``[N, in]`` (any float dtype; computed with bf16 activations),
        returned in x's dtype, ``[N, out]``."""
        self.packed_now()
        xb = x.to(torch.bfloat16)
        if self.mode == "int8" and self.device.type == "cuda":
            if ops.int8_linear_supported(xb, self.qweight):  # decode: our GEMV kernel
                y = ops.int8_linear(xb, self.qweight, self.scales)
            else:  # prefill: one dense GEMM on the codes as bf16 (exact), scaled after
                y = (F.linear(xb, self.qweight.to(torch.bfloat16)).float() * self.scales).to(
                    xb.dtype
                )
        elif self.mode == "int8":
            y = torch.ops.aten._weight_int8pack_mm(xb, self.packed, self.kernel_scales)
        elif self.device.type == "cuda":
            if ops.int4_linear_supported(xb, self.qweight, self.scale_zero_rows):  # decode
                y = ops.int4_linear(xb, self.qweight, self.scale_zero_rows)
            else:  # prefill: tinygemm
                y = torch.ops.aten._weight_int4pack_mm(
                    xb, self.packed, self.group_size, self.scale_and_zero
                )
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                xb, self.packed, self.group_size, self.scale_and_zero
            )
        return y.to(x.dtype)


def quantize_weight(weight: torch.Tensor, mode: str, group_size: int = 32) -> QuantizedWeight:
    """Quantize a float ``[out, in]`` weight (rounded to nearest, computed in fp32).

    int8: symmetric per output channel, ``scale = max|w| / 127``. int4: asymmetric per group of
    ``group_size`` inputs (32, 64, 128 or 256; ``in`` a multiple of it, and of 128 on CUDA;
    ``out`` a multiple of 16, as the packed kernels need),
    ``scale = (max - min) / 15``, ``zero = min + 8 * scale``.
    """
    if mode not in MODES:
        raise ValueError(f"quantize must be one of {MODES}, got {mode!r}")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"weight must be a 2-D float [out, in] tensor, got {weight.dtype} {tuple(weight.shape)}"
        )
    out_features, in_features = weight.shape
    w = weight.detach().float()
    if mode == "int8":
        scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        q = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        return QuantizedWeight(
            "int8", (out_features, in_features), in_features, q, scales
        ).packed_now()
    _check_int4_shape(out_features, in_features, group_size, weight.is_cuda)
    groups = w.view(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [out, in / G]
    scales = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    codes = ((groups - low[..., None]) / scales[..., None]).round().clamp(0, 15)
    return int4_weight(
        codes.to(torch.uint8).view(out_features, in_features), scales, low + 8 * scales
    )


def _check_int4_shape(out_features: int, in_features: int, group_size: int, cuda: bool) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES} for int4, got {group_size}")
    if in_features % group_size:
        raise ValueError(
            f"int4 needs in_features ({in_features}) to be a multiple of group_size ({group_size})"
        )
    if out_features % 16:
        raise ValueError(f"int4 needs out_features ({out_features}) to be a multiple of 16")
    if cuda and in_features % (16 * _CUDA_INNER_K_TILES):
        raise ValueError(f"int4 on CUDA needs in_features ({in_features}) to be a multiple of 128")


def int4_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> QuantizedWeight:
    """An int4 :class:`QuantizedWeight` from its codes ``[out, in]`` (integers in [0, 15]) and fp32
    ``scales``, ``zeros`` ``[out, in / G]`` (G = in / scales' columns): ``W = (q - 8) * scale +
    zero``, packed for the kernels on the codes' device."""
    out_features, in_features = codes.shape
    group_size = in_features // scales.shape[1]
    _check_int4_shape(out_features, in_features, group_size, codes.is_cuda)
    if scales.shape != zeros.shape or scales.shape[0] != out_features:
        raise ValueError(
            f"scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must both be "
            f"[{out_features}, in / group_size]"
        )
    codes = codes.to(torch.uint8)
    qweight = (codes[:, 0::2] << 4) | codes[:, 1::2]  # [out, in / 2], even input in the high half
    return QuantizedWeight(
        "int4",
        (out_features, in_features),
        group_size,
        qweight.contiguous(),
        scales.float(),
        zeros.float(),
    ).packed_now()


# Each layer's projection weights, by the engine's (fused) names: what gets quantized.
PROJECTIONS = ("wqkv", "wo", "w_gate_up", "w_down")

# GGUF block formats that are int4 groups of 32 as they stand: bytes per block of 32 weights.
GGUF_INT4_BLOCKS = {"Q4_0": 18, "Q4_1": 20, "Q4_K": 144}  # bytes per block
_Q4_K_SUBBLOCKS = 8  # 32 inputs each, in a super-block of 256


def gguf_int4_groups(
    blocks: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 ``[out, in]``, scales, zeros fp32 ``[out, in / 32]``) of a GGUF tensor stored
    as ``Q4_0`` / ``Q4_1`` / ``Q4_K`` blocks, ``blocks`` uint8 ``[out, bytes per row]``, with no
    requantization (``W = (q - 8) scale + zero``):

    - Q4_1 block: fp16 ``d``, fp16 ``m``, 16 bytes of codes; ``w = d q + m``. Here ``scale = d``,
      ``zero = m + 8 d`` (exact in fp32: both are fp16 values, checked).
    - Q4_0 block: fp16 ``d``, 16 bytes; ``w = d (q - 8)``: ``scale = d``, ``zero = 0``.
    - Q4_K super-block of 256 inputs: fp16 ``d``, fp16 ``dmin``, 12 bytes holding eight 6-bit
      scales ``sc`` and mins ``mn``, 128 bytes of codes; sub-block j (32 inputs) has
      ``w = (d sc_j) q - dmin mn_j``: ``scale = d sc_j`` (exact), ``zero = 8 scale - dmin mn_j``
      (one fp32 rounding, so W is within that rounding, plus an ulp of W, of llama.cpp's fp32
      dequantization).

    Q4_0 / Q4_1: within a block the low nibbles of the 16 bytes are inputs 0-15, the high nibbles
    16-31. Q4_K: 32 bytes serve two sub-blocks, low nibbles the first, high nibbles the second.
    """
    if kind not in GGUF_INT4_BLOCKS:
        raise ValueError(f"not an int4 GGUF block format: {kind} (have {sorted(GGUF_INT4_BLOCKS)})")
    size = GGUF_INT4_BLOCKS[kind]
    out_features, row_bytes = blocks.shape
    if row_bytes % size:
        raise ValueError(f"{kind} rows must be whole {size}-byte blocks, got {row_bytes} bytes")
    b = blocks.contiguous().view(out_features, row_bytes // size, size)
    d = b[..., 0:2].contiguous().view(torch.float16)[..., 0].float()  # [out, blocks]
    if kind == "Q4_K":
        return _q4_k_groups(b, d)
    qs = b[..., size - 16 :]
    codes = torch.cat((qs & 15, qs >> 4), dim=-1).reshape(out_features, -1)  # [out, in]
    if kind == "Q4_0":
        return codes, d, torch.zeros_like(d)
    m = b[..., 2:4].contiguous().view(torch.float16)[..., 0].float()
    zeros = m + 8 * d
    if not torch.equal(zeros.double() - 8 * d.double(), m.double()):
        raise ValueError("Q4_1 offsets not exact as m + 8 d in fp32")
    return codes, d, zeros


def _q4_k_groups(b: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:func:`gguf_int4_groups` of Q4_K super-blocks ``b`` uint8 ``[out, blocks, 144]`` whose
    ``d`` is ``[out, blocks]`` fp32."""
    out_features, n_blocks = d.shape
    dmin = b[..., 2:4].contiguous().view(torch.float16)[..., 0].float()
    packed = b[..., 4:16].long()  # bytes 0-3: sc 0-3 (+ high bits of sc 4-7), 4-7: mn 0-3 (...)
    low, mid, high = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = torch.cat((low & 63, (high & 15) | ((low >> 6) << 4)), dim=-1)  # [out, blocks, 8]
    mn = torch.cat((mid & 63, (high >> 4) | ((mid >> 6) << 4)), dim=-1)
    qs = b[..., 16:].reshape(out_features, n_blocks, _Q4_K_SUBBLOCKS // 2, 32)
    codes = torch.stack((qs & 15, qs >> 4), dim=3).reshape(out_features, -1)  # [out, in]
    scales = (d[..., None] * sc.float()).reshape(out_features, -1)  # [out, in / 32]
    offsets = (dmin[..., None] * mn.float()).reshape(out_features, -1)
    return codes, scales, 8 * scales - offsets


def quantize_model_weights(
    weights: dict,
    num_layers: int,
    tie_word_embeddings: bool,
    mode: str,
    group_size: int = 32,
    lm_head: bool = False,
) -> dict:
    """The engine's fused weights with every layer's projections quantized (``wqkv``, ``wo``,
    ``w_gate_up``, ``w_down``). Norms, biases and the embedding are kept as they are. Mode
    ``"gguf"`` (:data:`GGUF_MODE`) leaves the projections as they come (already quantized at a
    GGUF's own precision, or floats) and handles only ``lm_head``.

    The LM head stays in the model's dtype unless ``lm_head``: the packed kernels return bf16,
    and bf16 logits (a resolution of 0.125 at 24) tie candidates that fp32 logits tell apart,
    which flips greedy picks. With ``lm_head`` it is int8 per output channel whatever ``mode``
    (a tied model gets a quantized copy of its embedding): at batch 1 the head is the largest
    matrix a step reads (SmolLM2-135M: 113 MB in fp32, 28 MB in int8; 4.2 vs 2.1 ms of its
    step). An int4 head (groups of 32) was 0.7 ms faster still but raised the default model's
    perplexity from 53.8 to 57.4, against 53.8 with int8 (README). llama.cpp quantizes its head
    too (Q8_0 in the embedded GGUF)."""
    check_packed_ops()
    out = dict(weights)
    for name in [f"layers.{i}.{n}" for i in range(num_layers) for n in PROJECTIONS]:
        w = weights[name]
        if isinstance(w, QuantizedWeight):  # already quantized (e.g. mapped from a GGUF's blocks)
            if mode != GGUF_MODE and (w.mode, w.group_size) != (
                mode,
                group_size if mode == "int4" else w.group_size,
            ):
                raise ValueError(f"{name} is already {w.mode} (group {w.group_size}), not {mode}")
            continue
        if mode != GGUF_MODE:  # "gguf": the file stores it as floats, kept as they are
            out[name] = quantize_weight(w, mode, group_size)
    if lm_head:
        head = weights["embed"] if tie_word_embeddings else weights["lm_head"]
        out["lm_head"] = quantize_weight(head, "int8")
    return out
