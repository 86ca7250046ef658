"""min_p in the engine (HF's MinPLogitsWarper: after temperature, top-k and top-p, drop the tokens
whose probability is below min_p times the largest), and HF's typical_p / epsilon_cutoff /
eta_cutoff after it and top_h before top-k. The fused sampler has none of these filters: with one on, the reference
computes the warped distribution and the sampler draws from it. Checked
here on CPU against that law (chi-square over the joint of two sampled tokens, a prefill sample
and a decode step's), against greedy decoding at min_p = 1, and for seeded reproducibility. The
reference's filter is checked against transformers' own warpers in test_sampling_stats.py, the
recorded scores in test_generate_outputs.py and speculative acceptance in test_speculative.py."""

from __future__ import annotations

import pytest
import torch
from sampling_stats import assert_distribution
from test_families import make_hf, prompts, variant

import llmkernels as lk
from llmkernels import reference as ref


@pytest.mark.parametrize(
    "warp",
    [
        dict(min_p=0.2),
        dict(typical_p=0.6),  # HF's other warpers take the same path (reference law + sampler)
        dict(epsilon_cutoff=0.04),
        dict(eta_cutoff=0.1),
        dict(top_h=0.5),  # HF's TopHLogitsWarper, after temperature
    ],
)
def test_sampled_tokens_follow_the_warped_law(warp):
    vocab, rows, calls = 16, 128, 40
    hf = make_hf("qwen3", vocab_size=vocab, head_dim=16, seed=3)
    eng = lk.Engine.from_hf(hf, max_batch_size=rows, max_seq_len=32)
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    settings = dict(temperature=1.5, top_k=0, top_p=0.95, **warp)
    law = (settings["temperature"], 0, settings["top_p"])
    with torch.no_grad():
        first = hf(prompt).logits[0, -1:].float()  # [1, V]
        after = torch.cat([prompt.expand(vocab, -1), torch.arange(vocab)[:, None]], 1)
        second = hf(after).logits[:, -1].float()  # [V, V]: logits after each first token

    def joint(**w) -> torch.Tensor:
        warps = (w.get("min_p", 0.0), w.get("typical_p", 1.0))
        warps += (w.get("epsilon_cutoff", 0.0), w.get("eta_cutoff", 0.0), w.get("top_h", 0.0))
        p1 = ref.sampling_probs(first, *law, *warps)[0]
        p2 = ref.sampling_probs(second, *law, *warps)
        return (p1[:, None] * p2).flatten()

    expected, unfiltered = joint(**warp), joint()
    assert (expected > 0).sum() < (unfiltered > 0).sum()  # the warp removes pairs here
    draws = []
    for call in range(calls):
        out = eng.generate(
            prompt.expand(rows, -1), max_new_tokens=2, do_sample=True, seed=call, **settings
        )
        draws.append(out[:, -2] * vocab + out[:, -1])
    draws = torch.cat(draws)
    assert_distribution(draws, expected, f"tokens 1 and 2 with {warp}")
    with pytest.raises(AssertionError):  # the test has power: the law without the warp fails
        assert_distribution(draws, unfiltered, "without it")


def test_min_p_one_keeps_only_the_most_likely_token():
    eng = lk.Engine.from_hf(variant("qwen2"), max_batch_size=2, max_seq_len=64)
    ids = prompts(2, 8)
    greedy = eng.generate(ids, max_new_tokens=12, do_sample=False)
    sampled = eng.generate(ids, max_new_tokens=12, do_sample=True, temperature=2.0, min_p=1.0)
    assert torch.equal(sampled, greedy)


def test_seeded_min_p_sampling_is_reproducible_plain_and_speculative():
    eng = lk.Engine.from_hf(variant("qwen3"), max_batch_size=2, max_seq_len=96)
    ids = prompts(2, 10)
    kw = dict(max_new_tokens=16, do_sample=True, temperature=1.2, min_p=0.1)
    for extra in ({}, dict(prompt_lookup_num_tokens=4)):
        a = eng.generate(ids, seed=5, **kw, **extra)
        assert torch.equal(a, eng.generate(ids, seed=5, **kw, **extra)), extra
        assert not torch.equal(a, eng.generate(ids, seed=6, **kw, **extra)), extra
    # greedy ignores min_p, as HF (its warpers apply only when sampling)
    greedy = eng.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(eng.generate(ids, max_new_tokens=8, do_sample=False, min_p=0.5), greedy)


@pytest.mark.parametrize(
    "name, value, span",
    [
        ("typical_p", 0.0, r"\(0, 1\]"),
        ("typical_p", 1.5, r"\(0, 1\]"),
        ("epsilon_cutoff", 1.0, r"\[0, 1\)"),
        ("eta_cutoff", -0.1, r"\[0, 1\)"),
        ("eta_cutoff", "0.1", r"\[0, 1\)"),
        ("top_h", 0.0, r"\(0, 1\]"),
        ("top_h", 1.5, r"\(0, 1\]"),
        ("top_h", "0.5", r"\(0, 1\]"),
    ],
)
def test_bad_warp_values_are_refused_by_name(name, value, span):
    eng = lk.Engine.from_hf(variant("qwen2"), max_seq_len=32)
    with pytest.raises(ValueError, match=f"{name} must be a number in {span}"):
        eng.generate(prompts(1, 4), max_new_tokens=2, do_sample=True, **{name: value})


def test_remove_invalid_values_as_transformers():
    """NaN scores become 0 and +-inf the extreme finite values (HF's InfNanRemoveLogitsProcessor),
    so NaN logits no longer raise: the mapping on crafted scores, then generate on a model whose
    LM head gives some tokens NaN logits (the same tokens as transformers)."""
    from transformers.generation.logits_process import InfNanRemoveLogitsProcessor

    hf = variant("qwen2", tie_word_embeddings=False)
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=64)
    params = eng._params(4, None, dict(max_new_tokens=2, remove_invalid_values=True))
    eng._processors.start(params, [[5, 6, 7, 8]])
    scores = torch.randn(1, 320)
    scores[0, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1e38, -3.0])
    expected = InfNanRemoveLogitsProcessor()(None, scores.clone())
    assert torch.equal(eng._processors.apply(scores), expected)
    with torch.no_grad():
        hf.lm_head.weight[5:40] = float("nan")  # those tokens' logits are NaN
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=64)
    ids = prompts(2, 8)
    with pytest.raises(ValueError, match="logits contain NaN"):
        eng.generate(ids, max_new_tokens=4, do_sample=False)
    kw = dict(max_new_tokens=12, do_sample=False, remove_invalid_values=True, pad_token_id=0)
    with torch.no_grad():
        expected = hf.generate(ids, **kw)
    assert torch.equal(eng.generate(ids, **kw), expected)


def test_nan_logits_with_min_p_raise_a_clear_error():
    eng = lk.Engine.from_hf(variant("qwen2"), max_seq_len=64)
    eng.model.norm.fill_(float("nan"))  # every logit NaN
    with pytest.raises(ValueError, match="logits contain NaN"):
        eng.generate(prompts(1, 6), max_new_tokens=3, do_sample=True, min_p=0.1)


def test_sampling_probs_traces_without_a_host_sync():
    """The min_p decode step runs sampling_probs inside a CUDA graph, where a host sync (a
    data-dependent Python branch) fails the capture: dynamo's fullgraph tracing refuses the same
    branches on the CPU."""
    traced = torch.compile(ref.sampling_probs, fullgraph=True, backend="eager")
    logits = torch.randn(3, 50)
    rows = (torch.tensor([0.7, 0.0, 1.3]), torch.tensor([0, 5, 50]), torch.tensor([0.9, 1.0, 0.5]))
    min_p = torch.tensor([0.1, 0.0, 0.05])
    torch.testing.assert_close(
        traced(logits, *rows, min_p), ref.sampling_probs(logits, *rows, min_p)
    )
    warps = (min_p, torch.tensor([0.9, 1.0, 1.0]), torch.zeros(3), torch.tensor([0.0, 0.1, 0.0]))
    warps += (torch.tensor([0.5, 0.0, 1.0]),)  # top_h
    torch.testing.assert_close(
        traced(logits, *rows, *warps), ref.sampling_probs(logits, *rows, *warps)
    )
