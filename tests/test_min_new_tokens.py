"""min_new_tokens in the engine against transformers' generate (its MinNewTokensLengthLogitsProcessor:
EOS scores -inf until that many new tokens), CPU fp32 random models: plain, batched, chat and
speculative calls, greedy and sampled."""

from __future__ import annotations

import pytest
import torch
from test_families import prompts, variant

import llmkernels as lk


def early_eos(eng, ids, at: int) -> int:
    """The token plain greedy decoding emits as new token ``at`` of row 0: made the EOS id, it
    ends generation there unless min_new_tokens blocks it."""
    return int(eng.generate(ids, max_new_tokens=at + 1, do_sample=False)[0, ids.shape[1] + at])


@pytest.mark.parametrize("name", ["qwen2", "mistral-window"])
def test_greedy_with_min_new_tokens_matches_transformers(name):
    hf = variant(name)
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=96)
    ids = prompts(2, 10)
    eos = early_eos(eng, ids, 2)
    kw = dict(max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=0)
    short = eng.generate(ids, **kw)
    assert (short[0, 10:13] == eos).any() and (short[0, 13:] == 0).all()  # stops early without
    with torch.no_grad():
        expected = hf.generate(ids, min_new_tokens=12, **kw)
    actual = eng.generate(ids, min_new_tokens=12, **kw)
    assert torch.equal(actual, expected)
    assert not (actual[:, 10:22] == eos).any()  # no EOS among the first 12 new tokens
    # with a repetition penalty too (transformers applies both)
    with torch.no_grad():
        expected = hf.generate(ids, min_new_tokens=12, repetition_penalty=1.2, **kw)
    assert torch.equal(eng.generate(ids, min_new_tokens=12, repetition_penalty=1.2, **kw), expected)


def test_min_length_counts_the_padded_prompt_as_transformers():
    """HF's MinLengthLogitsProcessor: EOS is blocked while input_ids (prompt padding included)
    is shorter than min_length; with min_new_tokens too, the later of the two wins."""
    hf = variant("qwen2")
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=96)
    ids = prompts(2, 10)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    eos = early_eos(eng, ids[:1], 2)
    kw = dict(attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=eos)
    kw["pad_token_id"] = 0
    assert (eng.generate(ids, **kw)[0, 10:13] == eos).any()  # stops early without
    for extra in (dict(min_length=22), dict(min_length=22, min_new_tokens=15), dict(min_length=5)):
        with torch.no_grad():
            expected = hf.generate(ids, **kw, **extra)
        assert torch.equal(eng.generate(ids, **kw, **extra), expected), extra
    assert not (eng.generate(ids, **kw, min_length=22)[:, 10:22] == eos).any()
    with pytest.raises(ValueError, match="min_length must be an int >= 0"):
        eng.generate(ids, max_new_tokens=2, min_length=-1)


def test_forced_eos_token_is_the_last_new_token_as_transformers():
    """HF's ForcedEOSTokenLogitsProcessor: at the last new token every score is -inf but the
    forced ids' (0); with min_new_tokens, prompt lookup and a draft too."""
    hf = variant("mistral-window")
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=96)
    ids = prompts(2, 10)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    free = eng.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    forced = [int(free[0, 12]), 7]  # an id the rows emit early (it is also EOS below) and another
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    kw.update(forced_eos_token_id=forced, return_dict_in_generate=True, output_scores=True)
    for extra in ({}, dict(eos_token_id=forced[0], min_new_tokens=5)):
        with torch.no_grad():
            expected = hf.generate(ids, **kw, **extra)
        out = eng.generate(ids, **kw, **extra)
        assert torch.equal(out.sequences, expected.sequences), extra
        for mine, theirs in zip(out.scores, expected.scores):
            assert torch.equal(torch.isinf(mine), torch.isinf(theirs)), extra
    plain = eng.generate(ids, attention_mask=mask, max_new_tokens=12, forced_eos_token_id=forced)
    assert set(plain[:, -1].tolist()) <= set(forced) and not torch.equal(plain, free)
    base = prompts(2, 12, seed=5)
    grounded = torch.cat([base, base, base[:, :4]], dim=1)
    kw = dict(max_new_tokens=20, do_sample=False, forced_eos_token_id=[5])
    plain = eng.generate(grounded, **kw)
    assert (plain[:, -1] == 5).all()
    assert torch.equal(eng.generate(grounded, prompt_lookup_num_tokens=8, **kw), plain)
    twin = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=96)
    assert torch.equal(eng.generate(grounded, assistant_model=twin, **kw), plain)


def test_speculative_with_min_new_tokens_equals_plain_greedy():
    hf = variant("mistral")
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=200)
    base = prompts(2, 12, seed=5)
    ids = torch.cat([base, base, base, base[:, :4]], dim=1)  # grounded text: guesses get kept
    eos = early_eos(eng, ids, 3)
    kw = dict(max_new_tokens=40, do_sample=False, eos_token_id=eos, pad_token_id=0)
    kw["min_new_tokens"] = 20
    plain = eng.generate(ids, **kw)
    with torch.no_grad():
        assert torch.equal(plain, hf.generate(ids, **kw))
    assert torch.equal(eng.generate(ids, prompt_lookup_num_tokens=8, **kw), plain)
    draft = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=200)  # proposes EOS early
    assert torch.equal(
        eng.generate(ids, assistant_model=draft, num_assistant_tokens=6, **kw), plain
    )
    assert not draft._processors.eos_blocked


def test_sampling_never_emits_eos_before_min_new_tokens():
    eng = lk.Engine.from_hf(variant("qwen3"), max_seq_len=64)
    ids = prompts(1, 6)
    counts = torch.zeros(320)
    for seed in range(8):  # the most frequent sampled ids become the EOS set
        out = eng.generate(ids, max_new_tokens=12, do_sample=True, temperature=1.5, seed=seed)
        counts += torch.bincount(out[0, 6:], minlength=320)
    eos = counts.topk(3).indices.tolist()
    kw = dict(max_new_tokens=24, do_sample=True, temperature=1.5, eos_token_id=eos, pad_token_id=0)
    stopped_early = 0
    for seed in range(8):
        free = eng.generate(ids, seed=seed, **kw)[0, 6:].tolist()
        stopped_early += any(t in eos for t in free[:10])
        held = eng.generate(ids, seed=seed, min_new_tokens=10, **kw)
        assert torch.equal(held, eng.generate(ids, seed=seed, min_new_tokens=10, **kw))
        assert not any(t in eos for t in held[0, 6:16].tolist())
        spec = eng.generate(ids, seed=seed, min_new_tokens=10, prompt_lookup_num_tokens=3, **kw)
        assert not any(t in eos for t in spec[0, 6:16].tolist())
    assert stopped_early > 0  # the EOS set is likely enough for the test to mean something


@pytest.mark.parametrize("value", [-1, 1.5, "3", True])
def test_bad_min_new_tokens_is_refused_by_name(value):
    eng = lk.Engine.from_hf(variant("qwen2"), max_seq_len=32)
    with pytest.raises(ValueError, match="min_new_tokens"):
        eng.generate(prompts(1, 4), max_new_tokens=2, min_new_tokens=value)


def test_speculative_rounds_keep_the_count_for_plain_steps():
    """Rounds without guesses run the plain decode step, whose count of tokens to come must
    follow the tokens the verify rounds kept: EOS becomes possible exactly at min_new_tokens."""
    eng = lk.Engine.from_hf(variant("qwen2"), max_seq_len=128)
    ids = prompts(1, 12, seed=7)
    free = eng.generate(ids, max_new_tokens=40, do_sample=False)[0, 12:].tolist()
    checked = 0
    for m in range(8, 36):
        if free[m] in free[:m]:
            continue  # EOS there would be blocked earlier and change the text
        kw = dict(max_new_tokens=40, do_sample=False, eos_token_id=free[m], min_new_tokens=m)
        plain = eng.generate(ids, **kw)
        assert plain.shape[1] == 12 + m + 1  # ends with EOS right at the minimum
        assert torch.equal(eng.generate(ids, prompt_lookup_num_tokens=4, **kw), plain), m
        checked += 1
    assert checked >= 5


DECAYS = [(2, 1.5), (0, 1.2), (5, 0.8)]  # EOS raised from new token 3 / 1 on; lowered after 5


def test_exponential_decay_length_penalty_as_transformers():
    """HF's ExponentialDecayLengthPenalty: from new token start + 1 on, EOS scores s become
    s + |s| * (factor ** (n - start) - 1): the same tokens as transformers' generate on a
    ragged batch (EOS sooner, or later with a factor < 1), and with prompt lookup and a draft
    what plain decoding gives."""
    hf = variant("qwen2")
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=128)
    ids = prompts(2, 10)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    kw = dict(attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0)
    free = eng.generate(ids, **kw)
    kw["eos_token_id"] = eos = int(free[0, 22])  # row 0 emits it as new token 12
    plain = eng.generate(ids, **kw)
    for decay in DECAYS:
        with torch.no_grad():
            expected = hf.generate(ids, exponential_decay_length_penalty=decay, **kw)
        out = eng.generate(ids, exponential_decay_length_penalty=decay, **kw)
        assert torch.equal(out, expected), decay
        assert out.shape != plain.shape or not torch.equal(out, plain), decay  # it acts
    base = prompts(2, 12, seed=5)
    grounded = torch.cat([base, base, base[:, :4]], dim=1)
    kw = dict(max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=0)
    kw["exponential_decay_length_penalty"] = (4, 1.4)
    plain = eng.generate(grounded, **kw)
    with torch.no_grad():
        assert torch.equal(plain, hf.generate(grounded, **kw))
    assert torch.equal(eng.generate(grounded, prompt_lookup_num_tokens=8, **kw), plain)
    draft = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=128)
    assert torch.equal(eng.generate(grounded, assistant_model=draft, **kw), plain)
    assert eng.last_acceptance[0] > 0  # guesses were kept: the verify positions were decayed


@pytest.mark.parametrize("n", [0, 2, 3, 7, 60])
def test_decayed_scores_equal_transformers_processor(n):
    """The processor on crafted scores, bit for bit, at new token n (start 2): finite EOS scores
    of both signs, a second EOS id, and a non-finite EOS score, which keeps its value (5.24's
    rule; 5.17 made it NaN)."""
    from transformers.generation.logits_process import ExponentialDecayLengthPenalty

    eng = lk.Engine.from_hf(variant("qwen2"), max_batch_size=3, max_seq_len=96)
    eos = [7, 11]
    kw = dict(max_new_tokens=80, eos_token_id=eos, exponential_decay_length_penalty=(2, 1.7))
    params = eng._params(4, None, kw)
    eng._processors.start(params, [[5, 6, 7, 8]] * 3)
    eng._processors.set_counts([n] * 3)
    scores = torch.randn(3, 320, generator=torch.Generator().manual_seed(n)) * 4
    scores[0, 7], scores[1, 7], scores[2, 11] = 3.0, -2.5, float("-inf")
    hf_scores = scores.clone()
    hf_scores[2, 11] = 0.0  # transformers 5.17 would give NaN for -inf: compared separately
    theirs = ExponentialDecayLengthPenalty((2, 1.7), eos, 4)(torch.zeros(3, 4 + n), hf_scores)
    ours = eng._processors.apply(scores)
    assert torch.equal(ours[:, :11], theirs[:, :11]) and torch.equal(ours[:, 12:], theirs[:, 12:])
    assert torch.equal(ours[:2, 11], theirs[:2, 11]) and ours[2, 11] == float("-inf")
    assert torch.equal(ours[0, 7] > 3.0, torch.tensor(n > 2))  # it acts from new token 3 on


def test_sampling_with_a_steep_decay_ends_at_the_first_decayed_token():
    """A huge factor makes EOS all but certain from new token start + 1: every sampled row ends
    there (or earlier, at an EOS drawn before), plain and with prompt lookup."""
    eng = lk.Engine.from_hf(variant("qwen3"), max_batch_size=4, max_seq_len=64)
    ids = prompts(4, 6)
    eos = 9
    kw = dict(max_new_tokens=20, do_sample=True, temperature=1.0, eos_token_id=eos)
    kw.update(pad_token_id=0, exponential_decay_length_penalty=(4, 1e6))
    for extra in ({}, dict(prompt_lookup_num_tokens=3)):
        for seed in range(3):
            out = eng.generate(ids[:1] if extra else ids, seed=seed, **kw, **extra)
            assert out.shape[1] <= 6 + 6, extra  # new token 5 (0-based) is the sixth
            assert (out[:, 6:] == eos).any(dim=1).all(), extra


@pytest.mark.parametrize(
    "value", [(-1, 1.5), (2,), (2, float("inf")), (2, "1.5"), "2, 1.5", (True, 1.5)]
)
def test_bad_exponential_decay_length_penalty_is_refused_by_name(value):
    eng = lk.Engine.from_hf(variant("qwen2"), max_seq_len=32)
    kw = dict(max_new_tokens=2, eos_token_id=3)
    with pytest.raises(ValueError, match="exponential_decay_length_penalty must be"):
        eng.generate(prompts(1, 4), exponential_decay_length_penalty=value, **kw)
    with pytest.raises(ValueError, match="there is no eos_token_id"):
        eng.generate(prompts(1, 4), max_new_tokens=2, exponential_decay_length_penalty=(1, 1.5))
