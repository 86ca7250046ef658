"""llmkernels.cpu (what ops.py runs on CPU tensors) against the reference: bit for bit where the
arithmetic is the same, within float rounding where PyTorch's SDPA sums in its own order.

Every case runs through the public ops (the dispatch that picks llmkernels.cpu) and compares
with the reference on clones of the same inputs.
"""

import pytest
import torch
from conftest import DTYPES, assert_close

import llmkernels as lk
from llmkernels import cpu
from llmkernels import reference as ref


def _randn(*shape, dtype=torch.float32, scale=2.0):
    return (torch.randn(*shape) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 576), (3, 7), (2, 5, 64), (300, 2048)])
def test_rms_norm_bit_identical(shape, dtype):
    x, w = _randn(*shape, dtype=dtype), _randn(shape[-1], dtype=dtype)
    expected = ref.rms_norm(x, w, 1e-5)
    assert torch.equal(lk.rms_norm(x, w, 1e-5), expected)
    y = x.clone()
    lk.rms_norm(y, w, 1e-5, out=y)  # in place
    assert torch.equal(y, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_bit_identical(dtype):
    x, r, w = _randn(4, 96, dtype=dtype), _randn(4, 96, dtype=dtype), _randn(96, dtype=dtype)
    x2, r2 = x.clone(), r.clone()
    lk.fused_add_rms_norm(x, r, w, 1e-6)
    ref.fused_add_rms_norm(x2, r2, w, 1e-6)
    assert torch.equal(x, x2) and torch.equal(r, r2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["separate", "fused_qkv", "strided_tokens"])
@pytest.mark.parametrize("tokens", [1, 13])
def test_rotary_bit_identical(tokens, layout, dtype):
    heads, kv_heads, head_dim = 9, 3, 64
    cache = lk.rope_cos_sin_cache({"hidden_size": 576, "num_attention_heads": 9}, max_position=64)
    positions = torch.randint(0, 64, (tokens,))
    if layout == "fused_qkv":  # k's heads right after q's: rotated as one view
        qkv = _randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
        q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
        k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(
            tokens, kv_heads, head_dim
        )
    elif layout == "strided_tokens":
        q = _randn(tokens, heads + 1, head_dim, dtype=dtype)[:, 1:]
        k = _randn(tokens, kv_heads, head_dim + 4, dtype=dtype)[..., :head_dim]
    else:
        q, k = (
            _randn(tokens, heads, head_dim, dtype=dtype),
            _randn(tokens, kv_heads, head_dim, dtype=dtype),
        )
    q2, k2 = q.clone(), k.clone()
    lk.rotary_embedding(positions, q, k, cache)
    ref.rotary_embedding(positions, q2, k2, cache)
    assert torch.equal(q, q2) and torch.equal(k, k2)


def test_rotary_reuses_factors_only_for_the_same_positions_and_table():
    cache = lk.rope_cos_sin_cache({"hidden_size": 128, "num_attention_heads": 2}, max_position=32)
    positions = torch.tensor([3, 9])
    for pos in (positions, positions.clone(), torch.tensor([4, 9])):  # same, equal, different
        q, k = _randn(2, 2, 64), _randn(2, 1, 64)
        q2, k2 = q.clone(), k.clone()
        lk.rotary_embedding(pos, q, k, cache)
        ref.rotary_embedding(pos, q2, k2, cache)
        assert torch.equal(q, q2) and torch.equal(k, k2)
    positions[0] = 7  # changed in place: recomputed
    q, k = _randn(2, 2, 64), _randn(2, 1, 64)
    q2, k2 = q.clone(), k.clone()
    lk.rotary_embedding(positions, q, k, cache)
    ref.rotary_embedding(positions, q2, k2, cache)
    assert torch.equal(q, q2) and torch.equal(k, k2)
    with torch.inference_mode():  # inference tensors (no version counter) too
        table = cache.clone()
        q, k = _randn(2, 2, 64), _randn(2, 1, 64)
        q2, k2 = q.clone(), k.clone()
        lk.rotary_embedding(positions, q, k, table)
        ref.rotary_embedding(positions, q2, k2, table)
        assert torch.equal(q, q2) and torch.equal(k, k2)


def test_rotary_other_layouts_take_the_reference():
    cache = torch.randn(16, 40)  # partial rotary
    positions = torch.tensor([1, 5])
    for is_neox in (True, False):
        q, k = _randn(2, 2, 64), _randn(2, 1, 64)
        q2, k2 = q.clone(), k.clone()
        lk.rotary_embedding(positions, q, k, cache, is_neox=is_neox)
        ref.rotary_embedding(positions, q2, k2, cache, is_neox)
        assert torch.equal(q, q2) and torch.equal(k, k2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_bit_identical(dtype):
    x = _randn(3, 2 * 1536, dtype=dtype)
    assert torch.equal(lk.silu_and_mul(x), ref.silu_and_mul(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_tanh_and_mul_bit_identical(dtype):
    x = _randn(3, 2 * 2048, dtype=dtype)
    assert torch.equal(lk.gelu_tanh_and_mul(x), ref.gelu_tanh_and_mul(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_unit_offset_norms_bit_identical(dtype):
    x, r, w = _randn(5, 640, dtype=dtype), _randn(5, 640, dtype=dtype), _randn(640, dtype=dtype)
    assert torch.equal(lk.rms_norm(x, w, 1e-6, unit_offset=True), ref.rms_norm(x, w, 1e-6, True))
    x2, r2 = x.clone(), r.clone()
    lk.fused_add_rms_norm(x, r, w, 1e-6, unit_offset=True)
    ref.fused_add_rms_norm(x2, r2, w, 1e-6, unit_offset=True)
    assert torch.equal(x, x2) and torch.equal(r, r2)


@pytest.mark.parametrize(
    "slots",
    [[5], [-1], [40], [3, 20, 7], [3, 20, 3], [3, -1, 20, 99], list(range(0, 32, 2)) + [1] * 70],
    ids=["one", "one-pad", "one-out", "distinct", "repeat", "pad", "prefill"],
)
def test_kv_cache_append_identical(slots):
    kc, vc = _randn(2, 3, 16, 64), _randn(2, 3, 16, 64)  # 32 slots
    n = len(slots)
    k, v = _randn(n, 3, 64), _randn(n, 3, 64)
    kc2, vc2 = kc.clone(), vc.clone()
    slot_mapping = torch.tensor(slots)
    lk.kv_cache_append(k, v, kc, vc, slot_mapping)
    ref.kv_cache_append(k, v, kc2, vc2, slot_mapping)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens", [[129], [7, 7, 7], [0, 5, 31], [32, 1]])
def test_decode_attention_close(lens, dtype):
    batch = len(lens)
    q = _randn(batch, 9, 64, dtype=dtype, scale=1.0)
    kc, vc = _randn(batch + 1, 3, 160, 64, dtype=dtype), _randn(batch + 1, 3, 160, 64, dtype=dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    ours = lk.decode_attention(q, kc, vc, seq_lens)
    expected = ref.decode_attention(q, kc, vc, seq_lens)
    assert_close(ours, expected)
    for b, n in enumerate(lens):
        if n == 0:
            assert torch.equal(ours[b], torch.zeros_like(ours[b]))


def test_public_ops_dispatch_to_the_lean_cpu_path(monkeypatch):
    called = []
    for name in ("rms_norm", "rotary_embedding", "kv_cache_append", "decode_attention"):
        real = getattr(cpu, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            called.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(cpu, name, spy)
    x = _randn(1, 64)
    lk.rms_norm(x, torch.ones(64))
    cache = lk.rope_cos_sin_cache({"hidden_size": 128, "num_attention_heads": 2}, max_position=8)
    lk.rotary_embedding(torch.tensor([1]), _randn(1, 2, 64), _randn(1, 1, 64), cache)
    kc, vc = _randn(1, 1, 8, 64), _randn(1, 1, 8, 64)
    lk.kv_cache_append(_randn(1, 1, 64), _randn(1, 1, 64), kc, vc, torch.tensor([2]))
    lk.decode_attention(_randn(1, 2, 64), kc, vc, torch.tensor([3], dtype=torch.int32))
    assert called == ["rms_norm", "rotary_embedding", "kv_cache_append", "decode_attention"]


@pytest.mark.parametrize("vocab", [7, 50, 1000, 49152])
def test_sampling_probs_bit_identical(vocab):
    """The lean law (topk instead of whole-vocabulary sorts) equals the reference bit for bit:
    ties, removed tokens, mixed per-row settings (greedy rows, top-k off / on / >= V, top-p
    off / on) and each later filter."""
    gen = torch.Generator().manual_seed(vocab)
    cases = 0
    for trial in range(20):
        logits = torch.randn(3, vocab, generator=gen) * (3.0 if trial % 2 else 0.5)
        if trial % 5 == 0:
            logits = (logits * 4).round() / 4  # many ties
        if trial % 7 == 0:
            logits[:, ::5] = float("-inf")  # tokens a processor removed
        temperature = torch.tensor([0.7, 0.0, 1.3])[torch.randperm(3, generator=gen)]
        top_k = torch.tensor([0, 5, 50, vocab, vocab + 3, 1])[
            torch.randint(0, 6, (3,), generator=gen)
        ]
        top_p = torch.tensor([1.0, 0.9, 0.5, 0.05])[torch.randint(0, 4, (3,), generator=gen)]
        later = [(), (0.05,), (0.0, 0.8), (0.0, 1.0, 1e-4, 1e-3), (0.0, 1.0, 0.0, 0.0, 0.5)]
        # as the engine passes them: every later filter a per-row tensor, most rows off
        as_rows = [torch.tensor(v) for v in ([0.0, 0.05, 0.0], [1.0] * 3, [0.0] * 3, [0.0] * 3)]
        as_rows += [torch.tensor([0.0, 0.0, 0.5])]
        if trial % 3 == 0:
            as_rows[1] = torch.tensor([1.0, 0.8, 1.0])  # typical on in one row
        for settings in (
            (temperature, top_k, top_p, *later[trial % 5]),
            (temperature, top_k, top_p, *as_rows),
            (0.8, 0, 1.0, *later[trial % 5]),
            (0.8, 20, 1.0),
            (1.0, 0, 0.9),
            (1.0, 20, 0.9),
        ):
            expected = ref.sampling_probs(logits, *settings)
            assert torch.equal(cpu.sampling_probs(logits, *settings), expected), (trial, settings)
            cases += 1
    assert cases == 120


def test_sampling_dispatches_to_the_lean_law_on_cpu_and_the_reference_when_compiled(monkeypatch):
    from llmkernels import ops

    called = []
    real = cpu.sampling_probs

    def spy(*args, **kwargs):
        called.append(args[1:])
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu, "sampling_probs", spy)
    logits = _randn(2, 300)
    lk.sample(logits, temperature=0.8, top_k=20, seed=1)
    ops.sample(logits, 0.8, 0, 0.9, rng_state=ops.new_rng_state(logits.device, 3))
    assert len(called) == 2
    traced = torch.compile(ops.sampling_probs, fullgraph=True, backend="eager")
    expected = ref.sampling_probs(logits, 0.8, 20, 0.9)
    assert torch.equal(traced(logits, 0.8, 20, 0.9), expected) and len(called) == 2


@pytest.mark.parametrize("top_p", [0.5, 0.7, 0.75, 0.8, 0.9, 0.999, 0.9999999])
def test_top_p_prefix_ends_where_the_reference_cuts(monkeypatch, top_p):
    """The lean top-p sorts only a prefix of the probabilities (here at any vocabulary size): tie
    groups near its end (kept or removed), a cut right at a power of two, a wide nucleus and a
    top_p that fp32 prefix sums barely reach all give the reference's mask, in a batch (where
    the longest row's prefix serves all) and alone."""
    monkeypatch.setattr(cpu, "TOP_P_SORT_ALL", 0)
    vocab = 3000
    logits = torch.full((5, vocab), -4.0)
    logits[0, :60], logits[0, 60:80] = 5.0, 4.9  # ties at sorted positions 60..79
    logits[1, :64] = 5.0  # the first prefix is exactly the head
    logits[2, :63], logits[2, 63] = 5.0, 4.0
    logits[3] = torch.linspace(3.0, -3.0, vocab)  # a wide nucleus
    logits[4, ::7] = float("-inf")
    temperature = torch.tensor([1.0, 1.0, 0.5, 1.0, 2.0])
    for settings in ((temperature, 0, top_p), (temperature, 0, torch.full((5,), top_p))):
        expected = ref.sampling_probs(logits, *settings)
        assert torch.equal(cpu.sampling_probs(logits, *settings), expected), settings
    for row in range(5):  # alone, where no other row makes the prefix grow
        settings = (temperature[row : row + 1], 0, top_p)
        expected = ref.sampling_probs(logits[row : row + 1], *settings)
        assert torch.equal(cpu.sampling_probs(logits[row : row + 1], *settings), expected), row


@pytest.mark.parametrize("fraction", [1.0, 0.5, 1e-3, 0.0])
def test_top_p_prefix_estimate_only_costs_time(monkeypatch, fraction):
    """Each row's prefix is an estimate from sums in another order: one too short (a count of
    the tokens above a fraction of the largest p: a value threshold, as the estimate's) falls
    back to sorting every non-zero probability, one too long only sorts more."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 5000, generator=gen) * torch.tensor([[0.3], [1.0], [3.0], [8.0]])
    logits[0, :40] = 2.0  # a tie group

    def estimate(probs, top_p):
        return (probs >= fraction * probs.amax(dim=-1, keepdim=True)).sum(dim=-1)

    monkeypatch.setattr(cpu, "_top_p_prefix", estimate)
    monkeypatch.setattr(cpu, "TOP_P_SORT_ALL", 0)
    for top_p in (0.3, 0.9, torch.tensor([0.5, 1.0, 0.95, 0.2])):
        expected = ref.sampling_probs(logits, 1.0, 0, top_p)
        assert torch.equal(cpu.sampling_probs(logits, 1.0, 0, top_p), expected)


def test_top_p_prefix_estimate_is_the_first_power_of_two_holding_top_p():
    """The estimate is the number of tokens with p >= 2^-j for the largest 2^-j whose tokens
    hold top_p + the margin (so the fast path is taken, not just correct)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 20000, generator=gen) * torch.tensor([[0.5], [2.0], [4.0], [9.0]])
    logits[1, ::3] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    top_p = torch.tensor([0.9, 0.5, 0.99, 0.95])
    expected = []
    for row, p in zip(probs.double(), top_p.tolist()):
        for j in range(150):
            above = row >= 2.0**-j
            if row[above].sum() >= p + cpu.TOP_P_MARGIN:
                expected.append(int(above.sum()))
                break
    assert cpu._top_p_prefix(probs, top_p).tolist() == expected
    assert all(n < 20000 for n in expected)


def test_log_or_minus_inf_is_log():
    """The log the filtered laws and the sampler take: torch.log's values (-inf at 0), zeros,
    subnormals and ones included."""
    gen = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(3, 4000, generator=gen) * 6, dim=-1)
    probs[0, ::3] = 0.0
    probs[1, :10] = torch.tensor([1e-45, 1e-40, 1e-38, 0.5, 1.0, 0.0, 3e-8, 1e-30, 0.25, 0.0])
    assert torch.equal(ref.log_or_minus_inf(probs), probs.log())
