// KV-cache decode attention (GQA, split-K "flash-decoding") and the cache-append kernel.
//
// decode_attention: one new query token per sequence against a static cache [B', Hk, S, D].
//
//   Work split. One block (4 warps) per (batch row b, kv head g, split j), and the block handles
//   all G = Hq / Hk query heads of kv head g (up to 16; larger groups are cut into chunks of 16
//   along grid.y), so each K/V row is read from memory once per group. Split j covers tokens
//   [j * chunk, (j + 1) * chunk) with chunk = ceil(len_b / num_splits) rounded up to the block
//   tile. The chunk is computed in the kernel from the device-side seq_lens[b] (grid size depends
//   on shapes only, so graph capture works), which keeps the splits balanced when len_b is far
//   below the capacity S. With a sliding window W the range is [max(0, len_b - W), len_b) instead
//   of [0, len_b): a long context costs W tokens, not len_b. Blocks whose range starts at or
//   beyond len_b write an empty partial (max = -inf, sum = 0) and exit.
//
//   Tiles. Inside a block the 4 warps take 16-token sub-tiles round-robin (a warp step is 16
//   tokens for D = 128, 32 for D = 64, i.e. 8 KB of K + V per warp step, all loads issued before
//   any math). Both products run on tensor cores with mma.sync m16n8k16 (fp32 accumulate):
//     S[16 heads x 8 tokens]  = Q[16 x D] . K^T      (heads padded to 16 rows with zeros)
//     O[16 heads x 8 dims]   += P[16 x 16 tokens] . V
//   The fragments are loaded straight from global memory with 16-byte loads; no shared memory
//   staging. Since a dot product may sum over d in any order and O's columns may be stored in any
//   order, each lane's K row slice and V row slice are chosen so that (a) every 16-byte load is
//   one contiguous vector of a row and every warp-wide load uses whole 32-byte sectors, and (b)
//   the registers feed the mma fragments directly (K words as-is; V halves paired across two
//   tokens with one byte-permute). Q is permuted the same way as K (its fragments are loaded
//   once per block, with 16-byte loads when q's pointer and strides allow, else 16-bit ones, and
//   issued first so their latency overlaps the seq_lens read) and O is un-permuted when written.
//   The C fragment of S has exactly the layout of the A fragment of P, so probabilities never
//   leave registers. 3 blocks per SM (launch bounds): at most 168 registers; D = 128 uses all of
//   them without spilling (benchmarks/results/ptxas.md; CI's resource gate fails on any spill).
//
//   Softmax. Online, in fp32 and in the log2 domain (scores pre-multiplied by scale * log2(e)):
//   per warp and head a running max m and a running sum l; each step rescales the accumulators
//   once. P is fed to the PV product as hi + lo halves in the cache dtype (p = hi + lo, two mmas),
//   so rounding P to 16 bits costs no accuracy: the output's only rounding is the final store.
//   Tokens at or past the range end are masked with -inf by a select (K garbage, even NaN, never
//   reaches the max) and their V registers are zeroed (0 * NaN never reaches the sums).
//
//   Merge. The 4 warps' (m, l, O) are combined in shared memory with their log-sum-exp weights.
//   num_splits == 1: the block writes out directly. Otherwise it writes its normalized partial
//   O / l plus (m, l) into workspace[b, h, j, :D + 2], and a second kernel (one block per (b, h),
//   8 warps over the splits) merges the partials: out = sum_j w_j O_j / sum_j w_j with
//   w_j = l_j * 2^(m_j - max_j m_j). seq_len 0 gives zeros (never NaN).
//
//   Templates: D in {64, 128} (head_dim), scalar type fp16 / bf16 (the mma operand types).
//   Bounds: seq_lens[b] is clamped to [0, S]; every load is guarded by token < range end <= S.
//
//   D = 256 (Gemma 3): a separate SIMT kernel, decode_attention_simt_kernel. The mma kernel does
//   not scale to D = 256: its Q fragments, K/V registers and O accumulators alone would need ~320
//   registers (spills). Same contract, grid scheme, range/split/window arithmetic, masking, warp
//   combine, partial format and merge kernel as above; what differs:
//   - Lane l owns dims [8 l, 8 l + 8): one 16-byte vector per K or V row (a warp load is one whole
//     512-byte row). A warp step takes TOK tokens (K and V loads issued first); q * scale * log2(e)
//     is staged in shared memory as fp32 (in registers as well when ROWS <= 4).
//   - Dot products in fp32 CUDA-core FMAs; the ROWS x TOK = N partial sums per lane are reduced by a
//     "transposed" butterfly (each stage swaps half of the values: N - 1 shuffles, not 5 N), which
//     leaves lane l with the score of index l >> (5 - log2 N) = (token, head); the per-head max/sum
//     over the step's tokens take log2(TOK) more shuffles. p and the rescales go to the other
//     lanes through shared memory; O += p * V in fp32 registers (ROWS x 8 per lane). All fp32.
//   - ROWS (query heads per block) = G rounded up to a power of two, at most 8 (groups above 8 use
//     ceil(G / 8) blocks per kv head, which each read K/V); TOK = 8, or 4 for ROWS = 8, keeps the
//     kernel within the 168-register launch bound without spilling. Gemma 3 (G = 2..4): one block
//     per kv head and split.
//
// kv_cache_append: one block per new token n; slot = slot_mapping[n] (flat b * S + s), skipped
// when outside [0, B * S). Copies Hk rows of D elements of k and v into the caches, with 16-byte
// vectors when D and every pointer/stride allow it, else element by element. A slot given to
// several tokens receives the last of them (highest n), as in the reference: each block first
// looks for its slot among the later tokens (N int64 reads from L2, spread over the block).

#include <algorithm>
#include <limits>

#include <ATen/MemoryOverlap.h>

#include "common.cuh"

namespace llmkernels {
namespace {

constexpr int kWarps = 4;                 // warps per decode-attention block
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 16;                 // query heads per block = mma M
constexpr int kMergeWarps = 8;            // warps per merge block
constexpr int kMaxSplits = 4096;          // merge-kernel shared memory bound (16 KB of weights)
constexpr float kLog2e = 1.4426950408889634f;

// ---- 16-bit pairs <-> fp32 ----------------------------------------------------------------------
template <typename T>
struct Pair;
template <>
struct Pair<__half> {
  using type = __half2;
  static __device__ __forceinline__ type make(float lo, float hi) { return __floats2half2_rn(lo, hi); }
};
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ type make(float lo, float hi) {
    return __floats2bfloat162_rn(lo, hi);
  }
};

template <typename P>
__device__ __forceinline__ uint32_t as_u32(P v) {
  return *reinterpret_cast<uint32_t*>(&v);
}

// Splits (x0, x1) into 16-bit pairs hi + lo with x ~= hi + lo to ~16 mantissa bits.
template <typename T>
__device__ __forceinline__ void split_pair(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  const auto h = Pair<T>::make(x0, x1);
  hi = as_u32(h);
  lo = as_u32(Pair<T>::make(x0 - __low2float(h), x1 - __high2float(h)));
}

// ---- tensor-core mma: c[16x8] += a[16x16] * b[16x8], fp32 accumulate ---------------------------
// Fragments (g = lane / 4, t = lane % 4): a = {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)}
// (row, col pairs); b = {(k 2t..2t+1, n g), (k 2t+8..2t+9, n g)}; c = {(g, 2t), (g, 2t+1),
// (g+8, 2t), (g+8, 2t+1)}. The lower index of a pair sits in the low 16 bits.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                 uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint4 load16(const void* ptr) {  // 16-byte aligned
  return *reinterpret_cast<const uint4*>(ptr);
}

// Element d of this lane's K/Q word list: word w holds d = (w / 4) * 32 + t * 8 + 2 * (w % 4) + {0, 1},
// so the 4 words of one 16-byte vector are one contiguous 8-element piece of the row.
__device__ __forceinline__ int qk_dim(int w, int t) { return (w >> 2) * 32 + t * 8 + (w & 3) * 2; }

// Output dim of PV n-tile jn, column n (0..7): d = (jn / 8) * 64 + n * 8 + jn % 8, so lane group g
// (= column n of the B fragment) reads V[token][(jn / 8) * 64 + g * 8 .. + 8]: one 16-byte vector.
__device__ __forceinline__ int pv_dim(int jn, int n) { return (jn >> 3) * 64 + n * 8 + (jn & 7); }

// ---- shared by the decode kernels -----------------------------------------------------------------
// Split `split`'s token range: [start, end) within [first, len), len = seq_len clamped to [0, S],
// first = len - window (sliding window) or 0; chunks rounded up to the block's token step.
struct SplitRange {
  int start, end;  // start >= end: nothing to do
};

__device__ __forceinline__ SplitRange split_range(int seq_len, int seq_capacity, int window, int split,
                                                  int num_splits, int block_tokens) {
  const int len = min(max(seq_len, 0), seq_capacity);
  const int first = window > 0 ? max(0, len - window) : 0;
  int chunk = (len - first + num_splits - 1) / num_splits;
  chunk = (chunk + block_tokens - 1) / block_tokens * block_tokens;
  const int64_t start = first + static_cast<int64_t>(split) * chunk;
  if (start >= len) return {len, len};
  return {static_cast<int>(start), static_cast<int>(min(start + chunk, static_cast<int64_t>(len)))};
}

// An empty range: zeros (single pass) or an empty partial (max = -inf, sum = 0) for the merge.
template <typename T, int D>
__device__ __forceinline__ void write_empty(T* out,           // [B, Hq, D]
                                            float* workspace,  // [B, Hq, splits, D + 2]
                                            int64_t row0, int rows, int split, int num_splits) {
  if (num_splits == 1) {
    for (int i = threadIdx.x; i < rows * D; i += kThreads) out[row0 * D + i] = from_float<T>(0.f);
  } else {
    for (int r = threadIdx.x; r < rows; r += kThreads) {
      float* part = workspace + ((row0 + r) * num_splits + split) * (D + 2);
      part[D] = -INFINITY;
      part[D + 1] = 0.f;
    }
  }
}

// The 4 warps' (m, l, O) of each of `rows` heads combined with their log-sum-exp weights, written
// to out (single pass) or as this split's normalized partial O / l, m, l. Call after a barrier.
template <typename T, int D, int R, int P>
__device__ __forceinline__ void combine_warps(const float (&s_o)[kWarps][R][P],  // O per warp, head
                                              const float (&s_m)[kWarps][R],     // running max (log2)
                                              const float (&s_l)[kWarps][R],     // running sum
                                              T* out, float* workspace, int64_t row0, int rows,
                                              int split, int num_splits) {
  for (int i = threadIdx.x; i < rows * D; i += kThreads) {
    const int r = i / D, d = i % D;
    float m_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m_max = fmaxf(m_max, s_m[w][r]);
    float sum = 0.f, o = 0.f;
    if (m_max != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float scale_w = exp2f(s_m[w][r] - m_max);  // 0 for a warp that saw no token
        sum += scale_w * s_l[w][r];
        o += scale_w * s_o[w][r][d];
      }
    }
    const float value = sum > 0.f ? o / sum : 0.f;
    if (num_splits == 1) {
      out[row0 * D + i] = from_float<T>(value);
    } else {
      float* part = workspace + ((row0 + r) * num_splits + split) * (D + 2);
      part[d] = value;
      if (d == 0) {
        part[D] = m_max;
        part[D + 1] = sum;
      }
    }
  }
}

// Q_VEC: q rows 16-byte aligned (pointer and strides), so fragments load as 16-byte vectors.
template <typename T, int D, bool Q_VEC>
__global__ void __launch_bounds__(kThreads, 3) decode_attention_kernel(
    T* __restrict__ out,                  // [B, Hq, D] contiguous (num_splits == 1)
    float* __restrict__ workspace,        // [B, Hq, num_splits, D + 2] (num_splits > 1)
    const T* __restrict__ q,              // [B, Hq, D], strides (q_stride_b, q_stride_h, 1)
    const T* __restrict__ k_cache,        // [B', Hk, S, D] contiguous, 16-byte aligned
    const T* __restrict__ v_cache,        // [B', Hk, S, D] contiguous, 16-byte aligned
    const int* __restrict__ seq_lens,     // [B] (stride seq_lens_stride)
    int64_t q_stride_b, int64_t q_stride_h, int64_t seq_lens_stride, int num_q_heads,
    int num_kv_heads, int seq_capacity, int group, int head_chunks, int num_splits,
    float scale_log2, int window) {
  static_assert(D == 64 || D == 128, "head_dim 64 or 128");
  constexpr int NT = D == 64 ? 2 : 1;              // 16-token sub-tiles per warp step
  constexpr int BLOCK_TOKENS = kWarps * 16 * NT;   // tokens per block step (split granularity)
  constexpr int KSTEPS = D / 16;                   // k-steps of Q.K^T
  constexpr int KWORDS = D / 8;                    // 32-bit K (and Q) words per lane per row
  constexpr int VVEC = D / 64;                     // V vectors per lane per token
  constexpr int NTILES = D / 8;                    // n-tiles of P.V (output dims)

  // Row pitch D + 1: the fragment stores below hit 2 banks per warp with a pitch of D (a multiple
  // of 32 floats: 16-way conflicts); with D + 1, 16 banks (2-way, the least this layout allows).
  __shared__ float s_o[kWarps][kRows][D + 1];
  __shared__ float s_m[kWarps][kRows];
  __shared__ float s_l[kWarps][kRows];

  const int split = blockIdx.x;
  const int kv_head = blockIdx.y / head_chunks;
  const int head0 = kv_head * group + (blockIdx.y % head_chunks) * kRows;  // first query head
  const int rows = min(kRows, group - (blockIdx.y % head_chunks) * kRows);  // query heads here
  const int b = blockIdx.z;
  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;

  // Q's A fragments (rows g and g + 8; rows >= `rows` are zero padding), in this lane's K word
  // order. Loaded first, straight from global memory, so their latency overlaps seq_lens'.
  uint32_t qa[KSTEPS][4];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = g + 8 * r;
    const T* q_row = q + b * q_stride_b + (head0 + row) * q_stride_h;
    uint32_t words[KWORDS];
    if constexpr (Q_VEC) {
#pragma unroll
      for (int x = 0; x < KWORDS / 4; ++x) {
        const uint4 v = row < rows ? load16(q_row + x * 32 + t * 8) : make_uint4(0, 0, 0, 0);
        words[4 * x] = v.x;
        words[4 * x + 1] = v.y;
        words[4 * x + 2] = v.z;
        words[4 * x + 3] = v.w;
      }
    } else {
      const uint16_t* q_bits = reinterpret_cast<const uint16_t*>(q_row);
#pragma unroll
      for (int w = 0; w < KWORDS; ++w) {
        const int d = qk_dim(w, t);
        words[w] = row < rows ? static_cast<uint32_t>(q_bits[d]) | (static_cast<uint32_t>(q_bits[d + 1]) << 16)
                              : 0u;
      }
    }
#pragma unroll
    for (int j = 0; j < KSTEPS; ++j) {
      qa[j][r] = words[2 * j];          // a0 / a1: logical k 2t, 2t + 1
      qa[j][2 + r] = words[2 * j + 1];  // a2 / a3: logical k 2t + 8, 2t + 9
    }
  }

  const int64_t row0 = static_cast<int64_t>(b) * num_q_heads + head0;  // (b, head0) row of out/ws
  const SplitRange range =
      split_range(seq_lens[b * seq_lens_stride], seq_capacity, window, split, num_splits, BLOCK_TOKENS);
  if (range.start >= range.end) {  // empty range (also len == 0)
    write_empty<T, D>(out, workspace, row0, rows, split, num_splits);
    return;
  }
  const int start = range.start, end = range.end;

  const int64_t head_offset = (static_cast<int64_t>(b) * num_kv_heads + kv_head) * seq_capacity * D;
  const T* k_head = k_cache + head_offset;
  const T* v_head = v_cache + head_offset;

  float m_run[2] = {-INFINITY, -INFINITY};  // running max of rows g, g + 8 (log2 domain)
  float l_run[2] = {0.f, 0.f};              // this lane's part of the running sums
  float acc[NTILES][4];                     // O fragments, unnormalized
#pragma unroll
  for (int jn = 0; jn < NTILES; ++jn) acc[jn][0] = acc[jn][1] = acc[jn][2] = acc[jn][3] = 0.f;

#pragma unroll 1
  for (int base = start + warp * 16 * NT; base < end; base += BLOCK_TOKENS) {
    // ---- loads: K rows base + 16 st + 8 i + g (this lane's slice), V rows base + 16 st + {2t, 2t+1,
    // 2t+8, 2t+9} (columns g * 8 of each 64); tokens >= end read as zeros.
    uint4 kv[NT][2][KWORDS / 4];
    uint4 vv[NT][4][VVEC];
#pragma unroll
    for (int st = 0; st < NT; ++st) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int tok = base + st * 16 + i * 8 + g;
#pragma unroll
        for (int x = 0; x < KWORDS / 4; ++x)
          kv[st][i][x] = tok < end ? load16(k_head + static_cast<int64_t>(tok) * D + x * 32 + t * 8)
                                   : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int vt = 0; vt < 4; ++vt) {
        const int tok = base + st * 16 + 2 * t + (vt & 1) + (vt >> 1) * 8;
#pragma unroll
        for (int u = 0; u < VVEC; ++u)
          vv[st][vt][u] = tok < end ? load16(v_head + static_cast<int64_t>(tok) * D + u * 64 + g * 8)
                                    : make_uint4(0, 0, 0, 0);
      }
    }

    // ---- scores S = Q.K^T: s[st][i] covers tokens base + 16 st + 8 i + {2t, 2t+1}, rows g / g + 8
    float s[NT][2][4];
#pragma unroll
    for (int st = 0; st < NT; ++st) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        s[st][i][0] = s[st][i][1] = s[st][i][2] = s[st][i][3] = 0.f;
        const uint32_t* kw = reinterpret_cast<const uint32_t*>(kv[st][i]);
#pragma unroll
        for (int j = 0; j < KSTEPS; ++j) mma16816<T>(s[st][i], qa[j], kw[2 * j], kw[2 * j + 1]);
      }
    }

    // ---- online softmax (log2 domain); masked tokens get -inf by select, never arithmetic
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int st = 0; st < NT; ++st) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int tok = base + st * 16 + i * 8 + 2 * t + (e & 1);
          const float x = tok < end ? s[st][i][e] * scale_log2 : -INFINITY;
          s[st][i][e] = x;
          tile_max[e >> 1] = fmaxf(tile_max[e >> 1], x);
        }
      }
    }
    float m_use[2], corr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 2));
      const float m_new = fmaxf(m_run[r], tile_max[r]);
      m_use[r] = m_new == -INFINITY ? 0.f : m_new;  // nothing seen yet: keep exponents finite
      corr[r] = exp2f(m_run[r] - m_use[r]);          // 0 when m_run is -inf
      m_run[r] = m_new;
    }
    float tile_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int st = 0; st < NT; ++st) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float p = exp2f(s[st][i][e] - m_use[e >> 1]);
          s[st][i][e] = p;
          tile_sum[e >> 1] += p;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) l_run[r] = l_run[r] * corr[r] + tile_sum[r];
#pragma unroll
    for (int jn = 0; jn < NTILES; ++jn) {
      acc[jn][0] *= corr[0];
      acc[jn][1] *= corr[0];
      acc[jn][2] *= corr[1];
      acc[jn][3] *= corr[1];
    }

    // ---- O += P.V, P as hi + lo 16-bit halves; S's C fragments are P's A fragment
#pragma unroll
    for (int st = 0; st < NT; ++st) {
      uint32_t ph[4], pl[4];
      split_pair<T>(s[st][0][0], s[st][0][1], ph[0], pl[0]);  // row g,     tokens 2t, 2t+1
      split_pair<T>(s[st][0][2], s[st][0][3], ph[1], pl[1]);  // row g + 8, tokens 2t, 2t+1
      split_pair<T>(s[st][1][0], s[st][1][1], ph[2], pl[2]);  // row g,     tokens 2t+8, 2t+9
      split_pair<T>(s[st][1][2], s[st][1][3], ph[3], pl[3]);  // row g + 8, tokens 2t+8, 2t+9
#pragma unroll
      for (int jn = 0; jn < NTILES; ++jn) {
        const int u = jn >> 3, e = jn & 7;
        const uint32_t* v0 = reinterpret_cast<const uint32_t*>(&vv[st][0][u]);
        const uint32_t* v1 = reinterpret_cast<const uint32_t*>(&vv[st][1][u]);
        const uint32_t* v2 = reinterpret_cast<const uint32_t*>(&vv[st][2][u]);
        const uint32_t* v3 = reinterpret_cast<const uint32_t*>(&vv[st][3][u]);
        const uint32_t sel = (e & 1) ? 0x7632 : 0x5410;  // high or low halves of two words
        const uint32_t b0 = __byte_perm(v0[e >> 1], v1[e >> 1], sel);  // tokens 2t, 2t+1
        const uint32_t b1 = __byte_perm(v2[e >> 1], v3[e >> 1], sel);  // tokens 2t+8, 2t+9
        mma16816<T>(acc[jn], ph, b0, b1);
        mma16816<T>(acc[jn], pl, b0, b1);
      }
    }
  }

  // ---- combine the 4 warps: finish the row sums across the 4 lanes of a row, stage in smem
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] += __shfl_xor_sync(0xffffffff, l_run[r], 1);
    l_run[r] += __shfl_xor_sync(0xffffffff, l_run[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = g + 8 * r;
    if (row < rows) {
      if (t == 0) {
        s_m[warp][row] = m_run[r];
        s_l[warp][row] = l_run[r];
      }
#pragma unroll
      for (int jn = 0; jn < NTILES; ++jn) {
        s_o[warp][row][pv_dim(jn, 2 * t)] = acc[jn][2 * r];
        s_o[warp][row][pv_dim(jn, 2 * t + 1)] = acc[jn][2 * r + 1];
      }
    }
  }
  __syncthreads();

  combine_warps<T, D>(s_o, s_m, s_l, out, workspace, row0, rows, split, num_splits);
}

// ---- head_dim 256: SIMT kernel ------------------------------------------------------------------
// (See the header.) Lane owns dims [8 * lane, 8 * lane + 8) of every row: one 16-byte vector of K
// and of V per token, a whole 512-byte row per warp load. A warp step takes TOK tokens.
constexpr int kWideDim = 256;     // head_dim of the SIMT kernel
constexpr int kWideMaxRows = 8;   // query heads per block at most (larger groups: more blocks)

// Query heads per block for a group of G = Hq / Hk: the next power of two, at most 8.
inline int simt_rows(int64_t group) {
  return group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : kWideMaxRows;
}

// 8 consecutive 16-bit elements (one 16-byte vector) -> fp32.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& v, float (&f)[8]);
template <>
__device__ __forceinline__ void unpack8<__half>(const uint4& v, float (&f)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}
template <>
__device__ __forceinline__ void unpack8<__nv_bfloat16>(const uint4& v, float (&f)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[i]));
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

__device__ __forceinline__ float dot8(const float (&a)[8], const float (&b)[8]) {
  float s = a[0] * b[0];
#pragma unroll
  for (int j = 1; j < 8; ++j) s = fmaf(a[j], b[j], s);
  return s;
}

// N floats from 16-byte aligned shared memory, as float4 / float2 / float loads.
template <int N>
__device__ __forceinline__ void load_shared(const float* src, float (&dst)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const float4 x = *reinterpret_cast<const float4*>(src + i);
      dst[i] = x.x;
      dst[i + 1] = x.y;
      dst[i + 2] = x.z;
      dst[i + 3] = x.w;
    }
  } else if constexpr (N == 2) {
    const float2 x = *reinterpret_cast<const float2*>(src);
    dst[0] = x.x;
    dst[1] = x.y;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = src[i];
  }
}

// Sums v[i] over the warp for all N = 2^LOG_N indices at once: each halving stage swaps half the
// values with the lane `offset` away (31 shuffles for N = 32 instead of 5 * 32). Returns the sum
// for index lane >> (5 - LOG_N); lanes that share an index get bitwise equal sums. (Stages are
// template-recursive so every index is a compile-time constant: v stays in registers.)
template <int HALF, int OFFSET, int N>
__device__ __forceinline__ void transposed_sum_stage(float (&v)[N], int lane) {
  if constexpr (HALF >= 1) {
    const bool upper = (lane & OFFSET) != 0;  // upper keeps v[HALF, 2 HALF), sends v[0, HALF)
#pragma unroll
    for (int i = 0; i < HALF; ++i) {
      const float send = upper ? v[i] : v[i + HALF];
      const float keep = upper ? v[i + HALF] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffff, send, OFFSET);
    }
    transposed_sum_stage<HALF / 2, OFFSET / 2>(v, lane);
  } else {
#pragma unroll
    for (int offset = OFFSET; offset > 0; offset >>= 1) v[0] += __shfl_xor_sync(0xffffffff, v[0], offset);
  }
}

template <int LOG_N>
__device__ __forceinline__ float warp_sum_transposed(float (&v)[1 << LOG_N], int lane) {
  transposed_sum_stage<(1 << LOG_N) / 2, 16>(v, lane);
  return v[0];
}

// ROWS: query heads per block (1, 2, 4 or 8; rows beyond the group's are zero padding).
template <typename T, int ROWS>
__global__ void __launch_bounds__(kThreads, 3) decode_attention_simt_kernel(
    T* __restrict__ out,                  // [B, Hq, 256] contiguous (num_splits == 1)
    float* __restrict__ workspace,        // [B, Hq, num_splits, 256 + 2] (num_splits > 1)
    const T* __restrict__ q,              // [B, Hq, 256], strides (q_stride_b, q_stride_h, 1)
    const T* __restrict__ k_cache,        // [B', Hk, S, 256] contiguous, 16-byte aligned
    const T* __restrict__ v_cache,        // [B', Hk, S, 256] contiguous, 16-byte aligned
    const int* __restrict__ seq_lens,     // [B] (stride seq_lens_stride)
    int64_t q_stride_b, int64_t q_stride_h,  // q's batch / head strides, elements
    int64_t seq_lens_stride,              // seq_lens' stride, elements
    int num_q_heads, int num_kv_heads,    // Hq, Hk
    int seq_capacity,                     // S
    int group, int head_chunks,           // G = Hq / Hk; ceil(G / ROWS) (grid.y = Hk * head_chunks)
    int num_splits,                       // workspace.size(2) (grid.x)
    float scale_log2,                     // scale * log2(e)
    int window,                           // sliding window in tokens (<= S), 0 = none
    bool q_vec) {                         // q's pointer and strides allow 16-byte loads
  constexpr int D = kWideDim;
  static_assert(ROWS == 1 || ROWS == 2 || ROWS == 4 || ROWS == 8, "ROWS 1, 2, 4 or 8");
  constexpr int TOK = ROWS == 8 ? 4 : 8;             // tokens per warp step
  constexpr int LOG_N = ROWS == 1 ? 3 : ROWS == 2 ? 4 : 5;
  constexpr int N = 1 << LOG_N;                      // scores per warp step: index t * ROWS + h
  static_assert(N == TOK * ROWS, "one score per (token, head)");
  constexpr int SHIFT = 5 - LOG_N;                   // lane >> SHIFT: this lane's score index
  constexpr int BLOCK_TOKENS = kWarps * TOK;         // tokens per block step (split granularity)
  constexpr bool Q_REGS = ROWS <= 4;                 // q in registers (else read from s_q)
  constexpr int Q_PIECES = ROWS * D / 8;             // 8-element pieces of the block's q rows
  constexpr int Q_ITERS = (Q_PIECES + kThreads - 1) / kThreads;

  __shared__ __align__(16) float s_q[ROWS][D];        // q * scale * log2(e), zero padded rows
  __shared__ __align__(16) float s_o[kWarps][ROWS][D];
  __shared__ __align__(16) float s_p[kWarps][N];      // this step's probabilities [t][h]
  __shared__ __align__(16) float s_c[kWarps][ROWS];   // this step's accumulator rescales
  __shared__ float s_m[kWarps][ROWS];
  __shared__ float s_l[kWarps][ROWS];

  const int split = blockIdx.x;
  const int kv_head = blockIdx.y / head_chunks;
  const int head0 = kv_head * group + (blockIdx.y % head_chunks) * ROWS;  // first query head
  const int rows = min(ROWS, group - (blockIdx.y % head_chunks) * ROWS);  // query heads here
  const int b = blockIdx.z;
  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;

  // q pieces, loaded first so their latency overlaps seq_lens'; staged in s_q below.
  float qp[Q_ITERS][8];
#pragma unroll
  for (int it = 0; it < Q_ITERS; ++it) {
    const int piece = tid + it * kThreads;
    const int r = piece / (D / 8), c = piece % (D / 8) * 8;
    if (piece < Q_PIECES && r < rows) {
      const T* src = q + b * q_stride_b + (head0 + r) * q_stride_h + c;
      if (q_vec) {
        unpack8<T>(load16(src), qp[it]);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) qp[it][e] = to_float(src[e]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) qp[it][e] = 0.f;
    }
  }

  const int64_t row0 = static_cast<int64_t>(b) * num_q_heads + head0;  // (b, head0) row of out/ws
  const SplitRange range =
      split_range(seq_lens[b * seq_lens_stride], seq_capacity, window, split, num_splits, BLOCK_TOKENS);
  if (range.start >= range.end) {  // empty range (also len == 0)
    write_empty<T, D>(out, workspace, row0, rows, split, num_splits);
    return;
  }
  const int start = range.start, end = range.end;

#pragma unroll
  for (int it = 0; it < Q_ITERS; ++it) {
    const int piece = tid + it * kThreads;
    if (piece < Q_PIECES) {
      float* dst = &s_q[piece / (D / 8)][piece % (D / 8) * 8];
      *reinterpret_cast<float4*>(dst) = make_float4(qp[it][0] * scale_log2, qp[it][1] * scale_log2,
                                                    qp[it][2] * scale_log2, qp[it][3] * scale_log2);
      *reinterpret_cast<float4*>(dst + 4) = make_float4(qp[it][4] * scale_log2, qp[it][5] * scale_log2,
                                                        qp[it][6] * scale_log2, qp[it][7] * scale_log2);
    }
  }
  __syncthreads();

  float qr[Q_REGS ? ROWS : 1][8];  // Q_REGS: this lane's 8 dims of every row
  if constexpr (Q_REGS) {
#pragma unroll
    for (int h = 0; h < ROWS; ++h) load_shared(&s_q[h][lane * 8], qr[h]);
  }

  const int64_t head_offset = (static_cast<int64_t>(b) * num_kv_heads + kv_head) * seq_capacity * D;
  const T* k_head = k_cache + head_offset + lane * 8;
  const T* v_head = v_cache + head_offset + lane * 8;

  // This lane's score index i = t * ROWS + h after the transposed sum: token my_tok, head my_head.
  // m_run / l_run are my_head's (every lane of a head holds the same values).
  const int my_index = lane >> SHIFT;
  const int my_tok = my_index / ROWS, my_head = my_index % ROWS;
  const bool index_owner = (lane & ((1 << SHIFT) - 1)) == 0;  // one lane per score index
  float m_run = -INFINITY;  // running max (log2 domain)
  float l_run = 0.f;        // running sum
  float acc[ROWS][8];       // O rows, this lane's dims, unnormalized
#pragma unroll
  for (int h = 0; h < ROWS; ++h) {
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[h][j] = 0.f;
  }

#pragma unroll 1
  for (int base = start + warp * TOK; base < end; base += BLOCK_TOKENS) {
    // ---- loads: rows base .. base + TOK - 1, this lane's 16 bytes; tokens >= end read as zeros
    uint4 kv[TOK], vv[TOK];
#pragma unroll
    for (int t = 0; t < TOK; ++t) {
      const int64_t off = static_cast<int64_t>(base + t) * D;
      kv[t] = base + t < end ? load16(k_head + off) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int t = 0; t < TOK; ++t) {
      const int64_t off = static_cast<int64_t>(base + t) * D;
      vv[t] = base + t < end ? load16(v_head + off) : make_uint4(0, 0, 0, 0);
    }

    // ---- partial scores over this lane's 8 dims, then summed over the warp
    float sc[N];
    if constexpr (Q_REGS) {
#pragma unroll
      for (int t = 0; t < TOK; ++t) {
        float kf[8];
        unpack8<T>(kv[t], kf);
#pragma unroll
        for (int h = 0; h < ROWS; ++h) sc[t * ROWS + h] = dot8(qr[h], kf);
      }
    } else {
      float kf[TOK][8];
#pragma unroll
      for (int t = 0; t < TOK; ++t) unpack8<T>(kv[t], kf[t]);
#pragma unroll
      for (int h = 0; h < ROWS; ++h) {
        float qh[8];
        load_shared(&s_q[h][lane * 8], qh);
#pragma unroll
        for (int t = 0; t < TOK; ++t) sc[t * ROWS + h] = dot8(qh, kf[t]);
      }
    }
    float x = warp_sum_transposed<LOG_N>(sc, lane);

    // ---- online softmax (log2 domain) of (my_tok, my_head); masked tokens get -inf by select
    x = base + my_tok < end ? x : -INFINITY;
    float tile_max = x;
#pragma unroll
    for (int offset = ROWS << SHIFT; offset < 32; offset <<= 1)  // lanes of the same head
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, offset));
    const float m_new = fmaxf(m_run, tile_max);  // finite: token base < end is in every head
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    const float corr = exp2f(m_run - m_use);  // 0 when m_run is -inf
    m_run = m_new;
    const float p = exp2f(x - m_use);  // 0 for a masked token
    float tile_sum = p;
#pragma unroll
    for (int offset = ROWS << SHIFT; offset < 32; offset <<= 1)
      tile_sum += __shfl_xor_sync(0xffffffff, tile_sum, offset);
    l_run = l_run * corr + tile_sum;

    // ---- share p and the rescales with the warp (the last step's reads are done first)
    __syncwarp();
    if (index_owner) s_p[warp][my_index] = p;
    if (index_owner && my_tok == 0) s_c[warp][my_head] = corr;
    __syncwarp();

    // ---- O = O * corr + P.V
    float c[ROWS];
    load_shared(s_c[warp], c);
#pragma unroll
    for (int h = 0; h < ROWS; ++h) {
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[h][j] *= c[h];
    }
#pragma unroll
    for (int t = 0; t < TOK; ++t) {
      float vf[8], pt[ROWS];
      unpack8<T>(vv[t], vf);
      load_shared(&s_p[warp][t * ROWS], pt);
#pragma unroll
      for (int h = 0; h < ROWS; ++h) {
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[h][j] = fmaf(pt[h], vf[j], acc[h][j]);
      }
    }
  }

  // ---- combine the 4 warps in shared memory (as the mma kernel)
  if (index_owner && my_tok == 0) {
    s_m[warp][my_head] = m_run;
    s_l[warp][my_head] = l_run;
  }
#pragma unroll
  for (int h = 0; h < ROWS; ++h) {
    *reinterpret_cast<float4*>(&s_o[warp][h][lane * 8]) =
        make_float4(acc[h][0], acc[h][1], acc[h][2], acc[h][3]);
    *reinterpret_cast<float4*>(&s_o[warp][h][lane * 8 + 4]) =
        make_float4(acc[h][4], acc[h][5], acc[h][6], acc[h][7]);
  }
  __syncthreads();

  combine_warps<T, D>(s_o, s_m, s_l, out, workspace, row0, rows, split, num_splits);
}

// Merges the split-K partials of one (b, h): out = sum_j w_j o_j / sum_j w_j,
// w_j = l_j * 2^(m_j - max m). Only splits before the last non-empty one are read (non-empty
// splits form a prefix: split j is non-empty iff j * chunk < len).
template <typename T, int D>
__global__ void __launch_bounds__(kMergeWarps * 32) decode_attention_merge_kernel(
    T* __restrict__ out,                // [B, Hq, D] contiguous
    const float* __restrict__ workspace,  // [B, Hq, num_splits, D + 2], 8-byte aligned
    int num_q_heads, int num_splits) {
  constexpr int PAIRS = D / 64;  // float2 per lane per partial
  extern __shared__ float s_w[];  // [num_splits] weights
  __shared__ float s_red[32];
  __shared__ float s_acc[kMergeWarps][D];

  const int64_t row = static_cast<int64_t>(blockIdx.y) * num_q_heads + blockIdx.x;
  const float* parts = workspace + row * num_splits * (D + 2);
  T* o = out + row * D;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  float m_max = -INFINITY, active = 0.f;
  for (int j = tid; j < num_splits; j += blockDim.x) {
    const float m = parts[static_cast<int64_t>(j) * (D + 2) + D];
    m_max = fmaxf(m_max, m);
    if (m != -INFINITY) active = static_cast<float>(j + 1);
  }
  m_max = block_reduce_max(m_max, s_red);
  const int num_active = static_cast<int>(block_reduce_max(active, s_red));
  if (m_max == -INFINITY) {  // seq_len 0
    for (int d = tid; d < D; d += blockDim.x) o[d] = from_float<T>(0.f);
    return;
  }
  float sum = 0.f;
  for (int j = tid; j < num_active; j += blockDim.x) {
    const float* part = parts + static_cast<int64_t>(j) * (D + 2);
    const float m = part[D];
    const float w = m == -INFINITY ? 0.f : exp2f(m - m_max) * part[D + 1];
    s_w[j] = w;
    sum += w;
  }
  sum = block_reduce_sum(sum, s_red);  // its barriers also publish s_w

  float2 acc[PAIRS];
#pragma unroll
  for (int k = 0; k < PAIRS; ++k) acc[k] = make_float2(0.f, 0.f);
#pragma unroll 4
  for (int j = warp; j < num_active; j += kMergeWarps) {
    const float w = s_w[j];
    const float2* part = reinterpret_cast<const float2*>(parts + static_cast<int64_t>(j) * (D + 2));
#pragma unroll
    for (int k = 0; k < PAIRS; ++k) {
      const float2 x = part[lane + 32 * k];
      acc[k].x += w != 0.f ? w * x.x : 0.f;  // select: an empty partial's values are never used
      acc[k].y += w != 0.f ? w * x.y : 0.f;
    }
  }
#pragma unroll
  for (int k = 0; k < PAIRS; ++k) {
    s_acc[warp][2 * (lane + 32 * k)] = acc[k].x;
    s_acc[warp][2 * (lane + 32 * k) + 1] = acc[k].y;
  }
  __syncthreads();
  const float inv = 1.f / sum;  // sum >= 1: the split holding the max has l >= 1
  for (int d = tid; d < D; d += blockDim.x) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kMergeWarps; ++w) v += s_acc[w][d];
    o[d] = from_float<T>(v * inv);
  }
}

template <typename T, int D>
void launch_decode_attention_merge(at::Tensor& out, at::Tensor& workspace, int batch, int num_q_heads,
                                   int num_splits, cudaStream_t stream) {
  const dim3 merge_grid(num_q_heads, batch);
  decode_attention_merge_kernel<T, D>
      <<<merge_grid, kMergeWarps * 32, num_splits * sizeof(float), stream>>>(
          reinterpret_cast<T*>(out.data_ptr()), workspace.data_ptr<float>(), num_q_heads, num_splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void launch_decode_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& seq_lens, float scale_log2,
                             at::Tensor& workspace, int window, cudaStream_t stream) {
  const int batch = static_cast<int>(q.size(0));
  const int num_q_heads = static_cast<int>(q.size(1));
  const int num_kv_heads = static_cast<int>(k_cache.size(1));
  const int seq_capacity = static_cast<int>(k_cache.size(2));
  const int group = num_q_heads / num_kv_heads;
  const int num_splits = static_cast<int>(workspace.size(2));
  const bool q_vec = is_16b_aligned(q.data_ptr()) && q.stride(0) % 8 == 0 && q.stride(1) % 8 == 0;
  if constexpr (D == kWideDim) {
    const int rows = simt_rows(group);
    const int head_chunks = ceil_div(group, rows);
    const dim3 grid(num_splits, num_kv_heads * head_chunks, batch);
    auto kernel = rows == 1   ? decode_attention_simt_kernel<T, 1>
                  : rows == 2 ? decode_attention_simt_kernel<T, 2>
                  : rows == 4 ? decode_attention_simt_kernel<T, 4>
                              : decode_attention_simt_kernel<T, kWideMaxRows>;
    kernel<<<grid, kThreads, 0, stream>>>(
        reinterpret_cast<T*>(out.data_ptr()), workspace.data_ptr<float>(),
        reinterpret_cast<const T*>(q.data_ptr()), reinterpret_cast<const T*>(k_cache.data_ptr()),
        reinterpret_cast<const T*>(v_cache.data_ptr()), seq_lens.data_ptr<int>(), q.stride(0),
        q.stride(1), seq_lens.stride(0), num_q_heads, num_kv_heads, seq_capacity, group, head_chunks,
        num_splits, scale_log2, window, q_vec);
  } else {
    const int head_chunks = ceil_div(group, kRows);
    const dim3 grid(num_splits, num_kv_heads * head_chunks, batch);
    auto kernel = q_vec ? decode_attention_kernel<T, D, true> : decode_attention_kernel<T, D, false>;
    kernel<<<grid, kThreads, 0, stream>>>(
        reinterpret_cast<T*>(out.data_ptr()), workspace.data_ptr<float>(),
        reinterpret_cast<const T*>(q.data_ptr()), reinterpret_cast<const T*>(k_cache.data_ptr()),
        reinterpret_cast<const T*>(v_cache.data_ptr()), seq_lens.data_ptr<int>(), q.stride(0),
        q.stride(1), seq_lens.stride(0), num_q_heads, num_kv_heads, seq_capacity, group, head_chunks,
        num_splits, scale_log2, window);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (num_splits > 1) {
    launch_decode_attention_merge<T, D>(out, workspace, batch, num_q_heads, num_splits, stream);
  }
}

void decode_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const at::Tensor& seq_lens, double scale,
                      at::Tensor& workspace, int64_t window) {
  LK_CHECK_CUDA(out);
  LK_CHECK_CUDA(q);
  LK_CHECK_CUDA(k_cache);
  LK_CHECK_CUDA(v_cache);
  LK_CHECK_CUDA(seq_lens);
  LK_CHECK_CUDA(workspace);
  LK_CHECK_SAME_DEVICE(q, out);
  LK_CHECK_SAME_DEVICE(q, k_cache);
  LK_CHECK_SAME_DEVICE(q, v_cache);
  LK_CHECK_SAME_DEVICE(q, seq_lens);
  LK_CHECK_SAME_DEVICE(q, workspace);
  TORCH_CHECK(q.dim() == 3, "decode_attention: q must be [B, Hq, D], got ", lk_shape(q));
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "decode_attention: k_cache and v_cache must both be [B', Hk, S, D]");
  LK_CHECK_CONTIGUOUS(k_cache);
  LK_CHECK_CONTIGUOUS(v_cache);
  LK_CHECK_CONTIGUOUS(out);
  LK_CHECK_CONTIGUOUS(workspace);
  LK_CHECK_LAST_DIM_CONTIGUOUS(q);
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              "decode_attention: q, k_cache, v_cache and out must share one dtype");
  LK_CHECK_DTYPE(seq_lens, at::ScalarType::Int);
  LK_CHECK_DTYPE(workspace, at::ScalarType::Float);
  const int64_t batch = q.size(0), num_q_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(1), seq_capacity = k_cache.size(2);
  TORCH_CHECK(head_dim == 64 || head_dim == 128 || head_dim == kWideDim,
              "decode_attention: head_dim must be 64, 128 or 256, got ", lk_num(head_dim));
  TORCH_CHECK(k_cache.size(3) == head_dim, "decode_attention: cache head_dim ", lk_num(k_cache.size(3)),
              " != q's ", lk_num(head_dim));
  TORCH_CHECK(k_cache.size(0) >= batch, "decode_attention: the caches have fewer rows than q's batch");
  TORCH_CHECK(num_kv_heads > 0 && num_q_heads % num_kv_heads == 0,
              "decode_attention: Hq must be a multiple of Hk");
  TORCH_CHECK(out.sizes() == q.sizes(), "decode_attention: out must have q's shape");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == batch, "decode_attention: seq_lens must be [B]");
  TORCH_CHECK(workspace.dim() == 4 && workspace.size(0) == batch && workspace.size(1) == num_q_heads &&
                  workspace.size(2) >= 1 && workspace.size(2) <= kMaxSplits &&
                  workspace.size(3) == head_dim + 2,
              "decode_attention: workspace must be float32 [B, Hq, splits, D + 2] with 1 <= splits <= ",
              lk_num(kMaxSplits), ", got ", lk_shape(workspace));
  TORCH_CHECK(is_16b_aligned(k_cache.data_ptr()) && is_16b_aligned(v_cache.data_ptr()),
              "decode_attention: k_cache and v_cache must be 16-byte aligned");
  TORCH_CHECK((reinterpret_cast<std::uintptr_t>(workspace.data_ptr()) & 7) == 0,
              "decode_attention: workspace must be 8-byte aligned");
  TORCH_CHECK(seq_capacity <= (1 << 30), "decode_attention: cache length above 2^30");
  TORCH_CHECK(window >= 0, "decode_attention: window must be >= 0 (0 = no window), got ", lk_num(window));
  const int window_tokens = static_cast<int>(std::min<int64_t>(window, seq_capacity));
  // Blocks write out and workspace while others still read q and the caches.
  at::assert_no_overlap(out, q);
  at::assert_no_overlap(out, k_cache);
  at::assert_no_overlap(out, v_cache);
  at::assert_no_overlap(workspace, q);
  at::assert_no_overlap(workspace, k_cache);
  at::assert_no_overlap(workspace, v_cache);
  const int64_t rows_per_block = head_dim == kWideDim ? simt_rows(num_q_heads / num_kv_heads) : kRows;
  TORCH_CHECK(batch <= 65535 &&
                  num_kv_heads * ceil_div(num_q_heads / num_kv_heads, rows_per_block) <= 65535,
              "decode_attention: batch or head count too large for the grid");
  if (batch == 0 || num_q_heads == 0) return;

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float scale_log2 = static_cast<float>(scale) * kLog2e;
  LK_DISPATCH_HALF(q.scalar_type(), "decode_attention", [&] {
    if (head_dim == 64) {
      launch_decode_attention<scalar_t, 64>(out, q, k_cache, v_cache, seq_lens, scale_log2, workspace,
                                            window_tokens, stream);
    } else if (head_dim == 128) {
      launch_decode_attention<scalar_t, 128>(out, q, k_cache, v_cache, seq_lens, scale_log2,
                                             workspace, window_tokens, stream);
    } else {
      launch_decode_attention<scalar_t, kWideDim>(out, q, k_cache, v_cache, seq_lens, scale_log2,
                                                  workspace, window_tokens, stream);
    }
  });
}

// ---- kv_cache_append ----------------------------------------------------------------------------
template <typename T, bool VEC>
__global__ void kv_cache_append_kernel(
    const T* __restrict__ k,                  // [N, Hk, D], strides (k_stride_n, k_stride_h, 1)
    const T* __restrict__ v,                  // [N, Hk, D], strides (v_stride_n, v_stride_h, 1)
    T* __restrict__ k_cache,                  // [B, Hk, S, D] contiguous
    T* __restrict__ v_cache,                  // [B, Hk, S, D] contiguous
    const int64_t* __restrict__ slot_mapping,  // [N] (stride slot_stride), flat b * S + s
    int64_t k_stride_n, int64_t k_stride_h, int64_t v_stride_n, int64_t v_stride_h,
    int64_t slot_stride, int64_t num_tokens, int num_heads, int head_dim, int64_t seq_capacity,
    int64_t num_slots) {
  const int64_t n = blockIdx.x;
  const int64_t slot = slot_mapping[n * slot_stride];
  if (slot < 0 || slot >= num_slots) return;  // padding token (uniform over the block)
  __shared__ int overwritten;  // a later token writes the same slot: it wins
  if (threadIdx.x == 0) overwritten = 0;
  __syncthreads();
  for (int64_t m = n + 1 + threadIdx.x; m < num_tokens; m += blockDim.x) {
    if (slot_mapping[m * slot_stride] == slot) overwritten = 1;
  }
  __syncthreads();
  if (overwritten) return;
  const int64_t b = slot / seq_capacity, s = slot % seq_capacity;
  constexpr int N = VEC ? Vec<T>::N : 1;
  const int per_head = head_dim / N;
  for (int i = threadIdx.x; i < num_heads * per_head; i += blockDim.x) {
    const int h = i / per_head, c = (i % per_head) * N;
    const int64_t dst = ((b * num_heads + h) * seq_capacity + s) * head_dim + c;
    const T* k_src = k + n * k_stride_n + h * k_stride_h + c;
    const T* v_src = v + n * v_stride_n + h * v_stride_h + c;
    if constexpr (VEC) {
      store_vec(k_cache + dst, load_vec(k_src));
      store_vec(v_cache + dst, load_vec(v_src));
    } else {
      k_cache[dst] = *k_src;
      v_cache[dst] = *v_src;
    }
  }
}

void kv_cache_append(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                     const at::Tensor& slot_mapping) {
  LK_CHECK_CUDA(k);
  LK_CHECK_CUDA(v);
  LK_CHECK_CUDA(k_cache);
  LK_CHECK_CUDA(v_cache);
  LK_CHECK_CUDA(slot_mapping);
  LK_CHECK_SAME_DEVICE(k_cache, k);
  LK_CHECK_SAME_DEVICE(k_cache, v);
  LK_CHECK_SAME_DEVICE(k_cache, v_cache);
  LK_CHECK_SAME_DEVICE(k_cache, slot_mapping);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "kv_cache_append: k_cache and v_cache must both be [B, Hk, S, D]");
  LK_CHECK_CONTIGUOUS(k_cache);
  LK_CHECK_CONTIGUOUS(v_cache);
  const int64_t num_tokens = slot_mapping.numel();
  const int64_t num_heads = k_cache.size(1), seq_capacity = k_cache.size(2), head_dim = k_cache.size(3);
  TORCH_CHECK(k.dim() == 3 && k.size(0) == num_tokens && k.size(1) == num_heads && k.size(2) == head_dim &&
                  v.sizes() == k.sizes(),
              "kv_cache_append: k and v must be [N, Hk, D] matching the cache and slot_mapping");
  LK_CHECK_LAST_DIM_CONTIGUOUS(k);
  LK_CHECK_LAST_DIM_CONTIGUOUS(v);
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "kv_cache_append: k, v and the caches must share one dtype");
  LK_CHECK_DTYPE(slot_mapping, at::ScalarType::Long);
  TORCH_CHECK(slot_mapping.dim() == 1, "kv_cache_append: slot_mapping must be [N]");
  TORCH_CHECK(num_heads * head_dim <= std::numeric_limits<int>::max() &&
                  num_tokens <= std::numeric_limits<int>::max(),
              "kv_cache_append: too many tokens or rows too wide");
  at::assert_no_overlap(k_cache, v_cache);
  for (const at::Tensor* src : {&k, &v}) {
    at::assert_no_overlap(*src, k_cache);
    at::assert_no_overlap(*src, v_cache);
  }
  if (num_tokens == 0 || num_heads * head_dim == 0 || seq_capacity == 0) return;

  const c10::cuda::CUDAGuard guard(k_cache.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t num_slots = k_cache.size(0) * seq_capacity;
  LK_DISPATCH_FLOATING(k_cache.scalar_type(), "kv_cache_append", [&] {
    constexpr int N = Vec<scalar_t>::N;
    const bool vec = head_dim % N == 0 && k.stride(0) % N == 0 && k.stride(1) % N == 0 &&
                     v.stride(0) % N == 0 && v.stride(1) % N == 0 && is_16b_aligned(k.data_ptr()) &&
                     is_16b_aligned(v.data_ptr()) && is_16b_aligned(k_cache.data_ptr()) &&
                     is_16b_aligned(v_cache.data_ptr());
    const int64_t items = num_heads * head_dim / (vec ? N : 1);
    const int threads = static_cast<int>(std::min<int64_t>(256, (items + 31) / 32 * 32));
    const auto* k_ptr = reinterpret_cast<const scalar_t*>(k.data_ptr());
    const auto* v_ptr = reinterpret_cast<const scalar_t*>(v.data_ptr());
    auto* kc_ptr = reinterpret_cast<scalar_t*>(k_cache.data_ptr());
    auto* vc_ptr = reinterpret_cast<scalar_t*>(v_cache.data_ptr());
    const auto* slots = slot_mapping.data_ptr<int64_t>();
    if (vec) {
      kv_cache_append_kernel<scalar_t, true><<<static_cast<unsigned>(num_tokens), threads, 0, stream>>>(
          k_ptr, v_ptr, kc_ptr, vc_ptr, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
          slot_mapping.stride(0), num_tokens, static_cast<int>(num_heads), static_cast<int>(head_dim),
          seq_capacity, num_slots);
    } else {
      kv_cache_append_kernel<scalar_t, false><<<static_cast<unsigned>(num_tokens), threads, 0, stream>>>(
          k_ptr, v_ptr, kc_ptr, vc_ptr, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
          slot_mapping.stride(0), num_tokens, static_cast<int>(num_heads), static_cast<int>(head_dim),
          seq_capacity, num_slots);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace llmkernels

TORCH_LIBRARY_IMPL(llmkernels, CUDA, m) {
  m.impl("decode_attention", &llmkernels::decode_attention);
  m.impl("kv_cache_append", &llmkernels::kv_cache_append);
}
