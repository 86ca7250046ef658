"""num_return_sequences in the engine against transformers' generate (each prompt row repeated,
the copies next to each other; sampling only), CPU fp32 random models."""

from __future__ import annotations

import pytest
import torch
from test_families import prompts, variant

import llmkernels as lk


def ragged(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts: row b has b * 3 pad tokens (id 0)."""
    ids = prompts(batch, length)
    mask = torch.ones_like(ids, dtype=torch.bool)
    for b in range(batch):
        ids[b, : 3 * b] = 0
        mask[b, : 3 * b] = False
    return ids, mask


@pytest.mark.parametrize("name", ["qwen2", "mistral-window"])
def test_copies_match_transformers_at_top_k_1(name):
    """Sampling with top_k=1 is deterministic in both libraries, so the expanded batch (order,
    padding, per-copy decoding, recorded scores) must equal transformers' token for token."""
    hf = variant(name)
    eng = lk.Engine.from_hf(hf, max_batch_size=6, max_seq_len=96)
    ids, mask = ragged(2, 10)
    kw = dict(
        attention_mask=mask,
        max_new_tokens=12,
        do_sample=True,
        top_k=1,
        num_return_sequences=3,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
    )
    with torch.no_grad():
        expected = hf.generate(ids, **kw)
    out = eng.generate(ids, seed=7, **kw)
    assert out.sequences.shape == (6, 22)
    assert torch.equal(out.sequences, expected.sequences)
    assert torch.equal(out.sequences[:3, :10], ids[[0, 0, 0]])  # copies of row 0 come first
    for step in range(12):
        assert out.scores[step].shape == (6, 320)
        assert torch.equal(torch.isinf(out.scores[step]), torch.isinf(expected.scores[step]))


def test_copies_draw_their_own_tokens():
    hf = variant("qwen3")
    eng = lk.Engine.from_hf(hf, max_batch_size=64, max_seq_len=64)
    ids = prompts(1, 8)
    kw = dict(max_new_tokens=16, do_sample=True, temperature=1.0, top_k=0, seed=3)
    out = eng.generate(ids, num_return_sequences=4, **kw)
    assert out.shape == (4, 24) and torch.equal(out[:, :8], ids.expand(4, 8))
    assert len({tuple(row) for row in out[:, 8:].tolist()}) == 4  # near-uniform over 320 ids
    # the same as asking for the repeated rows explicitly, with the same seed
    assert torch.equal(out, eng.generate(ids.repeat(4, 1), **kw))
    # 64 first tokens from one prompt: independent draws from the model's distribution
    first = eng.generate(ids, num_return_sequences=64, **dict(kw, max_new_tokens=1))[:, 8]
    probs = eng.logits(ids)[0, -1].softmax(-1)
    assert len(set(first.tolist())) > 20
    assert probs[first].min() > 0


def test_speculative_copies_equal_plain():
    hf = variant("mistral")
    eng = lk.Engine.from_hf(hf, max_batch_size=4, max_seq_len=128)
    base = prompts(2, 10, seed=5)
    ids = torch.cat([base, base, base[:, :4]], dim=1)  # grounded: guesses get kept
    kw = dict(max_new_tokens=24, do_sample=True, top_k=1, num_return_sequences=2, seed=1)
    plain = eng.generate(ids, **kw)
    assert plain.shape == (4, 48)
    assert torch.equal(eng.generate(ids, prompt_lookup_num_tokens=6, **kw), plain)


def test_bad_num_return_sequences_raise():
    hf = variant("qwen2")
    eng = lk.Engine.from_hf(hf, max_batch_size=4, max_seq_len=64)
    ids = prompts(2, 6)
    # greedy: transformers raises too
    with pytest.raises(ValueError, match="num_return_sequences"), torch.no_grad():
        hf.generate(ids, max_new_tokens=2, do_sample=False, num_return_sequences=2)
    with pytest.raises(ValueError, match="num_return_sequences=2 needs do_sample=True"):
        eng.generate(ids, max_new_tokens=2, do_sample=False, num_return_sequences=2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_return_sequences must be an int >= 1"):
            eng.generate(ids, max_new_tokens=2, do_sample=True, num_return_sequences=bad)
    with pytest.raises(ValueError, match=r"2 prompt rows x num_return_sequences=3 = 6 rows"):
        eng.generate(ids, max_new_tokens=2, do_sample=True, num_return_sequences=3)
    assert eng.generate(ids, max_new_tokens=2, do_sample=True, num_return_sequences=2).shape == (
        4,
        8,
    )
