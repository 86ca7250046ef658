"""CUDA kernels of the per-layer memory-bound ops (rms_norm, fused_add_rms_norm, both also with
Gemma's unit_offset, rotary_embedding, silu_and_mul, gelu_tanh_and_mul) against the pure-PyTorch
reference, on the GPU.

Covers awkward sizes (odd hidden sizes take the scalar path, aligned ones the 16-byte path,
very wide rows the uncached tail), strided and misaligned rows, GQA head counts, partial rotary,
both RoPE layouts, out-of-range positions, CUDA-graph capture and ``torch.library.opcheck``.
"""

import pytest
import torch
from conftest import DTYPES, assert_close, requires_cuda

import llmkernels as lk
from llmkernels import reference as ref

pytestmark = [requires_cuda, pytest.mark.cuda]

HIDDEN = [1, 7, 769, 2048, 5125, 8192]
ROWS = [1, 3, 8192]
EPS = 1e-5


def _randn(*shape, dtype, scale=2.0):
    return (torch.randn(*shape, device="cuda", dtype=torch.float32) * scale).to(dtype)


def _weight(hidden, dtype):
    # Not all ones, so the weight multiply (and its rounding) is exercised.
    return (1.0 + 0.5 * torch.randn(hidden, device="cuda")).to(dtype)


def _strided(rows, hidden, dtype, pad, offset):
    """``[rows, hidden]`` view of a wider buffer: row stride hidden + pad + offset, base offset."""
    wide = _randn(rows, hidden + pad + offset, dtype=dtype)
    return wide, wide[:, offset : offset + hidden]


# ---- rms_norm -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm(rows, hidden, dtype):
    x = _randn(rows, hidden, dtype=dtype)
    w = _weight(hidden, dtype)
    x_before = x.clone()
    out = lk.rms_norm(x, w, eps=EPS)
    assert_close(out, ref.rms_norm(x_before, w, EPS))
    assert torch.equal(x, x_before)


# pad 8 keeps 16-byte rows (vector path with stride != H); pad 3 and offset 1 force the scalar
# path. 300 rows take the prefill launch policy, 5 rows the decode one.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [769, 2048])
@pytest.mark.parametrize("rows", [5, 300])
@pytest.mark.parametrize("pad, offset", [(8, 0), (3, 0), (16, 1)])
def test_rms_norm_strided_rows(rows, hidden, dtype, pad, offset):
    wide, x = _strided(rows, hidden, dtype, pad, offset)
    wide_before = wide.clone()
    w = _weight(hidden, dtype)
    out = lk.rms_norm(x, w, eps=EPS)
    assert_close(out, ref.rms_norm(x.clone(), w, EPS))
    assert torch.equal(wide, wide_before)


# Rows wider than the per-thread register cache re-read their tail (vector and scalar paths).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [40000, 40001])
@pytest.mark.parametrize("rows", [2, 300])
def test_rms_norm_wide_rows(rows, hidden, dtype):
    x = _randn(rows, hidden, dtype=dtype)
    w = _weight(hidden, dtype)
    assert_close(lk.rms_norm(x, w, eps=EPS), ref.rms_norm(x, w, EPS))


def test_rms_norm_3d_and_out():
    x = _randn(2, 7, 512, dtype=torch.bfloat16)
    w = _weight(512, torch.bfloat16)
    out = torch.full_like(x, 7.0)
    got = lk.rms_norm(x, w, eps=EPS, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert_close(out, ref.rms_norm(x, w, EPS))


def test_rms_norm_large_magnitude_bf16():
    # Squares of 1e4 (1e8) are far past fp16 and lose precision in bf16: statistics must be fp32.
    x = _randn(4, 4096, dtype=torch.bfloat16, scale=1e4)
    w = _weight(4096, torch.bfloat16)
    out = lk.rms_norm(x, w, eps=EPS)
    assert torch.isfinite(out).all()
    assert_close(out, ref.rms_norm(x, w, EPS))


# ---- fused_add_rms_norm ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_fused_add_rms_norm(rows, hidden, dtype):
    x = _randn(rows, hidden, dtype=dtype)
    residual = _randn(rows, hidden, dtype=dtype)
    w = _weight(hidden, dtype)
    x_ref, residual_ref = x.clone(), residual.clone()
    lk.fused_add_rms_norm(x, residual, w, eps=EPS)
    ref.fused_add_rms_norm(x_ref, residual_ref, w, EPS)
    assert_close(residual, residual_ref)
    assert_close(x, x_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [769, 2048, 40000])
@pytest.mark.parametrize("rows", [5, 300])
@pytest.mark.parametrize(
    "x_layout, res_layout", [((8, 0), (24, 0)), ((3, 0), (8, 0)), ((8, 0), (8, 1))]
)
def test_fused_add_rms_norm_strided(rows, hidden, dtype, x_layout, res_layout):
    x_wide, x = _strided(rows, hidden, dtype, *x_layout)
    r_wide, residual = _strided(rows, hidden, dtype, *res_layout)
    w = _weight(hidden, dtype)
    x_wide_ref, r_wide_ref = x_wide.clone(), r_wide.clone()
    x_ref = x_wide_ref[:, x_layout[1] : x_layout[1] + hidden]
    residual_ref = r_wide_ref[:, res_layout[1] : res_layout[1] + hidden]
    lk.fused_add_rms_norm(x, residual, w, eps=EPS)
    ref.fused_add_rms_norm(x_ref, residual_ref, w, EPS)
    # Whole buffers: the slices match and the padding around them is untouched.
    assert_close(r_wide, r_wide_ref)
    assert_close(x_wide, x_wide_ref)


def test_fused_add_rms_norm_3d():
    x = _randn(2, 3, 1024, dtype=torch.float16)
    residual = _randn(2, 3, 1024, dtype=torch.float16)
    w = _weight(1024, torch.float16)
    x_ref, residual_ref = x.clone(), residual.clone()
    lk.fused_add_rms_norm(x, residual, w, eps=EPS)
    ref.fused_add_rms_norm(x_ref, residual_ref, w, EPS)
    assert_close(residual, residual_ref)
    assert_close(x, x_ref)


# ---- rotary_embedding -----------------------------------------------------------------------------
def _cos_sin_cache(max_pos, rot, base=10000.0):
    inv_freq = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).cuda()


def _qk(tokens, num_q_heads, num_kv_heads, head_dim, dtype, layout):
    """(buffers, views): random buffers and a function mapping buffers (or clones of them) to
    ``q [T, Hq, D]`` and ``k [T, Hk, D]`` views in the given layout."""
    heads = num_q_heads + num_kv_heads
    if layout == "contiguous":  # separate contiguous q and k
        bufs = [
            _randn(tokens, num_q_heads, head_dim, dtype=dtype),
            _randn(tokens, num_kv_heads, head_dim, dtype=dtype),
        ]
        return bufs, lambda b: (b[0], b[1])
    if layout == "fused_qkv":  # slices of a QKV projection output [T, (Hq + 2 Hk) * D]
        bufs = [_randn(tokens, (heads + num_kv_heads) * head_dim, dtype=dtype)]

        def views(b):
            q = b[0][:, : num_q_heads * head_dim].view(tokens, num_q_heads, head_dim)
            k = b[0][:, num_q_heads * head_dim : heads * head_dim]
            return q, k.view(tokens, num_kv_heads, head_dim)

        return bufs, views
    if layout == "padded_heads":  # head stride D + 8: vector path with head stride != D
        bufs = [_randn(tokens, heads, head_dim + 8, dtype=dtype)]
        first = 0
    else:  # "misaligned": base shifted by one element, odd head stride: scalar path
        bufs = [_randn(tokens, heads, head_dim + 1, dtype=dtype)]
        first = 1

    def strided_views(b):
        view = b[0][..., first : first + head_dim]
        return view[:, :num_q_heads], view[:, num_q_heads:]

    return bufs, strided_views


ROT_CHOICES = ["full", "half", "odd_half"]


def _rot(head_dim, choice):
    # odd_half: rot/2 odd, so no 16-byte unit fits and the scalar path runs.
    return {"full": head_dim, "half": head_dim // 2, "odd_half": head_dim - 6}[choice]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_q_heads, num_kv_heads", [(32, 8), (9, 3), (32, 4)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("rot_choice", ROT_CHOICES)
@pytest.mark.parametrize("is_neox", [True, False])
def test_rotary_embedding(dtype, num_q_heads, num_kv_heads, head_dim, rot_choice, is_neox):
    max_pos = 4096
    positions = torch.randperm(max_pos, device="cuda")[:37]  # out of order, int64
    _check_rotary(
        positions,
        num_q_heads,
        num_kv_heads,
        head_dim,
        _rot(head_dim, rot_choice),
        dtype,
        "fused_qkv",
        is_neox,
        max_pos,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "fused_qkv", "padded_heads", "misaligned"])
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("tokens", [1, 300])
def test_rotary_embedding_layouts(dtype, layout, pos_dtype, is_neox, tokens):
    max_pos = 2048
    # from 1: position 0 is the identity rotation, which the "something rotated" check rejects
    positions = torch.randint(1, max_pos, (tokens,), device="cuda", dtype=pos_dtype)
    _check_rotary(positions, 32, 8, 128, 128, dtype, layout, is_neox, max_pos)


def _check_rotary(
    positions, num_q_heads, num_kv_heads, head_dim, rot, dtype, layout, is_neox, max_pos
):
    cache = _cos_sin_cache(max_pos, rot)
    bufs, views = _qk(positions.shape[0], num_q_heads, num_kv_heads, head_dim, dtype, layout)
    originals = [b.clone() for b in bufs]
    bufs_ref = [b.clone() for b in bufs]
    lk.rotary_embedding(positions, *views(bufs), cache, is_neox=is_neox)
    ref.rotary_embedding(positions, *views(bufs_ref), cache, is_neox)
    # Whole buffers: rotated channels match; channels >= rot, v and padding are untouched.
    for buf, buf_ref, original in zip(bufs, bufs_ref, originals):
        assert_close(buf, buf_ref)
        assert not torch.equal(buf, original)  # something was rotated


def test_rotary_embedding_torch_ops_direct():
    # The op itself (no Python validation) on a GQA fused-QKV layout, GPT-J, int32 positions.
    positions = torch.tensor([5, 0, 4095, 17], device="cuda", dtype=torch.int32)
    cache = _cos_sin_cache(4096, 64)
    bufs, views = _qk(4, 9, 3, 64, torch.bfloat16, "fused_qkv")
    bufs_ref = [b.clone() for b in bufs]
    torch.ops.llmkernels.rotary_embedding(positions, *views(bufs), cache, False)
    ref.rotary_embedding(positions, *views(bufs_ref), cache, False)
    assert_close(bufs[0], bufs_ref[0])


@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_out_of_range_positions_untouched(pos_dtype, dtype):
    max_pos = 64
    big = 2**31 - 1 if pos_dtype == torch.int32 else 2**40
    positions = torch.tensor(
        [3, -1, max_pos, 0, big, max_pos - 1, -(2**20)], dtype=pos_dtype, device="cuda"
    )
    valid = torch.tensor([True, False, False, True, False, True, False], device="cuda")
    cache = _cos_sin_cache(max_pos, 128)
    q = _randn(7, 8, 128, dtype=dtype)
    k = _randn(7, 2, 128, dtype=dtype)
    q_before, k_before = q.clone(), k.clone()
    lk.rotary_embedding(positions, q, k, cache)  # CUDA: positions are not checked on the host
    torch.cuda.synchronize()
    assert torch.equal(q[~valid], q_before[~valid])
    assert torch.equal(k[~valid], k_before[~valid])
    q_ref, k_ref = q_before[valid].clone(), k_before[valid].clone()
    ref.rotary_embedding(positions[valid], q_ref, k_ref, cache)
    assert_close(q[valid], q_ref)
    assert_close(k[valid], k_ref)


# ---- Gemma's (1 + w) norms ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [7, 256, 640, 769, 5125])
@pytest.mark.parametrize("rows", [1, 3, 8192])
def test_unit_offset_norms(rows, hidden, dtype):
    x, residual = _randn(rows, hidden, dtype=dtype), _randn(rows, hidden, dtype=dtype)
    w = (0.5 * torch.randn(hidden, device="cuda")).to(dtype)  # Gemma stores scale - 1, near 0
    assert_close(lk.rms_norm(x, w, EPS, unit_offset=True), ref.rms_norm(x, w, EPS, True))
    x_ref, residual_ref = x.clone(), residual.clone()
    lk.fused_add_rms_norm(x, residual, w, EPS, unit_offset=True)
    ref.fused_add_rms_norm(x_ref, residual_ref, w, EPS, unit_offset=True)
    assert torch.equal(residual, residual_ref)  # the add is exact in both
    assert_close(x, x_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unit_offset_norm_strided_heads(dtype):
    # Gemma 3's q/k norm: per head of a fused QKV row, D = 256
    qkv = _randn(9, (4 + 2) * 256, dtype=dtype)
    q = qkv[:, : 4 * 256].reshape(-1, 256)  # a copy; the strided rows come next
    w = (0.5 * torch.randn(256, device="cuda")).to(dtype)
    assert_close(lk.rms_norm(q, w, EPS, unit_offset=True), ref.rms_norm(q, w, EPS, True))
    rows = qkv[:, 4 * 256 : 5 * 256]  # row stride 6 * 256
    assert_close(lk.rms_norm(rows, w, EPS, unit_offset=True), ref.rms_norm(rows, w, EPS, True))


# ---- silu_and_mul / gelu_tanh_and_mul ------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_silu_and_mul(rows, inter, dtype):
    x = _randn(rows, 2 * inter, dtype=dtype)
    assert_close(lk.silu_and_mul(x), ref.silu_and_mul(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [769, 2048])
@pytest.mark.parametrize("rows", [5, 300])
@pytest.mark.parametrize("pad, offset", [(16, 0), (3, 0), (16, 1)])
def test_silu_and_mul_strided_rows(rows, inter, dtype, pad, offset):
    wide, x = _strided(rows, 2 * inter, dtype, pad, offset)
    wide_before = wide.clone()
    out = torch.empty(rows, inter, dtype=dtype, device="cuda")
    torch.ops.llmkernels.silu_and_mul(out, x)
    assert_close(out, ref.silu_and_mul(x.clone()))
    assert torch.equal(wide, wide_before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_extremes_and_3d(dtype):
    x = _randn(2, 5, 2 * 1024, dtype=dtype)
    x[0, 0, :6] = torch.tensor([-100.0, 100.0, -30.0, 30.0, 0.0, -0.0], dtype=dtype)
    out = lk.silu_and_mul(x)
    assert out.shape == (2, 5, 1024)
    assert torch.isfinite(out).all()
    assert_close(out, ref.silu_and_mul(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [7, 2048, 5125])
@pytest.mark.parametrize("rows", [1, 300])
def test_gelu_tanh_and_mul(rows, inter, dtype):
    x = _randn(rows, 2 * inter, dtype=dtype)
    x[0, :6] = torch.tensor([-100.0, 100.0, -30.0, 30.0, 0.0, -0.0], dtype=dtype)
    out = lk.gelu_tanh_and_mul(x)
    assert torch.isfinite(out).all()
    assert_close(out, ref.gelu_tanh_and_mul(x))
    wide, strided = _strided(rows, 2 * inter, dtype, 3, 1)  # scalar path
    assert_close(lk.gelu_tanh_and_mul(strided), ref.gelu_tanh_and_mul(strided.clone()))


# ---- empty inputs ----------------------------------------------------------------------------------
def test_zero_rows():
    dtype = torch.bfloat16
    w = _weight(64, dtype)
    assert lk.rms_norm(torch.empty(0, 64, dtype=dtype, device="cuda"), w).shape == (0, 64)
    lk.fused_add_rms_norm(
        torch.empty(0, 64, dtype=dtype, device="cuda"),
        torch.empty(0, 64, dtype=dtype, device="cuda"),
        w,
    )
    assert lk.silu_and_mul(torch.empty(0, 128, dtype=dtype, device="cuda")).shape == (0, 64)
    lk.rotary_embedding(
        torch.empty(0, dtype=torch.int64, device="cuda"),
        torch.empty(0, 4, 64, dtype=dtype, device="cuda"),
        torch.empty(0, 2, 64, dtype=dtype, device="cuda"),
        _cos_sin_cache(16, 64),
    )
    torch.cuda.synchronize()


# ---- argument checks of the ops themselves (direct torch.ops callers skip ops.py) ---------------------
def _misuse_tensors() -> dict:
    """Valid bf16 CUDA inputs the misuses below start from (made at test time: CUDA only)."""
    x = _randn(4, 64, dtype=torch.bfloat16)
    return dict(
        x=x,
        out=torch.empty_like(x),
        q=_randn(2, 4, 64, dtype=torch.bfloat16),
        k=_randn(2, 2, 64, dtype=torch.bfloat16),
        positions=torch.zeros(2, dtype=torch.int64, device="cuda"),
    )


_ops = torch.ops.llmkernels
# Raw op calls (no ops.py validation in front) that the C++ checks must refuse:
# name -> (call on _misuse_tensors(), message pattern).
DIRECT_OP_MISUSES = {
    "rms_norm weight dtype": (
        lambda t: _ops.rms_norm(t["out"], t["x"], _weight(64, torch.float32), 1e-6),
        "dtype",
    ),
    "rms_norm weight shape": (
        lambda t: _ops.rms_norm(t["out"], t["x"], _weight(32, torch.bfloat16), 1e-6),
        "shape",
    ),
    "fused_add_rms_norm residual on CPU": (
        lambda t: _ops.fused_add_rms_norm(t["x"], t["x"].cpu(), _weight(64, torch.bfloat16), 1e-6),
        "CUDA",
    ),
    "silu_and_mul out shape": (
        lambda t: _ops.silu_and_mul(
            torch.empty(4, 64, dtype=torch.bfloat16, device="cuda"), t["x"]
        ),
        "out",
    ),
    "rotary half cache": (
        lambda t: _ops.rotary_embedding(
            t["positions"], t["q"], t["k"], _cos_sin_cache(8, 64).half(), True
        ),
        "Float",
    ),
    "rotary odd rotary dim": (
        lambda t: _ops.rotary_embedding(
            t["positions"], t["q"], t["k"], _cos_sin_cache(8, 64)[:, :63].contiguous(), True
        ),
        "even",
    ),
}


# One case per misuse: the H200 run saw this test's process die of a segfault (not reproduced on
# the CPU with the same check code), and a crash names only the test, not the call.
@pytest.mark.parametrize("case", list(DIRECT_OP_MISUSES))
def test_direct_op_argument_checks(case):
    call, pattern = DIRECT_OP_MISUSES[case]
    tensors = _misuse_tensors()
    with pytest.raises(RuntimeError, match=pattern):
        call(tensors)


# ---- qk_norm_rotary (Qwen3, Gemma 3: per-head norm + rotary in one pass) --------------------------------
def _qk_views(tokens, num_q_heads, num_kv_heads, head_dim, dtype):
    """A random fused QKV output [T, (Hq + 2 Hk) D], its q and k views, and the function that
    takes those views of a buffer list (``_qk``'s "fused_qkv" layout)."""
    bufs, views = _qk(tokens, num_q_heads, num_kv_heads, head_dim, dtype, "fused_qkv")
    return (bufs[0], *views(bufs), views)


def _norm_weight(head_dim, dtype, unit_offset):
    w = (
        0.5 * torch.randn(head_dim, device="cuda")
        if unit_offset
        else 0.5 + torch.rand(head_dim, device="cuda")
    )
    return w.to(dtype)


def _assert_head_close(got, expected, dtype):
    """The norm's fp32 sum differs from the reference's in order only (see _assert_ulps), and the
    rotary's products and difference carry that on: bound each head's error by its scale."""
    scale = expected.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-30)
    rel = ((got.float() - expected.float()).abs() / scale).max().item()
    limit = (
        16 * torch.finfo(torch.float32).eps
        if dtype == torch.float32
        else 2 * torch.finfo(dtype).eps
    )
    assert rel <= limit, f"max error {rel:.3g} of a head's scale (limit {limit:.3g})"
    if dtype != torch.float32:  # a sum-order flip of a 16-bit rounding is rare (~1e-4)
        assert (got == expected).float().mean().item() >= 0.99


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
# 11 and 7 heads leave the last block of 4 warps part-filled
@pytest.mark.parametrize(
    "tokens,num_q_heads,num_kv_heads", [(1, 16, 8), (5, 9, 2), (3, 5, 2), (300, 32, 8)]
)
@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama_norm", "gemma_norm"])
def test_qk_norm_rotary_matches_reference(
    unit_offset, tokens, num_q_heads, num_kv_heads, head_dim, dtype
):
    qkv, q, k, _ = _qk_views(tokens, num_q_heads, num_kv_heads, head_dim, dtype)
    v_before = qkv[:, (num_q_heads + num_kv_heads) * head_dim :].clone()
    cache = _cos_sin_cache(512, head_dim)
    positions = torch.randint(0, 512, (tokens,), device="cuda", dtype=torch.int32)
    wq, wk = _norm_weight(head_dim, dtype, unit_offset), _norm_weight(head_dim, dtype, unit_offset)
    assert lk.ops.qk_norm_rotary_supported(q, cache)
    q_ref, k_ref = q.clone(), k.clone()
    lk.qk_norm_rotary(positions, q, k, wq, wk, cache, EPS, unit_offset=unit_offset)
    ref.qk_norm_rotary(positions, q_ref, k_ref, wq, wk, cache, EPS, unit_offset)
    _assert_head_close(q, q_ref, dtype)
    _assert_head_close(k, k_ref, dtype)
    assert torch.equal(qkv[:, (num_q_heads + num_kv_heads) * head_dim :], v_before)  # v untouched


def test_qk_norm_rotary_out_of_range_position_normalizes_without_rotating():
    dtype, head_dim = torch.bfloat16, 128
    _, q, k, _ = _qk_views(3, 4, 2, head_dim, dtype)
    cache = _cos_sin_cache(64, head_dim)
    positions = torch.tensor([5, 64, -1], device="cuda")  # int64, two out of range
    wq, wk = _norm_weight(head_dim, dtype, False), _norm_weight(head_dim, dtype, False)
    q_in, k_in = q.clone(), k.clone()
    torch.ops.llmkernels.qk_norm_rotary(positions, q, k, wq, wk, cache, EPS)  # raw op: no check
    for t in (1, 2):
        _assert_head_close(q[t], ref.rms_norm(q_in[t], wq, EPS), dtype)
        _assert_head_close(k[t], ref.rms_norm(k_in[t], wk, EPS), dtype)


def test_qk_norm_rotary_strided_positions_and_graph_replay():
    dtype, head_dim, tokens = torch.float16, 128, 4
    qkv, q, k, views = _qk_views(tokens, 16, 4, head_dim, dtype)
    cache = _cos_sin_cache(256, head_dim)
    positions = torch.randint(0, 256, (2 * tokens,), device="cuda")[::2]  # stride 2
    wq, wk = _norm_weight(head_dim, dtype, False), _norm_weight(head_dim, dtype, False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        lk.qk_norm_rotary(positions, q, k, wq, wk, cache, EPS)  # warm-up off the capture stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lk.qk_norm_rotary(positions, q, k, wq, wk, cache, EPS)
    for _ in range(2):
        fresh = _randn(*qkv.shape, dtype=dtype)
        qkv.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        q_eager, k_eager = views([fresh])
        assert not torch.equal(q, q_eager)  # the replay did write
        lk.qk_norm_rotary(positions.contiguous(), q_eager, k_eager, wq, wk, cache, EPS)
        assert torch.equal(q, q_eager) and torch.equal(k, k_eager)


def test_qk_norm_rotary_raw_op_checks():
    _, q, k, _ = _qk_views(2, 4, 2, 96, torch.bfloat16)
    w = torch.ones(96, device="cuda", dtype=torch.bfloat16)
    positions = torch.zeros(2, dtype=torch.int64, device="cuda")
    with pytest.raises(RuntimeError, match="head_dim must be 64, 128 or 256, got 96"):
        torch.ops.llmkernels.qk_norm_rotary(positions, q, k, w, w, _cos_sin_cache(8, 96), EPS)
    _, q, k, _ = _qk_views(2, 4, 2, 64, torch.bfloat16)
    w = torch.ones(64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"cos_sin_cache must be \[max_pos, 64\]"):
        torch.ops.llmkernels.qk_norm_rotary(positions, q, k, w, w, _cos_sin_cache(8, 32), EPS)
    with pytest.raises(RuntimeError, match="q_weight and k_weight must have q's dtype"):
        torch.ops.llmkernels.qk_norm_rotary(
            positions, q, k, w.float(), w, _cos_sin_cache(8, 64), EPS
        )


# ---- opcheck -----------------------------------------------------------------------------------------
def _opcheck_cases():
    dtype = torch.bfloat16
    x = _randn(5, 96, dtype=dtype)
    w = _weight(96, dtype)
    wide = _randn(5, 2 * 96 + 16, dtype=dtype)
    # q and k strided (head stride 72) but on separate buffers: opcheck's AOT test would turn
    # two mutated views of one buffer into a synthetic base, which is not what is under test here.
    q = _randn(3, 8, 72, dtype=dtype)[..., :64]
    k = _randn(3, 2, 72, dtype=dtype)[..., :64]
    positions = torch.tensor([2, 0, 7], device="cuda")
    return {
        "rms_norm": (torch.zeros_like(x), x, w, 1e-6),
        "rms_norm_strided": (torch.zeros(5, 96, dtype=dtype, device="cuda"), wide[:, :96], w, 1e-6),
        "fused_add_rms_norm": (x.clone(), _randn(5, 96, dtype=dtype), w, 1e-6),
        "rotary_embedding": (positions, q, k, _cos_sin_cache(8, 64), True),
        "silu_and_mul": (torch.zeros(5, 96, dtype=dtype, device="cuda"), wide[:, : 2 * 96]),
        "gelu_tanh_and_mul": (torch.zeros(5, 96, dtype=dtype, device="cuda"), wide[:, : 2 * 96]),
        "rms_norm_offset": (torch.zeros_like(x), x, w, 1e-6, True),
        "fused_add_rms_norm_offset": (x.clone(), _randn(5, 96, dtype=dtype), w, 1e-6, True),
        "qk_norm_rotary": (
            positions,
            _randn(3, 8, 128, dtype=dtype)[..., :64].contiguous(),
            _randn(3, 2, 64, dtype=dtype),
            _weight(64, dtype),
            _weight(64, dtype),
            _cos_sin_cache(8, 64),
            1e-6,
            True,
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "rms_norm",
        "rms_norm_strided",
        "fused_add_rms_norm",
        "rotary_embedding",
        "silu_and_mul",
        "gelu_tanh_and_mul",
        "rms_norm_offset",
        "fused_add_rms_norm_offset",
        "qk_norm_rotary",
    ],
)
def test_opcheck(case):
    op_name = case.removesuffix("_strided").removesuffix("_offset")
    args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.llmkernels, op_name).default, args)


# ---- CUDA graph capture --------------------------------------------------------------------------------
def test_cuda_graph_capture_and_replay():
    dtype = torch.bfloat16
    tokens, num_q_heads, num_kv_heads, head_dim, inter = 4, 16, 4, 128, 5632
    hidden = num_q_heads * head_dim
    w = _weight(hidden, dtype)
    cache = _cos_sin_cache(512, head_dim)
    # Static inputs / outputs, as in a captured decode step.
    static = {
        "hidden": _randn(tokens, hidden, dtype=dtype),
        "residual": _randn(tokens, hidden, dtype=dtype),
        "qkv": _randn(tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, dtype=dtype),
        "gate_up": _randn(tokens, 2 * inter, dtype=dtype),
        "positions": torch.arange(tokens, device="cuda", dtype=torch.int32),
    }
    normed = torch.empty(tokens, hidden, dtype=dtype, device="cuda")
    act = torch.empty(tokens, inter, dtype=dtype, device="cuda")
    gelu = torch.empty(tokens, inter, dtype=dtype, device="cuda")
    gemma_normed = torch.empty(tokens, hidden, dtype=dtype, device="cuda")

    def step(t):
        lk.fused_add_rms_norm(t["hidden"], t["residual"], w, eps=EPS)
        lk.rms_norm(t["residual"], w, eps=EPS, out=normed)
        qkv = t["qkv"]
        q = qkv[:, : num_q_heads * head_dim].view(tokens, num_q_heads, head_dim)
        k = qkv[:, num_q_heads * head_dim : (num_q_heads + num_kv_heads) * head_dim]
        lk.rotary_embedding(t["positions"], q, k.view(tokens, num_kv_heads, head_dim), cache)
        lk.silu_and_mul(t["gate_up"], out=act)
        lk.gelu_tanh_and_mul(t["gate_up"], out=gelu)
        lk.rms_norm(t["residual"], w, eps=EPS, out=gemma_normed, unit_offset=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(static)  # warm-up on a side stream, as the torch docs show
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(static)

    for round_ in range(2):
        new = {
            "hidden": _randn(tokens, hidden, dtype=dtype),
            "residual": _randn(tokens, hidden, dtype=dtype),
            "qkv": _randn(tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, dtype=dtype),
            "gate_up": _randn(tokens, 2 * inter, dtype=dtype),
            "positions": torch.randint(0, 512, (tokens,), device="cuda", dtype=torch.int32),
        }
        for name, value in new.items():
            static[name].copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        replayed = {name: t.clone() for name, t in static.items()}
        replayed_normed, replayed_act = normed.clone(), act.clone()
        replayed_gelu, replayed_gemma = gelu.clone(), gemma_normed.clone()

        eager = {name: value.clone() for name, value in new.items()}
        step(eager)
        torch.cuda.synchronize()
        for name in new:
            assert torch.equal(replayed[name], eager[name]), f"round {round_}: {name}"
        assert torch.equal(replayed_normed, normed), f"round {round_}: rms_norm out"
        assert torch.equal(replayed_act, act), f"round {round_}: silu_and_mul out"
        assert torch.equal(replayed_gelu, gelu), f"round {round_}: gelu_tanh_and_mul out"
        assert torch.equal(replayed_gemma, gemma_normed), f"round {round_}: unit_offset out"
        assert not torch.equal(replayed["hidden"], new["hidden"])  # the graph did run


# ---- exactness against the reference run by PyTorch on the GPU --------------------------------------
def _ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Units in the last place between two same-dtype float tensors (bit patterns made monotonic)."""
    int_dtype, magnitude = (
        (torch.int32, 0x7FFFFFFF) if a.dtype == torch.float32 else (torch.int16, 0x7FFF)
    )

    def ordered(t):
        bits = t.contiguous().view(int_dtype).long()
        return torch.where(bits < 0, -(bits & magnitude), bits)

    return (ordered(a) - ordered(b)).abs()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [7, 2048, 5125])
def test_silu_and_mul_bit_identical_to_reference(inter, dtype):
    # same op order as torch's silu then multiply, each rounded, no FMA contraction
    x = _randn(37, 2 * inter, dtype=dtype)
    assert torch.equal(lk.silu_and_mul(x), ref.silu_and_mul(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [7, 2048, 5125])
def test_gelu_tanh_and_mul_within_an_ulp_of_reference(inter, dtype):
    # torch's CUDA gelu(approximate="tanh") op order in fp32 and tanhf: expected bit-identical;
    # allowed one ulp of the dtype where tanhf's rounding could differ
    x = _randn(37, 2 * inter, dtype=dtype)
    ulps = _ulp_distance(lk.gelu_tanh_and_mul(x), ref.gelu_tanh_and_mul(x))
    assert ulps.max().item() <= 1
    assert (ulps == 0).float().mean().item() >= 0.99


def _assert_ulps(
    ulps: torch.Tensor, dtype: torch.dtype, fp32_max: int, identical: float, half_max: int = 2
) -> None:
    """inv_rms differs from the reference's by a few fp32 ulps (the order of the fp32 sum of
    squares). A 16-bit result rounds ``x * inv_rms`` first, which that difference rarely moves by
    an ulp; the weight multiply can turn that ulp into two ulps of the product when the product
    falls into the binade below (the H200 showed 2). So: at most 2 ulps, mostly bit-identical. An
    fp32 result shows the difference in every element of a row (about a fifth of the rows on the
    H200, up to 4 ulps), so there the bound is on the worst and the mean distance."""
    if dtype == torch.float32:
        assert ulps.max().item() <= fp32_max
        assert ulps.float().mean().item() <= 1.0
    else:
        assert ulps.max().item() <= half_max
        assert (ulps == 0).float().mean().item() >= identical


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [640, 769])
def test_unit_offset_rms_norm_within_ulps(hidden, dtype):
    # inv_rms may differ from the reference by a few fp32 ulps (sum order); the result is rounded
    # once from fp32: within one ulp of a 16-bit dtype, a few of fp32
    x = _randn(1000, hidden, dtype=dtype)
    w = (0.5 * torch.randn(hidden, device="cuda")).to(dtype)
    ulps = _ulp_distance(lk.rms_norm(x, w, EPS, unit_offset=True), ref.rms_norm(x, w, EPS, True))
    _assert_ulps(ulps, dtype, fp32_max=4, identical=0.9, half_max=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rot_choice", ["full", "odd_half"])
def test_rotary_bit_identical_to_reference(dtype, is_neox, rot_choice):
    tokens, head_dim = 61, 128
    cache = torch.randn(512, _rot(head_dim, rot_choice), device="cuda")
    positions = torch.randint(0, 512, (tokens,), device="cuda")
    q, k = _randn(tokens, 8, head_dim, dtype=dtype), _randn(tokens, 2, head_dim, dtype=dtype)
    q_ref, k_ref = q.clone(), k.clone()
    lk.rotary_embedding(positions, q, k, cache, is_neox=is_neox)
    ref.rotary_embedding(positions, q_ref, k_ref, cache, is_neox)
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [769, 4096])
def test_rms_norm_within_ulps_and_mostly_bit_identical(hidden, dtype):
    # The only difference from the reference is the fp32 sum's order (see _assert_ulps).
    x = _randn(1000, hidden, dtype=dtype)
    w = (0.5 + 0.5 * torch.rand(hidden, device="cuda")).clamp(max=1.0).to(dtype)
    ulps = _ulp_distance(lk.rms_norm(x, w, eps=EPS), ref.rms_norm(x, w, EPS))
    _assert_ulps(ulps, dtype, fp32_max=8, identical=0.99)


def test_rms_norm_in_place_and_overlap_rejected():
    x = _randn(300, 2048, dtype=torch.bfloat16)
    w = _weight(2048, torch.bfloat16)
    expected = lk.rms_norm(x, w, eps=EPS)
    assert lk.rms_norm(x, w, eps=EPS, out=x) is x  # exactly in place
    assert torch.equal(x, expected)
    buf = _randn(301 * 2048, dtype=torch.bfloat16)
    shifted_in, shifted_out = buf[: 300 * 2048].view(300, 2048), buf[2048:].view(300, 2048)
    with pytest.raises(ValueError, match="out must not overlap x"):
        lk.rms_norm(shifted_in, w, out=shifted_out)
    with pytest.raises(RuntimeError, match="single memory location"):  # the raw op checks too
        torch.ops.llmkernels.rms_norm(shifted_out, shifted_in, w, EPS)
    gate_up = _randn(4, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="single memory location"):
        torch.ops.llmkernels.silu_and_mul(gate_up.view(-1)[: 4 * 32].view(4, 32), gate_up)
    with pytest.raises(RuntimeError, match="single memory location"):
        torch.ops.llmkernels.fused_add_rms_norm(buf[2048:].view(300, 2048), shifted_in, w, EPS)


def test_rotary_non_contiguous_positions():
    tokens = 40
    cache = torch.randn(256, 64, device="cuda")
    positions = torch.randint(0, 256, (2 * tokens,), device="cuda")[::2]  # stride 2
    assert not positions.is_contiguous()
    q, k = _randn(tokens, 4, 64, dtype=torch.float16), _randn(tokens, 2, 64, dtype=torch.float16)
    q2, k2 = q.clone(), k.clone()
    lk.rotary_embedding(positions, q, k, cache)
    lk.rotary_embedding(positions.contiguous(), q2, k2, cache)
    assert torch.equal(q, q2) and torch.equal(k, k2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (device index 1)")
def test_ops_on_a_non_zero_device_index():
    device = torch.device("cuda", 1)
    x = torch.randn(5, 769, device=device, dtype=torch.bfloat16)
    w = torch.randn(769, device=device, dtype=torch.bfloat16)
    with torch.cuda.device(0):  # the current device is another one: the op must guard
        assert_close(lk.rms_norm(x, w), ref.rms_norm(x, w, 1e-6))
        gate_up = torch.randn(5, 512, device=device, dtype=torch.bfloat16)
        assert torch.equal(lk.silu_and_mul(gate_up), ref.silu_and_mul(gate_up))
        logits = torch.randn(3, 32000, device=device)
        ids = lk.sample(logits, temperature=0.0)
        assert ids.device == device and torch.equal(ids, logits.argmax(-1))
        ids = lk.sample(logits, temperature=1.0, top_p=0.9, seed=0)
        assert ids.device == device and int(ids.min()) >= 0 and int(ids.max()) < 32000
