"""GGUF files for tests, and the check of a conversion against transformers' GGUF loader.

``write_gguf``: a small GGUF file from an HF model, as llama.cpp's converter lays one out: its tensor
names, its metadata keys, q / k rows permuted per head for architecture ``llama`` only (what
transformers' GGUF loader undoes, for ``llama`` only), projections quantized with the ``gguf``
package, everything else F32 / F16. The tokenizer is copied from another GGUF (the embedded
SmolLM2's), so transformers converts a real one.

No GGUF of these families can be downloaded here: this is how tests get a qwen2 / qwen3 file whose
blocks the engine can take, checked against what transformers' loader reads from the same file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# HF module -> llama.cpp tensor name inside blk.{i}
_BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's per-head q / k row order: HF rows (half, j) become GGUF rows (j, half)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def _copy_tokenizer(writer, source: Path) -> None:
    from gguf import GGUFReader, GGUFValueType

    for key, field in GGUFReader(str(source)).fields.items():
        if not key.startswith("tokenizer."):
            continue
        values = [field.parts[i] for i in field.data]
        if key == "tokenizer.ggml.tokens":
            writer.add_token_list([bytes(v) for v in values])
        elif key == "tokenizer.ggml.merges":
            writer.add_token_merges([bytes(v) for v in values])
        elif key == "tokenizer.ggml.token_type":
            writer.add_token_types([int(v[0]) for v in values])
        elif field.types == [GGUFValueType.STRING]:
            writer.add_string(key, bytes(values[0]).decode())
        elif field.types == [GGUFValueType.BOOL]:
            writer.add_bool(key, bool(values[0][0]))
        elif field.types == [GGUFValueType.UINT32]:
            writer.add_uint32(key, int(values[0][0]))


def write_gguf(path: Path, hf_model, arch: str, kinds: dict, tokenizer_from: Path) -> Path:
    """``hf_model`` (a llama / qwen2 / qwen3 causal LM) as a GGUF of architecture ``arch`` at
    ``path``. ``kinds`` maps a projection's GGUF name (``attn_q``, ..., ``ffn_down``) to the
    ``GGMLQuantizationType`` it is stored as (types the gguf package can quantize to: Q4_0, Q4_1,
    Q5_0, Q8_0, F16, ...)."""
    from gguf import GGUFWriter
    from gguf.quants import quantize

    config = hf_model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    _copy_tokenizer(writer, tokenizer_from)

    state = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].astype(np.float16))
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for i in range(config.num_hidden_layers):
        for module, name in _BLOCK_NAMES.items():
            for suffix in ("weight", "bias"):
                tensor = state.get(f"model.layers.{i}.{module}.{suffix}")
                if tensor is None:
                    continue
                if arch == "llama" and name in heads:
                    tensor = _permute(tensor, heads[name])
                if tensor.ndim == 2:
                    kind = kinds[name]
                    data = quantize(tensor, kind)
                    writer.add_tensor(f"blk.{i}.{name}.{suffix}", data, raw_dtype=kind)
                else:
                    writer.add_tensor(f"blk.{i}.{name}.{suffix}", tensor)
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not config.tie_word_embeddings:
        writer.add_tensor("output.weight", state["lm_head.weight"].astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def assert_converted_like_transformers(folder: Path, hf_model) -> None:
    """The converted folder (``loading.convert_gguf``) holds exactly what transformers' own GGUF
    loader made of the same file (``hf_model``, fp32): every tensor bit for bit (a tied LM head
    left out, as HF re-ties it), its config and its generation config."""
    import json

    import torch
    from safetensors import safe_open
    from transformers import GenerationConfig

    expected = hf_model.state_dict()
    if hf_model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(expected)
        for name, tensor in expected.items():
            ours = f.get_tensor(name)
            assert ours.dtype == torch.float32 and torch.equal(ours, tensor), name
    config = hf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config.update(architectures=[type(hf_model).__name__], dtype="float32")
    assert json.loads((folder / "config.json").read_text()) == json.loads(json.dumps(config))
    ours = GenerationConfig.from_pretrained(str(folder)).to_dict()
    assert ours == hf_model.generation_config.to_dict()
