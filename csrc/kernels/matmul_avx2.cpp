// matmul kernels for AVX2 + FMA + F16C: 8 floats per vector.
// A register tile holds R weight rows x C tokens of accumulators along K; each
// weight vector is converted to f32 once and used by all C tokens. The K tail
// (fewer than 8 elements) is copied into zero-padded buffers and run as one more
// vector step, so no load reads past a row.
#include <immintrin.h>

#include "matmul_kernels.h"

namespace engine {
namespace matmul_detail {
namespace {

// ---- weight loads: 8 elements -> 8 floats ----------------------------------------

inline __m256 load_w(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load_w(const bf16_t* p) {  // bf16 is the top half of an f32
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load_w(const f16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// ---- reductions ------------------------------------------------------------------

// {sum(a), sum(b), sum(c), sum(d)}
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  __m256 ab = _mm256_hadd_ps(a, b);     // a01 a23 b01 b23 | a45 a67 b45 b67
  __m256 cd = _mm256_hadd_ps(c, d);
  __m256 abcd = _mm256_hadd_ps(ab, cd);  // a0-3 b0-3 c0-3 d0-3 | a4-7 ...
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// sum(v) in exactly hsum4's order, so a row's result does not depend on the tile shape
// (decode and prefill tiles differ): outputs are bit-identical in any batch.
inline float hsum(__m256 v) { return _mm_cvtss_f32(hsum4(v, v, v, v)); }

template <int R, int C>
inline void store_tile(__m256 (&acc)[R][C], const float* bias, bool accumulate, float* out,
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
    for (; r < R; ++r) o[r] = (accumulate ? o[r] : bias ? bias[r] : 0.0f) + hsum(acc[r][c]);
  }
}

// ---- the register tile -----------------------------------------------------------

struct Avx2Kernel {
  // 2 x 6 = 12 accumulators + 2 weight vectors of 16 ymm; x comes from memory operands.
  // Two rows by six tokens (not 4 x 3) halves the f16/bf16 conversions per FMA.
  static constexpr int kRows = 2;
  static constexpr int kTokens = 6;
  static constexpr int kGemvRows = 8;
  static constexpr bool kPanels = true;

  template <class W>
  static void convert(const W* w, int64_t ss, int64_t n, float* out) {
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) _mm256_storeu_ps(out + k, load_w(w + w_at(0, k, 0, ss)));
    for (; k < n; ++k) out[k] = to_f32(w[w_at(0, k, 0, ss)]);
  }

  template <int R, int C>
  static inline void step(__m256 (&acc)[R][C], const __m256 (&wv)[R], const float* x,
                          int64_t xs) {
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      __m256 xv = _mm256_loadu_ps(x + c * xs);
      // Loaded once for the R rows: GCC folds the load into each row's FMA otherwise, and
      // the 2 x 6 tile's 14 loads per 12 FMAs, not the FMAs, then bound the loop (one
      // thread, 128 x 2048 x 2048 on Zen 4: 49-68 -> 76-79 GFLOP/s).
      __asm__("" : "+x"(xv));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][c] = _mm256_fmadd_ps(wv[r], xv, acc[r][c]);
    }
  }

  template <int R, int C, class W>
  static void tile(const float* x, int64_t xs, const W* w, int64_t rs, int64_t ss, int64_t k_len,
                   const float* bias, bool accumulate, float* out, int64_t os) {
    __m256 acc[R][C];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= k_len; k += 8) {
      __m256 wv[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) wv[r] = load_w(w + w_at(r, k, rs, ss));
      step<R, C>(acc, wv, x + k, xs);
    }
    if (k < k_len) {  // zero-padded copies of the last k_len - k columns
      const int64_t n = k_len - k;
      alignas(32) float x_tail[C][8] = {};
      __m256 wv[R];
      for (int r = 0; r < R; ++r) {
        alignas(32) float w_tail[8] = {};
        for (int64_t i = 0; i < n; ++i) w_tail[i] = to_f32(w[w_at(r, k + i, rs, ss)]);
        wv[r] = _mm256_load_ps(w_tail);
      }
      for (int c = 0; c < C; ++c)
        for (int64_t i = 0; i < n; ++i) x_tail[c][i] = x[c * xs + k + i];
      step<R, C>(acc, wv, &x_tail[0][0], 8);
    }
    store_tile<R, C>(acc, bias, accumulate, out, os);
  }
};

}  // namespace

void matmul_avx2(const MatmulArgs& a) { run_matmul_any<Avx2Kernel>(a); }

}  // namespace matmul_detail
}  // namespace engine
