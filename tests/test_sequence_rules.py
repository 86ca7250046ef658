"""sequence_bias, bad_words_ids, suppress_tokens and begin_suppress_tokens in the engine against
transformers' generate (random models of its families, CPU fp32): the same tokens and the same
processed scores, alone and with the other processors, in plain, sampled and speculative calls."""

from __future__ import annotations

import pytest
import torch
from test_families import hf_greedy, prompts, variant
from test_generate_outputs import close

import llmkernels as lk
from llmkernels.processors import SequenceRules


def settings(free: list[int]) -> dict[str, dict]:
    """Rules built from a row's free greedy continuation, so that each one changes it."""
    a, b, c = free[2], free[3], free[5]
    return {
        "bad single": dict(bad_words_ids=[[a]]),
        "bad pair": dict(bad_words_ids=[[a, b], [7, 8, 9]]),
        "bias": dict(sequence_bias={(a,): -4.0, (a, b): -30.0, (c,): 2.5}),
        "bias list form": dict(sequence_bias=[[[a, b], -30.0], [[c], 2.5]]),
        "suppress": dict(suppress_tokens=[a, c]),
        "begin suppress": dict(begin_suppress_tokens=[free[0]]),
    }


def test_rules_equal_transformers_processors_bit_for_bit():
    from transformers.generation.logits_process import (
        NoBadWordsLogitsProcessor,
        SequenceBiasLogitsProcessor,
    )

    g = torch.Generator().manual_seed(0)
    vocab = 9  # a small vocabulary: many rules match
    for _ in range(20):
        rules = {}
        for _ in range(6):
            ids = torch.randint(
                0, vocab, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g
            )
            rules[tuple(ids.tolist())] = float(torch.randn(1, generator=g)) * 3
        text = torch.randint(0, vocab, (5, 12), generator=g)
        scores = torch.randn(5, vocab, generator=g)
        ours = SequenceRules(rules, vocab, torch.device("cpu"), "sequence_bias")
        expected = SequenceBiasLogitsProcessor(sequence_bias=rules)(text, scores.clone())
        assert torch.equal(ours(text[:, -ours.longest :], scores), expected)
        words = [list(k) for k in rules]
        bad = SequenceRules({k: float("-inf") for k in rules}, vocab, torch.device("cpu"), "b")
        expected = NoBadWordsLogitsProcessor(words)(text, scores.clone())
        assert torch.equal(bad(text[:, -bad.longest :], scores), expected)


@pytest.mark.parametrize("name", ["qwen2", "mistral-window"])
def test_greedy_and_scores_match_transformers(name):
    hf = variant(name)
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=96)
    ids = prompts(2, 10)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    base = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    free = eng.generate(ids, **base)
    record = dict(return_dict_in_generate=True, output_scores=True)
    for label, rule in settings(free[0, 10:].tolist()).items():
        # with a penalty too: the bias comes before it in transformers' order (unpadded rows:
        # transformers 5.17 penalizes the pad id of padded rows, 5.24 and the engine do not)
        for extra in ({}, dict(repetition_penalty=1.3, attention_mask=torch.ones_like(ids))):
            kw = {**base, **rule, **extra, **record}
            with torch.no_grad():
                expected = hf.generate(ids, **kw)
            out = eng.generate(ids, **kw)
            assert torch.equal(out.sequences, expected.sequences), (label, extra)
            for step, (mine, theirs) in enumerate(zip(out.scores, expected.scores)):
                assert close(mine, theirs), (label, extra, step)
        assert not torch.equal(eng.generate(ids, **base, **rule), free), label  # it bit


def test_rules_hold_in_the_output():
    hf = variant("qwen3")
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=96)
    ids = prompts(2, 10)
    free = eng.generate(ids, max_new_tokens=30, do_sample=False)[:, 10:].tolist()
    a, b = free[0][2], free[0][3]
    out = eng.generate(ids, max_new_tokens=30, do_sample=False, bad_words_ids=[[a, b]])
    for row in out.tolist():  # the pair never appears, a alone may
        assert all((x, y) != (a, b) for x, y in zip(row[10:], row[11:]))
    out = eng.generate(ids, max_new_tokens=30, do_sample=False, suppress_tokens=free[0][:5])
    assert not set(out[:, 10:].flatten().tolist()) & set(free[0][:5])
    first = eng.generate(
        ids, max_new_tokens=30, do_sample=False, begin_suppress_tokens=[free[0][0]]
    )
    assert first[0, 10] != free[0][0]


def test_sampled_and_speculative_calls_equal_plain():
    hf = variant("mistral")
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=200)
    base = prompts(2, 12, seed=5)
    ids = torch.cat([base, base, base[:, :4]], dim=1)  # guesses from the prompt get kept
    free = eng.generate(ids, max_new_tokens=40, do_sample=False)[0, 28:].tolist()
    rules = dict(
        bad_words_ids=[[free[4], free[5]]],
        sequence_bias={(free[1], free[2]): -20.0, (free[8],): 3.0},
        suppress_tokens=[free[10]],
    )
    kw = dict(max_new_tokens=40, do_sample=False, **rules)
    plain = eng.generate(ids, **kw)
    assert torch.equal(plain, hf_greedy(hf, ids, 40, **rules))
    assert torch.equal(eng.generate(ids, prompt_lookup_num_tokens=8, **kw), plain)
    assert eng.last_acceptance[0] > 0  # later verify positions saw kept guesses
    twin = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=200)  # proposes what rules remove
    assert torch.equal(eng.generate(ids, assistant_model=twin, num_assistant_tokens=6, **kw), plain)
    sampled = dict(kw, do_sample=True, top_k=1)
    assert torch.equal(eng.generate(ids, seed=1, **sampled), plain)
    # the twin's first round guesses free[1:7]: banning the pair (free[4], free[5]) there needs
    # the guess free[4] in place at the position that would take free[5]
    # (first: the text buffer still holds the last call's, other, tokens past the guesses)
    kw = dict(max_new_tokens=40, do_sample=False, bad_words_ids=[[free[4], free[5]]])
    drafted = eng.generate(ids, assistant_model=twin, num_assistant_tokens=6, **kw)
    plain = eng.generate(ids, **kw)
    assert plain[0, 28 + 5] != free[5] and torch.equal(drafted, plain)


def test_a_rule_set_keeps_its_tensors_and_its_own_graph_key():
    """On CUDA a captured decode step reads the rule tensors it was captured with: each rule set
    keeps its tensors across calls, and another rule set has another step key."""
    eng = lk.Engine.from_hf(variant("qwen2"), max_seq_len=64)
    ids = prompts(1, 6)
    processors = eng._processors
    keys, tensors = [], []
    for rules in ({(5, 6): -2.0}, {(5, 6): -2.0}, {(5, 6): -3.0}, {(5, 7): -2.0}):
        eng.generate(ids, max_new_tokens=2, sequence_bias=rules, suppress_tokens=[9])
        keys.append(processors.key())
        tensors.append(processors.sequence_bias.groups[0][0])
    assert keys[0] == keys[1] and tensors[0] is tensors[1]
    assert len({keys[0], keys[2], keys[3]}) == 3
    mask = processors.suppress_mask
    eng.generate(ids, max_new_tokens=2, suppress_tokens=[10])
    assert processors.suppress_mask is mask and mask[10] and not mask[9]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bad_words_ids=[[400]]), "vocabulary"),
        (dict(sequence_bias={(5, 400): 1.0}), "vocabulary"),
        (dict(bad_words_ids=[]), "bad_words_ids"),
        (dict(sequence_bias={5: 1.0}), "sequence_bias"),
        (dict(suppress_tokens=[400]), "suppress_tokens must be token ids"),
        (dict(begin_suppress_tokens=[-1]), "begin_suppress_tokens must be token ids"),
    ],
)
def test_bad_rules_raise_before_any_work(kwargs, message):
    eng = lk.Engine.from_hf(variant("qwen2"), max_seq_len=32)  # vocabulary of 320
    with pytest.raises(ValueError, match=message):
        eng.generate(prompts(1, 4), max_new_tokens=2, **kwargs)
    assert eng.last_prefill_len == 0


def test_processors_trace_without_a_host_sync():
    """The decode step applies the processors inside a CUDA graph, where a host sync fails the
    capture: dynamo's fullgraph tracing refuses the same data-dependent branches on the CPU."""
    from llmkernels.generate import resolve_generation_params

    eng = lk.Engine.from_hf(variant("qwen2"), max_batch_size=2, max_seq_len=64)
    params = resolve_generation_params(
        eng.generation_config,
        8,
        64,
        max_new_tokens=4,
        repetition_penalty=1.2,
        no_repeat_ngram_size=2,
        sequence_bias={(5, 6): 1.5, (7,): -1.0},
        bad_words_ids=[[8, 9, 10]],
        min_new_tokens=3,
        eos_token_id=11,
        suppress_tokens=[12],
        begin_suppress_tokens=[13],
        forced_eos_token_id=[11, 14],
        remove_invalid_values=True,
        exponential_decay_length_penalty=(1, 1.3),
    )
    processors = eng._processors
    processors.start(params, [list(range(3, 11)), list(range(20, 25))])
    assert all(processors.key()[:3]) and all(processors.key()[3:])

    def step(logits, tokens):
        scores = processors.apply(logits, first=True)
        processors.advance(tokens)
        return scores

    logits, tokens = torch.randn(2, 320), torch.tensor([6, 9])
    saved = [t.clone() for t in processors.state()]
    expected = step(logits, tokens)
    for t, value in zip(processors.state(), saved):
        t.copy_(value)
    traced = torch.compile(step, fullgraph=True, backend="eager")
    torch.testing.assert_close(traced(logits, tokens), expected)
    verify = torch.compile(processors.apply_verify, fullgraph=True, backend="eager")
    drafts = torch.tensor([[6, 7, 8], [9, 10, 11]])
    verify(torch.randn(2, 3, 320), drafts, [1, 1])
