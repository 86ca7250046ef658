"""MKL-packed weights for CPU verify forwards (llmkernels.packed_gemm).

The private torch.ops.mkl ops must still have the schemas the module was written for (this test
is the loud check); a packed GEMM must equal the plain one for every row count it serves and be
skipped for the others; a model's verify forward and speculative greedy decoding must give the
same logits and tokens with and without the packs.
"""

from __future__ import annotations

import pytest
import torch
from test_families import prompts, variant

import llmkernels as lk
from llmkernels import packed_gemm
from llmkernels.packed_gemm import MIN_ROWS, PACK_ROWS, PackedGemms

needs_mkl = pytest.mark.skipif(not torch._C.has_mkl, reason="this torch build has no MKL")


@needs_mkl
def test_mkl_pack_ops_have_the_schemas_the_engine_relies_on():
    assert packed_gemm.ops_schemas() == packed_gemm._EXPECTED_SCHEMAS
    assert packed_gemm.ops_available()


@needs_mkl
@pytest.mark.parametrize("input_major", [False, True])
def test_packed_linear_equals_the_plain_gemm_for_the_rows_it_serves(input_major):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 53, generator=gen)  # odd sizes
    if input_major:  # the engine's CPU fp32 layout: the transpose of a contiguous [in, out]
        weight = weight.t().contiguous().t()
    bias = torch.randn(37, generator=gen)
    bf16 = torch.randn(8, 53, generator=gen).to(torch.bfloat16)
    packs = PackedGemms([weight, bf16], check_speed=False)
    assert packs.enabled and id(bf16) not in packs._packs  # fp32 CPU weights only
    served = []
    for rows in range(1, PACK_ROWS + 3):
        x = torch.randn(rows + 2, 53, generator=gen)[1:-1]  # a view into a larger buffer
        before = packs.calls
        y = packs.linear(x, weight, bias)
        if not MIN_ROWS <= rows <= PACK_ROWS:
            assert y is None and packs.calls == before
            continue
        served.append(rows)
        assert packs.calls == before + 1 and y.shape == (rows, 37)
        torch.testing.assert_close(y, torch.addmm(bias, x, weight.t()), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packs.linear(x, weight), x @ weight.t(), atol=1e-5, rtol=1e-5)
    assert served == list(range(MIN_ROWS, PACK_ROWS + 1))
    other = weight.clone()  # same values, another tensor: not packed
    assert packs.linear(torch.randn(MIN_ROWS, 53), other) is None
    assert packs.linear(torch.randn(MIN_ROWS, 53, dtype=torch.float64), weight) is None


def test_nothing_is_packed_without_the_ops_or_where_packing_is_slower(monkeypatch):
    weight = torch.randn(16, 8)
    monkeypatch.setattr(packed_gemm, "ops_available", lambda: False)
    assert not PackedGemms([weight], check_speed=False).enabled
    monkeypatch.setattr(packed_gemm, "ops_available", lambda: True)
    monkeypatch.setattr(packed_gemm, "_pack", lambda weight: None)  # also without MKL
    monkeypatch.setattr(packed_gemm, "_packs_are_faster", lambda packs: False)
    packs = PackedGemms([weight])
    assert not packs.enabled and packs.linear(torch.randn(MIN_ROWS, 8), weight) is None


@needs_mkl
def test_timing_the_packs_leaves_the_global_rng_alone():
    """The first speculative generate builds the packs; with torch.manual_seed its sampling
    must not depend on whether that happened in this call."""
    state = torch.get_rng_state()
    PackedGemms([torch.ones(64, 48)], check_speed=True)
    assert torch.equal(torch.get_rng_state(), state)


@needs_mkl
@pytest.mark.parametrize("name", ["qwen2", "qwen3"])  # bias on the QKV GEMM; a tied LM head
def test_verify_forward_gives_the_same_logits_with_packed_weights(name, monkeypatch):
    monkeypatch.setattr(packed_gemm, "_packs_are_faster", lambda packs: True)
    eng = lk.Engine.from_hf(variant(name), max_batch_size=2, max_seq_len=64)
    model = eng.model
    ids = prompts(2, 30, seed=3)
    for tokens in (MIN_ROWS - 1, MIN_ROWS, PACK_ROWS, PACK_ROWS + 1):
        logits = []
        for packed in (False, True):
            model.packed_gemms = None
            if packed:
                assert model.pack_for_verify()
            model.set_cache_lens([0])
            with torch.inference_mode():
                model.verify(ids[:1, :5], 5)
                model.set_cache_lens([5])
                before = model.packed_gemms.calls if packed else 0
                logits.append(model.verify(ids[:1, 5 : 5 + tokens], 5 + tokens))
        used = model.packed_gemms.calls - before  # the 4 projections per layer and the head
        assert used == (4 * len(model.layers) + 1 if MIN_ROWS <= tokens <= PACK_ROWS else 0)
        torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)
        assert logits[0].abs().max() > 0.1


@needs_mkl
def test_speculative_greedy_with_packed_weights_equals_plain_greedy(monkeypatch):
    """Prompt lookup on CPU fp32 builds the packs (forced here: on tiny weights they may time
    slower) and verifies through them; the tokens are plain greedy decoding's."""
    monkeypatch.setattr(packed_gemm, "_packs_are_faster", lambda packs: True)
    eng = lk.Engine.from_hf(variant("mistral"), max_batch_size=1, max_seq_len=160)
    base = prompts(1, 12, seed=5)
    ids = torch.cat([base, base, base, base[:, :4]], dim=1)  # grounded: guesses get kept
    plain = eng.generate(ids, max_new_tokens=60, do_sample=False)
    assert eng.model.packed_gemms is None  # plain decoding builds nothing
    spec = eng.generate(ids, max_new_tokens=60, do_sample=False, prompt_lookup_num_tokens=10)
    assert torch.equal(spec, plain)
    assert eng.model.packed_gemms.enabled and eng.model.packed_gemms.calls > 0
