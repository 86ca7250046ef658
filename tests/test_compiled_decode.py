"""The CPU decode step compiled by torch.compile (``Engine(compile_decode=True)``) against the eager
engine and transformers: one whole graph (fullgraph: a graph break fails), dynamic shapes (no
recompilation as the cache grows; three graphs over batch sizes), the same tokens and logits.

Each compilation of a tiny model takes tens of seconds on a 2-core host, so each family's tests
share one engine per module.
"""

from __future__ import annotations

import pytest
import test_families as families
import test_gemma3 as gemma3
import torch

import llmkernels as lk
from llmkernels import ops
from llmkernels.quant import QuantizedWeight

NEW = 12


def _engines(hf_model, max_batch: int = 9, **kwargs):
    """An eager and a compiled engine of ``hf_model`` (kwargs: more ``Engine.from_hf`` ones)."""
    eager = lk.Engine.from_hf(hf_model, max_batch_size=max_batch, max_seq_len=64, **kwargs)
    compiled = lk.Engine.from_hf(
        hf_model, max_batch_size=max_batch, max_seq_len=64, compile_decode=True, **kwargs
    )
    return eager, compiled


# family variants: windowed layers, q/k/v bias, q/k norm, Gemma's (1 + w) norms, post-norms,
# GeGLU, scaled embedding, query scale and per-layer RoPE
MODELS = {
    "qwen3-window": lambda: families.variant("qwen3-window"),
    "qwen2": lambda: families.variant("qwen2"),
    "gemma3-softcap": lambda: gemma3.make_hf(**gemma3.VARIANTS["gemma3-softcap"]),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model_and_engines(request):
    hf_model = MODELS[request.param]()
    eager, compiled = _engines(hf_model)
    return hf_model, eager, compiled


def test_greedy_ragged_batch_equals_eager_engine_and_hf(model_and_engines):
    hf_model, eager, compiled = model_and_engines
    ids = families.prompts(3, 10, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: rows of 6, 10 and 10 tokens
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    expected = eager.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    out = compiled.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert compiled._compiled_decode is not None  # the compiled step ran
    assert torch.equal(out, expected)
    for row in range(3):  # and each row is what transformers gives for it alone
        alone = ids[row : row + 1, mask[row].bool()]
        hf = families.hf_greedy(hf_model, alone, NEW)
        assert torch.equal(out[row, -NEW:], hf[0, -NEW:])


def test_decode_logits_equal_eager_at_every_batch_size(model_and_engines):
    """Logits within fp32 rounding at batch 1, 3, 9 and 2; a growing cache never recompiles (the
    attended length is a dynamic size), nor does batch 2 after 3. Three graphs: dynamo
    specializes batch 1, and the compiled graph is guarded on batch <= 4 by torch's own
    compilation (it stays after linear() stopped testing its row count while compiling)."""
    _, eager, compiled = model_and_engines
    for batch in (1, 3, 9, 2):
        ids = families.prompts(batch, 7, seed=batch)
        tokens = ids[:, -1].contiguous()  # [B], a normal tensor as the engine's token buffer
        with torch.inference_mode():
            for engine in (eager, compiled):
                engine.model.set_cache_lens([0] * batch)
                engine.logits(ids)
            for step in range(4):
                want = eager._decode(tokens)
                may_compile = step == 0 and batch != 2
                with torch._dynamo.config.patch(error_on_recompile=not may_compile):
                    got = compiled._decode(tokens)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
                assert torch.equal(compiled.model.cache_lens, eager.model.cache_lens)
                tokens.copy_(want.argmax(-1))


def test_sampling_with_seed_equals_eager_engine(model_and_engines):
    _, eager, compiled = model_and_engines
    ids = families.prompts(2, 8, seed=5)
    kw = dict(max_new_tokens=NEW, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=7)
    assert torch.equal(compiled.generate(ids, **kw), eager.generate(ids, **kw))


def test_store_decode_kv_is_kv_cache_append():
    """The compiled step's cache write equals the op's for decode's slots: one per row, a full
    row (slot -1) writing nothing."""
    hf_model = families.variant("qwen2")
    model = lk.Engine.from_hf(hf_model, max_batch_size=3, max_seq_len=16).model
    layers, rows, heads, seq, dim = model.k_cache.shape
    model.k_cache.normal_()
    model.v_cache.normal_()
    expected_k, expected_v = model.k_cache.clone(), model.v_cache.clone()
    pos = torch.tensor([5, 15, 0])
    stored = torch.tensor([True, False, True])
    k, v = torch.randn(3, heads, dim), torch.randn(3, heads, dim)
    slots = torch.where(stored, torch.arange(3) * seq + pos, -1)
    ops.kv_cache_append(k, v, expected_k[1], expected_v[1], slots)
    model._store_decode_kv(1, k, v, pos, stored)
    assert torch.equal(model.k_cache, expected_k)
    assert torch.equal(model.v_cache, expected_v)


def test_compile_decode_refused_off_cpu_or_across_ranks():
    hf_model = families.variant("qwen2")
    model = lk.Engine.from_hf(hf_model, max_seq_len=16).model
    model.device = torch.device("meta")  # stands in for CUDA: the check reads only the device
    with pytest.raises(ValueError, match="compile_decode is for a single-process CPU engine"):
        lk.Engine(model, compile_decode=True)


@pytest.mark.parametrize("quantize, quantize_lm_head", [("int8", False), ("int4", True)])
def test_quantized_weights_compile_to_the_eager_tokens(quantize, quantize_lm_head):
    """PyTorch's packed weight-only kernels trace into the compiled step (extern calls), for the
    projections and the LM head (int8 with int4 projections: the fastest CPU mode)."""
    hf_model = families.variant("qwen2", intermediate_size=128)  # int4: in_features % 32 == 0
    eager, compiled = _engines(
        hf_model, max_batch=2, quantize=quantize, quantize_lm_head=quantize_lm_head
    )
    assert isinstance(compiled.model.lm_head, QuantizedWeight) == quantize_lm_head
    ids = families.prompts(2, 8, seed=3)
    expected = eager.generate(ids, max_new_tokens=8, do_sample=False)
    out = compiled.generate(ids, max_new_tokens=8, do_sample=False)
    assert compiled._compiled_decode is not None
    assert torch.equal(out, expected)


def test_state_tensors_cover_everything_the_compiled_step_reads():
    """Engine._decode marks these static before compiling, so dynamo specializes on their
    shapes instead of re-checking symbolic size relations before every step."""
    hf_model = families.variant("qwen3-window", intermediate_size=128)  # q/k norms, windows
    model = lk.Engine.from_hf(
        hf_model, max_seq_len=32, quantize="int4", quantize_lm_head=True
    ).model
    found = {id(t) for t in model.state_tensors()}
    layer = model.layers[0]
    expected = [model.embed, model.norm, model.k_cache, model.v_cache, model.cache_lens]
    expected += [model.row_base, model.cos_sin, model.lm_head.packed, model.lm_head.kernel_scales]
    expected += [layer.wqkv.packed, layer.wqkv.scale_and_zero, layer.q_norm, layer.attn_norm]
    expected += [t._base for t in expected if t._base is not None]
    assert all(id(t) in found for t in expected)
    assert len(found) == len(model.state_tensors())  # each once
