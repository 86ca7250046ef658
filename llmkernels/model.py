"""One decoder forward pass on llmkernels ops for the Llama family and its relatives (Mistral,
Qwen2, Qwen3, Gemma 3: a few ModelConfig fields), with fused QKV and gate/up weights and a static
KV cache.

Per layer (vLLM-style residual stream, the residual add fused into the next norm)::

    x, residual = fused_add_rms_norm(x, residual)        # residual += x; x = rms_norm(residual)
    qkv = x @ Wqkv^T (+ bqkv)                            # one GEMM, Wqkv [(Hq + 2 Hk) * D, hidden]
    q, k = rms_norm(q), rms_norm(k)                      # per head (Qwen3, Gemma 3: q/k norm)
    rotary_embedding(q, k)                               # in place on strided views of qkv
                                                         # (CUDA + q/k norm: one qk_norm_rotary)
    kv_cache_append(k, v)                                # into k_cache/v_cache at slot_mapping
    a = attention(q, cache)                              # SDPA (prefill) or decode_attention,
                                                         # over the last W tokens in windowed layers
    x = a @ Wo^T
    x = rms_norm(x)                                      # post-norm (Gemma 3 only)
    x, residual = fused_add_rms_norm(x, residual)
    x = act_and_mul(x @ Wgate_up^T) @ Wdown^T            # Wgate_up [2 I, hidden]; SwiGLU or GeGLU
    x = rms_norm(x)                                      # post-norm (Gemma 3 only)

Gemma 3 also scales the embedding by sqrt(hidden), scales every norm by ``1 + w`` (in fp32),
uses a RoPE table per layer type, and scales queries by ``query_pre_attn_scalar ** -0.5``.

Cache layout: ``k_cache, v_cache [layers, max_batch, Hk, max_seq, D]``. Row b holds its sequence's
*real* tokens compactly from slot 0 (the token at position p lives in slot p; left padding is never
stored: pad tokens get slot -1 and are skipped), so ``cache_lens[b]`` (int32, on the device) is
the exact ``seq_lens`` that :func:`llmkernels.decode_attention` needs. The decode path reads and
advances ``cache_lens`` on the device, so one CUDA graph can replay it for every token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from . import ops
from .cpu import first_is_faster
from .packed_gemm import PackedWeight, packable, use_packs
from .quant import PROJECTIONS, QuantizedWeight
from .reference import rope_parameters

__all__ = ["ModelConfig", "Transformer", "linear", "SUPPORTED_MODEL_TYPES", "SUPPORTED_ROPE_TYPES"]

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# model_type -> the architecture fields its family sets (everything else is read alike).
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},  # sliding_window: every layer
    "qwen2": {"qkv_bias": True},  # q/k/v projections with bias (o_proj without)
    "qwen3": {"qk_norm": True},  # RMSNorm of each q and k head before the rotary
    # (1 + w) norms, post-norms, scaled embedding; GeGLU and per-layer RoPE come from the config
    "gemma3_text": {
        "qk_norm": True,
        "norm_unit_offset": True,
        "post_norms": True,
        "scale_embedding": True,
    },
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
# HF activation name -> the gated activation op ("silu" -> ops.silu_and_mul, "gelu_tanh" ->
# ops.gelu_tanh_and_mul); HF's gelu_pytorch_tanh is F.gelu(approximate="tanh") exactly.
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    return default if value is None else value


def hf_activation(config: Any) -> tuple[str, str]:
    """(the config field, its value) naming an HF config's MLP activation: Gemma's
    ``hidden_activation`` when set (its ``hidden_act`` is a legacy field), else ``hidden_act``
    (default "silu")."""
    field = "hidden_activation" if _get(config, "hidden_activation") else "hidden_act"
    return field, _get(config, field, "silu")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture numbers the engine needs, read from an HF config object or a
    ``config.json`` dict by :meth:`from_hf` (which rejects what the engine cannot run)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int  # positions served: with YaRN up to original x factor
    tie_word_embeddings: bool
    rope: dict = field(default_factory=dict)  # reference.rope_parameters(config)
    model_type: str = "llama"
    qkv_bias: bool = False  # a bias on the fused QKV projection (Qwen2)
    qk_norm: bool = False  # RMSNorm over head_dim of every q and k head, before the rotary (Qwen3)
    layer_windows: tuple[int, ...] = ()  # per layer: 0 full attention, W > 0 the last W tokens
    activation: str = "silu"  # gated MLP activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    norm_unit_offset: bool = False  # every RMSNorm scales by (1 + w), in fp32 (Gemma)
    post_norms: bool = False  # RMSNorm of each sub-layer's output before the residual add (Gemma)
    scale_embedding: bool = False  # embedding * sqrt(hidden), rounded to the dtype (Gemma)
    attn_scale: float | None = None  # softmax scale; None: head_dim ** -0.5
    final_logit_softcap: float | None = None  # logits = cap * tanh(logits / cap) when set
    sliding_rope: dict = field(default_factory=dict)  # sliding layers' RoPE if not `rope` (Gemma 3)

    def window(self, layer: int) -> int | None:
        """Layer ``layer``'s sliding window (tokens attended, itself included), None when full."""
        return (self.layer_windows[layer] if self.layer_windows else 0) or None

    @property
    def qkv_size(self) -> int:
        """Rows of the fused QKV weight: ``(Hq + 2 Hk) * D``."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def rope_config(self, sliding: bool = False) -> dict:
        """A config dict that :func:`llmkernels.rope_cos_sin_cache` reads as this model's RoPE
        (of its sliding-window layers when ``sliding`` and they have their own)."""
        return {
            "rope_parameters": dict(
                self.sliding_rope if sliding and self.sliding_rope else self.rope
            ),
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
        }

    @classmethod
    def from_hf(cls, config: Any) -> ModelConfig:
        """Build from an HF config object (``LlamaConfig``, ``Qwen3Config``, ...) or a
        ``config.json`` dict.

        Families (``FAMILIES``): llama, mistral (sliding window on every layer), qwen2 (q/k/v
        bias; sliding windows from ``use_sliding_window`` / ``max_window_layers`` /
        ``layer_types``), qwen3 (q/k norm; windows alike), gemma3_text (Gemma 3's text model:
        ``(1 + w)`` norms, post-norms, scaled embedding, GeGLU, sliding layers with their own
        RoPE, ``query_pre_attn_scalar``, ``final_logit_softcapping``). Raises ``ValueError``
        naming the field for anything the engine does not implement: another ``model_type``
        (MoE, ...), an activation other than silu / gelu_pytorch_tanh, ``attention_bias`` /
        ``mlp_bias`` (biases other than Qwen2's q/k/v), layer types other than full / sliding
        attention, a partial rotary factor, a RoPE type other than default / linear / llama3 / yarn,
        attention logit soft-capping, bidirectional attention, or a quantized checkpoint.
        """
        model_type = _get(config, "model_type", "llama")
        if model_type not in FAMILIES:
            raise ValueError(
                f"config.model_type={model_type!r} is not supported: the engine runs the "
                f"families {', '.join(FAMILIES)}"
            )
        act_field, act = hf_activation(config)
        if act not in ACTIVATIONS:
            raise ValueError(
                f"config.{act_field}={act!r} is not supported (supported: "
                f"{', '.join(ACTIVATIONS)}: SwiGLU / GeGLU MLPs)"
            )
        for name in ("attn_logit_softcapping", "use_bidirectional_attention"):
            if _get(config, name, None):
                raise ValueError(f"config.{name}={_get(config, name)!r} is not supported")
        for name in ("attention_bias", "mlp_bias"):
            if _get(config, name, False):
                raise ValueError(
                    f"config.{name}=True is not supported (projection biases: only Qwen2's q/k/v)"
                )
        quant = _get(config, "quantization_config", None)
        if quant:
            method = quant.get("quant_method") if isinstance(quant, Mapping) else quant
            raise ValueError(
                f"config.quantization_config (quant_method={method!r}) is not supported: load an "
                "unquantized fp32/fp16/bf16 checkpoint"
            )
        rope = rope_parameters(config)
        sliding_rope = rope_parameters(config, "sliding_attention")
        for params in (rope, sliding_rope):
            if params["rope_type"] not in SUPPORTED_ROPE_TYPES:
                raise ValueError(
                    f"config rope type {params['rope_type']!r} (rope_parameters / rope_scaling) is "
                    f"not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
                )
            if params["rotary_dim"] != params["head_dim"]:
                raise ValueError(
                    "config.partial_rotary_factor != 1 is not supported (Llama rotates the whole "
                    "head)"
                )
            if params["rope_type"] != "default" and params.get("factor") is None:
                raise ValueError(
                    f"config rope type {params['rope_type']!r} needs a scaling 'factor'"
                )
        heads = int(_get(config, "num_attention_heads"))
        kv_heads = int(_get(config, "num_key_value_heads", heads))
        if heads % kv_heads:
            raise ValueError(
                f"config.num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
            )
        num_layers = int(_get(config, "num_hidden_layers"))
        layer_windows = _layer_windows(config, model_type, num_layers)
        query_scalar = _get(config, "query_pre_attn_scalar", None)
        softcap = _get(config, "final_logit_softcapping", None)
        return cls(
            **FAMILIES[model_type],
            layer_windows=layer_windows,
            activation=ACTIVATIONS[act],
            attn_scale=float(query_scalar) ** -0.5 if query_scalar else None,
            final_logit_softcap=float(softcap) if softcap else None,
            sliding_rope=sliding_rope if layer_windows and sliding_rope != rope else {},
            vocab_size=int(_get(config, "vocab_size")),
            hidden_size=int(_get(config, "hidden_size")),
            intermediate_size=int(_get(config, "intermediate_size")),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(rope["head_dim"]),
            rms_norm_eps=float(_get(config, "rms_norm_eps", 1e-6)),
            max_position_embeddings=_max_positions(config, rope),
            tie_word_embeddings=bool(_get(config, "tie_word_embeddings", False)),
            rope=rope,
            model_type=model_type,
        )


def _max_positions(config: Any, rope: dict) -> int:
    """The positions the model serves: ``max_position_embeddings``, or with YaRN the context it
    was set for, ``original_max_position_embeddings * factor``, when that is longer (Qwen's
    recipe keeps the pre-training length in max_position_embeddings; vLLM derives it so too)."""
    positions = int(_get(config, "max_position_embeddings", 2048))
    if rope["rope_type"] == "yarn":
        positions = max(positions, int(rope["original_max_position_embeddings"] * rope["factor"]))
    return positions


def _layer_windows(config: Any, model_type: str, num_layers: int) -> tuple[int, ...]:
    """Per-layer sliding windows as transformers applies them (0 = full attention; () when no
    layer has one). Mistral: ``sliding_window`` on every layer. Qwen2/3: only with
    ``use_sliding_window``, on the layers from ``max_window_layers`` on; ``layer_types`` (which
    transformers derives the same way) wins when the config lists it."""
    window = _get(config, "sliding_window", None)
    if model_type in ("qwen2", "qwen3") and not _get(config, "use_sliding_window", False):
        window = None
    layer_types = _get(config, "layer_types", None)
    pattern = _get(config, "sliding_window_pattern", None)  # v4 Gemma 3 config.json
    if layer_types is None and model_type == "gemma3_text" and pattern:
        layer_types = [
            "full_attention" if (i + 1) % int(pattern) == 0 else "sliding_attention"
            for i in range(num_layers)
        ]
    if layer_types is not None:
        unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise ValueError(
                f"config.layer_types has {unknown}: only full_attention and sliding_attention "
                "layers are supported"
            )
        if len(layer_types) != num_layers:
            raise ValueError(
                f"config.layer_types lists {len(layer_types)} layers, num_hidden_layers is {num_layers}"
            )
    if window is None:
        return ()
    window = int(window)
    if window < 1:
        raise ValueError(f"config.sliding_window must be a positive int, got {window}")
    if layer_types is not None:
        windows = [window if t == "sliding_attention" else 0 for t in layer_types]
    elif model_type == "mistral":
        windows = [window] * num_layers
    else:
        first = int(_get(config, "max_window_layers", num_layers))
        windows = [window if i >= first else 0 for i in range(num_layers)]
    return tuple(windows) if any(windows) else ()


# At most this many rows may take the blocked CPU GEMV in linear() (measured: from 8 rows on, MKL's
# own threaded GEMM is as fast or faster).
CPU_GEMV_MAX_ROWS = 4
# (out, in, rows, dtype, threads) -> whether the blocked GEMV beat F.linear when linear() timed both
_BLOCKED_GEMV_FASTER: dict[tuple, bool] = {}


# The projections the engine stores input-major on CPU in fp32 (see input_major_weights): all
# of each layer's, the ones quantization replaces too.
INPUT_MAJOR_PROJECTIONS = PROJECTIONS


def _projection_names(num_layers: int) -> list[str]:
    """The weight names of every layer's GEMM projections (``INPUT_MAJOR_PROJECTIONS``)."""
    return [f"layers.{i}.{name}" for i in range(num_layers) for name in INPUT_MAJOR_PROJECTIONS]


def _input_major(w) -> bool:
    """Whether ``w`` is a weight :func:`input_major_weights` re-lays out: a contiguous fp32
    CPU tensor (not a quantized stand-in, not another dtype or device)."""
    return (
        isinstance(w, torch.Tensor)
        and w.device.type == "cpu"
        and w.dtype == torch.float32
        and w.is_contiguous()
    )


def input_major_weights(
    weights: Mapping[str, torch.Tensor], num_layers: int
) -> dict[str, torch.Tensor]:
    """``weights`` with each layer's projections (``INPUT_MAJOR_PROJECTIONS``) and the LM head
    re-laid out input-major when they are fp32 CPU tensors: the same ``[out, in]`` values, stored
    as the transpose of a contiguous ``[in, out]`` matrix (a copy; others are passed through).
    The CPU layout where oneDNN packs are not used (:func:`cpu_gemm_weights`).
    A tied model's embedding is the LM head, so it is re-laid out too and its lookup gathers
    columns (2048 tokens: 5.7 ms instead of 0.2, next to seconds of prefill).

    ``F.linear`` then runs MKL's plain ``x @ W^T`` GEMM on that ``[in, out]`` matrix instead of its
    transposed-B GEMM, which is slow for a few rows. Measured on a 2-core AVX-512 host,
    SmolLM2-135M:

    - projections, decode step in ms, row-major vs input-major: batch 1 30.0 / 29.5, 4: 52.4 /
      46.3, 8: 67.5 / 62.9, 16: 69.2 / 67.7, 32: 88.7 / 85.0;
    - then the 49152-row LM head too: batch 1 30.9 / 30.8, 8: 64.5 / 58.3; a speculative
      verify forward of 4 tokens 45.1 / 41.5, of 8: 60.5 / 53.8, of 11: 67.8 / 59.0.

    bf16 measured no faster, so it keeps its layout.
    """
    out = dict(weights)
    names = _projection_names(num_layers)
    names.append("lm_head" if "lm_head" in out else "embed")  # a quantized head: skipped below
    for key in names:
        if _input_major(out[key]):
            out[key] = out[key].t().contiguous().t()
    return out


def packed_weights(
    weights: Mapping[str, torch.Tensor], num_layers: int
) -> dict[str, torch.Tensor | PackedWeight]:
    """``weights`` with each layer's projections and the LM head replaced by oneDNN packs
    (:class:`llmkernels.packed_gemm.PackedWeight`) where they are fp32 / bf16 CPU tensors; others
    (quantized, CUDA) are passed through. A tied model's LM head becomes a pack of its embedding
    under ``"lm_head"`` (one more copy of that matrix), the embedding staying a plain table for
    the lookup. The packs replace the tensors: a caller that keeps no other reference to them
    frees them."""
    out = dict(weights)
    for key in _projection_names(num_layers):
        if packable(out[key]):
            out[key] = PackedWeight(out[key])
    head = out.get("lm_head", out["embed"])
    if packable(head):
        out["lm_head"] = PackedWeight(head)
    return out


def cpu_gemm_weights(
    weights: Mapping[str, torch.Tensor], num_layers: int, allow_packs: bool
) -> dict[str, torch.Tensor | PackedWeight]:
    """The layout the GEMM weights run in on CPU: oneDNN packs (:func:`packed_weights`) when
    ``allow_packs`` and :func:`llmkernels.packed_gemm.use_packs` says so for the shapes of the
    first layer's packable projections (or the LM head's, when the projections are quantized),
    else fp32 input-major (:func:`input_major_weights`; other dtypes as given). Quantized
    weights and weights on other devices pass through either way."""
    if allow_packs:
        first = [weights.get(f"layers.0.{name}") for name in PROJECTIONS]
        timed = [w for w in first if packable(w)] or [weights.get("lm_head", weights["embed"])]
        if packable(timed[0]) and use_packs([tuple(w.shape) for w in timed], timed[0].dtype):
            return packed_weights(weights, num_layers)
    return input_major_weights(weights, num_layers)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor | QuantizedWeight | PackedWeight,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ weight^T + bias``: x ``[N, in]``, weight ``[out, in]`` (or a stand-in: quantized,
    :class:`llmkernels.quant.QuantizedWeight`, or packed for oneDNN,
    :class:`llmkernels.packed_gemm.PackedWeight`), bias ``[out]`` or None → ``[N, out]``.

    On CPU with at most ``CPU_GEMV_MAX_ROWS`` rows (decode), some BLAS builds run the GEMV on one
    thread at a third of the memory bandwidth (measured on one 2-core AVX-512 host: 9-15 GB/s),
    while splitting the weight's rows into equal blocks computed by one ``bmm`` spreads it over
    all threads (24-28 GB/s there); on other hosts F.linear itself is threaded and twice as fast
    as the blocks (28-53 GB/s vs 10-25). So the first call of each shape times both and keeps the
    faster (see ``_blocked_gemv_faster``). Results match ``F.linear`` to float rounding. An
    input-major weight (:func:`input_major_weights`) goes to ``F.linear`` directly.
    """
    if isinstance(weight, PackedWeight):
        return weight.linear(x, bias)
    if isinstance(weight, QuantizedWeight):
        y = weight.matmul(x)
        return y if bias is None else y.add_(bias)
    rows = x.shape[0]
    if (
        torch.compiler.is_compiling()  # first: a test of the row count would guard on it
        or x.device.type != "cpu"
        or rows > CPU_GEMV_MAX_ROWS
        or not weight.is_contiguous()
    ):
        return F.linear(x, weight, bias)
    blocks = math.gcd(weight.shape[0], 4 * torch.get_num_threads())  # a few per thread
    if blocks == 1 or not _blocked_gemv_faster(x, weight, blocks):
        return F.linear(x, weight, bias)
    y = _blocked_gemv(x, weight, blocks)
    return y if bias is None else y.add_(bias)


def _blocked_gemv(x: torch.Tensor, weight: torch.Tensor, blocks: int) -> torch.Tensor:
    """``x @ weight^T`` as one ``bmm`` over ``blocks`` equal row blocks of the weight."""
    rows = x.shape[0]
    out_features, in_features = weight.shape
    y = torch.bmm(
        weight.view(blocks, out_features // blocks, in_features),
        x.t().expand(blocks, in_features, rows),
    ).view(out_features, rows)  # [out, N]
    # a [1, out] result gets its natural strides (a transposed view would confuse the next GEMV)
    return y.view(1, out_features) if rows == 1 else y.t().contiguous()


def _blocked_gemv_faster(x: torch.Tensor, weight: torch.Tensor, blocks: int) -> bool:
    """Whether the blocked GEMV beats F.linear for this shape here: timed once per (shape, rows,
    dtype, threads), best of 3 after a warm-up each, and chosen only when >= 10% faster (these
    shared hosts are noisy; F.linear is the default)."""
    key = (*weight.shape, x.shape[0], weight.dtype, torch.get_num_threads())
    faster = _BLOCKED_GEMV_FASTER.get(key)
    if faster is None:
        faster = first_is_faster(
            lambda: _blocked_gemv(x, weight, blocks), lambda: F.linear(x, weight)
        )
        _BLOCKED_GEMV_FASTER[key] = faster
    return faster


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """SDPA with grouped KV heads: q ``[B, Hq, T, D]``, k, v ``[B, Hk, L, D]``, mask ``[B, 1, T, L]``
    bool (True = attend) or None → ``[B, Hq, T, D]``; scale: of the scores (None: ``D ** -0.5``).

    CUDA's fused SDPA kernels take grouped heads (``enable_gqa``) only without a mask (flash); a
    masked grouped call falls back to the math backend, which materializes fp32 scores ``[B, Hq,
    T, L]``. So with a mask on CUDA the KV heads are repeated first, as transformers does, and the
    memory-efficient kernel runs. CPU's flash kernel takes both (and is faster without the copy).
    """
    if mask is not None and q.is_cuda and q.shape[1] != k.shape[1]:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
    )


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[Hq D, H] + [Hk D, H] + [Hk D, H] -> [(Hq + 2 Hk) D, H]`` (a new tensor)."""
    return torch.cat([q, k, v], dim=0)


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``[I, H] + [I, H] -> [2 I, H]``: gate rows first, as :func:`silu_and_mul` expects."""
    return torch.cat([gate, up], dim=0)


def weight_names(config: ModelConfig) -> list[str]:
    """Names of the fused-layout weights :class:`Transformer` takes (lm_head only when untied)."""
    return list(expected_shapes(config))


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    c = config
    shapes = {"embed": (c.vocab_size, c.hidden_size), "norm": (c.hidden_size,)}
    for i in range(c.num_layers):
        shapes.update(
            {
                f"layers.{i}.attn_norm": (c.hidden_size,),
                f"layers.{i}.wqkv": (c.qkv_size, c.hidden_size),
                f"layers.{i}.wo": (c.hidden_size, c.num_heads * c.head_dim),
                f"layers.{i}.mlp_norm": (c.hidden_size,),
                f"layers.{i}.w_gate_up": (2 * c.intermediate_size, c.hidden_size),
                f"layers.{i}.w_down": (c.hidden_size, c.intermediate_size),
            }
        )
        if c.qkv_bias:
            shapes[f"layers.{i}.bqkv"] = (c.qkv_size,)
        if c.qk_norm:
            shapes[f"layers.{i}.q_norm"] = shapes[f"layers.{i}.k_norm"] = (c.head_dim,)
        if c.post_norms:
            shapes[f"layers.{i}.post_attn_norm"] = (c.hidden_size,)
            shapes[f"layers.{i}.post_mlp_norm"] = (c.hidden_size,)
    if not c.tie_word_embeddings:
        shapes["lm_head"] = (c.vocab_size, c.hidden_size)
    return shapes


class Layer:
    """One decoder layer's weights (plain tensors: nothing here is trained)."""

    def __init__(self, weights: Mapping[str, torch.Tensor], prefix: str):
        self.attn_norm = weights[f"{prefix}.attn_norm"]  # [hidden]
        self.wqkv = weights[f"{prefix}.wqkv"]  # [(Hq + 2 Hk) * D, hidden]
        self.wo = weights[f"{prefix}.wo"]  # [hidden, Hq * D]
        self.mlp_norm = weights[f"{prefix}.mlp_norm"]  # [hidden]
        self.w_gate_up = weights[f"{prefix}.w_gate_up"]  # [2 * I, hidden]
        self.w_down = weights[f"{prefix}.w_down"]  # [hidden, I]
        self.bqkv = weights.get(f"{prefix}.bqkv")  # [(Hq + 2 Hk) * D] or None (Qwen2)
        self.q_norm = weights.get(f"{prefix}.q_norm")  # [D] or None (Qwen3)
        self.k_norm = weights.get(f"{prefix}.k_norm")  # [D] or None
        self.post_attn_norm = weights.get(f"{prefix}.post_attn_norm")  # [hidden] or None (Gemma)
        self.post_mlp_norm = weights.get(f"{prefix}.post_mlp_norm")  # [hidden] or None (Gemma)


class Transformer:
    """The decoder on llmkernels ops with a static KV cache.

    Parameters
    ----------
    config:
        The model's :class:`ModelConfig`.
    weights:
        Fused-layout tensors named as :func:`weight_names` (all on one device, one dtype); they are
        used as given (not copied). Build it on its final device: it is not an ``nn.Module`` and
        has no ``.to()``.
    max_batch_size, max_seq_len:
        Cache capacity: ``k_cache, v_cache [layers, max_batch_size, Hk, max_seq_len, D]`` in the
        weights' dtype (zero-initialized). ``max_seq_len <= max_position_embeddings``.
    tensor_parallel:
        This rank's :class:`llmkernels.parallel.TensorParallel` when ``config`` and ``weights``
        are one rank's shard (:func:`llmkernels.parallel.shard_weights`): the partial outputs of
        the O and down projections are then summed over the ranks. None: one process.
    """

    def __init__(
        self,
        config: ModelConfig,
        weights: Mapping[str, torch.Tensor],
        max_batch_size: int,
        max_seq_len: int,
        tensor_parallel=None,
    ):
        self.tensor_parallel = tensor_parallel
        shapes = expected_shapes(config)
        missing = [n for n in shapes if n not in weights]
        if missing:
            raise ValueError(f"missing weights: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        embed = weights["embed"]
        self.device, self.dtype = embed.device, embed.dtype
        for name, shape in shapes.items():
            t = weights[name]
            if tuple(t.shape) != shape:
                raise ValueError(f"weight {name} has shape {tuple(t.shape)}, expected {shape}")
            quantized = isinstance(t, QuantizedWeight)  # serves activations of any dtype
            if t.device != self.device or (not quantized and t.dtype != self.dtype):
                raise ValueError(
                    f"weight {name} is {'quantized' if quantized else t.dtype} on {t.device}; "
                    f"all weights must be {self.dtype} on {self.device}"
                )
        if not 1 <= max_seq_len <= config.max_position_embeddings:
            raise ValueError(
                f"max_seq_len must be in [1, max_position_embeddings={config.max_position_embeddings}], "
                f"got {max_seq_len}"
            )
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.config = config
        self.max_batch_size, self.max_seq_len = int(max_batch_size), int(max_seq_len)
        self.embed = embed  # [V, hidden]
        self.norm = weights["norm"]  # [hidden]
        # [V, hidden]: a tied model's embedding, unless a quantized copy was given
        self.lm_head = weights.get("lm_head", embed)
        self.layers = [Layer(weights, f"layers.{i}") for i in range(config.num_layers)]
        c, dev = config, self.device
        cache_shape = (c.num_layers, max_batch_size, c.num_kv_heads, max_seq_len, c.head_dim)
        # K/V caches [layers, max_batch, Hk, max_seq, D]. Zeros, not empty: a padded query may
        # look at slot 0 of a row that was never written.
        self.k_cache = torch.zeros(cache_shape, dtype=self.dtype, device=dev)
        self.v_cache = torch.zeros(cache_shape, dtype=self.dtype, device=dev)
        # [max_batch] int32: tokens stored per cache row; read and advanced on the device by decode()
        self.cache_lens = torch.zeros(max_batch_size, dtype=torch.int32, device=dev)
        # [max_batch] int64: first slot of each row in the flattened [B * S] slot space
        self.row_base = torch.arange(max_batch_size, device=dev, dtype=torch.int64) * max_seq_len
        # [max_seq, D] fp32: cos | sin; per layer, the sliding layers' own table where they have one
        self.cos_sin = ops.rope_cos_sin_cache(c.rope_config(), max_seq_len, dev)
        sliding_cos_sin = self.cos_sin
        if c.sliding_rope:
            sliding_cos_sin = ops.rope_cos_sin_cache(c.rope_config(sliding=True), max_seq_len, dev)
        self.layer_cos_sin = [
            sliding_cos_sin if c.window(i) else self.cos_sin for i in range(c.num_layers)
        ]
        # a 0-dim tensor in the model dtype, as HF rounds sqrt(hidden) before multiplying (Gemma)
        self.embed_scale = (
            torch.tensor(c.hidden_size**0.5).to(device=dev, dtype=self.dtype)
            if c.scale_embedding
            else None
        )
        self.attn_scale = c.attn_scale if c.attn_scale is not None else c.head_dim**-0.5
        self._workspaces: dict[int, torch.Tensor] = {}
        self.decode_kernel = self._decode_attention_supported()

    # ---- bookkeeping --------------------------------------------------------------------------
    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor the model holds: weights (a quantized one's codes, scales and kernel
        layouts), caches, lengths and tables; the shapes of all of them are fixed."""
        found: dict[int, torch.Tensor] = {}

        def visit(value) -> None:
            if isinstance(value, torch.Tensor):
                found.setdefault(id(value), value)
                if value._base is not None:  # a view's storage owner (the norms share one)
                    visit(value._base)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    visit(item)
            elif isinstance(value, (Layer, QuantizedWeight, PackedWeight)):
                for item in vars(value).values():
                    visit(item)

        for value in vars(self).values():
            visit(value)
        return list(found.values())

    def weight_tensors(self) -> list[torch.Tensor]:
        """Every weight tensor the model reads (the tied lm_head counted once when shared;
        a quantized weight as its codes, scales and zeros; a packed one as its pack)."""
        weights = [self.embed, self.norm]
        if self.lm_head is not self.embed:
            weights.append(self.lm_head)
        for layer in self.layers:
            weights += [
                layer.attn_norm,
                layer.wqkv,
                layer.wo,
                layer.mlp_norm,
                layer.w_gate_up,
                layer.w_down,
            ]
            optional = (layer.bqkv, layer.q_norm, layer.k_norm, layer.post_attn_norm)
            weights += [t for t in (*optional, layer.post_mlp_norm) if t is not None]
        tensors = []
        for w in weights:
            if isinstance(w, QuantizedWeight):
                tensors += [t for t in (w.qweight, w.scales, w.zeros) if t is not None]
            elif isinstance(w, PackedWeight):  # an opaque oneDNN tensor (no storage)
                tensors.append(w.pack)
            else:
                tensors.append(w)
        return tensors

    @property
    def packed_weights(self) -> bool:
        """Whether the GEMMs run from oneDNN-packed weights (:mod:`llmkernels.packed_gemm`)."""
        return isinstance(self.lm_head, PackedWeight) or any(
            isinstance(layer.wqkv, PackedWeight) for layer in self.layers
        )

    @property
    def cache_bytes(self) -> int:
        """Bytes held by the K and V caches together."""
        return self.k_cache.numel() * self.k_cache.element_size() * 2

    def _decode_attention_supported(self) -> bool:
        """Whether ops.decode_attention runs for this dtype / head_dim on this device (the CUDA
        kernel covers fp16/bf16 with D in 64, 128); otherwise decode falls back to SDPA."""
        q = torch.empty(1, 1, self.config.head_dim, dtype=self.dtype, device=self.device)
        return ops.decode_attention_supported(q)

    def set_cache_lens(self, lens: list[int]) -> None:
        """Set ``cache_lens[:len(lens)]`` from the host (before a prefill)."""
        self.cache_lens[: len(lens)].copy_(
            torch.tensor(lens, dtype=torch.int32), non_blocking=False
        )

    # ---- shared pieces --------------------------------------------------------------------------
    def copy_cache_rows(self, src, dst, filled: int) -> None:
        """Cache rows ``dst`` take the first ``filled`` K/V slots and the lengths of rows
        ``src`` (ints, or int64 tensors ``[N]``). Every source is read before any row is
        written, so the two may overlap (beam search's reorder)."""
        src = torch.as_tensor(src, dtype=torch.int64, device=self.device)
        dst = torch.as_tensor(dst, dtype=torch.int64, device=self.device)
        for cache in (self.k_cache, self.v_cache):  # [layers, max_batch, Hk, max_seq, D]
            cache[:, dst, :, :filled] = cache[:, src, :, :filled]
        self.cache_lens[dst] = self.cache_lens[src]

    def _qkv(
        self, x: torch.Tensor, i: int, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer i's q [N, Hq, D], k, v [N, Hk, D] for tokens x [N, hidden] at positions [N]:
        q and k normalized per head where the family does (Qwen3, Gemma 3) and rotated."""
        c, layer, cos_sin = self.config, self.layers[i], self.layer_cos_sin[i]
        n, d = x.shape[0], c.head_dim
        qkv = linear(x, layer.wqkv, layer.bqkv)  # [N, (Hq + 2 Hk) * D]
        q_end, k_end = c.num_heads * d, (c.num_heads + c.num_kv_heads) * d
        q = qkv[:, :q_end].view(n, c.num_heads, d)  # [N, Hq, D] strided view
        k = qkv[:, q_end:k_end].view(n, c.num_kv_heads, d)  # [N, Hk, D]
        v = qkv[:, k_end:].view(n, c.num_kv_heads, d)  # [N, Hk, D]
        if c.qk_norm:
            eps, offset = c.rms_norm_eps, c.norm_unit_offset
            if ops.qk_norm_rotary_supported(q, cos_sin):  # CUDA: one pass over the heads
                ops.qk_norm_rotary(
                    positions, q, k, layer.q_norm, layer.k_norm, cos_sin, eps, unit_offset=offset
                )
                return q, k, v
            # per head, over D: new contiguous q [N, Hq, D] and k [N, Hk, D]
            q = ops.rms_norm(q.reshape(-1, d), layer.q_norm, eps, unit_offset=offset)
            k = ops.rms_norm(k.reshape(-1, d), layer.k_norm, eps, unit_offset=offset)
            q, k = q.view(n, c.num_heads, d), k.view(n, c.num_kv_heads, d)
        ops.rotary_embedding(positions, q, k, cos_sin)
        return q, k, v

    def _mlp(self, x: torch.Tensor, layer: Layer) -> torch.Tensor:
        gate_up = linear(x, layer.w_gate_up)  # [N, 2I]
        if self.config.activation == "gelu_tanh":
            return linear(ops.gelu_tanh_and_mul(gate_up), layer.w_down)  # [N, hidden]
        return linear(ops.silu_and_mul(gate_up), layer.w_down)  # [N, hidden]

    def _run_layers(self, tokens: torch.Tensor, attend) -> torch.Tensor:
        """Embedding -> layers -> final norm for flat ``tokens [N]``; ``attend(i, x) -> [N, Hq D]``
        is the attention sub-layer (QKV, rotary, cache append, attention). Returns ``[N, hidden]``."""
        c = self.config
        eps, offset = c.rms_norm_eps, c.norm_unit_offset
        residual = F.embedding(tokens, self.embed)  # [N, hidden]
        if self.embed_scale is not None:
            residual.mul_(self.embed_scale)
        x = ops.rms_norm(residual, self.layers[0].attn_norm, eps, unit_offset=offset)
        for i, layer in enumerate(self.layers):
            if i > 0:
                ops.fused_add_rms_norm(x, residual, layer.attn_norm, eps, unit_offset=offset)
            x = self._row_parallel(linear(attend(i, x), layer.wo))  # [N, hidden]
            if c.post_norms:
                ops.rms_norm(x, layer.post_attn_norm, eps, out=x, unit_offset=offset)
            ops.fused_add_rms_norm(x, residual, layer.mlp_norm, eps, unit_offset=offset)
            x = self._row_parallel(self._mlp(x, layer))
            if c.post_norms:
                ops.rms_norm(x, layer.post_mlp_norm, eps, out=x, unit_offset=offset)
        ops.fused_add_rms_norm(x, residual, self.norm, eps, unit_offset=offset)
        return x

    def _row_parallel(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over tensor-parallel ranks of a row-parallel projection's partial output."""
        return x if self.tensor_parallel is None else self.tensor_parallel.all_reduce(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, hidden] -> [M, V]``: the LM head, then soft-capping where the config asks."""
        if self.tensor_parallel is not None and isinstance(self.lm_head, torch.Tensor):
            # every rank must compute bit-identical logits (they sample the same token without
            # talking): one fixed kernel, not linear()'s per-process timed choice on CPU
            logits = F.linear(x, self.lm_head)
        else:
            logits = linear(x, self.lm_head)
        cap = self.config.final_logit_softcap
        if cap is not None:  # cap * tanh(logits / cap), in the logits' dtype as HF
            logits = logits.div_(cap).tanh_().mul_(cap)
        return logits

    # ---- multi-token forward (prefill) --------------------------------------------------------
    def prefill(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        key_len: int,
        causal: bool = False,
        logits_index: torch.Tensor | None = None,
        first_row: int = 0,
    ) -> torch.Tensor:
        """Forward ``B`` rows of ``T`` tokens into cache rows ``first_row..first_row+B-1`` and
        return logits.

        tokens ``[B, T]`` int64 (pads may hold any valid id); positions ``[B, T]`` int64 (the
        token's position = its cache slot in its row; pads: 0); slots ``[B, T]`` int64 flat slots
        ``(first_row + b) * max_seq_len + position`` (pads: -1); key_len: cache slots attended
        (``>`` every position). Key slot j is visible to a query at position p iff ``j <= p``;
        ``causal=True`` says this is plain causal attention over ``key_len == T`` (no padding,
        empty cache).
        logits_index: flat ``[M]`` indices into the ``B * T`` tokens whose logits are wanted (all
        when None). Returns ``[M, V]`` (or ``[B * T, V]``) in the model dtype.
        """
        c = self.config
        batch, seq = tokens.shape
        flat_pos = positions.reshape(-1)  # [N]
        flat_slots = slots.reshape(-1)  # [N]
        masks: dict[int | None, torch.Tensor | None] = {}

        def mask_for(window: int | None) -> torch.Tensor | None:
            """[B, 1, T, L] bool (True = attend): key slot j is visible from position p iff
            j <= p (and j > p - window in a sliding-window layer); None for plain causal."""
            if window not in masks:
                if causal and window is None:
                    masks[window] = None
                else:
                    key_slot = torch.arange(key_len, device=self.device)[None, None, :]  # [1,1,L]
                    visible = key_slot <= positions[:, :, None]
                    if window is not None:
                        visible &= key_slot > positions[:, :, None] - window
                    masks[window] = visible[:, None]
            return masks[window]

        def attend(i: int, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self._qkv(x, i, flat_pos)
            ops.kv_cache_append(k, v, self.k_cache[i], self.v_cache[i], flat_slots)
            qh = q.view(batch, seq, c.num_heads, c.head_dim).transpose(1, 2)  # [B, Hq, T, D]
            rows = slice(first_row, first_row + batch)
            keys = self.k_cache[i, rows, :, :key_len]  # [B, Hk, L, D]
            values = self.v_cache[i, rows, :, :key_len]  # [B, Hk, L, D]
            mask = mask_for(c.window(i))
            causal_only = causal and mask is None
            out = attention(qh, keys, values, mask, causal_only, self.attn_scale)  # [B, Hq, T, D]
            return out.transpose(1, 2).reshape(batch * seq, c.num_heads * c.head_dim)

        x = self._run_layers(tokens.reshape(-1), attend)  # [N, hidden]
        if logits_index is not None:
            x = x.index_select(0, logits_index)  # [M, hidden]
        return self._logits(x)  # [M, V]

    # ---- several tokens after the cache (speculative verification) ----------------------------
    def verify(self, tokens: torch.Tensor, key_len: int) -> torch.Tensor:
        """Forward ``T`` tokens per cache row ``0..B-1`` at positions ``cache_lens[b] + 0..T-1``
        and return their logits ``[B, T, V]``: a small prefill after the cached tokens, whose
        positions and slots come from ``cache_lens`` on the device (no host sync: capturable).

        tokens ``[B, T]`` int64; key_len: cache slots attended, ``>= max(cache_lens[:B]) + T``
        (``max_seq_len`` when the bound is not known on the host, e.g. in a CUDA graph). The K/V
        of all T tokens are written into the cache (positions past ``max_seq_len`` write nothing);
        ``cache_lens`` is left as is: the caller sets it to what it accepts, which drops the rest.
        """
        batch, seq = tokens.shape
        cap = self.max_seq_len
        positions = self.cache_lens[:batch, None].long() + torch.arange(seq, device=self.device)
        slots = torch.where(positions < cap, self.row_base[:batch, None] + positions, -1)
        positions = positions.clamp(max=cap - 1)
        return self.prefill(tokens, positions, slots, key_len).view(batch, seq, -1)

    # ---- one-token forward (decode) --------------------------------------------------------------
    def workspace(self, batch: int) -> torch.Tensor:
        """The decode-attention split-K workspace for this batch size (allocated once)."""
        if batch not in self._workspaces:
            c = self.config
            q = torch.empty(batch, c.num_heads, c.head_dim, dtype=self.dtype, device=self.device)
            self._workspaces[batch] = ops.decode_attention_workspace(q, self.k_cache[0])
        return self._workspaces[batch]

    def decode(self, tokens: torch.Tensor, key_len: int | None = None) -> torch.Tensor:
        """One token per cache row ``0..B-1`` at position ``cache_lens[b]``; advances
        ``cache_lens[:B]`` by one on the device (no host sync; CUDA-graph capturable).

        tokens ``[B]`` int64; key_len: cache slots the attention may read, ``>= cache_lens[b] + 1``
        for every row (None: the whole row). Returns logits ``[B, V]`` in the model dtype.

        Under ``torch.compile`` (:class:`llmkernels.Engine` with ``compile_decode=True``) the
        step is one graph of fixed-shape ops: the ops trace their references, the cache write is
        :meth:`_store_decode_kv`, and attention is a masked SDPA over the first ``key_len`` slots
        (the decode-attention reference reads the lengths on the host).
        """
        c, cap = self.config, self.max_seq_len
        batch = tokens.shape[0]
        span = cap if key_len is None else min(int(key_len), cap)  # slots attention may read
        compiling = torch.compiler.is_compiling()
        lens = self.cache_lens[:batch]  # [B] int32, tokens already stored
        pos = lens.long()  # [B] the new token's position (= its slot in its row)
        # A full row (never reached: generate checks lengths first) writes nothing and clamps.
        stored = pos < cap  # [B]
        slots = torch.where(stored, self.row_base[:batch] + pos, -1)  # [B]
        pos = pos.clamp(max=cap - 1)
        lens.add_(1).clamp_(max=cap)  # now counts the new token: the seq_lens attention needs
        workspace = self.workspace(batch) if self.decode_kernel and not compiling else None
        masks: dict[int | None, torch.Tensor] = {}

        def mask_for(window: int | None) -> torch.Tensor:
            """[B, 1, 1, span] bool: SDPA over the row's first ``span`` slots, masked by length
            (and window); only built when the decode kernel does not serve this dtype / head
            size, or under torch.compile."""
            if window not in masks:
                slot = torch.arange(span, device=self.device)[None, :]  # [1, span]
                visible = slot < lens[:, None]
                if window is not None:
                    visible &= slot >= lens[:, None] - window
                masks[window] = visible[:, None, None]
            return masks[window]

        def attend(i: int, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self._qkv(x, i, pos)  # q [B, Hq, D]; k, v [B, Hk, D]
            if compiling:
                self._store_decode_kv(i, k, v, pos, stored)
            else:
                ops.kv_cache_append(k, v, self.k_cache[i], self.v_cache[i], slots)
            window = c.window(i)
            if workspace is not None:
                out = ops.decode_attention(
                    q,
                    self.k_cache[i],
                    self.v_cache[i],
                    lens,
                    scale=self.attn_scale,
                    workspace=workspace,
                    window=window,
                )
            else:
                out = attention(
                    q.unsqueeze(2),
                    self.k_cache[i, :batch, :, :span],
                    self.v_cache[i, :batch, :, :span],
                    mask_for(window),
                    scale=self.attn_scale,
                ).squeeze(2)  # [B, Hq, D]
            return out.reshape(batch, c.num_heads * c.head_dim)

        x = self._run_layers(tokens, attend)  # [B, hidden]
        return self._logits(x)  # [B, V]

    def _store_decode_kv(
        self, i: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, stored: torch.Tensor
    ) -> None:
        """Layer i's new K/V ``[B, Hk, D]`` into slot ``pos[b]`` of cache row b where
        ``stored[b]``: :func:`llmkernels.kv_cache_append` for decode's slots (one per row, so
        distinct), as one in-place ``index_put_`` of fixed shape per cache, indexing the whole
        cache tensor (written through a layer's view, torch.compile copies the layer's cache
        around the write); the op's CPU paths read the slots on the host."""
        batch, num_kv_heads = k.shape[0], k.shape[1]
        layer = torch.full((1, 1), i, device=k.device)  # [1, 1]
        rows = torch.arange(batch, device=k.device)[:, None]  # [B, 1]
        heads = torch.arange(num_kv_heads, device=k.device)[None, :]  # [1, Hk]
        index = (layer, rows, heads, pos[:, None])  # -> [B, Hk] vectors of [L, max_B, Hk, S, D]
        keep = stored[:, None, None]  # [B, 1, 1]
        for cache, new in ((self.k_cache, k), (self.v_cache, v)):
            cache.index_put_(index, torch.where(keep, new.to(cache.dtype), cache[index]))
