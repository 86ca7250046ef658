"""The caller's own logits processors and stopping criteria (llmkernels.callbacks): HF generate's
``logits_processor=`` / ``stopping_criteria=`` against transformers' own generate with the same
objects. Spies record the input_ids each call gets, so the tests compare those too: the padded
prompt, the tokens so far, pad ids in place of finished rows' tokens. CPU, fp32."""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version
from test_beam_search import sorts_draws  # transformers < 5.24 draws unsorted
from test_families import VOCAB, prompts, variant
from test_speculative import repetitive_prompts
from transformers import (
    EosTokenCriteria,
    LogitsProcessor,
    LogitsProcessorList,
    MaxLengthCriteria,
    PrefixConstrainedLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
)

import llmkernels as lk
from llmkernels.chat import until_eos


class Steer(LogitsProcessor):
    """Bans the token after each row's last one and boosts (last * 7) % V: scores that depend
    on the whole input_ids, so a wrong text shows in the output. Records its input_ids."""

    def __init__(self):
        self.seen: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.seen.append(input_ids.clone())
        rows = torch.arange(scores.shape[0])
        last = input_ids[:, -1]
        scores = scores.clone()
        scores[rows, (last + 1) % VOCAB] = -float("inf")
        scores[rows, (last * 7) % VOCAB] += 2.0 + 0.1 * input_ids.shape[1]
        return scores


class OnlyOne(LogitsProcessor):
    """Leaves one token per row, chosen from its text: sampling must then draw it."""

    def __call__(self, input_ids, scores):
        keep = (input_ids.sum(dim=1) * 31 + input_ids.shape[1]) % VOCAB
        masked = torch.full_like(scores, -float("inf"))
        rows = torch.arange(scores.shape[0])
        masked[rows, keep] = scores[rows, keep]
        return masked


class StopAtToken(StoppingCriteria):
    """A row stops once it emits ``token`` or its text reaches ``length``. Records its input_ids
    and what it was given as scores (None, or how many steps' scores)."""

    def __init__(self, token: int, length: int):
        self.token, self.length = token, length
        self.seen: list[torch.Tensor] = []
        self.scores: list[int | None] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.seen.append(input_ids.clone())
        self.scores.append(None if scores is None else len(scores))
        return (input_ids[:, -1] == self.token) | (input_ids.shape[1] >= self.length)


class Allowed:
    """A ``prefix_allowed_tokens_fn``: ``width`` ids that depend on ``batch_id`` and the text's
    last token (so a wrong batch_id or text shows in the output), plus ``eos``; only ``eos`` once
    the text is ``eos_only_at`` long. Records its calls."""

    def __init__(self, eos: int | None = None, eos_only_at: int = -1, width: int = 4):
        self.eos, self.eos_only_at, self.width = eos, eos_only_at, width
        self.calls: list[tuple[int, torch.Tensor]] = []

    def __call__(self, batch_id: int, input_ids: torch.Tensor) -> list[int]:
        self.calls.append((batch_id, input_ids.clone()))
        if input_ids.shape[0] == self.eos_only_at:
            return [self.eos]
        start = int(input_ids[-1]) * 5 + 37 * batch_id
        allowed = [(start + 3 * k) % VOCAB for k in range(self.width)]
        return allowed + ([self.eos] if self.eos is not None else [])


def ragged(batch: int, length: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts: row b has 2 b pad tokens (id 0)."""
    ids = prompts(batch, length, seed=seed)
    mask = torch.ones_like(ids)
    for b in range(batch):
        ids[b, : 2 * b] = 0
        mask[b, : 2 * b] = 0
    return ids, mask


def both(hf, eng, ids, make, **kw):
    """HF's and the engine's output with fresh callbacks from ``make()`` each, and the callbacks."""
    theirs, ours = make(), make()
    with torch.no_grad():
        expected = hf.generate(ids, **kw, **theirs)
    actual = eng.generate(ids, **kw, **ours)
    return expected, actual, theirs, ours


def assert_same_calls(theirs: list[torch.Tensor], ours: list[torch.Tensor]) -> None:
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.equal(a, b), f"call {step}: input_ids differ"


@pytest.mark.parametrize("name", ["mistral", "qwen3"])
def test_logits_processor_equals_transformers(name):
    hf = variant(name)
    eng = lk.Engine.from_hf(hf, max_batch_size=4, max_seq_len=64)
    ids, mask = ragged(3, 9)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = hf.generate(ids, **kw)
    eos = int(plain[1, 9 + 4])  # an EOS id row 1 meets (with the processor the text changes)
    kw["eos_token_id"] = eos

    def make():
        return dict(logits_processor=LogitsProcessorList([Steer()]))

    expected, actual, theirs, ours = both(hf, eng, ids, make, **kw)
    assert torch.equal(actual, expected)
    assert not torch.equal(expected, hf.generate(ids, **kw))  # the processor changed the text
    assert_same_calls(theirs["logits_processor"][0].seen, ours["logits_processor"][0].seen)


def test_a_builtin_type_without_its_setting_runs_as_in_transformers():
    """A RepetitionPenaltyLogitsProcessor with no repetition_penalty set is just a custom one."""
    hf = variant("qwen3")
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=64)
    ids = prompts(2, 7)
    kw = dict(max_new_tokens=10, do_sample=False, eos_token_id=None)
    make = lambda: dict(logits_processor=[RepetitionPenaltyLogitsProcessor(4.0)])  # noqa: E731
    expected, actual, _, _ = both(hf, eng, ids, make, **kw)
    assert torch.equal(actual, expected)
    assert not torch.equal(expected, eng.generate(ids, **kw))


def test_sampling_draws_what_the_processor_leaves():
    hf = variant("mistral")
    eng = lk.Engine.from_hf(hf, max_batch_size=4, max_seq_len=64)
    ids, mask = ragged(2, 7)
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=5, pad_token_id=0)
    kw["eos_token_id"] = None
    expected, actual, _, _ = both(hf, eng, ids, lambda: dict(logits_processor=[OnlyOne()]), **kw)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("eos", [True, False])
def test_stopping_criteria_equal_transformers(eos):
    """A criterion stops rows one by one; with an EOS id their later tokens are pads (and the
    criterion sees them), without one they run on, as in transformers."""
    hf = variant("mistral")
    eng = lk.Engine.from_hf(hf, max_batch_size=4, max_seq_len=64)
    ids, mask = ragged(3, 8)
    kw = dict(attention_mask=mask, max_new_tokens=14, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = hf.generate(ids, **kw, eos_token_id=None)
    token = int(plain[0, 8 + 3])  # row 0 stops at its 4th token, the others later or at 8 + 10
    kw["eos_token_id"] = int(plain[2, 8 + 6]) if eos else None

    def make():
        return dict(stopping_criteria=[StopAtToken(token, 8 + 10)])

    expected, actual, theirs, ours = both(hf, eng, ids, make, **kw)
    assert torch.equal(actual, expected)
    assert expected.shape[1] < 8 + 14  # the criterion ended the call
    assert_same_calls(theirs["stopping_criteria"][0].seen, ours["stopping_criteria"][0].seen)
    assert ours["stopping_criteria"][0].scores == theirs["stopping_criteria"][0].scores  # None
    # recording scores: the criterion gets the steps' scores so far, as in transformers
    kw.update(return_dict_in_generate=True, output_scores=True)
    expected, actual, theirs, ours = both(hf, eng, ids, make, **kw)
    assert torch.equal(actual.sequences, expected.sequences)
    assert ours["stopping_criteria"][0].scores == theirs["stopping_criteria"][0].scores
    assert theirs["stopping_criteria"][0].scores[:2] == [1, 2]


def test_num_return_sequences_gives_the_repeated_prompt():
    hf = variant("qwen3")
    eng = lk.Engine.from_hf(hf, max_batch_size=4, max_seq_len=64)
    ids = prompts(2, 6)
    kw = dict(max_new_tokens=6, do_sample=True, num_return_sequences=2, eos_token_id=None)
    ours = Steer()
    out = eng.generate(ids, logits_processor=[ours, OnlyOne()], **kw)
    with torch.no_grad():
        expected = hf.generate(ids, logits_processor=[Steer(), OnlyOne()], **kw)
    assert torch.equal(out, expected)
    assert torch.equal(ours.seen[0], ids.repeat_interleave(2, dim=0))


@pytest.mark.parametrize(
    "sample", [False, pytest.param(True, marks=sorts_draws)], ids=["beams", "beam-sampling"]
)
def test_beam_search_runs_them_as_transformers(sample):
    hf = variant("mistral")
    eng = lk.Engine.from_hf(hf, max_batch_size=9, max_seq_len=64)
    ids, mask = ragged(3, 7)
    kw = dict(attention_mask=mask, max_new_tokens=10, num_beams=3, do_sample=sample)
    kw.update(pad_token_id=0, eos_token_id=None, num_return_sequences=2)
    with torch.no_grad():
        plain = hf.generate(ids, **{**kw, "do_sample": False})
    token = int(plain[0, 7 + 4])

    def make():
        return dict(logits_processor=[Steer()], stopping_criteria=[StopAtToken(token, 99)])

    torch.manual_seed(0)
    theirs = make()
    with torch.no_grad():
        expected = hf.generate(ids, **kw, **theirs)
    torch.manual_seed(0)
    ours = make()
    actual = eng.generate(ids, **kw, **ours)
    assert torch.equal(actual, expected)
    assert_same_calls(theirs["logits_processor"][0].seen, ours["logits_processor"][0].seen)
    assert_same_calls(theirs["stopping_criteria"][0].seen, ours["stopping_criteria"][0].seen)


def assert_same_prefix_calls(theirs: Allowed, ours: Allowed) -> None:
    assert len(ours.calls) == len(theirs.calls)
    for step, ((b1, t1), (b2, t2)) in enumerate(zip(ours.calls, theirs.calls)):
        assert b1 == b2 and torch.equal(t1, t2), f"call {step}: (batch_id, input_ids) differ"


@pytest.mark.parametrize(
    "case",
    [
        "greedy-eos-blocked",  # min_new_tokens masks EOS before the constraint
        "forced-eos",  # forced_eos_token_id overrides the constraint at the last token
        # batch_id of num_return_sequences copies (as the installed transformers has it); one
        # id allowed, so the engine's sampler and transformers' draw the same
        "sampling-copies",
        "beams",
        pytest.param("beam-sampling", marks=sorts_draws),
    ],
)
def test_prefix_allowed_tokens_fn_equals_transformers(case):
    hf = variant("mistral")
    eng = lk.Engine.from_hf(hf, max_batch_size=9, max_seq_len=64)
    ids, mask = ragged(3, 7)
    kw = dict(attention_mask=mask, max_new_tokens=9, pad_token_id=0, do_sample=False)
    eos, allowed = 5, dict()
    if case == "greedy-eos-blocked":
        # row texts reach 7 + 2 tokens at the third new one: only EOS is allowed there, which
        # min_new_tokens=4 masks: transformers then allows it anyway (>= 5.18) or gives -inf
        kw.update(eos_token_id=eos, min_new_tokens=4)
        allowed = dict(eos=eos, eos_only_at=7 + 2)
    elif case == "forced-eos":
        kw.update(eos_token_id=None, forced_eos_token_id=eos)
    elif case == "sampling-copies":
        kw.update(do_sample=True, num_return_sequences=2, eos_token_id=None)
        allowed = dict(width=1)
    else:
        kw.update(num_beams=3, num_return_sequences=2, eos_token_id=eos, do_sample=case != "beams")
        allowed = dict(eos=eos)
    theirs, ours = Allowed(**allowed), Allowed(**allowed)
    torch.manual_seed(0)
    with torch.no_grad():
        expected = hf.generate(ids, prefix_allowed_tokens_fn=theirs, **kw)
    torch.manual_seed(0)
    actual = eng.generate(ids, prefix_allowed_tokens_fn=ours, **kw)
    assert torch.equal(actual, expected)
    assert_same_prefix_calls(theirs, ours)
    if case == "forced-eos":
        assert (expected[:, -1] == eos).all()  # not one of the allowed ids
    if case == "greedy-eos-blocked" and Version(transformers.__version__) >= Version("5.18"):
        # 5.18 gives the constraint's ids back when it left none: every row ends at that step
        assert expected.shape[1] < 7 + 9
    with torch.no_grad():
        assert not torch.equal(expected, hf.generate(ids, **kw))  # the constraint mattered


def test_prefix_allowed_tokens_fn_runs_before_the_callers_processors():
    hf = variant("qwen3")
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=64)
    ids = prompts(2, 6)
    kw = dict(max_new_tokens=8, do_sample=False, eos_token_id=None)
    theirs, ours = Steer(), Steer()
    with torch.no_grad():
        expected = hf.generate(
            ids, prefix_allowed_tokens_fn=Allowed(), logits_processor=[theirs], **kw
        )
    actual = eng.generate(ids, prefix_allowed_tokens_fn=Allowed(), logits_processor=[ours], **kw)
    assert torch.equal(actual, expected)
    assert_same_calls(theirs.seen, ours.seen)


def test_refused():
    hf = variant("mistral")
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=64)
    ids = prompts(1, 6)
    with pytest.raises(ValueError, match="with speculative decoding .* one row"):
        eng.generate(prompts(2, 6), logits_processor=[Steer()], prompt_lookup_num_tokens=3)
    with pytest.raises(TypeError, match="logits_processor must be a LogitsProcessorList"):
        eng.generate(ids, logits_processor=[1])
    with pytest.raises(TypeError, match="stopping_criteria must be a StoppingCriteriaList"):
        eng.generate(ids, stopping_criteria="eos")
    # twins of what the settings build: transformers would use the caller's in their place
    with pytest.raises(
        ValueError, match=r"RepetitionPenaltyLogitsProcessor .*\(repetition_penalty\)"
    ):
        eng.generate(
            ids, logits_processor=[RepetitionPenaltyLogitsProcessor(1.3)], repetition_penalty=1.2
        )
    with pytest.raises(ValueError, match=r"MaxLengthCriteria .*\(max_new_tokens / max_length\)"):
        eng.generate(ids, stopping_criteria=[MaxLengthCriteria(10)])
    with pytest.raises(ValueError, match=r"EosTokenCriteria .*\(eos_token_id\)"):
        eng.generate(ids, num_beams=2, stopping_criteria=[EosTokenCriteria(5)])
    with pytest.raises(ValueError, match="with speculative decoding .* one row"):
        eng.generate(
            ids,
            prefix_allowed_tokens_fn=Allowed(),
            prompt_lookup_num_tokens=3,
            num_beams=1,
            do_sample=True,
            num_return_sequences=2,
        )
    with pytest.raises(TypeError, match="prefix_allowed_tokens_fn must be a callable"):
        eng.generate(ids, prefix_allowed_tokens_fn=[1, 2])
    twin = PrefixConstrainedLogitsProcessor(Allowed(), 1)
    with pytest.raises(
        ValueError, match=r"PrefixConstrainedLogitsProcessor .*\(prefix_allowed_tokens_fn\)"
    ):
        eng.generate(ids, prefix_allowed_tokens_fn=Allowed(), logits_processor=[twin])
    with pytest.raises(ValueError, match="returned an empty list"):  # transformers' own error
        eng.generate(ids, prefix_allowed_tokens_fn=lambda batch_id, input_ids: [])
    nan = lambda input_ids, scores: scores * float("nan")  # noqa: E731
    with pytest.raises(ValueError, match="NaN"):
        eng.generate(ids, logits_processor=[nan], max_new_tokens=3)
    # a plain callable works, and an empty list is none
    out = eng.generate(ids, logits_processor=[lambda i, s: s], max_new_tokens=3, eos_token_id=None)
    assert torch.equal(
        out, eng.generate(ids, logits_processor=[], max_new_tokens=3, eos_token_id=None)
    )


@pytest.mark.model
def test_chat_runs_them_on_the_whole_conversation(smollm2_dir):
    """chat(): the processor sees the whole conversation as input_ids (HF's, from the chat
    template), also on a follow-up turn that prefills only its new tokens; the reply is what
    generate gives on those ids."""
    eng = lk.Engine.from_pretrained(smollm2_dir)
    messages = [{"role": "user", "content": "Name a colour."}]
    kw = dict(max_new_tokens=8, do_sample=False)
    spy = Steer()
    reply = eng.chat(messages, logits_processor=[spy], **kw)
    ids = torch.tensor([eng.chat_ids(messages)])
    assert torch.equal(spy.seen[0], ids)
    follow = messages + [{"role": "assistant", "content": reply}]
    follow.append({"role": "user", "content": "Another."})
    spy = Steer()
    eng.chat(follow, logits_processor=[spy], **kw)
    assert eng.last_prefill_len < len(eng.chat_ids(follow))
    assert torch.equal(spy.seen[0], torch.tensor([eng.chat_ids(follow)]))
    expected = eng.generate(ids, logits_processor=[Steer()], **kw)[0, ids.shape[1] :]
    eos = lk.settings.eos_id_list(eng.generation_config.eos_token_id)
    text = eng.tokenizer.decode(until_eos(expected.tolist(), eos), skip_special_tokens=True)
    assert reply == text


@pytest.mark.model
def test_chat_takes_prefix_allowed_tokens_fn(smollm2_dir):
    """A constrained reply: only the allowed ids (and EOS), given the whole conversation."""
    eng = lk.Engine.from_pretrained(smollm2_dir)
    messages = [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]
    words = eng.tokenizer(" yes no Yes No", add_special_tokens=False).input_ids
    eos = lk.settings.eos_id_list(eng.generation_config.eos_token_id)
    lengths = []

    def allowed(batch_id, input_ids):
        lengths.append(input_ids.shape[0])
        return words + eos

    kw = dict(max_new_tokens=6, do_sample=False, prefix_allowed_tokens_fn=allowed)
    reply = eng.chat(messages, **kw)
    ids = torch.tensor([eng.chat_ids(messages)])
    assert lengths[0] == ids.shape[1]
    out = eng.generate(ids, **kw)[0, ids.shape[1] :].tolist()
    new = until_eos(out, eos)
    assert new and set(new) <= set(words)
    assert reply == eng.tokenizer.decode(new, skip_special_tokens=True)


# ---- with speculative decoding (one row) ----------------------------------------------------------
def follows(last: int) -> list[int]:
    """The ids a strict grammar allows after ``last``: 120 of the 320."""
    return [(last * 5 + 7 * k) % VOCAB for k in range(120)]


class Grammar:
    """A ``prefix_allowed_tokens_fn`` that, like a real grammar, has no continuation for a text
    it rules out: it fails if given one (a rejected guess must not reach it)."""

    def __init__(self, prompt_len: int):
        self.prompt_len = prompt_len

    def __call__(self, batch_id: int, input_ids: torch.Tensor) -> list[int]:
        text = input_ids.tolist()
        for p in range(self.prompt_len, len(text)):
            assert text[p] in follows(text[p - 1]), f"given a text it rules out (at {p})"
        return follows(text[-1])


def speculation(how: str, hf) -> dict:
    """prompt lookup, or the target as its own draft (guesses it would make unconstrained)."""
    if how == "lookup":
        return dict(prompt_lookup_num_tokens=6)
    return dict(assistant_model=lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=160))


@pytest.mark.parametrize("how", ["lookup", "draft"])
def test_speculative_with_a_prefix_constraint_equals_plain_decoding(how):
    """Greedy: the tokens of plain decoding with the constraint (transformers' too); guesses the
    constraint rules out are rejected without the positions after them reaching it."""
    hf = variant("qwen3")
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=160)
    ids = repetitive_prompts(1)
    kw = dict(max_new_tokens=40, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        expected = hf.generate(ids, prefix_allowed_tokens_fn=Grammar(ids.shape[1]), **kw)
    assert torch.equal(
        eng.generate(ids, prefix_allowed_tokens_fn=Grammar(ids.shape[1]), **kw), expected
    )
    grammar = Grammar(ids.shape[1])
    actual = eng.generate(ids, prefix_allowed_tokens_fn=grammar, **kw, **speculation(how, hf))
    assert torch.equal(actual, expected)
    accepted, proposed = eng.last_acceptance
    assert 0 < accepted < proposed  # guesses kept, and guesses ruled out


def test_speculative_sampling_draws_what_the_constraint_leaves():
    hf = variant("mistral")
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=160)
    ids = repetitive_prompts(1)
    kw = dict(max_new_tokens=24, do_sample=True, eos_token_id=None)
    one = lambda: Allowed(width=1)  # noqa: E731
    expected = eng.generate(ids, prefix_allowed_tokens_fn=one(), **kw)
    actual = eng.generate(ids, prefix_allowed_tokens_fn=one(), prompt_lookup_num_tokens=5, **kw)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("how", ["lookup", "draft"])
def test_speculative_with_processors_and_criteria_equals_plain_decoding(how):
    """The processor sees each position's text, the criterion each kept token (and the scores
    recorded so far), as in plain decoding: transformers' output and criterion calls."""
    hf = variant("qwen3")
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=160)
    ids = repetitive_prompts(1)
    kw = dict(max_new_tokens=30, do_sample=False, eos_token_id=None)
    kw.update(return_dict_in_generate=True, output_scores=True)

    def make():  # the text repeats itself from its 7th token: the criterion ends it at 21
        stop = StopAtToken(-1, ids.shape[1] + 21)
        return dict(logits_processor=[Steer()], stopping_criteria=[stop])

    expected, _, theirs, _ = both(hf, eng, ids, make, **kw)
    ours = make()
    actual = eng.generate(ids, **kw, **ours, **speculation(how, hf))
    assert torch.equal(actual.sequences, expected.sequences)
    assert actual.sequences.shape[1] < ids.shape[1] + 30  # the criterion ended the call
    assert eng.last_acceptance[0] > 0
    assert_same_calls(theirs["stopping_criteria"][0].seen, ours["stopping_criteria"][0].seen)
    assert ours["stopping_criteria"][0].scores == theirs["stopping_criteria"][0].scores
    # the processor was given every text plain decoding gave it (and the rejected guesses')
    given = {tuple(t[0].tolist()) for t in ours["logits_processor"][0].seen}
    assert all(tuple(t[0].tolist()) in given for t in theirs["logits_processor"][0].seen)


def test_beam_search_hands_the_callbacks_tensors_on_the_models_device():
    """beam._on_device, whose books are on the CPU (a GPU engine: tests/test_engine_cuda.py):
    input_ids and scores (a tensor, a tuple of them, or None) go to the device; a CPU engine
    calls the callable itself."""
    from llmkernels.beam import _on_device

    given = []

    def fn(input_ids, scores):
        kinds = scores if scores is None or isinstance(scores, tuple) else (scores,)
        given.append((input_ids.device.type, [s.device.type for s in kinds or ()]))
        return torch.ones(2, dtype=torch.bool)

    assert _on_device(fn, torch.device("cpu")) is fn
    on_meta = _on_device(fn, torch.device("meta"))
    ids, scores = torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 5)
    assert on_meta(ids, scores).device.type == "cpu"
    on_meta(ids, (scores, scores))
    on_meta(ids, None)
    assert given == [("meta", ["meta"]), ("meta", ["meta", "meta"]), ("meta", [])]
