// Internal to paged_attention: the work-item kernel shared by every ISA.
//
// attention.cpp validates, splits the batch into work items and dispatches;
// attention_{avx2,avx512}.cpp instantiate attend_item<> with their vector
// primitives. Everything defined here lives in an anonymous namespace so that
// copies compiled with different -m flags can never be merged by the linker.
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "engine/convert.h"
#include "engine/prefetch.h"
#include "engine/tensor.h"

namespace engine {
namespace attention {

// The validated arguments of one call, as raw pointers and element strides.
struct Args {
  const float* q;              // [num_tokens, num_q_heads, head_dim], dim stride 1
  int64_t q_token_stride, q_head_stride;
  const void* k_cache;         // [num_blocks, block_size, num_kv_heads, head_dim] contiguous
  const void* v_cache;         // same
  DType cache_dtype;           // f32, bf16 or f16
  int64_t block_size, num_kv_heads, head_dim;
  int64_t group;               // num_q_heads / num_kv_heads
  const int32_t* block_tables; // [num_seqs, max_blocks]
  int64_t bt_seq_stride, bt_block_stride;
  float* out;                  // [num_tokens, num_q_heads, head_dim], dim stride 1
  int64_t out_token_stride, out_head_stride;
  float scale;
};

// Rows of a work item enumerate (new token, query head) pairs over the item's query heads,
// the groups of its num_heads KV heads: row = token * width + g, width = num_heads * group,
// and row g reads KV head kv_head + g / group. A tile holds at most kMaxRows of them.
constexpr int64_t kMaxRows = 32;
// KV tokens scored at once (one block or a piece of it): bounds the stack buffer.
constexpr int64_t kMaxChunk = 64;
// Decode prefetches the K and V lines of the position kAhead on into L2 (locality hint
// kHint): SmolLM2's 30 layers over 576 cached tokens, 2 threads, 2.0 -> 1.4 ms.
constexpr int64_t kAhead = 32;
constexpr int kHint = 2;
// Items of at most this many positions are prefetched whole when they start.
constexpr int64_t kUpfront = 128;

// One unit of parallel work: rows [row_begin, row_end) of sequence `seq` against
// KV heads [kv_head, kv_head + num_heads), over cached positions [kv_begin, kv_end)
// (clipped to each row's causal limit). A decode item takes every KV head, so that it
// reads each cached position's K and V rows whole, front to back.
struct Item {
  int64_t seq, kv_head, num_heads;
  int64_t q_start;     // token index of the sequence's first new token
  int64_t context_len; // seq_len - num_new: position of the first new token
  int64_t row_begin, row_end;
  int64_t kv_begin, kv_end;
};

// Where a row's accumulator lives: acc(row) = base + (row / width - token0) * token_stride
// + (row % width) * head_stride. For an unsplit item this is the row's `out` vector; for a
// split one it is scratch, and m / l (running max and sum) are saved for the merge.
struct Dest {
  float* base;
  int64_t token_stride, head_stride, token0;
  float* m;  // [rows] or nullptr: normalise in place instead
  float* l;  // [rows]
};

namespace {

// Local helpers rather than std::min / std::max: no out-of-line template copy compiled
// for one ISA can be picked by the linker for another.
inline int64_t min_i64(int64_t x, int64_t y) { return x < y ? x : y; }
inline int64_t max_i64(int64_t x, int64_t y) { return x > y ? x : y; }

inline int64_t chunk_len(const Args& a) {
  int64_t c = a.head_dim > 0 ? 4096 / a.head_dim : kMaxChunk;  // ~16 KiB of K per chunk
  return c < 1 ? 1 : (c > kMaxChunk ? kMaxChunk : c);
}

// The rows of one item: where each reads its query and accumulates, how far it looks,
// and its running max and sum.
struct Rows {
  int64_t n = 0;       // it.row_end - it.row_begin
  int64_t kv_end = 0;  // one past the last position any row attends to
  float m[kMaxRows], l[kMaxRows];
  const float* q[kMaxRows];
  float* acc[kMaxRows];
  int64_t limit[kMaxRows];  // row attends to positions < limit
  int64_t kv_offset[kMaxRows];  // of the row's KV head within a cache slot, in values
};

inline void init_rows(const Args& a, const Item& it, const Dest& d, Rows& r) {
  const int64_t D = a.head_dim, W = it.num_heads * a.group;
  r.n = it.row_end - it.row_begin;
  r.kv_end = it.kv_begin;
  for (int64_t i = 0; i < r.n; ++i) {
    const int64_t row = it.row_begin + i, t = row / W, g = row % W;
    const int64_t h = it.kv_head * a.group + g;
    r.q[i] = a.q + (it.q_start + t) * a.q_token_stride + h * a.q_head_stride;
    r.acc[i] = d.base + (t - d.token0) * d.token_stride + g * d.head_stride;
    r.kv_offset[i] = (g / a.group) * D;
    r.limit[i] = min_i64(it.context_len + t + 1, it.kv_end);
    r.kv_end = max_i64(r.kv_end, r.limit[i]);
    r.m[i] = -INFINITY;
    r.l[i] = 0.0f;
    for (int64_t j = 0; j < D; ++j) r.acc[i][j] = 0.0f;
  }
}

// Unsplit items normalise their rows in place; split ones save m and l for the merge.
inline void finish_rows(const Args& a, const Dest& d, const Rows& r) {
  for (int64_t i = 0; i < r.n; ++i) {
    if (d.m != nullptr) {
      d.m[i] = r.m[i];
      d.l[i] = r.l[i];
    } else {
      const float inv = 1.0f / r.l[i];
      for (int64_t j = 0; j < a.head_dim; ++j) r.acc[i][j] *= inv;
    }
  }
}

// Calls f(pos, n, k, v) for each run of at most max_chunk positions in [it.kv_begin,
// kv_end) that lies in one cache block; k and v point at the item's first KV head at the
// run's first position (positions token_stride = num_kv_heads * head_dim values apart).
template <typename T, typename F>
inline void for_each_chunk(const Args& a, const Item& it, int64_t kv_end, int64_t max_chunk,
                           F&& f) {
  const int64_t D = a.head_dim;
  const int64_t token_stride = a.num_kv_heads * D;
  const int64_t block_stride = a.block_size * token_stride;
  const int32_t* table = a.block_tables + it.seq * a.bt_seq_stride;
  const T* k_cache = static_cast<const T*>(a.k_cache);
  const T* v_cache = static_cast<const T*>(a.v_cache);
  // A short item's lines (a decode piece: at most 64 positions) are requested up front
  // too: they fit in L2, and from memory the running prefetch alone left decode waiting
  // (1B-shaped decode over 600 cold f16 positions, 2 threads: 187-251 -> 168-233 us).
  const int64_t upfront_end = kv_end - it.kv_begin <= kUpfront ? kv_end : it.kv_begin;
  for (int64_t pos = it.kv_begin; pos < upfront_end; ++pos) {
    const int64_t at = table[(pos / a.block_size) * a.bt_block_stride] * block_stride +
                       (pos % a.block_size) * token_stride + it.kv_head * D;
    for (int64_t e = 0; e < it.num_heads * D; e += 64 / static_cast<int64_t>(sizeof(T))) {
      __builtin_prefetch(k_cache + at + e, 0, kHint);
      __builtin_prefetch(v_cache + at + e, 0, kHint);
    }
  }
  for (int64_t pos = it.kv_begin; pos < kv_end;) {
    const int64_t block = pos / a.block_size, offset = pos % a.block_size;
    const int64_t n = min_i64(min_i64(a.block_size - offset, kv_end - pos), max_chunk);
    const int64_t base =
        table[block * a.bt_block_stride] * block_stride + offset * token_stride + it.kv_head * D;
    // Blocks are scattered and one head's keys are D values every token_stride: too
    // sparse for the hardware prefetcher, so fetch the item's lines kAhead positions on
    // while this chunk is computed (positions past kv_end are never looked up).
    for (int64_t j = 0; j < n; ++j) {
      const int64_t ahead = pos + j + kAhead;
      if (ahead >= kv_end) break;
      const int64_t at = table[(ahead / a.block_size) * a.bt_block_stride] * block_stride +
                         (ahead % a.block_size) * token_stride + it.kv_head * D;
      for (int64_t e = 0; e < it.num_heads * D; e += 64 / static_cast<int64_t>(sizeof(T))) {
        __builtin_prefetch(k_cache + at + e, 0, kHint);
        __builtin_prefetch(v_cache + at + e, 0, kHint);
      }
    }
    f(pos, n, k_cache + base, v_cache + base);
    pos += n;
  }
}

// One row's online-softmax update over `valid` positions of a chunk: k and v point at the
// row's KV head at the chunk's first position, positions `stride` values apart. U is the
// cache's element type, or float where the chunk was widened first.
template <typename Ops, typename U>
inline void row_chunk(const Args& a, Rows& rw, int64_t i, int64_t valid, const U* k,
                      const U* v, int64_t stride, float* s) {
  const int64_t D = a.head_dim;
  float chunk_max = -INFINITY;
  int64_t j = 0;
  for (; j + 4 <= valid; j += 4) Ops::dot4(rw.q[i], k + j * stride, stride, D, s + j);
  for (; j < valid; ++j) s[j] = Ops::dot(rw.q[i], k + j * stride, D);
  for (j = 0; j < valid; ++j) {
    s[j] *= a.scale;
    chunk_max = s[j] > chunk_max ? s[j] : chunk_max;
  }
  const float m_new = chunk_max > rw.m[i] ? chunk_max : rw.m[i];
  if (m_new != rw.m[i] && rw.m[i] != -INFINITY) {
    const float alpha = expf(rw.m[i] - m_new);
    rw.l[i] *= alpha;
    Ops::scale(rw.acc[i], alpha, D);
  }
  rw.m[i] = m_new;
  rw.l[i] += Ops::exp_sum(s, m_new, valid);
  Ops::axpy_rows(rw.acc[i], s, v, stride, valid, D);
}

// Floats a chunk's widened K (and as many for V) may take: 8 KiB each, in L1 with the rest.
constexpr int64_t kWidenFloats = 2048;
// Where the vector unit widens as it loads, a chunk is widened first only for at least this
// many query rows on one KV head (prefill tiles; not decode's group of 3 or 4).
constexpr int64_t kWidenRows = 8;

// Online softmax (FlashAttention-style) over one item, one KV chunk at a time. Each K/V
// chunk is read from memory once and reused by every row (all query heads of the group
// and all tokens of the tile) while it sits in L1. A bf16 / f16 chunk is widened to float
// once per KV head for the rows on it where that pays: always for software conversion
// (portable: 1B-shaped decode over 600 f16 positions, one thread, 3.7 -> 1.2 ms), and for
// prefill tiles with AVX2 (64 new tokens there: 9.0 -> 7.8 ms), but not for decode's few
// rows, which widen as they load (0.89x and 0.72x the time with 1B's and SmolLM2's heads).
// The widening is exact, so the sums are those of the cache's own values. T is the cache's
// element type (float, bf16_t or f16_t); a, y, p and s are float, b and x are T or float.
//   Ops::kSoftwareWiden                              widening is scalar code: always widen
//   Ops::dot(a, b, n) -> float                      a . b over n contiguous values
//   Ops::dot4(a, b, b_stride, n, s)                  s[r] = a . b[r * b_stride : +n], r < 4
//   Ops::scale(y, alpha, n)                          y *= alpha
//   Ops::exp_sum(s, m, n) -> float                   s = exp(s - m), returns sum(s)
//   Ops::axpy_rows(y, p, x, x_stride, n, dim)        y += sum_j p[j] * x[j * x_stride : +dim]
//   Ops::widen(x, x_stride, n, dim, y)               y[j * dim : +dim] = x[j * x_stride : +dim]
template <typename Ops, typename T>
void attend_item(const Args& a, const Item& it, const Dest& d) {
  const int64_t D = a.head_dim;
  const int64_t token_stride = a.num_kv_heads * D;
  Rows rw;
  init_rows(a, it, d, rw);
  float s[kMaxChunk];
  constexpr bool kWiden = !std::is_same<T, float>::value;
  const int64_t rows_per_head = it.num_heads == 1 ? rw.n : a.group;
  const bool widen = kWiden && D <= kWidenFloats &&
                     (Ops::kSoftwareWiden || rows_per_head >= kWidenRows);
  const int64_t max_chunk = widen ? min_i64(chunk_len(a), kWidenFloats / D) : chunk_len(a);
  alignas(64) float kw[kWiden ? kWidenFloats : 1];
  alignas(64) float vw[kWiden ? kWidenFloats : 1];
  auto chunk = [&](int64_t pos, int64_t n, const T* k, const T* v) {
    int64_t widened = -1;  // the KV head offset kw and vw hold
    for (int64_t i = 0; i < rw.n; ++i) {
      const int64_t valid = min_i64(n, rw.limit[i] - pos);
      if (valid <= 0) continue;
      const int64_t off = rw.kv_offset[i];
      if constexpr (kWiden) {
        if (widen) {
          if (off != widened) {
            Ops::widen(k + off, token_stride, n, D, kw);
            Ops::widen(v + off, token_stride, n, D, vw);
            widened = off;
          }
          row_chunk<Ops>(a, rw, i, valid, kw, vw, D, s);
          continue;
        }
      }
      row_chunk<Ops>(a, rw, i, valid, k + off, v + off, token_stride, s);
    }
  };
  for_each_chunk<T>(a, it, rw.kv_end, max_chunk, chunk);
  finish_rows(a, d, rw);
}

}  // namespace

// The calling thread's share of paged_attention's prefetch (engine/prefetch.h), set for
// the parallel region; the AVX-512 kernel requests a few lines of it per value row.
PrefetchCursor& thread_prefetch();

// Per-ISA instantiations of attend_item (attention_avx2.cpp, attention_avx512.cpp).
void attend_item_avx2(const Args& a, const Item& it, const Dest& d);
void attend_item_avx512(const Args& a, const Item& it, const Dest& d);

}  // namespace attention
}  // namespace engine
