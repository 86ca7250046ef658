"""Run a Hugging Face Llama model's own ``forward`` / ``generate`` on llmkernels ops.

    import llmkernels as lk
    model = LlamaForCausalLM.from_pretrained(...)
    lk.patch(model)        # same object, same API: model(ids), model.generate(...)
    lk.unpatch(model)      # back to transformers' code, bit for bit

Only the given instance changes (its modules get instance-level ``forward`` overrides; the Llama
classes and other models are untouched). Hook points, per module of the instance:

- ``LlamaRMSNorm.forward`` -> :func:`llmkernels.ops.rms_norm` (HF semantics already match).
- ``LlamaMLP.forward`` -> ``down(silu_and_mul(cat(gate(x), up(x))))``: gate and up stay separate
  GEMMs (through the model's own Linear modules, so quantized/adapted layers keep working),
  concatenated into ``[..., 2I]`` for :func:`llmkernels.ops.silu_and_mul`. No fused weight is
  built: no extra memory for weights, one extra activation copy of ``tokens x 2I``.
- ``LlamaAttention.forward`` -> the same steps as transformers 5.x's, except the rotary embedding:
  :func:`llmkernels.ops.rotary_embedding` in place on q/k (NeoX layout) with the position ids
  the decoder layer passes (``position_ids``, which ``LlamaModel`` derives when the caller gives
  none) and a table from :func:`llmkernels.ops.rope_cos_sin_cache`. The ``(cos, sin)`` HF passes
  as ``position_embeddings`` is then unused; it is the fallback when the table does not
  reproduce the model's rotary embedding (rope types dynamic, yarn, ...; checked once at patch
  time against transformers' rope parameters for the config and the model's ``inv_freq``).
- Attention itself goes through transformers' ``AttentionInterface``: the function registered as
  ``"llmkernels"`` (``config._attn_implementation`` is set to it while patched) runs
  :func:`llmkernels.ops.decode_attention` for one-token decode steps without a mask, and
  transformers' SDPA function otherwise (prefill, padding masks, static caches, dropout, ...).

Under ``torch.compile`` (e.g. transformers' automatic compilation of static-cache decoding on
CUDA) the patched modules also run transformers' code: the rotary path reads the position range
on the host (one sync per forward), which a compiled graph cannot do.

Inference only: the ops have no backward, so while autograd records (grad mode on and a tensor
that requires grad), every patched module runs transformers' original code instead (with a
warning). Run generation/evaluation under ``torch.inference_mode()`` or ``torch.no_grad()``
(``generate`` already does).

Assumes transformers 5.x (``LlamaAttention.forward(hidden_states, position_embeddings,
attention_mask, past_key_values, **kwargs)``, ``Cache.update(k, v, layer_idx)``, position ids
forwarded to attention as a keyword, ``AttentionInterface`` / ``AttentionMaskInterface``).
"""

from __future__ import annotations

import math
import types
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import ops as _ops

__all__ = ["patch", "unpatch", "is_patched", "ATTENTION_NAME"]

ATTENTION_NAME = "llmkernels"  # the name registered in transformers' AttentionInterface
_STATE_ATTR = "_llmkernels_patch"  # where the patch record lives, on the LlamaModel instance
_MISSING = object()
_INITIAL_ROPE_POSITIONS = 4096  # the table grows on demand (power of two) past this
_GRAD_WARNING = (
    "llmkernels: autograd is recording and the llmkernels ops have no backward, so this patched "
    "Llama module runs transformers' original code. Run inference under torch.inference_mode() "
    "or torch.no_grad() to use the llmkernels ops."
)


def _transformers_llama():
    try:
        import transformers
        from transformers.models.llama import modeling_llama
    except ImportError as exc:  # pragma: no cover - transformers is a dependency of this module
        raise ImportError("llmkernels.patch needs the `transformers` package") from exc
    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise RuntimeError(
            f"llmkernels.patch supports transformers >= 5 (its Llama attention/cache API), "
            f"found {transformers.__version__}"
        )
    return modeling_llama


def _recording(*tensors: torch.Tensor) -> bool:
    """True when autograd would record an op on these tensors (our ops have no backward)."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        return False
    warnings.warn(_GRAD_WARNING, RuntimeWarning, stacklevel=3)
    return True


# ---- attention: the function registered in transformers' AttentionInterface ----------------------
def _can_decode(module, query, key, value, attention_mask, dropout, kwargs) -> bool:
    # query [B, Hq, 1, D]; key, value [B, Hk, S, D] (the whole cache, every position valid when
    # there is no mask: exactly what SDPA without a mask would attend to).
    return (
        query.dim() == 4
        and query.shape[2] == 1
        and attention_mask is None
        and not dropout
        and kwargs.get("softcap") is None
        and kwargs.get("sliding_window") is None
        and kwargs.get("s_aux") is None
        and key.dim() == 4
        and key.shape == value.shape
        and key.shape[0] == query.shape[0]
        and key.shape[-1] == query.shape[-1]
        and key.shape[2] > 0
        and query.shape[1] % key.shape[1] == 0
        and query.dtype == key.dtype == value.dtype
        and query.dtype in _ops.FLOAT_DTYPES
        and key.is_contiguous()
        and value.is_contiguous()
        and _ops.decode_attention_supported(query[:, :, 0])
        and not torch.compiler.is_compiling()
        and not (
            torch.is_grad_enabled()
            and (query.requires_grad or key.requires_grad or value.requires_grad)
        )
    )


def llmkernels_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers ``AttentionInterface`` function ``"llmkernels"``.

    One-token decode step with no mask (every cached position valid):
    ``out[b, 0, h] = softmax(scaling * q[b, h] . K[b, h // G]^T) V[b, h // G]`` through
    :func:`llmkernels.ops.decode_attention` with ``seq_lens[b] = S``. Anything else (prefill,
    padding or static-cache masks, dropout, unsupported dtype/head dim on the kernel) goes to
    transformers' SDPA function with the same arguments.

    query: ``[B, Hq, T, D]``; key, value: ``[B, Hk, S, D]``; attention_mask: ``None`` or a 4-D
    mask from ``sdpa_mask``. Returns ``([B, T, Hq, D], None)`` like transformers' functions.
    """
    if _can_decode(module, query, key, value, attention_mask, dropout, kwargs):
        batch, seq = key.shape[0], key.shape[2]
        seq_lens = torch.full((batch,), seq, dtype=torch.int32, device=key.device)
        out = _ops.decode_attention(query[:, :, 0], key, value, seq_lens, scale=scaling)
        return out.unsqueeze(1), None  # [B, 1, Hq, D]
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def _register_attention() -> None:
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    # The mask must be registered too: for an implementation without a mask function,
    # transformers builds no mask at all (padding would then be silently ignored).
    AttentionInterface.register(ATTENTION_NAME, llmkernels_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


# ---- rotary -----------------------------------------------------------------------------------------
class _RopeTables:
    """``rope_cos_sin_cache`` tables, one per device, grown (power of two) to cover positions."""

    def __init__(self, config, length: int):
        self.config = config
        self.length = length
        self.tables: dict[torch.device, torch.Tensor] = {}
        self._checked: torch.Tensor | None = None  # the last position_ids tensor found in range
        self._checked_ok = False

    def get(self, device: torch.device) -> torch.Tensor:
        table = self.tables.get(device)
        if table is None or table.shape[0] != self.length:
            table = _ops.rope_cos_sin_cache(self.config, max_position=self.length, device=device)
            self.tables[device] = table
        return table

    def covers(self, position_ids: torch.Tensor) -> bool:
        """Grow the tables to cover ``position_ids``; False if some position is negative.

        The same ``position_ids`` tensor reaches every layer of one forward, so its range is
        read (one device sync) once per forward, not per layer.
        """
        if position_ids is self._checked:
            return self._checked_ok
        ok = True
        if position_ids.numel():
            lo, hi = (int(v) for v in torch.aminmax(position_ids))
            ok = lo >= 0
            if hi >= self.length:
                self.length = 1 << math.ceil(math.log2(hi + 1))
        self._checked, self._checked_ok = position_ids, ok
        return ok


def _hf_rope_parameters(rotary: nn.Module, config) -> tuple[torch.Tensor, float]:
    """(inv_freq fp32 [D/2], attention_scaling) as HF's rotary module computes them from config."""
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type == "default":
        init = rotary.compute_default_rope_parameters
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        init = ROPE_INIT_FUNCTIONS[rope_type]
    inv_freq, scaling = init(config)
    return inv_freq.float().cpu(), float(scaling)


def _build_rope(base: nn.Module, config) -> _RopeTables | None:
    """Our RoPE tables if they reproduce HF's rotary embedding for this model, else None.

    Checked against HF's own rope parameters from the config (fp32), and against the model's
    ``inv_freq`` buffer loosely: a model cast with ``.to(bfloat16)`` has that buffer rounded to
    bf16 (HF then rotates with rounded frequencies; our fp32 table is the intended, more exact
    one), but a buffer that differs more was changed on purpose and is respected (None).
    """
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        return None
    max_position = int(getattr(config, "max_position_embeddings", 0) or _INITIAL_ROPE_POSITIONS)
    length = min(max_position, _INITIAL_ROPE_POSITIONS)
    try:
        ours = _ops.rope_cos_sin_cache(config, max_position=length)
        inv_freq, scaling = _hf_rope_parameters(rotary, config)
    except (ValueError, KeyError, TypeError):
        return None  # a rope type the table does not implement (dynamic, yarn, longrope, ...)
    live = getattr(rotary, "inv_freq", None)
    if (
        not isinstance(live, torch.Tensor)
        or live.device.type == "meta"
        or live.shape != inv_freq.shape
    ):
        return None
    if not torch.allclose(live.float().cpu(), inv_freq, rtol=1e-2, atol=0):
        return None
    freqs = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None, :]  # [pos, D/2]
    expected = torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1)
    if ours.shape != expected.shape or not torch.allclose(ours, expected, atol=1e-5, rtol=0):
        return None
    return _RopeTables(config, length)


# ---- the patched forwards (closures over the original forward and the patch state) -------------
def _rms_norm_forward(original):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            hidden_states.dtype != w.dtype
            or hidden_states.dtype not in _ops.FLOAT_DTYPES
            or hidden_states.device != w.device
            or (
                hidden_states.dim()
                and hidden_states.stride(-1) != 1
                and hidden_states.shape[-1] > 1
            )
            or torch.compiler.is_compiling()
            or _recording(hidden_states, w)
        ):
            return original(self, hidden_states)
        return _ops.rms_norm(hidden_states, w, self.variance_epsilon)

    return forward


def _mlp_forward(original):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and _recording(x, *self.parameters())
        ):
            return original(self, x)
        gate_up = torch.cat((self.gate_proj(x), self.up_proj(x)), dim=-1)  # [..., 2I]
        if gate_up.dtype not in _ops.FLOAT_DTYPES:
            return original(self, x)
        return self.down_proj(_ops.silu_and_mul(gate_up))

    return forward


def _attention_forward(_original, rope: _RopeTables | None, llama):
    apply_rotary_pos_emb = llama.apply_rotary_pos_emb
    eager_attention_forward = llama.eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        **kwargs,
    ):
        # Same steps as transformers' LlamaAttention.forward; only the rotary differs (so the
        # original forward is not needed: its fallback is apply_rotary_pos_emb below).
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape)  # [B, T, Hq, D]
        k = self.k_proj(hidden_states).view(hidden_shape)  # [B, T, Hk, D]
        v = self.v_proj(hidden_states).view(hidden_shape)

        position_ids = kwargs.get("position_ids")
        if (
            rope is not None
            and isinstance(position_ids, torch.Tensor)
            and q.dim() == 4
            and q.is_contiguous()
            and k.is_contiguous()
            and q.dtype == k.dtype
            and q.dtype in _ops.FLOAT_DTYPES
            and position_ids.shape[-1] == q.shape[1]
            and position_ids.dim() == 2
            and position_ids.shape[0] in (1, q.shape[0])
            and position_ids.device == q.device
            and not torch.compiler.is_compiling()
            and not _recording(q, k)
            and rope.covers(position_ids)
        ):
            positions = position_ids.expand(q.shape[0], -1).reshape(-1)  # [B*T]
            q_rows, k_rows = q.view(-1, q.shape[2], q.shape[3]), k.view(-1, k.shape[2], k.shape[3])
            _ops.rotary_embedding(positions, q_rows, k_rows, rope.get(q.device), is_neox=True)
            query_states, key_states = q.transpose(1, 2), k.transpose(1, 2)
        else:
            cos, sin = position_embeddings
            query_states, key_states = apply_rotary_pos_emb(
                q.transpose(1, 2), k.transpose(1, 2), cos, sin
            )
        value_states = v.transpose(1, 2)

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(
                key_states, value_states, self.layer_idx
            )

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights

    return forward


# ---- patch / unpatch ---------------------------------------------------------------------------------
@dataclass
class _PatchRecord:
    config: Any
    attn_implementation: Any
    # (module, attribute, the module's own previous value or _MISSING)
    overrides: list[tuple[nn.Module, str, Any]] = field(default_factory=list)


def _base_model(model: nn.Module, llama) -> nn.Module:
    if isinstance(model, llama.LlamaForCausalLM):
        return model.model
    if isinstance(model, llama.LlamaModel):
        return model
    raise TypeError(
        "llmkernels.patch supports transformers LlamaForCausalLM and LlamaModel instances, "
        f"got {type(model).__module__}.{type(model).__qualname__}"
    )


def _unbound(forward, module: nn.Module):
    """``original(self, *args)`` for the forward being replaced. Methods bound to ``module`` are
    unbound, so a deepcopy of a patched model falls back to its own weights, not the source's."""
    if isinstance(forward, types.MethodType) and forward.__self__ is module:
        func = forward.__func__
        return lambda self, *args, **kwargs: func(self, *args, **kwargs)
    return lambda self, *args, **kwargs: forward(*args, **kwargs)


def _override(record: _PatchRecord, module: nn.Module, make_forward) -> None:
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
    setattr(
        module,
        attr,
        types.MethodType(make_forward(_unbound(getattr(module, attr), module)), module),
    )
    record.overrides.append((module, attr, previous))


def is_patched(model: nn.Module) -> bool:
    """True if ``model`` (a LlamaForCausalLM or LlamaModel) is patched by :func:`patch`."""
    llama = _transformers_llama()
    return _STATE_ATTR in _base_model(model, llama).__dict__


def patch(model: nn.Module) -> nn.Module:
    """Make this Llama model instance run on llmkernels ops; returns the same model.

    ``model``: a transformers ``LlamaForCausalLM`` or ``LlamaModel`` (anything else raises
    ``TypeError``). Patches only this instance: RMSNorm -> ``ops.rms_norm``; MLP -> gate/up GEMMs
    + ``ops.silu_and_mul``; rotary -> ``ops.rotary_embedding`` (when our RoPE table matches HF's
    rotary module for this config, else HF's rotary is kept, with a warning); attention -> the
    ``"llmkernels"`` AttentionInterface function (``ops.decode_attention`` for mask-free one-token
    decode steps, SDPA otherwise), set as ``config._attn_implementation``. Patching a patched
    model is a no-op. No extra weight memory; a fp32 RoPE table of ``positions x head_dim`` per
    device (4096 positions to start, grown as needed). The config object is shared by everything
    built from it: a model sharing it also uses the ``"llmkernels"`` attention (same results as
    SDPA).
    """
    llama = _transformers_llama()
    base = _base_model(model, llama)
    if _STATE_ATTR in base.__dict__:
        return model
    _register_attention()
    config = base.config
    rope = _build_rope(base, config)
    if rope is None:
        rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
        warnings.warn(
            f"llmkernels.patch: llmkernels.rope_cos_sin_cache does not reproduce this model's "
            f"rotary embedding (rope type {rope_type!r}); the rotary embedding stays on "
            "transformers' code (RMSNorm, MLP and attention are still patched)",
            RuntimeWarning,
            stacklevel=2,
        )
    record = _PatchRecord(config, config._attn_implementation)
    swiglu = getattr(config, "hidden_act", "silu") in ("silu", "swish")
    for module in base.modules():
        if isinstance(module, llama.LlamaRMSNorm):
            _override(record, module, _rms_norm_forward)
        elif isinstance(module, llama.LlamaMLP) and swiglu:
            _override(record, module, _mlp_forward)
        elif isinstance(module, llama.LlamaAttention):
            _override(record, module, lambda original: _attention_forward(original, rope, llama))
    config._attn_implementation = ATTENTION_NAME
    base.__dict__[_STATE_ATTR] = record
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` on this instance; returns the same model.

    Restores every module's previous ``forward`` (removing the instance override, or putting back
    an override that was there before) and ``config._attn_implementation`` (unless it was changed
    since patching). Outputs are then bit-identical to a never-patched model. Unpatching a model
    that is not patched is a no-op.
    """
    llama = _transformers_llama()
    base = _base_model(model, llama)
    record = base.__dict__.pop(_STATE_ATTR, None)
    if record is None:
        return model
    for module, attr, previous in reversed(record.overrides):
        if previous is _MISSING:
            module.__dict__.pop(attr, None)
        else:
            setattr(module, attr, previous)
    if record.config._attn_implementation == ATTENTION_NAME:
        record.config._attn_implementation = record.attn_implementation
    return model
