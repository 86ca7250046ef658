"""stop_strings and max_time in the engine against transformers' generate (its StopStringCriteria
and MaxTimeCriteria), on the real SmolLM2 (CPU fp32): plain, batched, sampled, speculative and
chat calls stop where transformers stops."""

from __future__ import annotations

import time

import pytest
import torch

import llmkernels as lk
from llmkernels.stopping import Stops


@pytest.fixture(scope="module")
def models(smollm2_dir):
    from transformers import AutoModelForCausalLM

    eng = lk.Engine.from_pretrained(smollm2_dir, device="cpu", max_batch_size=3, max_seq_len=256)
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    return eng, hf


def batch(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


PROMPTS = ["List three fruits:\n1.", "Count to ten: one, two,", "The days of the week are Monday,"]


def test_greedy_batch_stops_where_transformers_stops(models):
    eng, hf = models
    tok = eng.tokenizer
    ids, mask = batch(tok, PROMPTS)
    kw = dict(
        attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=tok.pad_token_id
    )
    free = eng.generate(ids, **kw)
    texts = [tok.decode(row[ids.shape[1] :]) for row in free]
    # "3." is a token of row 0's list; "five" and "Wed" end inside tokens of rows 1 and 2
    stop_strings = ["3.", "five", "Wed"]
    assert all(any(s in t for s in stop_strings) for t in texts), texts
    with torch.no_grad():
        expected = hf.generate(ids, stop_strings=stop_strings, tokenizer=tok, **kw)
    out = eng.generate(ids, stop_strings=stop_strings, **kw)
    assert torch.equal(out, expected)
    assert out.shape[1] < free.shape[1]  # generation ended when the last row stopped
    for row in out[:, ids.shape[1] :].tolist():
        new = [t for t in row if t != tok.pad_token_id]  # the string overlaps the last token
        assert any(st in tok.decode(new) for st in stop_strings)
        assert not any(st in tok.decode(new[:-1]) for st in stop_strings)


def test_without_eos_stopped_rows_go_on_as_in_transformers(models):
    """transformers pads finished rows only when EOS is watched; otherwise a row that hit a stop
    string keeps decoding until every row has stopped (one stop string per row here)."""
    eng, hf = models
    tok = eng.tokenizer
    ids, mask = batch(tok, PROMPTS[:2])
    kw = dict(attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=None)
    kw["pad_token_id"] = tok.pad_token_id
    with torch.no_grad():
        expected = hf.generate(ids, stop_strings=["2.", "ten"], tokenizer=tok, **kw)
    out = eng.generate(ids, stop_strings=["2.", "ten"], **kw)
    assert torch.equal(out, expected)
    assert "2. Apple" in tok.decode(out[0, ids.shape[1] :])  # row 0 went on past its "2."


def test_sampled_speculative_and_chat_calls_stop_too(models):
    eng, hf = models
    tok = eng.tokenizer
    ids = tok("List three fruits:\n1.", return_tensors="pt").input_ids
    kw = dict(max_new_tokens=30, do_sample=False, stop_strings="3.")
    plain = eng.generate(ids, **kw)
    with torch.no_grad():
        assert torch.equal(plain, hf.generate(ids, tokenizer=tok, **kw))
    assert torch.equal(eng.generate(ids, prompt_lookup_num_tokens=6, **kw), plain)
    sampled = dict(kw, do_sample=True, top_k=1, tokenizer=tok)
    assert torch.equal(eng.generate(ids, seed=0, **sampled), plain)
    # chat: the reply ends with the stop string; a follow-up turn stops as a recompute does
    session = eng.chat_session(max_new_tokens=40, do_sample=False, stop_strings=["3."])
    reply = session.send("List three fruits, numbered.")
    assert reply.endswith("3.")
    chat_ids = torch.tensor([eng.chat_ids(session.messages[:1])])
    with torch.no_grad():
        expected = hf.generate(
            chat_ids, max_new_tokens=40, do_sample=False, stop_strings=["3."], tokenizer=tok
        )
    assert reply == tok.decode(expected[0, chat_ids.shape[1] :], skip_special_tokens=True)


def test_max_time_ends_every_row(models):
    eng, _ = models
    ids = eng.tokenizer(PROMPTS[:1], return_tensors="pt").input_ids
    kw = dict(max_new_tokens=200, do_sample=False, eos_token_id=None, max_time=0.3)
    start = time.monotonic()
    out = eng.generate(ids, **kw)
    assert time.monotonic() - start < 3.0
    assert ids.shape[1] < out.shape[1] < ids.shape[1] + 200  # the steps in time were kept
    assert eng.generate(ids, prompt_lookup_num_tokens=4, **kw).shape[1] < ids.shape[1] + 200


def test_stop_settings_are_checked_by_name(models):
    eng, _ = models
    ids = eng.tokenizer(PROMPTS[:1], return_tensors="pt").input_ids
    for bad in ("", ["x", ""], [3], 5):
        with pytest.raises(ValueError, match="stop_strings must be a non-empty string"):
            eng.generate(ids, max_new_tokens=2, stop_strings=bad)
    for bad in (0, -1.0, "1", True):
        with pytest.raises(ValueError, match="max_time must be a number of seconds > 0"):
            eng.generate(ids, max_new_tokens=2, max_time=bad)
    with pytest.raises(ValueError, match="stop_strings need the model's tokenizer"):
        Stops(("x",), None, None, [[1, 2]])
