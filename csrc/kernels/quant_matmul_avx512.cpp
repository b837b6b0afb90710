// quant_matmul kernels for AVX-512 with VNNI. Called only where the CPU reports
// avx512vnni; other AVX-512 CPUs run the AVX2 kernels.
//
// Tokens lie in vector lanes: x is quantised into tiles of 16 tokens where, for each
// 32-value block, 8 vectors hold 4 consecutive codes of each token. A weight block's codes
// are broadcast 4 at a time and vpdpbusd (64 u8 x i8 products per instruction) sums one
// block for 16 tokens into one i32 vector. Every weight byte is read once per 16 tokens
// and the per-block scale work is shared by them.
//
// Weights enter as unsigned codes (q8_0 as q + 128; q4: 0..15; q6_k: 0..63); the offset
// comes back out through the accumulator's start, -offset * sum(x codes). Per block and
// token, in block order: acc = fma(float(dot), w_scale * x_scale, acc), then for q4_1/q4_k
// acc = fma(min, x_scale * sum(x codes), acc); q6_k first combines its two 16-value dots
// with their integer scales. K is cut into 1024-value blocks whose sums are added to out.
// A token's lane does exactly this whatever the batch, so results are batch-invariant.
#pragma GCC target("avx512vnni")
#include <immintrin.h>

#include <cstring>

#include "quant_avx512.h"

namespace engine {
namespace quant_detail {
namespace {

constexpr int kLanes = 16;         // tokens per tile
constexpr int kRows = 8;           // weight rows per register tile
constexpr int kTilesPerBlock = 4;  // token tiles that meet a row tile while it is in L1
constexpr int kQuantPieces = 4;    // block ranges a tile's quantisation is cut into

// One 32-value block of one token tile.
struct TileBlock {
  int8_t q[8][kLanes][4];     // codes 4k..4k+3 of each token
  float d[kLanes];            // the token's block scale (0 for an empty lane)
  float s[kLanes];            // d * sum(codes)
  int32_t sum16[2][kLanes];   // sum of codes 0..15 and 16..31
};
static_assert(sizeof(TileBlock) == 768, "TileBlock is packed");

// ---- activations -------------------------------------------------------------------------

// Quantises blocks [b0, b1) of the tokens of tile `tile` into blocks[b0 .. b1); the lanes
// past the last token are zeroed (codes, d, s and sums), every other byte is written.
void quantize_tile(const QuantArgs& a, int64_t tile, int64_t b0, int64_t b1, TileBlock* blocks) {
  const int64_t t_begin = tile * kLanes;
  const int64_t t_end = std::min<int64_t>(a.num_tokens, t_begin + kLanes);
  const int lanes = static_cast<int>(t_end - t_begin);
  QuantBlock qb;
  for (int64_t b = b0; b < b1; ++b) {
    TileBlock& tb = blocks[b];
    for (int lane = 0; lane < lanes; ++lane) {
      quantize_block(a.x + (t_begin + lane) * a.x_row_stride + 32 * b, qb);
      for (int k = 0; k < 8; ++k) std::memcpy(tb.q[k][lane], qb.q + 4 * k, 4);
      tb.d[lane] = qb.d;
      tb.s[lane] = qb.s;
      tb.sum16[0][lane] = qb.lo;
      tb.sum16[1][lane] = qb.hi;
    }
    for (int lane = lanes; lane < kLanes; ++lane) {
      for (int k = 0; k < 8; ++k) std::memset(tb.q[k][lane], 0, 4);
      tb.d[lane] = tb.s[lane] = 0.0f;
      tb.sum16[0][lane] = tb.sum16[1][lane] = 0;
    }
  }
}

// ---- the register tile: R rows x 16 tokens over nb blocks ------------------------------------

// Tiled rows' K block as tile() reads it: codes[i][r], the 32 unsigned codes of row r's block
// b0 + i (block_codes' bytes), and scale[i][r], min[i][r] (row_table's values).
template <int R>
struct Panel {
  alignas(64) uint8_t codes[kKBlock / 32][R][32];
  alignas(64) float scale[kKBlock / 32][R];
  alignas(64) float min[kKBlock / 32][R];
};

// The rows' codes come from block_codes and their scales, mins and q6_k scale pairs from
// tv[r] (TableView: entry i at i * stride); or, with kPanel (tiled rows), all from *panel, at
// offsets the compiler knows. before_block(i) runs first at each block (a tiled first token
// tile fills the panel there).
template <QuantFormat F, int R, bool kPanel, typename Before>
inline void tile(const WeightRow (&rows)[R], const TableView (&tv)[R], const Panel<R>* panel,
                 int64_t b0, int nb, const TileBlock* xt, int64_t prefetch, __m512 (&acc_out)[R],
                 Before&& before_block) {
  alignas(32) uint8_t buf[R][32];
  // a local copy whose address never escapes: the byte stores of block_codes and the panel
  // could alias acc_out, which would keep it in memory, stored and reloaded every block
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = acc_out[r];
  for (int i = 0; i < nb; ++i) {
    before_block(i);
    const TileBlock& tb = xt[i];
    __m512i xk[8];
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) xk[k] = _mm512_load_si512(tb.q[k]);
    const __m512 dx = _mm512_load_ps(tb.d);
    const __m512i lo = _mm512_load_si512(tb.sum16[0]), hi = _mm512_load_si512(tb.sum16[1]);
    constexpr int o = offset_of<F>();
    __m512i seed_lo = _mm512_setzero_si512(), seed_hi = _mm512_setzero_si512();
    if constexpr (F == QuantFormat::q6_k) {
      seed_lo = _mm512_sub_epi32(seed_lo, _mm512_slli_epi32(lo, 5));
      seed_hi = _mm512_sub_epi32(seed_hi, _mm512_slli_epi32(hi, 5));
    } else if constexpr (o != 0) {
      static_assert((o & (o - 1)) == 0, "the offset is a power of two");
      seed_lo = _mm512_sub_epi32(_mm512_setzero_si512(),
                                 _mm512_slli_epi32(_mm512_add_epi32(lo, hi), __builtin_ctz(o)));
    }
    // The R rows' dot chains are interleaved step by step: one row's 8 dependent vpdpbusd
    // back to back leave the scheduler holding waiting work instead of the other rows'.
    const uint8_t* codes[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      codes[r] = kPanel ? panel->codes[i][r] : block_codes<F>(rows[r], b0 + i, buf[r]);
      if (prefetch) {
        // a tiled row's group streams 4 rows' bytes: its step ahead is 4 blocks
        const int64_t step = rows[r].lane >= 0 ? 4 * block_bytes<F>() : block_bytes<F>();
        _mm_prefetch(reinterpret_cast<const char*>(rows[r].p) + prefetch + (b0 + i) * step,
                     _MM_HINT_T0);
      }
    }
    __m512i dot[R];
    if constexpr (F == QuantFormat::q6_k) {
      __m512i d0[R], d1[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) d0[r] = seed_lo, d1[r] = seed_hi;
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k)
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          uint32_t w0, w1;
          std::memcpy(&w0, codes[r] + 4 * k, 4);
          std::memcpy(&w1, codes[r] + 16 + 4 * k, 4);
          d0[r] = _mm512_dpbusd_epi32(d0[r], _mm512_set1_epi32(static_cast<int>(w0)), xk[k]);
          d1[r] = _mm512_dpbusd_epi32(d1[r], _mm512_set1_epi32(static_cast<int>(w1)), xk[4 + k]);
        }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        dot[r] = _mm512_add_epi32(
            _mm512_mullo_epi32(d0[r], _mm512_set1_epi32(tv[r].sc6[2 * i * tv[r].stride])),
            _mm512_mullo_epi32(d1[r], _mm512_set1_epi32(tv[r].sc6[(2 * i + 1) * tv[r].stride])));
    } else {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) dot[r] = seed_lo;
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k)
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          uint32_t w;
          std::memcpy(&w, codes[r] + 4 * k, 4);
          dot[r] = _mm512_dpbusd_epi32(dot[r], _mm512_set1_epi32(static_cast<int>(w)), xk[k]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float scale = kPanel ? panel->scale[i][r] : tv[r].scale[i * tv[r].stride];
      const __m512 f = _mm512_mul_ps(_mm512_set1_ps(scale), dx);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), f, acc[r]);
      if constexpr (has_min<F>()) {
        const float min = kPanel ? panel->min[i][r] : tv[r].min[i * tv[r].stride];
        acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(min), _mm512_load_ps(tb.s), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) acc_out[r] = acc[r];
}

// out[t0 + lane, n0 + r] = (accumulate ? out : bias or 0) + acc[r][lane] for valid lanes.
template <int R>
void store(const QuantArgs& a, int64_t t0, int64_t n0, const __m512 (&acc)[R], bool accumulate) {
  alignas(64) float v[R][kLanes];
  for (int r = 0; r < R; ++r) _mm512_store_ps(v[r], acc[r]);
  const int lanes = static_cast<int>(std::min<int64_t>(kLanes, a.num_tokens - t0));
  for (int l = 0; l < lanes; ++l) {
    float* o = a.out + (t0 + l) * a.out_row_stride + n0;
    for (int r = 0; r < R; ++r)
      o[r] = (accumulate ? o[r] : a.bias ? a.bias[n0 + r] : 0.0f) + v[r][l];
  }
}

// Rows r, r + 1 of a 128-byte run [r lo | r hi | r + 1 lo | r + 1 hi] from the lanes of lo and
// hi (lane k: row k's first and second 16 code bytes): the first run rows 0-1, the second 2-3.
inline void store_code_rows(__m512i lo, __m512i hi, uint8_t* dst) {
  const __m512i rows01 = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
  const __m512i rows23 = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
  _mm512_store_si512(dst, _mm512_permutex2var_epi64(lo, rows01, hi));
  _mm512_store_si512(dst + 64, _mm512_permutex2var_epi64(lo, rows23, hi));
}

// Fills the panel from R / 4 tiled groups (quant_kernels.h) for blocks [b0 + i0, b0 + n), b0
// and i0 multiples of 4. A quad's quant bytes are 4x4 transposes of 32-bit words (chunk c,
// lane 4r + j -> block j's word c), 16 blocks at a time, unpacked as block_codes does; its
// heads convert 16 at a time. Once per K block and 64 tokens, this replaces block_codes' work
// per block, row and 16 tokens: prefill (512 tokens, 2 threads) takes 0.72-0.91x the time it
// takes on plain rows, 16 tokens 0.69-1.0x. (Writing the tiles back out as GGUF blocks
// instead had made SmolLM2 Q4_1's step at 16 sequences 1.25x as long as on plain rows.) The
// quads `prefetch` bytes on are requested.
template <QuantFormat F, int R>
void fill_panel(const WeightRow (&rows)[R], int64_t b0, int i0, int n, int64_t prefetch,
                Panel<R>& p) {
  constexpr int64_t bb = block_bytes<F>();
  constexpr int head = head_bytes(F);
  const __m512i low4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int g = 0; g < R / 4; ++g) {
    const uint8_t* group = rows[4 * g].p;
    int i = i0;
    for (; i < n && b0 + i < 4 * rows[4 * g].quads; i += 4) {
      const uint8_t* q = group + (b0 + i) * 4 * bb;
      for (int64_t o = 0; o < 16 * bb; o += 64)
        _mm_prefetch(reinterpret_cast<const char*>(q) + prefetch + o, _MM_HINT_T0);
      for (int piece = 0; piece < head / 2; ++piece) {  // d[j][r], then q4_1's m[j][r]
        const __m512 v =
            _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * piece)));
        float(*dst)[R] = piece == 0 ? p.scale : p.min;
        _mm_store_ps(&dst[i][4 * g], _mm512_castps512_ps128(v));
        _mm_store_ps(&dst[i + 1][4 * g], _mm512_extractf32x4_ps(v, 1));
        _mm_store_ps(&dst[i + 2][4 * g], _mm512_extractf32x4_ps(v, 2));
        _mm_store_ps(&dst[i + 3][4 * g], _mm512_extractf32x4_ps(v, 3));
      }
      __m512i blocks[2][4];  // [half][j], lane r: quant bytes 16 * half .. of row r's block j
      for (int half = 0; half < (F == QuantFormat::q8_0 ? 2 : 1); ++half) {
        const uint8_t* c = q + 16 * head + 256 * half;
        const __m512i v0 = _mm512_loadu_si512(c), v1 = _mm512_loadu_si512(c + 64);
        const __m512i v2 = _mm512_loadu_si512(c + 128), v3 = _mm512_loadu_si512(c + 192);
        const __m512i t0 = _mm512_unpacklo_epi32(v0, v1), t1 = _mm512_unpackhi_epi32(v0, v1);
        const __m512i t2 = _mm512_unpacklo_epi32(v2, v3), t3 = _mm512_unpackhi_epi32(v2, v3);
        blocks[half][0] = _mm512_unpacklo_epi64(t0, t2);
        blocks[half][1] = _mm512_unpackhi_epi64(t0, t2);
        blocks[half][2] = _mm512_unpacklo_epi64(t1, t3);
        blocks[half][3] = _mm512_unpackhi_epi64(t1, t3);
      }
      for (int j = 0; j < 4; ++j) {
        __m512i lo, hi;
        if constexpr (F == QuantFormat::q8_0) {
          lo = _mm512_xor_si512(blocks[0][j], flip);
          hi = _mm512_xor_si512(blocks[1][j], flip);
        } else {
          lo = _mm512_and_si512(blocks[0][j], low4);
          hi = _mm512_and_si512(_mm512_srli_epi16(blocks[0][j], 4), low4);
        }
        store_code_rows(lo, hi, p.codes[i + j][4 * g]);
      }
    }
    for (; i < n; ++i)  // the blocks past the whole quads, stored whole
      for (int r = 0; r < 4; ++r) {
        const uint8_t* block = group + (4 * (b0 + i) + r) * bb;
        block_codes<F>(WeightRow{block, bb, -1, 0, 0}, 0, p.codes[i][4 * g + r]);
        p.scale[i][4 * g + r] = half_at(block);
        if constexpr (has_min<F>()) p.min[i][4 * g + r] = half_at(block + 2);
      }
  }
}

// Rows [n0, n0 + R) for token tiles [tile0, tile1), every K block. Tiled rows (whole groups:
// R = 8 tiles start at multiples of 8) are read through a Panel; a lone tiled row takes its
// blocks through WeightRow::block.
template <QuantFormat F, int R>
void row_tile(const QuantArgs& a, const TileBlock* tiles, int64_t tile0, int64_t tile1, int64_t n0) {
  const int64_t nb = a.in_features / 32;
  WeightRow rows[R];
  for (int r = 0; r < R; ++r) rows[r] = weight_row(a, n0 + r);
  constexpr bool can_panel = R % 4 == 0 && !k_quant<F>();
  const bool tiled = can_panel && rows[0].lane == 0;
  // the first token tile streams the weights: fetch the bytes ahead (a prefetch never faults)
  const int64_t prefetch = R * a.w_row_bytes + 4096;
  RowTable tables[R];
  TableView tv[R];
  for (int r = 0; r < R; ++r) tv[r] = tables[r].view();
  Panel<R> panel;  // filled and read only where tiled
  for (int64_t b0 = 0; b0 < nb; b0 += kKBlock / 32) {
    const int n = static_cast<int>(std::min<int64_t>(kKBlock / 32, nb - b0));
    if (!tiled)
      for (int r = 0; r < R; ++r) row_table<F>(rows[r], b0, n, tv[r]);
    for (int64_t t = tile0; t < tile1; ++t) {
      __m512 acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
      // The first token tile fills the panel a quad at a time as it reaches it, the weights'
      // loads interleaved with its dot products as block_codes' are (filled all at once
      // before the tile, the 1B Q8_0 model's step at 16 sequences took 1.18x that on plain
      // rows; this way 0.93x).
      auto fill = [&](int i) {
        if constexpr (can_panel) {
          if (tiled && t == tile0 && i % 4 == 0)
            fill_panel<F, R>(rows, b0, i, std::min(n, i + 4), prefetch, panel);
        }
      };
      const TileBlock* xt = tiles + t * nb + b0;
      if (tiled)  // tiled implies can_panel
        tile<F, R, can_panel>(rows, tv, &panel, b0, n, xt, 0, acc, fill);
      else
        tile<F, R, false>(rows, tv, nullptr, b0, n, xt, t == tile0 ? prefetch : 0, acc, fill);
      store<R>(a, t * kLanes, n0, acc, b0 > 0);
    }
  }
}

template <QuantFormat F>
void run(const QuantArgs& a, const TileBlock* tiles, int64_t num_tiles, int64_t n0, int64_t n1) {
  for (int64_t t0 = 0; t0 < num_tiles; t0 += kTilesPerBlock) {
    const int64_t t1 = std::min(num_tiles, t0 + kTilesPerBlock);
    int64_t n = n0;
    for (; n + kRows <= n1; n += kRows) row_tile<F, kRows>(a, tiles, t0, t1, n);
    for (; n < n1; ++n) row_tile<F, 1>(a, tiles, t0, t1, n);
  }
}

template <QuantFormat F>
void run_parallel(const QuantArgs& a, TileBlock* tiles, int64_t num_tiles) {
  const int64_t nb = a.in_features / 32;
  const int64_t num_threads = std::max(1, omp_get_max_threads());
  const int64_t part_rows = ceil_div(ceil_div(a.out_features, num_threads), kRows) * kRows;
  const int64_t num_parts = ceil_div(a.out_features, part_rows);
  const double work = static_cast<double>(a.num_tokens) * a.out_features * a.in_features;
#pragma omp parallel if (work >= kMinParallelWork && num_parts > 1)
  {
    // every thread quantises a share of the (tile, block range) pieces: one tile of 16
    // tokens would otherwise be one thread's work while the others wait
#pragma omp for schedule(static)
    for (int64_t i = 0; i < num_tiles * kQuantPieces; ++i) {
      const int64_t t = i / kQuantPieces, p = i % kQuantPieces;
      quantize_tile(a, t, nb * p / kQuantPieces, nb * (p + 1) / kQuantPieces, tiles + t * nb);
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < num_parts; ++i)
      run<F>(a, tiles, num_tiles, i * part_rows, std::min(a.out_features, (i + 1) * part_rows));
  }
}

}  // namespace

void quant_matmul_avx512_vnni(const QuantArgs& a) {
  if (a.num_tokens == 1) return quant_gemv_avx512_vnni(a);
  const int64_t num_tiles = ceil_div(a.num_tokens, kLanes);
  const size_t count = static_cast<size_t>(num_tiles * (a.in_features / 32));
  auto* tiles = static_cast<TileBlock*>(thread_scratch(Scratch::tiles, count * sizeof(TileBlock)));
  switch (a.format) {
    case QuantFormat::q8_0: return run_parallel<QuantFormat::q8_0>(a, tiles, num_tiles);
    case QuantFormat::q4_0: return run_parallel<QuantFormat::q4_0>(a, tiles, num_tiles);
    case QuantFormat::q4_1: return run_parallel<QuantFormat::q4_1>(a, tiles, num_tiles);
    case QuantFormat::q4_k: return run_parallel<QuantFormat::q4_k>(a, tiles, num_tiles);
    case QuantFormat::q6_k: return run_parallel<QuantFormat::q6_k>(a, tiles, num_tiles);
  }
}

}  // namespace quant_detail
}  // namespace engine
