// Internal to varlen_attention: the work-item kernel shared by every ISA.
//
// varlen_attention.cpp validates, cuts the batch into work items, owns the scratch
// memory and dispatches; varlen_attention_{avx2,avx512}.cpp instantiate attend_item<>
// with their vector types. Everything defined here lives in an anonymous namespace
// (and uses no std:: templates that are compiled out of line), so that copies compiled
// with different -m flags can never be merged by the linker.
//
// One item is a block of query rows of one sequence for one KV head and the query heads
// that read it. Its keys are packed once: K transposed to [head_dim, keys] and V to
// [keys, head_dim padded], so that both products are register-tiled like a matmul:
// scores[R rows, keys] = Q K^T broadcasting
// a query element against key vectors, then out[R rows, dims] = P V broadcasting a
// probability against value vectors. Softmax runs over a whole row of scores at once
// (the scratch holds every key of the sequence), so nothing is rescaled online.
#pragma once

#include <math.h>

#include <cstdint>

namespace engine {
namespace varlen {

// The validated arguments of one call, as raw pointers and element strides.
struct Args {
  const float* q;          // [num_tokens, num_heads, head_dim], dim stride 1
  int64_t q_token_stride, q_head_stride;
  const float* k;          // [num_tokens, num_kv_heads, head_dim], dim stride 1
  int64_t k_token_stride, k_head_stride;
  const float* v;          // same shape as k
  int64_t v_token_stride, v_head_stride;
  float* out;              // [num_tokens, num_heads, head_dim], dim stride 1
  int64_t out_token_stride, out_head_stride;
  int64_t head_dim;
  int64_t group;           // num_heads / num_kv_heads
  float scale;
  bool causal;
};

// Query rows [row_begin, row_end) (indices within the sequence) of the query heads that
// read KV head `kv_head`, for the sequence whose tokens are [seq_begin, seq_begin + seq_len).
struct Item {
  int64_t seq_begin, seq_len, kv_head, row_begin, row_end;
};

// The most floats attend_item uses of its scratch for a sequence of seq_len tokens.
inline int64_t scratch_floats(int64_t seq_len, int64_t head_dim) {
  constexpr int64_t kMaxWidth = 16, kMaxRows = 16;  // the widest vector and tile of any ISA
  const int64_t lk = (seq_len + kMaxWidth - 1) / kMaxWidth * kMaxWidth;
  const int64_t dp = (head_dim + kMaxWidth - 1) / kMaxWidth * kMaxWidth;
  return head_dim * lk + seq_len * dp + kMaxRows * lk + kMaxRows * dp;
}

// Per-ISA instantiations (varlen_attention_avx2.cpp, varlen_attention_avx512.cpp).
void attend_item_avx2(const Args& a, const Item& it, float* scratch);
void attend_item_avx512(const Args& a, const Item& it, float* scratch);

namespace {

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---- register tiles ----------------------------------------------------------------
// Ops: kWidth floats per Vec; zero, load, store, set1, fma(a, b, c) = a * b + c, mul,
// max, reduce_max, reduce_add, exp (for x <= 0; NaN stays NaN).

// s[r * ls + 0 .. NV * W) = scale * (q[r] . kt[d * lk + j]) for the NV * W keys at kt.
template <class Ops, int R, int NV>
inline void score_tile(const float* const* q, int64_t dim, const float* kt, int64_t lk,
                       float scale, float* s, int64_t ls) {
  using Vec = typename Ops::Vec;
  constexpr int W = Ops::kWidth;
  Vec acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = Ops::zero();
  for (int64_t d = 0; d < dim; ++d) {
    Vec kv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) kv[v] = Ops::load(kt + d * lk + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const Vec qd = Ops::set1(q[r][d]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = Ops::fma(qd, kv[v], acc[r][v]);
    }
  }
  const Vec vs = Ops::set1(scale);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) Ops::store(s + r * ls + v * W, Ops::mul(acc[r][v], vs));
}

// o[r * lo + 0 .. NV * W) = sum_{j < n} p[r * lp + j] * vp[j * lv + 0 .. NV * W).
template <class Ops, int R, int NV>
inline void value_tile(const float* p, int64_t lp, int64_t n, const float* vp, int64_t lv,
                       float* o, int64_t lo) {
  using Vec = typename Ops::Vec;
  constexpr int W = Ops::kWidth;
  Vec acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = Ops::zero();
  for (int64_t j = 0; j < n; ++j) {
    Vec vv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) vv[v] = Ops::load(vp + j * lv + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const Vec pj = Ops::set1(p[r * lp + j]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = Ops::fma(pj, vv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) Ops::store(o + r * lo + v * W, acc[r][v]);
}

// In place over s[0 .. lp): exp(s - max(s[0 .. valid))) for j < valid, exactly 0 after.
// Returns the sum. lp is a multiple of the vector width.
template <class Ops>
inline float softmax_row(float* s, int64_t valid, int64_t lp) {
  using Vec = typename Ops::Vec;
  constexpr int W = Ops::kWidth;
  for (int64_t j = valid; j < lp; ++j) s[j] = -INFINITY;
  Vec vm = Ops::set1(-INFINITY);
  for (int64_t j = 0; j < lp; j += W) vm = Ops::max(vm, Ops::load(s + j));
  const Vec m = Ops::set1(Ops::reduce_max(vm));
  for (int64_t j = 0; j < lp; j += W) Ops::store(s + j, Ops::exp(Ops::sub(Ops::load(s + j), m)));
  for (int64_t j = valid; j < lp; ++j) s[j] = 0.0f;  // exp(-inf) is clamped, not 0
  Vec sum = Ops::zero();
  for (int64_t j = 0; j < lp; j += W) sum = Ops::add(sum, Ops::load(s + j));
  return Ops::reduce_add(sum);
}

// R query rows: row i of the tile is row `row0 + i` of the sequence and sees keys
// [0, limit[i]) (limits non-decreasing). kt [dim, lk], vp [*, dp], s [R, lk], o [R, dp].
template <class Ops, int R>
void rows_tile(const Args& a, const float* const* q, float* const* out, const int64_t* limit,
               const float* kt, int64_t lk, const float* vp, int64_t dp, float* s, float* o) {
  constexpr int W = Ops::kWidth, NV = Ops::kVecs;
  const int64_t dim = a.head_dim;
  const int64_t keys = round_up(limit[R - 1], W);
  int64_t j = 0;
  for (; j + NV * W <= keys; j += NV * W)
    score_tile<Ops, R, NV>(q, dim, kt + j, lk, a.scale, s + j, lk);
  for (; j < keys; j += W) score_tile<Ops, R, 1>(q, dim, kt + j, lk, a.scale, s + j, lk);
  float inv_sum[R];
  for (int r = 0; r < R; ++r) inv_sum[r] = 1.0f / softmax_row<Ops>(s + r * lk, limit[r], keys);
  // Keys every row sees as one tile; a causal tile's later rows see a few more keys, added
  // row by row so that a row never multiplies (even by 0) a value it must not see.
  const int64_t common = limit[0];
  int64_t d0 = 0;
  for (; d0 + NV * W <= dp; d0 += NV * W)
    value_tile<Ops, R, NV>(s, lk, common, vp + d0, dp, o + d0, dp);
  for (; d0 < dp; d0 += W) value_tile<Ops, R, 1>(s, lk, common, vp + d0, dp, o + d0, dp);
  for (int r = 1; r < R; ++r)
    for (int64_t jj = common; jj < limit[r]; ++jj) {
      const float p = s[r * lk + jj];
      for (int64_t d = 0; d < dp; ++d) o[r * dp + d] += p * vp[jj * dp + d];
    }
  for (int r = 0; r < R; ++r)
    for (int64_t d = 0; d < dim; ++d) out[r][d] = o[r * dp + d] * inv_sum[r];
}

// rows_tile<Ops, n> for the runtime row count n in [1, R].
template <class Ops, int R>
inline void rows_tile_upto(int n, const Args& a, const float* const* q, float* const* out,
                           const int64_t* limit, const float* kt, int64_t lk, const float* vp,
                           int64_t dp, float* s, float* o) {
  if constexpr (R > 1) {
    if (n < R) {
      rows_tile_upto<Ops, R - 1>(n, a, q, out, limit, kt, lk, vp, dp, s, o);
      return;
    }
  }
  rows_tile<Ops, R>(a, q, out, limit, kt, lk, vp, dp, s, o);
}

// K of one KV head transposed to kt [dim, lk] (0 past num_keys), V to vp [num_keys, dp]
// (0 past dim).
inline void pack_head(const Args& a, const Item& it, int64_t num_keys, int64_t lk, int64_t dp,
                      float* kt, float* vp) {
  const int64_t dim = a.head_dim;
  const float* k = a.k + it.seq_begin * a.k_token_stride + it.kv_head * a.k_head_stride;
  const float* v = a.v + it.seq_begin * a.v_token_stride + it.kv_head * a.v_head_stride;
  for (int64_t j = 0; j < num_keys; ++j) {
    const float* kj = k + j * a.k_token_stride;
    for (int64_t d = 0; d < dim; ++d) kt[d * lk + j] = kj[d];
    const float* vj = v + j * a.v_token_stride;
    for (int64_t d = 0; d < dim; ++d) vp[j * dp + d] = vj[d];
    for (int64_t d = dim; d < dp; ++d) vp[j * dp + d] = 0.0f;
  }
  for (int64_t d = 0; d < dim; ++d)
    for (int64_t j = num_keys; j < lk; ++j) kt[d * lk + j] = 0.0f;
}

template <class Ops>
void attend_item(const Args& a, const Item& it, float* scratch) {
  constexpr int W = Ops::kWidth, R = Ops::kRows;
  const int64_t dim = a.head_dim, dp = round_up(dim, W);
  const int64_t num_keys = a.causal ? it.row_end : it.seq_len;
  const int64_t lk = round_up(num_keys, W);
  float* kt = scratch;            // [dim, lk]        K transposed, 0 past num_keys
  float* vp = kt + dim * lk;      // [num_keys, dp]   V, 0 past dim
  float* s = vp + num_keys * dp;  // [R, lk]          scores, then probabilities
  float* o = s + R * lk;          // [R, dp]          unnormalised output rows
  pack_head(a, it, num_keys, lk, dp, kt, vp);  // once for all the query heads that read it

  const float* q[R];
  float* out[R];
  int64_t limit[R];
  for (int64_t head = it.kv_head * a.group; head < (it.kv_head + 1) * a.group; ++head)
    for (int64_t r0 = it.row_begin; r0 < it.row_end; r0 += R) {
      const int n = static_cast<int>(it.row_end - r0 < R ? it.row_end - r0 : R);
      for (int i = 0; i < n; ++i) {
        const int64_t t = it.seq_begin + r0 + i;
        q[i] = a.q + t * a.q_token_stride + head * a.q_head_stride;
        out[i] = a.out + t * a.out_token_stride + head * a.out_head_stride;
        limit[i] = a.causal ? r0 + i + 1 : it.seq_len;
      }
      rows_tile_upto<Ops, R>(n, a, q, out, limit, kt, lk, vp, dp, s, o);
    }
}

}  // namespace
}  // namespace varlen
}  // namespace engine
