// Rotary position embedding, in place on q and k, with HF's rounding in the activation dtype
// (and, at the end, the same after a per-head RMSNorm, fused: qk_norm_rotary):
//   c = round(cos[pos, i]), s = round(sin[pos, i])
//   x1' = round(round(x1 * c) - round(x2 * s)),  x2' = round(round(x2 * c) + round(x1 * s))
// where (x1, x2) = (x[i], x[i + rot/2]) for NeoX / HF rotate_half, (x[2i], x[2i + 1]) for GPT-J;
// channels >= rot are untouched. The explicitly rounded intrinsics (__fmul_rn, ...) keep the
// compiler from fusing a product into an FMA, which would skip a rounding HF performs (fp32).
//
// Grid: one block column per token (blockIdx.x), heads of q then k split over blockIdx.y and
// threadIdx.y. threadIdx.x walks "units" of V pair indices; a thread loads and rounds its V cos/sin
// values once and reuses them for every head it visits. A unit is two 16-byte vectors when the host
// finds pointers, strides and rot/2 aligned, two scalars otherwise (partial or odd rotary sizes).

#include <algorithm>
#include <initializer_list>
#include <type_traits>

#include <ATen/MemoryOverlap.h>

#include "common.cuh"

namespace llmkernels {
namespace {

// Carries the positions' index type into a generic lambda (std::type_identity is C++20; torch
// 2.11 builds extensions as C++17).
template <typename T>
struct PosTag {
  using type = T;
};

// Calls f(PosTag<int32_t>{}) or f(PosTag<int64_t>{}) for positions' index type (checked before).
template <typename F>
void with_position_type(const at::Tensor& positions, F&& f) {
  if (positions.scalar_type() == at::kInt) {
    f(PosTag<int32_t>{});
  } else {
    f(PosTag<int64_t>{});
  }
}

// Round an fp32 value to T and back (identity for fp32).
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<T>(x));
}

// V consecutive fp32 table entries (16-byte aligned when V is a multiple of 4), rounded to T.
template <typename T, int V>
__device__ __forceinline__ void load_table(const float* __restrict__ ptr, float (&out)[V]) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int e = 0; e < V; e += 4) {
      const float4 f = *reinterpret_cast<const float4*>(ptr + e);
      out[e] = f.x;
      out[e + 1] = f.y;
      out[e + 2] = f.z;
      out[e + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] = ptr[e];
  }
#pragma unroll
  for (int e = 0; e < V; ++e) out[e] = round_to<T>(out[e]);
}

template <typename T, typename PosT, int V, bool NEOX>
__global__ void rotary_kernel(const PosT* __restrict__ positions,  // [T], stride pos_stride
                              T* q,  // [T, Hq, D], strides (q_tok, q_head, 1)
                              T* k,  // [T, Hk, D], strides (k_tok, k_head, 1)
                              const float* __restrict__ cos_sin,  // [max_pos, rot]: cos | sin
                              int64_t pos_stride, int64_t q_tok, int64_t q_head, int64_t k_tok,
                              int64_t k_head, int num_q_heads, int num_kv_heads, int rot,
                              int64_t max_pos) {
  const int64_t token = blockIdx.x;
  const int64_t pos = static_cast<int64_t>(positions[token * pos_stride]);
  // ops.py cannot check positions on the device without a sync: skip the token, never read OOB.
  if (pos < 0 || pos >= max_pos) return;

  const int half = rot / 2;
  const int units = half / V;
  const int heads = num_q_heads + num_kv_heads;
  const float* cos_row = cos_sin + pos * rot;
  T* q_token = q + token * q_tok;
  T* k_token = k + token * k_tok;

  for (int u = threadIdx.x; u < units; u += blockDim.x) {
    const int j = u * V;  // first pair index of this unit
    float c[V], s[V];
    load_table<T, V>(cos_row + j, c);
    load_table<T, V>(cos_row + half + j, s);

    for (int h = blockIdx.y * blockDim.y + threadIdx.y; h < heads; h += gridDim.y * blockDim.y) {
      T* base = h < num_q_heads ? q_token + h * q_head : k_token + (h - num_q_heads) * k_head;
      // NeoX: x1 = x[j .. j+V), x2 = x[half+j .. half+j+V). GPT-J: the 2V channels [2j, 2j+2V)
      // hold V interleaved (x1, x2) pairs.
      T* p1 = NEOX ? base + j : base + 2 * j;
      T* p2 = NEOX ? base + half + j : base + 2 * j + V;
      Pack<T, V> a = load_pack<T, V>(p1);
      Pack<T, V> b = load_pack<T, V>(p2);
      float x1[V], x2[V];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if constexpr (NEOX) {
          x1[e] = to_float(a.v[e]);
          x2[e] = to_float(b.v[e]);
        } else {
          x1[e] = to_float(2 * e < V ? a.v[2 * e] : b.v[2 * e - V]);
          x2[e] = to_float(2 * e + 1 < V ? a.v[2 * e + 1] : b.v[2 * e + 1 - V]);
        }
      }
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const T o1 = from_float<T>(
            __fsub_rn(round_to<T>(__fmul_rn(x1[e], c[e])), round_to<T>(__fmul_rn(x2[e], s[e]))));
        const T o2 = from_float<T>(
            __fadd_rn(round_to<T>(__fmul_rn(x2[e], c[e])), round_to<T>(__fmul_rn(x1[e], s[e]))));
        if constexpr (NEOX) {
          a.v[e] = o1;
          b.v[e] = o2;
        } else {
          (2 * e < V ? a.v[2 * e] : b.v[2 * e - V]) = o1;
          (2 * e + 1 < V ? a.v[2 * e + 1] : b.v[2 * e + 1 - V]) = o2;
        }
      }
      store_pack(p1, a);
      store_pack(p2, b);
    }
  }
}

// The checks rotary_embedding and qk_norm_rotary share: positions [T] int32/int64; q [T, Hq, D] and
// k [T, Hk, D] of one dtype, last dim contiguous. In place: overlapping heads or tokens would be
// rewritten by racing threads. ATen's overlap checks see dense tensors only: they give up on
// strided views such as the engine's q and k of one QKV buffer (disjoint by construction).
void check_positions_q_k(const at::Tensor& positions, const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(positions.dim() == 1, "positions must be 1-D [T], got ", lk_shape(positions));
  TORCH_CHECK(positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong,
              "positions must be int32 or int64, got ", positions.scalar_type());
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "q and k must be 3-D [T, H, D], got ", lk_shape(q),
              " and ", lk_shape(k));
  const int64_t tokens = positions.size(0), head_dim = q.size(2);
  TORCH_CHECK(q.size(0) == tokens && k.size(0) == tokens, "positions, q and k must agree on T");
  TORCH_CHECK(k.size(2) == head_dim, "k must have q's head dim ", lk_num(head_dim), ", got ",
              lk_num(k.size(2)));
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "k must have q's dtype");
  at::assert_no_internal_overlap(q);
  at::assert_no_internal_overlap(k);
  at::assert_no_overlap(q, k);
  TORCH_CHECK(head_dim <= 1 || (q.stride(2) == 1 && k.stride(2) == 1),
              "q and k must have a contiguous last dimension");
}

bool ptr_ok(const at::Tensor& t) { return t.numel() == 0 || is_16b_aligned(t.data_ptr()); }
// A dimension of size <= 1 is never stepped over, so its stride does not matter.
bool stride_ok(const at::Tensor& t, int dim, int v) {
  return t.size(dim) <= 1 || t.stride(dim) % v == 0;
}

void rotary_embedding(const at::Tensor& positions, at::Tensor& q, at::Tensor& k,
                      const at::Tensor& cos_sin_cache, bool is_neox) {
  LK_CHECK_CUDA(positions);
  LK_CHECK_CUDA(q);
  LK_CHECK_CUDA(k);
  LK_CHECK_CUDA(cos_sin_cache);
  LK_CHECK_SAME_DEVICE(q, k);
  LK_CHECK_SAME_DEVICE(q, positions);
  LK_CHECK_SAME_DEVICE(q, cos_sin_cache);
  check_positions_q_k(positions, q, k);
  const int64_t tokens = positions.size(0), head_dim = q.size(2);
  LK_CHECK_DTYPE(cos_sin_cache, at::kFloat);
  TORCH_CHECK(cos_sin_cache.dim() == 2, "cos_sin_cache must be 2-D [max_pos, rot]");
  LK_CHECK_CONTIGUOUS(cos_sin_cache);
  const int64_t rot = cos_sin_cache.size(1), max_pos = cos_sin_cache.size(0);
  TORCH_CHECK(rot > 0 && rot % 2 == 0 && rot <= head_dim,
              "cos_sin_cache's rot dim must be even and in (0, ", lk_num(head_dim), "], got ",
              lk_num(rot));
  const int64_t heads = q.size(1) + k.size(1);
  TORCH_CHECK(tokens <= INT32_MAX && heads <= INT32_MAX,
              "rotary_embedding: too many tokens or heads");
  if (tokens == 0 || heads == 0 || max_pos == 0) return;

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LK_DISPATCH_FLOATING(q.scalar_type(), "rotary_embedding", [&] {
    using T = scalar_t;
    constexpr int kV = Vec<T>::N;
    const bool vec = (rot / 2) % kV == 0 && ptr_ok(q) && ptr_ok(k) &&
                     is_16b_aligned(cos_sin_cache.data_ptr()) && stride_ok(q, 0, kV) &&
                     stride_ok(q, 1, kV) && stride_ok(k, 0, kV) && stride_ok(k, 1, kV);
    auto launch = [&](auto pos_tag, auto v_tag, auto neox_tag) {
      using PosT = typename decltype(pos_tag)::type;
      constexpr int V = decltype(v_tag)::value;
      constexpr bool NEOX = decltype(neox_tag)::value;
      const int units = static_cast<int>(rot / 2 / V);
      // Decode (few tokens) uses small blocks so the heads spread over more SMs.
      const int target = tokens < 32 ? 64 : 128;
      const int bx = std::min(units, target);
      const int64_t by_max = std::max(1, target / bx);
      // Rows of heads: as few passes as by_max allows, then balanced so no pass runs half empty.
      const int64_t passes = (heads + by_max - 1) / by_max;
      const int by = static_cast<int>((heads + passes - 1) / passes);
      const int64_t head_blocks = (heads + by - 1) / by;
      const int64_t want = std::max<int64_t>(1, (256 + tokens - 1) / tokens);  // ~256 blocks
      const dim3 grid(static_cast<unsigned>(tokens),
                      static_cast<unsigned>(std::min(head_blocks, want)));
      rotary_kernel<T, PosT, V, NEOX><<<grid, dim3(bx, by), 0, stream>>>(
          positions.data_ptr<PosT>(), static_cast<T*>(q.data_ptr()), static_cast<T*>(k.data_ptr()),
          cos_sin_cache.data_ptr<float>(), positions.stride(0), q.stride(0), q.stride(1),
          k.stride(0), k.stride(1), static_cast<int>(q.size(1)), static_cast<int>(k.size(1)),
          static_cast<int>(rot), max_pos);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    auto with_layout = [&](auto pos_tag, auto v_tag) {
      if (is_neox) {
        launch(pos_tag, v_tag, std::true_type{});
      } else {
        launch(pos_tag, v_tag, std::false_type{});
      }
    };
    auto with_vec = [&](auto pos_tag) {
      if (vec) {
        with_layout(pos_tag, std::integral_constant<int, kV>{});
      } else {
        with_layout(pos_tag, std::integral_constant<int, 1>{});
      }
    };
    with_position_type(positions, with_vec);
  });
}

// ---- per-head q/k RMSNorm + rotary in one pass (Qwen3, Gemma 3) -------------------------------
// For every head of q (weight q_weight) and k (k_weight), in place:
//   x = rms_norm(x) over D with the rms_norm kernel's formula (inv = rsqrt(mean(x^2) + eps);
//       round(w * round(x * inv)), or round(x * inv * (1 + w)) with unit_offset),
//   then the NeoX rotary above over all D channels (rot == D), at the token's position.
// One warp per head: lane l holds the pairs j in [l P, l P + P) of both halves (P = D / 64), so
// the sum of squares is one warp reduction and each rotary pair stays in its lane's registers.
// A position outside the table leaves the head normalized but not rotated (as rotary_kernel).
constexpr int kQkWarps = 4;  // heads per block

template <typename T, typename PosT, int P>
__global__ void __launch_bounds__(kQkWarps * 32)
    qk_norm_rotary_kernel(const PosT* __restrict__ positions,  // [T], stride pos_stride
                          T* q,  // [T, Hq, D], strides (q_tok, q_head, 1), D = 64 P
                          T* k,  // [T, Hk, D], strides (k_tok, k_head, 1)
                          const T* __restrict__ q_weight,     // [D]
                          const T* __restrict__ k_weight,     // [D]
                          const float* __restrict__ cos_sin,  // [max_pos, D]: cos | sin
                          int64_t pos_stride, int64_t q_tok, int64_t q_head, int64_t k_tok,
                          int64_t k_head, int num_q_heads, int num_kv_heads, int64_t max_pos,
                          float eps, bool unit_offset) {
  constexpr int kHalf = 32 * P, kDim = 2 * kHalf;
  const int lane = threadIdx.x % 32;
  const int h = blockIdx.y * kQkWarps + threadIdx.x / 32;
  if (h >= num_q_heads + num_kv_heads) return;  // whole warps: the reduction needs every lane
  const int64_t token = blockIdx.x;
  const bool is_q = h < num_q_heads;
  T* base = is_q ? q + token * q_tok + h * q_head
                 : k + token * k_tok + (h - num_q_heads) * k_head;
  const T* weight = is_q ? q_weight : k_weight;
  const int j0 = lane * P;

  float x1[P], x2[P];
  float ss = 0.f;
#pragma unroll
  for (int e = 0; e < P; ++e) {
    x1[e] = to_float(base[j0 + e]);
    x2[e] = to_float(base[kHalf + j0 + e]);
    ss += x1[e] * x1[e] + x2[e] * x2[e];
  }
  const float inv = rsqrtf(warp_reduce_sum(ss) / static_cast<float>(kDim) + eps);
#pragma unroll
  for (int e = 0; e < P; ++e) {
    const float w1 = to_float(weight[j0 + e]), w2 = to_float(weight[kHalf + j0 + e]);
    if (unit_offset) {
      x1[e] = round_to<T>(x1[e] * inv * (1.f + w1));
      x2[e] = round_to<T>(x2[e] * inv * (1.f + w2));
    } else {
      x1[e] = round_to<T>(w1 * round_to<T>(x1[e] * inv));
      x2[e] = round_to<T>(w2 * round_to<T>(x2[e] * inv));
    }
  }

  const int64_t pos = static_cast<int64_t>(positions[token * pos_stride]);
  const bool rotate = pos >= 0 && pos < max_pos;  // else: normalized, not rotated
#pragma unroll
  for (int e = 0; e < P; ++e) {
    float o1 = x1[e], o2 = x2[e];
    if (rotate) {
      const float c = round_to<T>(cos_sin[pos * kDim + j0 + e]);
      const float s = round_to<T>(cos_sin[pos * kDim + kHalf + j0 + e]);
      o1 = __fsub_rn(round_to<T>(__fmul_rn(x1[e], c)), round_to<T>(__fmul_rn(x2[e], s)));
      o2 = __fadd_rn(round_to<T>(__fmul_rn(x2[e], c)), round_to<T>(__fmul_rn(x1[e], s)));
    }
    base[j0 + e] = from_float<T>(o1);
    base[kHalf + j0 + e] = from_float<T>(o2);
  }
}

void qk_norm_rotary(const at::Tensor& positions, at::Tensor& q, at::Tensor& k,
                    const at::Tensor& q_weight, const at::Tensor& k_weight,
                    const at::Tensor& cos_sin_cache, double eps, bool unit_offset) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{
           &positions, &q, &k, &q_weight, &k_weight, &cos_sin_cache}) {
    TORCH_CHECK(t->is_cuda(), "qk_norm_rotary: every tensor must be a CUDA tensor");
    TORCH_CHECK(t->device() == q.device(), "qk_norm_rotary: every tensor must be on q's device");
  }
  check_positions_q_k(positions, q, k);
  const int64_t tokens = positions.size(0), head_dim = q.size(2);
  TORCH_CHECK(head_dim == 64 || head_dim == 128 || head_dim == 256,
              "qk_norm_rotary: head_dim must be 64, 128 or 256, got ", lk_num(head_dim));
  for (const at::Tensor* w : std::initializer_list<const at::Tensor*>{&q_weight, &k_weight}) {
    TORCH_CHECK(w->scalar_type() == q.scalar_type(), "q_weight and k_weight must have q's dtype");
    TORCH_CHECK(w->dim() == 1 && w->size(0) == head_dim, "q_weight and k_weight must be [",
                lk_num(head_dim), "], got ", lk_shape(*w));
    TORCH_CHECK(w->is_contiguous(), "q_weight and k_weight must be contiguous");
  }
  LK_CHECK_DTYPE(cos_sin_cache, at::kFloat);
  TORCH_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.size(1) == head_dim,
              "qk_norm_rotary: cos_sin_cache must be [max_pos, ", lk_num(head_dim),
              "] (rotary over the whole head), got ", lk_shape(cos_sin_cache));
  LK_CHECK_CONTIGUOUS(cos_sin_cache);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k}) {
    at::assert_no_overlap(*t, q_weight);
    at::assert_no_overlap(*t, k_weight);
    at::assert_no_overlap(*t, cos_sin_cache);
  }
  const int64_t heads = q.size(1) + k.size(1);
  TORCH_CHECK(tokens <= INT32_MAX && heads <= int64_t{65535} * kQkWarps,
              "qk_norm_rotary: too many tokens or heads");
  if (tokens == 0 || heads == 0) return;

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LK_DISPATCH_FLOATING(q.scalar_type(), "qk_norm_rotary", [&] {
    using T = scalar_t;
    auto launch = [&](auto pos_tag, auto p_tag) {
      using PosT = typename decltype(pos_tag)::type;
      constexpr int P = decltype(p_tag)::value;
      const dim3 grid(static_cast<unsigned>(tokens),
                      static_cast<unsigned>((heads + kQkWarps - 1) / kQkWarps));
      qk_norm_rotary_kernel<T, PosT, P><<<grid, kQkWarps * 32, 0, stream>>>(
          positions.data_ptr<PosT>(), static_cast<T*>(q.data_ptr()), static_cast<T*>(k.data_ptr()),
          static_cast<const T*>(q_weight.data_ptr()), static_cast<const T*>(k_weight.data_ptr()),
          cos_sin_cache.data_ptr<float>(), positions.stride(0), q.stride(0), q.stride(1),
          k.stride(0), k.stride(1), static_cast<int>(q.size(1)), static_cast<int>(k.size(1)),
          cos_sin_cache.size(0), static_cast<float>(eps), unit_offset);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    auto with_dim = [&](auto pos_tag) {
      if (head_dim == 64) {
        launch(pos_tag, std::integral_constant<int, 1>{});
      } else if (head_dim == 128) {
        launch(pos_tag, std::integral_constant<int, 2>{});
      } else {
        launch(pos_tag, std::integral_constant<int, 4>{});
      }
    };
    with_position_type(positions, with_dim);
  });
}

}  // namespace
}  // namespace llmkernels

TORCH_LIBRARY_IMPL(llmkernels, CUDA, m) {
  m.impl("rotary_embedding", &llmkernels::rotary_embedding);
  m.impl("qk_norm_rotary", &llmkernels::qk_norm_rotary);
}
