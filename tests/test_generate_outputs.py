"""HF's return_dict_in_generate / output_scores / output_logits from the engine's generate, against
transformers on random models of its families (CPU fp32): the same sequences and per-step logits,
and scores that equal transformers' own processors and warpers applied to the same text."""

from __future__ import annotations

import pytest
import torch
from test_families import prompts, variant
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

import llmkernels as lk


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal -inf entries, finite entries within fp32 forward noise."""
    if not torch.equal(torch.isinf(a), torch.isinf(b)):
        return False
    finite = torch.isfinite(a)
    return torch.allclose(a[finite], b[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["qwen2", "mistral-window"])
def test_greedy_scores_and_logits_match_transformers(name):
    hf = variant(name)
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=96)
    ids = prompts(2, 10)
    kw = dict(
        max_new_tokens=12,
        do_sample=False,
        repetition_penalty=1.3,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    with torch.no_grad():
        expected = hf.generate(ids, pad_token_id=0, **kw)
    out = eng.generate(ids, **kw)
    assert torch.equal(out.sequences, expected.sequences)
    assert len(out.scores) == len(out.logits) == 12
    for step in range(12):
        assert out.scores[step].dtype == torch.float32 and out.scores[step].shape == (2, 320)
        assert close(out.logits[step], expected.logits[step]), step
        assert close(out.scores[step], expected.scores[step]), step
        assert torch.equal(out.scores[step].argmax(-1), out.sequences[:, 10 + step])
    assert not torch.equal(out.scores[5], out.logits[5])  # the penalty is in the scores
    # transformers' own helper takes the engine's output
    transition = hf.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    reference = torch.stack([s.log_softmax(-1) for s in out.scores], 1)
    picked = reference.gather(2, out.sequences[:, 10:, None])[..., 0]
    torch.testing.assert_close(transition, picked)


@pytest.mark.parametrize("family", ["min_p", "typical", "top_h"])
def test_sampled_scores_are_transformers_warpers_on_the_same_text(family):
    """Sampled tokens differ from transformers' (another RNG), so each step's scores are checked
    against transformers' processors and warpers on its forward over the engine's own text, and
    each sampled token must be one those warpers keep."""
    hf = variant("qwen3")
    eng = lk.Engine.from_hf(hf, max_seq_len=96)
    ids = prompts(1, 8)
    if family == "min_p":
        settings = dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05)
        warpers = [
            TemperatureLogitsWarper(0.7),
            TopKLogitsWarper(20),
            TopPLogitsWarper(0.9),
            MinPLogitsWarper(0.05),
        ]
    elif family == "top_h":  # HF's TopHLogitsWarper, between temperature and top-k
        settings = dict(temperature=0.8, top_h=0.6, top_k=30)
        warpers = [TemperatureLogitsWarper(0.8), TopHLogitsWarper(0.6), TopKLogitsWarper(30)]
    else:
        settings = dict(top_k=0, typical_p=0.8, epsilon_cutoff=2e-3, eta_cutoff=2e-3)
        warpers = [TypicalLogitsWarper(0.8), EpsilonLogitsWarper(2e-3), EtaLogitsWarper(2e-3)]
    out = eng.generate(
        ids,
        max_new_tokens=10,
        do_sample=True,
        seed=4,
        return_dict_in_generate=True,
        output_scores=True,
        repetition_penalty=1.2,
        **settings,
    )
    assert out.logits is None and len(out.scores) == 10
    warp = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2), *warpers])
    for step in range(10):
        prefix = out.sequences[:, : 8 + step]
        with torch.no_grad():
            expected = warp(prefix, hf(prefix).logits[:, -1].float())
        assert close(out.scores[step], expected), step
        assert torch.isfinite(out.scores[step][0, out.sequences[0, 8 + step]])  # a kept token
        assert int(torch.isfinite(out.scores[step]).sum()) < 320  # the warpers removed some


def test_renormalize_logits_log_softmaxes_the_scores_as_transformers():
    hf = variant("qwen2")
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=96)
    ids = prompts(2, 10)
    for sampling in (dict(do_sample=False), dict(do_sample=True, top_k=1, temperature=0.8)):
        kw = dict(max_new_tokens=6, pad_token_id=0, return_dict_in_generate=True, **sampling)
        kw.update(output_scores=True, renormalize_logits=True, repetition_penalty=1.2)
        with torch.no_grad():
            expected = hf.generate(ids, **kw)
        out = eng.generate(ids, seed=0, **kw)
        assert torch.equal(out.sequences, expected.sequences)
        for step in range(6):
            assert close(out.scores[step], expected.scores[step]), (sampling, step)
        plain = eng.generate(ids, seed=0, **dict(kw, renormalize_logits=False))
        assert not close(out.scores[0], plain.scores[0])  # it changed them


@pytest.mark.parametrize("sampling", [False, True])
def test_speculative_scores_equal_plain_decodings(sampling):
    """One row, as transformers' assisted generation: each kept token's step records the verify
    position's logits and processed scores, the ones a plain decode step records (fp32 noise:
    a verify forward rounds differently)."""
    hf = variant("qwen2")
    eng = lk.Engine.from_hf(hf, max_seq_len=200)
    twin = lk.Engine.from_hf(hf, max_seq_len=200)
    base = prompts(1, 12, seed=5)
    ids = torch.cat([base, base, base[:, :4]], dim=1)  # grounded: some guesses get kept
    kw = dict(max_new_tokens=24, return_dict_in_generate=True, output_scores=True)
    kw.update(output_logits=True, repetition_penalty=1.05)
    if sampling:  # deterministic sampling (top_k=1); the scores carry HF's warpers
        kw.update(do_sample=True, top_k=1, temperature=0.7)
    plain = eng.generate(ids, seed=0, **kw)
    for extra in (dict(prompt_lookup_num_tokens=6), dict(assistant_model=twin)):
        out = eng.generate(ids, seed=0, **kw, **extra)
        assert eng.last_acceptance[0] > 0, extra  # verify rounds kept guesses
        assert torch.equal(out.sequences, plain.sequences), extra
        assert len(out.scores) == len(out.logits) == 24
        for step in range(24):
            assert close(out.scores[step], plain.scores[step]), (extra, step)
            assert close(out.logits[step], plain.logits[step]), (extra, step)


def test_return_dict_alone_and_refusals():
    eng = lk.Engine.from_hf(variant("qwen2"), max_seq_len=64)
    ids = prompts(1, 6)
    out = eng.generate(ids, max_new_tokens=4, return_dict_in_generate=True)
    assert torch.equal(out.sequences, eng.generate(ids, max_new_tokens=4))
    assert out.scores is None and out.logits is None
    plain = eng.generate(ids, max_new_tokens=4, output_scores=True)  # as HF: a tensor
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, out.sequences)
    with pytest.raises(ValueError, match="need a batch of one row"):
        lk.Engine.from_hf(variant("qwen2"), max_batch_size=2, max_seq_len=64).generate(
            prompts(2, 6),
            max_new_tokens=4,
            prompt_lookup_num_tokens=3,
            return_dict_in_generate=True,
            output_scores=True,
        )
    with pytest.raises(ValueError, match="output_attentions"):
        eng.generate(ids, max_new_tokens=4, return_dict_in_generate=True, output_attentions=True)


def test_chat_refuses_output_settings(smol_tokenizer):
    hf = variant("qwen2", vocab_size=len(smol_tokenizer))
    eng = lk.Engine.from_hf(hf, tokenizer=smol_tokenizer, max_seq_len=128)
    with pytest.raises(ValueError, match="chat returns one reply's text"):
        eng.chat("Hi", max_new_tokens=2, return_dict_in_generate=True, output_scores=True)
    with pytest.raises(ValueError, match="num_return_sequences need generate"):
        eng.chat("Hi", max_new_tokens=2, do_sample=True, num_return_sequences=2)
