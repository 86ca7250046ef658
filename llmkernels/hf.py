"""Run a Hugging Face model's own ``forward`` / ``generate`` on llmkernels ops.

    import llmkernels as lk
    model = AutoModelForCausalLM.from_pretrained(...)   # Llama, Mistral, Qwen2/3, Gemma 3; CUDA
    lk.patch(model)        # same object, same API: model(ids), model.generate(...), pipeline(...)
    lk.unpatch(model)      # back to transformers' code, bit for bit

How it plugs into transformers (its extension points; no copy of transformers' code):

- ``*RMSNorm`` modules (the per-head q/k norms of Qwen3 and Gemma 3 included) get an
  instance-level ``forward(hidden_states)`` running :func:`llmkernels.ops.rms_norm` (HF's Llama
  RMSNorm formula; Gemma 3's ``(1 + w)`` one with ``unit_offset``). A per-head norm applied to
  a ``[B, H, T, D]`` transposed view (Gemma 3) keeps that layout, so the rotary hook below can
  still rotate in place.
- ``*MLP`` modules get ``forward(x) = down_proj(act_and_mul(cat(gate_proj(x), up_proj(x))))``
  through the module's own Linear layers (quantized or adapted layers keep working), with
  ``silu_and_mul`` (SwiGLU) or ``gelu_tanh_and_mul`` (Gemma's GeGLU).
- ``*Attention`` modules get a ``forward`` that calls their own ``forward`` unchanged, whatever its
  signature, while marking the call as "inside a patched module" (a context variable). Two hooks
  act only under that mark and call transformers' function otherwise:

  * the modeling file's ``apply_rotary_pos_emb(q, k, cos, sin)`` is wrapped: q and k are rotated
    in place by :func:`llmkernels.ops.rotary_embedding` using transformers' own ``cos``/``sin``
    (so every rope type transformers implements is reproduced);
  * the ``"sdpa"`` entry of transformers' ``AttentionInterface`` is wrapped: a one-token decode
    step without a mask (every cached position valid) runs :func:`llmkernels.ops.decode_attention`
    (with the layer's ``scaling``); anything else (prefill, padding, static-cache or sliding-window
    masks, dropout, soft-capping, ...) is transformers' SDPA. A ``sliding_window`` argument alone
    changes nothing: SDPA ignores it (the mask carries the window).
    A model on another attention implementation (eager, flash, ...) keeps it entirely, attention
    maps included; only its norms, MLPs and rotary run on our ops.

Where our ops would run the pure-PyTorch reference (CPU tensors, or CUDA without the compiled
extension), the patched modules run transformers' own code: the reference is the same math with
validation on top, so it could only be slower (``reference_on_cpu=True`` routes CPU tensors
through the reference ops anyway, which is how the integration is tested without a GPU). Under
``torch.compile`` and while autograd records (our ops have no backward; a warning says so), the
patched modules also run transformers' code.

What this relies on is checked at :func:`patch` time, before the model is touched: the
transformers version (:data:`OLDEST_TRANSFORMERS` .. :data:`NEWEST_TESTED_TRANSFORMERS` are tested;
older is refused, newer warns), the names and signatures above, and a self-check that runs a tiny
model of the same family patched and unpatched through ``generate`` (prefill and cached decode
steps) and refuses to patch, naming the transformers version, if the two disagree.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import importlib
import inspect
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import ops as _ops
from .model import hf_activation

__all__ = [
    "patch",
    "unpatch",
    "is_patched",
    "OLDEST_TRANSFORMERS",
    "NEWEST_TESTED_TRANSFORMERS",
    "SUPPORTED_MODEL_TYPES",
]

# The transformers releases CI tests the patch on (both ends of the range).
OLDEST_TRANSFORMERS = "5.17.0"
NEWEST_TESTED_TRANSFORMERS = "5.24.0"

_STATE_ATTR = "_llmkernels_patch"  # where the patch record lives, on the base model instance
_MISSING = object()
_GRAD_WARNING = (
    "llmkernels: autograd is recording and the llmkernels ops have no backward, so this patched "
    "module runs transformers' original code. Run inference under torch.inference_mode() or "
    "torch.no_grad() to use the llmkernels ops."
)
# kwargs of an attention call that change what attention computes: any of them set means SDPA.
# (sliding_window is not one: transformers' SDPA ignores it, the mask carries the window.)
_ATTENTION_MODIFIERS = ("softcap", "s_aux", "position_bias", "head_mask")


# ---- families --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Family:
    """Where a transformers model family keeps the classes the patch hooks into."""

    package: str  # transformers.models.<package>.modeling_<package>
    prefix: str  # class name prefix: <prefix>RMSNorm, <prefix>MLP, <prefix>Attention, ...
    tiny_config: tuple = ()  # (name, value) pairs the self-check's tiny config adds
    text: str = ""  # "Text" where the decoder is <prefix>TextModel / <prefix>TextConfig (Gemma 3)
    norm_arg: str = "hidden_states"  # the RMSNorm forward's argument
    norm_eps: str = "variance_epsilon"  # the RMSNorm module's eps attribute
    norm_unit_offset: bool = False  # the RMSNorm scales by (1 + weight) in fp32 (Gemma)

    @property
    def modeling(self) -> types.ModuleType:
        return importlib.import_module(
            f"transformers.models.{self.package}.modeling_{self.package}"
        )

    def cls(self, suffix: str) -> type:
        """``<prefix><suffix>``: from transformers' top level where it is public (config, models),
        else from the modeling file (the modules the patch hooks into)."""
        import transformers

        name = self.prefix + suffix
        found = getattr(transformers, name, None) or getattr(self.modeling, name, None)
        if not isinstance(found, type):
            raise RuntimeError(
                f"llmkernels.patch: transformers {_transformers_version()} has no {name} in "
                f"{self.modeling.__name__}: this version changed what the patch relies on "
                f"(tested: {OLDEST_TRANSFORMERS} to {NEWEST_TESTED_TRANSFORMERS})"
            )
        return found


# config.model_type -> family. Each has an RMSNorm (Llama's, or Gemma's (1 + w); Qwen3 and
# Gemma 3 also on q and k per head), a gated MLP (activation from the config), and an attention
# forward that calls its modeling file's apply_rotary_pos_emb. Decode steps of sliding-window
# layers run the decode kernel while the mask is None (the window not yet reached).
_FAMILIES = {
    "llama": _Family("llama", "Llama"),
    "mistral": _Family("mistral", "Mistral", (("sliding_window", None),)),
    "qwen2": _Family("qwen2", "Qwen2"),
    "qwen3": _Family("qwen3", "Qwen3"),
    "gemma3_text": _Family(
        "gemma3",
        "Gemma3",
        # one sliding and one full layer, the window shorter than the self-check's sequences
        (("sliding_window", 4), ("layer_types", ["sliding_attention", "full_attention"])),
        text="Text",
        norm_arg="x",
        norm_eps="eps",
        norm_unit_offset=True,
    ),
}
# HF activation name -> our gated op
_MLP_OPS = {
    "silu": "silu_and_mul",
    "swish": "silu_and_mul",
    "gelu_pytorch_tanh": "gelu_tanh_and_mul",
}
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)

# The self-check's tiny model (config kwargs shared by every family above).
_TINY_CONFIG = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=88,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    head_dim=16,
    max_position_embeddings=64,
    initializer_range=0.2,  # peaky logits: greedy decoding is decisive
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _release(version: str) -> tuple[int, ...]:
    from packaging.version import Version

    return Version(version).release


def _check_transformers_version() -> None:
    found = _transformers_version()
    if _release(found) < _release(OLDEST_TRANSFORMERS):
        raise RuntimeError(
            f"llmkernels.patch supports transformers >= {OLDEST_TRANSFORMERS} (tested "
            f"{OLDEST_TRANSFORMERS} to {NEWEST_TESTED_TRANSFORMERS}), found {found}"
        )
    if _release(found) > _release(NEWEST_TESTED_TRANSFORMERS):
        _warn_once(
            f"llmkernels.patch was tested with transformers {OLDEST_TRANSFORMERS} to "
            f"{NEWEST_TESTED_TRANSFORMERS}, found {found}: what it relies on was checked and a "
            "patched tiny model matched transformers' own before patching"
        )


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _family_of(model: Any) -> tuple[_Family, nn.Module]:
    """(family, base model) of a supported model: ``<X>Model`` itself or any model whose
    ``base_model`` is one (``<X>ForCausalLM``, ``...ForSequenceClassification``, ...)."""
    base = getattr(model, "base_model", None) if isinstance(model, nn.Module) else None
    family = _FAMILIES.get(getattr(getattr(base, "config", None), "model_type", None))
    if family is None or not isinstance(base, family.cls(family.text + "Model")):
        names = ", ".join(f"{f.prefix}{f.text}Model" for f in _FAMILIES.values())
        raise TypeError(
            f"llmkernels.patch supports transformers models built on {names} "
            f"(model types: {', '.join(SUPPORTED_MODEL_TYPES)}): ...ForCausalLM, the base model "
            "itself, or another head on it; got "
            f"{type(model).__module__}.{type(model).__qualname__}"
        )
    return family, base


# ---- the patch state and the context that marks "inside a patched attention module" -------------
@dataclass
class _Patch:
    family: str
    reference_on_cpu: bool
    base: nn.Module | None = None  # the patched base model (this record lives in its __dict__)
    # (module, attribute, the module's own previous value or _MISSING)
    overrides: list[tuple[nn.Module, str, Any]] = field(default_factory=list)
    used: set[str] = field(default_factory=set)  # which ops ran (the self-check reads it)
    # (cos, sin, batch, table fp32 [rows, D], positions [batch * T]) of the last rotary call
    rope_rows: tuple | None = None
    # (batch, length, device, int32 [batch] of length) of the last decode step: every layer of a
    # step attends over the same cache length, so one tensor serves them all (it is only read)
    decode_lens: tuple | None = None

    def __deepcopy__(self, memo):
        # A deepcopy of a patched model is patched too (its modules' forwards are copied): track
        # its base model, so transformers' functions stay hooked while it lives.
        clone = copy.copy(self)
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        if clone.base is not None:
            _track(clone.base)
        return clone

    def runs_ops(self, t: torch.Tensor) -> bool:
        """Whether tensors like ``t`` take our ops (kernels; the reference only on request)."""
        return _ops.uses_kernel(t) or (self.reference_on_cpu and t.device.type == "cpu")


_ACTIVE: contextvars.ContextVar[_Patch | None] = contextvars.ContextVar(
    "llmkernels_patch", default=None
)


def _recording(*tensors: torch.Tensor) -> bool:
    """True when autograd would record an op on these tensors (our ops have no backward)."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        return False
    warnings.warn(_GRAD_WARNING, RuntimeWarning, stacklevel=4)
    return True


# ---- rotary: the wrapped apply_rotary_pos_emb ------------------------------------------------------
def _rope_rows(patch: _Patch, cos: torch.Tensor, sin: torch.Tensor, batch: int):
    """transformers' ``cos``/``sin`` ``[Bc, T, D]`` (NeoX: both halves equal) as a
    ``rotary_embedding`` table ``[Bc * T, D]`` (cos half | sin half, fp32) and the row of each
    token ``[batch * T]``. Every layer of a forward gets the same ``cos``/``sin`` tensors: built once."""
    cached = patch.rope_rows
    if cached is not None and cached[0] is cos and cached[1] is sin and cached[2] == batch:
        return cached[3], cached[4]
    half, tokens = cos.shape[-1] // 2, cos.shape[1]
    table = torch.cat((cos[..., :half], sin[..., :half]), dim=-1).to(torch.float32)
    table = table.reshape(-1, cos.shape[-1])
    if cos.shape[0] == batch:
        positions = torch.arange(batch * tokens, device=cos.device)
    else:  # one cos/sin row shared by the batch
        positions = torch.arange(tokens, device=cos.device).repeat(batch)
    patch.rope_rows = (cos, sin, batch, table, positions)
    return table, positions


def _rotate_in_place(patch: _Patch, q, k, cos, sin) -> bool:
    """Rotate q ``[B, Hq, T, D]`` and k ``[B, Hk, T, D]`` (views of ``[B, T, H, D]`` rows, as the
    attention forward makes them) in place with ``ops.rotary_embedding``; False (nothing done)
    when the call is not one the kernel serves."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, cos, sin)) or not patch.runs_ops(q):
        return False
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return False
    batch, q_heads, tokens, head_dim = q.shape
    if (
        k.shape[0] != batch
        or k.shape[2:] != (tokens, head_dim)
        or cos.shape[1:] != (tokens, head_dim)
        or cos.shape[0] not in (1, batch)
        or head_dim % 2
        or q.dtype != k.dtype
        or q.dtype not in _ops.FLOAT_DTYPES
        or not (q.device == k.device == cos.device == sin.device)
    ):
        return False
    q_rows, k_rows = q.transpose(1, 2), k.transpose(1, 2)  # [B, T, H, D]
    if not (q_rows.is_contiguous() and k_rows.is_contiguous()) or _recording(q, k):
        return False
    table, positions = _rope_rows(patch, cos, sin, batch)
    _ops.rotary_embedding(
        positions,
        q_rows.view(batch * tokens, q_heads, head_dim),
        k_rows.view(batch * tokens, k.shape[1], head_dim),
        table,
        is_neox=True,
    )
    patch.used.add("rotary_embedding")
    return True


def _rotary_hook(original):
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if not torch.compiler.is_compiling() and not args and kwargs.get("unsqueeze_dim", 1) == 1:
            patch = _ACTIVE.get()
            if patch is not None and _rotate_in_place(patch, q, k, cos, sin):
                return q, k
        return original(q, k, cos, sin, *args, **kwargs)

    return apply_rotary_pos_emb


# ---- attention: the wrapped "sdpa" AttentionInterface entry ----------------------------------------
def _decode_attention(patch: _Patch, query, key, value, attention_mask, kwargs):
    """``ops.decode_attention`` for a one-token step with no mask, ``[B, 1, Hq, D]``; None when
    the call is not one the kernel serves.

    query ``[B, Hq, 1, D]``; key, value ``[B, Hk, S, D]``: the whole cache, every position valid
    when there is no mask (exactly what SDPA without a mask attends to)."""
    if (
        attention_mask is not None
        or not isinstance(query, torch.Tensor)
        or not patch.runs_ops(query)
        or query.dim() != 4
        or query.shape[2] != 1
        or kwargs.get("dropout", 0.0)
        or kwargs.get("output_attentions")
        or any(kwargs.get(name) is not None for name in _ATTENTION_MODIFIERS)
        or not isinstance(key, torch.Tensor)
        or not isinstance(value, torch.Tensor)
        or key.dim() != 4
        or key.shape != value.shape
        or key.shape[0] != query.shape[0]
        or key.shape[-1] != query.shape[-1]
        or key.shape[2] == 0
        or query.shape[1] % key.shape[1]
        or not (query.dtype == key.dtype == value.dtype)
        or query.dtype not in _ops.FLOAT_DTYPES
        or not (query.device == key.device == value.device)
        or not (key.is_contiguous() and value.is_contiguous())
        or key.data_ptr() % 16  # the kernel's 16-byte vector loads
        or value.data_ptr() % 16
        or not _ops.decode_attention_supported(query[:, :, 0])
    ):
        return None
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        return None
    scaling = kwargs.get("scaling")
    batch, seq = key.shape[0], key.shape[2]
    cached = patch.decode_lens
    if cached is not None and cached[:3] == (batch, seq, key.device):
        seq_lens = cached[3]
    else:
        seq_lens = torch.full((batch,), seq, dtype=torch.int32, device=key.device)
        patch.decode_lens = (batch, seq, key.device, seq_lens)
    out = _ops.decode_attention(query[:, :, 0], key, value, seq_lens, scale=scaling)
    patch.used.add("decode_attention")
    return out.unsqueeze(1)  # [B, 1, Hq, D], the layout attention functions return


def _sdpa_hook(original):
    @functools.wraps(original)
    def sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs):
        if not args and not torch.compiler.is_compiling():
            patch = _ACTIVE.get()
            if patch is not None:
                out = _decode_attention(patch, query, key, value, attention_mask, kwargs)
                if out is not None:
                    return out, None
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    return sdpa_attention_forward


# ---- the hooks installed in transformers while some model is patched ------------------------------
_PATCHED: weakref.WeakSet = weakref.WeakSet()  # base models patched now
_INSTALLED: dict[str, tuple[Any, Any, Any]] = {}  # what -> (where, original, ours)


def _install_sdpa_hook() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    current = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if "sdpa" in _INSTALLED and _INSTALLED["sdpa"][2] is current:
        return
    ours = _sdpa_hook(current)
    AttentionInterface.register("sdpa", ours)
    _INSTALLED["sdpa"] = (AttentionInterface, current, ours)


def _install_rotary_hook(modeling: types.ModuleType) -> None:
    name = f"rotary:{modeling.__name__}"
    current = modeling.apply_rotary_pos_emb
    if name in _INSTALLED and _INSTALLED[name][2] is current:
        return
    ours = _rotary_hook(current)
    modeling.apply_rotary_pos_emb = ours
    _INSTALLED[name] = (modeling, current, ours)


def _track(base: nn.Module) -> None:
    _PATCHED.add(base)
    weakref.finalize(base, _uninstall_hooks_if_unused)


def _uninstall_hooks_if_unused() -> None:
    """Put transformers' functions back once no patched model remains (unpatched or collected)."""
    if not any(_STATE_ATTR in m.__dict__ for m in _PATCHED):
        _uninstall_hooks()


def _uninstall_hooks() -> None:
    """Put transformers' functions back (unless something else replaced ours since)."""
    for what, (where, original, ours) in list(_INSTALLED.items()):
        if what == "sdpa":
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            if ALL_ATTENTION_FUNCTIONS["sdpa"] is ours:
                where.register("sdpa", original)
        elif where.apply_rotary_pos_emb is ours:
            where.apply_rotary_pos_emb = original
        del _INSTALLED[what]


def _rotary_hook_problem(family: _Family) -> str | None:
    """Why the rotary hook cannot work on this transformers (None when it can)."""
    modeling = family.modeling
    current = getattr(modeling, "apply_rotary_pos_emb", None)
    if not callable(current):
        return f"{modeling.__name__} has no apply_rotary_pos_emb"
    params = list(inspect.signature(current).parameters)
    if params[:4] != ["q", "k", "cos", "sin"]:
        return f"apply_rotary_pos_emb takes ({', '.join(params)}), not (q, k, cos, sin, ...)"
    forward = inspect.unwrap(family.cls("Attention").forward)
    if "apply_rotary_pos_emb" not in getattr(forward.__code__, "co_names", ()):
        return f"{family.prefix}Attention.forward no longer calls apply_rotary_pos_emb"
    return None


def _signature_problem(cls: type, expected: list[str]) -> str | None:
    params = list(inspect.signature(inspect.unwrap(cls.forward)).parameters)
    if params != expected:
        return f"{cls.__name__}.forward takes ({', '.join(params)}), not ({', '.join(expected)})"
    return None


# ---- the patched forwards (closures over the original forward and the patch state) -------------
def _rms_norm_forward(original, patch: _Patch, eps_attr: str, unit_offset: bool):
    def forward(self, hidden_states, *args, **kwargs):
        w = self.weight
        if (
            args
            or kwargs
            or torch.compiler.is_compiling()
            or not isinstance(hidden_states, torch.Tensor)
            or not patch.runs_ops(hidden_states)
            or hidden_states.dtype != w.dtype
            or hidden_states.dtype not in _ops.FLOAT_DTYPES
            or hidden_states.device != w.device
            or hidden_states.dim() == 0
            or (hidden_states.stride(-1) != 1 and hidden_states.shape[-1] > 1)
            or _recording(hidden_states, w)
        ):
            return original(self, hidden_states, *args, **kwargs)
        patch.used.add("rms_norm")
        eps = getattr(self, eps_attr)
        x = hidden_states
        if x.dim() == 4 and not x.is_contiguous() and x.transpose(1, 2).is_contiguous():
            # per-head norm of a [B, H, T, D] view of [B, T, H, D] rows (Gemma 3's q/k norm):
            # keep that layout, as transformers' elementwise ops do
            return _ops.rms_norm(x.transpose(1, 2), w, eps, unit_offset=unit_offset).transpose(1, 2)
        return _ops.rms_norm(x, w, eps, unit_offset=unit_offset)

    return forward


def _mlp_forward(original, patch: _Patch, op_name: str):
    def forward(self, x, *args, **kwargs):
        if (
            args
            or kwargs
            or torch.compiler.is_compiling()
            or not isinstance(x, torch.Tensor)
            or not patch.runs_ops(x)
            or (torch.is_grad_enabled() and _recording(x, *self.parameters()))
        ):
            return original(self, x, *args, **kwargs)
        gate_up = torch.cat((self.gate_proj(x), self.up_proj(x)), dim=-1)  # [..., 2I]
        if gate_up.dtype not in _ops.FLOAT_DTYPES or gate_up.device != x.device:
            return original(self, x)
        patch.used.add(op_name)
        return self.down_proj(getattr(_ops, op_name)(gate_up))

    return forward


def _attention_forward(original, patch: _Patch):
    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return original(self, *args, **kwargs)
        token = _ACTIVE.set(patch)
        try:
            return original(self, *args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    return forward


def _unbound(forward, module: nn.Module):
    """``original(self, *args)`` for the forward being replaced. Methods bound to ``module`` are
    unbound, so a deepcopy of a patched model falls back to its own weights, not the source's."""
    if isinstance(forward, types.MethodType) and forward.__self__ is module:
        func = forward.__func__
        return lambda self, *args, **kwargs: func(self, *args, **kwargs)
    return lambda self, *args, **kwargs: forward(*args, **kwargs)


def _override(patch: _Patch, module: nn.Module, make_forward) -> None:
    """Give ``module`` an instance-level forward built from its current one.

    accelerate's hooks (device_map / offloading) keep the real forward in ``_old_forward`` and wrap
    it in ``forward``: patch the inner one so the hooks keep moving tensors between devices.
    """
    attr = (
        "_old_forward"
        if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward")
        else "forward"
    )
    previous = module.__dict__.get(attr, _MISSING)
    forward = make_forward(_unbound(getattr(module, attr), module), patch)
    setattr(module, attr, types.MethodType(forward, module))
    patch.overrides.append((module, attr, previous))


# ---- patch / unpatch ---------------------------------------------------------------------------------
def _mlp_op(config) -> tuple[str, str | None]:
    """(the MLP's op name, None) or (a name, why the MLP keeps transformers' code)."""
    field, act = hf_activation(config)
    if act in _MLP_OPS:
        return _MLP_OPS[act], None
    return "silu_and_mul", f"{field} {act!r} is not one of {', '.join(_MLP_OPS)}"


def _hook_plan(family: _Family, config) -> dict[str, str | None]:
    """What will be patched: part -> None, or why that part keeps transformers' code. The MLP's
    part is named by its op (silu_and_mul or gelu_tanh_and_mul)."""
    mlp_op, mlp_problem = _mlp_op(config)
    return {
        "rms_norm": _signature_problem(family.cls("RMSNorm"), ["self", family.norm_arg]),
        mlp_op: mlp_problem or _signature_problem(family.cls("MLP"), ["self", "x"]),
        "rotary_embedding": _rotary_hook_problem(family),
        "decode_attention": None,
    }


def _apply(
    family: _Family, base: nn.Module, plan: dict[str, str | None], reference_on_cpu: bool
) -> _Patch:
    """Patch ``base`` (a family's base model) for the parts ``plan`` leaves to us."""
    patch = _Patch(family=family.prefix, reference_on_cpu=reference_on_cpu, base=base)
    norm_cls, mlp_cls, attention_cls = (family.cls(s) for s in ("RMSNorm", "MLP", "Attention"))
    mlp_op = _mlp_op(base.config)[0]
    norm_forward = functools.partial(
        _rms_norm_forward, eps_attr=family.norm_eps, unit_offset=family.norm_unit_offset
    )
    mlp_forward = functools.partial(_mlp_forward, op_name=mlp_op)
    for module in base.modules():
        if isinstance(module, norm_cls) and plan["rms_norm"] is None:
            if isinstance(getattr(module, "weight", None), torch.Tensor) and hasattr(
                module, family.norm_eps
            ):
                _override(patch, module, norm_forward)
        elif isinstance(module, mlp_cls) and plan[mlp_op] is None:
            if all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
                _override(patch, module, mlp_forward)
        elif isinstance(module, attention_cls):
            _override(patch, module, _attention_forward)
    _install_sdpa_hook()
    if plan["rotary_embedding"] is None:
        _install_rotary_hook(family.modeling)
    base.__dict__[_STATE_ATTR] = patch
    _track(base)
    return patch


def _remove(base: nn.Module) -> None:
    patch = base.__dict__.pop(_STATE_ATTR, None)
    if patch is None:
        return
    for module, attr, previous in reversed(patch.overrides):
        if previous is _MISSING:
            module.__dict__.pop(attr, None)
        else:
            setattr(module, attr, previous)
    _PATCHED.discard(base)
    _uninstall_hooks_if_unused()


_SELF_CHECKED: set[tuple[str, str]] = set()


def _self_check(family: _Family) -> None:
    """Patched vs unpatched tiny model of this family through ``generate`` (prefill + cached
    decode steps, CPU fp32, our reference ops forced): refuse to patch if they disagree."""
    version = _transformers_version()
    if (family.prefix, version) in _SELF_CHECKED:
        return
    # All of it on the CPU, whatever device context the caller is in (``with
    # torch.device("meta")`` around a model's construction and its patch, say).
    with torch.device("cpu"):
        _run_self_check(family, version)
    _SELF_CHECKED.add((family.prefix, version))


def _run_self_check(family: _Family, version: str) -> None:
    fields = {**_TINY_CONFIG, **dict(family.tiny_config), "attn_implementation": "sdpa"}
    config = family.cls(family.text + "Config")(**fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        theirs = family.cls("ForCausalLM")(config).to(torch.float32).eval()
        with torch.no_grad():  # norm weights away from their init (Gemma's are all zeros)
            for p in theirs.parameters():
                if p.dim() == 1:
                    p.add_(torch.rand_like(p) - 0.5)
    ours = copy.deepcopy(theirs)
    ids = torch.tensor([[5, 17, 33, 8, 61, 12], [40, 3, 77, 29, 9, 50]])
    generation = dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=4,
        min_new_tokens=4,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    plan = _hook_plan(family, config)
    patch = _apply(family, ours.base_model, plan, reference_on_cpu=True)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = theirs.generate(ids, **generation)
            actual = ours.generate(ids, **generation)
    finally:
        _remove(ours)
    expected_logits, actual_logits = torch.stack(expected.logits), torch.stack(actual.logits)
    error = (expected_logits - actual_logits).abs().max().item()
    if not torch.equal(expected.sequences, actual.sequences) or not error <= 1e-4:
        raise RuntimeError(
            f"llmkernels.patch: refusing to patch: on transformers {version}, a patched tiny "
            f"{family.prefix}ForCausalLM does not match transformers' own (max |logit difference| "
            f"{error:.3g} over prefill and cached decode steps). This transformers release changed "
            f"something the patch relies on (tested: {OLDEST_TRANSFORMERS} to "
            f"{NEWEST_TESTED_TRANSFORMERS}); please report it."
        )
    unused = sorted(op for op, why in plan.items() if why is None and op not in patch.used)
    if unused:
        _warn_once(
            f"llmkernels.patch: on transformers {version}, {', '.join(unused)} never ran in the "
            "self-check of a patched tiny model: transformers no longer calls the hooked code the "
            "way the patch expects, so those parts run transformers' own code"
        )


def is_patched(model: nn.Module) -> bool:
    """True if ``model`` (or the base model it is built on) is patched by :func:`patch`."""
    base = getattr(model, "base_model", None) if isinstance(model, nn.Module) else None
    return isinstance(base, nn.Module) and _STATE_ATTR in base.__dict__


def patch(model: nn.Module, *, reference_on_cpu: bool = False) -> nn.Module:
    """Make this model instance run on llmkernels ops; returns the same model.

    ``model``: a transformers model of a supported family (``SUPPORTED_MODEL_TYPES``): its
    ``...ForCausalLM``, its base ``...Model``, or any other head on that base model
    (``...ForSequenceClassification``, ...); anything else raises ``TypeError``. Only this
    instance changes: RMSNorm -> ``ops.rms_norm``; MLP -> gate/up GEMMs + ``ops.silu_and_mul``
    (or ``ops.gelu_tanh_and_mul``);
    rotary -> ``ops.rotary_embedding`` on transformers' own cos/sin; SDPA one-token decode steps
    without a mask -> ``ops.decode_attention`` (see the module docstring for how). The config
    and ``config._attn_implementation`` are untouched. No extra weight memory.

    Where our ops would run the pure-PyTorch reference (CPU tensors), transformers' own code runs
    instead, unless ``reference_on_cpu=True`` (slower; for testing the integration).

    Before touching the model: checks the transformers version (older than
    ``OLDEST_TRANSFORMERS`` raises; newer than ``NEWEST_TESTED_TRANSFORMERS`` warns), the hooked
    names and signatures (a part whose hook point changed keeps transformers' code, with a
    warning naming the change), and runs a patched and an unpatched tiny model of the family
    through ``generate`` once per process; a mismatch raises ``RuntimeError`` naming the version.
    Patching a patched model is a no-op.
    """
    family, base = _family_of(model)
    if _STATE_ATTR in base.__dict__:
        return model
    _check_transformers_version()
    plan = _hook_plan(family, base.config)
    for part, why in plan.items():
        if why is not None:
            _warn_once(
                f"llmkernels.patch: {part} stays on transformers' code for this model "
                f"(transformers {_transformers_version()}: {why})"
            )
    _self_check(family)
    _apply(family, base, plan, reference_on_cpu)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` on this instance; returns the same model.

    Restores every module's previous ``forward`` (removing the instance override, or putting back
    an override that was there before); when no patched model remains, transformers' own
    ``apply_rotary_pos_emb`` and SDPA entry are put back too. Outputs are then bit-identical to a
    never-patched model. Unpatching a model that is not patched is a no-op.
    """
    _, base = _family_of(model)
    _remove(base)
    return model
