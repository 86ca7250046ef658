"""lk.patch / lk.unpatch on tiny random Hugging Face Llama models, CPU fp32.

The oracle is always an unpatched deepcopy of the same model run by transformers itself.
"""

import copy
from collections import Counter

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm

import llmkernels as lk
import llmkernels.ops as lk_ops
from llmkernels import hf

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
VOCAB = 101
COUNTED_OPS = ("rms_norm", "silu_and_mul", "rotary_embedding", "decode_attention")


def tiny_config(rope=LLAMA3_ROPE, **overrides) -> LlamaConfig:
    # GQA (4 query heads over 2 kv heads), head_dim 16, awkward intermediate/vocab sizes.
    kw = dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=88,
        num_hidden_layers=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        initializer_range=0.2,  # larger than default: peaky logits, meaningful greedy decoding
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        rope_parameters=rope,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_model(**kw) -> LlamaForCausalLM:
    torch.manual_seed(1234)
    return LlamaForCausalLM(tiny_config(**kw)).eval()


def prompt(batch=2, length=9, seed=7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def greedy(model, ids, new=12, **kw):
    return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw)


@pytest.fixture
def op_counts(monkeypatch):
    """Count calls to the public llmkernels ops (hf.py looks them up at call time)."""
    counts = Counter()
    for name in COUNTED_OPS:
        real = getattr(lk_ops, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(lk_ops, name, counted)
    return counts


def test_logits_match_unpatched():
    model = tiny_model()
    reference = copy.deepcopy(model)
    lk.patch(model)
    ids = prompt(3, 13)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in one row: the padding mask must reach attention
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            ours = model(ids, **kwargs).logits
            theirs = reference(ids, **kwargs).logits
            assert ours.abs().max() > 1.0  # not a degenerate model
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
        # the mask matters (so the comparison above covers masking)
        assert not torch.allclose(
            model(ids, attention_mask=mask).logits[1], model(ids).logits[1], atol=1e-2
        )


def test_base_model_hidden_states_match():
    torch.manual_seed(3)
    model = LlamaModel(tiny_config()).eval()
    reference = copy.deepcopy(model)
    lk.patch(model)
    ids = prompt(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids).last_hidden_state, reference(ids).last_hidden_state, atol=1e-4, rtol=0
        )


def test_greedy_generate_identical_and_uses_our_ops(op_counts):
    model = tiny_model()
    reference = copy.deepcopy(model)
    lk.patch(model)
    ids = prompt(2, 9)
    new = 12
    ours = greedy(model, ids, new)
    counts = dict(op_counts)
    theirs = greedy(reference, ids, new)
    assert torch.equal(ours, theirs)
    assert len(set(ours[0, 9:].tolist())) > 2  # not one token repeated
    # every forward (1 prefill + new-1 decode steps) runs every layer on our ops
    layers, forwards = model.config.num_hidden_layers, new
    assert counts["rms_norm"] == (2 * layers + 1) * forwards
    assert counts["silu_and_mul"] == layers * forwards
    assert counts["rotary_embedding"] == layers * forwards
    assert counts["decode_attention"] == layers * (forwards - 1)


def test_greedy_generate_with_padding_falls_back_to_sdpa(op_counts):
    model = tiny_model()
    reference = copy.deepcopy(model)
    lk.patch(model)
    ids = prompt(2, 9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ours = greedy(model, ids, 10, attention_mask=mask)
    assert op_counts["decode_attention"] == 0  # a padding mask: not the decode kernel's case
    assert op_counts["rotary_embedding"] > 0
    assert torch.equal(ours, greedy(reference, ids, 10, attention_mask=mask))


def test_sampled_generate_same_seed():
    model = tiny_model()
    reference = copy.deepcopy(model)
    lk.patch(model)
    ids = prompt(2, 6)
    kw = dict(
        max_new_tokens=10, min_new_tokens=10, do_sample=True, temperature=0.9, top_k=20, top_p=0.9
    )
    torch.manual_seed(99)
    ours = model.generate(ids, **kw)
    torch.manual_seed(99)
    again = model.generate(ids, **kw)
    torch.manual_seed(99)
    theirs = reference.generate(ids, **kw)
    assert ours.shape == (2, 16)
    assert torch.equal(ours[:, :6], ids)
    assert int(ours.min()) >= 0 and int(ours.max()) < VOCAB
    assert torch.equal(ours, again)
    assert torch.equal(ours, theirs)  # fp32 logits agree to ~1e-6: the same draws


def test_generate_past_initial_rope_table_and_max_position():
    # 120-token prompt + 20 new tokens > max_position_embeddings (128): the table must grow.
    model = tiny_model()
    reference = copy.deepcopy(model)
    lk.patch(model)
    ids = prompt(1, 120)
    assert torch.equal(greedy(model, ids, 20), greedy(reference, ids, 20))


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    ],
)
def test_other_supported_rope_types(rope, op_counts):
    model = tiny_model(rope=rope)
    reference = copy.deepcopy(model)
    lk.patch(model)
    ids = prompt(2, 7)
    assert torch.equal(greedy(model, ids, 8), greedy(reference, ids, 8))
    assert op_counts["rotary_embedding"] > 0


def test_unsupported_rope_type_keeps_hf_rotary(op_counts):
    model = tiny_model(rope={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    reference = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match="rope type 'dynamic'.*stays on transformers"):
        lk.patch(model)
    ids = prompt(2, 7)
    assert torch.equal(greedy(model, ids, 8), greedy(reference, ids, 8))
    assert op_counts["rotary_embedding"] == 0
    assert op_counts["rms_norm"] > 0 and op_counts["decode_attention"] > 0


def _instance_forwards(model):
    return {name: m.__dict__.get("forward") for name, m in model.named_modules()}


def test_unpatch_restores_exactly():
    model = tiny_model()
    pristine = copy.deepcopy(model)
    before = _instance_forwards(model)
    assert all(f is None for f in before.values())
    class_forwards = (LlamaRMSNorm.forward, LlamaMLP.forward, LlamaAttention.forward)

    lk.patch(model)
    assert lk.hf.is_patched(model)
    assert model.config._attn_implementation == hf.ATTENTION_NAME
    patched = _instance_forwards(model)
    kinds = (LlamaRMSNorm, LlamaMLP, LlamaAttention)
    n_patched = sum(isinstance(m, kinds) for m in model.modules())
    assert sum(f is not None for f in patched.values()) == n_patched == 2 * 4 + 1
    ids = prompt(2, 9)
    greedy(model, ids, 5)

    lk.unpatch(model)
    assert not lk.hf.is_patched(model)
    assert _instance_forwards(model) == before
    assert (LlamaRMSNorm.forward, LlamaMLP.forward, LlamaAttention.forward) == class_forwards
    assert model.config._attn_implementation == pristine.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, pristine(ids).logits)
    assert torch.equal(greedy(model, ids, 8), greedy(pristine, ids, 8))
    lk.unpatch(model)  # unpatching an unpatched model: no-op


def test_patch_only_touches_that_instance():
    model = tiny_model()
    other = copy.deepcopy(model)  # its own config
    ids = prompt(1, 5)
    with torch.no_grad():
        before = other(ids).logits
    lk.patch(model)
    greedy(model, ids, 3)
    assert other.config._attn_implementation == "sdpa"
    assert all(m.__dict__.get("forward") is None for m in other.modules())
    with torch.no_grad():
        assert torch.equal(other(ids).logits, before)


def test_patch_twice_is_noop():
    model = tiny_model()
    reference = copy.deepcopy(model)
    assert lk.patch(model) is model
    first = _instance_forwards(model)
    assert lk.patch(model) is model
    assert lk.patch(model.model) is model.model  # the base of a patched model: patched too
    assert _instance_forwards(model) == first
    ids = prompt(2, 6)
    assert torch.equal(greedy(model, ids, 6), greedy(reference, ids, 6))
    lk.unpatch(model)
    assert all(m.__dict__.get("forward") is None for m in model.modules())
    assert model.config._attn_implementation == "sdpa"


def test_deepcopy_of_patched_model_is_independent():
    model = tiny_model()
    reference = copy.deepcopy(model)
    lk.patch(model)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():  # the clone must not read the source's weights
            p.mul_(0.5)
    ids = prompt(1, 6)
    assert torch.equal(greedy(clone, ids, 6), greedy(reference, ids, 6))
    with pytest.warns(RuntimeWarning, match="autograd"):
        logits = clone(ids).logits  # grad mode: the fallback path, still the clone's weights
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(ids).logits, atol=1e-4, rtol=0)
    lk.unpatch(clone)
    assert lk.hf.is_patched(model) and not lk.hf.is_patched(clone)


def test_grad_mode_falls_back_to_transformers(op_counts):
    model = tiny_model()
    reference = copy.deepcopy(model)
    lk.patch(model)
    ids = prompt(2, 7)
    with pytest.warns(RuntimeWarning, match="autograd"):
        logits = model(ids).logits
    assert op_counts["rms_norm"] == op_counts["rotary_embedding"] == op_counts["silu_and_mul"] == 0
    logits.sum().backward()  # gradients flow: transformers' own modules ran
    assert model.lm_head.weight.grad is not None
    torch.testing.assert_close(logits, reference(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: MistralForCausalLM(
            MistralConfig(
                hidden_size=32,
                num_attention_heads=2,
                num_key_value_heads=1,
                intermediate_size=64,
                num_hidden_layers=1,
                vocab_size=50,
            )
        ),
        lambda: torch.nn.Linear(4, 4),
        lambda: "LlamaForCausalLM",
    ],
    ids=["mistral", "linear", "str"],
)
def test_patch_rejects_non_llama(make):
    obj = make()
    with pytest.raises(TypeError, match="LlamaForCausalLM and LlamaModel"):
        lk.patch(obj)
    with pytest.raises(TypeError, match="LlamaForCausalLM and LlamaModel"):
        lk.unpatch(obj)


def test_static_cache_generate_matches(op_counts):
    model = tiny_model()
    reference = copy.deepcopy(model)
    lk.patch(model)
    ids = prompt(2, 9)
    kw = dict(cache_implementation="static")
    assert torch.equal(greedy(model, ids, 8, **kw), greedy(reference, ids, 8, **kw))
    assert op_counts["rotary_embedding"] > 0
    assert op_counts["decode_attention"] == 0  # a static cache's decode mask: SDPA


def test_torch_compile_runs_transformers_code(op_counts):
    model = tiny_model()
    reference = copy.deepcopy(model)
    lk.patch(model)
    compiled = torch.compile(model, backend="eager")
    ids = prompt(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, reference(ids).logits, atol=1e-4, rtol=0)
    assert sum(op_counts.values()) == 0


def test_accelerate_hooks_keep_working(op_counts):
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class CountingHook(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            CountingHook.calls += 1
            return args, kwargs

    model = tiny_model()
    reference = copy.deepcopy(model)
    norm = model.model.norm
    add_hook_to_module(norm, CountingHook())
    hooked_forward, old_forward = norm.__dict__["forward"], norm.__dict__["_old_forward"]
    lk.patch(model)
    assert (
        norm.__dict__["forward"] is hooked_forward
    )  # the hook wrapper is kept, its inner forward patched
    assert norm.__dict__["_old_forward"] is not old_forward
    ids = prompt(1, 6)
    assert torch.equal(greedy(model, ids, 4), greedy(reference, ids, 4))
    assert CountingHook.calls == 4
    layers = model.config.num_hidden_layers
    assert op_counts["rms_norm"] == (2 * layers + 1) * 4  # the hooked norm too
    lk.unpatch(model)
    assert (
        norm.__dict__["forward"] is hooked_forward and norm.__dict__["_old_forward"] is old_forward
    )
    remove_hook_from_module(norm)  # accelerate puts the (restored) original back as forward
    assert norm.forward.__func__ is LlamaRMSNorm.forward


def test_bf16_cast_model_error_within_hf():
    # .to(bfloat16) rounds HF's inv_freq buffer to bf16; patch keeps the exact fp32 RoPE table
    # (checked loosely against that buffer), so patched bf16 must be at least about as close to
    # the fp32 model as transformers' own bf16 run.
    oracle = tiny_model()
    theirs = copy.deepcopy(oracle).to(torch.bfloat16)
    ours = lk.patch(copy.deepcopy(theirs))
    ids = prompt(2, 40)
    with torch.no_grad():
        expected = oracle(ids).logits
        err_theirs = (theirs(ids).logits.float() - expected).abs()
        err_ours = (ours(ids).logits.float() - expected).abs()
    assert err_ours.max() <= 2 * err_theirs.max()
    assert err_ours.mean() <= 2 * err_theirs.mean()
