"""The one dispatch point: public ops, input validation, and routing.

Each public op validates its arguments (raising ``TypeError``/``ValueError`` that name the
argument and the expectation), allocates its output when ``out`` is None, then runs the CUDA
kernel (``torch.ops.llmkernels.*``) when the extension is built and the tensors are on a CUDA
device; else PyTorch: :mod:`llmkernels.cpu` for CPU tensors (the reference's values with fewer
ops, tested equal to it), the pure-PyTorch reference otherwise (CUDA tensors without the
extension, and under ``torch.compile``). Nothing else in the package asks which path to take.

This module also registers, for every ``llmkernels::*`` schema, a CPU implementation (the
reference) and a fake (meta) implementation, so the ops work on CPU tensors, under
``torch.compile`` and under ``torch.library.opcheck``.
"""

from __future__ import annotations

import math
import warnings
from functools import cache

import torch

from . import cpu
from . import reference as ref
from ._schemas import SCHEMAS

__all__ = [
    "cuda_kernels_available",
    "extension_status",
    "has_cuda_kernel",
    "uses_kernel",
    "rms_norm",
    "fused_add_rms_norm",
    "rope_cos_sin_cache",
    "rotary_embedding",
    "qk_norm_rotary",
    "qk_norm_rotary_supported",
    "silu_and_mul",
    "gelu_tanh_and_mul",
    "int8_linear",
    "int8_linear_supported",
    "int4_linear",
    "int4_linear_supported",
    "kv_cache_append",
    "decode_attention",
    "decode_attention_workspace",
    "decode_attention_supported",
    "sample",
    "sample_from_probs",
    "new_rng_state",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DECODE_HEAD_DIMS = (64, 128, 256)  # head sizes the decode-attention kernels are compiled for


# ---- the extension ----------------------------------------------------------------------------------
def _load_extension() -> tuple[bool, str]:
    import importlib.util

    try:
        from . import _build_info
    except ImportError:  # running from a source tree that was never built
        _build_info = None
    if importlib.util.find_spec(f"{__package__}._C") is None:  # no compiled library present
        reason = (
            _build_info.BUILD_REASON
            if _build_info is not None
            else "install the package to build it"
        )
        return False, f"not built: {reason}"
    archs = _build_info.CUDA_ARCHS if _build_info is not None else "unknown"
    try:
        from . import _C  # noqa: F401  (registers the schemas and CUDA kernels)
    except ImportError as exc:
        warnings.warn(
            f"llmkernels: the CUDA extension failed to import ({exc}); falling back to the "
            "PyTorch reference ops. Rebuild it against the installed torch with "
            "`pip install --no-build-isolation --force-reinstall --no-deps .` "
            "from the llmkernels source tree.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False, f"import failed: {exc}"
    return True, f"built for sm {archs}"


_EXTENSION_LOADED, _EXTENSION_STATUS = _load_extension()
# Without the extension the schemas are defined here, so torch.ops.llmkernels.* still exists.
_python_lib = None if _EXTENSION_LOADED else torch.library.Library("llmkernels", "DEF")
if _python_lib is not None:
    for _schema in SCHEMAS.values():
        _python_lib.define(_schema)


def extension_status() -> str:
    """One line saying whether the compiled kernels are loaded, and if not, why."""
    return _EXTENSION_STATUS


def has_cuda_kernel(name: str) -> bool:
    """True when the loaded extension registers a CUDA implementation of ``llmkernels::<name>``."""
    return _EXTENSION_LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"llmkernels::{name}", "CUDA"
    )


def cuda_kernels_available() -> bool:
    """True when the compiled CUDA kernels are loaded and a CUDA device is visible."""
    return _EXTENSION_LOADED and torch.cuda.is_available()


def _lean_cpu(t: torch.Tensor) -> bool:
    """CPU tensors outside torch.compile take llmkernels.cpu (the reference's values with fewer
    ops); under compile the reference itself is traced."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def uses_kernel(t: torch.Tensor) -> bool:
    """True when the ops run their CUDA kernel on tensors like ``t`` (the extension is loaded and
    ``t`` is on a CUDA device); False when they run PyTorch code (llmkernels.cpu or the
    reference)."""
    return _EXTENSION_LOADED and t.is_cuda


# ---- validation helpers -------------------------------------------------------------------------------
def _tensor(t, name: str, dtypes=None, ndim=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(
            f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}"
        )
    if ndim is not None and t.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def _same_device(*named: tuple[str, torch.Tensor]) -> None:
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "all tensors must be on the same device"
            )


def _same_dtype(*named: tuple[str, torch.Tensor]) -> None:
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.dtype != first.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; they must match"
            )


def _last_dim_contiguous(t: torch.Tensor, name: str) -> None:
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must have a contiguous last dimension (stride 1), got strides {t.stride()}"
        )


def _as_rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """View ``[..., H]`` as 2-D rows ``[N, H]`` without copying (rows may be strided)."""
    if t.dim() == 2:
        return t
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        raise ValueError(
            f"{name} with shape {tuple(t.shape)} and strides {t.stride()} cannot be viewed as rows "
            "[N, H]; make it contiguous first"
        ) from None


def _dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill one gap-free block of memory, each once (in any dim order)."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(
        ((n, st) for n, st in zip(t.shape, t.stride()) if n != 1), key=lambda p: p[1]
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def _overlap(a: torch.Tensor, b: torch.Tensor) -> str:
    """How two tensors' memory overlaps, as ATen's ``get_overlap_status`` (which the CUDA ops
    assert): "full" (the same elements in the same layout), "partial" (other shared bytes), or
    "none" (disjoint, or not decidable cheaply: a tensor with gaps, like q and k as interleaved
    views of one fused QKV output)."""
    if torch.compiler.is_compiling() or a.is_meta or b.is_meta or not a.numel() or not b.numel():
        return "none"  # no addresses to compare (the CUDA op checks again at run time)
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr() or a.device != b.device:
        return "none"
    if not (_dense(a) and _dense(b)):
        return "none"

    def byte_range(t: torch.Tensor) -> tuple[int, int]:  # dense, strides >= 0: numel from data_ptr
        return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()

    (a0, a1), (b0, b1) = byte_range(a), byte_range(b)
    if a1 <= b0 or b1 <= a0:
        return "none"
    if (a.data_ptr(), a.shape, a.stride(), a.dtype) == (b.data_ptr(), b.shape, b.stride(), b.dtype):
        return "full"
    return "partial"


def _no_overlap(*named: tuple[str, torch.Tensor], full_ok: bool = False) -> None:
    """Raise if the first tensor (written by the op) shares memory with any of the others (read,
    or also written): racing reads and writes on the GPU. ``full_ok``: exactly in place is fine."""
    out_name, out = named[0]
    for name, t in named[1:]:
        kind = _overlap(out, t)
        if kind == "partial" or (kind == "full" and not full_ok):
            allowed = f" (exactly in place, {out_name} = {name}, is allowed)" if full_ok else ""
            raise ValueError(f"{out_name} must not overlap {name} in memory{allowed}")


def _eps(eps) -> float:
    if torch.compiler.is_compiling():  # may be a symbolic float (dynamic shapes): not checkable
        return eps
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    return float(eps)


def _check_out(out, name: str, shape, dtype, device) -> torch.Tensor:
    _tensor(out, name)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"{name} must have shape {tuple(shape)}, dtype {dtype} and device {device}; "
            f"got {tuple(out.shape)}, {out.dtype}, {out.device}"
        )
    return out


# ---- normalization ---------------------------------------------------------------------------------
def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    out: torch.Tensor | None = None,
    unit_offset: bool = False,
) -> torch.Tensor:
    """RMSNorm, HF ``LlamaRMSNorm`` semantics:
    ``out = weight * (x * rsqrt(mean(x^2, -1) + eps))`` with statistics in fp32 and the normalized
    value rounded to x's dtype before the weight multiply. ``unit_offset=True``: Gemma's
    ``out = x * rsqrt(mean(x^2, -1) + eps) * (1 + weight)``, all in fp32, rounded once (the
    ``1 +`` is applied on the fly: no second weight copy).

    x: ``[..., H]`` fp32/fp16/bf16, last dim contiguous (rows may be strided); weight: ``[H]``,
    same dtype; out: ``[..., H]`` contiguous, allocated when None; ``out=x`` (in place) is
    allowed, any other overlap with x or weight raises.
    """
    _tensor(x, "x", FLOAT_DTYPES, ndim=range(1, 9))
    _tensor(weight, "weight", ndim=1)
    _same_dtype(("x", x), ("weight", weight))
    _same_device(("x", x), ("weight", weight))
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"weight must have shape [{x.shape[-1]}] (x's last dim), got {tuple(weight.shape)}"
        )
    _last_dim_contiguous(x, "x")
    eps = _eps(eps)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        _check_out(out, "out", x.shape, x.dtype, x.device)
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
        _no_overlap(("out", out), ("x", x), full_ok=True)
        _no_overlap(("out", out), ("weight", weight))
    unit_offset = bool(unit_offset)
    if uses_kernel(x):
        torch.ops.llmkernels.rms_norm(
            _as_rows(out, "out"), _as_rows(x, "x"), weight.contiguous(), eps, unit_offset
        )
    elif _lean_cpu(x):
        cpu.rms_norm(x, weight, eps, out, unit_offset)
    else:
        out.copy_(ref.rms_norm(x, weight, eps, unit_offset))
    return out


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    unit_offset: bool = False,
) -> None:
    """Residual add + RMSNorm, in place:
    ``residual += x; x = rms_norm(residual, weight, eps, unit_offset=unit_offset)``.

    x, residual: ``[..., H]`` same shape/dtype, last dim contiguous, not partially overlapping
    (the same tensor twice is allowed: ``residual = 2 * residual``); weight: ``[H]``.
    """
    _tensor(x, "x", FLOAT_DTYPES, ndim=range(1, 9))
    _tensor(residual, "residual", FLOAT_DTYPES)
    _tensor(weight, "weight", ndim=1)
    _same_dtype(("x", x), ("residual", residual), ("weight", weight))
    _same_device(("x", x), ("residual", residual), ("weight", weight))
    if residual.shape != x.shape:
        raise ValueError(
            f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}"
        )
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"weight must have shape [{x.shape[-1]}] (x's last dim), got {tuple(weight.shape)}"
        )
    _last_dim_contiguous(x, "x")
    _last_dim_contiguous(residual, "residual")
    _no_overlap(("x", x), ("residual", residual), full_ok=True)
    _no_overlap(("x", x), ("weight", weight))
    _no_overlap(("residual", residual), ("weight", weight))
    eps = _eps(eps)
    unit_offset = bool(unit_offset)
    if uses_kernel(x):
        torch.ops.llmkernels.fused_add_rms_norm(
            _as_rows(x, "x"), _as_rows(residual, "residual"), weight.contiguous(), eps, unit_offset
        )
    elif _lean_cpu(x):
        cpu.fused_add_rms_norm(x, residual, weight, eps, unit_offset)
    else:
        ref.fused_add_rms_norm(x, residual, weight, eps, unit_offset)


# ---- rotary -------------------------------------------------------------------------------------------
def rope_cos_sin_cache(config, max_position: int | None = None, device=None) -> torch.Tensor:
    """fp32 ``[max_position, rotary_dim]`` RoPE table (cos half | sin half) from an HF
    ``LlamaConfig`` or config dict, honouring ``rope_theta`` and rope scaling (default, linear,
    llama3, yarn). See :func:`llmkernels.reference.rope_cos_sin_cache` for the formula."""
    return ref.rope_cos_sin_cache(config, max_position, device)


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> None:
    """Rotary embedding in place on q and k:
    ``x1' = x1 cos(p w) - x2 sin(p w)``, ``x2' = x2 cos(p w) + x1 sin(p w)`` over the first
    ``rotary_dim`` channels, halves (NeoX / HF ``rotate_half``, ``is_neox=True``) or interleaved
    pairs (GPT-J).

    positions: ``[T]`` int32/int64 in ``[0, max_pos)``; q: ``[T, Hq, D]``; k: ``[T, Hk, D]``
    (same dtype, last dim contiguous, tokens/heads may be strided); cos_sin_cache:
    ``[max_pos, rotary_dim]`` fp32 with rotary_dim even and <= D.
    """
    _check_rotary_args(positions, q, k, cos_sin_cache)
    if uses_kernel(q):
        torch.ops.llmkernels.rotary_embedding(positions, q, k, cos_sin_cache, bool(is_neox))
    elif _lean_cpu(q):
        cpu.rotary_embedding(positions, q, k, cos_sin_cache, is_neox)
    else:
        ref.rotary_embedding(positions, q, k, cos_sin_cache, is_neox)


def _check_rotary_args(positions, q, k, cos_sin_cache) -> None:
    """rotary_embedding's argument checks (also qk_norm_rotary's)."""
    _tensor(positions, "positions", (torch.int32, torch.int64), ndim=1)
    _tensor(q, "q", FLOAT_DTYPES, ndim=3)
    _tensor(k, "k", FLOAT_DTYPES, ndim=3)
    _tensor(cos_sin_cache, "cos_sin_cache", (torch.float32,), ndim=2)
    _same_dtype(("q", q), ("k", k))
    _same_device(("q", q), ("k", k), ("positions", positions), ("cos_sin_cache", cos_sin_cache))
    num_tokens, _, head_dim = q.shape
    if positions.shape[0] != num_tokens or k.shape[0] != num_tokens:
        raise ValueError(
            f"positions [T], q [T, Hq, D] and k [T, Hk, D] must agree on T; got "
            f"{tuple(positions.shape)}, {tuple(q.shape)}, {tuple(k.shape)}"
        )
    if k.shape[2] != head_dim:
        raise ValueError(f"k must have head dim {head_dim} like q, got {k.shape[2]}")
    rotary_dim = cos_sin_cache.shape[1]
    if rotary_dim % 2 or rotary_dim > head_dim or rotary_dim == 0:
        raise ValueError(
            f"cos_sin_cache's rotary_dim must be even and in (0, {head_dim}], got {rotary_dim}"
        )
    _last_dim_contiguous(q, "q")
    _last_dim_contiguous(k, "k")
    _no_overlap(("q", q), ("k", k))
    if not cos_sin_cache.is_contiguous():
        raise ValueError("cos_sin_cache must be contiguous")
    # checkable without a device sync (and outside torch.compile, which cannot read values)
    if not positions.is_cuda and num_tokens and not torch.compiler.is_compiling():
        lo, hi = map(int, torch.aminmax(positions))
        if lo < 0 or hi >= cos_sin_cache.shape[0]:
            raise ValueError(
                f"positions must be in [0, {cos_sin_cache.shape[0]}) (the cos_sin_cache length), "
                f"got range [{lo}, {hi}]"
            )


QK_NORM_ROTARY_HEAD_DIMS = (64, 128, 256)  # the fused kernel's head sizes (one warp per head)


def qk_norm_rotary_supported(q: torch.Tensor, cos_sin_cache: torch.Tensor) -> bool:
    """Whether :func:`qk_norm_rotary` runs its fused CUDA kernel on these: CUDA q with head_dim
    64, 128 or 256 and a rotary over the whole head (``cos_sin_cache [max_pos, D]``). Callers
    (the engine) use the two-op path otherwise."""
    return (
        uses_kernel(q)
        and q.dim() == 3
        and q.shape[2] in QK_NORM_ROTARY_HEAD_DIMS
        and cos_sin_cache.dim() == 2
        and cos_sin_cache.shape[1] == q.shape[2]
    )


def qk_norm_rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    eps: float = 1e-6,
    unit_offset: bool = False,
) -> None:
    """Per-head RMSNorm then NeoX rotary, in place (Qwen3 / Gemma 3 attention):
    ``x = rms_norm(x) * w`` over each head's D channels (``w = q_weight`` for q, ``k_weight`` for
    k; ``unit_offset``: ``* (1 + w)``), then ``x1' = x1 cos - x2 sin``, ``x2' = x2 cos + x1 sin``
    on the halves, at each token's position.

    positions: ``[T]`` int32/int64 in ``[0, max_pos)``; q: ``[T, Hq, D]``; k: ``[T, Hk, D]``
    (same dtype, last dim contiguous, tokens/heads may be strided: views of a fused QKV output);
    weights: ``[D]`` in q's dtype; cos_sin_cache: ``[max_pos, D]`` fp32.
    """
    _check_rotary_args(positions, q, k, cos_sin_cache)
    head_dim = q.shape[2]
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        _tensor(w, name, (q.dtype,), ndim=1)
        if w.shape[0] != head_dim or not w.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [{head_dim}], got {tuple(w.shape)}")
    _same_device(("q", q), ("q_weight", q_weight), ("k_weight", k_weight))
    if cos_sin_cache.shape[1] != head_dim:
        raise ValueError(
            f"cos_sin_cache must be [max_pos, {head_dim}] (rotary over the whole head), "
            f"got {tuple(cos_sin_cache.shape)}"
        )
    eps = _eps(eps)
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        _no_overlap(("q", q), (name, w))
        _no_overlap(("k", k), (name, w))
    if qk_norm_rotary_supported(q, cos_sin_cache):
        torch.ops.llmkernels.qk_norm_rotary(
            positions, q, k, q_weight, k_weight, cos_sin_cache, eps, bool(unit_offset)
        )
    else:
        ref.qk_norm_rotary(positions, q, k, q_weight, k_weight, cos_sin_cache, eps, unit_offset)


# ---- activation ---------------------------------------------------------------------------------------
def _gated_activation(name: str, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The shared body of silu_and_mul / gelu_tanh_and_mul: validate, allocate, dispatch."""
    _tensor(x, "x", FLOAT_DTYPES, ndim=range(1, 9))
    if x.shape[-1] % 2:
        raise ValueError(f"x's last dim must be even (gate | up), got {x.shape[-1]}")
    _last_dim_contiguous(x, "x")
    out_shape = (*x.shape[:-1], x.shape[-1] // 2)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    else:
        _check_out(out, "out", out_shape, x.dtype, x.device)
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
        _no_overlap(("out", out), ("x", x))
    if uses_kernel(x):
        getattr(torch.ops.llmkernels, name)(_as_rows(out, "out"), _as_rows(x, "x"))
    elif _lean_cpu(x):
        getattr(cpu, name)(x, out)
    else:
        out.copy_(getattr(ref, name)(x))
    return out


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU gate: ``out = silu(x[..., :I]) * x[..., I:]`` with ``silu(g) = g / (1 + exp(-g))``.

    x: ``[..., 2I]`` fp32/fp16/bf16, last dim contiguous; out: ``[..., I]`` contiguous, not
    overlapping x.
    """
    return _gated_activation("silu_and_mul", x, out)


def gelu_tanh_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """GeGLU gate (Gemma): ``out = gelu_tanh(x[..., :I]) * x[..., I:]`` with
    ``gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3)))`` (HF
    ``gelu_pytorch_tanh``).

    x: ``[..., 2I]`` fp32/fp16/bf16, last dim contiguous; out: ``[..., I]`` contiguous, not
    overlapping x.
    """
    return _gated_activation("gelu_tanh_and_mul", x, out)


# ---- weight-only int8 matmul ----------------------------------------------------------------------------
INT8_LINEAR_MAX_ROWS = 8  # the kernel's decode batch; prefill takes a dense GEMM (llmkernels.quant)


def _linear_out(out, x: torch.Tensor, n: int, *weights: tuple[str, torch.Tensor]) -> torch.Tensor:
    """The ``[M, N]`` output of a weight-only matmul of ``x [M, K]``: allocated in x's dtype when
    None, else checked (shape, dtype, device, last dim contiguous, no overlap with the inputs)."""
    if out is None:
        return torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    _check_out(out, "out", (x.shape[0], n), x.dtype, x.device)
    _last_dim_contiguous(out, "out")
    _no_overlap(("out", out), ("x", x), *weights)
    return out


def int8_linear_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`int8_linear` runs its CUDA kernel on these (else the reference): CUDA
    fp16/bf16 x ``[M, K]`` with M <= 8, last dim contiguous, row stride a multiple of 8, K a
    multiple of 16, x and weight 16-byte aligned."""
    return (
        uses_kernel(x)
        and x.dtype in (torch.float16, torch.bfloat16)
        and x.dim() == 2
        and x.shape[0] <= INT8_LINEAR_MAX_ROWS
        and x.shape[1] % 16 == 0
        and (x.shape[1] <= 1 or x.stride(1) == 1)
        and (x.shape[0] <= 1 or x.stride(0) % 8 == 0)
        and x.data_ptr() % 16 == 0
        and weight.data_ptr() % 16 == 0
    )


def int8_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Weight-only int8 matmul: ``out[m, n] = (sum_k x[m, k] * weight[n, k]) * scale[n]``, the
    sum in fp32, rounded to x's dtype (``x @ W^T`` for ``W = weight * scale[:, None]``).

    x: ``[M, K]`` fp32/fp16/bf16; weight: int8 ``[N, K]`` contiguous; scale: fp32 ``[N]``
    contiguous; out: ``[M, N]`` in x's dtype, last dim contiguous, not overlapping the inputs.
    The CUDA kernel takes decode-sized inputs (:func:`int8_linear_supported`); others run the
    reference.
    """
    _tensor(x, "x", FLOAT_DTYPES, ndim=2)
    _tensor(weight, "weight", (torch.int8,), ndim=2)
    _tensor(scale, "scale", (torch.float32,), ndim=1)
    _same_device(("x", x), ("weight", weight), ("scale", scale))
    k, n = x.shape[1], weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"weight must be [N, {k}] (x is [M, {k}]), got {tuple(weight.shape)}")
    if scale.shape[0] != n:
        raise ValueError(f"scale must be [{n}] (one per row of weight), got {tuple(scale.shape)}")
    if not weight.is_contiguous() or not scale.is_contiguous():
        raise ValueError("weight and scale must be contiguous")
    out = _linear_out(out, x, n, ("weight", weight), ("scale", scale))
    if int8_linear_supported(x, weight):
        torch.ops.llmkernels.int8_linear(out, x, weight, scale)
    else:
        out.copy_(ref.int8_linear(x, weight, scale))
    return out


def int4_linear_supported(x: torch.Tensor, weight: torch.Tensor, scale_zero: torch.Tensor) -> bool:
    """Whether :func:`int4_linear` runs its CUDA kernel on these (else the reference): CUDA
    fp16/bf16 x ``[M, K]`` with M <= 8, last dim contiguous, row stride a multiple of 8, bf16
    ``scale_zero``, x and weight 16-byte aligned (K a multiple of 32 and groups of a multiple of
    32 inputs, as :func:`int4_linear` requires of every input)."""
    return (
        int8_linear_supported(x, weight)
        and scale_zero.dtype == torch.bfloat16
        and scale_zero.data_ptr() % 4 == 0
    )


def int4_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_zero: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weight-only int4 matmul: ``out[m, n] = sum_k x[m, k] * ((q[n, k] - 8) * s[n, k // G] +
    z[n, k // G])``, the sum in fp32, rounded to x's dtype (``x @ W^T`` for the dequantized
    ``W``; :class:`llmkernels.quant.QuantizedWeight` builds these tensors).

    x: ``[M, K]`` fp32/fp16/bf16, K a multiple of 32; weight: uint8 ``[N, K / 2]`` contiguous,
    byte j holding the 4-bit codes of inputs 2j (high nibble) and 2j + 1 (low); scale_zero:
    fp32/bf16 ``[N, K / G, 2]`` contiguous, each group's scale s and zero z, G a multiple of 32;
    out: ``[M, N]`` in x's dtype, last dim contiguous, not overlapping the inputs. The CUDA kernel
    takes decode-sized inputs with bf16 ``scale_zero`` (:func:`int4_linear_supported`); others
    run the reference.
    """
    _tensor(x, "x", FLOAT_DTYPES, ndim=2)
    _tensor(weight, "weight", (torch.uint8,), ndim=2)
    _tensor(scale_zero, "scale_zero", (torch.float32, torch.bfloat16), ndim=3)
    _same_device(("x", x), ("weight", weight), ("scale_zero", scale_zero))
    k, n = x.shape[1], weight.shape[0]
    if k % 32 or k == 0:
        raise ValueError(f"x's last dim (K) must be a positive multiple of 32, got {k}")
    if weight.shape[1] * 2 != k:
        raise ValueError(
            f"weight must be [N, {k // 2}] (two 4-bit codes per byte; x is [M, {k}]), got "
            f"{tuple(weight.shape)}"
        )
    groups = scale_zero.shape[1]
    if scale_zero.shape[0] != n or scale_zero.shape[2] != 2 or groups == 0 or k % groups:
        raise ValueError(
            f"scale_zero must be [{n}, K / group_size, 2] with K = {k}, got "
            f"{tuple(scale_zero.shape)}"
        )
    if (k // groups) % 32:
        raise ValueError(
            f"the group size (K / scale_zero.shape[1]) must be a multiple of 32, got {k // groups}"
        )
    if not weight.is_contiguous() or not scale_zero.is_contiguous():
        raise ValueError("weight and scale_zero must be contiguous")
    out = _linear_out(out, x, n, ("weight", weight), ("scale_zero", scale_zero))
    if int4_linear_supported(x, weight, scale_zero):
        torch.ops.llmkernels.int4_linear(out, x, weight, scale_zero)
    else:
        out.copy_(ref.int4_linear(x, weight, scale_zero))
    return out


# ---- attention ----------------------------------------------------------------------------------------
def _check_cache(k_cache, v_cache) -> None:
    _tensor(k_cache, "k_cache", FLOAT_DTYPES, ndim=4)
    _tensor(v_cache, "v_cache", FLOAT_DTYPES, ndim=4)
    _same_dtype(("k_cache", k_cache), ("v_cache", v_cache))
    _same_device(("k_cache", k_cache), ("v_cache", v_cache))
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous [B, Hk, S, D]")


def kv_cache_append(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write new keys/values into the static cache in place:
    ``k_cache[b, :, s] = k[n]``, ``v_cache[b, :, s] = v[n]`` with ``b, s = divmod(slot_mapping[n], S)``
    for n in order (a slot given to several tokens keeps the last); slots outside ``[0, B * S)``
    are skipped (padding).

    k, v: ``[N, Hk, D]`` (last dim contiguous, tokens may be strided); k_cache, v_cache:
    ``[B, Hk, S, D]`` contiguous, overlapping neither each other nor k/v; slot_mapping: ``[N]``
    int32/int64.
    """
    _check_cache(k_cache, v_cache)
    _tensor(k, "k", FLOAT_DTYPES, ndim=3)
    _tensor(v, "v", FLOAT_DTYPES, ndim=3)
    _tensor(slot_mapping, "slot_mapping", (torch.int32, torch.int64), ndim=1)
    _same_dtype(("k_cache", k_cache), ("k", k), ("v", v))
    _same_device(("k_cache", k_cache), ("k", k), ("v", v), ("slot_mapping", slot_mapping))
    expected = (slot_mapping.shape[0], k_cache.shape[1], k_cache.shape[3])
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{name} must have shape [N, Hk, D] = {list(expected)}, got {tuple(t.shape)}"
            )
        _last_dim_contiguous(t, name)
    _no_overlap(("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v))
    _no_overlap(("v_cache", v_cache), ("k", k), ("v", v))
    if uses_kernel(k):
        torch.ops.llmkernels.kv_cache_append(k, v, k_cache, v_cache, slot_mapping.long())
    elif _lean_cpu(k):
        cpu.kv_cache_append(k, v, k_cache, v_cache, slot_mapping)
    else:
        ref.kv_cache_append(k, v, k_cache, v_cache, slot_mapping)


@cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_attention_num_splits(
    batch: int, num_q_heads: int, num_kv_heads: int, seq_capacity: int, device, head_dim: int = 128
) -> int:
    """How many split-K partitions the decode-attention kernel uses (1 = single pass).

    The kernel runs one block per (batch row, kv head, chunk of up to 16 of its query heads (8
    for head_dim 256), split) and up to 3 blocks per SM. Split only when the
    ``B * Hk * ceil(G / 16)`` blocks
    (``G = Hq / Hk``) cannot fill the GPU: as many splits as still fit in one wave of 2 blocks per
    SM (no second partial wave), each partition at least 256 tokens of the capacity, at most 128
    partitions. The kernel divides the *actual* length ``seq_lens[b]`` (read on the device) into
    these partitions, so short sequences in a long cache stay balanced. Depends on shapes only
    (never on device values), so it is fixed for a captured graph.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    heads_per_block = 8 if head_dim > 128 else 16
    head_chunks = math.ceil(num_q_heads // max(num_kv_heads, 1) / heads_per_block)
    blocks = max(batch * num_kv_heads * head_chunks, 1)
    fit = (2 * _sm_count(index)) // blocks
    return max(1, min(fit, math.ceil(seq_capacity / 256), 128))


def decode_attention_workspace(q: torch.Tensor, k_cache: torch.Tensor) -> torch.Tensor:
    """Allocate the split-K workspace ``[B, Hq, num_splits, D + 2]`` (fp32) for these shapes.

    Allocate once and pass it to every :func:`decode_attention` call (CUDA-graph friendly)."""
    batch, num_q_heads, head_dim = q.shape
    splits = decode_attention_num_splits(
        batch, num_q_heads, k_cache.shape[1], k_cache.shape[2], q.device, head_dim
    )
    return torch.empty(
        (batch, num_q_heads, splits, head_dim + 2), dtype=torch.float32, device=q.device
    )


def decode_attention_supported(q: torch.Tensor) -> bool:
    """Whether :func:`decode_attention` accepts q's dtype and head size on q's device: the CUDA
    kernel takes float16/bfloat16 with head_dim in ``DECODE_HEAD_DIMS``; the reference (CPU, or
    CUDA without the extension) takes any float dtype and head size. Callers use it to choose
    between decode_attention and a generic attention."""
    if uses_kernel(q):
        return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in DECODE_HEAD_DIMS
    return q.dtype in FLOAT_DTYPES


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Decode attention over a static KV cache (one new query token per sequence, GQA):
    ``out[b, h] = softmax(scale * q[b, h] . K[b, g]^T) V[b, g]`` over the cached tokens
    ``[s, L)`` with ``L = seq_lens[b]`` and ``s = max(0, L - window)`` (0 without a window),
    ``g = h // (Hq / Hk)``; softmax in fp32; ``L = 0`` gives zeros.

    q: ``[B, Hq, D]`` (last dim contiguous); k_cache, v_cache: ``[B', Hk, S, D]`` contiguous with
    ``B' >= B``, same dtype as q; seq_lens: ``[B]`` int32 with values in ``[0, S]``;
    scale: default ``D ** -0.5``; out: ``[B, Hq, D]`` contiguous; workspace: from
    :func:`decode_attention_workspace` (allocated per call when None); window: ``None`` or a
    positive int (a sliding window: only the last ``window`` tokens are read).
    """
    _tensor(q, "q", FLOAT_DTYPES, ndim=3)
    _check_cache(k_cache, v_cache)
    _tensor(seq_lens, "seq_lens", (torch.int32,), ndim=1)
    _same_dtype(("q", q), ("k_cache", k_cache))
    _same_device(("q", q), ("k_cache", k_cache), ("seq_lens", seq_lens))
    batch, num_q_heads, head_dim = q.shape
    _, num_kv_heads, seq_capacity, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"k_cache head dim {cache_head_dim} does not match q's {head_dim}")
    if k_cache.shape[0] < batch:
        raise ValueError(f"k_cache has {k_cache.shape[0]} rows, fewer than q's batch {batch}")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"q's heads ({num_q_heads}) must be a multiple of the cache's kv heads ({num_kv_heads})"
        )
    if seq_lens.shape[0] != batch:
        raise ValueError(f"seq_lens must have B = {batch} entries, got {seq_lens.shape[0]}")
    _last_dim_contiguous(q, "q")
    if scale is None:
        scale = head_dim**-0.5
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    if window is not None and (
        not isinstance(window, int) or isinstance(window, bool) or window < 1
    ):
        raise ValueError(f"window must be None or a positive int, got {window!r}")
    if not seq_lens.is_cuda and batch:
        lo, hi = map(int, torch.aminmax(seq_lens))
        if lo < 0 or hi > seq_capacity:
            raise ValueError(
                f"seq_lens must be in [0, {seq_capacity}] (the cache length), got range [{lo}, {hi}]"
            )
    if out is None:
        out = torch.empty((batch, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    else:
        _check_out(out, "out", (batch, num_q_heads, head_dim), q.dtype, q.device)
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
        _no_overlap(("out", out), ("q", q), ("k_cache", k_cache), ("v_cache", v_cache))
    if uses_kernel(q):
        if not decode_attention_supported(q):
            raise ValueError(
                f"decode_attention on CUDA supports float16/bfloat16 with head_dim in {DECODE_HEAD_DIMS}, "
                f"got {q.dtype} with head_dim {head_dim} (check decode_attention_supported first)"
            )
        if k_cache.data_ptr() % 16 or v_cache.data_ptr() % 16:
            raise ValueError("k_cache and v_cache must start at 16-byte aligned addresses")
        if workspace is None:
            workspace = decode_attention_workspace(q, k_cache)
        elif (
            workspace.dtype != torch.float32
            or workspace.dim() != 4
            or tuple(workspace.shape[:2]) != (batch, num_q_heads)
            or workspace.shape[3] != head_dim + 2
            or not 1 <= workspace.shape[2] <= 4096
            or not workspace.is_contiguous()
            or workspace.device != q.device
        ):
            raise ValueError(
                f"workspace must be a contiguous float32 [B, Hq, splits, D + 2] = [{batch}, {num_q_heads}, "
                f"splits, {head_dim + 2}] tensor on {q.device} (see decode_attention_workspace), "
                f"got {workspace.dtype} {tuple(workspace.shape)}"
            )
        else:
            _no_overlap(
                ("workspace", workspace),
                ("out", out),
                ("q", q),
                ("k_cache", k_cache),
                ("v_cache", v_cache),
            )
        torch.ops.llmkernels.decode_attention(
            out, q, k_cache, v_cache, seq_lens, float(scale), workspace, window or 0
        )
    elif _lean_cpu(q):
        out.copy_(cpu.decode_attention(q, k_cache, v_cache, seq_lens, scale, window))
    else:
        out.copy_(ref.decode_attention(q, k_cache, v_cache, seq_lens, scale, window))
    return out


# ---- sampling ------------------------------------------------------------------------------------------
def new_rng_state(
    device, seed: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A sampler RNG state: int64 ``[2]`` = (seed, offset) on ``device``.

    The seed is ``seed`` when given, else drawn from ``generator`` (or torch's default generator,
    so ``torch.manual_seed`` makes runs reproducible). The CUDA sampler advances the offset on the
    device after every call, so a captured graph draws fresh numbers on each replay.
    """
    if seed is not None:
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        seed_t = torch.tensor([seed & (2**63 - 1)], dtype=torch.int64)
    else:
        gen_device = generator.device if generator is not None else "cpu"
        seed_t = torch.randint(0, 2**62, (1,), generator=generator, device=gen_device)
    return torch.cat([seed_t.to(device), torch.zeros(1, dtype=torch.int64, device=device)])


def _row_param(value, name: str, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1)
        if value.dim() != 1 or value.shape[0] not in (1, batch):
            raise ValueError(
                f"{name} must be a scalar or a [B] = [{batch}] tensor, got shape {tuple(value.shape)}"
            )
        if value.device != torch.device(device) and value.device.type != "cpu":
            raise ValueError(f"{name} is on {value.device} but logits are on {device}")
        return value.to(device=device, dtype=dtype).expand(batch).contiguous()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    return torch.full((batch,), value, dtype=dtype, device=device)


def _check_sampling_values(logits, temperature, top_k, top_p) -> None:
    # One device sync: called only when check_values=True (off inside CUDA graphs).
    bad_logits = torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1)
    all_neg_inf = torch.isneginf(logits).all(-1)
    flags = torch.stack(
        [
            bad_logits.any(),
            all_neg_inf.any(),
            ((temperature < 0) | ~torch.isfinite(temperature)).any(),
            (top_k < 0).any(),
            ((top_p <= 0) | (top_p > 1) | torch.isnan(top_p)).any(),
        ]
    ).tolist()
    if flags[0]:
        rows = torch.nonzero(bad_logits).flatten().tolist()[:8]
        raise ValueError(f"logits contain NaN or +inf (rows {rows}); cannot sample")
    if flags[1]:
        raise ValueError("logits has a row that is entirely -inf; no token can be sampled")
    if flags[2]:
        raise ValueError("temperature must be finite and >= 0 (0 = greedy)")
    if flags[3]:
        raise ValueError("top_k must be >= 0 (0 = off)")
    if flags[4]:
        raise ValueError("top_p must be in (0, 1]")


def sample(
    logits: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    generator: torch.Generator | None = None,
    *,
    seed: int | None = None,
    rng_state: torch.Tensor | None = None,
    check_values: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample one token per row, HF filter order: ``p = softmax(logits / T)``; keep the top-k
    (``k = 0`` off; ties at the k-th value kept); then keep tokens whose strictly-more-probable
    mass is ``< top_p`` (at least one); renormalize; draw. ``T = 0`` is greedy (argmax, lowest
    index among ties).

    logits: ``[B, V]`` fp32/fp16/bf16 (last dim contiguous); temperature (>= 0), top_k (>= 0),
    top_p (in (0, 1]): numbers or ``[B]`` tensors. Randomness: ``rng_state`` (int64 ``[2]`` on the
    logits' device, see :func:`new_rng_state`; advanced in place) or ``seed`` or ``generator``.
    ``check_values`` checks for NaN/inf logits and parameter ranges (one device sync; switch it
    off inside CUDA graphs). Returns int64 ``[B]`` (written to ``out`` when given).
    """
    _tensor(logits, "logits", FLOAT_DTYPES, ndim=2)
    _last_dim_contiguous(logits, "logits")
    batch, vocab = logits.shape
    if vocab == 0:
        raise ValueError("logits must have a non-empty vocabulary dimension")
    device = logits.device
    if out is not None:
        _check_out(out, "out", (batch,), torch.int64, device)
    # Python-number parameters are checked here, without any device sync.
    if not isinstance(temperature, torch.Tensor) and (
        isinstance(temperature, (int, float))
        and (not math.isfinite(temperature) or temperature < 0)
    ):
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_k, torch.Tensor) and isinstance(top_k, int) and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k!r}")
    if isinstance(top_k, float):
        raise TypeError(f"top_k must be an int, got {top_k!r}")
    if (
        not isinstance(top_p, torch.Tensor)
        and isinstance(top_p, (int, float))
        and not 0 < top_p <= 1
    ):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if out is None:
        out = torch.empty(batch, dtype=torch.int64, device=device)
    all_greedy = not isinstance(temperature, torch.Tensor) and temperature == 0
    if all_greedy and not check_values:  # the hot greedy path: one argmax kernel, nothing else
        return torch.argmax(logits, dim=-1, out=out)
    if (
        isinstance(top_k, int) and top_k >= vocab
    ):  # keeping >= V tokens is no filter (and fits int32)
        top_k = 0
    temperature_t = _row_param(temperature, "temperature", batch, torch.float32, device)
    top_k_t = _row_param(top_k, "top_k", batch, torch.int32, device)
    top_p_t = _row_param(top_p, "top_p", batch, torch.float32, device)
    if check_values:
        _check_sampling_values(logits, temperature_t, top_k_t, top_p_t)
    if all_greedy:
        return torch.argmax(logits, dim=-1, out=out)
    if rng_state is not None:
        _tensor(rng_state, "rng_state", (torch.int64,), ndim=1)
        if rng_state.shape[0] != 2 or rng_state.device != device:
            raise ValueError(
                f"rng_state must be int64 [2] (seed, offset) on {device}, got {tuple(rng_state.shape)} on {rng_state.device}"
            )
    if uses_kernel(logits):
        if rng_state is None:
            rng_state = new_rng_state(device, seed, generator)
        torch.ops.llmkernels.sample(out, logits, temperature_t, top_k_t, top_p_t, rng_state)
        return out
    if rng_state is not None:
        _sample_from_state(out, logits, temperature_t, top_k_t, top_p_t, rng_state)
        return out
    if generator is None and seed is not None:
        generator = torch.Generator(device).manual_seed(seed)
    out.copy_(_draw(logits, temperature_t, top_k_t, top_p_t, generator))
    return out


def sampling_probs(logits: torch.Tensor, *settings) -> torch.Tensor:
    """:func:`reference.sampling_probs` (the same arguments and values): on CPU tensors outside
    torch.compile its lean twin (:func:`llmkernels.cpu.sampling_probs`, no sort of the whole
    vocabulary; reads the settings on the host), elsewhere the reference itself (no host sync:
    it runs inside captured decode steps). No value checks."""
    return (cpu.sampling_probs if _lean_cpu(logits) else ref.sampling_probs)(logits, *settings)


def _draw(logits, temperature, top_k, top_p, generator) -> torch.Tensor:
    """:func:`reference.sample`: one token per row from :func:`sampling_probs`."""
    return ref.draw(sampling_probs(logits, temperature, top_k, top_p), generator)


def sample_from_probs(
    probs: torch.Tensor, *, rng_state: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """One token per row drawn from the distributions ``probs [B, V]`` (fp32, rows summing to 1;
    zero entries are never drawn) by :func:`sample`: their log at temperature 1, unfiltered. For
    laws the sampler's own filters cannot express (speculative residuals, min_p). No value
    checks (check the scores the probabilities came from); nothing syncs with the host."""
    log_probs = ref.log_or_minus_inf(probs)
    return sample(log_probs, 1.0, 0, 1.0, rng_state=rng_state, check_values=False, out=out)


def _sample_from_state(out, logits, temperature, top_k, top_p, rng_state) -> None:
    """Reference sampling driven by an (seed, offset) state, which it advances by one."""
    seed, offset = (int(v) for v in rng_state.tolist())
    generator = torch.Generator(logits.device).manual_seed((seed * 1_000_003 + offset) % (2**63))
    out.copy_(_draw(logits, temperature, top_k, top_p, generator))
    rng_state[1] += 1


# ---- CPU and fake implementations of the schemas --------------------------------------------------
def _register_python_impls() -> None:
    def cpu_rms_norm(out, x, weight, eps, unit_offset=False):
        out.copy_(ref.rms_norm(x, weight, eps, unit_offset))

    def cpu_fused_add_rms_norm(x, residual, weight, eps, unit_offset=False):
        ref.fused_add_rms_norm(x, residual, weight, eps, unit_offset)

    def cpu_rotary_embedding(positions, q, k, cos_sin_cache, is_neox):
        ref.rotary_embedding(positions, q, k, cos_sin_cache, is_neox)

    def cpu_silu_and_mul(out, x):
        out.copy_(ref.silu_and_mul(x))

    def cpu_gelu_tanh_and_mul(out, x):
        out.copy_(ref.gelu_tanh_and_mul(x))

    def cpu_kv_cache_append(k, v, k_cache, v_cache, slot_mapping):
        ref.kv_cache_append(k, v, k_cache, v_cache, slot_mapping)

    def cpu_qk_norm_rotary(
        positions, q, k, q_weight, k_weight, cos_sin_cache, eps, unit_offset=False
    ):
        ref.qk_norm_rotary(positions, q, k, q_weight, k_weight, cos_sin_cache, eps, unit_offset)

    def cpu_int8_linear(out, x, weight, scale):
        out.copy_(ref.int8_linear(x, weight, scale))

    def cpu_int4_linear(out, x, weight, scale_zero):
        out.copy_(ref.int4_linear(x, weight, scale_zero))

    def cpu_decode_attention(out, q, k_cache, v_cache, seq_lens, scale, workspace, window=0):
        out.copy_(ref.decode_attention(q, k_cache, v_cache, seq_lens, scale, window or None))

    cpu_impls = {
        "rms_norm": cpu_rms_norm,
        "fused_add_rms_norm": cpu_fused_add_rms_norm,
        "rotary_embedding": cpu_rotary_embedding,
        "silu_and_mul": cpu_silu_and_mul,
        "gelu_tanh_and_mul": cpu_gelu_tanh_and_mul,
        "kv_cache_append": cpu_kv_cache_append,
        "decode_attention": cpu_decode_attention,
        "sample": _sample_from_state,
        "int8_linear": cpu_int8_linear,
        "int4_linear": cpu_int4_linear,
        "qk_norm_rotary": cpu_qk_norm_rotary,
    }
    for name, fn in cpu_impls.items():
        torch.library.impl(f"llmkernels::{name}", "CPU")(fn)

        # Every op writes into its arguments and returns nothing: the fake has nothing to compute.
        def fake(*args, **kwargs):
            return None

        torch.library.register_fake(f"llmkernels::{name}")(fake)


_register_python_impls()
