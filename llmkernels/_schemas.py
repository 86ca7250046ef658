"""Op schemas, for when the compiled extension is absent (pure-Python install).

The same strings are declared in csrc/ops.cpp (the source of truth when ``_C`` is built);
tests/test_ops_registry.py checks that both agree.
"""

SCHEMAS = {
    "rms_norm": "rms_norm(Tensor! out, Tensor x, Tensor weight, float eps, bool unit_offset=False) -> ()",
    "fused_add_rms_norm": "fused_add_rms_norm(Tensor! x, Tensor! residual, Tensor weight, float eps, bool unit_offset=False) -> ()",
    "rotary_embedding": "rotary_embedding(Tensor positions, Tensor! q, Tensor! k, Tensor cos_sin_cache, bool is_neox) -> ()",
    "qk_norm_rotary": "qk_norm_rotary(Tensor positions, Tensor! q, Tensor! k, Tensor q_weight, Tensor k_weight, Tensor cos_sin_cache, float eps, bool unit_offset=False) -> ()",
    "silu_and_mul": "silu_and_mul(Tensor! out, Tensor x) -> ()",
    "gelu_tanh_and_mul": "gelu_tanh_and_mul(Tensor! out, Tensor x) -> ()",
    "kv_cache_append": "kv_cache_append(Tensor k, Tensor v, Tensor! k_cache, Tensor! v_cache, Tensor slot_mapping) -> ()",
    "decode_attention": "decode_attention(Tensor! out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_lens, float scale, Tensor! workspace, int window=0) -> ()",
    "sample": "sample(Tensor! out, Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor! rng_state) -> ()",
    "int8_linear": "int8_linear(Tensor! out, Tensor x, Tensor weight, Tensor scale) -> ()",
    "int4_linear": "int4_linear(Tensor! out, Tensor x, Tensor weight, Tensor scale_zero) -> ()",
}
