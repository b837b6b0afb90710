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

template <QuantFormat F, int R>
inline void tile(const WeightRow (&rows)[R], const RowTable* tables, int64_t b0, int nb,
                 const TileBlock* xt, int64_t prefetch, __m512 (&acc)[R]) {
  alignas(32) uint8_t buf[R][32];
  for (int i = 0; i < nb; ++i) {
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
      codes[r] = block_codes<F>(rows[r], b0 + i, buf[r]);
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
        dot[r] =
            _mm512_add_epi32(_mm512_mullo_epi32(d0[r], _mm512_set1_epi32(tables[r].sc6[i][0])),
                             _mm512_mullo_epi32(d1[r], _mm512_set1_epi32(tables[r].sc6[i][1])));
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
      const __m512 f = _mm512_mul_ps(_mm512_set1_ps(tables[r].scale[i]), dx);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), f, acc[r]);
      if constexpr (has_min<F>())
        acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(tables[r].min[i]), _mm512_load_ps(tb.s), acc[r]);
    }
  }
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

// The 4 128-bit lanes of v to p, p + stride, p + 2 * stride, p + 3 * stride.
inline void store_lanes(__m512i v, uint8_t* p, int64_t stride) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_castsi512_si128(v));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + stride), _mm512_extracti32x4_epi32(v, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 2 * stride), _mm512_extracti32x4_epi32(v, 2));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 3 * stride), _mm512_extracti32x4_epi32(v, 3));
}

// Blocks [b0, b0 + n) (b0 % 4 == 0) of the 4 rows of a tiled group (quant_kernels.h) as GGUF
// blocks: row r's block b0 + i to dst + r * dst_row + i * bb. A quad's codes are 4x4
// transposes of 32-bit words (chunk c, lane 4r + j -> block j's word c), 16 blocks at a time;
// blocks past the whole quads are stored whole already. The quads `prefetch` bytes on are
// requested (the next row tile's; prefill, 512 tokens on 2 threads, the time against plain
// rows without -> with: 8192 x 2048 q4_0 1.08x -> 1.05x, q8_0 1.18x -> 1.13x).
template <QuantFormat F>
void untile_group(const uint8_t* group, int64_t quads, int64_t b0, int n, uint8_t* dst,
                  int64_t dst_row, int64_t prefetch) {
  constexpr int64_t bb = block_bytes<F>();
  constexpr int head = F == QuantFormat::q4_1 ? 4 : 2;
  int i = 0;
  for (; i < n && b0 + i < 4 * quads; i += 4) {
    const uint8_t* q = group + (b0 + i) * 4 * bb;
    if (prefetch)
      for (int64_t o = 0; o < 16 * bb; o += 64)
        _mm_prefetch(reinterpret_cast<const char*>(q) + prefetch + o, _MM_HINT_T0);
    for (int j = 0; j < 4; ++j)
      for (int r = 0; r < 4; ++r) {
        uint8_t* block = dst + r * dst_row + (i + j) * bb;
        std::memcpy(block, q + 2 * (4 * j + r), 2);
        if constexpr (head == 4) std::memcpy(block + 2, q + 32 + 2 * (4 * j + r), 2);
      }
    for (int half = 0; half < (F == QuantFormat::q8_0 ? 2 : 1); ++half) {
      const uint8_t* c = q + 16 * head + 256 * half;
      const __m512i v0 = _mm512_loadu_si512(c), v1 = _mm512_loadu_si512(c + 64);
      const __m512i v2 = _mm512_loadu_si512(c + 128), v3 = _mm512_loadu_si512(c + 192);
      const __m512i t0 = _mm512_unpacklo_epi32(v0, v1), t1 = _mm512_unpackhi_epi32(v0, v1);
      const __m512i t2 = _mm512_unpacklo_epi32(v2, v3), t3 = _mm512_unpackhi_epi32(v2, v3);
      uint8_t* out = dst + i * bb + head + 16 * half;
      store_lanes(_mm512_unpacklo_epi64(t0, t2), out, dst_row);
      store_lanes(_mm512_unpackhi_epi64(t0, t2), out + bb, dst_row);
      store_lanes(_mm512_unpacklo_epi64(t1, t3), out + 2 * bb, dst_row);
      store_lanes(_mm512_unpackhi_epi64(t1, t3), out + 3 * bb, dst_row);
    }
  }
  for (; i < n; ++i)
    for (int r = 0; r < 4; ++r)
      std::memcpy(dst + r * dst_row + i * bb, group + (4 * (b0 + i) + r) * bb, bb);
}

// Rows [n0, n0 + R) for token tiles [tile0, tile1), every K block. Tiled rows (whole groups:
// R = 8 tiles start at multiples of 8) are first written out as GGUF blocks, a K block at a
// time, and read from there; a lone tiled row takes its blocks through WeightRow::block.
template <QuantFormat F, int R>
void row_tile(const QuantArgs& a, const TileBlock* tiles, int64_t tile0, int64_t tile1, int64_t n0) {
  const int64_t nb = a.in_features / 32;
  WeightRow rows[R];
  for (int r = 0; r < R; ++r) rows[r] = weight_row(a, n0 + r);
  constexpr bool can_untile = R % 4 == 0 && !k_quant<F>();
  const bool untile = can_untile && rows[0].lane == 0;
  constexpr int64_t kBlocks = kKBlock / 32, kRowBytes = kBlocks * block_bytes<F>();
  alignas(64) uint8_t plain[can_untile ? R * kRowBytes : 1];
  WeightRow plain_rows[R];
  for (int r = 0; r < R; ++r)
    plain_rows[r] = {plain + (can_untile ? r * kRowBytes : 0), block_bytes<F>(), -1, 0, 0};
  RowTable tables[R];
  // the first token tile streams the weights: fetch the bytes ahead (a prefetch never faults)
  const int64_t prefetch = R * a.w_row_bytes + 4096;
  for (int64_t b0 = 0; b0 < nb; b0 += kBlocks) {
    const int n = static_cast<int>(std::min<int64_t>(kBlocks, nb - b0));
    const WeightRow* src = rows;
    int64_t first = b0;  // of the blocks src's rows hold
    if (untile) {
      for (int g = 0; g < R / 4; ++g)
        untile_group<F>(rows[4 * g].p, rows[4 * g].quads, b0, n, plain + 4 * g * kRowBytes,
                        kRowBytes, prefetch);
      src = plain_rows;
      first = 0;
    }
    for (int r = 0; r < R; ++r) row_table<F>(src[r], first, n, tables[r].view());
    for (int64_t t = tile0; t < tile1; ++t) {
      __m512 acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
      tile<F, R>(*reinterpret_cast<const WeightRow(*)[R]>(src), tables, first, n,
                 tiles + t * nb + b0, t == tile0 && !untile ? prefetch : 0, acc);
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
