// Fused temperature / top-k / top-p sampling: sort-free, exact, CUDA-graph safe.
//
// Semantics (llmkernels.reference.sampling_probs): p = softmax(logits / T); keep token t iff fewer
// than k tokens have a strictly larger logit (top-k; k = 0 or k >= V is off); then keep t iff the
// mass of tokens strictly more probable than t is < top_p (over the top-k set, renormalized; the
// argmax always survives); draw from the kept tokens in proportion to p. T <= 0 is greedy (argmax,
// lowest index among ties).
//
// Layout. A thread-block cluster of C CTAs (C in {1, 2, 4, 8}; C = 1 before Hopper) samples one
// row; CTA r owns the contiguous vocabulary slice [r * chunk, (r + 1) * chunk) and keeps it in shared
// memory (when a slice cannot fit, every pass re-reads it from global memory / L2 instead). The
// logits are read from HBM exactly once. Cluster-wide sums use distributed shared memory (DSMEM).
//
// Keys. A logit x maps to an order-preserving unsigned key (its IEEE bits with the sign folded:
// 32 bits for fp32, 16 for fp16/bf16; NaN ranks as -inf, -0 as +0) and to dk = key(max) - key(x):
// sorting by dk ascending is sorting by logit (and, T being positive, by probability) descending.
// Both filters become "keep t iff dk(t) <= threshold", and the thresholds are found by radix select:
//
//   pass 1  load + max: copy the slice to shared memory, cluster-wide max key (lowest index among
//           ties). Greedy rows, and rows whose max is not finite (all -inf, +inf, NaN), stop here
//           with the argmax.
//   pass 2+ top-k threshold: per round, a 1024-bin count histogram over dk, summed over the cluster;
//           the bin holding the k-th largest key is refined by the next round. Round 1 bins dk on a
//           log scale (exact below 2^M, then M = 5 (fp32) / 6 (16-bit) mantissa bits per octave);
//           later rounds resolve 10 bits of the chosen bin each. Rule for every round: choose the
//           last non-empty bin whose exclusive prefix (count of larger keys) is < target; stop when
//           that bin is kept whole (prefix + bin <= target) or holds a single key (ties kept).
//           At most 4 rounds for fp32 keys, 2 for 16-bit keys; typically 1-2. Each round: one pass
//           with shared-memory atomics, the CTA histograms added into per-CTA-owned slices of a
//           triple-buffered cluster histogram by DSMEM atomics, one cluster barrier, every CTA
//           reads the summed histogram and does the same block scan (so all agree, no broadcast).
//   pass 3+ top-p threshold: the same search on probability mass w = exp((x - max) / T) over the
//           top-k set, in 2^-31 fixed point (exact integer sums, so the cross-CTA reduction is
//           deterministic and a refined bin's sub-histogram sums to exactly its parent). The target
//           is ceil(top_p * Z) with Z the top-k set's mass: mass above t < top_p * Z is the rule.
//           (Weights below 2^-32 of the max count as 0 here; they are still drawable.) At most 4
//           rounds for fp32 (typically 1-3), 2 for 16-bit keys.
//   last    draw by exponential race (Gumbel-max): among kept tokens, the argmax of
//           (x - max) / T - log(E_t), E_t = -log(u_t) ~ Exp(1), is distributed exactly as the
//           renormalized p (no normalization, no prefix scan; one cluster reduction). u_t comes from
//           Philox4x32-10 keyed by the seed with counter (t / 4, row, offset), so a fixed
//           (seed, offset) reproduces the tokens; a 1-thread kernel then advances offset on device.
//
// Pass count: 1 global read + (top-k rounds + top-p rounds + 1) passes over shared memory, each
// followed by one cluster barrier; e.g. T=0.7, top-k 50, top-p 0.9 typically takes 3-6 passes.
//
// Launch: grid (C, B), 512 threads per CTA, cluster (C, 1, 1). C = 8 while B * C/2 CTAs would
// under-fill the GPU (batch 1 is latency-bound: 8 SMs share the row), halved as the batch grows
// while the occupancy API still gives two CTAs per SM at the halved cluster's slice size; more
// CTAs if a slice would not fit at all; fewer when the device cannot co-schedule a cluster of C
// (cudaOccupancyMaxActiveClusters = 0: MPS or green-context partitions, shared-memory carve-outs).
// Gemma 3's 262144 tokens on H100/H200: C stays 8 at every batch (64 KB bf16 / 128 KB fp32
// slices); before Hopper one CTA holds the whole row and re-reads it from L2 on each pass.
// Slices start at multiples of 8 tokens: a row whose start is 16-byte aligned is read with 16-byte
// vectors, any other row (odd row strides, offset views) with scalar loads.
// Robustness: every written id is in [0, V) for any input (NaN, +-inf, all -inf, top_p <= 0 or NaN,
// any k): unsupported cases fall back to the argmax.

#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>

#include "common.cuh"

namespace llmkernels {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kBins = 2 * kThreads;  // histogram bins per round; each thread scans two
constexpr int kRadixBits = 10;       // log2(kBins): key bits resolved per refinement round
constexpr int kMaxCluster = 8;       // portable cluster size limit
constexpr int kMaxRounds = 6;        // fp32 keys need at most 4 rounds per threshold
constexpr int kLoadUnroll = 4;       // 16-byte loads in flight per thread in the load pass
constexpr float kMassScale = 2147483648.0f;  // 2^31: fixed-point weight of the row max (w = 1)
constexpr int kMaxDevices = 64;

static_assert(kBins == 1 << kRadixBits, "kBins must be 2^kRadixBits");
static_assert(kBins % (2 * kMaxCluster) == 0, "each CTA owns an even number of bins");

// ---- order-preserving keys ------------------------------------------------------------------------
template <typename T>
struct Keys;

template <>
struct Keys<float> {
  static constexpr int kLogMantBits = 5;  // round-1 bins: (32 - 5 + 1) << 5 = 896
  __device__ static __forceinline__ uint32_t key(float x) {
    uint32_t b = __float_as_uint(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) b = 0xff800000u;  // NaN ranks as -inf
    if (b == 0x80000000u) b = 0u;                           // -0 ties with +0
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  }
  __device__ static __forceinline__ float value_of_key(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
  }
};

__device__ __forceinline__ uint32_t fold16(uint32_t b) { return (b & 0x8000u) ? (~b & 0xffffu) : (b | 0x8000u); }
__device__ __forceinline__ uint32_t unfold16(uint32_t k) { return (k & 0x8000u) ? (k & 0x7fffu) : (~k & 0xffffu); }

template <>
struct Keys<__half> {
  static constexpr int kLogMantBits = 6;  // round-1 bins: (16 - 6 + 1) << 6 = 704
  __device__ static __forceinline__ uint32_t key(__half x) {
    uint32_t b = __half_as_ushort(x);
    if ((b & 0x7fffu) > 0x7c00u) b = 0xfc00u;  // NaN ranks as -inf
    if (b == 0x8000u) b = 0u;
    return fold16(b);
  }
  __device__ static __forceinline__ float value_of_key(uint32_t k) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(unfold16(k))));
  }
};

template <>
struct Keys<__nv_bfloat16> {
  static constexpr int kLogMantBits = 6;
  __device__ static __forceinline__ uint32_t key(__nv_bfloat16 x) {
    uint32_t b = __bfloat16_as_ushort(x);
    if ((b & 0x7fffu) > 0x7f80u) b = 0xff80u;  // NaN ranks as -inf
    if (b == 0x8000u) b = 0u;
    return fold16(b);
  }
  __device__ static __forceinline__ float value_of_key(uint32_t k) {
    return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(unfold16(k))));
  }
};

// Logit as fp32 with NaN as -inf (consistent with the keys).
template <typename T>
__device__ __forceinline__ float logit_value(T x) {
  const float v = to_float(x);
  return v != v ? -INFINITY : v;
}

// Round-1 bin of dk: exact below 2^M, then 2^M bins per octave (a float-like encoding of dk).
template <int M>
__device__ __forceinline__ uint32_t log_bin(uint32_t dk) {
  if (dk < (1u << M)) return dk;
  const int e = 31 - __clz(dk);  // >= M
  return (static_cast<uint32_t>(e - M + 1) << M) | ((dk >> (e - M)) & ((1u << M) - 1));
}

// The dk range [lo, lo + 2^wbits) of round-1 bin b (inverse of log_bin).
template <int M>
__device__ __forceinline__ void log_bin_range(uint32_t b, uint32_t& lo, int& wbits) {
  if (b < (1u << M)) {
    lo = b;
    wbits = 0;
    return;
  }
  const int e = static_cast<int>(b >> M) + M - 1;
  wbits = e - M;
  lo = ((1u << M) | (b & ((1u << M) - 1))) << wbits;
}

// ---- Philox4x32-10 (Salmon et al., SC'11) ----------------------------------------------------------
__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint2 k) {
#pragma unroll
  for (int i = 0; i < 10; ++i) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
    c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    k.x += 0x9E3779B9u;
    k.y += 0xBB67AE85u;
  }
  return c;
}

// ---- cluster helpers (a 1-CTA "cluster" before Hopper) ------------------------------------------
__device__ __forceinline__ uint32_t cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
#else
  return 0;
#endif
}

// Split cluster barrier used once at kernel start: distributed shared memory may only be touched
// once every CTA of the cluster is running, so each CTA arrives on entry and waits just before
// its first remote write (the load pass runs in between, hiding the wait).
__device__ __forceinline__ void cluster_arrive_relaxed(int cluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (cluster > 1) asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
#endif
}

__device__ __forceinline__ void cluster_wait(int cluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (cluster > 1) asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
#endif
}

// Cluster-wide barrier with release/acquire ordering of (distributed) shared memory.
__device__ __forceinline__ void cluster_sync(int cluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (cluster > 1) {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
    return;
  }
#endif
  __syncthreads();
}

// Generic pointer to the same shared variable in CTA `rank` of this cluster.
template <typename U>
__device__ __forceinline__ U* cluster_map(U* p, uint32_t rank, int cluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (cluster > 1) return static_cast<U*>(__cluster_map_shared_rank(static_cast<void*>(p), rank));
#endif
  return p;
}

// ---- warp / block helpers --------------------------------------------------------------------------
__device__ __forceinline__ unsigned long long warp_max_u64(unsigned long long v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long other = __shfl_xor_sync(0xffffffffu, v, o);
    v = other > v ? other : v;
  }
  return v;
}

__device__ __forceinline__ unsigned long long warp_inclusive_scan_u64(unsigned long long v, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long other = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += other;
  }
  return v;
}

struct alignas(16) SampleShared {
  uint2 reduced[3][kBins];    // cluster-summed histograms (x: low, y: high 32 bits); CTA r owns bins
                              // [r * kBins / C, (r + 1) * kBins / C); triple-buffered across rounds
  uint32_t hist_lo[kBins];    // this CTA's histogram, low 32 bits
  uint32_t hist_hi[kBins];    // its carries (fixed-point mass sums exceed 32 bits)
  unsigned long long max_slot[kMaxCluster];   // per-CTA packed (max key, ~index), pushed to all CTAs
  unsigned long long draw_slot[kMaxCluster];  // per-CTA packed (race key, ~index), pushed to CTA 0
  unsigned long long red64[kWarps];
  unsigned long long scan64[kWarps];
  int red_int[kWarps];
  unsigned long long sel_excl, sel_count;
};

// Packs (key, index) so that the u64 max is the largest key, then the lowest index.
__device__ __forceinline__ unsigned long long pack_key_index(uint32_t key, uint32_t index) {
  return (static_cast<unsigned long long>(key) << 32) | (0xffffffffu - index);
}

// ---- one row, one CTA of its cluster ------------------------------------------------------------
template <typename T, bool kCached>
struct RowSampler {
  static constexpr int M = Keys<T>::kLogMantBits;
  struct alignas(4 * sizeof(T)) Group {
    T v[4];
  };

  SampleShared& sh;
  const T* __restrict__ g;  // [n] this CTA's slice of the logits row (global)
  const T* s;               // [chunk] the same slice in shared memory (kCached)
  int n;                    // slice length
  int begin;                // global index of the slice's first token
  int tid;
  uint32_t rank;
  int cluster;
  uint32_t max_key = 0;
  float xmax = 0.f, inv_t = 1.f;
  int round = 0;  // histogram rounds so far in this row (selects the reduced[] buffer)

  __device__ __forceinline__ Group load_group(int grp) const {
    if constexpr (kCached) {
      return *reinterpret_cast<const Group*>(s + 4 * grp);
    } else {
      // Uncached slices (a vocabulary too large for shared memory, e.g. one CTA per row before
      // Hopper) are re-read from L2 every pass: one vector load per group where the row allows.
      if (4 * grp + 3 < n && (reinterpret_cast<uintptr_t>(g) & (sizeof(Group) - 1)) == 0) {
        return *reinterpret_cast<const Group*>(g + 4 * grp);
      }
      Group out;
#pragma unroll
      for (int j = 0; j < 4; ++j) out.v[j] = 4 * grp + j < n ? g[4 * grp + j] : from_float<T>(0.f);
      return out;
    }
  }

  __device__ __forceinline__ float scaled_gap(T x) const {  // (x - max) / T <= 0; NaN-free except -inf*0
    return (logit_value(x) - xmax) * inv_t;
  }

  __device__ __forceinline__ uint32_t mass_fixed(T x) const {  // round(exp((x - max) / T) * 2^31)
    return __float2uint_rn(__expf(scaled_gap(x)) * kMassScale);  // NaN -> 0
  }

  // Block max of a packed u64 (every thread gets it).
  __device__ unsigned long long block_max_u64(unsigned long long v) {
    const int lane = tid & 31, warp = tid >> 5;
    v = warp_max_u64(v);
    __syncthreads();  // red64 may still be read by a previous call
    if (lane == 0) sh.red64[warp] = v;
    __syncthreads();
    v = lane < kWarps ? sh.red64[lane] : 0ull;
    return warp_max_u64(v);
  }

  // Pass 1: slice -> shared memory (kCached), local max; returns the packed local max.
  __device__ unsigned long long load_and_max() {
    unsigned long long best = 0;  // below every real token (keys of -inf are > 0)
    T* smem = const_cast<T*>(s);
    auto consider = [&](T x, int i) {
      const unsigned long long p = pack_key_index(Keys<T>::key(x), static_cast<uint32_t>(begin + i));
      best = p > best ? p : best;
    };
    constexpr int kVec = Vec<T>::N;
    int scalar_from = 0;
    if (is_aligned16(g)) {  // slices start at multiples of 8 tokens: aligned iff the row is
      const int nvec = n / kVec;
      for (int base = tid; base < nvec; base += kThreads * kLoadUnroll) {
        Vec<T> v[kLoadUnroll];
#pragma unroll
        for (int u = 0; u < kLoadUnroll; ++u) {
          const int i = base + u * kThreads;
          if (i < nvec) v[u] = load_vec(g + i * kVec);
        }
#pragma unroll
        for (int u = 0; u < kLoadUnroll; ++u) {
          const int i = base + u * kThreads;
          if (i < nvec) {
            if constexpr (kCached) store_vec(smem + i * kVec, v[u]);
#pragma unroll
            for (int j = 0; j < kVec; ++j) consider(v[u].v[j], i * kVec + j);
          }
        }
      }
      scalar_from = nvec * kVec;
    }
    for (int i = scalar_from + tid; i < n; i += kThreads) {
      const T x = g[i];
      if constexpr (kCached) smem[i] = x;
      consider(x, i);
    }
    return block_max_u64(best);
  }

  __device__ static __forceinline__ bool is_aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
  }

  // Adds this CTA's histogram into the owners' reduced[buf] (DSMEM atomics), then clears it.
  __device__ void push_histogram(int buf) {
    const int b = 2 * tid;
    const uint32_t owner = static_cast<uint32_t>(b / (kBins / cluster));
    uint2* dst = cluster_map(&sh.reduced[buf][b], owner, cluster);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const uint32_t lo = sh.hist_lo[b + j], hi = sh.hist_hi[b + j];
      if (lo | hi) {
        const uint32_t old = atomicAdd(&dst[j].x, lo);
        const uint32_t carry = old + lo < old ? 1u : 0u;
        if (hi + carry) atomicAdd(&dst[j].y, hi + carry);
      }
      sh.hist_lo[b + j] = 0u;
      sh.hist_hi[b + j] = 0u;
    }
  }

  // One histogram pass over the tokens with dk <= limit. Round 1 (`first`): log bins. Later
  // rounds: tokens with dk in [lo, lo + 2^wbits), bin (dk - lo) >> shift.
  template <bool kMass>
  __device__ void histogram_pass(bool first, uint32_t limit, uint32_t lo, int wbits, int shift) {
    const int groups = (n + 3) >> 2;
    for (int grp = tid; grp < groups; grp += kThreads) {
      const Group x = load_group(grp);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (4 * grp + j >= n) continue;
        const uint32_t dk = max_key - Keys<T>::key(x.v[j]);
        if (dk > limit) continue;  // outside the set being filtered (top-p: outside the top-k set)
        uint32_t bin;
        if (first) {
          bin = log_bin<M>(dk);
        } else {
          const uint32_t rel = dk - lo;  // wraps for dk < lo: out of range
          if ((rel >> wbits) != 0u) continue;
          bin = rel >> shift;
        }
        if constexpr (kMass) {
          const uint32_t w = mass_fixed(x.v[j]);
          if (w == 0u) continue;
          const uint32_t old = atomicAdd(&sh.hist_lo[bin], w);
          if (old + w < old) atomicAdd(&sh.hist_hi[bin], 1u);
        } else {
          atomicAdd(&sh.hist_lo[bin], 1u);
        }
      }
    }
  }

  // Radix select of a threshold on dk: returns thr such that the kept set is {dk <= thr}.
  // Count mode: keep t iff #(larger keys) < target. Mass mode (kMass): keep t iff the mass of
  // larger keys < ceil(top_p * Z), Z = mass of tokens with dk <= limit. All threads of the cluster
  // call this together and compute the same answer.
  template <bool kMass>
  __device__ uint32_t select_threshold(uint32_t limit, unsigned long long target, float top_p) {
    const int lane = tid & 31, warp = tid >> 5;
    uint32_t lo = 0;
    int wbits = 0;
    for (int r = 0; r < kMaxRounds; ++r) {
      const bool first = r == 0;
      const int shift = wbits > kRadixBits ? wbits - kRadixBits : 0;
      histogram_pass<kMass>(first, limit, lo, wbits, shift);
      __syncthreads();
      const int buf = round % 3;
      ++round;
      push_histogram(buf);
      cluster_sync(cluster);
      // reduced[buf + 2] was last read before this barrier and is next written after the next one.
      const int stale = (buf + 2) % 3;
      const int owned = kBins / cluster;
      for (int i = tid; i < owned; i += kThreads) sh.reduced[stale][rank * owned + i] = make_uint2(0u, 0u);

      // Bins 2 * tid and 2 * tid + 1 of the cluster-summed histogram.
      const uint32_t owner = static_cast<uint32_t>(2 * tid / owned);
      const uint4 q = *reinterpret_cast<const uint4*>(cluster_map(&sh.reduced[buf][2 * tid], owner, cluster));
      const unsigned long long h0 = (static_cast<unsigned long long>(q.y) << 32) | q.x;
      const unsigned long long h1 = (static_cast<unsigned long long>(q.w) << 32) | q.z;

      // Exclusive prefix over bins (bins in dk order: larger keys first).
      const unsigned long long pair = h0 + h1;
      const unsigned long long incl = warp_inclusive_scan_u64(pair, lane);
      if (lane == 31) sh.scan64[warp] = incl;
      __syncthreads();
      if (warp == 0) {
        unsigned long long t = lane < kWarps ? sh.scan64[lane] : 0ull;
        t = warp_inclusive_scan_u64(t, lane);
        if (lane < kWarps) sh.scan64[lane] = t;
      }
      __syncthreads();
      const unsigned long long total = sh.scan64[kWarps - 1];
      const unsigned long long excl0 = (warp ? sh.scan64[warp - 1] : 0ull) + incl - pair;
      const unsigned long long excl1 = excl0 + h0;
      if (kMass && first) {
        // Mass strictly above t must be < top_p * Z; with integer masses, < ceil(top_p * Z).
        target = static_cast<unsigned long long>(ceil(static_cast<double>(top_p) * static_cast<double>(total)));
      }

      // The last non-empty bin whose exclusive prefix is < target.
      int cand = -1;
      if (h1 > 0 && excl1 < target) {
        cand = 2 * tid + 1;
      } else if (h0 > 0 && excl0 < target) {
        cand = 2 * tid;
      }
      cand = __reduce_max_sync(0xffffffffu, cand);
      if (lane == 0) sh.red_int[warp] = cand;
      __syncthreads();
      int chosen = -1;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) chosen = max(chosen, sh.red_int[w]);
      if (chosen < 0) return first ? 0u : min(lo, limit);  // only for target 0: keep the top
      if ((chosen >> 1) == tid) {
        sh.sel_excl = (chosen & 1) ? excl1 : excl0;
        sh.sel_count = (chosen & 1) ? h1 : h0;
      }
      __syncthreads();
      const unsigned long long excl = sh.sel_excl, count = sh.sel_count;

      uint32_t bin_lo;
      int bin_wbits;
      if (first) {
        log_bin_range<M>(static_cast<uint32_t>(chosen), bin_lo, bin_wbits);
      } else {
        bin_lo = lo + (static_cast<uint32_t>(chosen) << shift);
        bin_wbits = shift;
      }
      const uint32_t bin_hi = bin_lo + ((1u << bin_wbits) - 1u);
      // Done when the bin is kept whole or holds one key (ties kept). Bins may reach past the
      // limit, whose tokens were not counted: clamp.
      if (excl + count <= target || bin_wbits == 0) return min(bin_hi, limit);
      target -= excl;
      lo = bin_lo;
      wbits = bin_wbits;
    }
    return min(lo + ((1u << wbits) - 1u), limit);  // not reached: bins shrink to one key first
  }

  // Exponential race over kept tokens (dk <= thr); returns the packed block winner (0 if none).
  __device__ unsigned long long draw(uint32_t thr, uint2 seed, uint32_t row, uint2 offset) {
    unsigned long long best = 0;
    const int groups = (n + 3) >> 2;
    for (int grp = tid; grp < groups; grp += kThreads) {
      const Group x = load_group(grp);
      float d[4];
      bool any = false;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        d[j] = -INFINITY;
        if (4 * grp + j < n && max_key - Keys<T>::key(x.v[j]) <= thr) {
          const float v = scaled_gap(x.v[j]);
          d[j] = v > -INFINITY ? v : -INFINITY;  // -inf * 0 (T = inf) is NaN: not drawable
        }
        any |= d[j] > -INFINITY;
      }
      if (!any) continue;
      const uint32_t first_token = static_cast<uint32_t>(begin + 4 * grp);  // multiple of 4
      const uint4 r4 = philox4x32_10(make_uint4(first_token >> 2, row, offset.x, offset.y), seed);
      const uint32_t r[4] = {r4.x, r4.y, r4.z, r4.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (!(d[j] > -INFINITY)) continue;
        // Exp(1) from all 32 random bits: e = -log(1 - v) keeps full resolution near e = 0,
        // where the race winner lies (coarse uniforms there would tie and bias large vocabs).
        const float v = fminf((static_cast<float>(r[j]) + 0.5f) * 0x1p-32f, 0x1.fffffep-1f);
        const float e = -log1pf(-v);  // > 0 and finite: v in (0, 1)
        const float race = d[j] - logf(e);                                 // log w - log E: finite
        const unsigned long long p = pack_key_index(Keys<float>::key(race), first_token + j);
        best = p > best ? p : best;
      }
    }
    return block_max_u64(best);
  }
};

template <typename T, bool kCached>
__global__ void __launch_bounds__(kThreads)
sample_kernel(int64_t* __restrict__ out,                // [B] (stride out_stride)
              const T* __restrict__ logits,             // [B, V] (row stride row_stride)
              const float* __restrict__ temperature,    // [B]
              const int32_t* __restrict__ top_k,        // [B]
              const float* __restrict__ top_p,          // [B]
              const int64_t* __restrict__ rng_state,    // [2] = (seed, offset)
              int64_t out_stride, int64_t row_stride, int vocab, int chunk, int cluster, int row_base) {
  __shared__ SampleShared sh;
  extern __shared__ __align__(16) unsigned char slice_smem[];  // [chunk] T (kCached)

  cluster_arrive_relaxed(cluster);  // matched by cluster_wait before the first remote write
  const int tid = threadIdx.x;
  const uint32_t rank = cluster > 1 ? cluster_rank() : 0u;
  const int row = blockIdx.y;
  const int begin = static_cast<int>(rank) * chunk;
  RowSampler<T, kCached> rs{sh,
                            logits + row * row_stride + begin,
                            reinterpret_cast<const T*>(slice_smem),
                            max(0, min(vocab - begin, chunk)),
                            begin,
                            tid,
                            rank,
                            cluster};

  // Every CTA reads the RNG state before the first barrier; the follow-up kernel advances it.
  const uint64_t seed = static_cast<uint64_t>(rng_state[0]);
  const uint64_t offset = static_cast<uint64_t>(rng_state[1]);

  for (int i = tid; i < kBins; i += kThreads) {
    sh.hist_lo[i] = 0u;
    sh.hist_hi[i] = 0u;
    sh.reduced[0][i] = sh.reduced[1][i] = sh.reduced[2][i] = make_uint2(0u, 0u);
  }

  // Pass 1: load, cluster-wide max (pushed into every CTA's max_slot[rank]).
  const unsigned long long local = rs.load_and_max();
  cluster_wait(cluster);  // every CTA of the cluster has started: DSMEM is safe to write
  if (tid < cluster) *cluster_map(&sh.max_slot[rank], static_cast<uint32_t>(tid), cluster) = local;
  cluster_sync(cluster);
  unsigned long long top = 0;
  for (int c = 0; c < cluster; ++c) top = sh.max_slot[c] > top ? sh.max_slot[c] : top;
  rs.max_key = static_cast<uint32_t>(top >> 32);
  uint32_t argmax = 0xffffffffu - static_cast<uint32_t>(top);
  if (argmax >= static_cast<uint32_t>(vocab)) argmax = 0u;
  rs.xmax = Keys<T>::value_of_key(rs.max_key);

  const float temp = temperature[row];
  if (!(temp > 0.f) || !isfinite(rs.xmax)) {  // greedy, or nothing finite to sample from
    if (rank == 0 && tid == 0) out[row * out_stride] = argmax;
    return;  // no DSMEM access after the barrier: safe to exit
  }
  rs.inv_t = fminf(1.f / temp, FLT_MAX);

  uint32_t thr = 0xffffffffu;  // keep dk <= thr
  const int k = top_k[row];
  if (k > 0 && k < vocab) thr = rs.template select_threshold<false>(thr, static_cast<unsigned long long>(k), 0.f);
  const float p = top_p[row];
  if (!(p > 0.f)) {
    thr = 0u;  // invalid (unchecked) top_p: the max only
  } else if (p < 1.f) {
    thr = rs.template select_threshold<true>(thr, 0ull, p);
  }

  const uint2 seed2 = make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const uint2 offset2 = make_uint2(static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32));
  const unsigned long long mine = rs.draw(thr, seed2, static_cast<uint32_t>(row_base + row), offset2);
  if (tid == 0) *cluster_map(&sh.draw_slot[rank], 0u, cluster) = mine;
  cluster_sync(cluster);
  if (rank == 0 && tid == 0) {
    unsigned long long best = 0;
    for (int c = 0; c < cluster; ++c) best = sh.draw_slot[c] > best ? sh.draw_slot[c] : best;
    const uint32_t id = 0xffffffffu - static_cast<uint32_t>(best);
    out[row * out_stride] = (best != 0ull && id < static_cast<uint32_t>(vocab)) ? id : argmax;
  }
}

// Runs after every CTA of the sampling kernel has read rng_state (stream order).
__global__ void advance_rng_kernel(int64_t* __restrict__ rng_state) {  // [2]
  rng_state[1] += 1;
}

// ---- host side ------------------------------------------------------------------------------------
// One-time set-up calls (attribute queries, cudaFuncSetAttribute, occupancy queries) may first run
// while the caller captures a CUDA graph. Under the global capture mode (torch.cuda.graph's
// default) a potentially unsafe CUDA call from any thread invalidates the capture, so these run
// with this thread's capture mode relaxed.
struct RelaxedCaptureMode {
  c10::cuda::CUDAStreamCaptureModeGuard guard{cudaStreamCaptureModeRelaxed};
};

struct DeviceInfo {
  int sms = 0;
  int smem_optin = 0;  // max shared memory per block (opt-in), bytes
  int major = 0;
};

const DeviceInfo& device_info(int device) {
  static DeviceInfo infos[kMaxDevices];
  static std::once_flag flags[kMaxDevices];
  std::call_once(flags[device], [device] {
    const RelaxedCaptureMode relaxed;
    DeviceInfo& d = infos[device];
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, device));
  });
  return infos[device];
}

struct KernelInfo {
  int static_smem = 0;  // bytes of static shared memory
  int ptx_arch = 0;     // virtual arch the kernel was compiled for (90: has the cluster code paths)
};

// Per (kernel, device): reads its attributes and opts in to the device's full shared memory.
template <typename T, bool kCached>
const KernelInfo& kernel_info(int device) {
  static KernelInfo infos[kMaxDevices];
  static std::once_flag flags[kMaxDevices];
  std::call_once(flags[device], [device] {
    const DeviceInfo& d = device_info(device);
    const RelaxedCaptureMode relaxed;
    cudaFuncAttributes attr;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, sample_kernel<T, kCached>));
    infos[device].static_smem = static_cast<int>(attr.sharedSizeBytes);
    infos[device].ptx_arch = attr.ptxVersion;
    if (kCached) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(sample_kernel<T, kCached>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          d.smem_optin - static_cast<int>(attr.sharedSizeBytes)));
    }
  });
  return infos[device];
}

// Grid (cluster, rows) of kThreads-thread CTAs, cluster (cluster, 1, 1) when cluster > 1; `attr`
// holds the cluster attribute the returned config points to.
cudaLaunchConfig_t launch_config(int cluster, int64_t rows, size_t smem, cudaStream_t stream,
                                 cudaLaunchAttribute& attr) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(cluster), static_cast<unsigned>(rows), 1);
  config.blockDim = dim3(kThreads, 1, 1);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = static_cast<unsigned>(cluster);
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  config.attrs = &attr;
  config.numAttrs = cluster > 1 ? 1 : 0;
  return config;
}

// Occupancy answers per (kernel variant, device, cluster size, dynamic shared memory), memoized:
// CTAs per SM (cluster 0) or co-resident clusters of that size on the device (cluster > 1).
template <typename T, bool kCached>
int occupancy(int device, int cluster, size_t smem) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int, size_t>, int> answers;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(device, cluster, smem);
  const auto found = answers.find(key);
  if (found != answers.end()) return found->second;
  kernel_info<T, kCached>(device);  // the dynamic shared memory opt-in must precede the queries
  const RelaxedCaptureMode relaxed;
  int answer = 0;
  if (cluster == 0) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&answer, sample_kernel<T, kCached>,
                                                                 kThreads, smem));
  } else {
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t config = launch_config(cluster, 1, smem, nullptr, attr);
    // An error (e.g. clusters unsupported in this context) counts as "cannot co-schedule".
    if (cudaOccupancyMaxActiveClusters(&answer, sample_kernel<T, kCached>, &config) != cudaSuccess) {
      (void)cudaGetLastError();
      answer = 0;
    }
  }
  answers.emplace(key, answer);
  return answer;
}

template <typename T, bool kCached>
void launch_rows(int64_t* out, const T* logits, const float* temperature, const int32_t* top_k, const float* top_p,
                 const int64_t* rng_state, int64_t out_stride, int64_t row_stride, int64_t batch, int vocab,
                 int chunk, int cluster, size_t smem, cudaStream_t stream) {
  constexpr int64_t kMaxGridY = 65535;
  for (int64_t r0 = 0; r0 < batch; r0 += kMaxGridY) {
    const int64_t rows = std::min(kMaxGridY, batch - r0);
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t config = launch_config(cluster, rows, smem, stream, attr);
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, sample_kernel<T, kCached>, out + r0 * out_stride,
                                      logits + r0 * row_stride, temperature + r0, top_k + r0, top_p + r0, rng_state,
                                      out_stride, row_stride, vocab, chunk, cluster, static_cast<int>(r0)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// LLMKERNELS_SAMPLE_MAX_CLUSTER = 1, 2 or 4 caps the cluster size (read once per process). At 1 a
// Hopper GPU takes the one-CTA-per-row path of older GPUs, so that path is tested and timed
// where no older GPU is at hand. Anything else leaves the cap at kMaxCluster.
int max_cluster_from_env() {
  static const int cap = [] {
    const char* value = std::getenv("LLMKERNELS_SAMPLE_MAX_CLUSTER");
    const int c = value != nullptr ? std::atoi(value) : kMaxCluster;
    return c == 1 || c == 2 || c == 4 ? c : kMaxCluster;
  }();
  return cap;
}

template <typename T>
void launch_sample(at::Tensor& out, const at::Tensor& logits, const at::Tensor& temperature,
                   const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& rng_state,
                   cudaStream_t stream) {
  const int device = logits.get_device();
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "sample: unsupported device index ", lk_num(device));
  const DeviceInfo& d = device_info(device);
  const KernelInfo& cached = kernel_info<T, true>(device);
  const int64_t batch = logits.size(0);
  const int vocab = static_cast<int>(logits.size(1));

  // Cluster size: 8 CTAs per row while that leaves the GPU under-filled (batch 1 is latency-bound),
  // fewer for large batches (fewer cluster barriers once rows fill every SM), but not below the
  // size whose slices still allow two CTAs per SM (occupancy API: static + slice + the per-CTA
  // reserve, twice, within the SM's shared memory: ~80 KB slices on H100/H200, ~48 KB on A100).
  auto chunk_for = [&](int c) { return static_cast<int>((ceil_div(vocab, c) + 7) / 8 * 8); };
  auto slice_bytes = [&](int c) { return static_cast<size_t>(chunk_for(c)) * sizeof(T); };
  auto fits = [&](int c) {
    return static_cast<int64_t>(slice_bytes(c)) <= d.smem_optin - cached.static_smem;
  };
  const int max_cluster = max_cluster_from_env();
  const bool clusters = d.major >= 9 && cached.ptx_arch >= 90 && max_cluster > 1;
  int cluster = 1;
  if (clusters) {
    cluster = max_cluster;
    while (cluster > 1 && batch * (cluster / 2) >= 2 * static_cast<int64_t>(d.sms) &&
           fits(cluster / 2) && occupancy<T, true>(device, 0, slice_bytes(cluster / 2)) >= 2) {
      cluster /= 2;
    }
  }
  while (clusters && !fits(cluster) && cluster < max_cluster) cluster *= 2;
  // A cluster the device cannot co-schedule would fail to launch: halve it (a larger slice per
  // CTA, re-read from L2 when it no longer fits shared memory).
  while (cluster > 1 &&
         (fits(cluster) ? occupancy<T, true>(device, cluster, slice_bytes(cluster))
                        : occupancy<T, false>(device, cluster, 0)) == 0) {
    cluster /= 2;
  }
  const int chunk = chunk_for(cluster);

  auto* out_ptr = out.data_ptr<int64_t>();
  const auto* logits_ptr = static_cast<const T*>(logits.data_ptr());
  const auto* t_ptr = temperature.data_ptr<float>();
  const auto* k_ptr = top_k.data_ptr<int32_t>();
  const auto* p_ptr = top_p.data_ptr<float>();
  const auto* rng_ptr = rng_state.data_ptr<int64_t>();
  if (fits(cluster)) {
    launch_rows<T, true>(out_ptr, logits_ptr, t_ptr, k_ptr, p_ptr, rng_ptr, out.stride(0), logits.stride(0), batch,
                         vocab, chunk, cluster, static_cast<size_t>(chunk) * sizeof(T), stream);
  } else {  // slices too large for shared memory: every pass re-reads the row (L2)
    launch_rows<T, false>(out_ptr, logits_ptr, t_ptr, k_ptr, p_ptr, rng_ptr, out.stride(0), logits.stride(0), batch,
                          vocab, chunk, cluster, 0, stream);
  }
}

void check_param(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t batch, const at::Tensor& logits) {
  LK_CHECK_CUDA(t);
  TORCH_CHECK(t.device() == logits.device(), name, " must be on the logits' device");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == batch, name, " must have shape [", lk_num(batch), "], got ", lk_shape(t));
  TORCH_CHECK(batch <= 1 || t.stride(0) == 1, name, " must be contiguous");
}

void sample(at::Tensor& out, const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
            const at::Tensor& top_p, at::Tensor& rng_state) {
  LK_CHECK_CUDA(logits);
  TORCH_CHECK(logits.dim() == 2, "logits must be 2-D [B, V], got ", lk_shape(logits));
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab > 0, "logits must have a non-empty vocabulary dimension");
  TORCH_CHECK(vocab <= (int64_t{1} << 30), "sample: vocabulary too large (", lk_num(vocab), ")");
  TORCH_CHECK(vocab <= 1 || logits.stride(1) == 1, "logits must have a contiguous last dimension (stride 1)");
  TORCH_CHECK(logits.stride(0) >= 0, "logits must have a non-negative row stride");
  LK_CHECK_CUDA(out);
  TORCH_CHECK(out.device() == logits.device(), "out must be on the logits' device");
  LK_CHECK_DTYPE(out, at::kLong);
  TORCH_CHECK(out.dim() == 1 && out.size(0) == batch, "out must have shape [", lk_num(batch), "], got ", lk_shape(out));
  check_param(temperature, "temperature", at::kFloat, batch, logits);
  check_param(top_k, "top_k", at::kInt, batch, logits);
  check_param(top_p, "top_p", at::kFloat, batch, logits);
  LK_CHECK_CUDA(rng_state);
  TORCH_CHECK(rng_state.device() == logits.device(), "rng_state must be on the logits' device");
  LK_CHECK_DTYPE(rng_state, at::kLong);
  TORCH_CHECK(rng_state.dim() == 1 && rng_state.size(0) == 2 && rng_state.stride(0) == 1,
              "rng_state must be a contiguous int64 [2] tensor (seed, offset), got ", lk_shape(rng_state));

  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (batch > 0) {
    LK_DISPATCH_FLOATING(logits.scalar_type(), "sample", [&] {
      launch_sample<scalar_t>(out, logits, temperature, top_k, top_p, rng_state, stream);
    });
  }
  advance_rng_kernel<<<1, 1, 0, stream>>>(rng_state.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(llmkernels, CUDA, m) { m.impl("sample", &sample); }

}  // namespace llmkernels
