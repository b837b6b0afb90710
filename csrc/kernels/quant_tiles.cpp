// quant_tiles: q8_0 / q4_0 / q4_1 rows to the 4-row tiles of interleave 4 (quant_kernels.h)
// and back. Per group of 4 rows and quad of 4 blocks, the 16 (block j, row r) pairs: their
// f16 d at 4j + r (q4_1: then their f16 m), then chunks of 64 bytes, chunk c holding at
// 32-bit lane 4r + j the pair's quant bytes 4c .. 4c + 3. Blocks past the last whole quad
// follow whole, the 4 rows' block b in turn; rows past the last whole group stay rows.
#include <cstdint>
#include <cstring>
#include <string>

#include "engine/check.h"
#include "engine/ops.h"
#include "quant_kernels.h"

namespace engine {
namespace {

constexpr const char* kOp = "quant_tiles";

// Moves `bytes` between a row-major block and its place in a tile, either way.
inline void move(uint8_t* rows_side, uint8_t* tile_side, int64_t bytes, bool to_tiles) {
  if (to_tiles)
    std::memcpy(tile_side, rows_side, bytes);
  else
    std::memcpy(rows_side, tile_side, bytes);
}

// One group of 4 rows (row r at rows + r * row_bytes) and its tiles (at tiles).
void group(uint8_t* rows, uint8_t* tiles, int64_t row_bytes, int64_t bb, int head, bool to_tiles) {
  const int64_t blocks = row_bytes / bb, quads = blocks / 4;
  for (int64_t q = 0; q < quads; ++q) {
    uint8_t* tile = tiles + q * 16 * bb;
    for (int j = 0; j < 4; ++j)
      for (int r = 0; r < 4; ++r) {
        uint8_t* block = rows + r * row_bytes + (4 * q + j) * bb;
        for (int k = 0; k < head / 2; ++k)  // d, then q4_1's m
          move(block + 2 * k, tile + quant_detail::tile_head_at(j, r, k), 2, to_tiles);
        for (int64_t c = 0; c < (bb - head) / 4; ++c)
          move(block + head + 4 * c, tile + quant_detail::tile_word_at(head, j, r, c), 4, to_tiles);
      }
  }
  for (int64_t b = 4 * quads; b < blocks; ++b)
    for (int r = 0; r < 4; ++r)
      move(rows + r * row_bytes + b * bb, tiles + (4 * b + r) * bb, bb, to_tiles);
}

}  // namespace

void quant_tiles(const TensorView& src, const std::string& format, bool to_tiles,
                 const TensorView& out) {
  QuantFormat f;
  try {
    f = parse_quant_format(format);
  } catch (const std::invalid_argument& e) {
    fail(kOp, std::string("format: ") + e.what());
  }
  check_interleave(f, 4, kOp);
  for (const auto* t : {&src, &out}) {
    const char* arg = t == &src ? "src" : "out";
    check_dtype(*t, kOp, arg, {DType::u8});
    check_ndim(*t, kOp, arg, 2);
    if (t->numel() > 0) check_contiguous(*t, kOp, arg);
  }
  check_shape(out, kOp, "out", {src.size(0), src.size(1)});
  const int64_t bb = quant_block_bytes(f), row_bytes = src.size(1);
  ENGINE_CHECK(row_bytes % bb == 0, kOp,
               "src: rows must be whole " + std::string(quant_format_name(f)) + " blocks of " +
                   std::to_string(bb) + " bytes, got " + src.describe());
  ENGINE_CHECK(!overlaps(src, out), kOp, "out must not share memory with src");
  const int64_t n = src.size(0), groups = n / 4;
  // Only out is written; group() reads through the side it does not write.
  uint8_t* s = const_cast<uint8_t*>(src.ptr<const uint8_t>());
  uint8_t* o = out.ptr<uint8_t>();
  const int head = quant_detail::head_bytes(f);
#pragma omp parallel for schedule(static) if (groups >= 64)
  for (int64_t g = 0; g < groups; ++g) {
    uint8_t* a = s + 4 * g * row_bytes;
    uint8_t* b = o + 4 * g * row_bytes;
    if (to_tiles)
      group(a, b, row_bytes, bb, head, true);
    else
      group(b, a, row_bytes, bb, head, false);
  }
  if (n > 4 * groups)
    std::memcpy(o + 4 * groups * row_bytes, s + 4 * groups * row_bytes,
                (n - 4 * groups) * row_bytes);
}

}  // namespace engine
