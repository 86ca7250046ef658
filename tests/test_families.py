"""The engine on Mistral (sliding window), Qwen2 / Qwen2.5 (q/k/v bias, windowed layers) and Qwen3
(q/k norm, head_dim != hidden / heads) against transformers' own classes, CPU fp32, random weights.

Tiny configs for every property, and one config of a real model's shape per family (Qwen2.5-0.5B,
Qwen3-0.6B, Mistral-7B), shrunk in depth.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import llmkernels as lk
from llmkernels.loading import with_rope_scaling
from llmkernels.model import ModelConfig
from llmkernels.perf.generate import CONFIGS

VOCAB = 320
CLASSES = {
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
# family -> extra config: each tiny variant exercises what the family adds
VARIANTS = {
    "mistral": ("mistral", dict(sliding_window=None)),
    "mistral-window": ("mistral", dict(sliding_window=8)),  # prompts below are longer than 8
    "qwen2": ("qwen2", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen2-window": (  # layer 1 windowed (max_window_layers 1), layer 0 full
        "qwen2",
        dict(use_sliding_window=True, sliding_window=6, max_window_layers=1),
    ),
    "qwen3": ("qwen3", dict(head_dim=24, tie_word_embeddings=True)),  # 4 * 24 != 64
    "qwen3-window": (
        "qwen3",
        dict(head_dim=16, use_sliding_window=True, sliding_window=5, max_window_layers=0),
    ),
}


# Real models' shapes (the benchmark's configs), shrunk in depth
def real_shape(name: str, layers: int = 2) -> tuple[str, dict]:
    fields = dict(CONFIGS[name], num_hidden_layers=layers)
    return fields.pop("model_type"), fields


REAL = {
    "qwen2.5-0.5b": real_shape("qwen2.5-0.5b"),
    "qwen3-0.6b": real_shape("qwen3-0.6b"),
    "mistral-7b": real_shape("mistral-7b", layers=1),  # 2.8 GB of fp32 weights per layer pair
}


def make_hf(family: str, seed: int = 0, **overrides):
    """A random HF model of the family (no EOS in its generation config), weights and biases
    spread out so greedy decoding has clear margins."""
    config_cls, model_cls = CLASSES[family]
    config = config_cls(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15 if config.hidden_size <= 128 else 0.03)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "q_norm" in name or "k_norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def variant(name: str, **overrides):
    family, extra = VARIANTS[name]
    return make_hf(family, **extra, **overrides)


def prompts(batch: int, length: int, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def hf_greedy(model, ids, new, **kw):
    with torch.no_grad():
        return model.generate(
            ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, **kw
        )


# ---- config reading ----------------------------------------------------------------------------------
def test_model_config_fields_per_family():
    assert ModelConfig.from_hf(variant("qwen2").config).qkv_bias
    q3 = ModelConfig.from_hf(variant("qwen3").config)
    assert q3.qk_norm and not q3.qkv_bias and q3.head_dim == 24 and q3.layer_windows == ()
    assert ModelConfig.from_hf(variant("mistral-window").config).layer_windows == (8, 8)
    assert ModelConfig.from_hf(variant("qwen2-window").config).layer_windows == (0, 6)
    assert ModelConfig.from_hf(variant("qwen3-window").config).layer_windows == (5, 5)
    # config.json dicts: Qwen's window only with use_sliding_window (off in published models)
    published = dict(TINY, model_type="qwen2", sliding_window=32768, max_window_layers=21)
    assert ModelConfig.from_hf({**published, "use_sliding_window": False}).layer_windows == ()
    on = ModelConfig.from_hf({**published, "use_sliding_window": True, "max_window_layers": 1})
    assert on.layer_windows == (0, 32768) and on.window(0) is None and on.window(1) == 32768


@pytest.mark.parametrize(
    "config, field",
    [
        (dict(model_type="qwen2_moe"), "model_type"),
        (dict(model_type="qwen3", attention_bias=True), "attention_bias"),
        (dict(model_type="mistral", mlp_bias=True), "mlp_bias"),
        (
            dict(model_type="qwen3", layer_types=["full_attention", "chunked_attention"]),
            "layer_types",
        ),
        (
            dict(model_type="qwen2", rope_parameters={"rope_type": "dynamic", "factor": 4.0}),
            "rope type 'dynamic'",
        ),
    ],
)
def test_unsupported_config_fields_are_refused_by_name(config, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_hf({**TINY, **config})


# ---- against transformers ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_hf(name):
    hf = variant(name)
    eng = lk.Engine.from_hf(hf, max_batch_size=3, max_seq_len=64)
    ids = prompts(3, 21)  # longer than every window
    with torch.no_grad():
        expected = hf(ids).logits
    actual = eng.logits(ids)
    assert expected.std() > 0.5  # not near-constant logits
    assert (actual - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_yarn_rope_matches_hf(family):
    """Qwen's long-context recipe (rope_type yarn, factor 4 over a max_position_embeddings left
    at the pre-training length): the engine serves 4x the positions, with the same logits and
    greedy tokens as transformers past the pre-training length, and not the plain RoPE's."""
    yarn = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    yarn["original_max_position_embeddings"] = 64
    hf = make_hf(family, head_dim=16, max_position_embeddings=64, rope_parameters=yarn)
    assert ModelConfig.from_hf(hf.config).max_position_embeddings == 256
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=160)
    ids = prompts(2, 90)  # past 64
    with torch.no_grad():
        expected = hf(ids).logits
    assert (eng.logits(ids) - expected).abs().max().item() <= 1e-4
    plain = make_hf(
        family, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1e4}
    )
    with torch.no_grad():
        assert (plain(ids).logits - expected).abs().max().item() > 0.1
    assert torch.equal(eng.generate(ids, max_new_tokens=60), hf_greedy(hf, ids, 60))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_64_tokens_identical(name):
    hf = variant(name)
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=128)
    ids = prompts(2, 12)
    expected = hf_greedy(hf, ids, 64)
    actual = eng.generate(ids, max_new_tokens=64, do_sample=False)
    assert torch.equal(actual, expected)
    assert len(set(actual[0, 12:].tolist())) > 5  # not a constant continuation


@pytest.mark.parametrize("name", ["mistral-window", "qwen2", "qwen3-window"])
def test_ragged_batch_equals_rows_alone_and_hf(name):
    hf = variant(name)
    eng = lk.Engine.from_hf(hf, max_batch_size=3, max_seq_len=96)
    ids = prompts(3, 14)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    mask[2, :9] = 0
    batched = eng.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    for row in range(3):
        alone = eng.generate(ids[row : row + 1, mask[row].bool()], max_new_tokens=20)
        assert torch.equal(batched[row, 14:], alone[0, -20:]), f"row {row}"
    expected = hf_greedy(hf, ids, 20, attention_mask=mask)
    assert torch.equal(batched, expected)


@pytest.mark.parametrize("name", ["qwen2-window", "qwen3"])
def test_seeded_sampling_reproducible(name):
    eng = lk.Engine.from_hf(variant(name), max_seq_len=64)
    ids = prompts(1, 8)
    kw = dict(max_new_tokens=16, do_sample=True, temperature=0.8, top_k=50, top_p=0.9)
    a = eng.generate(ids, seed=5, **kw)
    assert torch.equal(a, eng.generate(ids, seed=5, **kw))
    assert not all(torch.equal(a, eng.generate(ids, seed=s, **kw)) for s in (6, 7, 8))


def test_window_longer_generation_matches_hf():
    # prompt 20 and 40 new tokens over a window of 8: every decode step attends 8 tokens
    hf = variant("mistral-window")
    eng = lk.Engine.from_hf(hf, max_seq_len=96)
    ids = prompts(1, 20, seed=3)
    out = hf_greedy(hf, ids, 40, output_logits=True, return_dict_in_generate=True)
    actual = eng.generate(ids, max_new_tokens=40, do_sample=False)
    assert torch.equal(actual, out.sequences)


@pytest.mark.parametrize("name", list(REAL))
def test_real_shapes(name):
    family, config = REAL[name]
    hf = make_hf(family, **config)
    eng = lk.Engine.from_hf(hf, max_seq_len=128)
    vocab = config["vocab_size"]
    ids = prompts(1, 16, vocab=vocab)
    with torch.no_grad():
        expected = hf(ids).logits
    assert (eng.logits(ids) - expected).abs().max().item() <= 1e-4 * max(1.0, expected.abs().max())
    new = 16 if name == "mistral-7b" else 64  # 2.8 GB of fp32 weights: fewer tokens
    assert torch.equal(eng.generate(ids, max_new_tokens=new), hf_greedy(hf, ids, new))


# ---- chat: a continuation prefills only the new turn ----------------------------------------------------
def test_chat_continuation_prefills_only_the_new_turn(smol_tokenizer):
    tok = smol_tokenizer
    hf = make_hf(
        "qwen3",
        vocab_size=len(tok),
        head_dim=16,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    eng = lk.Engine.from_hf(hf, tokenizer=tok, max_seq_len=256)
    kw = dict(max_new_tokens=6, do_sample=False)
    session = eng.chat_session([{"role": "system", "content": "You are terse."}], **kw)
    session.send("Name a colour.")
    ids1 = eng.chat_ids(session.messages[:2])
    second = session.send("And a fruit?")
    ids2 = eng.chat_ids(session.messages[:4])
    assert 0 < session.last_prefill_len <= len(ids2) - len(ids1)
    eng.reset()
    assert eng.chat(session.messages[:4], **kw) == second  # = recomputing the whole conversation


def test_from_pretrained_rope_scaling_keeps_the_checkpoints_theta(tmp_path):
    """rope_scaling= on a saved folder (v5 rope_parameters) equals transformers' model whose
    rope_parameters hold the same scaling and the checkpoint's theta, past the pre-training
    length; a per-layer-type RoPE and a dict without rope_type are refused by name."""
    from transformers import AutoModelForCausalLM

    hf = make_hf("qwen3", head_dim=16, max_position_embeddings=64)
    hf.save_pretrained(tmp_path)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    eng = lk.Engine.from_pretrained(str(tmp_path), rope_scaling=yarn, max_seq_len=160)
    theta = hf.config.rope_parameters["rope_theta"]
    expected_model = AutoModelForCausalLM.from_pretrained(
        tmp_path, rope_parameters={**yarn, "rope_theta": theta}
    ).eval()
    assert expected_model.config.rope_parameters["rope_type"] == "yarn"
    ids = prompts(1, 100)
    with torch.no_grad():
        expected, plain = expected_model(ids).logits, hf(ids).logits
    assert (eng.logits(ids) - expected).abs().max().item() <= 1e-4
    assert (plain - expected).abs().max().item() > 0.1
    v4 = {**TINY, "model_type": "qwen2", "rope_theta": 5e5, "rope_scaling": None}
    scaled = with_rope_scaling(v4, {"type": "linear", "factor": 2.0})
    assert scaled["rope_parameters"] == {
        "rope_theta": 5e5,
        "type": "linear",
        "factor": 2.0,
        "rope_type": "linear",
    }
    assert "rope_scaling" not in scaled and ModelConfig.from_hf(scaled).rope["factor"] == 2.0
    nested = {**TINY, "rope_parameters": {"full_attention": {"rope_theta": 1e6}}}
    with pytest.raises(ValueError, match="per layer type"):
        with_rope_scaling(nested, yarn)
    with pytest.raises(ValueError, match="rope_type"):
        with_rope_scaling(v4, {"factor": 4.0})


@pytest.mark.parametrize("name", ["qwen2-window", "qwen3"])
def test_from_pretrained_folder(name, tmp_path):
    hf = variant(name)
    hf.save_pretrained(tmp_path)
    eng = lk.Engine.from_pretrained(str(tmp_path), device="cpu", max_seq_len=64)
    assert eng.config.model_type == hf.config.model_type
    ids = prompts(1, 12)
    with torch.no_grad():
        expected = hf(ids).logits
    assert (eng.logits(ids) - expected).abs().max().item() <= 1e-4
