// The op registry: every llmkernels schema, one comment each. No CUDA here: each kernel family
// registers its CUDA implementation from its own .cu (TORCH_LIBRARY_IMPL(llmkernels, CUDA, m)).
// CPU (reference) and Meta (fake) implementations are registered from Python (llmkernels/ops.py).
// Ops are destination-passing: the caller allocates `out`, kernels never allocate or sync.
//
// Keep in sync with llmkernels/_schemas.py (used when this extension is not built);
// tests/test_ops_registry.py checks that the two agree.

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(llmkernels, m) {
  // out[N, H] = x[N, H] * rsqrt(mean(x^2) + eps) * weight[H]; x rows may be strided.
  // unit_offset: * (1 + weight[H]) in fp32 instead (Gemma).
  m.def("rms_norm(Tensor! out, Tensor x, Tensor weight, float eps, bool unit_offset=False) -> ()");
  // residual[N, H] += x[N, H]; x = rms_norm(residual) * weight[H]   (both in place)
  m.def("fused_add_rms_norm(Tensor! x, Tensor! residual, Tensor weight, float eps, bool unit_offset=False) -> ()");
  // In place: q[T, Hq, D], k[T, Hk, D] rotated by cos_sin_cache[max_pos, rot_dim] (fp32, cos | sin)
  // at positions[T] (int32/int64); is_neox: rotate_half halves (HF Llama) vs interleaved pairs.
  m.def("rotary_embedding(Tensor positions, Tensor! q, Tensor! k, Tensor cos_sin_cache, bool is_neox) -> ()");
  // In place: every head of q[T, Hq, D] / k[T, Hk, D] RMS-normalized over D (weights q_weight[D],
  // k_weight[D]; unit_offset: 1 + weight) then NeoX-rotated over all D by cos_sin_cache[max_pos, D]
  // at positions[T] (Qwen3, Gemma 3: one pass instead of two norms and a rotary).
  m.def("qk_norm_rotary(Tensor positions, Tensor! q, Tensor! k, Tensor q_weight, Tensor k_weight, Tensor cos_sin_cache, float eps, bool unit_offset=False) -> ()");
  // out[N, I] = silu(x[N, :I]) * x[N, I:]   with x[N, 2I]
  m.def("silu_and_mul(Tensor! out, Tensor x) -> ()");
  // out[N, I] = gelu_tanh(x[N, :I]) * x[N, I:]   with x[N, 2I] (GeGLU, Gemma)
  m.def("gelu_tanh_and_mul(Tensor! out, Tensor x) -> ()");
  // Writes k[N, Hk, D], v[N, Hk, D] into k_cache/v_cache[B, Hk, S, D] at slot_mapping[N] (int64,
  // flat slot b * S + s); slots < 0 or >= B * S are skipped (padding).
  m.def("kv_cache_append(Tensor k, Tensor v, Tensor! k_cache, Tensor! v_cache, Tensor slot_mapping) -> ()");
  // out[B, Hq, D] = softmax(q[B, Hq, D] . k_cache[B, Hk, :len, D]^T * scale) @ v_cache[B, Hk, :len, D]
  // with len = seq_lens[B] (int32, on device); GQA: query head h reads kv head h / (Hq / Hk).
  // window > 0: only the last `window` tokens, [max(0, len - window), len) (sliding window).
  // workspace[B, Hq, max_splits, D + 2] (fp32) holds split-K partials (max_splits 1 = no split).
  m.def("decode_attention(Tensor! out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_lens, float scale, Tensor! workspace, int window=0) -> ()");
  // out[B] (int64) ~ softmax(logits[B, V] / temperature[B]) filtered by top_k[B] (int32, 0 = off)
  // then top_p[B] (fp32), renormalized; temperature 0 = argmax. rng_state[2] (int64, device) =
  // (seed, offset): Philox counter; the op advances offset on device.
  m.def("sample(Tensor! out, Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor! rng_state) -> ()");
  // out[M, N] = (x[M, K] @ weight[N, K]^T) * scale[N]: weight int8, scale fp32, x fp16/bf16 with
  // M <= 8 (decode; weight-only int8), the sum in fp32.
  m.def("int8_linear(Tensor! out, Tensor x, Tensor weight, Tensor scale) -> ()");
  // out[M, N] = x[M, K] @ W[N, K]^T, W = (q - 8) * scale + zero per group of K / scale_zero.size(1)
  // inputs: weight uint8 [N, K / 2] (two 4-bit codes per byte, even input high), scale_zero bf16
  // [N, K / G, 2], x fp16/bf16 with M <= 8 (decode; weight-only int4), the sum in fp32.
  m.def("int4_linear(Tensor! out, Tensor x, Tensor weight, Tensor scale_zero) -> ()");
}

// `import llmkernels._C` loads this library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
