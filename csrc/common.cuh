// Shared helpers for every kernel family: dtype dispatch (fp32/fp16/bf16), 16-byte vectors,
// warp/block reductions, argument checks. Slim includes only (no torch/extension.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

namespace llmkernels {

// ---- dtype dispatch: binds `scalar_t` to the CUDA-native element type -------------------------
#define LK_DISPATCH_FLOATING(DTYPE, NAME, ...)                                          \
  [&] {                                                                                 \
    switch (DTYPE) {                                                                    \
      case at::ScalarType::Float: {                                                     \
        using scalar_t = float;                                                         \
        return __VA_ARGS__();                                                           \
      }                                                                                 \
      case at::ScalarType::Half: {                                                      \
        using scalar_t = __half;                                                        \
        return __VA_ARGS__();                                                           \
      }                                                                                 \
      case at::ScalarType::BFloat16: {                                                  \
        using scalar_t = __nv_bfloat16;                                                 \
        return __VA_ARGS__();                                                           \
      }                                                                                 \
      default:                                                                          \
        TORCH_CHECK(false, NAME, ": unsupported dtype ", DTYPE,                         \
                    " (expected float32, float16 or bfloat16)");                        \
    }                                                                                   \
  }()

// fp16/bf16 only (e.g. KV caches).
#define LK_DISPATCH_HALF(DTYPE, NAME, ...)                                              \
  [&] {                                                                                 \
    switch (DTYPE) {                                                                    \
      case at::ScalarType::Half: {                                                      \
        using scalar_t = __half;                                                        \
        return __VA_ARGS__();                                                           \
      }                                                                                 \
      case at::ScalarType::BFloat16: {                                                  \
        using scalar_t = __nv_bfloat16;                                                 \
        return __VA_ARGS__();                                                           \
      }                                                                                 \
      default:                                                                          \
        TORCH_CHECK(false, NAME, ": unsupported dtype ", DTYPE,                         \
                    " (expected float16 or bfloat16)");                                 \
    }                                                                                   \
  }()

// ---- scalar conversions -------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ---- 16-byte vectors ----------------------------------------------------------------------------
// Vec<T>::N elements of T packed in 16 bytes, loaded/stored with one instruction.
template <typename T>
struct alignas(16) Vec {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

template <typename T>
__device__ __forceinline__ Vec<T> load_vec(const T* ptr) {  // ptr 16-byte aligned
  Vec<T> out;
  *reinterpret_cast<uint4*>(&out) = *reinterpret_cast<const uint4*>(ptr);
  return out;
}

template <typename T>
__device__ __forceinline__ void store_vec(T* ptr, const Vec<T>& val) {  // ptr 16-byte aligned
  *reinterpret_cast<uint4*>(ptr) = *reinterpret_cast<const uint4*>(&val);
}

// V elements of T moved as one access: a 16-byte vector (V = Vec<T>::N) or one scalar (V = 1).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* ptr) {
  Pack<T, V> out;
  if constexpr (sizeof(T) * V == 16) {
    *reinterpret_cast<uint4*>(&out) = *reinterpret_cast<const uint4*>(ptr);
  } else {
    out = *reinterpret_cast<const Pack<T, V>*>(ptr);
  }
  return out;
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* ptr, const Pack<T, V>& val) {
  if constexpr (sizeof(T) * V == 16) {
    *reinterpret_cast<uint4*>(ptr) = *reinterpret_cast<const uint4*>(&val);
  } else {
    *reinterpret_cast<Pack<T, V>*>(ptr) = val;
  }
}

// True when a pointer can be used for 16-byte vector access.
inline bool is_16b_aligned(const void* ptr) {
  return (reinterpret_cast<std::uintptr_t>(ptr) & 15) == 0;
}

// ---- reductions ---------------------------------------------------------------------------------
__device__ __forceinline__ float warp_reduce_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffff, x, offset);
  return x;
}

__device__ __forceinline__ float warp_reduce_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, offset));
  return x;
}

// Sum over the whole block; every thread gets the result. blockDim.x must be a multiple of 32
// (<= 1024). `shared` holds 32 floats. Contains __syncthreads(): call from all threads.
__device__ __forceinline__ float block_reduce_sum(float x, float* shared) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  x = warp_reduce_sum(x);
  __syncthreads();  // `shared` may still be read by a previous call
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  x = lane < num_warps ? shared[lane] : 0.f;
  return warp_reduce_sum(x);
}

__device__ __forceinline__ float block_reduce_max(float x, float* shared) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  x = warp_reduce_max(x);
  __syncthreads();
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  x = lane < num_warps ? shared[lane] : -INFINITY;
  return warp_reduce_max(x);
}

// ---- argument checks (ops.py validates first; these guard direct torch.ops calls) -------------
#define LK_CHECK_CUDA(t) TORCH_CHECK((t).is_cuda(), #t " must be a CUDA tensor")
#define LK_CHECK_LAST_DIM_CONTIGUOUS(t) \
  TORCH_CHECK((t).stride(-1) == 1, #t " must have a contiguous last dimension (stride 1)")
#define LK_CHECK_CONTIGUOUS(t) TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")
#define LK_CHECK_DTYPE(t, dt) \
  TORCH_CHECK((t).scalar_type() == (dt), #t " must have dtype " #dt ", got ", (t).scalar_type())
#define LK_CHECK_SAME_DEVICE(a, b) \
  TORCH_CHECK((a).device() == (b).device(), #a " and " #b " must be on the same device")

// Numbers and shapes in these messages go through std::to_string, never an std::ostream: on the
// H200 (torch 2.11, its nvcc 13 and g++) every check here that streamed an integer segfaulted
// instead of raising, while messages of strings and dtypes raised (two runs, 2026-11-29/30; the
// cause, most likely the stream's numeric locale facet in this library, is not pinned down).
inline std::string lk_num(int64_t value) { return std::to_string(value); }
inline std::string lk_shape(const at::Tensor& t) {
  std::string text = "[";
  for (int64_t d = 0; d < t.dim(); ++d) text += (d ? ", " : "") + std::to_string(t.size(d));
  return text + "]";
}

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace llmkernels
