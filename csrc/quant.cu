// Weight-only int8 and int4 matmuls for decode (W8A16, W4A16).
//
// int8, one scale per output feature:
//   out[m, n] = round((sum_k x[m, k] * q[n, k]) * scale[n]),  the sum in fp32,
// x [M, K] fp16/bf16 with M <= 8 (the decode batch), q [N, K] int8, scale [N] fp32.
//
// Decode reads every weight byte once per step, so this is a GEMV bound by the weight's bytes.
// A warp owns R output features; per step each lane reads 16 weights of each (one 16-byte load)
// and the 16 matching activations of every row of x (two 16-byte loads; x is small and stays in
// L1), and the warp sums its lanes at the end. R > 1 reuses each activation load for R
// features: at M > 2 the activations' traffic (2 bytes per element per row, from L1) would
// otherwise outgrow the weight's (1 byte from HBM). At M = 8 the 8 FMAs per weight byte, not
// memory, likely bound it (a tensor-core path would lift that). Weights become floats without a
// conversion instruction (I2F issues at a quarter of the FMA rate on sm_80/sm_90): a byte biased
// by 128 is placed in the mantissa of 2^23 and the bias subtracted, exactly.
//
// ATen's CUDA _weight_int8pack_mm decoded 12x slower than bf16 on an H200 (Llama-2-7B shape),
// hence this kernel. Prefill (M > 8) does not come here: llmkernels/quant.py runs one dense
// GEMM on the weight converted to bf16.

// int4, groups of G inputs with a scale and a zero each (llmkernels.quant's int4 layout):
//   out[m, n] = round(sum_k x[m, k] * ((q[n, k] - 8) * s[n, k / G] + z[n, k / G])),  fp32 sum,
// q [N, K / 2] uint8 (input 2j in the high nibble of byte j, 2j + 1 in the low one), s and z
// bf16 pairs [N, K / G, 2]. The same GEMV, 32 codes (16 bytes) per lane per step, each step
// inside one group (G is a multiple of 32). A code becomes the float 1 + q / 16 with one byte
// permute (0x3F, 0x80 | q << 3, 0, 0), so its weight is one FMA: 16 s (1 + q / 16) + (z - 24 s).
// ATen's CUDA int4 (tinygemm) decoded Llama-2-7B at 39% of copy bandwidth on an H200, slower
// than int8_linear (59%) though it reads 0.6x the bytes: hence this kernel. Prefill still runs
// tinygemm (llmkernels/quant.py).

#include <ATen/MemoryOverlap.h>

#include <type_traits>

#include "common.cuh"

namespace llmkernels {
namespace {

constexpr int kWarps = 8;     // per block
constexpr int kMaxRows = 8;   // rows of x (decode batch) the kernel takes
constexpr int kChunk = 16;    // weights per lane per step: one 16-byte load

// The four signed bytes of `word` as exact floats: (b ^ 0x80) = b + 128 in [0, 255] is put
// in the low mantissa bits of 2^23 (0x4B000000), then 2^23 + 128 is subtracted.
__device__ __forceinline__ void int8x4_to_float(uint32_t word, float* out) {
  const uint32_t biased = word ^ 0x80808080u;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    // result bytes: biased byte j, 0x00, 0x00, 0x4B (selector nibbles j, 4, 5, 7)
    const uint32_t bits = __byte_perm(biased, 0x4B000000u, 0x7540u | j);
    out[j] = __uint_as_float(bits) - 8388736.f;  // 2^23 + 128
  }
}

// The warp's sums of each lane's partial dot products: out[row, first + r], times
// scale[first + r] when a scale is given (int8), for the rows of x and the features below N.
template <typename T, int MAX_M, int R>
__device__ __forceinline__ void store_sums(const float (&acc)[MAX_M][R], T* __restrict__ out,
                                           int64_t out_stride, int m, int n, int64_t first,
                                           int lane, const float* __restrict__ scale) {
#pragma unroll
  for (int row = 0; row < MAX_M; ++row) {
    if (row >= m) break;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float sum = warp_reduce_sum(acc[row][r]);
      if (lane == 0 && first + r < n) {
        const float value = scale != nullptr ? sum * scale[first + r] : sum;
        out[row * out_stride + first + r] = from_float<T>(value);
      }
    }
  }
}

template <typename T, int MAX_M, int R>
__global__ __launch_bounds__(kWarps * 32) void int8_linear_kernel(
    T* __restrict__ out,                // [M, N], row stride out_stride
    const T* __restrict__ x,            // [M, K], row stride x_stride
    const int8_t* __restrict__ weight,  // [N, K], contiguous rows
    const float* __restrict__ scale,    // [N]
    int64_t out_stride, int64_t x_stride, int m, int n, int k) {
  const int lane = threadIdx.x % 32;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32) * R;
  if (first >= n) return;  // whole warps only: the shuffles below need every lane

  float acc[MAX_M][R];
#pragma unroll
  for (int row = 0; row < MAX_M; ++row) {
#pragma unroll
    for (int r = 0; r < R; ++r) acc[row][r] = 0.f;
  }

  // Several steps' weight loads in flight per lane: four at R = 1, two at R = 2 (R = 4 has
  // four per step already). Not yet tuned on a GPU.
  constexpr int kUnroll = R == 1 ? 4 : (R == 2 ? 2 : 1);
#pragma unroll kUnroll
  for (int base = lane * kChunk; base < k; base += 32 * kChunk) {
    float w[R][kChunk];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      uint4 raw = make_uint4(0u, 0u, 0u, 0u);  // a feature past N adds zeros, never stored
      if (first + r < n) raw = *reinterpret_cast<const uint4*>(weight + (first + r) * k + base);
      int8x4_to_float(raw.x, w[r]);
      int8x4_to_float(raw.y, w[r] + 4);
      int8x4_to_float(raw.z, w[r] + 8);
      int8x4_to_float(raw.w, w[r] + 12);
    }
#pragma unroll
    for (int row = 0; row < MAX_M; ++row) {
      if (row >= m) break;
      const T* x_row = x + row * x_stride + base;
      const Vec<T> lo = load_vec(x_row), hi = load_vec(x_row + Vec<T>::N);
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        const float xv = to_float(j < Vec<T>::N ? lo.v[j] : hi.v[j - Vec<T>::N]);
#pragma unroll
        for (int r = 0; r < R; ++r) acc[row][r] = fmaf(xv, w[r][j], acc[row][r]);
      }
    }
  }

  store_sums(acc, out, out_stride, m, n, first, lane, scale);
}

// Calls launch(MAX_M tag, R tag) with the rows of x rounded up to 1, 2, 4 or 8 and R output
// features per warp: R > 1 only where the activation loads would dominate (M > 2), and only as
// far as the grid keeps about two blocks per SM of a 132-SM GPU (N = 8192 at R = 4: 256
// blocks). The policy of both GEMVs; not yet tuned on a GPU.
template <typename Launch>
void launch_for_rows(int64_t m, int64_t n, Launch&& launch) {
  auto with_features = [&](auto max_m_tag) {
    if (m > 2 && n >= 8192) {
      launch(max_m_tag, std::integral_constant<int, 4>{});
    } else if (m > 2 && n >= 4096) {
      launch(max_m_tag, std::integral_constant<int, 2>{});
    } else {
      launch(max_m_tag, std::integral_constant<int, 1>{});
    }
  };
  if (m == 1) {
    launch(std::integral_constant<int, 1>{}, std::integral_constant<int, 1>{});
  } else if (m == 2) {
    launch(std::integral_constant<int, 2>{}, std::integral_constant<int, 1>{});
  } else if (m <= 4) {
    with_features(std::integral_constant<int, 4>{});
  } else {
    with_features(std::integral_constant<int, 8>{});
  }
}

// What int8_linear and int4_linear ask alike of out [M, N], x [M, K] and weight [N, *]: CUDA
// tensors on one device; x fp16/bf16, at most kMaxRows rows (decode), a contiguous last dimension
// and a row stride that keeps its 16-byte loads aligned; out of x's dtype with a contiguous last
// dimension, overlapping nothing. name: the op's; weight_shape: weight's expected shape (messages).
void check_gemv_operands(const char* name, const at::Tensor& out, const at::Tensor& x,
                         const at::Tensor& weight, const char* weight_shape) {
  LK_CHECK_CUDA(x);
  LK_CHECK_CUDA(out);
  LK_CHECK_CUDA(weight);
  LK_CHECK_SAME_DEVICE(x, out);
  LK_CHECK_SAME_DEVICE(x, weight);
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, name,
              ": x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, name, ": x must be 2-D [M, K], got ", lk_shape(x));
  TORCH_CHECK(weight.dim() == 2, name, ": weight must be 2-D ", weight_shape, ", got ",
              lk_shape(weight));
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK(m <= kMaxRows, name, ": x may have at most ", lk_num(kMaxRows), " rows (decode), got ",
              lk_num(m));
  TORCH_CHECK(out.dim() == 2 && out.size(0) == m && out.size(1) == n, name, ": out must be [",
              lk_num(m), ", ", lk_num(n), "], got ", lk_shape(out));
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), name, ": out must have x's dtype");
  TORCH_CHECK(n <= 1 || out.stride(1) == 1, name, ": out must have a contiguous last dimension");
  TORCH_CHECK(k <= 1 || x.stride(1) == 1, name, ": x must have a contiguous last dimension");
  TORCH_CHECK(m <= 1 || x.stride(0) % 8 == 0, name, ": x's row stride must be a multiple of 8");
  at::assert_no_internal_overlap(out);
  at::assert_no_overlap(out, x);
  at::assert_no_overlap(out, weight);
}

void int8_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                 const at::Tensor& scale) {
  check_gemv_operands("int8_linear", out, x, weight, "[N, K]");
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  LK_CHECK_DTYPE(weight, at::kChar);
  TORCH_CHECK(weight.size(1) == k, "int8_linear: weight must be [N, ", lk_num(k), "], got ",
              lk_shape(weight));
  LK_CHECK_CONTIGUOUS(weight);
  LK_CHECK_CUDA(scale);
  LK_CHECK_SAME_DEVICE(x, scale);
  LK_CHECK_DTYPE(scale, at::kFloat);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == n, "int8_linear: scale must be [",
              lk_num(n), "], got ", lk_shape(scale));
  LK_CHECK_CONTIGUOUS(scale);
  at::assert_no_overlap(out, scale);
  // 16-byte loads of 16 weights and 2 x 8 activations per lane.
  TORCH_CHECK(k % kChunk == 0, "int8_linear: K must be a multiple of ", lk_num(kChunk), ", got ",
              lk_num(k));
  // The K loop steps by 32 lanes x 16 in int.
  TORCH_CHECK(n <= INT32_MAX && k <= INT32_MAX - 32 * kChunk, "int8_linear: N or K too large");
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum
    out.zero_();
    return;
  }
  TORCH_CHECK(is_16b_aligned(x.data_ptr()) && is_16b_aligned(weight.data_ptr()),
              "int8_linear: x and weight must be 16-byte aligned");

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LK_DISPATCH_HALF(x.scalar_type(), "int8_linear", [&] {
    using T = scalar_t;
    auto launch = [&](auto max_m_tag, auto r_tag) {
      constexpr int MAX_M = decltype(max_m_tag)::value, R = decltype(r_tag)::value;
      const int64_t features_per_block = int64_t{kWarps} * R;
      const auto blocks = static_cast<unsigned>((n + features_per_block - 1) / features_per_block);
      int8_linear_kernel<T, MAX_M, R><<<blocks, kWarps * 32, 0, stream>>>(
          static_cast<T*>(out.data_ptr()), static_cast<const T*>(x.data_ptr()),
          static_cast<const int8_t*>(weight.data_ptr()), static_cast<const float*>(scale.data_ptr()),
          out.stride(0), x.stride(0), static_cast<int>(m), static_cast<int>(n),
          static_cast<int>(k));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    launch_for_rows(m, n, launch);
  });
}

// The four bytes of `word` as 1 + q / 16, q in [0, 15], each byte given as 0x80 | q << 3: byte
// j of `word` lands in bits 16-23 of a float whose top byte is 0x3F (selector 7, j, 4, 4).
__device__ __forceinline__ float nibble_float(uint32_t word, int j) {
  return __uint_as_float(__byte_perm(word, 0x3F000000u, 0x7044u | (j << 8)));
}

template <typename T, int MAX_M, int R>
__global__ __launch_bounds__(kWarps * 32) void int4_linear_kernel(
    T* __restrict__ out,                        // [M, N], row stride out_stride
    const T* __restrict__ x,                    // [M, K], row stride x_stride
    const uint8_t* __restrict__ weight,         // [N, K / 2], contiguous rows
    const uint32_t* __restrict__ scale_zero,    // [N, K / G]: bf16 scale (low half), zero (high)
    int64_t out_stride, int64_t x_stride, int m, int n, int k, int groups,
    int group_shift) {  // log2 of the group size when a power of two, else -1
  constexpr int kCodes = 32;  // per lane per step: one 16-byte load of each feature's codes
  const int lane = threadIdx.x % 32;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32) * R;
  if (first >= n) return;  // whole warps only: the shuffles below need every lane
  const int group_size = k / groups;

  float acc[MAX_M][R];
#pragma unroll
  for (int row = 0; row < MAX_M; ++row) {
#pragma unroll
    for (int r = 0; r < R; ++r) acc[row][r] = 0.f;
  }

  constexpr int kUnroll = R == 1 ? 4 : (R == 2 ? 2 : 1);  // as int8_linear; not yet tuned
#pragma unroll kUnroll
  for (int base = lane * kCodes; base < k; base += 32 * kCodes) {
    uint4 raw[R];
    float step_scale[R], step_offset[R];  // code q weighs step_scale * (1 + q / 16) + step_offset
#pragma unroll
    for (int r = 0; r < R; ++r) {
      raw[r] = make_uint4(0u, 0u, 0u, 0u);  // a feature past N adds zeros, never stored
      uint32_t sz = 0u;
      if (first + r < n) {
        raw[r] = *reinterpret_cast<const uint4*>(weight + (first + r) * (k / 2) + base / 2);
        // a shift, not an integer division (~20 instructions), for the usual group sizes
        const int group = group_shift >= 0 ? base >> group_shift : base / group_size;
        sz = scale_zero[(first + r) * groups + group];
      }
      const float scale = __uint_as_float(sz << 16), zero = __uint_as_float(sz & 0xFFFF0000u);
      step_scale[r] = 16.f * scale;
      step_offset[r] = zero - 24.f * scale;
    }
#pragma unroll
    for (int word = 0; word < 4; ++word) {
      // 8 codes: inputs base + 8 word + 2 j (high nibbles) and + 1 (low nibbles), j = 0..3
      float w[R][8];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint32_t bits =
            word == 0 ? raw[r].x : (word == 1 ? raw[r].y : (word == 2 ? raw[r].z : raw[r].w));
        const uint32_t even = ((bits >> 1) & 0x78787878u) | 0x80808080u;
        const uint32_t odd = ((bits << 3) & 0x78787878u) | 0x80808080u;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          w[r][2 * j] = fmaf(nibble_float(even, j), step_scale[r], step_offset[r]);
          w[r][2 * j + 1] = fmaf(nibble_float(odd, j), step_scale[r], step_offset[r]);
        }
      }
#pragma unroll
      for (int row = 0; row < MAX_M; ++row) {
        if (row >= m) break;
        const Vec<T> xs = load_vec(x + row * x_stride + base + 8 * word);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float xv = to_float(xs.v[j]);
#pragma unroll
          for (int r = 0; r < R; ++r) acc[row][r] = fmaf(xv, w[r][j], acc[row][r]);
        }
      }
    }
  }

  store_sums(acc, out, out_stride, m, n, first, lane, nullptr);
}

void int4_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
                 const at::Tensor& scale_zero) {
  check_gemv_operands("int4_linear", out, x, weight, "[N, K / 2]");
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  LK_CHECK_DTYPE(weight, at::kByte);
  TORCH_CHECK(k % 32 == 0, "int4_linear: K must be a multiple of 32, got ", lk_num(k));
  TORCH_CHECK(weight.size(1) * 2 == k, "int4_linear: weight must be [N, ", lk_num(k / 2),
              "] (two codes per byte), got ", lk_shape(weight));
  LK_CHECK_CONTIGUOUS(weight);
  LK_CHECK_CUDA(scale_zero);
  LK_CHECK_SAME_DEVICE(x, scale_zero);
  LK_CHECK_DTYPE(scale_zero, at::kBFloat16);
  TORCH_CHECK(scale_zero.dim() == 3 && scale_zero.size(0) == n && scale_zero.size(2) == 2,
              "int4_linear: scale_zero must be [", lk_num(n), ", K / group_size, 2], got ",
              lk_shape(scale_zero));
  const int64_t groups = scale_zero.size(1);
  TORCH_CHECK(groups > 0 && k % groups == 0, "int4_linear: K (", lk_num(k),
              ") must be a whole number of groups, got ", lk_num(groups), " groups");
  // Each lane's 32 codes must sit in one group.
  const int64_t group_size = k / groups;
  TORCH_CHECK(group_size % 32 == 0, "int4_linear: the group size K / scale_zero.size(1) must be a ",
              "multiple of 32, got ", lk_num(group_size));
  int group_shift = 0;
  while ((int64_t{1} << group_shift) < group_size) ++group_shift;
  if ((int64_t{1} << group_shift) != group_size) group_shift = -1;  // not a power of two
  LK_CHECK_CONTIGUOUS(scale_zero);
  at::assert_no_overlap(out, scale_zero);
  // The K loop steps by 32 lanes x 32 in int.
  TORCH_CHECK(n <= INT32_MAX && k <= INT32_MAX - 32 * 32, "int4_linear: N or K too large");
  if (m == 0 || n == 0) return;
  TORCH_CHECK(is_16b_aligned(x.data_ptr()) && is_16b_aligned(weight.data_ptr()) &&
                  reinterpret_cast<uintptr_t>(scale_zero.data_ptr()) % 4 == 0,
              "int4_linear: x and weight must be 16-byte aligned, scale_zero 4-byte aligned");

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LK_DISPATCH_HALF(x.scalar_type(), "int4_linear", [&] {
    using T = scalar_t;
    auto launch = [&](auto max_m_tag, auto r_tag) {
      constexpr int MAX_M = decltype(max_m_tag)::value, R = decltype(r_tag)::value;
      const int64_t features_per_block = int64_t{kWarps} * R;
      const auto blocks = static_cast<unsigned>((n + features_per_block - 1) / features_per_block);
      int4_linear_kernel<T, MAX_M, R><<<blocks, kWarps * 32, 0, stream>>>(
          static_cast<T*>(out.data_ptr()), static_cast<const T*>(x.data_ptr()),
          static_cast<const uint8_t*>(weight.data_ptr()),
          static_cast<const uint32_t*>(scale_zero.data_ptr()), out.stride(0), x.stride(0),
          static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
          static_cast<int>(groups), group_shift);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    launch_for_rows(m, n, launch);
  });
}

}  // namespace
}  // namespace llmkernels

TORCH_LIBRARY_IMPL(llmkernels, CUDA, m) {
  m.impl("int8_linear", &llmkernels::int8_linear);
  m.impl("int4_linear", &llmkernels::int4_linear);
}
