"""A GGUF file's tensors as an HF ``model.safetensors``, written one tensor at a time.

transformers' GGUF loader (``from_pretrained(..., gguf_file=)``) dequantizes every tensor to fp32
and holds them all, and then the model: a 1.1B Q4_0 file peaked at 5.7 GB of memory on the 2-core
host, a 7B one would need ~35 GB. Here each tensor is dequantized (with the ``gguf`` package's
``dequantize``, which transformers uses too) in slices of 64 MB of output, renamed, fixed up as
transformers' loader does, and streamed into the file, so the peak is a few slices (the 1.1B
file: 0.56 GB, most of it the tokenizer). The result equals transformers' conversion bit for bit
(tested on both embedded models, and on llama / qwen2 / qwen3 files written as llama.cpp writes
them); the config, tokenizer and generation config still come from transformers
(:func:`llmkernels.loading.convert_gguf`).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from .gguf_file import GGUFIndex

__all__ = ["CONVERTIBLE_ARCHITECTURES", "hf_tensor_names", "write_safetensors"]

# llama.cpp's tensor names inside blk.{i} -> the HF module (per architecture where they differ)
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA3_BLOCK = {  # Gemma norms before and after each sub-layer
    **_BLOCK,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
CONVERTIBLE_ARCHITECTURES = {
    "llama": _BLOCK,
    "qwen2": _BLOCK,
    "qwen3": _BLOCK,
    "gemma3": _GEMMA3_BLOCK,
}


def hf_tensor_names(index: GGUFIndex) -> dict[str, str]:
    """GGUF tensor name -> HF parameter name, for the tensors transformers' loader keeps (others
    outside the blocks, such as llama 3's ``rope_freqs``, it drops, and so do we). Raises
    ``ValueError`` for an architecture not in :data:`CONVERTIBLE_ARCHITECTURES` or a block tensor
    the engine's families do not have (transformers would drop it silently, e.g. a llama file's
    ``attn_q.bias`` when its config has no attention bias: a model we would then run wrong)."""
    arch = index.fields.get("general.architecture")
    if arch not in CONVERTIBLE_ARCHITECTURES:
        raise ValueError(
            f"{index.path.name}: GGUF architecture {arch!r} is not one of "
            f"{sorted(CONVERTIBLE_ARCHITECTURES)}"
        )
    block = CONVERTIBLE_ARCHITECTURES[arch]
    names = {}
    for name in index.tensors:
        stem, _, kind = name.rpartition(".")  # kind: weight / bias
        if stem.startswith("blk."):
            _, layer, part = (stem.split(".", 2) + ["", ""])[:3]
            if part not in block or not layer.isdigit():
                raise ValueError(
                    f"{index.path.name}: tensor {name!r} is not part of a {arch} block"
                )
            names[name] = f"model.layers.{layer}.{block[part]}.{kind}"
        elif stem in _TOP:
            names[name] = f"{_TOP[stem]}.{kind}"
    return names


_CHUNK_BYTES = 64 << 20  # fp32 output per dequantized slice of rows


def _fp32_slices(index: GGUFIndex, name: str, hf_config: dict):
    """The tensor as transformers' loader makes it, in slices of whole rows (fp32, C order):
    dequantized, in HF's row order, and Gemma's norms as ``w`` where the file stores ``1 + w``.
    Slicing keeps the dequantizer's temporaries (~3x its output) to a slice; llama's q / k,
    whose rows move between slices, come whole (they are hidden x hidden at most)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    t = index.tensors[name]
    kind = GGMLQuantizationType[t.kind]
    raw = index.raw(name)  # [rows, bytes per row]
    arch = index.fields["general.architecture"]
    part = name.split(".")[-2]
    if arch == "llama" and part in ("attn_q", "attn_k"):  # undo llama.cpp's per-head row order
        heads = hf_config["num_attention_heads" if part == "attn_q" else "num_key_value_heads"]
        weights = np.asarray(dequantize(raw, kind), dtype=np.float32).reshape(t.shape)
        rows = weights.shape[0]
        weights = weights.reshape(heads, rows // heads // 2, 2, -1).swapaxes(2, 1)
        yield np.ascontiguousarray(weights.reshape(t.shape))
        return
    row_bytes = 4 * (math.prod(t.shape) // raw.shape[0])
    step = max(1, _CHUNK_BYTES // row_bytes)
    for start in range(0, raw.shape[0], step):
        weights = np.asarray(dequantize(raw[start : start + step], kind), dtype=np.float32)
        if arch == "gemma3" and name.endswith("norm.weight"):
            weights = weights - np.float32(1)
        yield np.ascontiguousarray(weights)


def write_safetensors(index: GGUFIndex, hf_config: dict, path: Path) -> list[str]:
    """Write the GGUF's tensors as fp32 HF parameters into the safetensors file ``path``, one at
    a time (the header first: every shape is known from the index). ``hf_config``: transformers'
    config of the file (head counts for llama's row order). Returns the HF names written."""
    names = hf_tensor_names(index)
    header, offset = {}, 0
    for gguf_name, hf_name in names.items():
        shape = list(index.tensors[gguf_name].shape)
        nbytes = 4 * math.prod(shape)
        header[hf_name] = {
            "dtype": "F32",
            "shape": shape,
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for gguf_name in names:
            for rows in _fp32_slices(index, gguf_name, hf_config):
                f.write(memoryview(rows).cast("B"))
    return list(names.values())
