// matmul kernels for AVX-512 (F+BW+VL+DQ, FMA, F16C): 16 floats per vector.
// A register tile holds R weight rows x C tokens of accumulators along K; each
// weight vector is converted to f32 once and used by all C tokens, each x vector
// once per R rows. K tails use masked loads, which never touch memory past the row.
#include <immintrin.h>

#include "matmul_kernels.h"

namespace engine {
namespace matmul_detail {
namespace {

// ---- weight loads: 16 elements -> 16 floats ------------------------------------

inline __m512 load_w(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_w(const bf16_t* p) {  // bf16 is the top half of an f32
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load_w(const f16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline __m512 load_w(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load_w(const bf16_t* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load_w(const f16_t* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

// ---- reductions ------------------------------------------------------------------

// {sum(a), sum(b), sum(c), sum(d)}
inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  auto fold = [](__m512 v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  };
  __m256 ab = _mm256_hadd_ps(fold(a), fold(b));  // a01 a23 b01 b23 | a45 a67 b45 b67
  __m256 cd = _mm256_hadd_ps(fold(c), fold(d));
  __m256 abcd = _mm256_hadd_ps(ab, cd);           // a0-3 b0-3 c0-3 d0-3 | a4-7 ...
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

template <int R, int C>
inline void store_tile(__m512 (&acc)[R][C], const float* bias, bool accumulate, float* out,
                       int64_t os) {
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) {
    float* o = out + c * os;
    int r = 0;
    if constexpr (R % 4 == 0) {
#pragma GCC unroll 8
      for (; r < R; r += 4) {
        __m128 s = hsum4(acc[r][c], acc[r + 1][c], acc[r + 2][c], acc[r + 3][c]);
        __m128 base = accumulate ? _mm_loadu_ps(o + r)
                      : bias     ? _mm_loadu_ps(bias + r)
                                 : _mm_setzero_ps();
        _mm_storeu_ps(o + r, _mm_add_ps(base, s));
      }
    }
    for (; r < R; ++r) {
      // hsum4's order, not _mm512_reduce_add_ps's: a row's result must not depend on
      // whether it sat in a 4-row tile or a tail (bit-identical outputs in any batch).
      float s = _mm_cvtss_f32(hsum4(acc[r][c], acc[r][c], acc[r][c], acc[r][c]));
      o[r] = (accumulate ? o[r] : bias ? bias[r] : 0.0f) + s;
    }
  }
}

// ---- the register tile -----------------------------------------------------------

struct Avx512Kernel {
  // 4 x 6 = 24 accumulators + 4 weight vectors of 32 zmm; x comes from memory operands.
  static constexpr int kRows = 4;
  static constexpr int kTokens = 6;
  static constexpr int kGemvRows = 8;
  static constexpr bool kPanels = true;

  template <class W>
  static void convert(const W* w, int64_t ss, int64_t n, float* out) {
    int64_t k = 0;
    for (; k + 16 <= n; k += 16, w += ss) _mm512_storeu_ps(out + k, load_w(w));
    if (k < n) {
      const __mmask16 m = static_cast<__mmask16>((1u << (n - k)) - 1u);
      _mm512_mask_storeu_ps(out + k, m, load_w(w, m));
    }
  }

  template <int R, int C, class W>
  static void tile(const float* x, int64_t xs, const W* w, int64_t rs, int64_t ss, int64_t k_len,
                   const float* bias, bool accumulate, float* out, int64_t os) {
    __m512 acc[R][C];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    // Rows only (ss == 16). A packed group is one stream, which the hardware prefetcher
    // follows best alone (1B f16 weights, 2 threads: a prefetch 2-8 KiB ahead cost 3-22%).
    const bool fetch_next_group = C == 1 && ss == 16;
    int64_t k = 0;
    for (; k + 16 <= k_len; k += 16, w += ss) {
      __m512 wv[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        wv[r] = load_w(w + r * rs);
        // Decode: fetch the next row group's line into L2 while computing. R interleaved
        // streams are too many for the hardware prefetcher to run far ahead of (K = 576:
        // 21 -> 30 GB/s; the 1B model's f16 rows of 2048 and 8192: 29.0 -> 31.5 GB/s on 2
        // threads). Into L1 the fill buffers cap it. A prefetch never faults.
        if (fetch_next_group && (k % (64 / sizeof(W))) == 0)
          _mm_prefetch(reinterpret_cast<const char*>(w + (r + R) * rs), _MM_HINT_T1);
      }
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) {
        __m512 xv = _mm512_loadu_ps(x + c * xs + k);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r][c] = _mm512_fmadd_ps(wv[r], xv, acc[r][c]);
      }
    }
    if (k < k_len) {
      const __mmask16 m = static_cast<__mmask16>((1u << (k_len - k)) - 1u);
      __m512 wv[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) wv[r] = load_w(w + r * rs, m);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) {
        __m512 xv = _mm512_maskz_loadu_ps(m, x + c * xs + k);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r][c] = _mm512_fmadd_ps(wv[r], xv, acc[r][c]);
      }
    }
    store_tile<R, C>(acc, bias, accumulate, out, os);
  }
};

}  // namespace

void matmul_avx512(const MatmulArgs& a) { run_matmul_any<Avx512Kernel>(a); }

}  // namespace matmul_detail
}  // namespace engine
