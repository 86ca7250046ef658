"""A Llama forward pass on llmkernels ops: fused QKV and gate/up weights, a static KV cache.

Per layer (vLLM-style residual stream, the residual add fused into the next norm)::

    x, residual = fused_add_rms_norm(x, residual)        # residual += x; x = rms_norm(residual)
    qkv = x @ Wqkv^T                                     # one GEMM, Wqkv [(Hq + 2 Hk) * D, hidden]
    rotary_embedding(q, k)                               # in place on strided views of qkv
    kv_cache_append(k, v)                                # into k_cache/v_cache at slot_mapping
    a = attention(q, cache)                              # SDPA (prefill) or decode_attention
    x = a @ Wo^T
    x, residual = fused_add_rms_norm(x, residual)
    x = silu_and_mul(x @ Wgate_up^T) @ Wdown^T           # Wgate_up [2 I, hidden]

Cache layout: ``k_cache, v_cache [layers, max_batch, Hk, max_seq, D]``. Row b holds its sequence's
*real* tokens compactly from slot 0 (the token at position p lives in slot p; left padding is never
stored: pad tokens get slot -1 and are skipped), so ``cache_lens[b]`` (int32, on the device) is
the exact ``seq_lens`` that :func:`llmkernels.decode_attention` needs. The decode path reads and
advances ``cache_lens`` on the device, so one CUDA graph can replay it for every token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from . import ops
from .reference import rope_parameters

__all__ = ["ModelConfig", "Transformer", "linear", "SUPPORTED_MODEL_TYPES", "SUPPORTED_ROPE_TYPES"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral")  # mistral only without a sliding window
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    return default if value is None else value


@dataclass(frozen=True)
class ModelConfig:
    """The architecture numbers the engine needs, read from an HF ``LlamaConfig`` or a
    ``config.json`` dict by :meth:`from_hf` (which rejects what the engine cannot run)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: dict = field(default_factory=dict)  # reference.rope_parameters(config)
    model_type: str = "llama"

    @property
    def qkv_size(self) -> int:
        """Rows of the fused QKV weight: ``(Hq + 2 Hk) * D``."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def rope_config(self) -> dict:
        """A config dict that :func:`llmkernels.rope_cos_sin_cache` reads as this model's RoPE."""
        return {
            "rope_parameters": dict(self.rope),
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
        }

    @classmethod
    def from_hf(cls, config: Any) -> ModelConfig:
        """Build from an HF config object (``LlamaConfig``) or a ``config.json`` dict.

        Raises ``ValueError`` naming the field for anything the engine does not implement:
        ``model_type`` other than llama (or mistral without a sliding window), ``hidden_act`` other
        than silu, ``attention_bias`` / ``mlp_bias``, a sliding window, a partial rotary factor,
        a RoPE type other than default / linear / llama3, or a quantized checkpoint.
        """
        model_type = _get(config, "model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.model_type={model_type!r} is not supported: the engine runs Llama-architecture "
                f"models (model_type in {SUPPORTED_MODEL_TYPES})"
            )
        act = _get(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(
                f"config.hidden_act={act!r} is not supported (only 'silu', SwiGLU MLP)"
            )
        for name in ("attention_bias", "mlp_bias"):
            if _get(config, name, False):
                raise ValueError(
                    f"config.{name}=True is not supported (bias-free projections only)"
                )
        if _get(config, "sliding_window", None) is not None or _get(
            config, "use_sliding_window", False
        ):
            raise ValueError(
                f"config.sliding_window={_get(config, 'sliding_window', None)!r} is not supported "
                "(full causal attention only)"
            )
        quant = _get(config, "quantization_config", None)
        if quant:
            method = quant.get("quant_method") if isinstance(quant, Mapping) else quant
            raise ValueError(
                f"config.quantization_config (quant_method={method!r}) is not supported: load an "
                "unquantized fp32/fp16/bf16 checkpoint"
            )
        rope = rope_parameters(config)
        if rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"config rope type {rope['rope_type']!r} (rope_parameters / rope_scaling) is not "
                f"supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if rope["rotary_dim"] != rope["head_dim"]:
            raise ValueError(
                "config.partial_rotary_factor != 1 is not supported (Llama rotates the whole head)"
            )
        if rope["rope_type"] != "default" and rope.get("factor") is None:
            raise ValueError(f"config rope type {rope['rope_type']!r} needs a scaling 'factor'")
        heads = int(_get(config, "num_attention_heads"))
        kv_heads = int(_get(config, "num_key_value_heads", heads))
        if heads % kv_heads:
            raise ValueError(
                f"config.num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
            )
        return cls(
            vocab_size=int(_get(config, "vocab_size")),
            hidden_size=int(_get(config, "hidden_size")),
            intermediate_size=int(_get(config, "intermediate_size")),
            num_layers=int(_get(config, "num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(rope["head_dim"]),
            rms_norm_eps=float(_get(config, "rms_norm_eps", 1e-6)),
            max_position_embeddings=int(_get(config, "max_position_embeddings", 2048)),
            tie_word_embeddings=bool(_get(config, "tie_word_embeddings", False)),
            rope=rope,
            model_type=model_type,
        )


# At most this many rows may take the blocked CPU GEMV in linear() (measured: from 8 rows on, MKL's
# own threaded GEMM is as fast or faster).
CPU_GEMV_MAX_ROWS = 4
# (out, in, rows, dtype, threads) -> whether the blocked GEMV beat F.linear when linear() timed both
_BLOCKED_GEMV_FASTER: dict[tuple, bool] = {}


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T``: x ``[N, in]``, weight ``[out, in]`` → ``[N, out]`` (``F.linear``).

    On CPU with at most ``CPU_GEMV_MAX_ROWS`` rows (decode), some BLAS builds run the GEMV on one
    thread at a third of the memory bandwidth (measured on one 2-core AVX-512 host: 9-15 GB/s),
    while splitting the weight's rows into equal blocks computed by one ``bmm`` spreads it over
    all threads (24-28 GB/s there); on other hosts F.linear itself is threaded and twice as fast
    as the blocks (28-53 GB/s vs 10-25). So the first call of each shape times both and keeps the
    faster (see ``_blocked_gemv_faster``). Results match ``F.linear`` to float rounding.
    """
    rows = x.shape[0]
    if (
        x.device.type != "cpu"
        or rows > CPU_GEMV_MAX_ROWS
        or not weight.is_contiguous()
        or torch.compiler.is_compiling()
    ):
        return F.linear(x, weight)
    blocks = math.gcd(weight.shape[0], 4 * torch.get_num_threads())  # a few per thread
    if blocks == 1 or not _blocked_gemv_faster(x, weight, blocks):
        return F.linear(x, weight)
    return _blocked_gemv(x, weight, blocks)


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

        def best_of_3(fn) -> float:
            fn()
            times = []
            for _ in range(3):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return min(times)

        blocked = best_of_3(lambda: _blocked_gemv(x, weight, blocks))
        faster = blocked < 0.9 * best_of_3(lambda: F.linear(x, weight))
        _BLOCKED_GEMV_FASTER[key] = faster
    return faster


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool = False,
) -> torch.Tensor:
    """SDPA with grouped KV heads: q ``[B, Hq, T, D]``, k, v ``[B, Hk, L, D]``, mask ``[B, 1, T, L]``
    bool (True = attend) or None → ``[B, Hq, T, D]``.

    CUDA's fused SDPA kernels take grouped heads (``enable_gqa``) only without a mask (flash); a
    masked grouped call falls back to the math backend, which materializes fp32 scores ``[B, Hq,
    T, L]``. So with a mask on CUDA the KV heads are repeated first, as transformers does, and the
    memory-efficient kernel runs. CPU's flash kernel takes both (and is faster without the copy).
    """
    if mask is not None and q.is_cuda and q.shape[1] != k.shape[1]:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True
    )


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[Hq D, H] + [Hk D, H] + [Hk D, H] -> [(Hq + 2 Hk) D, H]`` (a new tensor)."""
    return torch.cat([q, k, v], dim=0)


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``[I, H] + [I, H] -> [2 I, H]``: gate rows first, as :func:`silu_and_mul` expects."""
    return torch.cat([gate, up], dim=0)


def weight_names(config: ModelConfig) -> list[str]:
    """Names of the fused-layout weights :class:`Transformer` takes (lm_head only when untied)."""
    names = ["embed", "norm"]
    for i in range(config.num_layers):
        names += [
            f"layers.{i}.{n}"
            for n in ("attn_norm", "wqkv", "wo", "mlp_norm", "w_gate_up", "w_down")
        ]
    if not config.tie_word_embeddings:
        names.append("lm_head")
    return names


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


class Transformer:
    """Llama decoder on llmkernels ops with a static KV cache.

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
    """

    def __init__(
        self,
        config: ModelConfig,
        weights: Mapping[str, torch.Tensor],
        max_batch_size: int,
        max_seq_len: int,
    ):
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
            if t.device != self.device or t.dtype != self.dtype:
                raise ValueError(
                    f"weight {name} is {t.dtype} on {t.device}; all weights must be "
                    f"{self.dtype} on {self.device}"
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
        self.lm_head = embed if config.tie_word_embeddings else weights["lm_head"]  # [V, hidden]
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
        # [max_seq, D] fp32: cos | sin
        self.cos_sin = ops.rope_cos_sin_cache(c.rope_config(), max_seq_len, dev)
        self._workspaces: dict[int, torch.Tensor] = {}
        self.decode_kernel = self._decode_attention_supported()

    # ---- bookkeeping --------------------------------------------------------------------------
    def weight_tensors(self) -> list[torch.Tensor]:
        """Every weight tensor the model reads (the tied lm_head counted once when shared)."""
        tensors = [self.embed, self.norm]
        if self.lm_head.data_ptr() != self.embed.data_ptr():
            tensors.append(self.lm_head)
        for layer in self.layers:
            tensors += [
                layer.attn_norm,
                layer.wqkv,
                layer.wo,
                layer.mlp_norm,
                layer.w_gate_up,
                layer.w_down,
            ]
        return tensors

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
    def _qkv(
        self, x: torch.Tensor, layer: Layer
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.config
        n = x.shape[0]
        qkv = linear(x, layer.wqkv)  # [N, (Hq + 2 Hk) * D]
        q_end, k_end = c.num_heads * c.head_dim, (c.num_heads + c.num_kv_heads) * c.head_dim
        q = qkv[:, :q_end].view(n, c.num_heads, c.head_dim)  # [N, Hq, D] strided view
        k = qkv[:, q_end:k_end].view(n, c.num_kv_heads, c.head_dim)  # [N, Hk, D]
        v = qkv[:, k_end:].view(n, c.num_kv_heads, c.head_dim)  # [N, Hk, D]
        return q, k, v

    def _mlp(self, x: torch.Tensor, layer: Layer) -> torch.Tensor:
        gate_up = linear(x, layer.w_gate_up)  # [N, 2I]
        return linear(ops.silu_and_mul(gate_up), layer.w_down)  # [N, hidden]

    def _run_layers(self, tokens: torch.Tensor, attend) -> torch.Tensor:
        """Embedding -> layers -> final norm for flat ``tokens [N]``; ``attend(i, x) -> [N, Hq D]``
        is the attention sub-layer (QKV, rotary, cache append, attention). Returns ``[N, hidden]``."""
        residual = F.embedding(tokens, self.embed)  # [N, hidden]
        x = ops.rms_norm(residual, self.layers[0].attn_norm, self.config.rms_norm_eps)
        eps = self.config.rms_norm_eps
        for i, layer in enumerate(self.layers):
            if i > 0:
                ops.fused_add_rms_norm(x, residual, layer.attn_norm, eps)
            x = linear(attend(i, x), layer.wo)  # [N, hidden]
            ops.fused_add_rms_norm(x, residual, layer.mlp_norm, eps)
            x = self._mlp(x, layer)
        ops.fused_add_rms_norm(x, residual, self.norm, eps)
        return x

    # ---- multi-token forward (prefill) --------------------------------------------------------
    def prefill(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        key_len: int,
        causal: bool = False,
        logits_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Forward ``B`` rows of ``T`` tokens into cache rows ``0..B-1`` and return logits.

        tokens ``[B, T]`` int64 (pads may hold any valid id); positions ``[B, T]`` int64 (the
        token's position = its cache slot in its row; pads: 0); slots ``[B, T]`` int64 flat slots
        ``b * max_seq_len + position`` (pads: -1); key_len: cache slots attended (``>`` every
        position). Key slot j is visible to a query at position p iff ``j <= p``; ``causal=True``
        says this is plain causal attention over ``key_len == T`` (no padding, empty cache).
        logits_index: flat ``[M]`` indices into the ``B * T`` tokens whose logits are wanted (all
        when None). Returns ``[M, V]`` (or ``[B * T, V]``) in the model dtype.
        """
        c = self.config
        batch, seq = tokens.shape
        flat_pos = positions.reshape(-1)  # [N]
        flat_slots = slots.reshape(-1)  # [N]
        if causal:
            mask = None
        else:
            key_slot = torch.arange(key_len, device=self.device)
            mask = (key_slot[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, T, L]

        def attend(i: int, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self._qkv(x, self.layers[i])
            ops.rotary_embedding(flat_pos, q, k, self.cos_sin)
            ops.kv_cache_append(k, v, self.k_cache[i], self.v_cache[i], flat_slots)
            qh = q.view(batch, seq, c.num_heads, c.head_dim).transpose(1, 2)  # [B, Hq, T, D]
            keys = self.k_cache[i, :batch, :, :key_len]  # [B, Hk, L, D]
            values = self.v_cache[i, :batch, :, :key_len]  # [B, Hk, L, D]
            out = attention(qh, keys, values, mask, causal)  # [B, Hq, T, D]
            return out.transpose(1, 2).reshape(batch * seq, c.num_heads * c.head_dim)

        x = self._run_layers(tokens.reshape(-1), attend)  # [N, hidden]
        if logits_index is not None:
            x = x.index_select(0, logits_index)  # [M, hidden]
        return linear(x, self.lm_head)  # [M, V]

    # ---- one-token forward (decode) --------------------------------------------------------------
    def workspace(self, batch: int) -> torch.Tensor:
        """The decode-attention split-K workspace for this batch size (allocated once)."""
        if batch not in self._workspaces:
            c = self.config
            q = torch.empty(batch, c.num_heads, c.head_dim, dtype=self.dtype, device=self.device)
            self._workspaces[batch] = ops.decode_attention_workspace(q, self.k_cache[0])
        return self._workspaces[batch]

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per cache row ``0..B-1`` at position ``cache_lens[b]``; advances
        ``cache_lens[:B]`` by one on the device (no host sync; CUDA-graph capturable).

        tokens ``[B]`` int64. Returns logits ``[B, V]`` in the model dtype.
        """
        c, cap = self.config, self.max_seq_len
        batch = tokens.shape[0]
        lens = self.cache_lens[:batch]  # [B] int32, tokens already stored
        pos = lens.long()  # [B] the new token's position (= its slot in its row)
        # A full row (never reached: generate checks lengths first) writes nothing and clamps.
        slots = torch.where(pos < cap, self.row_base[:batch] + pos, -1)  # [B]
        pos = pos.clamp(max=cap - 1)
        lens.add_(1).clamp_(max=cap)  # now counts the new token: the seq_lens attention needs
        if self.decode_kernel:
            workspace = self.workspace(batch)
            mask = None
        else:  # SDPA over the whole row, masked by length
            workspace = None
            mask = (torch.arange(cap, device=self.device)[None, :] < lens[:, None])[
                :, None, None
            ]  # [B, 1, 1, S]

        def attend(i: int, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self._qkv(x, self.layers[i])  # q [B, Hq, D]; k, v [B, Hk, D]
            ops.rotary_embedding(pos, q, k, self.cos_sin)
            ops.kv_cache_append(k, v, self.k_cache[i], self.v_cache[i], slots)
            if workspace is not None:
                out = ops.decode_attention(
                    q, self.k_cache[i], self.v_cache[i], lens, workspace=workspace
                )
            else:
                out = attention(
                    q.unsqueeze(2), self.k_cache[i, :batch], self.v_cache[i, :batch], mask
                ).squeeze(2)  # [B, Hq, D]
            return out.reshape(batch, c.num_heads * c.head_dim)

        x = self._run_layers(tokens, attend)  # [B, hidden]
        return linear(x, self.lm_head)  # [B, V]
