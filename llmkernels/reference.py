"""Pure-PyTorch reference of every llmkernels op: the spec, the CPU path and the test oracle.

Each function is written to be read as its formula. Numerics follow Hugging Face transformers'
Llama modules (statistics in fp32, results rounded to the activation dtype where HF rounds), so
that the CUDA kernels, which are tested against these functions, are as exact as transformers.

In-place ops (``fused_add_rms_norm``, ``rotary_embedding``, ``kv_cache_append``) mutate their
arguments and return ``None``, like their kernels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "rms_norm",
    "fused_add_rms_norm",
    "rope_parameters",
    "rope_inv_freq",
    "rope_cos_sin_cache",
    "rotary_embedding",
    "qk_norm_rotary",
    "silu_and_mul",
    "gelu_tanh_and_mul",
    "int8_linear",
    "int4_linear",
    "kv_cache_append",
    "decode_attention",
    "sampling_probs",
    "sample",
]


# ---- normalization --------------------------------------------------------------------------------
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, unit_offset: bool = False
) -> torch.Tensor:
    """RMSNorm with HF ``LlamaRMSNorm`` numerics, or ``Gemma3RMSNorm``'s with ``unit_offset``.

    With ``x32 = x.float()`` and ``n = x32 * rsqrt(mean(x32^2, -1) + eps)``:
    ``y = weight * n.to(x.dtype)`` (Llama: the normalized value is rounded before the weight
    multiply), or with ``unit_offset`` ``y = (n * (1 + weight.float())).to(x.dtype)`` (Gemma:
    the weight stores ``scale - 1``, and the product is taken in fp32 and rounded once).

    x: ``[..., H]``; weight: ``[H]`` (same dtype as x). Returns ``[..., H]`` in x's dtype.
    """
    x32 = x.float()
    inv_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (x32 * inv_rms * (1.0 + weight.float())).to(x.dtype)
    return (weight * (x32 * inv_rms).to(x.dtype)).to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    unit_offset: bool = False,
) -> None:
    """Residual add then RMSNorm, in place (the pre-norm of every Llama sub-layer).

    ``residual = residual + x`` (rounded to the activation dtype, as HF adds in the model dtype);
    ``x = rms_norm(residual, weight, eps, unit_offset)``. x, residual: ``[..., H]``; weight: ``[H]``.
    """
    residual.add_(x)
    x.copy_(rms_norm(residual, weight, eps, unit_offset))


# ---- rotary embedding -------------------------------------------------------------------------------
def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def rope_parameters(config: Any, layer_type: str | None = None) -> dict:
    """Normalize a config's RoPE settings (HF v4 ``rope_theta``/``rope_scaling`` or v5
    ``rope_parameters``; an HF config object or a ``config.json`` dict) to one dict with keys
    ``rope_type``, ``rope_theta``, ``head_dim``, ``rotary_dim`` and the scaling fields.

    Models with a RoPE per layer type (Gemma 3: v5 ``rope_parameters = {"full_attention": {...},
    "sliding_attention": {...}}``, v4 ``rope_local_base_freq`` for the sliding layers) give the
    table of ``layer_type`` (default ``"full_attention"``)."""
    params = dict(_get(config, "rope_parameters", None) or {})
    scaling = _get(config, "rope_scaling", None)
    local_theta = _get(config, "rope_local_base_freq", None)
    if any(isinstance(v, Mapping) for v in params.values()):  # one entry per layer type
        params = dict(params.get(layer_type or "full_attention") or {})
    elif layer_type == "sliding_attention" and local_theta is not None:  # v4 Gemma 3
        params, scaling = {"rope_type": "default", "rope_theta": local_theta}, None
    if scaling and not params.get("rope_type"):
        params.update(scaling)
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    theta = params.get("rope_theta", _get(config, "rope_theta", None)) or 10000.0
    head_dim = _get(config, "head_dim", None) or _get(config, "hidden_size") // _get(
        config, "num_attention_heads"
    )
    partial = (
        params.get("partial_rotary_factor", _get(config, "partial_rotary_factor", None)) or 1.0
    )
    out = dict(params)
    out.update(
        rope_type=rope_type,
        rope_theta=float(theta),
        head_dim=int(head_dim),
        rotary_dim=int(head_dim * partial),
    )
    if rope_type in ("llama3", "yarn"):  # the pre-training length, as transformers finds it
        top_level = _get(config, "original_max_position_embeddings", None)
        if top_level is not None:  # Phi-3 style: the config's own field wins
            out["original_max_position_embeddings"] = top_level
        out.setdefault(
            "original_max_position_embeddings", _get(config, "max_position_embeddings", 8192)
        )
    if rope_type == "yarn" and out.get("factor") is None:  # DeepSeek-V3 style: from the lengths
        out["factor"] = (
            _get(config, "max_position_embeddings") / out["original_max_position_embeddings"]
        )
    return out


def rope_inv_freq(config: Any) -> torch.Tensor:
    """Inverse frequencies ``[rotary_dim / 2]`` (fp32) for rope types default, linear, llama3,
    yarn.

    default: ``inv_freq[i] = theta ** (-2i / rotary_dim)``; linear: ``inv_freq / factor``;
    llama3: low frequencies (wavelength > original_max / low_freq_factor) divided by ``factor``,
    high frequencies (wavelength < original_max / high_freq_factor) kept, and in between a linear
    blend with ``s = (original_max / wavelength - low_freq_factor) / (high_freq_factor -
    low_freq_factor)``: ``(1 - s) * inv_freq / factor + s * inv_freq``.
    yarn (YaRN, arXiv 2309.00071, as transformers computes it): with ``d = rotary_dim`` and
    ``c(r) = d * ln(original_max / (2 pi r)) / (2 ln theta)`` the dimension that turns r times
    over the pre-training length, ``lo = max(floor(c(beta_fast)), 0)``,
    ``hi = min(ceil(c(beta_slow)), d - 1)`` (no floor / ceil with ``truncate: false``; beta_fast
    32, beta_slow 1 by default) and ``e[i] = 1 - clamp((i - lo) / (hi - lo), 0, 1)``:
    ``inv_freq / factor * (1 - e) + inv_freq * e`` (fast dimensions kept, slow ones
    interpolated). Its cos / sin are scaled by :func:`rope_attention_factor`.
    """
    p = rope_parameters(config)
    dim = p["rotary_dim"]
    if dim % 2:
        raise ValueError(f"config: rotary_dim must be even, got {dim}")
    inv_freq = 1.0 / (p["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rope_type = p["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / p["factor"]
    if rope_type == "llama3":
        factor = p["factor"]
        low, high = p["low_freq_factor"], p["high_freq_factor"]
        old_len = p["original_max_position_embeddings"]
        low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, blended, scaled)
    if rope_type == "yarn":
        theta, old_len = p["rope_theta"], p["original_max_position_embeddings"]

        def turning_dim(rotations: float) -> float:
            return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = turning_dim(p.get("beta_fast") or 32), turning_dim(p.get("beta_slow") or 1)
        if p.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001  # a one-point ramp: a step
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        extrapolated = 1 - ramp  # 1: the dimension keeps its frequency
        powers = theta ** (torch.arange(0, dim, 2).float() / dim)
        return (1.0 / (p["factor"] * powers)) * (1 - extrapolated) + (1.0 / powers) * extrapolated
    raise ValueError(
        f"config: rope_type {rope_type!r} is not supported (supported: default, linear, llama3, "
        "yarn)"
    )


def rope_attention_factor(config: Any) -> float:
    """What the RoPE's cos and sin are multiplied by: 1, except yarn's attention factor (the
    config's ``attention_factor``, else ``m(factor, mscale) / m(factor, mscale_all_dim)`` when
    both are given, else ``m(factor, 1)``, with ``m(s, k) = 0.1 k ln s + 1`` for s > 1, else 1)."""
    p = rope_parameters(config)
    if p["rope_type"] != "yarn":
        return 1.0
    if p.get("attention_factor") is not None:
        return float(p["attention_factor"])

    def m(scale: float, k: float = 1.0) -> float:
        return 0.1 * k * math.log(scale) + 1.0 if scale > 1 else 1.0

    factor, mscale, mscale_all_dim = p["factor"], p.get("mscale"), p.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(m(factor, mscale) / m(factor, mscale_all_dim))
    return m(factor)


def rope_cos_sin_cache(
    config: Any, max_position: int | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """RoPE table ``[max_position, rotary_dim]`` (fp32): ``a * cos(p * inv_freq)`` in the first
    half, ``a * sin(p * inv_freq)`` in the second, for positions ``p = 0 .. max_position - 1``
    (:func:`rope_inv_freq`; ``a`` is :func:`rope_attention_factor`, 1 but for yarn).

    max_position defaults to the config's ``max_position_embeddings``.
    """
    if max_position is None:
        max_position = _get(config, "max_position_embeddings")
    if max_position is None or int(max_position) <= 0:
        raise ValueError(f"max_position must be a positive int, got {max_position!r}")
    inv_freq = rope_inv_freq(config)
    positions = torch.arange(int(max_position), dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    table = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    attention_factor = rope_attention_factor(config)
    if attention_factor != 1.0:
        table = table * attention_factor  # in fp32, before any cast, as transformers
    return table.to(device)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    # x: [T, H, rot]; cos/sin: [T, 1, rot/2] in x's dtype (HF casts cos/sin to the activation dtype)
    if is_neox:
        x1, x2 = x.chunk(2, dim=-1)
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if is_neox:
        return torch.cat([o1, o2], dim=-1)
    return torch.stack([o1, o2], dim=-1).flatten(-2)


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> None:
    """Rotary position embedding, in place on the first ``rotary_dim`` channels of q and k.

    With ``c = cos[positions]``, ``s = sin[positions]`` (cast to the activation dtype, as HF does)
    and ``x1, x2`` the two halves (NeoX / HF ``rotate_half``) or the even/odd channels (GPT-J):
    ``x1' = x1 * c - x2 * s``, ``x2' = x2 * c + x1 * s``.

    positions: ``[T]`` int; q: ``[T, Hq, D]``; k: ``[T, Hk, D]``; cos_sin_cache:
    ``[max_pos, rotary_dim]`` fp32 from :func:`rope_cos_sin_cache`.
    """
    rot = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache[positions.long(), None].chunk(2, dim=-1)  # [T, 1, rot/2] each
    for x in (q, k):
        c, s = cos.to(x.dtype), sin.to(x.dtype)
        x[..., :rot] = _rotate(x[..., :rot], c, s, is_neox)


def qk_norm_rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    eps: float,
    unit_offset: bool = False,
) -> None:
    """Per-head RMSNorm of q and k over D, then the NeoX rotary, in place (Qwen3, Gemma 3):
    ``q = rotary(rms_norm(q, q_weight))``, ``k = rotary(rms_norm(k, k_weight))`` with
    :func:`rms_norm` (``unit_offset``: Gemma's ``1 + w``) and :func:`rotary_embedding`.

    positions: ``[T]`` int; q: ``[T, Hq, D]``; k: ``[T, Hk, D]``; weights: ``[D]``;
    cos_sin_cache: ``[max_pos, D]`` fp32 (rotary over the whole head).
    """
    q.copy_(rms_norm(q, q_weight, eps, unit_offset))
    k.copy_(rms_norm(k, k_weight, eps, unit_offset))
    rotary_embedding(positions, q, k, cos_sin_cache, is_neox=True)


# ---- activation -------------------------------------------------------------------------------------
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU gate: ``silu(x[..., :I]) * x[..., I:]`` for x ``[..., 2I]`` → ``[..., I]``, in x's dtype
    (``silu(g) = g * sigmoid(g)``; both products rounded to x's dtype, as HF ``LlamaMLP``)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """GeGLU gate (Gemma's MLP): ``gelu_tanh(x[..., :I]) * x[..., I:]`` for x ``[..., 2I]`` →
    ``[..., I]``, in x's dtype, with ``gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715
    g^3)))`` (HF ``gelu_pytorch_tanh``; both products rounded to x's dtype)."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


# ---- weight-only int8 matmul ----------------------------------------------------------------------------
def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``out[m, n] = (sum_k x[m, k] * weight[n, k]) * scale[n]`` in fp32, rounded to x's dtype.

    x: ``[M, K]`` float; weight: int8 ``[N, K]`` (codes in [-127, 127]); scale: fp32 ``[N]``.
    Returns ``[M, N]``: ``x @ W^T`` for the int8 weight ``W[n, k] = weight[n, k] * scale[n]``.
    """
    return ((x.float() @ weight.float().t()) * scale.float()).to(x.dtype)


def int4_linear(x: torch.Tensor, weight: torch.Tensor, scale_zero: torch.Tensor) -> torch.Tensor:
    """``out[m, n] = sum_k x[m, k] * ((q[n, k] - 8) * s[n, k // G] + z[n, k // G])`` in fp32,
    rounded to x's dtype.

    x: ``[M, K]`` float; weight: uint8 ``[N, K / 2]``, byte j holding the codes q in [0, 15] of
    inputs 2j (high nibble) and 2j + 1 (low nibble); scale_zero: float ``[N, K / G, 2]``, the
    scale s and zero z of each group of G inputs. Returns ``[M, N]``: ``x @ W^T`` for the int4
    weight ``W[n, k] = (q[n, k] - 8) * s[n, k // G] + z[n, k // G]``.
    """
    n, k = weight.shape[0], 2 * weight.shape[1]
    group_size = k // scale_zero.shape[1]
    codes = torch.stack((weight >> 4, weight & 15), dim=-1).view(n, k).float()
    scale = scale_zero[..., 0].float().repeat_interleave(group_size, dim=1)
    zero = scale_zero[..., 1].float().repeat_interleave(group_size, dim=1)
    return (x.float() @ ((codes - 8) * scale + zero).t()).to(x.dtype)


# ---- attention ----------------------------------------------------------------------------------------
def kv_cache_append(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write new keys/values into the static cache, in place.

    For token n = 0, 1, ... in order, with ``slot = slot_mapping[n]``, ``b, s = divmod(slot, S)``:
    ``k_cache[b, :, s] = k[n]``, ``v_cache[b, :, s] = v[n]`` (a slot given to several tokens keeps
    the last); slots outside ``[0, B * S)`` are skipped (padding tokens).

    k, v: ``[N, Hk, D]``; k_cache, v_cache: ``[B, Hk, S, D]``; slot_mapping: ``[N]`` int.
    """
    num_rows, _, seq_capacity, _ = k_cache.shape
    slots = slot_mapping.long()
    kept = ((slots >= 0) & (slots < num_rows * seq_capacity)).nonzero().squeeze(1)  # [N'] tokens
    kept_slots = slots[kept]
    if kept_slots.numel() > 1:  # index_put with repeated indices is unordered: keep the last
        unique, inverse = torch.unique(kept_slots, return_inverse=True)
        if unique.numel() < kept_slots.numel():
            order = torch.arange(kept_slots.numel(), device=slots.device)
            last = torch.full_like(unique, -1).scatter_reduce_(0, inverse, order, reduce="amax")
            kept, kept_slots = kept[last], kept_slots[last]
    b, s = kept_slots // seq_capacity, kept_slots % seq_capacity
    k_cache[b, :, s] = k[kept].to(k_cache.dtype)
    v_cache[b, :, s] = v[kept].to(v_cache.dtype)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """One-token attention over a static KV cache, with grouped-query heads, computed in fp32.

    For row b, query head h and its kv head ``g = h // (Hq / Hk)``, with ``L = seq_lens[b]`` and
    ``s = max(0, L - window)`` (``s = 0`` without a window):
    ``out[b, h] = softmax(scale * q[b, h] . k_cache[b, g, s:L]^T) @ v_cache[b, g, s:L]``;
    rows with ``L = 0`` give zeros. ``scale`` defaults to ``D ** -0.5``. The window is a sliding
    window as transformers' (the new token sees itself and the ``window - 1`` before it).

    q: ``[B, Hq, D]``; k_cache, v_cache: ``[B', Hk, S, D]`` with ``B' >= B`` (rows ``>= B`` are
    not read); seq_lens: ``[B]`` int. Returns ``[B, Hq, D]`` in q's dtype.
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, seq_capacity = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    if scale is None:
        scale = head_dim**-0.5
    # Only the longest valid prefix is read (one host read of seq_lens: this is the CPU path).
    longest = min(int(seq_lens.max()), seq_capacity) if batch else 0
    keys = k_cache[:batch, :, :longest].float()  # [B, Hk, L, D]
    values = v_cache[:batch, :, :longest].float()
    qg = q.float().view(batch, num_kv_heads, group, head_dim)  # [B, Hk, G, D]
    scores = (qg @ keys.transpose(-1, -2)) * scale  # [B, Hk, G, L]
    slot = torch.arange(longest, device=q.device)[None, :]  # [1, L]
    beyond = slot >= seq_lens.long()[:, None]  # [B, L]
    if window is not None:
        beyond |= slot < (seq_lens.long() - window)[:, None]  # before the window
    scores = scores.masked_fill(beyond[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows (L = 0) -> zeros
    out = probs @ values  # [B, Hk, G, D]
    return out.reshape(batch, num_q_heads, head_dim).to(q.dtype)


# ---- sampling ---------------------------------------------------------------------------------------
def _per_row(value: Any, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype).expand(batch)
    return torch.full((batch,), value, dtype=dtype, device=device)


def sampling_probs(
    logits: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    min_p: float | torch.Tensor = 0.0,
    typical_p: float | torch.Tensor = 1.0,
    epsilon_cutoff: float | torch.Tensor = 0.0,
    eta_cutoff: float | torch.Tensor = 0.0,
    top_h: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """The exact distribution :func:`sample` draws from, ``[B, V]`` fp32 (HF filter order).

    1. temperature: ``p = softmax(logits / T)``; rows with ``T = 0`` are greedy: all mass on the
       argmax (lowest index among ties).
       Then top-h (``0`` is off; HF's ``TopHLogitsWarper``) on the scaled logits: over the
       ``n = min(100, V)`` largest, ``q = softmax`` and ``H = -sum q log q``; keep the most
       probable token and every token whose running ``-sum q log q`` (in descending order) is
       ``<= top_h * H``; every token outside those n is removed too.
    2. top-k (``k = 0`` or ``k >= V`` is off): keep token t iff fewer than k tokens have a strictly
       larger logit (ties at the k-th value are kept, as HF's ``TopKLogitsWarper``).
    3. top-p over the top-k-renormalized p: keep token t iff the mass of tokens strictly more
       probable than t is ``< top_p`` (HF's ``TopPLogitsWarper``, ties kept together); at least
       the most probable token is always kept.
    4. renormalize the kept probabilities.
    5. min-p (``0`` is off): keep token t iff ``p_t >= min_p * max(p)`` over the renormalized p
       (HF's ``MinPLogitsWarper``, after top-p), and renormalize again.
    6. typical (``typical_p = 1`` is off; HF's ``TypicalLogitsWarper``): with ``H = -sum p log p``,
       sort the tokens by ``|-log p_t - H|`` ascending and keep the shortest prefix whose mass
       reaches ``typical_p`` (ties at its last value kept, the first token always), renormalize.
    7. epsilon (``0`` is off; HF's ``EpsilonLogitsWarper``): keep ``p_t >= epsilon_cutoff`` and
       the most probable tokens, renormalize.
    8. eta (``0`` is off; HF's ``EtaLogitsWarper``): the same with the cutoff
       ``min(eta, sqrt(eta) * exp(-H))``.

    logits: ``[B, V]``; temperature, top_p and the others: float or ``[B]``; top_k: int or
    ``[B]``. A float setting at its off value leaves p bit-identical (no work). The settings'
    positions follow the order they were added in, not the filter order.
    """
    logits, greedy, scaled = _scaled_logits(logits, temperature, top_h)
    batch, vocab = logits.shape
    top_k = _per_row(top_k, batch, torch.int64, logits.device)
    top_p = _per_row(top_p, batch, torch.float32, logits.device)

    # top-k: threshold at the k-th largest value
    k = torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
    sorted_desc = scaled.sort(dim=-1, descending=True).values
    kth_value = sorted_desc.gather(1, (k - 1)[:, None])
    scaled = scaled.masked_fill(scaled < kth_value, float("-inf"))

    # top-p: mass strictly above each token, in sorted order
    probs = torch.softmax(scaled, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(1, order, _top_p_keep(sorted_p, top_p))
    probs = torch.where(keep, probs, 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return _after_top_p(logits, greedy, probs, min_p, typical_p, epsilon_cutoff, eta_cutoff)


def _scaled_logits(
    logits: torch.Tensor, temperature: float | torch.Tensor, top_h: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 1 of :func:`sampling_probs`: the fp32 ``logits [B, V]``, the greedy rows ``[B]``
    (``T = 0``) and the scaled, top-h filtered logits ``[B, V]`` (greedy rows unscaled)."""
    batch, device = logits.shape[0], logits.device
    logits = logits.float()
    temperature = _per_row(temperature, batch, torch.float32, device)
    greedy = temperature == 0
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    if isinstance(top_h, torch.Tensor) or top_h != 0:
        scaled = _top_h(scaled, _per_row(top_h, batch, torch.float32, device))
    return logits, greedy, scaled


def _top_p_keep(sorted_p: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Step 3 of :func:`sampling_probs` on ``sorted_p [B, N]`` (descending; N may stop after
    the last non-zero p): which to keep, ``[B, N]`` bool. Ties share their group's first
    exclusive prefix sum."""
    exclusive = sorted_p.cumsum(dim=-1) - sorted_p
    neg = -sorted_p  # ascending, for a leftmost search of each tie group
    group_start = torch.searchsorted(neg.contiguous(), neg.contiguous(), right=False)
    mass_above = exclusive.gather(1, group_start)
    # top_p >= 1 keeps everything (fp32 prefix sums reach 1.0 before the tail: exact arithmetic
    # would keep the tail, and HF skips its top-p warper at 1.0)
    keep_sorted = (mass_above < top_p[:, None]) | (top_p[:, None] >= 1.0)
    keep_sorted[:, 0] = True
    return keep_sorted


def _after_top_p(
    logits, greedy, probs, min_p, typical_p, epsilon_cutoff, eta_cutoff, typical=None
) -> torch.Tensor:
    """Steps 5-8 of :func:`sampling_probs` on the renormalized ``probs [B, V]``, then the greedy
    rows' one-hot (``greedy [B]``, from ``logits [B, V]`` fp32; None: no row is greedy, which
    the CPU twin knows). ``typical`` replaces :func:`_typical` (the CPU twin's, which skips the
    sort when no row asks)."""
    batch, vocab = probs.shape
    device = probs.device
    if isinstance(min_p, torch.Tensor) or min_p != 0:  # a Python 0 leaves p bit-identical
        probs = _min_p(probs, _per_row(min_p, batch, torch.float32, device))
    if isinstance(typical_p, torch.Tensor) or typical_p < 1:
        probs = (typical or _typical)(probs, _per_row(typical_p, batch, torch.float32, device))
    if isinstance(epsilon_cutoff, torch.Tensor) or epsilon_cutoff > 0:
        cutoff = _per_row(epsilon_cutoff, batch, torch.float32, device)
        probs = _cut_below(probs, torch.where(cutoff > 0, cutoff, 0.0)[:, None])
    if isinstance(eta_cutoff, torch.Tensor) or eta_cutoff > 0:
        eta = _per_row(eta_cutoff, batch, torch.float32, device)[:, None]
        entropy = _entropy(probs, log_or_minus_inf(probs))
        probs = _cut_below(probs, torch.minimum(eta, eta.sqrt() * torch.exp(-entropy)))

    if greedy is None:
        return probs
    # no `if greedy.any()`: a host sync, which a CUDA-graph capture of the decode step refuses
    one_hot = F.one_hot(logits.argmax(dim=-1), vocab).float()
    return torch.where(greedy[:, None], one_hot, probs)


def _min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Step 5 of :func:`sampling_probs` on renormalized ``probs [B, V]`` (``min_p [B]``)."""
    floor = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    probs = torch.where(probs >= floor, probs, 0.0)  # the largest always stays
    return probs / probs.sum(dim=-1, keepdim=True)


TOP_H_CANDIDATES = 100  # transformers' TopHLogitsWarper.top_n: the tokens top-h looks at


def _top_h(scores: torch.Tensor, top_h: torch.Tensor) -> torch.Tensor:
    """Top-h of :func:`sampling_probs` on scaled logits ``scores [B, V]`` (``top_h [B]``; rows
    with 0 unchanged), in the operations of transformers' ``TopHLogitsWarper`` (its
    ``Categorical`` spelled out: that class checks its arguments on the host)."""
    n = min(TOP_H_CANDIDATES, scores.shape[-1])
    top_logits, top_index = torch.topk(scores, n, dim=-1, largest=True, sorted=True)
    log_q = top_logits - top_logits.logsumexp(dim=-1, keepdim=True)
    q = torch.softmax(log_q, dim=-1)
    entropy = -(log_q.clamp(min=torch.finfo(log_q.dtype).min) * q).sum(-1)
    running = torch.cumsum(-q * torch.log(q), dim=-1)  # NaN from the first -inf logit on
    chosen = running <= (entropy * top_h)[:, None]
    chosen[:, 0] = True
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter(1, top_index, chosen)
    keep |= (top_h <= 0)[:, None]
    return scores.masked_fill(~keep, float("-inf"))


def _typical(probs: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Step 6 of :func:`sampling_probs` on renormalized ``probs [B, V]``; rows with mass >= 1
    unchanged."""
    log_p = log_or_minus_inf(probs)  # -inf for removed tokens
    entropy = _entropy(probs, log_p)
    shifted = (-log_p - entropy).abs()  # inf for removed tokens
    sorted_shifted, order = shifted.sort(dim=-1)
    cumulative = probs.gather(1, order).cumsum(dim=-1)
    last = (cumulative < mass[:, None]).sum(dim=1, keepdim=True).clamp(max=probs.shape[1] - 1)
    remove_sorted = sorted_shifted > sorted_shifted.gather(1, last)
    remove_sorted[:, 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(1, order, remove_sorted)
    remove &= (mass < 1)[:, None]
    probs = torch.where(remove, 0.0, probs)
    return probs / probs.sum(dim=-1, keepdim=True)


def _entropy(probs: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """``H = -sum p log p`` over the non-zero ``probs [B, V]`` (``log_p`` their log), ``[B, 1]``
    (eta's cutoff and typical-p)."""
    return -torch.where(probs > 0, probs * log_p, 0.0).sum(dim=-1, keepdim=True)


def log_or_minus_inf(probs: torch.Tensor) -> torch.Tensor:
    """``log(p)``, ``-inf`` where ``p = 0``: the same values as ``probs.log()``, without taking
    the log of 0 (30x the cost of a positive number's on a CPU, where filtered laws are mostly
    zeros)."""
    positive = probs > 0
    return torch.where(positive, torch.where(positive, probs, 1.0).log(), float("-inf"))


def _cut_below(probs: torch.Tensor, cutoff: torch.Tensor) -> torch.Tensor:
    """Drop tokens with ``p < cutoff [B, 1]`` except the most probable, renormalize."""
    keep = (probs >= cutoff) | (probs >= probs.amax(dim=-1, keepdim=True))
    probs = torch.where(keep, probs, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def sample(
    logits: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token id per row from :func:`sampling_probs` (temperature → top-k → top-p →
    renormalize → :func:`draw`). Greedy rows (``T = 0``) return the argmax.

    logits: ``[B, V]``. Returns int64 ``[B]``.
    """
    return draw(sampling_probs(logits, temperature, top_k, top_p), generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``probs [B, V]`` (non-negative, each row's sum positive) by the
    inverse of its distribution function: with ``c`` the running sum in fp64 and ``u ~ U[0, 1)``
    (one number per row from ``generator``), the first t with ``c_t > u * c_V``. A token of
    probability 0 is never drawn. int64 ``[B]``. (``torch.multinomial`` draws V exponentials
    per row: 1.2 ms for 49,152 tokens on a 2-core CPU host, this 0.05 ms.)"""
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device)
    token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # u * c_V < c_V: in range
    return token.squeeze(-1)
