"""llmkernels: fused CUDA kernels for Llama inference, a pure-PyTorch reference of each, and a
fast generate engine for Hugging Face Llama models.

    import llmkernels as lk
    lk.rms_norm(x, w); lk.sample(logits, temperature=0.7, top_p=0.9)
    eng = lk.Engine.from_pretrained("default"); eng.chat([{"role": "user", "content": "Hi"}])
"""

from ._version import __version__
from .ops import (
    cuda_kernels_available,
    decode_attention,
    decode_attention_supported,
    decode_attention_workspace,
    extension_status,
    fused_add_rms_norm,
    gelu_tanh_and_mul,
    int4_linear,
    int8_linear,
    kv_cache_append,
    new_rng_state,
    qk_norm_rotary,
    rms_norm,
    rope_cos_sin_cache,
    rotary_embedding,
    sample,
    silu_and_mul,
)

__all__ = [
    "__version__",
    "cuda_kernels_available",
    "extension_status",
    "rms_norm",
    "fused_add_rms_norm",
    "rope_cos_sin_cache",
    "rotary_embedding",
    "qk_norm_rotary",
    "silu_and_mul",
    "gelu_tanh_and_mul",
    "int8_linear",
    "int4_linear",
    "kv_cache_append",
    "decode_attention",
    "decode_attention_workspace",
    "decode_attention_supported",
    "sample",
    "new_rng_state",
    "Engine",
    "patch",
    "unpatch",
    "is_patched",
]

_LAZY = {"Engine": "generate", "patch": "hf", "unpatch": "hf", "is_patched": "hf"}


def __getattr__(name):
    # The engine and HF integration import transformers: load them only when asked for.
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'llmkernels' has no attribute {name!r}")
