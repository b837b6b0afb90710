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

namespace engine {
namespace attention {

// The validated arguments of one call, as raw pointers and element strides.
struct Args {
  const float* q;              // [num_tokens, num_q_heads, head_dim], dim stride 1
  int64_t q_token_stride, q_head_stride;
  const float* k_cache;        // [num_blocks, block_size, num_kv_heads, head_dim] contiguous
  const float* v_cache;        // same
  int64_t block_size, num_kv_heads, head_dim;
  int64_t group;               // num_q_heads / num_kv_heads
  const int32_t* block_tables; // [num_seqs, max_blocks]
  int64_t bt_seq_stride, bt_block_stride;
  float* out;                  // [num_tokens, num_q_heads, head_dim], dim stride 1
  int64_t out_token_stride, out_head_stride;
  float scale;
};

// Rows of a work item enumerate (new token, query head in the group) pairs:
// row = token * group + g. A tile holds at most kMaxRows of them.
constexpr int64_t kMaxRows = 32;
// KV tokens scored at once (one block or a piece of it): bounds the stack buffer.
constexpr int64_t kMaxChunk = 64;
// Decode prefetches the K and V lines of the position kAhead on into L2 (locality hint
// kHint): SmolLM2's 30 layers over 576 cached tokens, 2 threads, 2.0 -> 1.4 ms.
constexpr int64_t kAhead = 32;
constexpr int kHint = 2;

// One unit of parallel work: rows [row_begin, row_end) of sequence `seq` against
// KV head `kv_head`, over cached positions [kv_begin, kv_end) (clipped to each
// row's causal limit).
struct Item {
  int64_t seq, kv_head;
  int64_t q_start;     // token index of the sequence's first new token
  int64_t context_len; // seq_len - num_new: position of the first new token
  int64_t row_begin, row_end;
  int64_t kv_begin, kv_end;
};

// Where a row's accumulator lives: acc(row) = base + (row / group - token0) * token_stride
// + (row % group) * head_stride. For an unsplit item this is the row's `out` vector; for a
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

// Online softmax (FlashAttention-style) over one item, one KV chunk at a time. Each K/V
// chunk is read from memory once and reused by every row (all query heads of the group
// and all tokens of the tile) while it sits in L1.
//   Ops::dot(a, b, n) -> float                      a . b over n contiguous floats
//   Ops::dot4(a, b, b_stride, n, s)                  s[r] = a . b[r * b_stride : +n], r < 4
//   Ops::scale(y, alpha, n)                          y *= alpha
//   Ops::exp_sum(s, m, n) -> float                   s = exp(s - m), returns sum(s)
//   Ops::axpy_rows(y, p, x, x_stride, n, dim)        y += sum_j p[j] * x[j * x_stride : +dim]
template <typename Ops>
void attend_item(const Args& a, const Item& it, const Dest& d) {
  const int64_t D = a.head_dim, G = a.group;
  const int64_t num_rows = it.row_end - it.row_begin;
  const int64_t token_stride = a.num_kv_heads * D;       // between cache slots
  const int64_t block_stride = a.block_size * token_stride;
  const int32_t* table = a.block_tables + it.seq * a.bt_seq_stride;
  float m[kMaxRows], l[kMaxRows];
  const float* q[kMaxRows];
  float* acc[kMaxRows];
  int64_t limit[kMaxRows];  // row attends to positions < limit
  int64_t kv_end = it.kv_begin;
  for (int64_t i = 0; i < num_rows; ++i) {
    const int64_t r = it.row_begin + i, t = r / G, g = r % G;
    const int64_t h = it.kv_head * G + g;
    q[i] = a.q + (it.q_start + t) * a.q_token_stride + h * a.q_head_stride;
    acc[i] = d.base + (t - d.token0) * d.token_stride + g * d.head_stride;
    limit[i] = min_i64(it.context_len + t + 1, it.kv_end);
    kv_end = max_i64(kv_end, limit[i]);
    m[i] = -INFINITY;
    l[i] = 0.0f;
    for (int64_t j = 0; j < D; ++j) acc[i][j] = 0.0f;
  }
  const int64_t max_chunk = chunk_len(a);
  float s[kMaxChunk];
  for (int64_t pos = it.kv_begin; pos < kv_end;) {
    const int64_t block = pos / a.block_size, offset = pos % a.block_size;
    const int64_t n = min_i64(min_i64(a.block_size - offset, kv_end - pos), max_chunk);
    const int64_t phys = table[block * a.bt_block_stride];
    const int64_t base = phys * block_stride + offset * token_stride + it.kv_head * D;
    const float* k = a.k_cache + base;
    const float* v = a.v_cache + base;
    // One head's keys are D floats every token_stride: too sparse for the hardware
    // prefetcher, so fetch the lines kAhead positions on while this chunk is computed
    // (positions past kv_end are never looked up in the block table).
    for (int64_t j = 0; j < n; ++j) {
      const int64_t ahead = pos + j + kAhead;
      if (ahead >= kv_end) break;
      const int64_t at = table[(ahead / a.block_size) * a.bt_block_stride] * block_stride +
                         (ahead % a.block_size) * token_stride + it.kv_head * D;
      for (int64_t e = 0; e < D; e += 16) {
        __builtin_prefetch(a.k_cache + at + e, 0, kHint);
        __builtin_prefetch(a.v_cache + at + e, 0, kHint);
      }
    }
    for (int64_t i = 0; i < num_rows; ++i) {
      const int64_t valid = min_i64(n, limit[i] - pos);
      if (valid <= 0) continue;
      float chunk_max = -INFINITY;
      int64_t j = 0;
      for (; j + 4 <= valid; j += 4) Ops::dot4(q[i], k + j * token_stride, token_stride, D, s + j);
      for (; j < valid; ++j) s[j] = Ops::dot(q[i], k + j * token_stride, D);
      for (j = 0; j < valid; ++j) {
        s[j] *= a.scale;
        chunk_max = s[j] > chunk_max ? s[j] : chunk_max;
      }
      const float m_new = chunk_max > m[i] ? chunk_max : m[i];
      if (m_new != m[i] && m[i] != -INFINITY) {
        const float alpha = expf(m[i] - m_new);
        l[i] *= alpha;
        Ops::scale(acc[i], alpha, D);
      }
      m[i] = m_new;
      l[i] += Ops::exp_sum(s, m_new, valid);
      Ops::axpy_rows(acc[i], s, v, token_stride, valid, D);
    }
    pos += n;
  }
  for (int64_t i = 0; i < num_rows; ++i) {
    if (d.m != nullptr) {
      d.m[i] = m[i];
      d.l[i] = l[i];
    } else {
      Ops::scale(acc[i], 1.0f / l[i], D);
    }
  }
}

}  // namespace

// Per-ISA instantiations of attend_item (attention_avx2.cpp, attention_avx512.cpp).
void attend_item_avx2(const Args& a, const Item& it, const Dest& d);
void attend_item_avx512(const Args& a, const Item& it, const Dest& d);

}  // namespace attention
}  // namespace engine
