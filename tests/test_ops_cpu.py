"""Public ops on CPU: dispatch to the reference, opcheck of every schema, and bad-input errors."""

import pytest
import torch
from conftest import DTYPES

import llmkernels as lk
from llmkernels import reference as ref


def make_cache(batch=2, kv_heads=2, capacity=16, head_dim=64, dtype=torch.float32):
    return (
        torch.randn(batch, kv_heads, capacity, head_dim, dtype=dtype),
        torch.randn(batch, kv_heads, capacity, head_dim, dtype=dtype),
    )


def op_samples():
    """(op name, args) for every llmkernels schema, with small CPU tensors."""
    x = torch.randn(3, 33)
    weight = torch.randn(33)
    cache = lk.rope_cos_sin_cache({"hidden_size": 128, "num_attention_heads": 2}, max_position=32)
    k_cache, v_cache = make_cache()
    return [
        ("rms_norm", (torch.empty(3, 33), x, weight, 1e-6)),
        ("rms_norm", (torch.empty(3, 33), x, weight, 1e-6, True)),
        ("fused_add_rms_norm", (x.clone(), torch.randn(3, 33), weight, 1e-5)),
        ("fused_add_rms_norm", (x.clone(), torch.randn(3, 33), weight, 1e-5, True)),
        (
            "rotary_embedding",
            (torch.tensor([4, 0, 31]), torch.randn(3, 4, 64), torch.randn(3, 2, 64), cache, True),
        ),
        (
            "qk_norm_rotary",
            (
                torch.tensor([4, 0, 31]),
                torch.randn(3, 4, 64),
                torch.randn(3, 2, 64),
                torch.rand(64) + 0.5,
                torch.rand(64) + 0.5,
                cache,
                1e-6,
            ),
        ),
        ("silu_and_mul", (torch.empty(3, 16), torch.randn(3, 32))),
        ("gelu_tanh_and_mul", (torch.empty(3, 16), torch.randn(3, 32))),
        (
            "kv_cache_append",
            (
                torch.randn(3, 2, 64),
                torch.randn(3, 2, 64),
                k_cache.clone(),
                v_cache.clone(),
                torch.tensor([1, -1, 20]),
            ),
        ),
        (
            "decode_attention",
            (
                torch.empty(2, 4, 64),
                torch.randn(2, 4, 64),
                k_cache,
                v_cache,
                torch.tensor([3, 16], dtype=torch.int32),
                0.125,
                torch.empty(2, 4, 1, 66),
            ),
        ),
        (
            "int8_linear",
            (
                torch.empty(3, 5),
                torch.randn(3, 32),
                torch.randint(-127, 128, (5, 32), dtype=torch.int8),
                torch.rand(5) / 100,
            ),
        ),
        (
            "int4_linear",
            (
                torch.empty(3, 5),
                torch.randn(3, 64),
                torch.randint(0, 256, (5, 32), dtype=torch.uint8),
                torch.rand(5, 2, 2) / 100,
            ),
        ),
        (
            "sample",
            (
                torch.empty(3, dtype=torch.int64),
                torch.randn(3, 50),
                torch.tensor([0.7, 0.0, 1.0]),
                torch.tensor([5, 0, 0], dtype=torch.int32),
                torch.tensor([0.9, 1.0, 0.5]),
                torch.tensor([7, 0]),
            ),
        ),
    ]


@pytest.mark.parametrize("name,args", op_samples(), ids=[f"{n}-{len(a)}" for n, a in op_samples()])
def test_opcheck_every_op_on_cpu(name, args):
    torch.library.opcheck(getattr(torch.ops.llmkernels, name).default, args)


def test_every_schema_has_a_sample():
    from llmkernels._schemas import SCHEMAS

    assert sorted(SCHEMAS) == sorted({n for n, _ in op_samples()})


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_ops_on_cpu_equal_reference(dtype):
    x = torch.randn(2, 3, 40, dtype=dtype)
    w = torch.randn(40, dtype=dtype)
    torch.testing.assert_close(lk.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), atol=0, rtol=0)
    out = torch.empty_like(x)
    assert lk.rms_norm(x, w, out=out) is out

    r = torch.randn_like(x)
    x1, r1, x2, r2 = x.clone(), r.clone(), x.clone(), r.clone()
    lk.fused_add_rms_norm(x1, r1, w)
    ref.fused_add_rms_norm(x2, r2, w)
    assert torch.equal(x1, x2) and torch.equal(r1, r2)

    g = torch.randn(5, 22, dtype=dtype)
    torch.testing.assert_close(lk.silu_and_mul(g), ref.silu_and_mul(g), atol=0, rtol=0)


def test_strided_rows_are_accepted():
    wide = torch.randn(4, 100)
    x = wide[:, :40]  # row stride 100
    w = torch.randn(40)
    torch.testing.assert_close(lk.rms_norm(x, w), ref.rms_norm(x.contiguous(), w))


def test_rotary_on_strided_qkv_views():
    """q and k as views of a fused QKV output [T, (Hq + 2Hk) * D], as the engine uses them."""
    heads, kv_heads, head_dim, tokens = 4, 2, 64, 3
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    q_copy, k_copy = q.clone(), k.clone()
    cache = lk.rope_cos_sin_cache({"hidden_size": 256, "num_attention_heads": 4}, max_position=16)
    positions = torch.tensor([2, 9, 5])
    lk.rotary_embedding(positions, q, k, cache)
    ref.rotary_embedding(positions, q_copy, k_copy, cache)
    assert torch.equal(q, q_copy) and torch.equal(k, k_copy)
    assert torch.equal(
        qkv[:, (heads + kv_heads) * head_dim :], qkv[:, (heads + kv_heads) * head_dim :]
    )


def test_compile_sees_fake_implementations():
    """torch.compile traces through the custom ops via their fake (meta) implementations."""

    def step(x, residual, weight, g):
        lk.fused_add_rms_norm(x, residual, weight)
        return lk.silu_and_mul(g) + 1

    compiled = torch.compile(step, backend="aot_eager", fullgraph=False)
    x, r, w, g = torch.randn(2, 16), torch.randn(2, 16), torch.randn(16), torch.randn(2, 8)
    x_ref, r_ref = x.clone(), r.clone()
    out = compiled(x, r, w, g)
    ref.fused_add_rms_norm(x_ref, r_ref, w)
    torch.testing.assert_close(out, ref.silu_and_mul(g) + 1)
    torch.testing.assert_close(x, x_ref)
    torch.testing.assert_close(r, r_ref)


@pytest.mark.parametrize(
    "batch,q_heads,kv_heads,capacity,expected",
    [
        (1, 32, 4, 32768, 66),  # 4 blocks: floor(264 / 4) splits fit one wave
        (1, 64, 2, 32768, 66),  # G = 32: 2 head chunks per kv head, also 4 blocks
        (1, 9, 3, 8192, 32),  # capped at capacity / 256
        (64, 32, 8, 4096, 1),  # 512 blocks already fill 132 SMs
        (1, 32, 8, 100, 1),  # one 256-token partition
    ],
)
def test_decode_attention_split_policy(monkeypatch, batch, q_heads, kv_heads, capacity, expected):
    """The split-K count for a 132-SM GPU: one wave of 2 blocks per SM, counting a block per
    (row, kv head, chunk of 16 query heads), partitions of >= 256 tokens (host arithmetic only)."""
    from llmkernels import ops

    monkeypatch.setattr(ops, "_sm_count", lambda index: 132)
    assert ops.decode_attention_num_splits(batch, q_heads, kv_heads, capacity, "cuda:0") == expected
    assert ops.decode_attention_num_splits(batch, q_heads, kv_heads, capacity, "cpu") == 1


def test_decode_attention_split_policy_head_dim_256(monkeypatch):
    """head_dim 256 blocks take 8 query heads: G = 16 is 2 blocks per kv head."""
    from llmkernels import ops

    monkeypatch.setattr(ops, "_sm_count", lambda index: 132)
    assert ops.decode_attention_num_splits(1, 4, 1, 32768, "cuda:0", head_dim=256) == 128
    assert ops.decode_attention_num_splits(1, 32, 2, 32768, "cuda:0", head_dim=256) == 66
    assert ops.decode_attention_num_splits(1, 32, 2, 32768, "cuda:0", head_dim=128) == 128


# ---- bad inputs -------------------------------------------------------------------------------------
def test_rms_norm_errors():
    x = torch.randn(2, 8)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        lk.rms_norm([1.0], torch.ones(8))
    with pytest.raises(TypeError, match="x must have dtype"):
        lk.rms_norm(x.long(), torch.ones(8))
    with pytest.raises(TypeError, match="weight has dtype"):
        lk.rms_norm(x, torch.ones(8, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"weight must have shape \[8\]"):
        lk.rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="contiguous last dimension"):
        lk.rms_norm(torch.randn(8, 2).t(), torch.ones(8))
    with pytest.raises(ValueError, match="eps must be"):
        lk.rms_norm(x, torch.ones(8), eps=-1.0)
    with pytest.raises(ValueError, match="out must have shape"):
        lk.rms_norm(x, torch.ones(8), out=torch.empty(3, 8))


def test_fused_add_rms_norm_errors():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        lk.fused_add_rms_norm(x, torch.randn(3, 8), torch.ones(8))
    with pytest.raises(TypeError, match="residual has dtype"):
        lk.fused_add_rms_norm(x, torch.randn(2, 8).half(), torch.ones(8))


def test_rotary_errors():
    cache = lk.rope_cos_sin_cache({"hidden_size": 128, "num_attention_heads": 2}, max_position=8)
    q, k = torch.randn(3, 2, 64), torch.randn(3, 1, 64)
    with pytest.raises(TypeError, match="positions must have dtype"):
        lk.rotary_embedding(torch.tensor([0.0, 1.0, 2.0]), q, k, cache)
    with pytest.raises(ValueError, match="agree on T"):
        lk.rotary_embedding(torch.arange(2), q, k, cache)
    with pytest.raises(ValueError, match=r"positions must be in \[0, 8\)"):
        lk.rotary_embedding(torch.tensor([0, 8, 1]), q, k, cache)
    with pytest.raises(ValueError, match=r"positions must be in \[0, 8\)"):
        lk.rotary_embedding(torch.tensor([0, -1, 1]), q, k, cache)
    with pytest.raises(TypeError, match="cos_sin_cache must have dtype"):
        lk.rotary_embedding(torch.arange(3), q, k, cache.half())
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        lk.rotary_embedding(torch.arange(3), q, k, torch.randn(8, 66))
    with pytest.raises(ValueError, match="q must be 3-D"):
        lk.rotary_embedding(torch.arange(3), q.flatten(1), k, cache)


def test_silu_and_mul_errors():
    with pytest.raises(ValueError, match="last dim must be even"):
        lk.silu_and_mul(torch.randn(2, 7))
    with pytest.raises(ValueError, match="out must have shape"):
        lk.silu_and_mul(torch.randn(2, 8), out=torch.empty(2, 8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_linear_is_x_times_the_dequantized_weight(dtype):
    """The reference against quant.QuantizedWeight.dequantize, the weight it stands for."""
    from llmkernels import quant

    qw = quant.quantize_weight(torch.randn(40, 64), "int8")
    x = torch.randn(3, 64).to(dtype)
    expected = (x.double() @ qw.dequantize(torch.float64).t()).to(dtype)
    got = lk.int8_linear(x, qw.qweight, qw.scales)
    assert got.dtype == dtype and got.shape == (3, 40)
    torch.testing.assert_close(
        got, expected, **({} if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-5))
    )
    assert torch.equal(got, ref.int8_linear(x, qw.qweight, qw.scales))
    out = torch.empty(3, 40, dtype=dtype)
    assert lk.int8_linear(x, qw.qweight, qw.scales, out=out) is out and torch.equal(out, got)
    assert not lk.ops.int8_linear_supported(x, qw.qweight)  # CPU: the reference


@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_linear_is_x_times_the_dequantized_weight(dtype, group_size):
    """The reference against quant.QuantizedWeight.dequantize, the weight its tensors stand for
    (codes packed two per byte, even input in the high nibble)."""
    from llmkernels import quant

    qw = quant.quantize_weight(torch.randn(48, 128), "int4", group_size)
    scale_zero = torch.stack((qw.scales, qw.zeros), dim=-1)  # [out, in / G, 2], fp32
    x = torch.randn(3, 128).to(dtype)
    expected = (x.double() @ qw.dequantize(torch.float64).t()).to(dtype)
    got = lk.int4_linear(x, qw.qweight, scale_zero)
    assert got.dtype == dtype and got.shape == (3, 48)
    torch.testing.assert_close(
        got, expected, **({} if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-5))
    )
    assert torch.equal(got, ref.int4_linear(x, qw.qweight, scale_zero))
    out = torch.empty(3, 48, dtype=dtype)
    assert lk.int4_linear(x, qw.qweight, scale_zero, out=out) is out and torch.equal(out, got)
    assert not lk.ops.int4_linear_supported(x, qw.qweight, scale_zero)  # CPU: the reference
    # bf16 scales and zeros (the CUDA kernel's) stand for the same formula
    sz16 = scale_zero.to(torch.bfloat16)
    w16 = quant.QuantizedWeight(
        "int4", qw.shape, group_size, qw.qweight, sz16[..., 0].float(), sz16[..., 1].float()
    ).dequantize(torch.float64)
    torch.testing.assert_close(
        lk.int4_linear(x.double().float(), qw.qweight, sz16),
        (x.double() @ w16.t()).float(),
        rtol=1e-5,
        atol=1e-5,
    )


def test_int4_linear_errors():
    x, w = torch.randn(2, 64), torch.randint(0, 256, (5, 32), dtype=torch.uint8)
    sz = torch.rand(5, 2, 2)
    with pytest.raises(TypeError, match=r"weight must have dtype in \(uint8\)"):
        lk.int4_linear(x, w.to(torch.int8), sz)
    with pytest.raises(TypeError, match="scale_zero must have dtype in"):
        lk.int4_linear(x, w, sz.half())
    with pytest.raises(ValueError, match="positive multiple of 32"):
        lk.int4_linear(x[:, :48], w[:, :24], sz)
    with pytest.raises(ValueError, match=r"weight must be \[N, 32\] \(two 4-bit codes per byte"):
        lk.int4_linear(x, w[:, :16], sz)
    with pytest.raises(ValueError, match=r"scale_zero must be \[5, K / group_size, 2\]"):
        lk.int4_linear(x, w, sz[:4])
    with pytest.raises(ValueError, match=r"scale_zero must be \[5, K / group_size, 2\]"):
        lk.int4_linear(x, w, torch.rand(5, 3, 2))  # 64 inputs are not 3 whole groups
    with pytest.raises(ValueError, match="group size .* must be a multiple of 32, got 16"):
        lk.int4_linear(x, w, torch.rand(5, 4, 2))
    with pytest.raises(ValueError, match="must be contiguous"):
        lk.int4_linear(x, torch.randint(0, 256, (32, 5), dtype=torch.uint8).t(), sz)
    with pytest.raises(ValueError, match="x must be 2-D"):
        lk.int4_linear(x[None], w, sz)
    with pytest.raises(ValueError, match="out must have shape"):
        lk.int4_linear(x, w, sz, out=torch.empty(2, 4))
    with pytest.raises(ValueError, match="out must not overlap x"):
        buf = torch.randn(2, 64)
        lk.int4_linear(buf, w, sz, out=buf.view(-1)[:10].view(2, 5))


def test_qk_norm_rotary_on_cpu_is_the_reference_and_checks_arguments():
    cache = lk.rope_cos_sin_cache({"hidden_size": 256, "num_attention_heads": 2}, max_position=32)
    positions = torch.tensor([3, 0, 31])
    qkv = torch.randn(3, (4 + 2 + 2) * 128)
    q, k = qkv[:, : 4 * 128].view(3, 4, 128), qkv[:, 4 * 128 : 6 * 128].view(3, 2, 128)
    wq, wk = torch.rand(128) + 0.5, torch.rand(128) + 0.5
    q2, k2 = q.clone(), k.clone()
    lk.qk_norm_rotary(positions, q, k, wq, wk, cache, 1e-6)  # in place on the strided views
    ref.qk_norm_rotary(positions, q2, k2, wq, wk, cache, 1e-6)
    assert torch.equal(q, q2) and torch.equal(k, k2)
    assert not lk.ops.qk_norm_rotary_supported(q, cache)  # CPU: the reference
    with pytest.raises(ValueError, match=r"q_weight must be a contiguous \[128\]"):
        lk.qk_norm_rotary(positions, q, k, wq[:64], wk, cache)
    with pytest.raises(TypeError, match="k_weight must have dtype"):
        lk.qk_norm_rotary(positions, q, k, wq, wk.half(), cache)
    with pytest.raises(ValueError, match="rotary over the whole head"):
        lk.qk_norm_rotary(positions, q, k, wq, wk, cache[:, :64].contiguous())
    with pytest.raises(ValueError, match="positions must be in"):
        lk.qk_norm_rotary(torch.tensor([3, 0, 32]), q, k, wq, wk, cache)
    with pytest.raises(ValueError, match="eps"):
        lk.qk_norm_rotary(positions, q, k, wq, wk, cache, eps=-1.0)


def test_int8_linear_errors():
    x, w, s = torch.randn(2, 32), torch.randint(-127, 128, (5, 32), dtype=torch.int8), torch.rand(5)
    with pytest.raises(TypeError, match="weight must have dtype in \\(int8\\)"):
        lk.int8_linear(x, w.float(), s)
    with pytest.raises(TypeError, match="scale must have dtype in \\(float32\\)"):
        lk.int8_linear(x, w, s.half())
    with pytest.raises(ValueError, match=r"weight must be \[N, 32\]"):
        lk.int8_linear(x, w[:, :16], s)
    with pytest.raises(ValueError, match=r"scale must be \[5\]"):
        lk.int8_linear(x, w, s[:4])
    with pytest.raises(ValueError, match="must be contiguous"):
        lk.int8_linear(x, torch.randint(-127, 128, (32, 5), dtype=torch.int8).t(), s)
    with pytest.raises(ValueError, match="x must be 2-D"):
        lk.int8_linear(x[None], w, s)
    with pytest.raises(ValueError, match="out must have shape"):
        lk.int8_linear(x, w, s, out=torch.empty(2, 4))
    with pytest.raises(ValueError, match="out must not overlap x"):
        buf = torch.randn(2, 32)
        lk.int8_linear(buf, w, s, out=buf.view(-1)[:10].view(2, 5))


def test_kv_cache_append_errors():
    k_cache, v_cache = make_cache()
    k, v = torch.randn(3, 2, 64), torch.randn(3, 2, 64)
    with pytest.raises(TypeError, match="slot_mapping must have dtype"):
        lk.kv_cache_append(k, v, k_cache, v_cache, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"k must have shape \[N, Hk, D\]"):
        lk.kv_cache_append(torch.randn(3, 4, 64), v, k_cache, v_cache, torch.arange(3))
    with pytest.raises(ValueError, match="must have the same shape"):
        lk.kv_cache_append(k, v, k_cache, v_cache[:, :1], torch.arange(3))
    with pytest.raises(ValueError, match="must be contiguous"):
        lk.kv_cache_append(k, v, k_cache.transpose(1, 2), v_cache.transpose(1, 2), torch.arange(3))


def test_decode_attention_errors():
    k_cache, v_cache = make_cache()
    q = torch.randn(2, 4, 64)
    lens = torch.tensor([3, 5], dtype=torch.int32)
    with pytest.raises(TypeError, match="seq_lens must have dtype"):
        lk.decode_attention(q, k_cache, v_cache, lens.long())
    with pytest.raises(ValueError, match="seq_lens must have B = 2 entries"):
        lk.decode_attention(q, k_cache, v_cache, lens[:1])
    with pytest.raises(ValueError, match=r"seq_lens must be in \[0, 16\]"):
        lk.decode_attention(q, k_cache, v_cache, torch.tensor([3, 17], dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple of the cache's kv heads"):
        lk.decode_attention(torch.randn(2, 3, 64), k_cache, v_cache, lens)
    with pytest.raises(ValueError, match="head dim"):
        lk.decode_attention(torch.randn(2, 4, 32), k_cache, v_cache, lens)
    with pytest.raises(ValueError, match="fewer than q's batch"):
        lk.decode_attention(
            torch.randn(3, 4, 64), k_cache, v_cache, torch.tensor([1, 1, 1], dtype=torch.int32)
        )
    with pytest.raises(TypeError, match="k_cache has dtype"):
        lk.decode_attention(q.half(), k_cache, v_cache, lens)


# ---- memory overlap: racing reads and writes on the GPU, rejected on CPU and CUDA alike -----------
def test_rms_norm_in_place_allowed_partial_overlap_rejected():
    x = torch.randn(4, 8)
    w = torch.randn(8)
    expected = ref.rms_norm(x, w, 1e-6)
    y = x.clone()
    assert lk.rms_norm(y, w, out=y) is y  # exactly in place
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    buf = torch.randn(5 * 8)
    with pytest.raises(ValueError, match="out must not overlap x in memory.*in place.*allowed"):
        lk.rms_norm(buf[:32].view(4, 8), w, out=buf[8:].view(4, 8))  # shifted by one row
    with pytest.raises(ValueError, match="out must not overlap weight"):
        lk.rms_norm(x[:1], buf[:8], out=buf[:8].view(1, 8))


def test_fused_add_rms_norm_overlap():
    buf = torch.randn(5, 8)
    with pytest.raises(ValueError, match="x must not overlap residual"):
        lk.fused_add_rms_norm(buf[1:], buf[:-1], torch.ones(8))
    with pytest.raises(ValueError, match="x must not overlap weight"):
        lk.fused_add_rms_norm(buf[:1], torch.randn(1, 8), buf[0])
    # the same tensor twice is allowed: residual += residual; x = rms_norm(residual)
    r = torch.randn(3, 8)
    expected = ref.rms_norm(2 * r, torch.ones(8), 1e-6)
    lk.fused_add_rms_norm(r, r, torch.ones(8))
    torch.testing.assert_close(r, expected)


def test_silu_and_mul_rejects_any_overlap():
    x = torch.randn(1, 16)
    with pytest.raises(ValueError, match="out must not overlap x"):
        lk.silu_and_mul(x, out=x[:, :8])  # the gate half, exactly
    with pytest.raises(ValueError, match="out must not overlap x"):
        lk.silu_and_mul(x, out=x[:, 3:11])


def test_rotary_and_cache_overlap_rejected():
    cache = lk.rope_cos_sin_cache({"hidden_size": 128, "num_attention_heads": 2}, max_position=8)
    buf = torch.randn(4, 2, 64)
    with pytest.raises(ValueError, match="q must not overlap k"):
        lk.rotary_embedding(torch.arange(3), buf[:3], buf[1:], cache)  # shifted by one token
    k_cache, v_cache = make_cache()
    k, v = torch.randn(3, 2, 64), torch.randn(3, 2, 64)
    with pytest.raises(ValueError, match="k_cache must not overlap v_cache"):
        lk.kv_cache_append(k, v, k_cache, k_cache, torch.arange(3))
    with pytest.raises(ValueError, match="k_cache must not overlap k"):
        lk.kv_cache_append(
            k_cache.view(-1)[: k.numel()].view_as(k), v, k_cache, v_cache, torch.arange(3)
        )
    q = torch.randn(2, 4, 64)
    with pytest.raises(ValueError, match="out must not overlap q"):
        lk.decode_attention(q, k_cache, v_cache, torch.tensor([3, 5], dtype=torch.int32), out=q)


def test_kv_cache_append_repeated_slot_keeps_the_last_token():
    k_cache, v_cache = make_cache()  # B = 2, S = 16: 32 slots
    before_k, before_v = k_cache.clone(), v_cache.clone()
    k, v = torch.randn(6, 2, 64), torch.randn(6, 2, 64)
    lk.kv_cache_append(k, v, k_cache, v_cache, torch.tensor([3, 20, 3, -1, 3, -1]))
    assert torch.equal(k_cache[0, :, 3], k[4]) and torch.equal(v_cache[0, :, 3], v[4])
    assert torch.equal(k_cache[1, :, 4], k[1]) and torch.equal(v_cache[1, :, 4], v[1])
    untouched = torch.ones(2, 16, dtype=torch.bool)
    untouched[0, 3] = untouched[1, 4] = False
    assert torch.equal(k_cache.transpose(1, 2)[untouched], before_k.transpose(1, 2)[untouched])
    assert torch.equal(v_cache.transpose(1, 2)[untouched], before_v.transpose(1, 2)[untouched])


def test_sample_errors():
    logits = torch.randn(2, 10)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        lk.sample(logits, top_p=0.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        lk.sample(logits, top_p=1.5)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        lk.sample(logits, top_p=torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        lk.sample(logits, top_k=-1)
    with pytest.raises(ValueError, match="temperature must be finite and >= 0"):
        lk.sample(logits, temperature=-0.5)
    with pytest.raises(ValueError, match="NaN"):
        lk.sample(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="entirely -inf"):
        lk.sample(torch.tensor([[float("-inf")] * 3, [1.0, 2.0, 3.0]]))
    with pytest.raises(ValueError, match="logits must be 2-D"):
        lk.sample(torch.randn(10))
    with pytest.raises(ValueError, match=r"temperature must be a scalar or a \[B\]"):
        lk.sample(logits, temperature=torch.ones(3))
    with pytest.raises(ValueError, match="rng_state must be int64"):
        lk.sample(logits, rng_state=torch.zeros(3, dtype=torch.int64))


def test_sample_seeded_and_greedy():
    logits = torch.randn(4, 100)
    a = lk.sample(logits, temperature=1.0, seed=123)
    b = lk.sample(logits, temperature=1.0, seed=123)
    assert torch.equal(a, b)
    assert torch.equal(lk.sample(logits, temperature=0.0), logits.argmax(-1))
    state = lk.new_rng_state("cpu", seed=5)
    first = lk.sample(logits[:1].expand(64, 100), rng_state=state)
    assert state.tolist() == [5, 1]  # offset advanced
    second = lk.sample(logits[:1].expand(64, 100), rng_state=state)
    assert not torch.equal(first, second)  # fresh numbers after the advance
