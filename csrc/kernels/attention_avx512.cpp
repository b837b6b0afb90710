// paged_attention's vector primitives for AVX-512 (F, BW, VL, DQ); compiled with
// those flags (see CMakeLists.txt) and called only where the CPU has them.
#include <immintrin.h>

#include <cmath>

#include "attention_kernels.h"
#include "vec_exp.h"

namespace engine {
namespace attention {
namespace {

inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

// 16 cached values as float32 (bfloat16 widens by a shift, float16 by vcvtph2ps), all or
// the masked ones.
inline __m512 widen(__m256i h, bf16_t) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 widen(__m256i h, f16_t) { return _mm512_cvtph_ps(h); }
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(__mmask16 k, const float* p) { return _mm512_maskz_loadu_ps(k, p); }
template <typename T>
inline __m512 load16(const T* p) {
  return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), T{});
}
template <typename T>
inline __m512 load16(__mmask16 k, const T* p) {
  return widen(_mm256_maskz_loadu_epi16(k, p), T{});
}

struct Avx512Ops {
  static constexpr bool kSoftwareWiden = false;
  template <typename T>
  static float dot(const float* a, const T* b, int64_t n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
      s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b + i), s0);
      s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), load16(b + i + 16), s1);
    }
    for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b + i), s0);
    if (i < n) {
      const __mmask16 m = tail_mask(n - i);
      s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), load16(m, b + i), s1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  }

  // Four keys against one query: q is loaded once, and the four sums share one
  // reduction tree instead of four horizontal reductions.
  template <typename T>
  static void dot4(const float* a, const T* b, int64_t b_stride, int64_t n, float* s) {
    const T *b0 = b, *b1 = b + b_stride, *b2 = b + 2 * b_stride, *b3 = b + 3 * b_stride;
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 k = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
      const __m512 x = _mm512_maskz_loadu_ps(k, a + i);
      s0 = _mm512_fmadd_ps(x, load16(k, b0 + i), s0);
      s1 = _mm512_fmadd_ps(x, load16(k, b1 + i), s1);
      s2 = _mm512_fmadd_ps(x, load16(k, b2 + i), s2);
      s3 = _mm512_fmadd_ps(x, load16(k, b3 + i), s3);
    }
    auto fold = [](__m512 v) {
      return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    };
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(fold(s0), fold(s1)),
                                    _mm256_hadd_ps(fold(s2), fold(s3)));
    _mm_storeu_ps(s, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
  }

  static void scale(float* y, float alpha, int64_t n) {
    const __m512 va = _mm512_set1_ps(alpha);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_loadu_ps(y + i), va));
    if (i < n) {
      const __mmask16 m = tail_mask(n - i);
      _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, y + i), va));
    }
  }

  static float exp_sum(float* s, float m, int64_t n) {
    const __m512 vm = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + i), vm));
      _mm512_storeu_ps(s + i, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (i < n) {
      const __mmask16 k = tail_mask(n - i);
      const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + i), vm));
      _mm512_mask_storeu_ps(s + i, k, e);
      sum = _mm512_mask_add_ps(sum, k, sum, e);
    }
    return _mm512_reduce_add_ps(sum);
  }

  template <typename T>
  static void widen(const T* x, int64_t x_stride, int64_t n, int64_t dim, float* y) {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < dim; i += 16) {
        const __mmask16 k = dim - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(dim - i);
        _mm512_mask_storeu_ps(y + j * dim + i, k, load16(k, x + j * x_stride + i));
      }
  }

  // head_dim 64 and 128 take attend_item_fast below; any other size: one vector at a time.
  // Four accumulators (64 values of y) stay in registers across all n value rows: four
  // independent FMA chains rather than one.
  template <typename T>
  static void axpy_rows(float* y, const float* p, const T* x, int64_t x_stride, int64_t n,
                        int64_t dim) {
    int64_t i0 = 0;
    for (; i0 + 64 <= dim; i0 += 64) {
      __m512 acc[4];
      for (int e = 0; e < 4; ++e) acc[e] = _mm512_loadu_ps(y + i0 + 16 * e);
      for (int64_t j = 0; j < n; ++j) {
        const __m512 pj = _mm512_set1_ps(p[j]);
        const T* xj = x + j * x_stride + i0;
        for (int e = 0; e < 4; ++e) acc[e] = _mm512_fmadd_ps(pj, load16(xj + 16 * e), acc[e]);
      }
      for (int e = 0; e < 4; ++e) _mm512_storeu_ps(y + i0 + 16 * e, acc[e]);
    }
    for (int64_t i = i0; i < dim; i += 16) {
      const __mmask16 k = dim - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(dim - i);
      __m512 acc = _mm512_maskz_loadu_ps(k, y + i);
      for (int64_t j = 0; j < n; ++j)
        acc = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), load16(k, x + j * x_stride + i), acc);
      _mm512_mask_storeu_ps(y + i, k, acc);
    }
  }
};

// ---- head_dim 64 and 128: scores of 16 positions per row in one vector --------------

// Scores of R query rows of one KV head over the n <= 16 positions of a chunk: out[r] lane j
// = q_r . k[j * stride] for j < n, 0 past n. Each position's K is widened once for the R
// rows (the widening, more than the FMAs, bounds a decode row's work on AMD Zen 4: a single
// thread over 1B-shaped decode, 32 heads on 8 KV heads x 600 positions, 97 -> 83 us).
// Positions go 4 at a time: per row, a quad's 4 dot vectors fold (unpack and add, then
// shuffle and add) into one vector u holding, per 128-bit lane, partial sums of the 4
// positions; the 4 quads' vectors then fold across lanes into the 16 sums, one per lane.
template <int NV, int R, typename T>
inline void scores16_rows(const float* const (&q)[R], const T* k, int64_t stride, int64_t n,
                          __m512 (&out)[R]) {
  __m512 u[R][4];
#pragma GCC unroll 4
  for (int quad = 0; quad < 4; ++quad) {
    if (4 * quad >= n) {
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) u[r][quad] = _mm512_setzero_ps();
      continue;
    }
    __m512 kv[4][NV];
#pragma GCC unroll 4
    for (int jj = 0; jj < 4; ++jj) {
      const int j = 4 * quad + jj;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v)
        kv[jj][v] = j < n ? load16(k + j * stride + 16 * v) : _mm512_setzero_ps();
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      __m512 d[4];
#pragma GCC unroll 4
      for (int jj = 0; jj < 4; ++jj) {
        if (4 * quad + jj < n) {
          d[jj] = _mm512_mul_ps(_mm512_loadu_ps(q[r]), kv[jj][0]);
#pragma GCC unroll 8
          for (int v = 1; v < NV; ++v)
            d[jj] = _mm512_fmadd_ps(_mm512_loadu_ps(q[r] + 16 * v), kv[jj][v], d[jj]);
        } else {
          d[jj] = _mm512_setzero_ps();
        }
      }
      const __m512 t0 =
          _mm512_add_ps(_mm512_unpacklo_ps(d[0], d[1]), _mm512_unpackhi_ps(d[0], d[1]));
      const __m512 t1 =
          _mm512_add_ps(_mm512_unpacklo_ps(d[2], d[3]), _mm512_unpackhi_ps(d[2], d[3]));
      u[r][quad] = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, 0x44), _mm512_shuffle_ps(t0, t1, 0xEE));
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[r][0], u[r][1], 0x88),
                                    _mm512_shuffle_f32x4(u[r][0], u[r][1], 0xDD));
    const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[r][2], u[r][3], 0x88),
                                    _mm512_shuffle_f32x4(u[r][2], u[r][3], 0xDD));
    out[r] = _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
  }
}

// Up to kParts chunks of at most 16 positions (each within one cache block) whose
// softmax update is done at once: the serial part of a row's update (max, exp, sum) is
// then paid once per 64 positions instead of once per 16.
constexpr int kParts = 4;
template <typename T>
struct Span {
  int parts = 0;
  int64_t pos[kParts], n[kParts];
  const T* k[kParts];
  const T* v[kParts];
};

// Lines of paged_attention's prefetch requested per value row (4: 1B-shaped Q4_0 decode over
// 600 positions requests about half its o_proj; 8 did no better).
constexpr int64_t kAheadLines = 4;

// Rows [i0, i0 + R) (all on the KV head at offset `off`) over a span: scores, one online
// softmax update per row, then the value rows, each loaded once for all R rows. Row i sees
// a part's first valid positions only (causal limits in prefill tiles).
template <int NV, int R, typename T>
inline void span_rows(Rows& rw, int64_t i0, float scale, const Span<T>& sp, int64_t off,
                      int64_t stride) {
  alignas(64) float p[R][kParts][16];
  int64_t valid[R][kParts];
  float alpha[R];
  bool any = false;
  // Every row's scores over each part, K widened once per position for the R rows.
  __m512 scores[kParts][R];
  const float* q[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) q[r] = rw.q[i0 + r];
  for (int c = 0; c < sp.parts; ++c) {
    int64_t n = 0;
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const int64_t vc = min_i64(sp.n[c], rw.limit[i0 + r] - sp.pos[c]);
      valid[r][c] = vc > 0 ? vc : 0;
      n = max_i64(n, valid[r][c]);
    }
    if (n > 0) scores16_rows<NV, R>(q, sp.k[c] + off, stride, n, scores[c]);
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const int64_t i = i0 + r;
    alpha[r] = 1.0f;
    __m512 s[kParts];
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    bool seen = false;
    for (int c = 0; c < sp.parts; ++c) {
      const int64_t vc = valid[r][c];
      if (vc <= 0) continue;
      seen = true;
      const __mmask16 mask = tail_mask(vc);
      s[c] = _mm512_mul_ps(scores[c][r], _mm512_set1_ps(scale));
      vmax = _mm512_mask_max_ps(vmax, mask, vmax, s[c]);
    }
    if (!seen) continue;
    any = true;
    const float chunk_max = _mm512_reduce_max_ps(vmax);
    const float m_new = chunk_max > rw.m[i] ? chunk_max : rw.m[i];
    if (m_new != rw.m[i] && rw.m[i] != -INFINITY) alpha[r] = expf(rw.m[i] - m_new);
    rw.m[i] = m_new;
    __m512 sum = _mm512_setzero_ps();
    for (int c = 0; c < sp.parts; ++c) {
      if (valid[r][c] == 0) continue;
      const __m512 e = _mm512_maskz_mov_ps(tail_mask(valid[r][c]),
                                           exp512(_mm512_sub_ps(s[c], _mm512_set1_ps(m_new))));
      sum = _mm512_add_ps(sum, e);
      _mm512_store_ps(p[r][c], e);
    }
    rw.l[i] = rw.l[i] * alpha[r] + _mm512_reduce_add_ps(sum);
  }
  if (!any) return;
  __m512 acc[R][NV];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 8
    for (int e = 0; e < NV; ++e)
      acc[r][e] = _mm512_mul_ps(_mm512_loadu_ps(rw.acc[i0 + r] + 16 * e), a);
  }
  for (int c = 0; c < sp.parts; ++c) {
    int64_t lo = 16, hi = 0;  // every row sees [0, lo) of the part; some see [lo, hi)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      lo = min_i64(lo, valid[r][c]);
      hi = max_i64(hi, valid[r][c]);
    }
    const T* v = sp.v[c] + off;
    PrefetchCursor& ahead = thread_prefetch();
    for (int64_t j = 0; j < lo; ++j) {
      ahead.request(kAheadLines);
      __m512 x[NV];
      // Loaded once for the R rows: without the barrier GCC folds the load into each
      // row's FMA, and loads (one 512-bit a cycle) would bound the loop instead of FMAs.
#pragma GCC unroll 8
      for (int e = 0; e < NV; ++e) {
        x[e] = load16(v + j * stride + 16 * e);
        __asm__("" : "+v"(x[e]));
      }
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m512 pj = _mm512_set1_ps(p[r][c][j]);
#pragma GCC unroll 8
        for (int e = 0; e < NV; ++e) acc[r][e] = _mm512_fmadd_ps(pj, x[e], acc[r][e]);
      }
    }
    for (int64_t j = lo; j < hi; ++j) {  // causal tails of prefill rows
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        if (j >= valid[r][c]) continue;
        const __m512 pj = _mm512_set1_ps(p[r][c][j]);
#pragma GCC unroll 8
        for (int e = 0; e < NV; ++e)
          acc[r][e] = _mm512_fmadd_ps(pj, load16(v + j * stride + 16 * e), acc[r][e]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int e = 0; e < NV; ++e) _mm512_storeu_ps(rw.acc[i0 + r] + 16 * e, acc[r][e]);
}

// The rows of an item over a span: runs of rows on one KV head, R rows at a time.
template <int NV, typename T>
void span_all_rows(Rows& rw, float scale, const Span<T>& sp, int64_t stride) {
  constexpr int R = NV <= 4 ? 4 : 2;
  for (int64_t i = 0; i < rw.n;) {
    const int64_t off = rw.kv_offset[i];
    int64_t end = i + 1;
    while (end < rw.n && rw.kv_offset[end] == off) ++end;
    for (; i + R <= end; i += R) span_rows<NV, R>(rw, i, scale, sp, off, stride);
    switch (end - i) {  // the last few rows (a decode's group of 3 query heads, say)
      case 3: span_rows<NV, 3>(rw, i, scale, sp, off, stride); break;
      case 2: span_rows<NV, 2>(rw, i, scale, sp, off, stride); break;
      case 1: span_rows<NV, 1>(rw, i, scale, sp, off, stride); break;
      default: break;
    }
    i = end;
  }
}

// attend_item for head_dim = 16 * NV: chunks of at most 16 positions, gathered into spans
// of kParts chunks for each softmax update.
template <int NV, typename T>
void attend_item_fast(const Args& a, const Item& it, const Dest& d) {
  const int64_t stride = a.num_kv_heads * a.head_dim;
  Rows rw;
  init_rows(a, it, d, rw);
  Span<T> sp;
  for_each_chunk<T>(a, it, rw.kv_end, 16, [&](int64_t pos, int64_t n, const T* k, const T* v) {
    sp.pos[sp.parts] = pos;
    sp.n[sp.parts] = n;
    sp.k[sp.parts] = k;
    sp.v[sp.parts] = v;
    if (++sp.parts == kParts) {
      span_all_rows<NV>(rw, a.scale, sp, stride);
      sp.parts = 0;
    }
  });
  if (sp.parts > 0) span_all_rows<NV>(rw, a.scale, sp, stride);
  finish_rows(a, d, rw);
}

template <typename T>
void attend_typed(const Args& a, const Item& it, const Dest& d) {
  switch (a.head_dim) {
    case 64:
      return attend_item_fast<4, T>(a, it, d);
    case 128:
      return attend_item_fast<8, T>(a, it, d);
    default:
      return attend_item<Avx512Ops, T>(a, it, d);
  }
}

}  // namespace

void attend_item_avx512(const Args& a, const Item& it, const Dest& d) {
  with_float_type(a.cache_dtype, [&](auto t) { attend_typed<decltype(t)>(a, it, d); });
}

}  // namespace attention
}  // namespace engine
