// quant_embedding: gathers rows of an embedding table kept in GGUF blocks and
// dequantises them to float32 (ggml's dequantize_row_* arithmetic, in float32).
#include <cstdint>
#include <string>

#include "engine/check.h"
#include "engine/convert.h"
#include "engine/ops.h"
#include "quant_kernels.h"

namespace engine {
namespace {

constexpr const char* kOp = "quant_embedding";

inline float half_at(const uint8_t* p) { return f16_to_f32(static_cast<uint16_t>(p[0] | (p[1] << 8))); }

// The 32-value formats' rows may be tiled (interleave 4): their blocks come through
// WeightRow::block.
void q8_0_row(const quant_detail::WeightRow& w, int64_t num_blocks, float* y) {
  uint8_t buf[40];
  for (int64_t i = 0; i < num_blocks; ++i, y += 32) {
    const uint8_t* b = w.block(i, buf);
    const float d = half_at(b);
    for (int j = 0; j < 32; ++j) y[j] = d * static_cast<float>(static_cast<int8_t>(b[2 + j]));
  }
}

void q4_row(const quant_detail::WeightRow& w, int64_t num_blocks, bool has_min, float* y) {
  uint8_t buf[40];
  for (int64_t i = 0; i < num_blocks; ++i, y += 32) {
    const uint8_t* b = w.block(i, buf);
    const float d = half_at(b), m = has_min ? half_at(b + 2) : 0.0f;
    const uint8_t* qs = b + (has_min ? 4 : 2);
    const int offset = has_min ? 0 : 8;
    for (int j = 0; j < 16; ++j) {
      y[j] = d * static_cast<float>((qs[j] & 0xF) - offset) + m;
      y[j + 16] = d * static_cast<float>((qs[j] >> 4) - offset) + m;
    }
  }
}

void q4_k_row(const uint8_t* b, int64_t num_blocks, float* y) {
  for (int64_t i = 0; i < num_blocks; ++i, b += 144) {
    const float d = half_at(b), dmin = half_at(b + 2);
    const uint8_t* s = b + 4;
    const uint8_t* qs = b + 16;
    for (int j = 0; j < 8; ++j, y += 32) {
      const int sc = j < 4 ? s[j] & 63 : (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
      const int m = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
      const float scale = d * static_cast<float>(sc), min = dmin * static_cast<float>(m);
      const uint8_t* q = qs + 32 * (j / 2);
      for (int l = 0; l < 32; ++l)
        y[l] = scale * static_cast<float>((q[l] >> (4 * (j % 2))) & 0xF) - min;
    }
  }
}

void q6_k_row(const uint8_t* b, int64_t num_blocks, float* y) {
  for (int64_t i = 0; i < num_blocks; ++i, b += 210) {
    const float d = half_at(b + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    for (int half = 0; half < 2; ++half, y += 128) {
      const uint8_t* ql = b + 64 * half;
      const uint8_t* qh = b + 128 + 32 * half;
      for (int l = 0; l < 32; ++l) {
        const int is = 8 * half + l / 16;
        const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        y[l] = d * static_cast<float>(sc[is]) * static_cast<float>(q1);
        y[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q2);
        y[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q3);
        y[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q4);
      }
    }
  }
}

void dequantize_row(QuantFormat f, const quant_detail::WeightRow& w, int64_t num_blocks, float* y) {
  switch (f) {
    case QuantFormat::q8_0: return q8_0_row(w, num_blocks, y);
    case QuantFormat::q4_0: return q4_row(w, num_blocks, false, y);
    case QuantFormat::q4_1: return q4_row(w, num_blocks, true, y);
    case QuantFormat::q4_k: return q4_k_row(w.p, num_blocks, y);
    case QuantFormat::q6_k: return q6_k_row(w.p, num_blocks, y);
  }
}

}  // namespace

void quant_embedding(const TensorView& ids, const TensorView& table, const std::string& format,
                     const TensorView& out, int64_t interleave) {
  QuantFormat f;
  try {
    f = parse_quant_format(format);
  } catch (const std::invalid_argument& e) {
    fail(kOp, std::string("format: ") + e.what());
  }
  check_interleave(f, interleave, kOp);
  check_dtype(ids, kOp, "ids", {DType::i32});
  check_ndim(ids, kOp, "ids", 1);
  check_dtype(out, kOp, "out", {DType::f32});
  check_ndim(out, kOp, "out", 2);
  const int64_t num_tokens = ids.size(0), hidden = out.size(1);
  const int64_t block_values = quant_block_values(f);
  ENGINE_CHECK(hidden > 0 && hidden % block_values == 0, kOp,
               "out: hidden must be a positive multiple of " + std::to_string(block_values) +
                   " (the " + format + " block), got " + out.describe());
  check_shape(out, kOp, "out", {num_tokens, hidden});
  if (out.numel() > 0) check_row_contiguous(out, kOp, "out");
  const int64_t num_blocks = hidden / block_values;
  const int64_t row_bytes = num_blocks * quant_block_bytes(f);
  ENGINE_CHECK(table.dtype == DType::u8 && table.ndim == 2 && table.shape[1] == row_bytes, kOp,
               "table must be uint8 [vocab, " + std::to_string(row_bytes) + "] (" +
                   std::to_string(hidden) + " values in " + format + " blocks), got " +
                   table.describe());
  if (table.numel() > 0) {
    if (interleave == 1)
      check_row_contiguous(table, kOp, "table");
    else
      check_contiguous(table, kOp, "table");
  }
  const int64_t vocab = table.size(0);

  const int32_t* id = ids.ptr<int32_t>();
  const int64_t id_stride = ids.stride(0);
  for (int64_t t = 0; t < num_tokens; ++t) {  // every id checked before anything is written
    const int64_t v = id[t * id_stride];
    ENGINE_CHECK(v >= 0 && v < vocab, kOp,
                 "ids[" + std::to_string(t) + "] = " + std::to_string(v) + " is outside [0, " +
                     std::to_string(vocab) + ") (the table rows)");
  }
  quant_detail::QuantArgs a{};  // the table as a weight, for its rows' layout
  a.w = table.ptr<const uint8_t>();
  a.w_row_bytes = table.stride(0);
  a.w_block_bytes = block_values == 32 ? quant_block_bytes(f) : 0;
  a.interleaved_rows = interleave == 4 ? vocab / 4 * 4 : 0;
  a.format = f;
  a.in_features = hidden;
  float* o = out.ptr<float>();
  const int64_t os = out.stride(0);
#pragma omp parallel for schedule(static) if (num_tokens * hidden >= (1 << 16))
  for (int64_t t = 0; t < num_tokens; ++t)
    dequantize_row(f, quant_detail::weight_row(a, id[t * id_stride]), num_blocks, o + t * os);
}

}  // namespace engine
