// Gated MLP activations with HF's rounding in the activation dtype:
//   out[n, i] = round(round(act(gate)) * up),  gate = x[n, i], up = x[n, I + i],
// act = silu (SwiGLU, Llama): g / (1 + exp(-g)), or gelu_tanh (GeGLU, Gemma):
// 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3))), both in fp32 with torch's CUDA op order.
//
// Grid: blockIdx.x = row, blockIdx.y = chunk of the row, so no thread divides an index by I
// (the kernel is memory-bound and an integer division per element would cost as much as the
// math). 16-byte vectors when the host finds pointers, row strides and I aligned; scalars
// otherwise.

#include <algorithm>
#include <type_traits>

#include <ATen/MemoryOverlap.h>

#include "common.cuh"

namespace llmkernels {
namespace {

enum class Act { kSilu, kGeluTanh };

template <Act ACT>
__device__ __forceinline__ float activation(float g) {
  if constexpr (ACT == Act::kSilu) {
    return g / (1.f + expf(-g));
  } else {
    constexpr float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
    constexpr float kKappa = 0.044715f;
    const float inner = kBeta * (g + kKappa * (g * g * g));
    return 0.5f * g * (1.f + tanhf(inner));
  }
}

template <typename T, int V, Act ACT>
__global__ void gated_activation_kernel(T* __restrict__ out,      // [N, I], row stride out_stride
                                        const T* __restrict__ x,  // [N, 2I] gate | up, x_stride
                                        int64_t out_stride, int64_t x_stride, int inter) {
  const int64_t row = blockIdx.x;
  const T* gate = x + row * x_stride;
  const T* up = gate + inter;
  T* out_row = out + row * out_stride;
  const int packs = inter / V;
  for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < packs; i += gridDim.y * blockDim.x) {
    const Pack<T, V> g = load_pack<T, V>(gate + i * V);
    const Pack<T, V> u = load_pack<T, V>(up + i * V);
    Pack<T, V> o;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float gf = to_float(g.v[e]);
      const float act = to_float(from_float<T>(activation<ACT>(gf)));
      o.v[e] = from_float<T>(act * to_float(u.v[e]));
    }
    store_pack(out_row + i * V, o);
  }
}

// A dimension of size <= 1 is never stepped over, so its stride does not matter.
bool stride_ok(const at::Tensor& t, int dim, int v) {
  return t.size(dim) <= 1 || t.stride(dim) % v == 0;
}

template <Act ACT>
void gated_activation(at::Tensor& out, const at::Tensor& x, const char* name) {
  LK_CHECK_CUDA(x);
  LK_CHECK_CUDA(out);
  LK_CHECK_SAME_DEVICE(x, out);
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "x must be 2-D [N, 2I], got ", lk_shape(x));
  const int64_t rows = x.size(0), inter = x.size(1) / 2;
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "x must have a contiguous last dimension");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == rows && out.size(1) == inter,
              "out must have shape [", lk_num(rows), ", ", lk_num(inter), "], got ",
              lk_shape(out));
  LK_CHECK_CONTIGUOUS(out);
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "out must have x's dtype");
  // out [N, I] cannot be x [N, 2I] in place: any overlap races across threads.
  at::assert_no_overlap(out, x);
  TORCH_CHECK(rows <= INT32_MAX && inter <= INT32_MAX, name, ": too many rows or columns");
  if (rows == 0 || inter == 0) return;

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LK_DISPATCH_FLOATING(x.scalar_type(), name, [&] {
    using T = scalar_t;
    constexpr int kV = Vec<T>::N;
    const bool vec = inter % kV == 0 && is_16b_aligned(x.data_ptr()) &&
                     is_16b_aligned(out.data_ptr()) && stride_ok(x, 0, kV) && stride_ok(out, 0, kV);
    auto launch = [&](auto v_tag) {
      constexpr int V = decltype(v_tag)::value;
      const int64_t packs = inter / V;
      // 256 threads per block, halved (down to 64) while the grid would leave SMs idle (decode).
      int threads = 256;
      while (threads > 64 && rows * ((packs + threads - 1) / threads) < 264) threads /= 2;
      threads = static_cast<int>(std::min<int64_t>(threads, (packs + 31) / 32 * 32));
      const int64_t chunks = std::min<int64_t>((packs + threads - 1) / threads, 65535);
      const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(chunks));
      gated_activation_kernel<T, V, ACT><<<grid, threads, 0, stream>>>(
          static_cast<T*>(out.data_ptr()), static_cast<const T*>(x.data_ptr()), out.stride(0),
          x.stride(0), static_cast<int>(inter));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) {
      launch(std::integral_constant<int, kV>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
}

void silu_and_mul(at::Tensor& out, const at::Tensor& x) {
  gated_activation<Act::kSilu>(out, x, "silu_and_mul");
}

void gelu_tanh_and_mul(at::Tensor& out, const at::Tensor& x) {
  gated_activation<Act::kGeluTanh>(out, x, "gelu_tanh_and_mul");
}

}  // namespace
}  // namespace llmkernels

TORCH_LIBRARY_IMPL(llmkernels, CUDA, m) {
  m.impl("silu_and_mul", &llmkernels::silu_and_mul);
  m.impl("gelu_tanh_and_mul", &llmkernels::gelu_tanh_and_mul);
}
