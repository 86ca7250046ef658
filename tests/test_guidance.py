"""Classifier-free guidance (``guidance_scale``, ``negative_prompt_ids``) against transformers'
generate, whose UnbatchedClassifierFreeGuidanceLogitsProcessor runs the model a second time on
the unconditional text: the engine runs that text as a twin cache row in the same decode step
(llmkernels.guidance). CPU fp32 random models of the families, the embedded SmolLM2 in chat."""

from __future__ import annotations

import pytest
import torch
from test_families import prompts, variant

import llmkernels as lk
from llmkernels.chat import until_eos
from llmkernels.guidance import guided_scores


def ragged(batch: int, length: int, seed: int = 0):
    ids = prompts(batch, length, seed=seed)
    mask = torch.ones_like(ids, dtype=torch.bool)
    ids[-1, :3], mask[-1, :3] = 0, False
    return ids, mask


@pytest.mark.parametrize("name", ["qwen2", "mistral-window"])
@pytest.mark.parametrize("scale", [1.5, 3.0, 0.5])
def test_greedy_guidance_equals_transformers(name, scale):
    """The default unconditional text (each row's last prompt token) on a ragged batch: the
    same tokens as transformers, and not plain greedy decoding's."""
    hf = variant(name)
    eng = lk.Engine.from_hf(hf, max_batch_size=4, max_seq_len=96)
    ids, mask = ragged(2, 10)
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = hf.generate(ids, guidance_scale=scale, **kw)
    out = eng.generate(ids, guidance_scale=scale, **kw)
    assert torch.equal(out, expected)
    assert not torch.equal(out, eng.generate(ids, **kw))


def test_negative_prompt_and_processors_as_transformers():
    """A left-padded negative prompt per row, with an EOS id, a sequence bias and suppressed
    tokens (which transformers applies after the guidance): the same tokens, and each step's
    scores and raw logits close to transformers' (two forwards of the same weights round alike
    to ~1e-5)."""
    hf = variant("qwen3")
    eng = lk.Engine.from_hf(hf, max_batch_size=4, max_seq_len=96)
    ids, mask = ragged(2, 10)
    negative, negative_mask = ragged(2, 6, seed=9)
    free = eng.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    kw.update(guidance_scale=2.0, negative_prompt_ids=negative)
    kw.update(sequence_bias={(7,): -3.0, (11,): 2.5}, suppress_tokens=[5])
    kw.update(negative_prompt_attention_mask=negative_mask, eos_token_id=int(free[0, 14]))
    kw.update(return_dict_in_generate=True, output_scores=True, output_logits=True)
    with torch.no_grad():
        expected = hf.generate(ids, **kw)
    out = eng.generate(ids, **kw)
    assert torch.equal(out.sequences, expected.sequences)
    default = eng.generate(ids, **{**kw, "negative_prompt_ids": None})
    assert not torch.equal(default.sequences, out.sequences)  # the negative prompt counts
    for step in range(2):  # before row 0 ends (a finished row's scores differ, see README)
        torch.testing.assert_close(out.logits[step], expected.logits[step], atol=1e-4, rtol=0)
        finite = torch.isfinite(expected.scores[step])
        assert torch.equal(torch.isfinite(out.scores[step]), finite)
        torch.testing.assert_close(
            out.scores[step][finite], expected.scores[step][finite], atol=1e-4, rtol=0
        )


def test_guided_scores_equal_transformers_processor():
    """The formula on crafted logits, bit for bit: transformers' processor with a stand-in model
    that returns the twin's logits (in bf16 too: it log-softmaxes those in their dtype)."""
    from transformers.generation.logits_process import (
        UnbatchedClassifierFreeGuidanceLogitsProcessor,
    )
    from transformers.modeling_outputs import CausalLMOutput

    class Twin(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, input_ids, **kwargs):
            return CausalLMOutput(logits=self.logits[:, None])

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        cond = (torch.randn(3, 50, generator=gen) * 3).to(dtype)
        uncond = (torch.randn(3, 50, generator=gen) * 3).to(dtype)
        processor = UnbatchedClassifierFreeGuidanceLogitsProcessor(1.7, Twin(uncond))
        expected = processor(torch.zeros(3, 4, dtype=torch.long), cond.float())
        actual = guided_scores(torch.cat([cond, uncond]), torch.tensor([1.7]))
        assert actual.dtype == torch.float32 and torch.equal(actual, expected), dtype


def test_sampled_guidance_is_reproducible_and_top_k_one_is_greedy():
    eng = lk.Engine.from_hf(variant("qwen3"), max_batch_size=8, max_seq_len=64)
    ids, mask = ragged(2, 8)
    kw = dict(attention_mask=mask, max_new_tokens=12, guidance_scale=2.5, pad_token_id=0)
    greedy = eng.generate(ids, do_sample=False, **kw)
    sampled = dict(kw, do_sample=True, temperature=1.2)
    a = eng.generate(ids, seed=3, **sampled)
    assert torch.equal(a, eng.generate(ids, seed=3, **sampled))
    assert not torch.equal(a, eng.generate(ids, seed=4, **sampled))
    assert torch.equal(eng.generate(ids, seed=3, top_k=1, **sampled), greedy)
    copies = eng.generate(ids, seed=3, top_k=1, num_return_sequences=2, **sampled)
    assert torch.equal(copies, greedy.repeat_interleave(2, dim=0))  # each copy has its twin


@pytest.mark.model
def test_chat_with_guidance_equals_transformers_on_the_conversation(smollm2_dir):
    """chat on SmolLM2: the twin of a conversation is its last token, as in transformers'
    generate on the chat template's ids; a second turn reuses the cached turns."""
    from transformers import AutoModelForCausalLM

    eng = lk.Engine.from_pretrained(smollm2_dir, device="cpu", max_batch_size=2, max_seq_len=256)
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    tok = eng.tokenizer
    kw = dict(max_new_tokens=12, do_sample=False, guidance_scale=3.0)
    messages = [{"role": "user", "content": "Name a colour of the sky."}]
    for turn in range(2):
        ids = torch.tensor([eng.chat_ids(messages)])
        with torch.no_grad():
            expected = hf.generate(ids, pad_token_id=tok.pad_token_id, **kw)[0, ids.shape[1] :]
        eos = lk.settings.eos_id_list(eng.generation_config.eos_token_id)
        text = tok.decode(until_eos(expected.tolist(), eos), skip_special_tokens=True)
        reply = eng.chat(messages, **kw)
        assert reply == text, (turn, reply, text)
        assert reply != eng.chat(messages, max_new_tokens=12, do_sample=False)  # it acts
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Why?"}]
    eng.chat(messages[:-2], **kw)
    eng.chat(messages, **kw)
    assert eng.last_prefill_len < ids.shape[1]  # the earlier turns came from the cache


def test_guidance_errors_name_the_reason():
    eng = lk.Engine.from_hf(variant("qwen2"), max_batch_size=2, max_seq_len=64)
    ids = prompts(2, 6)
    with pytest.raises(ValueError, match="unconditional twin.*max_batch_size=2"):
        eng.generate(ids, max_new_tokens=3, guidance_scale=1.5)
    one = ids[:1]
    with pytest.raises(ValueError, match="guidance_scale with speculative decoding"):
        eng.generate(one, max_new_tokens=3, guidance_scale=1.5, prompt_lookup_num_tokens=2)
    with pytest.raises(ValueError, match="beam search does not support guidance_scale"):
        eng.generate(one, max_new_tokens=3, guidance_scale=1.5, num_beams=2)
    with pytest.raises(ValueError, match="a row per prompt row"):
        eng.generate(one, max_new_tokens=3, guidance_scale=1.5, negative_prompt_ids=ids)
    for bad in ("2", float("inf"), True):
        with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
            eng.generate(one, max_new_tokens=3, guidance_scale=bad)
    # guidance_scale 1 is off, as in transformers: negative prompts are then unused
    plain = eng.generate(one, max_new_tokens=4)
    assert torch.equal(eng.generate(one, max_new_tokens=4, guidance_scale=1.0), plain)
    assert torch.equal(eng.generate(one, max_new_tokens=4, negative_prompt_ids=ids[1:]), plain)
