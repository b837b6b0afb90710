// Order statistics over one row of logits, for a block of threads, without sorting:
// used by sample (top-k, top-p, the draw) and log_softmax_topk (the top k).
//
// The order is the samplers': logit descending, ties to the lower id. A position in it
// is a Cut {ord, id}: the elements "at or before" it are those with order_key(x) > ord,
// or == ord and id <= id. select_cut walks the order within a range of positions and
// returns the first element where the running weight (a count, or a fixed-point
// probability mass) reaches a target: a radix select on the 32-bit order key in three
// digit passes (11, 11, 10 bits) with shared-memory histograms, then the r-th lowest id
// among the elements of the final key (ties). Every pass re-reads the row (L1/L2).
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace engine_cuda {

// ============================================================================
// Order keys and positions
// ============================================================================

// A uint32 that orders like the float (-0 and +0 equal); NaN is never passed.
__device__ __forceinline__ uint32_t order_key(float x) {
  uint32_t u = __float_as_uint(x);
  if (u == 0x80000000u) u = 0;  // -0 == +0: the same key, ties go by id
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_to_float(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

struct Cut {
  uint32_t ord;
  int32_t id;
};

// Before every element (nothing is at or before it) / after every element.
__device__ __forceinline__ Cut cut_before_all() { return {0xFFFFFFFFu, -1}; }
__device__ __forceinline__ Cut cut_after_all() { return {0u, INT_MAX}; }

__device__ __forceinline__ bool at_or_before(uint32_t o, int64_t i, Cut c) {
  return o > c.ord || (o == c.ord && i <= c.id);
}

// The earlier (tighter) of two positions.
__device__ __forceinline__ Cut earlier(Cut a, Cut b) {
  return (a.ord > b.ord || (a.ord == b.ord && a.id < b.id)) ? a : b;
}

// Elements strictly after `first` and at or before `last`.
__device__ __forceinline__ bool in_range(uint32_t o, int64_t i, Cut first, Cut last) {
  return !at_or_before(o, i, first) && at_or_before(o, i, last);
}

// ============================================================================
// Block helpers
// ============================================================================

constexpr int kBins = 2048;

struct SelectScratch {
  uint32_t cnt[kBins];   // elements per digit
  uint32_t lo[kBins];    // fixed-point mass per digit, low 32 bits (with carries)
  uint32_t hi[kBins];    // ... high 32 bits
  unsigned long long above;
  uint32_t digit;
  int32_t id;
  int32_t warp_sums[32];
};

// Exclusive prefix sum of v over the block (thread order); blockDim.x a multiple of 32.
__device__ __forceinline__ int64_t block_exclusive_scan(int64_t v, int32_t* warp_sums) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t incl = v;
  for (int off = 1; off < 32; off <<= 1) {
    const int64_t t = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += t;
  }
  if (lane == 31) warp_sums[warp] = static_cast<int32_t>(incl);
  __syncthreads();
  if (warp == 0) {
    const int64_t w = lane < static_cast<int>(blockDim.x >> 5) ? warp_sums[lane] : 0;
    int64_t wi = w;
    for (int off = 1; off < 32; off <<= 1) {
      const int64_t t = __shfl_up_sync(0xffffffffu, wi, off);
      if (lane >= off) wi += t;
    }
    warp_sums[lane] = static_cast<int32_t>(wi - w);
  }
  __syncthreads();
  const int64_t result = warp_sums[warp] + incl - v;
  __syncthreads();  // warp_sums may be reused at once
  return result;
}

// A 64-bit add into a (lo, hi) pair of 32-bit shared counters (native 32-bit atomics).
__device__ __forceinline__ void atomic_add_u64(uint32_t* lo, uint32_t* hi, uint64_t v) {
  const uint32_t lo_part = static_cast<uint32_t>(v);
  const uint32_t old = atomicAdd(lo, lo_part);
  const uint32_t carry = (old + lo_part < old) ? 1u : 0u;
  const uint32_t hi_part = static_cast<uint32_t>(v >> 32) + carry;
  if (hi_part) atomicAdd(hi, hi_part);
}

__device__ __forceinline__ bool crosses(uint64_t cum, double target, bool ge) {
  const double c = static_cast<double>(cum);
  return ge ? c >= target : c > target;
}

// Warp 0, after a histogram pass: the highest non-empty digit whose running weight
// (above + weight of higher digits + its own) crosses the target, else the lowest
// non-empty digit. Writes s.digit and s.above (the weight before that digit).
template <bool kMass>
__device__ void scan_bins(SelectScratch& s, uint64_t above, double target, bool ge) {
  const int lane = threadIdx.x & 31;
  constexpr int kPerLane = kBins / 32;
  auto weight = [&](int d) -> uint64_t {
    return kMass ? (static_cast<uint64_t>(s.hi[d]) << 32) + s.lo[d] : s.cnt[d];
  };
  uint64_t lane_sum = 0;
  for (int j = 0; j < kPerLane; ++j) lane_sum += weight(kBins - 1 - (lane * kPerLane + j));
  uint64_t incl = lane_sum;
  for (int off = 1; off < 32; off <<= 1) {
    const uint64_t t = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += t;
  }
  uint64_t run = above + (incl - lane_sum);
  int found = -1, last = -1;
  uint64_t found_above = 0, last_above = 0;
  for (int j = 0; j < kPerLane; ++j) {
    const int d = kBins - 1 - (lane * kPerLane + j);
    const uint64_t w = weight(d);
    if (s.cnt[d] > 0) {
      if (found < 0 && crosses(run + w, target, ge)) {
        found = d;
        found_above = run;
      }
      last = d;
      last_above = run;
    }
    run += w;
  }
  const unsigned any_found = __ballot_sync(0xffffffffu, found >= 0);
  int src, digit;
  uint64_t before;
  if (any_found) {
    src = __ffs(any_found) - 1;  // lowest lane = highest digits
    digit = __shfl_sync(0xffffffffu, found, src);
    before = __shfl_sync(0xffffffffu, found_above, src);
  } else {
    const unsigned any_last = __ballot_sync(0xffffffffu, last >= 0);
    src = 31 - __clz(any_last);  // highest lane = lowest digits
    digit = __shfl_sync(0xffffffffu, last, src);
    before = __shfl_sync(0xffffffffu, last_above, src);
  }
  if (lane == 0) {
    s.digit = static_cast<uint32_t>(digit);
    s.above = before;
  }
}

// The r-th lowest id (r >= 1) among the elements in (first, last] whose key is t.
__device__ inline int32_t rth_id(const float* row, int64_t vocab, Cut first, Cut last, uint32_t t,
                          int64_t r, SelectScratch& s) {
  if (r == 1) {
    if (threadIdx.x == 0) s.id = INT_MAX;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
      const uint32_t o = order_key(row[i]);
      if (o == t && in_range(o, i, first, last)) atomicMin(&s.id, static_cast<int32_t>(i));
    }
    __syncthreads();
    const int32_t id = s.id;
    __syncthreads();
    return id;
  }
  // Contiguous chunks per thread: count, scan, then the owner of the r-th walks its chunk.
  const int64_t chunk = (vocab + blockDim.x - 1) / blockDim.x;
  const int64_t begin = min(vocab, threadIdx.x * chunk), end = min(vocab, begin + chunk);
  if (threadIdx.x == 0) s.id = INT_MAX;  // ordered before the write by the scan's barriers
  int64_t n = 0;
  for (int64_t i = begin; i < end; ++i) {
    const uint32_t o = order_key(row[i]);
    n += (o == t && in_range(o, i, first, last)) ? 1 : 0;
  }
  const int64_t before = block_exclusive_scan(n, s.warp_sums);
  if (before < r && r <= before + n) {
    int64_t left = r - before;
    for (int64_t i = begin; i < end; ++i) {
      const uint32_t o = order_key(row[i]);
      if (o == t && in_range(o, i, first, last) && --left == 0) {
        s.id = static_cast<int32_t>(i);
        break;
      }
    }
  }
  __syncthreads();
  const int32_t id = s.id;
  __syncthreads();
  return id;
}

// ============================================================================
// The select
// ============================================================================

// Walks the elements in (first, last] in order (the range must not be empty) and returns
// the position of the first one where the running weight w (1 per element, or
// weight(x) when kMass) reaches target: >= target if ge, else > target. If none does,
// the last element of the range. Every thread of the block calls it and gets the result.
template <bool kMass, typename Weight>
__device__ Cut select_cut(const float* row, int64_t vocab, Cut first, Cut last, double target,
                          bool ge, const Weight& weight, SelectScratch& s) {
  uint32_t prefix = 0;
  uint64_t above = 0;
  uint32_t tie_count = 0;
  for (int level = 0; level < 3; ++level) {
    const int shift = level == 0 ? 21 : level == 1 ? 10 : 0;
    const int fixed = level == 0 ? 32 : level == 1 ? 21 : 10;  // key bits above the digit
    const uint32_t mask = level == 2 ? 1023u : 2047u;
    for (int d = threadIdx.x; d < kBins; d += blockDim.x) s.cnt[d] = s.lo[d] = s.hi[d] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float x = row[i];
      const uint32_t o = order_key(x);
      if ((static_cast<uint64_t>(o) >> fixed) != (static_cast<uint64_t>(prefix) >> fixed)) continue;
      if (!in_range(o, i, first, last)) continue;
      const uint32_t d = (o >> shift) & mask;
      atomicAdd(&s.cnt[d], 1u);
      if (kMass) atomic_add_u64(&s.lo[d], &s.hi[d], weight(x));
    }
    __syncthreads();
    if (threadIdx.x < 32) scan_bins<kMass>(s, above, target, ge);
    __syncthreads();
    const uint32_t d = s.digit;
    above = s.above;
    prefix |= d << shift;
    tie_count = s.cnt[d];
    __syncthreads();  // the next level clears the bins
  }
  // All elements of key `prefix` in the range weigh the same w: take the fewest r of them
  // (in id order) that cross, at least 1 and at most all of them.
  const uint64_t w = kMass ? weight(key_to_float(prefix)) : 1;
  int64_t r;
  if (w == 0) {
    r = crosses(above, target, ge) ? 1 : tie_count;
  } else {
    const double q = (target - static_cast<double>(above)) / static_cast<double>(w);
    const double rr = ge ? ceil(q) : floor(q) + 1.0;
    r = !(rr >= 1.0) ? 1 : rr >= static_cast<double>(tie_count) ? tie_count : static_cast<int64_t>(rr);
    // the same crossing test as the scan, exactly
    while (r > 1 && crosses(above + static_cast<uint64_t>(r - 1) * w, target, ge)) --r;
    while (r < tie_count && !crosses(above + static_cast<uint64_t>(r) * w, target, ge)) ++r;
  }
  return {prefix, rth_id(row, vocab, first, last, prefix, r, s)};
}

}  // namespace engine_cuda
