// quant_matmul kernels for AVX-512 with VNNI (vpdpbusd: 64 u8 x i8 products summed into
// 16 i32 lanes per instruction). Called only where the CPU reports avx512vnni; other
// AVX-512 CPUs run the AVX2 kernels.
//
// A step is 64 weight values (two 32-value blocks, or a quarter of a 256-value super-block)
// held as unsigned bytes: q8_0 as q + 128, the others as their stored unsigned codes. Lane
// i of the i32 dot holds values 4i .. 4i + 3. The unsigned offset (128, 8, 32) comes back
// out through the accumulator's start value, -offset * (sum of the lane's 4 x codes).
//
// A group is 16 blocks (512 values) of the 32-value formats or one super-block: its scales
// are read once into a vector (one lane per 32 values; q6_k: per 16) and each step permutes
// them onto its lanes. For one token the group's scales are multiplied by the activation
// scales once; for a min (q4_1, q4_k), sum(min * d_x * sum(q_x)) is one FMA per group.
#pragma GCC target("avx512vnni")
#include <immintrin.h>

#include <cstring>

#include "quant_kernels.h"

namespace engine {
namespace quant_detail {
namespace {

// ---- helpers -----------------------------------------------------------------------

inline __m512i load_pair256(const uint8_t* lo, const uint8_t* hi) {
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo));
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi));
  return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
}

inline __m128i load128(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// Two blocks of 16 nibble bytes -> 64 codes in value order: [a & 15, a >> 4, b & 15, b >> 4].
inline __m512i nibbles_pair(__m128i a, __m128i b) {
  const __m256i ab = _mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1);
  const __m256i hi = _mm256_srli_epi16(ab, 4);
  const __m512i idx = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
  const __m512i v = _mm512_permutex2var_epi64(_mm512_castsi256_si512(ab), idx,
                                              _mm512_castsi256_si512(hi));
  return _mm512_and_si512(v, _mm512_set1_epi8(0x0F));
}

// Lanes [a x 8, b x 8] of v (one value per 32-value block onto the 8 lanes it owns).
inline __m512i idx_pairs(int a, int b) {
  return _mm512_setr_epi32(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b);
}

// The f16 at byte offset field of 16 blocks block_bytes apart (lanes past `mask` are 0).
inline __m512 gather_halves(const uint8_t* p, int block_bytes, __mmask16 mask, int shift = 0) {
  const __m512i offsets = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(block_bytes));
  __m512i words = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, offsets, p, 1);
  if (shift) words = _mm512_srli_epi32(words, shift);
  return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(words));
}

inline float half_at(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return _cvtsh_ss(v);
}

// ---- formats -------------------------------------------------------------------------
//
//   kGroupValues   values per group; kOffset the unsigned offset; kHasMin
//   group(row, g, num_blocks, out): out.scale (one lane per scale unit), out.min
//                  (one lane per 32-value block) for values [g * kGroupValues, ...),
//                  of which num_blocks 32-value blocks exist
//   codes<half>(row, g, j): the 64 codes of step j of group g (half: only the first 32)
//   scale_idx(j):  lanes of group.scale for the 16 lanes of step j
//   kScalesPerBlock: scale units per 32-value activation block (1, or 2 for q6_k)

struct Group {
  __m512 scale;
  __m512 min;
};

template <QuantFormat F> struct Fmt;

template <> struct Fmt<QuantFormat::q8_0> {
  static constexpr int kGroupValues = 512, kOffset = 128, kScalesPerBlock = 1;
  static constexpr bool kHasMin = false;
  static void group(const uint8_t* row, int64_t g, int num_blocks, Group& out) {
    out.scale = gather_halves(row + g * 16 * 34, 34, static_cast<__mmask16>((1u << num_blocks) - 1));
  }
  template <bool kHalf>
  static __m512i codes(const uint8_t* row, int64_t g, int j) {
    const uint8_t* a = row + (g * 16 + 2 * j) * 34;
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    if constexpr (kHalf)
      return _mm512_xor_si512(
          _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 2))), flip);
    return _mm512_xor_si512(load_pair256(a + 2, a + 36), flip);
  }
  static __m512i scale_idx(int j) { return idx_pairs(2 * j, 2 * j + 1); }
};

template <> struct Fmt<QuantFormat::q4_0> {
  static constexpr int kGroupValues = 512, kOffset = 8, kScalesPerBlock = 1;
  static constexpr bool kHasMin = false;
  static void group(const uint8_t* row, int64_t g, int num_blocks, Group& out) {
    out.scale = gather_halves(row + g * 16 * 18, 18, static_cast<__mmask16>((1u << num_blocks) - 1));
  }
  template <bool kHalf>
  static __m512i codes(const uint8_t* row, int64_t g, int j) {
    const uint8_t* a = row + (g * 16 + 2 * j) * 18;
    return nibbles_pair(load128(a + 2), kHalf ? _mm_setzero_si128() : load128(a + 20));
  }
  static __m512i scale_idx(int j) { return idx_pairs(2 * j, 2 * j + 1); }
};

template <> struct Fmt<QuantFormat::q4_1> {
  static constexpr int kGroupValues = 512, kOffset = 0, kScalesPerBlock = 1;
  static constexpr bool kHasMin = true;
  static void group(const uint8_t* row, int64_t g, int num_blocks, Group& out) {
    const __mmask16 mask = static_cast<__mmask16>((1u << num_blocks) - 1);
    out.scale = gather_halves(row + g * 16 * 20, 20, mask);
    out.min = gather_halves(row + g * 16 * 20, 20, mask, 16);
  }
  template <bool kHalf>
  static __m512i codes(const uint8_t* row, int64_t g, int j) {
    const uint8_t* a = row + (g * 16 + 2 * j) * 20;
    return nibbles_pair(load128(a + 4), kHalf ? _mm_setzero_si128() : load128(a + 24));
  }
  static __m512i scale_idx(int j) { return idx_pairs(2 * j, 2 * j + 1); }
};

template <> struct Fmt<QuantFormat::q4_k> {
  static constexpr int kGroupValues = 256, kOffset = 0, kScalesPerBlock = 1;
  static constexpr bool kHasMin = true;
  static void group(const uint8_t* row, int64_t g, int, Group& out) {
    const uint8_t* b = row + g * 144;
    // ggml's unpacking of the 12 scale bytes into 8 scales, then 8 mins, a byte each.
    uint32_t u[4];
    std::memcpy(u, b + 4, 12);
    const uint32_t k1 = 0x3f3f3f3f, k2 = 0x0f0f0f0f, k3 = 0x03030303;
    u[3] = ((u[2] >> 4) & k2) | (((u[1] >> 6) & k3) << 4);
    const uint32_t mins_lo = u[1] & k1;
    u[1] = (u[2] & k2) | (((u[0] >> 6) & k3) << 4);
    u[2] = mins_lo;
    u[0] &= k1;
    const __m512 codes = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(u))));
    const __m512 scaled = _mm512_mul_ps(codes, _mm512_set1_ps(half_at(b)));
    const __m512 mins = _mm512_mul_ps(codes, _mm512_set1_ps(-half_at(b + 2)));
    out.scale = _mm512_maskz_mov_ps(0x00FF, scaled);
    out.min = _mm512_maskz_permutexvar_ps(
        0x00FF, _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 0, 0, 0, 0, 0, 0, 0, 0), mins);
  }
  template <bool kHalf>
  static __m512i codes(const uint8_t* row, int64_t g, int j) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + g * 144 + 16 + 32 * j));
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1);
    return _mm512_and_si512(v, _mm512_set1_epi8(0x0F));
  }
  static __m512i scale_idx(int j) { return idx_pairs(2 * j, 2 * j + 1); }
};

template <> struct Fmt<QuantFormat::q6_k> {
  static constexpr int kGroupValues = 256, kOffset = 32, kScalesPerBlock = 2;
  static constexpr bool kHasMin = false;
  static void group(const uint8_t* row, int64_t g, int, Group& out) {
    const uint8_t* b = row + g * 210;
    const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load128(b + 192)));
    out.scale = _mm512_mul_ps(sc, _mm512_set1_ps(half_at(b + 208)));
  }
  template <bool kHalf>
  static __m512i codes(const uint8_t* row, int64_t g, int j) {
    const uint8_t* b = row + g * 210;
    const int half = j / 2, upper = j % 2;
    const __m512i ql = _mm512_loadu_si512(b + 64 * half);
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * half));
    const __m512i lo = _mm512_and_si512(upper ? _mm512_srli_epi16(ql, 4) : ql,
                                        _mm512_set1_epi8(0x0F));
    // bits 4-5 of each code: (qh >> 2k) & 3 for the four 32-value parts k of the half
    const __m256i h0 = upper ? qh : _mm256_slli_epi16(qh, 4);
    const __m256i h1 = upper ? _mm256_srli_epi16(qh, 2) : _mm256_slli_epi16(qh, 2);
    const __m512i hi = _mm512_and_si512(
        _mm512_inserti64x4(_mm512_castsi256_si512(h0), h1, 1), _mm512_set1_epi8(0x30));
    return _mm512_or_si512(lo, hi);
  }
  static __m512i scale_idx(int j) {
    const int a = 4 * j;
    return _mm512_setr_epi32(a, a, a, a, a + 1, a + 1, a + 1, a + 1, a + 2, a + 2, a + 2, a + 2,
                             a + 3, a + 3, a + 3, a + 3);
  }
};

// ---- the register tile ---------------------------------------------------------------

struct Avx512VnniKernel {
  template <QuantFormat F> static constexpr int rows() { return 4; }
  template <QuantFormat F> static constexpr int tokens() { return 4; }
  static constexpr int kGemvRows = 4;

  // acc[r][c] += step j of group g (values 64 s .. 64 s + 63 of the row).
  template <QuantFormat F, int R, int C, bool kHalf>
  static inline void step(const uint8_t* const (&rows)[R], const Group (&grp)[R],
                          const int8_t* const (&xq)[C], const float* const (&xd)[C],
                          __mmask16 bmask, int64_t g, int j, int64_t s, int64_t prefetch_bytes,
                          __m512 (&acc)[R][C]) {
    using T = Fmt<F>;
    __m512i q[R];
    __m512 ws[R];
    const __m512i sidx = T::scale_idx(j);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      q[r] = T::template codes<kHalf>(rows[r], g, j);
      ws[r] = _mm512_permutexvar_ps(sidx, grp[r].scale);
      if (C == 1)  // one token streams the weights: fetch the next tile's while computing
        _mm_prefetch(reinterpret_cast<const char*>(rows[r]) + prefetch_bytes, _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const __m512i xv = kHalf ? _mm512_maskz_loadu_epi8(0xFFFFFFFFull, xq[c] + 64 * s)
                               : _mm512_loadu_si512(xq[c] + 64 * s);
      __m512i seed = _mm512_setzero_si512();
      if constexpr (T::kOffset != 0)
        seed = _mm512_sub_epi32(seed, _mm512_dpbusd_epi32(
                                          _mm512_setzero_si512(),
                                          _mm512_set1_epi8(static_cast<char>(T::kOffset)), xv));
      __m512 dxs;
      if constexpr (C > 1)  // d_x of the step's two blocks (lanes past the group's end: 0)
        dxs = _mm512_permutexvar_ps(idx_pairs(2 * j, 2 * j + 1), _mm512_maskz_loadu_ps(bmask, xd[c]));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512i dot = _mm512_dpbusd_epi32(seed, q[r], xv);
        const __m512 f = C == 1 ? ws[r] : _mm512_mul_ps(ws[r], dxs);
        acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), f, acc[r][c]);
      }
    }
  }

  template <QuantFormat F, int R, int C>
  static void tile(const QuantArgs& a, const ActBlocks& x, int64_t t0, int64_t n0, int64_t k0,
                   int64_t k_len, bool accumulate) {
    using T = Fmt<F>;
    constexpr int kGroupBlocks = T::kGroupValues / 32;
    const int64_t k_total = a.in_features, nb = k_total / kActBlock;
    const uint8_t* rows[R];
    for (int r = 0; r < R; ++r) rows[r] = a.w + (n0 + r) * a.w_row_bytes;
    const int8_t* xq[C];
    const float* xd_row[C];
    const float* xs_row[C];
    for (int c = 0; c < C; ++c) {
      xq[c] = x.q + (t0 + c) * k_total;
      xd_row[c] = x.d + (t0 + c) * nb;
      xs_row[c] = x.s + (t0 + c) * nb;
    }
    __m512 acc[R][C];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    const int64_t block_end = (k0 + k_len) / 32;
    const int64_t prefetch_step = 64 * a.w_row_bytes / k_total;
    for (int64_t g = k0 / T::kGroupValues; g * kGroupBlocks < block_end; ++g) {
      const int64_t b0 = g * kGroupBlocks;
      const int num_blocks = static_cast<int>(std::min<int64_t>(kGroupBlocks, block_end - b0));
      const __mmask16 bmask = static_cast<__mmask16>((1u << num_blocks) - 1);
      Group grp[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) T::group(rows[r], g, num_blocks, grp[r]);
      if constexpr (C == 1) {  // fold d_x into the scales, lane by lane
        __m512 xd = _mm512_maskz_loadu_ps(bmask, xd_row[0] + b0);
        if constexpr (T::kScalesPerBlock == 2)
          xd = _mm512_permutexvar_ps(
              _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7), xd);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) grp[r].scale = _mm512_mul_ps(grp[r].scale, xd);
      }
      if constexpr (T::kHasMin) {  // sum over the group's blocks of min * d_x * sum(q_x)
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) {
          const __m512 xs = _mm512_maskz_loadu_ps(bmask, xs_row[c] + b0);
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) acc[r][c] = _mm512_fmadd_ps(grp[r].min, xs, acc[r][c]);
        }
      }
      const float* xd[C];
      for (int c = 0; c < C; ++c) xd[c] = xd_row[c] + b0;
      const int64_t s0 = b0 / 2;
      int j = 0;
      for (; 2 * j + 1 < num_blocks; ++j)
        step<F, R, C, false>(rows, grp, xq, xd, bmask, g, j, s0 + j,
                             R * a.w_row_bytes + (s0 + j) * prefetch_step, acc);
      if (2 * j < num_blocks)  // an odd block count: one 32-value block is left
        step<F, R, C, true>(rows, grp, xq, xd, bmask, g, j, s0 + j, R * a.w_row_bytes, acc);
    }
    for (int c = 0; c < C; ++c) {
      float* o = a.out + (t0 + c) * a.out_row_stride + n0;
      for (int r = 0; r < R; ++r)
        o[r] = (accumulate ? o[r] : a.bias ? a.bias[n0 + r] : 0.0f) +
               _mm512_reduce_add_ps(acc[r][c]);
    }
  }

  // Two blocks per iteration; a bit-exact copy of the portable quantiser's arithmetic.
  static void quantize_row(const float* x, int64_t k, int8_t* q, float* d, float* s) {
    const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    const __m512 big = _mm512_set1_ps(3.40282347e+38f);
    for (int64_t b = 0; b < k / kActBlock; ++b) {
      const __m512 v0 = _mm512_loadu_ps(x + 32 * b), v1 = _mm512_loadu_ps(x + 32 * b + 16);
      const __m512 a0 = _mm512_and_ps(v0, abs_mask), a1 = _mm512_and_ps(v1, abs_mask);
      const bool finite = (_mm512_cmp_ps_mask(a0, big, _CMP_NLE_UQ) |
                           _mm512_cmp_ps_mask(a1, big, _CMP_NLE_UQ)) == 0;
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
      const float db = amax / 127.0f, inv = db != 0.0f ? 1.0f / db : 0.0f;
      const __m512 iv = _mm512_set1_ps(finite ? inv : 0.0f);
      // not finite: inv = 0 still gives NaN codes; zero them as the portable path does
      const __mmask16 keep = finite ? 0xFFFF : 0;
      const __m512i q0 = _mm512_maskz_cvtps_epi32(keep, _mm512_mul_ps(v0, iv));
      const __m512i q1 = _mm512_maskz_cvtps_epi32(keep, _mm512_mul_ps(v1, iv));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 * b), _mm512_cvtsepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 * b + 16), _mm512_cvtsepi32_epi8(q1));
      const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
      d[b] = finite ? db : __builtin_nanf("");
      s[b] = d[b] * static_cast<float>(sum);
    }
  }
};

}  // namespace

void quant_matmul_avx512_vnni(const QuantArgs& a, const ActBlocks& x) {
  run_any<Avx512VnniKernel>(a, x);
}

}  // namespace quant_detail
}  // namespace engine
