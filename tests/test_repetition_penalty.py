"""Repetition penalty (llmkernels.penalties) against transformers: its logits processor, and its
generate on random models of three families, CPU fp32; plain, ragged, chat and speculative calls
of the engine all give what plain decoding with the penalty gives."""

from __future__ import annotations

import inspect

import pytest
import torch
from test_families import hf_greedy, make_hf, prompts, variant
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

import llmkernels as lk
from llmkernels.penalties import apply_repetition_penalty, mark_seen, verify_seen


def test_penalty_equals_transformers_processor():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (3, 30), generator=g)  # [B, T] with repeated ids
    scores = torch.randn(3, 50, generator=g) * 4
    scores[0, ids[0, 0]] = 0.0  # a zero score stays zero
    seen = torch.zeros(3, 50, dtype=torch.bool)
    mark_seen(seen, ids)
    for penalty in (1.3, 0.7):  # penalize / reward repetition
        expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, scores.clone())
        actual = apply_repetition_penalty(scores, seen, torch.full((3,), penalty))
        assert torch.equal(actual, expected)
        assert not torch.equal(actual, scores)
    # bf16 logits: transformers' generate upcasts them to fp32 before its processors
    bf16 = scores.bfloat16()
    expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, bf16.float())
    assert torch.equal(apply_repetition_penalty(bf16, seen, torch.full((3,), 1.3)), expected)


def test_seen_masks_skip_padding_and_see_the_guesses_before_each_position():
    ids = torch.tensor([[7, 7, 3, 9], [1, 2, 5, 5]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)  # row 0 left-padded
    seen = torch.zeros(2, 12, dtype=torch.bool)
    mark_seen(seen, ids, mask)
    assert seen[0].nonzero().flatten().tolist() == [3, 9]
    assert seen[1].nonzero().flatten().tolist() == [1, 2, 5]
    pending = torch.tensor([9, 5])  # the last token of each row's text: already seen
    drafts = torch.tensor([[4, 9, 11], [6, 6, 0]])  # row 1: two guesses and a padding entry
    out = verify_seen(seen, pending, drafts)
    assert out.shape == (2, 4, 12)
    for b in range(2):
        for j in range(4):
            expected = seen[b].clone()
            expected[drafts[b, :j]] = True
            assert torch.equal(out[b, j], expected), (b, j)
    assert torch.equal(verify_seen(seen, pending, drafts[:, :0]), seen[:, None])


@pytest.mark.parametrize("name", ["qwen2", "mistral-window", "qwen3"])
def test_greedy_with_penalty_matches_transformers(name):
    hf = variant(name)
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=128)
    ids = prompts(2, 12)
    for penalty in (1.3, 0.8):
        expected = hf_greedy(hf, ids, 48, repetition_penalty=penalty)
        actual = eng.generate(ids, max_new_tokens=48, do_sample=False, repetition_penalty=penalty)
        assert torch.equal(actual, expected), penalty
        assert not torch.equal(actual, hf_greedy(hf, ids, 48))  # the penalty changed the text


def test_ragged_batch_with_penalty_equals_rows_alone():
    """Left padding is not part of a row's text. transformers ignores it too since it passes
    prompt_ignore_length from the attention mask (5.17 still penalized the pad id)."""
    from transformers.generation.utils import GenerationMixin

    hf = variant("qwen2")
    eng = lk.Engine.from_hf(hf, max_batch_size=3, max_seq_len=96)
    ids = prompts(3, 14)
    ids[0, :5] = 4  # pad id 4 would be penalized if padding counted
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :9] = 0
    kw = dict(max_new_tokens=24, do_sample=False, repetition_penalty=1.4, pad_token_id=4)
    batched = eng.generate(ids, attention_mask=mask, **kw)
    for row in range(3):
        alone = eng.generate(ids[row : row + 1, mask[row].bool()], **kw)
        assert torch.equal(batched[row, 14:], alone[0, -24:]), f"row {row}"
    if "prompt_ignore_length" in inspect.getsource(GenerationMixin._get_logits_processor):
        expected = hf_greedy(hf, ids, 24, attention_mask=mask, repetition_penalty=1.4)
        assert torch.equal(batched[:, 14:], expected[:, 14:])


def test_model_generation_config_penalty_applies_by_default():
    """Qwen2 / Qwen2.5-Instruct ship repetition_penalty 1.05 in generation_config.json."""
    hf = variant("qwen2")
    hf.generation_config.repetition_penalty = 1.3
    eng = lk.Engine.from_hf(hf, max_seq_len=64)
    ids = prompts(1, 10)
    expected = hf_greedy(hf, ids, 30)  # transformers reads it from the model's config too
    assert not torch.equal(expected, hf_greedy(hf, ids, 30, repetition_penalty=1.0))
    assert torch.equal(eng.generate(ids, max_new_tokens=30, do_sample=False), expected)
    assert torch.equal(
        eng.generate(ids, max_new_tokens=30, repetition_penalty=1.0),
        hf_greedy(hf, ids, 30, repetition_penalty=1.0),
    )


def test_speculative_with_penalty_equals_plain_greedy():
    """Each verify position is penalized for the text and the guesses before it: prompt lookup
    and a draft model (which proposes without the penalty, as transformers' assistant) keep
    plain greedy's tokens."""
    hf = variant("mistral")
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=200)
    base = prompts(2, 12, seed=5)
    ids = torch.cat([base, base, base, base[:, :4]], dim=1)  # grounded text: guesses get kept
    kw = dict(max_new_tokens=60, do_sample=False, repetition_penalty=1.1)
    plain = eng.generate(ids, **kw)
    assert torch.equal(plain, hf_greedy(hf, ids, 60, repetition_penalty=1.1))
    assert torch.equal(eng.generate(ids, prompt_lookup_num_tokens=8, **kw), plain)
    assert eng.last_acceptance[0] > 0  # guesses were kept, so later positions saw them
    draft = lk.Engine.from_hf(variant("mistral", seed=1), max_batch_size=2, max_seq_len=200)
    assert torch.equal(
        eng.generate(ids, assistant_model=draft, num_assistant_tokens=4, **kw), plain
    )
    assert not draft._processors.penalized
    # a draft with the target's weights proposes its unpenalized choices, which repeat tokens it
    # has just guessed: only a penalty on the guesses before each position rejects the repeats
    twin = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=200)
    kw["repetition_penalty"] = 3.0
    plain = eng.generate(ids, **kw)
    assert torch.equal(eng.generate(ids, assistant_model=twin, num_assistant_tokens=6, **kw), plain)


def test_sampling_with_penalty_is_seeded_and_changes_the_draws():
    eng = lk.Engine.from_hf(variant("qwen3"), max_seq_len=96)
    ids = prompts(1, 8)
    kw = dict(max_new_tokens=40, do_sample=True, temperature=0.8, top_k=0, seed=3)
    a = eng.generate(ids, repetition_penalty=2.0, **kw)
    assert torch.equal(a, eng.generate(ids, repetition_penalty=2.0, **kw))
    assert not torch.equal(a, eng.generate(ids, **kw))

    # a strong penalty makes repeats rarer than without it
    def repeats(out):
        new = out[0, 8:].tolist()
        return len(new) - len(set(new))

    assert repeats(a) < repeats(eng.generate(ids, repetition_penalty=0.5, **kw))
    spec = eng.generate(ids, repetition_penalty=2.0, prompt_lookup_num_tokens=4, **kw)
    assert torch.equal(
        spec, eng.generate(ids, repetition_penalty=2.0, prompt_lookup_num_tokens=4, **kw)
    )


def test_chat_with_penalty_continuation_equals_recompute(smol_tokenizer):
    """A follow-up turn prefills only its new tokens, but the earlier turns still count."""
    tok = smol_tokenizer
    hf = make_hf("qwen3", vocab_size=len(tok), head_dim=16, tie_word_embeddings=True)
    eng = lk.Engine.from_hf(hf, tokenizer=tok, max_seq_len=256)
    kw = dict(max_new_tokens=16, do_sample=False, repetition_penalty=0.2)  # rewards repeats
    session = eng.chat_session([{"role": "system", "content": "You are terse."}], **kw)
    session.send("Name a colour.")
    second = session.send("And a fruit?")
    assert eng.last_prefill_len < len(eng.chat_ids(session.messages[:4]))
    ids = torch.tensor([eng.chat_ids(session.messages[:4])])
    expected = hf_greedy(hf, ids, 16, repetition_penalty=0.2)[0, ids.shape[1] :]
    assert second == tok.decode(expected, skip_special_tokens=True)
    eng.reset()
    assert eng.chat(session.messages[:4], **kw) == second


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf"), "1.2", True])
def test_bad_penalty_is_refused_by_name(value):
    eng = lk.Engine.from_hf(variant("qwen2"), max_seq_len=32)
    with pytest.raises(ValueError, match="repetition_penalty"):
        eng.generate(prompts(1, 4), max_new_tokens=2, repetition_penalty=value)
