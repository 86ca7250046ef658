"""CUDA decode attention and KV-cache append against the reference (GPU only; skipped elsewhere).

Accuracy rule (as flash-attention's tests): the max abs error of our fp16/bf16 output against the
reference computed in fp32 must be at most twice the error of PyTorch's own low-precision
attention (``F.scaled_dot_product_attention`` on the same fp16/bf16 inputs, K/V repeated over the
valid prefix) against the same fp32 reference, plus a small absolute floor.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda

import llmkernels as lk
from llmkernels import ops
from llmkernels import reference as ref

pytestmark = [requires_cuda, pytest.mark.cuda]

HALF_DTYPES = [torch.float16, torch.bfloat16]
HEADS = [(8, 8), (9, 3), (16, 4), (32, 4)]  # (Hq, Hk): GQA ratios 1, 3 (SmolLM2 9:3), 4, 8
HEAD_DIMS = [64, 128, 256]  # 256 (Gemma 3): the SIMT kernel; 64 and 128: the mma kernel
# head_dim 256 layouts: Gemma-3-270M / 1B (4:1), Gemma-3-4B..27B (G = 2), G = 1, 8 and 16 (two
# blocks of 8 query heads per kv head)
GEMMA_HEADS = [(4, 1), (8, 4), (2, 2), (8, 1), (32, 2)]
ERROR_FLOOR = 1e-4


def make_cache(rows, kv_heads, capacity, head_dim, dtype):
    """Random K and V caches [rows, Hk, S, D] (never zeros)."""
    shape = (rows, kv_heads, capacity, head_dim)
    return (
        torch.randn(shape, device="cuda").to(dtype),
        torch.randn(shape, device="cuda").to(dtype),
    )


def poisoned(cache, lens, window=None):
    """A copy with NaN in every slot the kernel must not read: past each row's length, before its
    sliding window, and in rows beyond the batch. The kernel's output must not change (the
    reference gets the clean cache)."""
    bad = cache.clone()
    for b in range(bad.shape[0]):
        length = lens[b] if b < len(lens) else 0
        bad[b, :, length:] = float("nan")
        if window is not None:
            bad[b, :, : max(0, length - window)] = float("nan")
    return bad


def workspace(batch, q_heads, head_dim, splits):
    """A split-K workspace filled with NaN: the kernel must write everything it reads."""
    return torch.full((batch, q_heads, splits, head_dim + 2), float("nan"), device="cuda")


def sdpa_error(q, k_cache, v_cache, lens, scale, expected, window=None):
    """Max abs error of PyTorch's fp16/bf16 SDPA (repeat_kv over the valid range) vs ``expected``."""
    group = q.shape[1] // k_cache.shape[1]
    error = 0.0
    for b, length in enumerate(lens):
        if length == 0:
            continue
        first = 0 if window is None else max(0, length - window)
        k = k_cache[b, :, first:length].repeat_interleave(group, dim=0)[None]  # [1, Hq, L, D]
        v = v_cache[b, :, first:length].repeat_interleave(group, dim=0)[None]
        # q copied to a fresh buffer: a q at an odd element offset is ours to handle, and SDPA is
        # only the yardstick. `contiguous()` is not enough: q[b] of an odd-offset view is already
        # contiguous, and SDPA's fused kernels faulted on its misaligned address on the H200
        # (torch 2.11; twice), after our kernel on the same q had finished cleanly.
        qb = q[b].clone(memory_format=torch.contiguous_format)[None, :, None, :]
        o = F.scaled_dot_product_attention(qb, k, v, scale=scale)[0, :, 0]
        error = max(error, (o.float() - expected[b]).abs().max().item())
    return error


def check_attention(out, q, k_cache, v_cache, lens, scale, window=None):
    """``out`` (ours, from possibly poisoned caches) vs the fp32 reference on the clean caches."""
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    expected = ref.decode_attention(
        q.float(), k_cache.float(), v_cache.float(), seq_lens, scale, window=window
    )
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), "non-finite output"
    for b, length in enumerate(lens):
        if length == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b])), f"row {b} (length 0) is not zeros"
    ours = (out.float() - expected).abs().max().item()
    theirs = sdpa_error(q, k_cache, v_cache, lens, scale, expected, window)
    assert ours <= 2 * theirs + ERROR_FLOOR, (
        f"max abs error {ours:.3g} vs the fp32 reference exceeds 2x SDPA's {theirs:.3g} + {ERROR_FLOOR}"
    )


def run_case(
    batch,
    q_heads,
    kv_heads,
    head_dim,
    lens,
    capacity,
    dtype,
    splits=None,
    extra_rows=0,
    scale=None,
    window=None,
):
    q = torch.randn(batch, q_heads, head_dim, device="cuda").to(dtype)
    k_cache, v_cache = make_cache(batch + extra_rows, kv_heads, capacity, head_dim, dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    ws = None if splits is None else workspace(batch, q_heads, head_dim, splits)
    out = lk.decode_attention(
        q,
        poisoned(k_cache, lens, window),
        poisoned(v_cache, lens, window),
        seq_lens,
        scale=scale,
        workspace=ws,
        window=window,
    )
    check_attention(
        out, q, k_cache, v_cache, lens, head_dim**-0.5 if scale is None else scale, window
    )


# ---- decode attention: accuracy ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}x{h[1]}")
@pytest.mark.parametrize("length", [1, 17, 511, 4096, 32768])
def test_decode_attention_lengths(length, heads, head_dim, dtype):
    """Batch 1 (the split-K path for all but the shortest), cache capacity beyond the length."""
    q_heads, kv_heads = heads
    run_case(1, q_heads, kv_heads, head_dim, [length], length + 37, dtype)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("splits", [1, 2, 7, 64])
def test_decode_attention_split_and_single_pass(splits, head_dim, dtype):
    """Explicit workspaces (1 = single pass); mixed lengths incl. 0; caches with more rows than B."""
    lens = [0, 1, 17, 300, 511, 1000, 1024, 64]
    run_case(len(lens), 16, 4, head_dim, lens, 1024, dtype, splits=splits, extra_rows=3)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize(
    "heads,head_dim", [((32, 4), 64), ((32, 8), 128), ((9, 3), 64), ((8, 2), 256)]
)
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_decode_attention_batch64_mixed(splits, heads, head_dim, dtype):
    """Batch 64 with random lengths (some 0, one full) in a 4096-token cache."""
    gen = torch.Generator().manual_seed(1)
    lens = torch.randint(0, 4097, (64,), generator=gen).tolist()
    lens[3] = lens[40] = 0
    lens[7] = 4096
    lens[9] = 1
    run_case(64, heads[0], heads[1], head_dim, lens, 4096, dtype, splits=splits)


@pytest.mark.parametrize("heads", [(32, 1), (64, 2), (20, 1)], ids=lambda h: f"{h[0]}x{h[1]}")
def test_decode_attention_groups_above_16(heads):
    """Groups of more than 16 query heads per kv head (8 for head_dim 256) are split over blocks."""
    run_case(2, heads[0], heads[1], 128, [700, 33], 800, torch.bfloat16)
    run_case(2, heads[0], heads[1], 64, [700, 33], 800, torch.float16, splits=1)
    run_case(2, heads[0], heads[1], 256, [700, 33], 800, torch.bfloat16, splits=3)


def test_decode_attention_custom_scale():
    run_case(3, 16, 4, 128, [1, 250, 999], 1000, torch.bfloat16, scale=0.3)
    run_case(3, 16, 4, 64, [1, 250, 999], 1000, torch.float16, splits=1, scale=0.05)
    run_case(3, 4, 1, 256, [1, 250, 999], 1000, torch.float16, splits=4, scale=1.0)  # Gemma 3


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_attention_strided_q(splits, head_dim, dtype):
    """q as a slice of a fused QKV GEMM output, and q with an odd element offset / transposed."""
    batch, q_heads, kv_heads = 5, 9, 3
    lens = [3, 129, 0, 512, 77]
    k_cache, v_cache = make_cache(batch, kv_heads, 512, head_dim, dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    qkv = torch.randn(batch, (q_heads + 2 * kv_heads) * head_dim, device="cuda").to(dtype)
    odd = torch.randn(batch, q_heads * head_dim + 1, device="cuda").to(dtype)
    candidates = {
        "fused_qkv": qkv[:, : q_heads * head_dim].view(batch, q_heads, head_dim),
        "odd_offset": odd[:, 1:].view(batch, q_heads, head_dim),
        "transposed": torch.randn(q_heads, batch, head_dim, device="cuda")
        .to(dtype)
        .transpose(0, 1),
    }
    for name, q in candidates.items():
        assert not q.is_contiguous(), name
        out = lk.decode_attention(
            q,
            poisoned(k_cache, lens),
            poisoned(v_cache, lens),
            seq_lens,
            workspace=workspace(batch, q_heads, head_dim, splits),
        )
        torch.cuda.synchronize()  # a fault in our kernel surfaces here, with `name` in the trace
        check_attention(out, q, k_cache, v_cache, lens, head_dim**-0.5)


# ---- decode attention: head_dim 256 (Gemma 3, the SIMT kernel) -----------------------------------
def test_decode_attention_head_dim_256_supported():
    """The CUDA path takes head_dim 256 (ops.DECODE_HEAD_DIMS must list it)."""
    for dtype in HALF_DTYPES:
        assert lk.decode_attention_supported(torch.empty(1, 4, 256, device="cuda", dtype=dtype))


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("heads", GEMMA_HEADS, ids=lambda h: f"{h[0]}x{h[1]}")
@pytest.mark.parametrize("window", [None, 5, 300])
@pytest.mark.parametrize("splits", [None, 1, 3, 16])
def test_decode_attention_head_dim_256(splits, window, heads, dtype):
    """Ragged lengths incl. 0 and the full capacity, with and without a sliding window (NaN
    outside each row's range), split-K and single pass, batch 7 (a spare cache row) and batch 1."""
    q_heads, kv_heads = heads
    capacity = 1024
    lens = [0, 1, 31, 33, 257, 700, capacity]
    run_case(len(lens), q_heads, kv_heads, 256, lens, capacity, dtype, splits, 1, window=window)
    run_case(1, q_heads, kv_heads, 256, [capacity], capacity, dtype, splits, window=window)
    run_case(1, q_heads, kv_heads, 256, [0], capacity, dtype, splits, window=window)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("q_heads", [1, 2, 3, 4, 5, 8, 9, 16])
def test_decode_attention_head_dim_256_every_group(q_heads, dtype):
    """One kv head, every block row count (1, 2, 4, 8 query heads) with and without zero padding,
    groups cut over several blocks (9, 16); lengths not a multiple of the warp step."""
    run_case(3, q_heads, 1, 256, [5, 129, 1000], 1003, dtype)
    run_case(3, q_heads, 1, 256, [5, 129, 1000], 1003, dtype, splits=1)


@pytest.mark.parametrize("head_dim", [64, 256])
def test_decode_attention_clamps_device_seq_lens(head_dim):
    """seq_lens on the device cannot be checked by ops.py: values above S read S tokens, negative
    values read none (zeros), never out of bounds."""
    k_cache, v_cache = make_cache(3, 2, 100, head_dim, torch.bfloat16)
    q = torch.randn(3, 8, head_dim, device="cuda").to(torch.bfloat16)
    for splits in (1, 3):
        seq_lens = torch.tensor([1000, -5, 100], dtype=torch.int32, device="cuda")
        out = lk.decode_attention(
            q, k_cache, v_cache, seq_lens, workspace=workspace(3, 8, head_dim, splits)
        )
        check_attention(out, q, k_cache, v_cache, [100, 0, 100], head_dim**-0.5)


@pytest.mark.slow
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_decode_attention_large(head_dim):
    lens = [32768, 1, 30000, 0, 16385, 32767, 5, 20000]
    run_case(len(lens), 32, 8, head_dim, lens, 32768, torch.bfloat16)


def test_decode_attention_out_argument_and_default_workspace():
    q = torch.randn(2, 8, 128, device="cuda").to(torch.float16)
    k_cache, v_cache = make_cache(2, 2, 300, 128, torch.float16)
    seq_lens = torch.tensor([300, 120], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    assert lk.decode_attention(q, k_cache, v_cache, seq_lens, out=out) is out
    check_attention(out, q, k_cache, v_cache, [300, 120], 128**-0.5)


def test_num_splits_depends_on_shapes_only():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch, q_heads, kv_heads, capacity in [
        (1, 32, 4, 32768),
        (1, 9, 3, 8192),
        (8, 32, 8, 4096),
        (64, 32, 8, 4096),
        (1, 1, 1, 100),
        (1, 64, 2, 32768),  # G = 32: two chunks of 16 query heads per kv head
    ]:
        splits = ops.decode_attention_num_splits(batch, q_heads, kv_heads, capacity, "cuda")
        assert 1 <= splits <= 128
        assert splits <= max(1, math.ceil(capacity / 256))
        head_chunks = math.ceil(q_heads // kv_heads / 16)
        assert splits == 1 or batch * kv_heads * head_chunks * splits <= 2 * sms  # one wave
    q = torch.randn(1, 32, 64, device="cuda").to(torch.bfloat16)
    k_cache = torch.empty(1, 4, 32768, 64, device="cuda", dtype=torch.bfloat16)
    assert ops.decode_attention_workspace(q, k_cache).shape == (
        1,
        32,
        ops.decode_attention_num_splits(1, 32, 4, 32768, "cuda"),
        66,
    )


# ---- decode attention: CUDA graphs and opcheck --------------------------------------------------------
@pytest.mark.parametrize(
    "heads,head_dim", [((32, 8), 128), ((4, 1), 256)], ids=["32x8-d128", "4x1-d256"]
)
@pytest.mark.parametrize("splits", [1, 8])
def test_decode_attention_cuda_graph_replay(splits, heads, head_dim):
    """Capture once; change q, the caches and seq_lens in place; replay equals eager."""
    (q_heads, kv_heads), batch, capacity = heads, 4, 2048
    dtype = torch.bfloat16
    q = torch.randn(batch, q_heads, head_dim, device="cuda").to(dtype)
    k_cache, v_cache = make_cache(batch, kv_heads, capacity, head_dim, dtype)
    seq_lens = torch.tensor([5, 2048, 700, 1], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    ws = workspace(batch, q_heads, head_dim, splits)

    def step():
        lk.decode_attention(q, k_cache, v_cache, seq_lens, out=out, workspace=ws)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for new_lens in ([2048, 0, 1, 1500], [17, 1000, 2048, 64]):
        q.copy_(torch.randn_like(q, dtype=torch.float32))
        k_cache.copy_(torch.randn_like(k_cache, dtype=torch.float32))
        v_cache.copy_(torch.randn_like(v_cache, dtype=torch.float32))
        seq_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        eager = lk.decode_attention(
            q, k_cache, v_cache, seq_lens, workspace=workspace(batch, q_heads, head_dim, splits)
        )
        assert torch.equal(out, eager)
        check_attention(out, q, k_cache, v_cache, new_lens, head_dim**-0.5)


@pytest.mark.parametrize("head_dim", [64, 256])
@pytest.mark.parametrize("splits", [1, 5])
def test_opcheck_decode_attention(splits, head_dim):
    q = torch.randn(3, 8, head_dim, device="cuda").to(torch.float16)
    k_cache, v_cache = make_cache(4, 2, 256, head_dim, torch.float16)
    seq_lens = torch.tensor([256, 0, 31], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    ws = torch.zeros(3, 8, splits, head_dim + 2, device="cuda")
    torch.library.opcheck(
        torch.ops.llmkernels.decode_attention.default,
        (out, q, k_cache, v_cache, seq_lens, 0.125, ws),
    )


def test_opcheck_kv_cache_append():
    k_cache, v_cache = make_cache(2, 4, 16, 64, torch.bfloat16)
    k = torch.randn(3, 4, 64, device="cuda").to(torch.bfloat16)
    v = torch.randn(3, 4, 64, device="cuda").to(torch.bfloat16)
    slots = torch.tensor([5, -1, 20], device="cuda")
    torch.library.opcheck(
        torch.ops.llmkernels.kv_cache_append.default, (k, v, k_cache, v_cache, slots)
    )


# ---- kv_cache_append ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 40, 36, 7])
@pytest.mark.parametrize("layout", ["contiguous", "fused_qkv", "odd_offset"])
def test_kv_cache_append_matches_reference(layout, head_dim, dtype):
    """Strided k/v (slices of a fused QKV output, or misaligned for the scalar path); padding
    slots (negative or >= B * S) are skipped."""
    rows, kv_heads, capacity, q_heads = 3, 4, 50, 8
    slots = [0, 49, -1, 50, 149, 150, 1000, -7, 77, 3]  # 150 = B * S and beyond: skipped
    num_tokens = len(slots)
    if layout == "contiguous":
        k = torch.randn(num_tokens, kv_heads, head_dim, device="cuda").to(dtype)
        v = torch.randn(num_tokens, kv_heads, head_dim, device="cuda").to(dtype)
    else:
        offset = 1 if layout == "odd_offset" else 0
        width = (q_heads + 2 * kv_heads) * head_dim
        qkv = torch.randn(num_tokens, width + offset, device="cuda").to(dtype)[:, offset:]
        k = qkv[:, q_heads * head_dim : (q_heads + kv_heads) * head_dim].view(
            num_tokens, kv_heads, head_dim
        )
        v = qkv[:, (q_heads + kv_heads) * head_dim :].view(num_tokens, kv_heads, head_dim)
        assert not k.is_contiguous()
    k_cache, v_cache = make_cache(rows, kv_heads, capacity, head_dim, dtype)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    slot_mapping = torch.tensor(slots, device="cuda")
    ref.kv_cache_append(k.clone(), v.clone(), k_expected, v_expected, slot_mapping.clone())
    k_in, v_in = k.clone(), v.clone()
    lk.kv_cache_append(k, v, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache, k_expected)
    assert torch.equal(v_cache, v_expected)
    assert torch.equal(k, k_in) and torch.equal(v, v_in)  # inputs untouched


def test_kv_cache_append_int32_slots_then_attention():
    """The decode step's order: append the new token at position len - 1, then attend over len."""
    batch, q_heads, kv_heads, head_dim, capacity = 3, 16, 4, 64, 64
    dtype = torch.bfloat16
    k_cache, v_cache = make_cache(batch, kv_heads, capacity, head_dim, dtype)
    lens = [10, 1, 64]
    k_new = torch.randn(batch, kv_heads, head_dim, device="cuda").to(dtype)
    v_new = torch.randn(batch, kv_heads, head_dim, device="cuda").to(dtype)
    slots = torch.tensor(
        [b * capacity + n - 1 for b, n in enumerate(lens)], dtype=torch.int32, device="cuda"
    )
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    ref.kv_cache_append(k_new, v_new, k_expected, v_expected, slots)
    lk.kv_cache_append(k_new, v_new, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)
    q = torch.randn(batch, q_heads, head_dim, device="cuda").to(dtype)
    out = lk.decode_attention(
        q, k_cache, v_cache, torch.tensor(lens, dtype=torch.int32, device="cuda")
    )
    check_attention(out, q, k_cache, v_cache, lens, head_dim**-0.5)


# ---- review findings -----------------------------------------------------------------------------------
@pytest.mark.parametrize("splits", [257, 4096])
def test_decode_attention_more_than_256_splits(splits):
    # the merge kernel's split weights live in dynamic shared memory sized by the split count
    run_case(2, 8, 2, 128, [20000, 311], 20480, torch.bfloat16, splits=splits)


def test_kv_cache_append_repeated_slot_keeps_the_last_token_on_cuda():
    k_cache, v_cache = make_cache(2, 2, 16, 64, torch.bfloat16)
    k = torch.randn(6, 2, 64, device="cuda").to(torch.bfloat16)
    v = torch.randn(6, 2, 64, device="cuda").to(torch.bfloat16)
    slots = torch.tensor([3, 20, 3, -1, 3, -1], device="cuda")
    expected_k, expected_v = k_cache.cpu(), v_cache.cpu()
    ref.kv_cache_append(k.cpu(), v.cpu(), expected_k, expected_v, slots.cpu())
    lk.kv_cache_append(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.cpu(), expected_k) and torch.equal(v_cache.cpu(), expected_v)
    assert torch.equal(k_cache[0, :, 3], k[4])


def test_attention_overlap_rejected():
    k_cache, v_cache = make_cache(2, 2, 16, 64, torch.bfloat16)
    q = torch.randn(2, 4, 64, device="cuda").to(torch.bfloat16)
    lens = torch.tensor([3, 5], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="out must not overlap q"):
        lk.decode_attention(q, k_cache, v_cache, lens, out=q)
    ws = torch.empty(2, 4, 1, 66, device="cuda")
    with pytest.raises(RuntimeError, match="single memory location"):
        torch.ops.llmkernels.decode_attention(q, q, k_cache, v_cache, lens, 0.125, ws)
    k = torch.randn(3, 2, 64, device="cuda").to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="single memory location"):
        torch.ops.llmkernels.kv_cache_append(k, k, k_cache, k_cache, torch.arange(3, device="cuda"))


# ---- sliding window (Mistral, windowed Qwen layers) ---------------------------------------------------
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("window", [1, 7, 64, 4096])
@pytest.mark.parametrize("splits", [1, 5, None])
def test_decode_attention_sliding_window(splits, window, head_dim, dtype):
    lens = [0, 1, 6, 7, 300, 5000]  # shorter and longer than the window
    batch, q_heads, kv_heads = len(lens), 8, 2
    q = torch.randn(batch, q_heads, head_dim, device="cuda").to(dtype)
    k_cache, v_cache = make_cache(batch, kv_heads, 5120, head_dim, dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    # poison everything outside each row's window: the kernel must not read it
    k_bad, v_bad = poisoned(k_cache, lens), poisoned(v_cache, lens)
    for b, n in enumerate(lens):
        k_bad[b, :, : max(0, n - window)] = float("nan")
        v_bad[b, :, : max(0, n - window)] = float("nan")
    ws = None if splits is None else workspace(batch, q_heads, head_dim, splits)
    out = lk.decode_attention(q, k_bad, v_bad, seq_lens, workspace=ws, window=window)
    expected = ref.decode_attention(
        q.float(), k_cache.float(), v_cache.float(), seq_lens, window=window
    )
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
