"""no_repeat_ngram_size in the engine against transformers (its NoRepeatNGramLogitsProcessor):
the ban computation itself, then generate on random models of its families, CPU fp32; plain,
ragged, sampled, recorded, speculative and chat calls all give what plain decoding gives."""

from __future__ import annotations

import pytest
import torch
from test_families import hf_greedy, make_hf, prompts, variant
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

import llmkernels as lk
from llmkernels.penalties import ngram_bans


def repeats(row: list[int], n: int) -> bool:
    grams = [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_bans_equal_transformers_processor_at_every_position(n):
    g = torch.Generator().manual_seed(n)
    vocab, batch, size, positions = 7, 3, 40, 4  # a small vocabulary: many repeated n-grams
    for _ in range(20):
        text = torch.randint(0, vocab, (batch, size), generator=g)
        lengths = torch.randint(1, size - positions + 2, (batch,), generator=g)
        banned = ngram_bans(text, lengths, n, vocab, positions)
        assert banned.shape == (batch, positions, vocab)
        for b in range(batch):
            for p in range(positions):
                end = int(lengths[b]) + p
                scores = NoRepeatNGramLogitsProcessor(n)(
                    text[b : b + 1, :end], torch.zeros(1, vocab)
                )
                assert torch.equal(banned[b, p], torch.isinf(scores[0])), (b, p, end)
    # an n-gram longer than the buffer bans nothing
    assert not ngram_bans(text, lengths, size + 1, vocab).any()


@pytest.mark.parametrize("name", ["qwen2", "mistral-window"])
def test_greedy_matches_transformers(name):
    hf = variant(name)
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=128)
    ids = prompts(2, 12)
    free = eng.generate(ids, max_new_tokens=60, do_sample=False)
    assert any(repeats(row, 2) for row in free.tolist())  # random models loop: bans will bite
    for n in (2, 3):
        expected = hf_greedy(hf, ids, 60, no_repeat_ngram_size=n)
        actual = eng.generate(ids, max_new_tokens=60, do_sample=False, no_repeat_ngram_size=n)
        assert torch.equal(actual, expected), n
        assert not torch.equal(actual, free)
        assert not any(repeats(row, n) for row in actual.tolist())


def test_the_prompts_ngrams_are_banned_too():
    """A prompt that is the model's own loop: without the ban the continuation repeats it."""
    hf = variant("qwen2")
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=128)
    ids = eng.generate(prompts(2, 8), max_new_tokens=40, do_sample=False)  # [2, 48], looping
    prompt_grams = [{tuple(r[i : i + 3]) for i in range(46)} for r in ids.tolist()]

    def reuses_prompt_grams(out: torch.Tensor) -> list[bool]:  # n-grams ending in new tokens
        rows = zip(out.tolist(), prompt_grams)
        return [any(tuple(r[i : i + 3]) in grams for i in range(46, 66)) for r, grams in rows]

    assert any(reuses_prompt_grams(eng.generate(ids, max_new_tokens=20, do_sample=False)))
    kw = dict(max_new_tokens=20, do_sample=False, no_repeat_ngram_size=3)
    banned = eng.generate(ids, **kw)
    assert torch.equal(banned, hf_greedy(hf, ids, 20, no_repeat_ngram_size=3))
    assert not any(reuses_prompt_grams(banned))


def test_ragged_batch_equals_rows_alone_and_transformers():
    hf = variant("qwen3")
    eng = lk.Engine.from_hf(hf, max_batch_size=3, max_seq_len=96)
    ids = prompts(3, 14)
    mask = torch.ones_like(ids)
    ids[0, :5], mask[0, :5] = 0, 0
    ids[2, :9], mask[2, :9] = 0, 0
    kw = dict(max_new_tokens=30, do_sample=False, no_repeat_ngram_size=2, pad_token_id=0)
    batched = eng.generate(ids, attention_mask=mask, **kw)
    for row in range(3):
        alone = eng.generate(ids[row : row + 1, mask[row].bool()], **kw)
        assert torch.equal(batched[row, 14:], alone[0, -30:]), f"row {row}"
    # the pad id never occurs in the text, so transformers' padded n-grams never match either
    assert torch.equal(batched, hf_greedy(hf, ids, 30, attention_mask=mask, no_repeat_ngram_size=2))


def test_sampled_scores_match_transformers_with_the_other_processors():
    """top_k=1 sampling is deterministic in both libraries; the recorded scores carry the bans
    (and the penalty and EOS mask around them) exactly where transformers' do."""
    hf = variant("mistral-window")
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=96)
    ids = prompts(2, 10)
    eos = int(eng.generate(ids, max_new_tokens=3, do_sample=False)[0, 12])
    kw = dict(
        max_new_tokens=24,
        do_sample=True,
        top_k=1,
        no_repeat_ngram_size=2,
        repetition_penalty=1.2,
        min_new_tokens=6,
        eos_token_id=eos,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
    )
    with torch.no_grad():
        expected = hf.generate(ids, **kw)
    out = eng.generate(ids, seed=0, **kw)
    assert torch.equal(out.sequences, expected.sequences)
    for step in range(len(expected.scores)):
        assert torch.equal(torch.isinf(out.scores[step]), torch.isinf(expected.scores[step]))


def test_speculative_equals_plain_greedy():
    """Each verify position bans the n-grams of the text with the guesses before it in place."""
    hf = variant("mistral")
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=200)
    base = prompts(2, 12, seed=5)
    ids = torch.cat([base, base[:, :6]], dim=1)  # guesses from the prompt: banned as they come
    kw = dict(max_new_tokens=60, do_sample=False, no_repeat_ngram_size=3)
    plain = eng.generate(ids, **kw)
    assert torch.equal(plain, hf_greedy(hf, ids, 60, no_repeat_ngram_size=3))
    assert torch.equal(eng.generate(ids, prompt_lookup_num_tokens=8, **kw), plain)
    # a draft with the target's weights proposes the repeats the bans remove
    twin = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=200)
    assert torch.equal(eng.generate(ids, assistant_model=twin, num_assistant_tokens=6, **kw), plain)
    assert eng.last_acceptance[0] > 0  # guesses were kept, so later positions saw them in place
    sampled = dict(kw, do_sample=True, top_k=1)
    assert torch.equal(eng.generate(ids, prompt_lookup_num_tokens=8, seed=2, **sampled), plain)


def test_chat_continuation_equals_recompute(smol_tokenizer):
    """A follow-up turn prefills only its new tokens, but the earlier turns' n-grams count (n = 1:
    this random model's second reply would reuse ids of the first turns)."""
    tok = smol_tokenizer
    hf = make_hf("qwen3", vocab_size=len(tok), head_dim=16, tie_word_embeddings=True)
    eng = lk.Engine.from_hf(hf, tokenizer=tok, max_seq_len=256)
    kw = dict(max_new_tokens=16, do_sample=False, no_repeat_ngram_size=1)
    session = eng.chat_session([{"role": "system", "content": "You are terse."}], **kw)
    session.send("Name a colour.")
    second = session.send("And a fruit?")
    assert eng.last_prefill_len < len(eng.chat_ids(session.messages[:4]))
    ids = torch.tensor([eng.chat_ids(session.messages[:4])])
    expected = hf_greedy(hf, ids, 16, no_repeat_ngram_size=1)[0, ids.shape[1] :]
    assert second == tok.decode(expected, skip_special_tokens=True)
    free = hf_greedy(hf, ids, 16)[0, ids.shape[1] :]
    assert any(t in ids[0, :-8].tolist() for t in free.tolist())  # the earlier turns matter


@pytest.mark.parametrize("value", [-1, 1.5, "2", True])
def test_bad_size_is_refused_by_name(value):
    eng = lk.Engine.from_hf(variant("qwen2"), max_seq_len=32)
    with pytest.raises(ValueError, match="no_repeat_ngram_size must be an int >= 0"):
        eng.generate(prompts(1, 4), max_new_tokens=2, no_repeat_ngram_size=value)
