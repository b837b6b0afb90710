// quant_matmul for one token (decode) with AVX-512 VNNI: each weight row is streamed once,
// 4 rows at a time, 64 values per vpdpbusd against the token's codes.
//
// Rows in 4-row tiles (interleave 4, what the loader makes of q8_0 / q4_0 / q4_1) take
// step_tiled: each lane's dot is a whole block's, and the group is one stream the hardware
// prefetcher follows. Plain rows take the row-major steps, with the stream ahead prefetched:
// the lanes of a step's dot hold partial sums of 4 values, added into each block's exact
// integer dot. Either way the float work then follows the many-token kernel's order
// operation for operation (quant_avx512.h): the same token gives the same bits whichever
// kernel ran it.
#pragma GCC target("avx512vnni")
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "quant_avx512.h"

namespace engine {
namespace quant_detail {
namespace {

constexpr int kRows = 4;  // rows streamed together
// Prefetch distances past the row group: 8 KiB into L1, 16 KiB into L2 (measured on the
// 1B decode's weight stream: 23 -> 29 GB/s for q8_0 with both). step_q4x4 (q4_0, q4_1)
// issues the L2 one only: on the AMD EPYC the L1 one changed nothing (q8_0 1.00x, q4_0
// 1.03x without it; without the L2 one 0.76x and 0.81x).
constexpr int64_t kNearAhead = 8192, kFarAhead = 8192;

inline __m128i load128(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// q8_0's unsigned codes of blocks b, b + 1 (b even; kHalf: block b alone, the rest 0), a
// row's blocks `stride` bytes apart. (q4_0 / q4_1 take step_q4 below, the k-quants step_q4k
// and step_q6k.)
template <bool kHalf>
inline __m512i codes64(const uint8_t* row, int64_t b, int64_t stride) {
  const uint8_t* a = row + b * stride;
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 2));
  const __m256i hi = kHalf ? _mm256_set1_epi8(static_cast<char>(0x80))
                           : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + stride + 2));
  return _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1),
                          _mm512_set1_epi8(static_cast<char>(0x80)));
}

// The 4 rows a group streams: row r's block b at rows[r] + b * stride. Interleaved: the
// blocks of a tiled group past its whole quads (quant_kernels.h), stored whole, the 4 rows'
// block b in turn, one run of 4 blocks from rows[0] + b * stride on.
struct Group {
  const uint8_t* rows[kRows];
  int64_t stride;
  bool interleaved;
};

// Prefetches the lines of the step's run of `span` bytes from p on, `near` ahead into L1
// (kNear) and `far` ahead into L2: an interleaved step reads span contiguous bytes.
template <int kSpan, bool kNear>
inline void prefetch_run(const uint8_t* p, int64_t near, int64_t far) {
  const char* c = reinterpret_cast<const char*>(p);
#pragma GCC unroll 8
  for (int o = 0; o < kSpan; o += 64) {
    if (kNear) _mm_prefetch(c + near + o, _MM_HINT_T0);
    _mm_prefetch(c + far + o, _MM_HINT_T1);
  }
}

// A row group's tables: entry [block][row], so one load gives the 4 rows' values.
struct GroupTable {
  alignas(64) float scale[kKBlock / 32][kRows];
  alignas(64) float min[kKBlock / 32][kRows];
  alignas(64) int32_t sc6[kKBlock / 32][2][kRows];
};

// The token, quantised: codes, and per block d and s = d * sum(codes); for tiled weights
// also, per quad of blocks, kTiledWords words laid out for step_tiled.
struct Token {
  const int8_t* q;
  const float* d;
  const float* s;
  const int32_t* tiled;
};
// Per quad: chunk c's codes 4c .. 4c + 3 of its blocks 0..3 (words 4c + j), then per block
// -offset * sum(codes) (words 32 + j).
constexpr int kTiledWords = 36;

// Blocks whose f16 heads one word permute gathers from a row: their heads lie within 64
// words of the first (q4_0: 8 blocks of 9 words; q8_0: 4 of 17; q4_1: 4 of 10, d and m).
template <QuantFormat F>
constexpr int kHeadBlocks = F == QuantFormat::q4_0 ? 8 : 4;

// Words 0..7 of the result: the heads of kHeadBlocks blocks from p (a block start) on. q4_0:
// d0..d7; q8_0: d0..d3; q4_1: d0..d3 then m0..m3. Reads 128 bytes (64 for q4_1): inside
// the kHeadBlocks blocks (144, 136 and 80 bytes).
template <QuantFormat F>
inline __m128i head_words(const uint8_t* p) {
  constexpr int words = static_cast<int>(block_bytes<F>()) / 2, g = kHeadBlocks<F>;
  auto at = [](int j) {
    return static_cast<short>(j < g ? j * words : has_min<F>() ? (j - g) * words + 1 : 0);
  };
  const __m512i idx =
      _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                       at(7), at(6), at(5), at(4), at(3), at(2), at(1), at(0));
  __m512i v;
  if constexpr (F == QuantFormat::q4_1)
    v = _mm512_permutexvar_epi16(idx, _mm512_loadu_si512(p));
  else
    v = _mm512_permutex2var_epi16(_mm512_loadu_si512(p), idx, _mm512_loadu_si512(p + 64));
  return _mm512_castsi512_si128(v);
}

// 2 blocks x 4 rows of f16 heads -> the table's f32 entries [block][row].
inline void store_heads(float* dst, __m128i h) { _mm256_storeu_ps(dst, _mm256_cvtph_ps(h)); }

// The tables of blocks [b0, b0 + nb) for the group's rows. The 32-value formats take each
// row's heads with one permute per kHeadBlocks blocks, interleave the 4 rows and convert
// (the same f32 values row_table gives; instead of 4 scalar loads a block, 2048 x 2048 in
// cache on one core: q4_0 120 -> 110 us, q4_1 149 -> 126 us); Q6_K and Q4_K as below.
template <QuantFormat F>
void group_table(const Group& grp, int64_t b0, int nb, const float* xd, GroupTable& t) {
  const uint8_t* const(&rows)[kRows] = grp.rows;
  if constexpr (F == QuantFormat::q8_0 || F == QuantFormat::q4_0 || F == QuantFormat::q4_1) {
    constexpr int bytes = static_cast<int>(block_bytes<F>()), g = kHeadBlocks<F>;
    int i = 0;
    if (grp.interleaved) {
      // A run of 4 blocks holds the 4 rows' heads of one block, in row order: one permute
      // gathers them (q4_0: two blocks' in 128 bytes; q4_1: d then m, in 64 of its 80).
      constexpr int w = bytes / 2;
      for (; F == QuantFormat::q4_0 && i + 2 <= nb; i += 2) {
        const uint8_t* p = rows[0] + (b0 + i) * grp.stride;
        const __m512i idx =
            _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                             7 * w, 6 * w, 5 * w, 4 * w, 3 * w, 2 * w, w, 0);
        store_heads(t.scale[i], _mm512_castsi512_si128(_mm512_permutex2var_epi16(
                                    _mm512_loadu_si512(p), idx, _mm512_loadu_si512(p + 64))));
      }
      for (; F != QuantFormat::q4_0 && i < nb; ++i) {
        const uint8_t* p = rows[0] + (b0 + i) * grp.stride;
        const __m512i idx =
            _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                             3 * w + 1, 2 * w + 1, w + 1, 1, 3 * w, 2 * w, w, 0);
        __m128i h;
        if constexpr (F == QuantFormat::q4_1)
          h = _mm512_castsi512_si128(_mm512_permutexvar_epi16(idx, _mm512_loadu_si512(p)));
        else  // q8_0: 4 words from 128 of the run's 136 bytes
          h = _mm512_castsi512_si128(
              _mm512_permutex2var_epi16(_mm512_loadu_si512(p), idx, _mm512_loadu_si512(p + 64)));
        const __m256 v = _mm256_cvtph_ps(h);
        _mm_store_ps(t.scale[i], _mm256_castps256_ps128(v));
        if constexpr (F == QuantFormat::q4_1) _mm_store_ps(t.min[i], _mm256_extractf128_ps(v, 1));
      }
    }
    for (; !grp.interleaved && i + g <= nb; i += g) {
      __m128i h[kRows];
      for (int r = 0; r < kRows; ++r) h[r] = head_words<F>(rows[r] + (b0 + i) * bytes);
      // words: rows 0..3 of block j, block j + 1, ...
      const __m128i lo01 = _mm_unpacklo_epi16(h[0], h[1]), lo23 = _mm_unpacklo_epi16(h[2], h[3]);
      store_heads(t.scale[i], _mm_unpacklo_epi32(lo01, lo23));
      store_heads(t.scale[i + 2], _mm_unpackhi_epi32(lo01, lo23));
      if constexpr (g == 8 || has_min<F>()) {
        const __m128i hi01 = _mm_unpackhi_epi16(h[0], h[1]);
        const __m128i hi23 = _mm_unpackhi_epi16(h[2], h[3]);
        float* dst = g == 8 ? t.scale[i + 4] : t.min[i];
        store_heads(dst, _mm_unpacklo_epi32(hi01, hi23));
        store_heads(dst + 2 * kRows, _mm_unpackhi_epi32(hi01, hi23));
      }
    }
    for (; i < nb; ++i) {  // the 4 rows' f16 d (and m) of block i, as one vector
      uint64_t d = 0, m = 0;
      for (int r = 0; r < kRows; ++r) {
        const uint8_t* head = rows[r] + (b0 + i) * grp.stride;
        uint16_t h;
        std::memcpy(&h, head, 2);
        d |= static_cast<uint64_t>(h) << (16 * r);
        if constexpr (F == QuantFormat::q4_1) {
          std::memcpy(&h, head + 2, 2);
          m |= static_cast<uint64_t>(h) << (16 * r);
        }
      }
      _mm_store_ps(t.scale[i], _mm_cvtph_ps(_mm_cvtsi64_si128(static_cast<int64_t>(d))));
      if constexpr (F == QuantFormat::q4_1)
        _mm_store_ps(t.min[i], _mm_cvtph_ps(_mm_cvtsi64_si128(static_cast<int64_t>(m))));
    }
  } else if constexpr (F == QuantFormat::q6_k) {
    // Per 256-value superblock and row: d (f16 at 208) for its 8 blocks and 16 int8 scales
    // (at 192, two per block). The 4 rows' scales are interleaved bytewise into [scale][row]
    // and widened, 64 bytes a store. row_table's scalar loop had been two thirds of this
    // kernel's instructions (2048 x 2048 in cache on one core: 343 -> 167 us; the Q4_0
    // file's LM head is Q6_K).
    for (int i = 0; i < nb; i += 8) {
      __m128i sc[kRows];
      uint64_t d = 0;
      for (int r = 0; r < kRows; ++r) {
        const uint8_t* sb = rows[r] + (b0 + i) / 8 * 210;
        sc[r] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + 192));
        uint16_t h;
        std::memcpy(&h, sb + 208, 2);
        d |= static_cast<uint64_t>(h) << (16 * r);
      }
      const __m128i lo01 = _mm_unpacklo_epi8(sc[0], sc[1]), hi01 = _mm_unpackhi_epi8(sc[0], sc[1]);
      const __m128i lo23 = _mm_unpacklo_epi8(sc[2], sc[3]), hi23 = _mm_unpackhi_epi8(sc[2], sc[3]);
      const __m128i quarters[4] = {_mm_unpacklo_epi16(lo01, lo23), _mm_unpackhi_epi16(lo01, lo23),
                                   _mm_unpacklo_epi16(hi01, hi23), _mm_unpackhi_epi16(hi01, hi23)};
      int32_t* dst = &t.sc6[i][0][0];  // [block i..i+7][half][row]: scale 2j + h, then row
      for (int q = 0; q < 4; ++q)
        _mm512_storeu_si512(dst + 16 * q, _mm512_cvtepi8_epi32(quarters[q]));
      const __m128 dv = _mm_cvtph_ps(_mm_cvtsi64_si128(static_cast<int64_t>(d)));
      const __m512 d4 = _mm512_broadcast_f32x4(dv);
      _mm512_storeu_ps(&t.scale[i][0], d4);
      _mm512_storeu_ps(&t.scale[i + 4][0], d4);
    }
  } else {  // q4_k
    // Per 256-value superblock and row: f16 d and dmin, then 12 bytes a, b, c (4 each)
    // holding 8 six-bit scales and 8 mins (q4_k_scales): scales 0..3 = a & 63, mins 0..3 =
    // b & 63, scales 4..7 = (c & 15) | (a >> 6) << 4, mins 4..7 = (c >> 4) | (b >> 6) << 4,
    // bytewise. One 32-bit lane per row does the 4 rows at once; a byte shuffle then puts
    // value j of row r at 4j + r, the table's [block][row] order. row_table's scalar loop
    // had been most of this kernel's instructions (2048 x 2048 from cache, 2 threads: 13.2
    // -> 24.7 GB/s). The scales are stored times the token's d (step_q4k reads them so).
    const __m128i low6 = _mm_set1_epi8(0x3F), low4 = _mm_set1_epi8(0x0F);
    const __m128i top2 = _mm_set1_epi8(0x30);  // (x >> 6) << 4 of each byte, after x >> 2
    const __m128i by_value = _mm_set_epi8(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    for (int i = 0; i < nb; i += 8) {
      alignas(16) uint32_t w[3][kRows];
      uint64_t d = 0, dmin = 0;
      for (int r = 0; r < kRows; ++r) {
        const uint8_t* sb = rows[r] + (b0 + i) / 8 * 144;
        std::memcpy(w[0] + r, sb + 4, 4);
        std::memcpy(w[1] + r, sb + 8, 4);
        std::memcpy(w[2] + r, sb + 12, 4);
        uint16_t h[2];
        std::memcpy(h, sb, 4);
        d |= static_cast<uint64_t>(h[0]) << (16 * r);
        dmin |= static_cast<uint64_t>(h[1]) << (16 * r);
      }
      const __m128i a = _mm_load_si128(reinterpret_cast<const __m128i*>(w[0]));
      const __m128i b = _mm_load_si128(reinterpret_cast<const __m128i*>(w[1]));
      const __m128i c = _mm_load_si128(reinterpret_cast<const __m128i*>(w[2]));
      const __m128i sc_lo = _mm_and_si128(a, low6), m_lo = _mm_and_si128(b, low6);
      const __m128i sc_hi =
          _mm_or_si128(_mm_and_si128(c, low4), _mm_and_si128(_mm_srli_epi32(a, 2), top2));
      const __m128i m_hi = _mm_or_si128(_mm_and_si128(_mm_srli_epi32(c, 4), low4),
                                        _mm_and_si128(_mm_srli_epi32(b, 2), top2));
      const __m512 dv =
          _mm512_broadcast_f32x4(_mm_cvtph_ps(_mm_cvtsi64_si128(static_cast<int64_t>(d))));
      const __m512 mv = _mm512_broadcast_f32x4(
          _mm_xor_ps(_mm_cvtph_ps(_mm_cvtsi64_si128(static_cast<int64_t>(dmin))),
                     _mm_set1_ps(-0.0f)));  // -dmin
      auto values = [&](__m128i v, __m512 f) {  // lane 4j + r: f * value j of row r
        return _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_shuffle_epi8(v, by_value))), f);
      };
      // The scales times the token's d of their block, as block_fma would round them.
      const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
      auto dx = [&](int j) {
        return _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(xd + b0 + j)));
      };
      _mm512_storeu_ps(&t.scale[i][0], _mm512_mul_ps(values(sc_lo, dv), dx(i)));
      _mm512_storeu_ps(&t.scale[i + 4][0], _mm512_mul_ps(values(sc_hi, dv), dx(i + 4)));
      _mm512_storeu_ps(&t.min[i][0], values(m_lo, mv));
      _mm512_storeu_ps(&t.min[i + 4][0], values(m_hi, mv));
    }
  }
}

// The 4 rows' dots, each 128-bit lane's 4 partial sums added and the rows transposed into
// lanes: 128-bit lane k of the result holds [row 0, 1, 2, 3]'s sums of their lane k.
inline __m512i rows_in_lanes(const __m512i (&dot)[kRows]) {
  const __m512i u01 = _mm512_add_epi32(_mm512_unpacklo_epi32(dot[0], dot[1]),
                                       _mm512_unpackhi_epi32(dot[0], dot[1]));
  const __m512i u23 = _mm512_add_epi32(_mm512_unpacklo_epi32(dot[2], dot[3]),
                                       _mm512_unpackhi_epi32(dot[2], dot[3]));
  return _mm512_add_epi32(_mm512_unpacklo_epi64(u01, u23), _mm512_unpackhi_epi64(u01, u23));
}
inline __m256i rows_in_lanes(const __m256i (&dot)[kRows]) {
  const __m256i u01 = _mm256_add_epi32(_mm256_unpacklo_epi32(dot[0], dot[1]),
                                       _mm256_unpackhi_epi32(dot[0], dot[1]));
  const __m256i u23 = _mm256_add_epi32(_mm256_unpacklo_epi32(dot[2], dot[3]),
                                       _mm256_unpackhi_epi32(dot[2], dot[3]));
  return _mm256_add_epi32(_mm256_unpacklo_epi64(u01, u23), _mm256_unpackhi_epi64(u01, u23));
}

// The exact dots of blocks 2j, 2j + 1 for the 4 rows: each dot's 16 lanes (4 values each)
// summed per 16-value chunk, rows transposed into lanes, then chunks combined.
template <QuantFormat F>
inline void block_dots(const __m512i (&dot)[kRows], const GroupTable& t, int i, __m128i& ia,
                       __m128i& ib) {
  const __m512i w = rows_in_lanes(dot);  // 128-bit lane k: the chunk-k sums of rows 0..3
  if constexpr (F == QuantFormat::q6_k) {
    auto sc = [&](int b, int h) {
      return _mm_load_si128(reinterpret_cast<const __m128i*>(t.sc6[b][h]));
    };
    const __m128i c0 = _mm512_castsi512_si128(w), c1 = _mm512_extracti32x4_epi32(w, 1);
    const __m128i c2 = _mm512_extracti32x4_epi32(w, 2), c3 = _mm512_extracti32x4_epi32(w, 3);
    ia = _mm_add_epi32(_mm_mullo_epi32(sc(i, 0), c0), _mm_mullo_epi32(sc(i, 1), c1));
    ib = _mm_add_epi32(_mm_mullo_epi32(sc(i + 1, 0), c2), _mm_mullo_epi32(sc(i + 1, 1), c3));
  } else {
    const __m512i v = _mm512_add_epi32(w, _mm512_shuffle_i32x4(w, w, _MM_SHUFFLE(2, 3, 0, 1)));
    ia = _mm512_castsi512_si128(v);
    ib = _mm512_extracti32x4_epi32(v, 2);
  }
}

// acc = fma(float(dot), scale * d_x, acc), then for a min: acc = fma(min, s_x, acc); lanes
// are rows.
template <QuantFormat F>
inline __m128 block_fma(__m128 acc, __m128i dot, const GroupTable& t, int i, float dx, float sx) {
  const __m128 f = _mm_mul_ps(_mm_load_ps(t.scale[i]), _mm_set1_ps(dx));
  acc = _mm_fmadd_ps(_mm_cvtepi32_ps(dot), f, acc);
  if constexpr (has_min<F>()) acc = _mm_fmadd_ps(_mm_load_ps(t.min[i]), _mm_set1_ps(sx), acc);
  return acc;
}

// Blocks b0 + i, b0 + i + 1 (kHalf: b0 + i only) of a q8_0 group against the token.
template <QuantFormat F, bool kHalf>
inline __m128 step(const Group& g, const GroupTable& t, int64_t b0, int i, const Token& x,
                   int64_t prefetch, __m128 acc) {
  const int64_t b = b0 + i;
  const __m512i xv = kHalf ? _mm512_maskz_loadu_epi8(0xFFFFFFFFull, x.q + 32 * b)
                           : _mm512_loadu_si512(x.q + 32 * b);
  constexpr int o = offset_of<F>();
  __m512i seed = _mm512_setzero_si512();
  if constexpr (o != 0)
    seed = _mm512_sub_epi32(seed, _mm512_dpbusd_epi32(_mm512_setzero_si512(),
                                                      _mm512_set1_epi8(static_cast<char>(o)), xv));
  __m512i dot[kRows];
  static_assert(F == QuantFormat::q8_0, "the other formats take their own steps");
  if (g.interleaved)
    prefetch_run<(kHalf ? 4 : 8) * block_bytes<F>(), true>(g.rows[0] + b * g.stride, prefetch,
                                                           prefetch + kFarAhead);
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
    if (!g.interleaved) {
      const char* ahead =
          reinterpret_cast<const char*>(g.rows[r]) + prefetch + b * block_bytes<F>();
      _mm_prefetch(ahead, _MM_HINT_T0);
      _mm_prefetch(ahead + kFarAhead, _MM_HINT_T1);
      if constexpr (2 * block_bytes<F>() > 64) {  // a step spans more than a line
        _mm_prefetch(ahead + 64, _MM_HINT_T0);
        _mm_prefetch(ahead + kFarAhead + 64, _MM_HINT_T1);
      }
    }
    dot[r] = _mm512_dpbusd_epi32(seed, codes64<kHalf>(g.rows[r], b, g.stride), xv);
  }
  __m128i ia, ib;
  block_dots<F>(dot, t, i, ia, ib);
  acc = block_fma<F>(acc, ia, t, i, x.d[b], x.s[b]);
  if (!kHalf) acc = block_fma<F>(acc, ib, t, i + 1, x.d[b + 1], x.s[b + 1]);
  return acc;
}

// Q4_K blocks b0 + i .. b0 + i + 3 (i % 4 == 0: one half of a superblock, 64 nibble bytes
// a row). The low nibbles are blocks 0 and 2 of the four, the high ones 1 and 3, each met by
// the token's codes of those blocks; the table's scales already hold scale * d_x. The same
// exact dots and the same float operations in block order as step, with half its unpacking.
inline __m128 step_q4k(const Group& g, const GroupTable& t, int64_t b0, int i, const Token& x,
                       int64_t prefetch, __m128 acc) {
  const int64_t b = b0 + i;
  auto codes = [&](int64_t block) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + 32 * block));
  };
  auto pair = [&](int64_t first) {  // the codes of blocks first and first + 2
    return _mm512_inserti64x4(_mm512_castsi256_si512(codes(first)), codes(first + 2), 1);
  };
  const __m512i xlo = pair(b), xhi = pair(b + 1), low4 = _mm512_set1_epi8(0x0F);
  __m512i lo[kRows], hi[kRows];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
    const uint8_t* p = g.rows[r] + (b / 8) * 144 + 16 + 16 * (b % 8);
    const char* ahead = reinterpret_cast<const char*>(g.rows[r]) + prefetch + kFarAhead + b * 18;
    _mm_prefetch(ahead, _MM_HINT_T1);  // into L2 only, as step_q4x4
    _mm_prefetch(ahead + 64, _MM_HINT_T1);
    const __m512i v = _mm512_loadu_si512(p);
    lo[r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(v, low4), xlo);
    hi[r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(),
                                _mm512_and_si512(_mm512_srli_epi16(v, 4), low4), xhi);
  }
  __m128i d[4];  // blocks b .. b + 3
  block_dots<QuantFormat::q4_k>(lo, t, i, d[0], d[2]);
  block_dots<QuantFormat::q4_k>(hi, t, i, d[1], d[3]);
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    acc = _mm_fmadd_ps(_mm_cvtepi32_ps(d[j]), _mm_load_ps(t.scale[i + j]), acc);
    acc = _mm_fmadd_ps(_mm_load_ps(t.min[i + j]), _mm_set1_ps(x.s[b + j]), acc);
  }
  return acc;
}

// Q6_K blocks b0 + i .. b0 + i + 3 (i % 4 == 0: one 128-value half of a superblock). Both
// block pairs of the half take their low 4 bits from the same 64 bytes of ql (low nibbles,
// then high ones) and their top 2 from the same 32 bytes of qh (bits 0-1 and 2-3 of each
// byte, then 4-5 and 6-7), so each is loaded once for the 4 blocks, not once a pair as in
// step. The same exact dots and float operations in block order as step.
inline __m128 step_q6k(const Group& g, const GroupTable& t, int64_t b0, int i, const Token& x,
                       int64_t prefetch, __m128 acc) {
  const int64_t b = b0 + i;
  const __m512i xa = _mm512_loadu_si512(x.q + 32 * b), xb = _mm512_loadu_si512(x.q + 32 * b + 64);
  const __m512i thirty_two = _mm512_set1_epi8(32);  // offset_of<q6_k>
  const __m512i seed_a =
      _mm512_sub_epi32(_mm512_setzero_si512(),
                       _mm512_dpbusd_epi32(_mm512_setzero_si512(), thirty_two, xa));
  const __m512i seed_b =
      _mm512_sub_epi32(_mm512_setzero_si512(),
                       _mm512_dpbusd_epi32(_mm512_setzero_si512(), thirty_two, xb));
  const __m512i low4 = _mm512_set1_epi8(0x0F), top2 = _mm512_set1_epi8(0x30);
  auto join = [](__m256i lo, __m256i hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  };
  __m512i lower[kRows], upper[kRows];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
    const uint8_t* sb = g.rows[r] + (b / 8) * 210;
    const int half = static_cast<int>(b % 8) / 4;
    const char* ahead = reinterpret_cast<const char*>(g.rows[r]) + prefetch + kFarAhead + b * 26;
    _mm_prefetch(ahead, _MM_HINT_T1);
    _mm_prefetch(ahead + 64, _MM_HINT_T1);
    const __m512i ql = _mm512_loadu_si512(sb + 64 * half);
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + 128 + 32 * half));
    const __m512i hi_a =
        _mm512_and_si512(join(_mm256_slli_epi16(qh, 4), _mm256_slli_epi16(qh, 2)), top2);
    const __m512i hi_b = _mm512_and_si512(join(qh, _mm256_srli_epi16(qh, 2)), top2);
    const __m512i codes_a = _mm512_or_si512(_mm512_and_si512(ql, low4), hi_a);
    const __m512i codes_b =
        _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), low4), hi_b);
    lower[r] = _mm512_dpbusd_epi32(seed_a, codes_a, xa);
    upper[r] = _mm512_dpbusd_epi32(seed_b, codes_b, xb);
  }
  __m128i d[4];  // blocks b .. b + 3
  block_dots<QuantFormat::q6_k>(lower, t, i, d[0], d[1]);
  block_dots<QuantFormat::q6_k>(upper, t, i + 2, d[2], d[3]);
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j)
    acc = block_fma<QuantFormat::q6_k>(acc, d[j], t, i + j, x.d[b + j], x.s[b + j]);
  return acc;
}

// A k-quant group's 4 blocks b0 + i .. b0 + i + 3.
template <QuantFormat F>
inline __m128 step_k(const Group& g, const GroupTable& t, int64_t b0, int i, const Token& x,
                     int64_t prefetch, __m128 acc) {
  if constexpr (F == QuantFormat::q4_k)
    return step_q4k(g, t, b0, i, x, prefetch, acc);
  else
    return step_q6k(g, t, b0, i, x, prefetch, acc);
}

// q4_0 / q4_1 in 256-bit halves: a block pair's 32 nibble bytes [A | B] give the low codes
// (values 0..15 of A and B) and the high ones (16..31), met by x stored in that order
// ([A 0..15, B 0..15, A 16..31, B 16..31] per pair, see nibble_order): lanes 0-3 of the dot
// then hold block A alone, lanes 4-7 block B. Half the vector work of unpacking to 64 codes.
template <QuantFormat F, bool kHalf>
inline __m128 step_q4(const Group& g, const GroupTable& t, int64_t b0, int i, const Token& x,
                      int64_t prefetch, __m128 acc) {
  constexpr int bytes = F == QuantFormat::q4_0 ? 18 : 20, skip = bytes - 16;
  const int64_t b = b0 + i;
  const __m256i xlo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + 32 * b));
  const __m256i xhi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + 32 * b + 32));
  __m256i seed = _mm256_setzero_si256();
  if constexpr (F == QuantFormat::q4_0) {
    const __m256i eight = _mm256_set1_epi8(8);
    seed = _mm256_sub_epi32(seed, _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(seed, eight, xlo),
                                                      eight, xhi));
  }
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256i dot[kRows];
  if (g.interleaved)
    prefetch_run<(kHalf ? 4 : 8) * bytes, true>(g.rows[0] + b * g.stride, prefetch,
                                                prefetch + kFarAhead);
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
    const uint8_t* a = g.rows[r] + b * g.stride + skip;
    if (!g.interleaved) {
      _mm_prefetch(reinterpret_cast<const char*>(a) + prefetch, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(a) + prefetch + kFarAhead, _MM_HINT_T1);
    }
    const __m256i v = _mm256_inserti128_si256(
        _mm256_castsi128_si256(load128(a)), kHalf ? _mm_setzero_si128() : load128(a + g.stride), 1);
    const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    dot[r] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(seed, lo, xlo), hi, xhi);
  }
  const __m256i w = rows_in_lanes(dot);  // lanes 0-3: block A's rows, 4-7: block B's
  acc = block_fma<F>(acc, _mm256_castsi256_si128(w), t, i, x.d[b], x.s[b]);
  if (!kHalf)
    acc = block_fma<F>(acc, _mm256_extracti128_si256(w, 1), t, i + 1, x.d[b + 1], x.s[b + 1]);
  return acc;
}

// q4_0 / q4_1, four blocks a step in 512-bit vectors: the 16 nibble bytes of blocks A..D
// gathered into one vector give their low codes (values 0..15 of each) and high ones
// (16..31), met by x stored [A 0..15, B 0..15, C 0..15, D 0..15, A 16..31, ..., D 16..31]
// per quad (see quant_gemv_avx512_vnni): 128-bit lane k of a row's dot then holds block k
// alone, and one transpose gives all four blocks' dots for the 4 rows. Per weight byte,
// half the loads, prefetches and reductions of step_q4: in one process, 2 threads, the 1B
// model's q4_0 QKV from cache 1.19x as fast; all its matmuls from memory 1.01-1.02x,
// SmolLM2's Q4_1 ones 1.04x (memory, not instructions, bounds those).
template <QuantFormat F>
inline __m128 step_q4x4(const Group& g, const GroupTable& t, int64_t b0, int i, const Token& x,
                        int64_t far, __m128 acc) {
  constexpr int bytes = F == QuantFormat::q4_0 ? 18 : 20, skip = bytes - 16;
  const int64_t b = b0 + i;
  const __m512i xlo = _mm512_loadu_si512(x.q + 32 * b);
  const __m512i xhi = _mm512_loadu_si512(x.q + 32 * b + 64);
  __m512i seed = _mm512_setzero_si512();
  if constexpr (F == QuantFormat::q4_0) {
    const __m512i eight = _mm512_set1_epi8(8);
    seed = _mm512_sub_epi32(seed,
                            _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(seed, eight, xlo), eight, xhi));
  }
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512i dot[kRows];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {  // plain rows only: a tiled group's rest is < 4 blocks
    const uint8_t* a = g.rows[r] + b * g.stride + skip;
    _mm_prefetch(reinterpret_cast<const char*>(a) + far, _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(a) + far + 64, _MM_HINT_T1);
    __m512i v = _mm512_castsi128_si512(load128(a));
    v = _mm512_inserti32x4(v, load128(a + g.stride), 1);
    v = _mm512_inserti32x4(v, load128(a + 2 * g.stride), 2);
    v = _mm512_inserti32x4(v, load128(a + 3 * g.stride), 3);
    const __m512i lo = _mm512_and_si512(v, low4);
    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    dot[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(seed, lo, xlo), hi, xhi);
  }
  const __m512i w = rows_in_lanes(dot);  // 128-bit lane k: block k's dots for rows 0..3
  acc = block_fma<F>(acc, _mm512_castsi512_si128(w), t, i, x.d[b], x.s[b]);
  acc = block_fma<F>(acc, _mm512_extracti32x4_epi32(w, 1), t, i + 1, x.d[b + 1], x.s[b + 1]);
  acc = block_fma<F>(acc, _mm512_extracti32x4_epi32(w, 2), t, i + 2, x.d[b + 2], x.s[b + 2]);
  acc = block_fma<F>(acc, _mm512_extracti32x4_epi32(w, 3), t, i + 3, x.d[b + 3], x.s[b + 3]);
  return acc;
}

constexpr bool nibble_order(QuantFormat f) { return f == QuantFormat::q4_0 || f == QuantFormat::q4_1; }

// Blocks b .. b + 3 (b % 4 == 0) of a tiled group (quant_kernels.h), whose quad starts at
// `quad`: 32-bit lane 4r + j of a chunk holds 4 quant bytes of row r's block b + j, met by
// the token's codes of the same blocks broadcast to the 4 rows' 128-bit lanes (q4: chunk
// c < 4 meets the low nibbles with codes 4c .., chunk 4 + c the high ones with codes
// 16 + 4c ..). The lanes' dots are then the 16 block dots themselves, with no reduction:
// one permute puts them in the heads' order [block][row] (on AMD Zen 4 the shuffles of the
// row-major steps, 24 a quad against 7 here, had bound them: 2048 x 2048 q4_0 in cache on
// one core, 3.2 -> 1.8 cycles a block and row). The float work per block and row is
// block_fma's, in block order. No software prefetch: the hardware follows the one stream
// (1B-shaped decode, all matmuls, one process per variant: q8_0 0.88-0.93 of a plain read's
// rate without, 0.71-0.84 with prefetches 16 KiB ahead).
template <QuantFormat F>
inline __m128 step_tiled(const uint8_t* quad, const Token& x, int64_t b, __m128 acc) {
  constexpr int head = head_bytes(F);
  const int32_t* xq = x.tiled + (b / 4) * kTiledWords;
  auto xv = [&](int c) {  // words 4c .. 4c + 3 in every 128-bit lane
    return _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(xq + 4 * c)));
  };
  const uint8_t* codes = quad + 16 * head;
  __m512i d0 = xv(8), d1 = _mm512_setzero_si512();
  if constexpr (F == QuantFormat::q8_0) {
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
#pragma GCC unroll 4
    for (int c = 0; c < 8; c += 2) {
      d0 = _mm512_dpbusd_epi32(d0, _mm512_xor_si512(_mm512_loadu_si512(codes + 64 * c), flip),
                               xv(c));
      d1 = _mm512_dpbusd_epi32(d1, _mm512_xor_si512(_mm512_loadu_si512(codes + 64 * c + 64), flip),
                               xv(c + 1));
    }
  } else {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m512i v = _mm512_loadu_si512(codes + 64 * c);
      d0 = _mm512_dpbusd_epi32(d0, _mm512_and_si512(v, low4), xv(c));
      d1 = _mm512_dpbusd_epi32(d1, _mm512_and_si512(_mm512_srli_epi16(v, 4), low4), xv(4 + c));
    }
  }
  const __m512i by_block = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  const __m512 dots =
      _mm512_cvtepi32_ps(_mm512_permutexvar_epi32(by_block, _mm512_add_epi32(d0, d1)));
  const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(quad)));
  __m512 mw = _mm512_setzero_ps();
  if constexpr (has_min<F>())
    mw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(quad + 32)));
  auto lane = [](__m512 v, auto j) {
    if constexpr (decltype(j)::value == 0)
      return _mm512_castps512_ps128(v);
    else
      return _mm512_extractf32x4_ps(v, decltype(j)::value);
  };
  auto block = [&](auto j) {
    constexpr int k = decltype(j)::value;
    const __m128 f = _mm_mul_ps(lane(dw, j), _mm_set1_ps(x.d[b + k]));
    acc = _mm_fmadd_ps(lane(dots, j), f, acc);
    if constexpr (has_min<F>()) acc = _mm_fmadd_ps(lane(mw, j), _mm_set1_ps(x.s[b + k]), acc);
  };
  block(std::integral_constant<int, 0>{});
  block(std::integral_constant<int, 1>{});
  block(std::integral_constant<int, 2>{});
  block(std::integral_constant<int, 3>{});
  return acc;
}

// Rows [n0, n0 + num_rows), num_rows <= 4 (missing rows repeat the first, unstored).
template <QuantFormat F>
void row_group(const QuantArgs& a, const Token& x, int64_t n0, int num_rows) {
  const int64_t nb = a.in_features / 32;
  constexpr int64_t bb = block_bytes<F>();
  // A tiled group (all 4 rows are: groups start at multiples of 4) takes its whole quads
  // in step_tiled and its last nb % 4 blocks, stored as whole blocks row after row, in the
  // steps below; those read rows[r] + b * stride as for plain rows.
  const bool tiled = n0 < a.interleaved_rows;
  const int64_t tiled_blocks = tiled ? nb / 4 * 4 : 0;
  Group g;
  for (int r = 0; r < kRows; ++r)
    g.rows[r] =
        tiled ? a.w + n0 * a.w_row_bytes + r * bb : weight_row(a, n0 + (r < num_rows ? r : 0)).p;
  g.stride = tiled ? 4 * bb : bb;
  g.interleaved = tiled;
  // Ahead in the stream: the same row of the next group (rows and groups are contiguous),
  // or in a tiled group's one stream. A prefetch never faults.
  const int64_t prefetch =
      tiled ? kNearAhead : std::max<int64_t>(kNearAhead, kRows * a.w_row_bytes);
  GroupTable t;
  for (int64_t b0 = 0; b0 < nb; b0 += kKBlock / 32) {
    const int n = static_cast<int>(std::min<int64_t>(kKBlock / 32, nb - b0));
    __m128 acc = _mm_setzero_ps();
    int i = 0;
    if constexpr (!k_quant<F>())
      for (; i < n && b0 + i < tiled_blocks; i += 4)
        acc = step_tiled<F>(g.rows[0] + (b0 + i) * 4 * bb, x, b0 + i, acc);
    const int64_t c0 = b0 + i;  // the rest of the K block, from block c0 on
    const int m = n - i;
    if (m > 0) group_table<F>(g, c0, m, x.d, t);
    int j = 0;
    if constexpr (k_quant<F>()) {
      for (; j < m; j += 4) acc = step_k<F>(g, t, c0, j, x, prefetch, acc);  // m % 8 == 0
    } else if constexpr (nibble_order(F)) {
      for (; j + 3 < m; j += 4) acc = step_q4x4<F>(g, t, c0, j, x, prefetch + kFarAhead, acc);
      for (; j + 1 < m; j += 2) acc = step_q4<F, false>(g, t, c0, j, x, prefetch, acc);
      if (j < m) acc = step_q4<F, true>(g, t, c0, j, x, prefetch, acc);
    } else {
      for (; j + 1 < m; j += 2) acc = step<F, false>(g, t, c0, j, x, prefetch, acc);
      if (j < m) acc = step<F, true>(g, t, c0, j, x, prefetch, acc);
    }
    alignas(16) float v[kRows];
    _mm_store_ps(v, acc);
    for (int r = 0; r < num_rows; ++r) {
      float& o = a.out[n0 + r];
      o = (b0 > 0 ? o : a.bias ? a.bias[n0 + r] : 0.0f) + v[r];
    }
  }
}

// Q4_K or Q6_K rows [n0, n0 + 8), plain: two groups stepped side by side. A group's float work is
// one chain of dependent FMAs (two a block, in block order: the bits do not depend on the
// kernel), and the two chains hide each other's latency.
template <QuantFormat F>
void row_pair(const QuantArgs& a, const Token& x, int64_t n0) {
  const int64_t nb = a.in_features / 32;
  Group g[2];
  for (int h = 0; h < 2; ++h) {
    for (int r = 0; r < kRows; ++r) g[h].rows[r] = weight_row(a, n0 + kRows * h + r).p;
    g[h].stride = block_bytes<F>();
    g[h].interleaved = false;
  }
  const int64_t prefetch = std::max<int64_t>(kNearAhead, 2 * kRows * a.w_row_bytes);
  GroupTable t[2];
  for (int64_t b0 = 0; b0 < nb; b0 += kKBlock / 32) {
    const int n = static_cast<int>(std::min<int64_t>(kKBlock / 32, nb - b0));  // n % 8 == 0
    group_table<F>(g[0], b0, n, x.d, t[0]);
    group_table<F>(g[1], b0, n, x.d, t[1]);
    __m128 acc[2] = {_mm_setzero_ps(), _mm_setzero_ps()};
    for (int j = 0; j < n; j += 4) {
      acc[0] = step_k<F>(g[0], t[0], b0, j, x, prefetch, acc[0]);
      acc[1] = step_k<F>(g[1], t[1], b0, j, x, prefetch, acc[1]);
    }
    alignas(16) float v[2 * kRows];
    _mm_store_ps(v, acc[0]);
    _mm_store_ps(v + kRows, acc[1]);
    for (int r = 0; r < 2 * kRows; ++r) {
      float& o = a.out[n0 + r];
      o = (b0 > 0 ? o : a.bias ? a.bias[n0 + r] : 0.0f) + v[r];
    }
  }
}

template <QuantFormat F>
void run(const QuantArgs& a, const Token& x) {
  const int64_t num_threads = std::max(1, omp_get_max_threads());
  const int64_t part_rows = ceil_div(ceil_div(a.out_features, num_threads), kRows) * kRows;
  const int64_t num_parts = ceil_div(a.out_features, part_rows);
  const double work = static_cast<double>(a.out_features) * a.in_features;
#pragma omp parallel for schedule(static) if (work >= kMinParallelWork && num_parts > 1)
  for (int64_t p = 0; p < num_parts; ++p) {
    const int64_t n1 = std::min(a.out_features, (p + 1) * part_rows);
    int64_t n = p * part_rows;
    // The part's share of a.prefetch, a few lines after each group of rows: spread over
    // the part, the requests share the memory with the weight stream instead of stalling it.
    PrefetchCursor ahead;
    int64_t lines = 0;
    if (a.prefetch != nullptr) {
      ahead = PrefetchCursor(*a.prefetch, p, num_parts);
      lines = ceil_div(ahead.lines_left(), ceil_div(n1 - n, kRows));
    }
    if constexpr (k_quant<F>())
      for (; n + 2 * kRows <= n1; n += 2 * kRows) {
        row_pair<F>(a, x, n);
        ahead.request(2 * lines);
      }
    for (; n < n1; n += kRows) {
      row_group<F>(a, x, n, static_cast<int>(std::min<int64_t>(kRows, n1 - n)));
      ahead.request(lines);
    }
  }
}

}  // namespace

void quant_gemv_avx512_vnni(const QuantArgs& a) {
  const int64_t nb = a.in_features / 32;
  const size_t padded = static_cast<size_t>((nb + 1) / 2 * 64);  // whole block pairs
  int8_t* codes = static_cast<int8_t*>(thread_scratch(Scratch::codes, padded));
  float* xd = static_cast<float*>(thread_scratch(Scratch::scales, 2 * nb * sizeof(float)));
  float* xs = xd + nb;
  const bool nibbles = nibble_order(a.format);
  if (nb % 2) std::memset(codes + (nb - 1) * 32, 0, 64);  // the missing block B: 0
  const int64_t quads = nibbles ? nb / 4 * 4 : 0;         // blocks step_q4x4 takes
  // For tiled weights, per quad of blocks: codes 4c .. 4c + 3 of block 4q + j at word 4c + j,
  // -offset * sum(codes of block 4q + j) at word 32 + j.
  int32_t* tiled = nullptr;
  if (a.interleaved_rows > 0)
    tiled = static_cast<int32_t*>(
        thread_scratch(Scratch::tiles, static_cast<size_t>(nb / 4 * kTiledWords * 4)));
  const int offset = a.format == QuantFormat::q8_0 ? 128 : a.format == QuantFormat::q4_0 ? 8 : 0;
  QuantBlock qb;
  for (int64_t b = 0; b < nb; ++b) {  // the same arithmetic as the tiles' quantiser
    quantize_block(a.x + 32 * b, qb);
    if (tiled != nullptr && b < nb / 4 * 4) {
      int32_t* v = tiled + (b / 4) * kTiledWords + b % 4;
      for (int c = 0; c < 8; ++c) std::memcpy(v + 4 * c, qb.q + 4 * c, 4);
      v[32] = -offset * (qb.lo + qb.hi);
    }
    if (b < quads) {  // [A 0..15, B 0..15, C 0..15, D 0..15, A 16..31, ..., D 16..31] per quad
      int8_t* quad = codes + (b / 4) * 128 + (b % 4) * 16;
      std::memcpy(quad, qb.q, 16);
      std::memcpy(quad + 64, qb.q + 16, 16);
    } else if (nibbles) {  // the rest: [A 0..15, B 0..15, A 16..31, B 16..31] per pair
      int8_t* pair = codes + (b / 2) * 64 + (b % 2) * 16;
      std::memcpy(pair, qb.q, 16);
      std::memcpy(pair + 32, qb.q + 16, 16);
    } else {
      std::memcpy(codes + 32 * b, qb.q, 32);
    }
    xd[b] = qb.d;
    xs[b] = qb.s;
  }
  const Token x{codes, xd, xs, tiled};
  switch (a.format) {
    case QuantFormat::q8_0: return run<QuantFormat::q8_0>(a, x);
    case QuantFormat::q4_0: return run<QuantFormat::q4_0>(a, x);
    case QuantFormat::q4_1: return run<QuantFormat::q4_1>(a, x);
    case QuantFormat::q4_k: return run<QuantFormat::q4_k>(a, x);
    case QuantFormat::q6_k: return run<QuantFormat::q6_k>(a, x);
  }
}

}  // namespace quant_detail
}  // namespace engine
