"""Beam search (llmkernels.beam) against transformers' own ``generate(num_beams=n)``: random models
of the families, ragged batches, EOS ids that end hypotheses early, length penalties, every
``early_stopping`` mode, ``num_return_sequences``; the real SmolLM2 on chat prompts; and the
settings it refuses. CPU, fp32."""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version
from test_families import prompts, variant

import llmkernels as lk


def ragged(batch: int, length: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts: row b has 2 b pad tokens (id 0)."""
    ids = prompts(batch, length, seed=seed)
    mask = torch.ones_like(ids, dtype=torch.bool)
    for b in range(batch):
        ids[b, : 2 * b] = 0
        mask[b, : 2 * b] = False
    return ids, mask


def frequent_token(hf, ids, mask, beams: int) -> int:
    """A token beam search emits early: as EOS it ends some hypotheses and not others."""
    with torch.no_grad():
        out = hf.generate(
            ids, attention_mask=mask, max_new_tokens=6, num_beams=beams, do_sample=False
        )
    new = out[:, ids.shape[1] :]
    return int(torch.mode(new[:, 2:].flatten()).values)


SETTINGS = [
    dict(num_beams=4),
    dict(num_beams=4, length_penalty=2.0, num_return_sequences=2),
    dict(num_beams=3, early_stopping=True, num_return_sequences=3),
    dict(num_beams=3, early_stopping="never", length_penalty=0.0),
    dict(num_beams=5, early_stopping="never", length_penalty=1.5, num_return_sequences=5),
    dict(num_beams=2, length_penalty=-1.0),
]


@pytest.mark.parametrize("name", ["mistral", "qwen3", "mistral-window"])
@pytest.mark.parametrize(
    "settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items())
)
def test_equals_transformers_with_eos(name, settings):
    hf = variant(name)
    eng = lk.Engine.from_hf(hf, max_batch_size=15, max_seq_len=64)
    ids, mask = ragged(3, 9)
    eos = frequent_token(hf, ids, mask, settings["num_beams"])
    kw = dict(attention_mask=mask, max_new_tokens=14, do_sample=False, **settings)
    kw.update(eos_token_id=[eos, 3], pad_token_id=0)
    with torch.no_grad():
        expected = hf.generate(ids, **kw)
    out = eng.generate(ids, **kw)
    assert torch.equal(out, expected)
    # the test means something: an EOS id ended hypotheses, which shows in the output or in
    # the beams that ran on (a length penalty > 0 may prefer the longer, unfinished ones)
    without = eng.generate(ids, **{**kw, "eos_token_id": None})
    ended = (out[:, ids.shape[1] :] == eos).any()
    assert ended or without.shape != out.shape or not torch.equal(without, out)


PROCESSORS = [  # "T0", "T1", "T2": tokens the search without processors emits (see below)
    dict(no_repeat_ngram_size=2, early_stopping=True),  # the "how to generate" tutorial's
    dict(repetition_penalty=1.3, length_penalty=0.5),  # ragged: the padding as transformers has it
    dict(min_new_tokens=6, num_return_sequences=2),
    dict(sequence_bias=[[["T0"], -3.0], [["T1", "T2"], 2.0]], bad_words_ids=[["T2"]]),
    dict(suppress_tokens=["T1"], begin_suppress_tokens=["T0"], forced_eos_token_id="T2"),
    dict(renormalize_logits=True, remove_invalid_values=True, min_length=15),
    dict(exponential_decay_length_penalty=(2, 1.6)),
]


def with_tokens(value, tokens: dict):
    """value with every "T<i>" replaced by its token id."""
    if isinstance(value, str) and value in tokens:
        return tokens[value]
    if isinstance(value, list):
        return [with_tokens(v, tokens) for v in value]
    return value


@pytest.mark.parametrize("settings", PROCESSORS, ids=lambda s: "-".join(s))
def test_logits_processors_equal_transformers(settings):
    hf = variant("qwen2")
    eng = lk.Engine.from_hf(hf, max_batch_size=12, max_seq_len=64)
    ids, mask = ragged(3, 9, seed=4)
    eos = frequent_token(hf, ids, mask, 4)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=4)
    kw.update(eos_token_id=[eos], pad_token_id=0)
    plain = eng.generate(ids, **kw, num_return_sequences=settings.get("num_return_sequences", 1))
    new = plain[:, ids.shape[1] :]
    tokens = {"T0": int(new[0, 0]), "T1": int(new[1, 2]), "T2": int(new[2, 1])}
    kw.update({k: with_tokens(v, tokens) for k, v in settings.items()})
    with torch.no_grad():
        expected = hf.generate(ids, **kw)
    out = eng.generate(ids, **kw)
    assert torch.equal(out, expected)
    # the processors change the search (else this test would not test them)
    assert out.shape != plain.shape or not torch.equal(out, plain)


def test_equals_transformers_without_eos_and_in_a_batch_of_one():
    hf = variant("qwen2")
    eng = lk.Engine.from_hf(hf, max_batch_size=4, max_seq_len=64)
    ids = prompts(1, 6, seed=5)
    kw = dict(max_new_tokens=20, do_sample=False, num_beams=4, eos_token_id=None)
    with torch.no_grad():
        expected = hf.generate(ids, **kw)
    assert torch.equal(eng.generate(ids, **kw), expected)
    # and then plain greedy decoding still works on the same engine (cache rows were reordered)
    plain = dict(max_new_tokens=10, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        assert torch.equal(eng.generate(ids, **plain), hf.generate(ids, **plain))


def test_return_dict_equals_transformers():
    """return_dict_in_generate: HF's GenerateBeamDecoderOnlyOutput, with the same sequences and
    beam indices, and scores / logits / sequence scores within fp32 rounding of transformers'
    (the engine's logits are not bit-identical to HF's: fused projections)."""
    hf = variant("mistral")
    eng = lk.Engine.from_hf(hf, max_batch_size=9, max_seq_len=64)
    ids, mask = ragged(3, 8, seed=2)
    eos = frequent_token(hf, ids, mask, 3)
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, num_beams=3)
    kw.update(eos_token_id=eos, pad_token_id=0, num_return_sequences=2, length_penalty=-1.0)
    kw.update(return_dict_in_generate=True, output_scores=True, output_logits=True)
    with torch.no_grad():
        expected = hf.generate(ids, **kw)
    out = eng.generate(ids, **kw)
    assert type(out) is type(expected)
    assert torch.equal(out.sequences, expected.sequences)
    assert torch.equal(out.beam_indices, expected.beam_indices)
    assert (out.beam_indices == -1).any()  # hypotheses of different lengths
    torch.testing.assert_close(out.sequences_scores, expected.sequences_scores)
    assert len(out.scores) == len(expected.scores) and len(out.logits) == len(expected.logits)
    for ours, theirs in zip(out.scores + out.logits, expected.scores + expected.logits):
        finite = torch.isfinite(theirs)
        assert torch.equal(torch.isfinite(ours), finite)
        torch.testing.assert_close(ours[finite], theirs[finite], rtol=1e-4, atol=1e-4)
    # without output_scores / output_logits: sequences and beam indices only, as HF
    bare = eng.generate(ids, **{**kw, "output_scores": False, "output_logits": False})
    assert bare.scores is None and bare.logits is None and bare.sequences_scores is None
    assert torch.equal(bare.beam_indices, expected.beam_indices)


SAMPLING = [
    dict(num_beams=4, temperature=0.8, top_k=20),
    dict(num_beams=3, top_p=0.9, num_return_sequences=2, length_penalty=0.5),
    dict(num_beams=4, temperature=1.5, min_p=0.05, repetition_penalty=1.2),
    dict(num_beams=2, typical_p=0.9, early_stopping=True),
    dict(num_beams=3, epsilon_cutoff=3e-4, no_repeat_ngram_size=2),
    dict(num_beams=3, eta_cutoff=1e-3, top_k=0),
    dict(num_beams=3, temperature=1.3, top_h=0.7, top_k=0),
    # fewer candidates than K = 2n with a probability: torch.multinomial draws zero-probability
    # ones too, in transformers as in the engine (so peaked that seeds may draw alike)
    dict(num_beams=4, top_k=3),
    dict(num_beams=2, top_p=0.5, temperature=0.2),
]
FEW_CANDIDATES = SAMPLING[-2:]


# Before 5.24 transformers' beam sampling kept its drawn candidates in draw order, so the first
# n drawn, not the n best, could finish; 5.24 sorts them, and the engine does as 5.24 does.
sorts_draws = pytest.mark.skipif(
    Version(transformers.__version__) < Version("5.24.0"),
    reason="transformers < 5.24 ranks beam sampling's drawn candidates in draw order",
)


@sorts_draws
@pytest.mark.parametrize("name", ["mistral", "qwen3"])
@pytest.mark.parametrize(
    "settings", SAMPLING, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items())
)
def test_beam_sampling_equals_transformers(name, settings):
    """Beam sampling draws as transformers' does: after torch.manual_seed(s), or with seed=s,
    the same hypotheses; other seeds draw others (the test can fail), but where the settings
    leave fewer candidates than the draw takes."""
    hf = variant(name)
    eng = lk.Engine.from_hf(hf, max_batch_size=12, max_seq_len=64)
    ids, mask = ragged(3, 9)
    eos = frequent_token(hf, ids, mask, settings["num_beams"])
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=True, **settings)
    kw.update(eos_token_id=[eos, 3], pad_token_id=0)
    outs = {}
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            expected = hf.generate(ids, **kw)
        torch.manual_seed(seed)
        assert torch.equal(eng.generate(ids, **kw), expected), f"seed {seed}, global generator"
        torch.manual_seed(seed + 100)  # the engine's own generator, not the global one
        assert torch.equal(eng.generate(ids, seed=seed, **kw), expected), f"seed={seed}"
        outs[seed] = expected
    if settings not in FEW_CANDIDATES:
        assert not (torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2]))


@sorts_draws
def test_beam_sampling_scores_equal_transformers():
    """output_scores in beam sampling: each step's warped log probabilities, as transformers'."""
    hf = variant("mistral")
    eng = lk.Engine.from_hf(hf, max_batch_size=6, max_seq_len=64)
    ids, mask = ragged(2, 7)
    kw = dict(attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=True, top_k=10)
    kw.update(temperature=0.7, return_dict_in_generate=True, output_scores=True, pad_token_id=0)
    torch.manual_seed(5)
    with torch.no_grad():
        expected = hf.generate(ids, **kw)
    out = eng.generate(ids, seed=5, **kw)
    assert torch.equal(out.sequences, expected.sequences)
    assert torch.equal(out.beam_indices, expected.beam_indices)
    torch.testing.assert_close(out.sequences_scores, expected.sequences_scores)
    for ours, theirs in zip(out.scores, expected.scores, strict=True):
        finite = torch.isfinite(theirs)
        assert torch.equal(torch.isfinite(ours), finite)  # the same tokens warped away
        torch.testing.assert_close(ours[finite], theirs[finite], rtol=1e-4, atol=1e-4)


def test_refused_settings_name_themselves():
    hf = variant("mistral")
    eng = lk.Engine.from_hf(hf, max_batch_size=4, max_seq_len=64)
    ids = prompts(1, 6)
    with pytest.raises(ValueError, match="stop_strings, max_time"):
        eng.generate(ids, num_beams=2, stop_strings=["x"], max_time=3.0, tokenizer=object())
    with pytest.raises(ValueError, match="must be <= num_beams=2"):
        eng.generate(ids, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="early_stopping must be True, False or 'never'"):
        eng.generate(ids, num_beams=2, early_stopping="sometimes")
    with pytest.raises(ValueError, match="num_beams must be an int >= 1"):
        eng.generate(ids, num_beams=0)
    with pytest.raises(ValueError, match="no streamer"):
        eng.generate(ids, num_beams=2, streamer=object())
    with pytest.raises(ValueError, match="max_batch_size=4"):
        eng.generate(prompts(3, 6), num_beams=2)  # 6 cache rows
    with pytest.raises(
        ValueError, match="num_return_sequences=2 needs do_sample=True or num_beams"
    ):
        eng.generate(ids, num_return_sequences=2)


@pytest.mark.model
def test_real_smollm2_chat_prompts_equal_transformers(smollm2_dir):
    from transformers import AutoModelForCausalLM

    eng = lk.Engine.from_pretrained(smollm2_dir, device="cpu", max_batch_size=8, max_seq_len=256)
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    tok = eng.tokenizer
    tok.padding_side = "left"
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        for question in ("What is the capital of France?", "Name a prime number larger than 10.")
    ]
    enc = tok(texts, return_tensors="pt", padding=True)
    kw = dict(
        attention_mask=enc.attention_mask,
        max_new_tokens=24,
        do_sample=False,
        num_beams=4,
        num_return_sequences=2,
        pad_token_id=tok.pad_token_id,
    )
    with torch.no_grad():
        expected = hf.generate(enc.input_ids, **kw)
    out = eng.generate(enc.input_ids, **kw)
    assert torch.equal(out, expected), tok.batch_decode(out[:, enc.input_ids.shape[1] :])


@pytest.mark.model
def test_chat_with_beams_replies_with_the_best_hypothesis(smollm2_dir):
    eng = lk.Engine.from_pretrained(smollm2_dir, device="cpu", max_batch_size=3, max_seq_len=256)
    tok = eng.tokenizer
    messages = [{"role": "user", "content": "Give me a word that rhymes with cat."}]
    kw = dict(max_new_tokens=16, do_sample=False)
    plain_reply = eng.chat(messages, **kw)  # fills the chat cache, which beam search must drop
    reply = eng.chat(messages, num_beams=3, **kw)
    ids = torch.tensor([eng.chat_ids(messages)])
    best = eng.generate(ids, num_beams=3, **kw)[0, ids.shape[1] :].tolist()
    eos = eng.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    best = best[: next((i for i, t in enumerate(best) if t in eos), len(best))]
    assert reply == tok.decode(best, skip_special_tokens=True)
    assert eng.chat(messages, **kw) == plain_reply  # plain chat after beams: cache rebuilt
    with pytest.raises(ValueError, match="no streamer"):
        eng.chat(messages, num_beams=2, streamer=object(), **kw)
