// RMSNorm and fused residual-add + RMSNorm with HF LlamaRMSNorm numerics:
//   inv = rsqrt(mean(x^2) + eps)          (x in fp32, sum of squares in fp32)
//   out = round(weight * round(x * inv))  (round = to the activation dtype, as HF rounds)
// or, with unit_offset (Gemma3RMSNorm: the checkpoint stores scale - 1):
//   out = round((x * inv) * (1 + weight))  (all in fp32, one rounding)
// fused: residual = round(x + residual); x = rms_norm(residual).
//
// One block per row. Each thread keeps its share of the row in registers, so the row is read
// from memory once (x, or x and residual); only very wide rows re-read a tail. Packs are 16-byte
// vectors when the host finds every pointer, row stride and the hidden size aligned, single
// elements otherwise (odd hidden sizes, offset views). Two launch policies (see with_policy):
// decode rows spread over up to 1024 threads with the weight prefetched, prefill rows in small
// blocks of 4 packs per thread.

#include <algorithm>
#include <type_traits>

#include <ATen/MemoryOverlap.h>

#include "common.cuh"

namespace llmkernels {
namespace {

template <typename T, int V>
__device__ __forceinline__ float sum_squares(const Pack<T, V>& p) {
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const float f = to_float(p.v[e]);
    s += f * f;
  }
  return s;
}

// round(w * round(x * inv)): the normalized value is rounded before the weight multiply (HF
// Llama); unit_offset: round((x * inv) * (1 + w)) in fp32 (HF Gemma). The flag is uniform across
// the grid, so the branch never diverges.
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> normalize(const Pack<T, V>& x, const Pack<T, V>& w,
                                                float inv, bool unit_offset) {
  Pack<T, V> out;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    if (unit_offset) {
      out.v[e] = from_float<T>(to_float(x.v[e]) * inv * (1.f + to_float(w.v[e])));
    } else {
      const float n = to_float(from_float<T>(to_float(x.v[e]) * inv));
      out.v[e] = from_float<T>(to_float(w.v[e]) * n);
    }
  }
  return out;
}

// round(x + residual) in the activation dtype (HF adds in the model dtype).
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> add_packs(const Pack<T, V>& x, const Pack<T, V>& residual) {
  Pack<T, V> s;
#pragma unroll
  for (int e = 0; e < V; ++e) s.v[e] = from_float<T>(to_float(x.v[e]) + to_float(residual.v[e]));
  return s;
}

__device__ __forceinline__ float inv_rms(float sum_sq, int hidden, float eps) {
  return rsqrtf(sum_sq / static_cast<float>(hidden) + eps);
}

// Second pass of both kernels: dst = normalize(row) * weight. The first CACHE packs of the thread
// come from registers (`cache`, and `w_cache` when PREFETCH_W); tail packs are re-read from `src`.
template <typename T, int V, int CACHE, bool PREFETCH_W>
__device__ __forceinline__ void store_normalized(T* dst,                     // [H] output row
                                                 const T* src,               // [H] normalized input row
                                                 const Pack<T, V> (&cache)[CACHE],
                                                 const Pack<T, V> (&w_cache)[PREFETCH_W ? CACHE : 1],
                                                 const T* __restrict__ weight,  // [H]
                                                 float inv, int packs, bool unit_offset) {
#pragma unroll
  for (int c = 0; c < CACHE; ++c) {
    const int i = threadIdx.x + c * blockDim.x;
    if (i < packs) {
      Pack<T, V> w;
      if constexpr (PREFETCH_W) {
        w = w_cache[c];
      } else {
        w = load_pack<T, V>(weight + i * V);
      }
      store_pack(dst + i * V, normalize(cache[c], w, inv, unit_offset));
    }
  }
  for (int i = CACHE * blockDim.x + threadIdx.x; i < packs; i += blockDim.x) {
    const Pack<T, V> w = load_pack<T, V>(weight + i * V);
    store_pack(dst + i * V, normalize(load_pack<T, V>(src + i * V), w, inv, unit_offset));
  }
}

// Thread t owns packs t, t + blockDim, t + 2 blockDim, ...; the first CACHE of them stay in
// registers between the two passes, later ones (the "tail", only for very wide rows) are re-read.
// PREFETCH_W (decode): the weight packs are loaded with x, so the block waits on memory once
// instead of twice; for prefill the weight is L2-resident and its registers are better spent on
// more resident rows. (1024, 1) launch bounds: blocks of up to 1024 threads must fit.
// out and x are not __restrict__: out may be x itself (in place); each thread only stores packs
// it has already read.
template <typename T, int V, int CACHE, bool PREFETCH_W>
__global__ void __launch_bounds__(1024, 1)
    rms_norm_kernel(T* out,                        // [N, H], row stride out_stride
                    const T* x,                    // [N, H], row stride x_stride
                    const T* __restrict__ weight,  // [H]
                    int64_t out_stride, int64_t x_stride, int hidden, float eps,
                    bool unit_offset) {
  const int64_t row = blockIdx.x;
  const T* x_row = x + row * x_stride;
  T* out_row = out + row * out_stride;
  const int packs = hidden / V;
  const int tail_start = CACHE * blockDim.x;

  Pack<T, V> cache[CACHE];
  Pack<T, V> w_cache[PREFETCH_W ? CACHE : 1];
  float ss = 0.f;
#pragma unroll
  for (int c = 0; c < CACHE; ++c) {
    const int i = threadIdx.x + c * blockDim.x;
    if (i < packs) {
      cache[c] = load_pack<T, V>(x_row + i * V);
      if constexpr (PREFETCH_W) w_cache[c] = load_pack<T, V>(weight + i * V);
      ss += sum_squares(cache[c]);
    }
  }
  for (int i = tail_start + threadIdx.x; i < packs; i += blockDim.x) {
    ss += sum_squares(load_pack<T, V>(x_row + i * V));
  }

  __shared__ float reduce_buf[32];
  const float inv = inv_rms(block_reduce_sum(ss, reduce_buf), hidden, eps);
  store_normalized<T, V, CACHE, PREFETCH_W>(out_row, x_row, cache, w_cache, weight, inv, packs,
                                            unit_offset);
}

// Same structure. x and residual are not __restrict__: a caller may pass one tensor twice, and
// each thread only re-reads elements it wrote itself. All cached loads are issued before the
// residual stores: without __restrict__ the compiler could not hoist a load above a store.
template <typename T, int V, int CACHE, bool PREFETCH_W>
__global__ void __launch_bounds__(1024, 1)
    fused_add_rms_norm_kernel(T* x,                          // [N, H], row stride x_stride
                              T* residual,                   // [N, H], row stride res_stride
                              const T* __restrict__ weight,  // [H]
                              int64_t x_stride, int64_t res_stride, int hidden, float eps,
                              bool unit_offset) {
  const int64_t row = blockIdx.x;
  T* x_row = x + row * x_stride;
  T* res_row = residual + row * res_stride;
  const int packs = hidden / V;
  const int tail_start = CACHE * blockDim.x;

  Pack<T, V> cache[CACHE];
  Pack<T, V> res[CACHE];
  Pack<T, V> w_cache[PREFETCH_W ? CACHE : 1];
#pragma unroll
  for (int c = 0; c < CACHE; ++c) {
    const int i = threadIdx.x + c * blockDim.x;
    if (i < packs) {
      cache[c] = load_pack<T, V>(x_row + i * V);
      res[c] = load_pack<T, V>(res_row + i * V);
      if constexpr (PREFETCH_W) w_cache[c] = load_pack<T, V>(weight + i * V);
    }
  }
  float ss = 0.f;
#pragma unroll
  for (int c = 0; c < CACHE; ++c) {
    const int i = threadIdx.x + c * blockDim.x;
    if (i < packs) {
      cache[c] = add_packs(cache[c], res[c]);
      store_pack(res_row + i * V, cache[c]);
      ss += sum_squares(cache[c]);
    }
  }
  for (int i = tail_start + threadIdx.x; i < packs; i += blockDim.x) {
    const Pack<T, V> sum =
        add_packs(load_pack<T, V>(x_row + i * V), load_pack<T, V>(res_row + i * V));
    store_pack(res_row + i * V, sum);
    ss += sum_squares(sum);
  }

  __shared__ float reduce_buf[32];
  const float inv = inv_rms(block_reduce_sum(ss, reduce_buf), hidden, eps);
  store_normalized<T, V, CACHE, PREFETCH_W>(x_row, res_row, cache, w_cache, weight, inv, packs,
                                            unit_offset);
}

// ---- host side ----------------------------------------------------------------------------------
// Launch policies. Decode (fewer rows than ~2 per SM): the grid cannot fill the GPU, so each row
// is spread over as many threads as it has packs (up to 1024: most loads in flight, one pack per
// thread) and the weight is prefetched. Prefill: kPrefillCache packs per thread in small blocks,
// so many rows are resident per SM and each thread has several loads in flight.
constexpr int64_t kDecodeRows = 256;
constexpr int kDecodeCacheVec = 2;     // covers H <= 2048 packs (bf16 16384, fp32 8192)
constexpr int kDecodeCacheScalar = 4;  // covers H <= 4096
constexpr int kPrefillCache = 4;

int threads_for(int64_t packs, int64_t per_thread) {
  int64_t threads = (packs + per_thread - 1) / per_thread;
  threads = (threads + 31) / 32 * 32;  // block_reduce_sum needs whole warps
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(threads, 32), 1024));
}

// Calls f(V, CACHE, PREFETCH_W) (as integral constants) for the chosen instantiation and gives it
// the block size.
template <typename T, typename F>
void with_policy(bool vec, int64_t rows, int64_t hidden, F&& f) {
  using std::integral_constant;
  constexpr int kV = Vec<T>::N;
  const bool decode = rows < kDecodeRows;
  if (vec && decode) {
    f(integral_constant<int, kV>{}, integral_constant<int, kDecodeCacheVec>{}, std::true_type{},
      threads_for(hidden / kV, 1));
  } else if (vec) {
    f(integral_constant<int, kV>{}, integral_constant<int, kPrefillCache>{}, std::false_type{},
      threads_for(hidden / kV, kPrefillCache));
  } else if (decode) {
    f(integral_constant<int, 1>{}, integral_constant<int, kDecodeCacheScalar>{}, std::true_type{},
      threads_for(hidden, 1));
  } else {
    f(integral_constant<int, 1>{}, integral_constant<int, kPrefillCache>{}, std::false_type{},
      threads_for(hidden, kPrefillCache));
  }
}

// A dimension of size <= 1 is never stepped over, so its stride does not matter.
bool stride_ok(const at::Tensor& t, int dim, int v) {
  return t.size(dim) <= 1 || t.stride(dim) % v == 0;
}

void check_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t hidden) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == hidden, name,
              " must have shape [", lk_num(rows), ", ", lk_num(hidden), "], got ", lk_shape(t));
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name, " must have a contiguous last dimension");
}

void check_weight(const at::Tensor& weight, const at::Tensor& x, int64_t hidden) {
  LK_CHECK_CUDA(weight);
  LK_CHECK_SAME_DEVICE(x, weight);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight must have x's dtype ",
              x.scalar_type(), ", got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == hidden, "weight must have shape [",
              lk_num(hidden), "], got ", lk_shape(weight));
  TORCH_CHECK(hidden <= 1 || weight.stride(0) == 1, "weight must be contiguous");
}

void rms_norm(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps,
              bool unit_offset) {
  LK_CHECK_CUDA(x);
  LK_CHECK_CUDA(out);
  LK_CHECK_SAME_DEVICE(x, out);
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [N, H], got ", lk_shape(x));
  const int64_t rows = x.size(0), hidden = x.size(1);
  check_rows(x, "x", rows, hidden);
  check_rows(out, "out", rows, hidden);
  LK_CHECK_CONTIGUOUS(out);
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "out must have x's dtype");
  check_weight(weight, x, hidden);
  // out may be x itself (in place, same layout); any other overlap would race across blocks.
  at::assert_no_partial_overlap(out, x);
  at::assert_no_overlap(out, weight);
  TORCH_CHECK(rows <= INT32_MAX && hidden <= INT32_MAX, "rms_norm: too many rows or columns");
  if (rows == 0 || hidden == 0) return;

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LK_DISPATCH_FLOATING(x.scalar_type(), "rms_norm", [&] {
    using T = scalar_t;
    constexpr int kV = Vec<T>::N;
    const bool vec = hidden % kV == 0 && is_16b_aligned(x.data_ptr()) &&
                     is_16b_aligned(out.data_ptr()) && is_16b_aligned(weight.data_ptr()) &&
                     stride_ok(x, 0, kV) && stride_ok(out, 0, kV);
    with_policy<T>(vec, rows, hidden, [&](auto v_tag, auto cache_tag, auto prefetch_tag,
                                          int threads) {
      constexpr int V = decltype(v_tag)::value, CACHE = decltype(cache_tag)::value;
      constexpr bool PREFETCH_W = decltype(prefetch_tag)::value;
      rms_norm_kernel<T, V, CACHE, PREFETCH_W><<<static_cast<unsigned>(rows), threads, 0,
                                                 stream>>>(
          static_cast<T*>(out.data_ptr()), static_cast<const T*>(x.data_ptr()),
          static_cast<const T*>(weight.data_ptr()), out.stride(0), x.stride(0),
          static_cast<int>(hidden), static_cast<float>(eps), unit_offset);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps,
                        bool unit_offset) {
  LK_CHECK_CUDA(x);
  LK_CHECK_CUDA(residual);
  LK_CHECK_SAME_DEVICE(x, residual);
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [N, H], got ", lk_shape(x));
  const int64_t rows = x.size(0), hidden = x.size(1);
  check_rows(x, "x", rows, hidden);
  check_rows(residual, "residual", rows, hidden);
  TORCH_CHECK(residual.scalar_type() == x.scalar_type(), "residual must have x's dtype");
  check_weight(weight, x, hidden);
  // In place: overlapping rows would be read-modify-written by several blocks (x is residual is fine).
  at::assert_no_internal_overlap(x);
  at::assert_no_internal_overlap(residual);
  at::assert_no_partial_overlap(x, residual);
  at::assert_no_overlap(x, weight);
  at::assert_no_overlap(residual, weight);
  TORCH_CHECK(rows <= INT32_MAX && hidden <= INT32_MAX,
              "fused_add_rms_norm: too many rows or columns");
  if (rows == 0 || hidden == 0) return;

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LK_DISPATCH_FLOATING(x.scalar_type(), "fused_add_rms_norm", [&] {
    using T = scalar_t;
    constexpr int kV = Vec<T>::N;
    const bool vec = hidden % kV == 0 && is_16b_aligned(x.data_ptr()) &&
                     is_16b_aligned(residual.data_ptr()) && is_16b_aligned(weight.data_ptr()) &&
                     stride_ok(x, 0, kV) && stride_ok(residual, 0, kV);
    with_policy<T>(vec, rows, hidden, [&](auto v_tag, auto cache_tag, auto prefetch_tag,
                                          int threads) {
      constexpr int V = decltype(v_tag)::value, CACHE = decltype(cache_tag)::value;
      constexpr bool PREFETCH_W = decltype(prefetch_tag)::value;
      fused_add_rms_norm_kernel<T, V, CACHE, PREFETCH_W>
          <<<static_cast<unsigned>(rows), threads, 0, stream>>>(
              static_cast<T*>(x.data_ptr()), static_cast<T*>(residual.data_ptr()),
              static_cast<const T*>(weight.data_ptr()), x.stride(0), residual.stride(0),
              static_cast<int>(hidden), static_cast<float>(eps), unit_offset);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace
}  // namespace llmkernels

TORCH_LIBRARY_IMPL(llmkernels, CUDA, m) {
  m.impl("rms_norm", &llmkernels::rms_norm);
  m.impl("fused_add_rms_norm", &llmkernels::fused_add_rms_norm);
}
