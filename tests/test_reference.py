"""The reference ops (the spec) checked against transformers' own Llama modules."""

import pytest
import torch
from conftest import DTYPES
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama as hf

import llmkernels as lk
from llmkernels import reference as ref

ROPE_CONFIGS = {
    "default": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "theta500k": dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "linear": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "llama3": dict(
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    ),
    # Qwen2.5 / Qwen3's long-context setting
    "yarn": dict(
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 1e6,
            "factor": 4.0,
            "original_max_position_embeddings": 32768,
        }
    ),
    # DeepSeek-V3's fields: mscale over mscale_all_dim, its betas, no truncation
    "yarn_mscale": dict(
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "mscale": 1.0,
            "mscale_all_dim": 0.707,
            "beta_fast": 32,
            "beta_slow": 1,
            "truncate": False,
        }
    ),
    "yarn_attention_factor": dict(
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "original_max_position_embeddings": 16384,
            "attention_factor": 1.25,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
        }
    ),
}


def llama_config(rope="default", head_dim=64, heads=4, kv_heads=2, **kw):
    return LlamaConfig(
        hidden_size=heads * 32,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=kw.pop("max_position_embeddings", 131072),
        **ROPE_CONFIGS[rope],
        **kw,
    )


# ---- RMSNorm ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 7, 769, 2048])
def test_rms_norm_matches_llama_rms_norm(dtype, hidden):
    norm = hf.LlamaRMSNorm(hidden, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden) * 0.5 + 1)
    x = torch.randn(3, 5, hidden, dtype=dtype) * 3
    expected = norm(x)
    actual = ref.rms_norm(x, norm.weight, 1e-5)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_matches_qwen3_q_norm(dtype):
    # Qwen3 normalizes each q / k head over head_dim (q_norm, k_norm) on [B, T, H, D] views; the
    # engine runs rms_norm on those heads as rows
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    norm = Qwen3RMSNorm(128, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(128) + 0.5)
    heads = (torch.randn(2, 7, 16, 128) * 3).to(dtype)  # [B, T, H, D]
    actual = ref.rms_norm(heads.reshape(-1, 128), norm.weight, 1e-6).view_as(heads)
    torch.testing.assert_close(actual, norm(heads), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_is_add_then_norm(dtype):
    hidden = 769
    weight = torch.randn(hidden, dtype=dtype)
    x = torch.randn(4, hidden, dtype=dtype)
    residual = torch.randn(4, hidden, dtype=dtype)
    norm = hf.LlamaRMSNorm(hidden, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
    expected_residual = residual + x  # HF: hidden_states = residual + hidden_states (model dtype)
    expected_x = norm(expected_residual)
    x2, r2 = x.clone(), residual.clone()
    assert ref.fused_add_rms_norm(x2, r2, weight, 1e-6) is None
    torch.testing.assert_close(r2, expected_residual, atol=0, rtol=0)
    torch.testing.assert_close(x2, expected_x, atol=0, rtol=0)


# ---- RoPE -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rope", list(ROPE_CONFIGS))
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cos_sin_cache_matches_llama_rotary_embedding(rope, head_dim):
    config = llama_config(rope, head_dim=head_dim)
    rotary = hf.LlamaRotaryEmbedding(config)
    positions = torch.tensor([[0, 1, 2, 17, 511, 4095, 8191, 9000, 20000, 131071]])
    cos, sin = rotary(torch.empty(1, dtype=torch.float32), positions)  # [1, T, D], halves repeated
    cache = lk.rope_cos_sin_cache(config)
    assert cache.shape == (131072, head_dim) and cache.dtype == torch.float32
    ours_cos, ours_sin = cache[positions[0]].chunk(2, dim=-1)
    half = head_dim // 2
    torch.testing.assert_close(ours_cos, cos[0, :, :half], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours_sin, sin[0, :, :half], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cos[0, :, half:], cos[0, :, :half])  # HF repeats the half


@pytest.mark.parametrize("rope", ["yarn", "yarn_mscale", "yarn_attention_factor"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_yarn_cos_sin_cache_is_transformers_bit_for_bit(rope, head_dim):
    """YaRN's frequencies and its attention factor (cos and sin scaled in fp32) as transformers'
    rotary computes them, at every position of a long table."""
    config = llama_config(rope, head_dim=head_dim)
    positions = torch.arange(0, 131072, 7)[None]
    cos, sin = hf.LlamaRotaryEmbedding(config)(torch.empty(1), positions)  # [1, T, D]
    cache = lk.rope_cos_sin_cache(config)
    ours_cos, ours_sin = cache[positions[0]].chunk(2, dim=-1)
    assert torch.equal(ours_cos, cos[0, :, : head_dim // 2])
    assert torch.equal(ours_sin, sin[0, :, : head_dim // 2])
    assert ref.rope_attention_factor(config) != 1.0


def test_yarn_lengths_as_transformers_finds_them():
    """original_max_position_embeddings from the config's own field (Phi-3 style), else from
    max_position_embeddings; a missing factor from their ratio (DeepSeek-V3 style); a v4
    rope_scaling dict equal to the v5 config."""
    base = {"hidden_size": 256, "num_attention_heads": 4, "max_position_embeddings": 65536}
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16384}
    v4 = {**base, "rope_theta": 1e6, "rope_scaling": scaling}
    v5 = LlamaConfig(**base, rope_parameters={**scaling, "rope_theta": 1e6})
    assert torch.equal(lk.rope_cos_sin_cache(v4), lk.rope_cos_sin_cache(v5))
    top_level = {**v4, "original_max_position_embeddings": 8192}
    assert ref.rope_parameters(top_level)["original_max_position_embeddings"] == 8192
    no_original = {**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}
    assert ref.rope_parameters(no_original)["original_max_position_embeddings"] == 65536
    no_factor = {**base, "rope_scaling": {**scaling, "factor": None}}
    assert ref.rope_parameters(no_factor)["factor"] == 4.0  # 65536 / 16384
    hf_config = LlamaConfig(**base, rope_parameters={**scaling, "factor": None, "rope_theta": 1e4})
    cos, sin = hf.LlamaRotaryEmbedding(hf_config)(torch.empty(1), torch.arange(0, 65536, 5)[None])
    ours = lk.rope_cos_sin_cache(hf_config)[0:65536:5]
    assert torch.equal(ours, torch.cat([cos[0, :, :32], sin[0, :, :32]], dim=-1))


def test_cos_sin_cache_from_v4_style_dict():
    """A config.json dict with rope_theta + rope_scaling (transformers v4 format)."""
    v4 = {
        "hidden_size": 2048,
        "num_attention_heads": 32,
        "max_position_embeddings": 4096,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    v5 = llama_config("llama3", head_dim=64, heads=32, max_position_embeddings=4096)
    torch.testing.assert_close(lk.rope_cos_sin_cache(v4), lk.rope_cos_sin_cache(v5), atol=0, rtol=0)
    assert lk.rope_cos_sin_cache(v4, max_position=10).shape == (10, 64)


def test_unsupported_rope_type_is_refused():
    config = {
        "hidden_size": 64,
        "num_attention_heads": 2,
        "max_position_embeddings": 8,
        "rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
    }
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        lk.rope_cos_sin_cache(config)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rope", ["default", "llama3", "yarn"])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 64), (9, 3, 64), (8, 1, 128)])
def test_rotary_embedding_matches_apply_rotary_pos_emb(dtype, rope, heads, kv_heads, head_dim):
    config = llama_config(rope, head_dim=head_dim, heads=heads, kv_heads=kv_heads)
    rotary = hf.LlamaRotaryEmbedding(config)
    num_tokens = 11
    positions = torch.randperm(4096)[:num_tokens]  # out of order
    q = torch.randn(num_tokens, heads, head_dim, dtype=dtype)
    k = torch.randn(num_tokens, kv_heads, head_dim, dtype=dtype)
    cos, sin = rotary(q, positions[None])  # [1, T, D] in q's dtype
    # HF layout: [B, H, T, D]
    q_hf, k_hf = hf.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    cache = lk.rope_cos_sin_cache(config, max_position=4096)
    q2, k2 = q.clone(), k.clone()
    ref.rotary_embedding(positions, q2, k2, cache, is_neox=True)
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (0, 0)
    torch.testing.assert_close(q2, q_hf[0].transpose(0, 1), atol=atol, rtol=rtol)
    torch.testing.assert_close(k2, k_hf[0].transpose(0, 1), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_qk_norm_rotary_matches_transformers_attention_prologue(dtype, family):
    """q_norm / k_norm then apply_rotary_pos_emb, as Qwen3Attention and Gemma3Attention run them
    (Gemma: the norm's 1 + w in fp32)."""
    if family == "qwen3":
        from transformers.models.qwen3 import modeling_qwen3 as fam

        norm_cls, rotate, unit_offset = fam.Qwen3RMSNorm, fam.apply_rotary_pos_emb, False
    else:
        from transformers.models.gemma3 import modeling_gemma3 as fam

        norm_cls, rotate, unit_offset = fam.Gemma3RMSNorm, fam.apply_rotary_pos_emb, True
    heads, kv_heads, head_dim, tokens = 8, 2, 128, 9
    config = llama_config("default", head_dim=head_dim, heads=heads, kv_heads=kv_heads)
    q_norm = norm_cls(head_dim, eps=1e-6).to(dtype)
    k_norm = norm_cls(head_dim, eps=1e-6).to(dtype)
    with torch.no_grad():
        q_norm.weight.copy_(torch.rand(head_dim) + 0.5)
        k_norm.weight.copy_(torch.randn(head_dim) * 0.5)
    positions = torch.randperm(4096)[:tokens]
    q = (torch.randn(tokens, heads, head_dim) * 3).to(dtype)
    k = (torch.randn(tokens, kv_heads, head_dim) * 3).to(dtype)
    cos, sin = hf.LlamaRotaryEmbedding(config)(q, positions[None])  # [1, T, D] in q's dtype
    with torch.no_grad():  # HF layout [B, H, T, D]
        q_hf = q_norm(q.transpose(0, 1)[None])
        k_hf = k_norm(k.transpose(0, 1)[None])
        q_hf, k_hf = rotate(q_hf, k_hf, cos, sin)
    cache = lk.rope_cos_sin_cache(config, max_position=4096)
    q2, k2 = q.clone(), k.clone()
    ref.qk_norm_rotary(positions, q2, k2, q_norm.weight, k_norm.weight, cache, 1e-6, unit_offset)
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (0, 0)
    torch.testing.assert_close(q2, q_hf[0].transpose(0, 1), atol=atol, rtol=rtol)
    torch.testing.assert_close(k2, k_hf[0].transpose(0, 1), atol=atol, rtol=rtol)


def test_rotary_gptj_layout_rotates_adjacent_pairs():
    """Interleaved pairs (GPT-J) == NeoX halves after permuting channels (0,2,4,6 | 1,3,5,7)."""
    cache = lk.rope_cos_sin_cache({"hidden_size": 8, "num_attention_heads": 1}, max_position=16)
    q = torch.randn(3, 1, 8)
    k = torch.randn(3, 1, 8)
    positions = torch.tensor([3, 0, 9])
    perm = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])
    q_gptj, k_gptj = q.clone(), k.clone()
    ref.rotary_embedding(positions, q_gptj, k_gptj, cache, is_neox=False)
    q_perm, k_perm = q[..., perm].clone(), k[..., perm].clone()
    ref.rotary_embedding(positions, q_perm, k_perm, cache, is_neox=True)
    inverse = torch.argsort(perm)
    torch.testing.assert_close(q_gptj, q_perm[..., inverse])
    torch.testing.assert_close(k_gptj, k_perm[..., inverse])
    assert not torch.allclose(q_gptj, q)


def test_partial_rotary_leaves_tail_channels():
    config = {"hidden_size": 128, "num_attention_heads": 2, "partial_rotary_factor": 0.5}
    cache = lk.rope_cos_sin_cache(config, max_position=32)
    assert cache.shape == (32, 32)  # rotary_dim = 64 * 0.5
    q = torch.randn(5, 2, 64)
    k = torch.randn(5, 1, 64)
    q2, k2 = q.clone(), k.clone()
    ref.rotary_embedding(torch.arange(1, 6), q2, k2, cache)
    torch.testing.assert_close(q2[..., 32:], q[..., 32:], atol=0, rtol=0)
    torch.testing.assert_close(k2[..., 32:], k[..., 32:], atol=0, rtol=0)
    assert not torch.allclose(q2[..., :32], q[..., :32])


# ---- SwiGLU ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_llama_mlp_gate(dtype):
    config = LlamaConfig(hidden_size=32, intermediate_size=75)
    mlp = hf.LlamaMLP(config).to(dtype)
    x = torch.randn(6, 2 * 75, dtype=dtype)
    gate, up = x.chunk(2, dim=-1)
    expected = mlp.act_fn(gate) * up
    torch.testing.assert_close(ref.silu_and_mul(x), expected, atol=0, rtol=0)


# ---- decode attention ----------------------------------------------------------------------------
def eager_decode_attention(q, k_cache, v_cache, seq_lens, scale):
    """transformers' eager attention with repeat_kv, one row at a time over the valid prefix."""
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]

    class _Module(torch.nn.Module):
        num_key_value_groups = heads // kv_heads
        training = False

    outs = []
    for b in range(batch):
        length = int(seq_lens[b])
        if length == 0:
            outs.append(torch.zeros(heads, head_dim, dtype=q.dtype))
            continue
        query = q[b][None, :, None, :]  # [1, H, 1, D]
        key = k_cache[b : b + 1, :, :length]
        value = v_cache[b : b + 1, :, :length]
        out, _ = hf.eager_attention_forward(_Module(), query, key, value, None, scaling=scale)
        outs.append(out[0, 0])  # eager returns [B, T, H, D]
    return torch.stack(outs)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (8, 2), (16, 2)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_attention_matches_eager_repeat_kv(heads, kv_heads, head_dim):
    batch, capacity = 5, 40
    q = torch.randn(batch, heads, head_dim)
    k_cache = torch.randn(batch + 2, kv_heads, capacity, head_dim)  # more cache rows than batch
    v_cache = torch.randn(batch + 2, kv_heads, capacity, head_dim)
    seq_lens = torch.tensor([1, 17, 40, 3, 0], dtype=torch.int32)  # mixed, incl. empty
    scale = head_dim**-0.5
    expected = eager_decode_attention(q, k_cache, v_cache, seq_lens, scale)
    actual = ref.decode_attention(q, k_cache, v_cache, seq_lens, scale)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(actual[4], torch.zeros_like(actual[4]))  # seq_len 0 -> zeros


@pytest.mark.parametrize("window", [1, 4, 16, 64])
def test_decode_attention_sliding_window_matches_transformers_mask(window):
    # transformers' own sliding-window causal mask function, for the new token at position L - 1
    # over the cache 0 .. L - 1, as an additive mask to its eager attention
    from transformers.masking_utils import sliding_window_causal_mask_function

    visible_fn = sliding_window_causal_mask_function(window)

    class _Module(torch.nn.Module):
        num_key_value_groups = 3
        training = False

    q = torch.randn(4, 9, 64)
    k_cache, v_cache = torch.randn(4, 3, 40, 64), torch.randn(4, 3, 40, 64)
    seq_lens = torch.tensor([1, 10, 40, 17], dtype=torch.int32)
    actual = ref.decode_attention(q, k_cache, v_cache, seq_lens, window=window)
    for b, length in enumerate(seq_lens.tolist()):
        visible = visible_fn(0, 0, torch.tensor(length - 1), torch.arange(length))
        mask = torch.zeros(length).masked_fill(~visible, float("-inf"))[None, None, None]
        key, value = k_cache[b : b + 1, :, :length], v_cache[b : b + 1, :, :length]
        out, _ = hf.eager_attention_forward(
            _Module(), q[b][None, :, None], key, value, mask, scaling=64**-0.5
        )
        torch.testing.assert_close(actual[b], out[0, 0], atol=1e-5, rtol=1e-5)
    full = ref.decode_attention(q, k_cache, v_cache, seq_lens)
    assert torch.allclose(actual, full) == (window >= 40)  # the window matters when shorter


def test_decode_attention_ignores_cache_beyond_seq_len():
    q = torch.randn(2, 4, 64)
    k_cache = torch.randn(2, 2, 16, 64)
    v_cache = torch.randn(2, 2, 16, 64)
    seq_lens = torch.tensor([5, 9], dtype=torch.int32)
    before = ref.decode_attention(q, k_cache, v_cache, seq_lens)
    k_cache[0, :, 5:] = float("nan")
    v_cache[1, :, 9:] = 1e4
    torch.testing.assert_close(ref.decode_attention(q, k_cache, v_cache, seq_lens), before)


def test_kv_cache_append_writes_slots_and_skips_padding():
    k_cache = torch.zeros(3, 2, 8, 4)
    v_cache = torch.zeros(3, 2, 8, 4)
    k = torch.randn(4, 2, 4)
    v = torch.randn(4, 2, 4)
    slots = torch.tensor([0 * 8 + 2, -1, 2 * 8 + 7, 3 * 8])  # (0, 2), pad, (2, 7), out of range
    ref.kv_cache_append(k, v, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache[0, :, 2], k[0])
    torch.testing.assert_close(v_cache[2, :, 7], v[2])
    written = torch.zeros(3, 8, dtype=torch.bool)
    written[0, 2] = written[2, 7] = True
    assert torch.all(k_cache.abs().sum((1, 3)).ne(0) == written)
