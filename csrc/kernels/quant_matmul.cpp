// quant_matmul: out = x @ dequantise(w)^T (+ bias) on GGUF blocks. The launcher validates
// and dispatches on the instruction set; the portable kernel (plain C++) lives here, the
// intrinsics kernels in quant_matmul_avx2.cpp (sharing the driver in quant_kernels.h) and,
// for AVX-512 with VNNI, quant_matmul_avx512.cpp (many tokens) and quant_gemv_avx512.cpp
// (one token).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "engine/check.h"
#include "engine/isa.h"
#include "engine/ops.h"
#include "quant_kernels.h"

namespace engine {

// ---- formats ---------------------------------------------------------------------

namespace {

struct FormatInfo {
  const char* name;
  int64_t block_values;
  int64_t block_bytes;
};

constexpr FormatInfo kFormats[] = {
    {"q8_0", 32, 34}, {"q4_0", 32, 18}, {"q4_1", 32, 20}, {"q4_k", 256, 144}, {"q6_k", 256, 210}};

const FormatInfo& info(QuantFormat f) { return kFormats[static_cast<int>(f)]; }

}  // namespace

QuantFormat parse_quant_format(const std::string& name) {
  for (int i = 0; i < 5; ++i)
    if (name == kFormats[i].name) return static_cast<QuantFormat>(i);
  throw std::invalid_argument("unknown quantisation format '" + name +
                              "', expected q8_0, q4_0, q4_1, q4_k or q6_k");
}

const char* quant_format_name(QuantFormat f) { return info(f).name; }
int64_t quant_block_values(QuantFormat f) { return info(f).block_values; }
int64_t quant_block_bytes(QuantFormat f) { return info(f).block_bytes; }

namespace quant_detail {
namespace {

// ---- portable kernel ---------------------------------------------------------------

// One group of 32 weight values as integers with one scale and one min:
// w[i] = scale * q[i] + min (q6_k folds its two 16-value scales into q).
struct Group {
  int16_t q[32];
  float scale;
  float min;
};

// The 6-bit scale and min of q4_k sub-block j (ggml's get_scale_min_k4).
inline void q4_k_scale_min(const uint8_t* s, int j, int* sc, int* m) {
  if (j < 4) {
    *sc = s[j] & 63;
    *m = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Group g (values 32g .. 32g + 31) of a weight row.
template <QuantFormat F>
void load_group(WeightRow w, int64_t g, Group& out) {
  const uint8_t* row = w.p;  // the k-quants' rows are always plain
  uint8_t buf[40];
  if constexpr (F == QuantFormat::q8_0) {
    const uint8_t* b = w.block(g, buf);
    out.scale = half_to_float(b), out.min = 0.0f;
    for (int i = 0; i < 32; ++i) out.q[i] = static_cast<int8_t>(b[2 + i]);
  } else if constexpr (F == QuantFormat::q4_0 || F == QuantFormat::q4_1) {
    const bool has_min = F == QuantFormat::q4_1;
    const uint8_t* b = w.block(g, buf);
    const uint8_t* qs = b + (has_min ? 4 : 2);
    const int offset = has_min ? 0 : 8;
    out.scale = half_to_float(b), out.min = has_min ? half_to_float(b + 2) : 0.0f;
    for (int i = 0; i < 16; ++i) {
      out.q[i] = static_cast<int16_t>((qs[i] & 0xF) - offset);
      out.q[i + 16] = static_cast<int16_t>((qs[i] >> 4) - offset);
    }
  } else if constexpr (F == QuantFormat::q4_k) {
    const uint8_t* b = row + (g / 8) * 144;
    const int j = static_cast<int>(g % 8);  // sub-block: nibbles of 32-byte chunk j / 2
    int sc, m;
    q4_k_scale_min(b + 4, j, &sc, &m);
    out.scale = half_to_float(b) * static_cast<float>(sc);
    out.min = -half_to_float(b + 2) * static_cast<float>(m);
    const uint8_t* qs = b + 16 + 32 * (j / 2);
    const int shift = 4 * (j % 2);
    for (int i = 0; i < 32; ++i) out.q[i] = static_cast<int16_t>((qs[i] >> shift) & 0xF);
  } else {  // q6_k
    const uint8_t* b = row + (g / 8) * 210;
    const int j = static_cast<int>(g % 8), half = j / 4, part = j % 4;
    const uint8_t* ql = b + 64 * half + 32 * (part % 2);
    const uint8_t* qh = b + 128 + 32 * half;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192) + 8 * half + 2 * part;
    out.scale = half_to_float(b + 208), out.min = 0.0f;
    for (int i = 0; i < 32; ++i) {
      const int lo = (ql[i] >> (4 * (part / 2))) & 0xF, hi = (qh[i] >> (2 * part)) & 3;
      out.q[i] = static_cast<int16_t>(((lo | (hi << 4)) - 32) * sc[i / 16]);
    }
  }
}

struct PortableKernel {
  template <QuantFormat F> static constexpr int rows() { return 1; }
  template <QuantFormat F> static constexpr int tokens() { return 4; }
  static constexpr int kGemvRows = 1;

  template <QuantFormat F, int R, int C>
  static void tile(const QuantArgs& a, const ActBlocks& x, int64_t t0, int64_t n0, int64_t k0,
                   int64_t k_len, bool accumulate) {
    static_assert(R == 1, "the portable kernel works one weight row at a time");
    const int64_t k_total = a.in_features, nb = k_total / kActBlock;
    const WeightRow row = weight_row(a, n0);
    float acc[C] = {};
    Group grp;
    for (int64_t g = k0 / 32; g < (k0 + k_len) / 32; ++g) {
      load_group<F>(row, g, grp);
      for (int c = 0; c < C; ++c) {
        const int8_t* xq = x.q + (t0 + c) * k_total + g * 32;
        int32_t dot = 0;
        for (int i = 0; i < 32; ++i) dot += grp.q[i] * xq[i];
        const int64_t xb = (t0 + c) * nb + g;
        acc[c] += grp.scale * x.d[xb] * static_cast<float>(dot) + grp.min * x.s[xb];
      }
    }
    for (int c = 0; c < C; ++c) {
      float& o = a.out[(t0 + c) * a.out_row_stride + n0];
      o = (accumulate ? o : a.bias ? a.bias[n0] : 0.0f) + acc[c];
    }
  }

  static void quantize_row(const float* x, int64_t k, int8_t* q, float* d, float* s) {
    for (int64_t b = 0; b < k / kActBlock; ++b) {
      const float* xb = x + b * kActBlock;
      float amax = 0.0f;
      bool finite = true;
      for (int i = 0; i < kActBlock; ++i) {
        const float v = std::fabs(xb[i]);
        finite = finite && v <= std::numeric_limits<float>::max();
        amax = std::max(amax, v);
      }
      const float db = amax / 127.0f, inv = db != 0.0f ? 1.0f / db : 0.0f;
      int32_t sum = 0;
      for (int i = 0; i < kActBlock; ++i) {
        const int32_t v = finite ? static_cast<int32_t>(std::nearbyint(xb[i] * inv)) : 0;
        q[b * kActBlock + i] = static_cast<int8_t>(v);
        sum += v;
      }
      d[b] = finite ? db : std::numeric_limits<float>::quiet_NaN();
      s[b] = d[b] * static_cast<float>(sum);
    }
  }
};

}  // namespace

void quant_matmul_portable(const QuantArgs& a, const ActBlocks& x) { run_any<PortableKernel>(a, x); }

void* thread_scratch(Scratch slot, size_t bytes) {
  struct Buffer {
    std::unique_ptr<uint8_t[]> data;
    size_t size = 0;
  };
  thread_local Buffer buffers[static_cast<int>(Scratch::count)];
  Buffer& b = buffers[static_cast<int>(slot)];
  if (b.size < bytes + 64) {
    b.data.reset(new uint8_t[bytes + 64]);  // may throw: the size is only set once it holds
    b.size = bytes + 64;
  }
  auto p = reinterpret_cast<uintptr_t>(b.data.get());
  return reinterpret_cast<void*>((p + 63) & ~uintptr_t{63});
}

}  // namespace quant_detail

// ---- launcher ----------------------------------------------------------------------

namespace {

constexpr const char* kOp = "quant_matmul";

bool has_vnni() {
#if defined(ENGINE_X86) && (defined(__GNUC__) || defined(__clang__))
  static const bool yes = __builtin_cpu_supports("avx512vnni");
  return yes;
#else
  return false;
#endif
}

void validate(const TensorView& x, const TensorView& w, QuantFormat format,
              const TensorView& bias, const TensorView& out) {
  check_linear_x(x, kOp);
  const int64_t in_features = x.shape[1];
  const int64_t block_values = quant_block_values(format);
  ENGINE_CHECK(in_features > 0 && in_features % block_values == 0, kOp,
               "x: in_features must be a positive multiple of " + std::to_string(block_values) +
                   " (the " + std::string(quant_format_name(format)) + " block), got " +
                   std::to_string(in_features));
  const int64_t row_bytes = in_features / block_values * quant_block_bytes(format);
  ENGINE_CHECK(w.dtype == DType::u8 && w.ndim == 2 && w.shape[1] == row_bytes, kOp,
               "w must be uint8 [out_features, " + std::to_string(row_bytes) + "] (" +
                   std::to_string(in_features) + " values in " +
                   std::string(quant_format_name(format)) + " blocks), got " + w.describe());
  if (w.numel() > 0) check_contiguous(w, kOp, "w");
  check_linear_bias_out(x, w, bias, out, w.shape[0], kOp);
}

// Grow-only scratch for the quantised activations of the calling thread.
struct Scratch {
  std::vector<int8_t> q;
  std::vector<float> d, s;
};

}  // namespace

std::string quant_kernel() {
  switch (current_isa()) {
    case Isa::avx512: return has_vnni() ? "avx512_vnni" : "avx2";
    case Isa::avx2: return "avx2";
    default: return "portable";
  }
}

void check_interleave(QuantFormat f, int64_t interleave, const char* op) {
  ENGINE_CHECK(interleave == 1 || interleave == 4, op,
               "interleave must be 1 (rows one after another) or 4 (4-row tiles), got " +
                   std::to_string(interleave));
  ENGINE_CHECK(interleave == 1 || quant_block_values(f) == 32, op,
               std::string("interleave 4 needs a 32-value block format (q8_0, q4_0 or q4_1), "
                           "got ") +
                   quant_format_name(f));
}

void quant_matmul(const TensorView& x, const TensorView& w, const std::string& format,
                  const TensorView& bias, const TensorView& out, int64_t interleave,
                  const Prefetch* prefetch) {
  QuantFormat f;
  try {
    f = parse_quant_format(format);
  } catch (const std::invalid_argument& e) {
    fail(kOp, std::string("format: ") + e.what());
  }
  check_interleave(f, interleave, kOp);
  validate(x, w, f, bias, out);
  quant_detail::QuantArgs a;
  a.x = x.ptr<const float>();
  a.x_row_stride = x.strides[0];
  a.w = w.ptr<const uint8_t>();
  a.w_row_bytes = w.shape[1];
  a.w_block_bytes = quant_block_values(f) == 32 ? quant_block_bytes(f) : 0;
  a.interleaved_rows = interleave == 4 ? w.shape[0] / 4 * 4 : 0;
  a.format = f;
  a.bias = present(bias) ? bias.ptr<const float>() : nullptr;
  a.out = out.ptr<float>();
  a.out_row_stride = out.strides[0];
  a.num_tokens = x.shape[0];
  a.in_features = x.shape[1];
  a.out_features = w.shape[0];
  a.prefetch = prefetch != nullptr && prefetch->count > 0 ? prefetch : nullptr;
  if (a.num_tokens == 0 || a.out_features == 0) return;

  const std::string kernel = quant_kernel();
#if defined(ENGINE_X86)
  if (kernel == "avx512_vnni") return quant_detail::quant_matmul_avx512_vnni(a);
#endif
  thread_local Scratch scratch;
  const size_t num_values = static_cast<size_t>(a.num_tokens * a.in_features);
  if (scratch.q.size() < num_values) scratch.q.resize(num_values);
  if (scratch.d.size() < num_values / 32) {
    scratch.d.resize(num_values / 32);
    scratch.s.resize(num_values / 32);
  }
  const quant_detail::ActBlocks acts{scratch.q.data(), scratch.d.data(), scratch.s.data()};

#if defined(ENGINE_X86)
  if (kernel == "avx2") return quant_detail::quant_matmul_avx2(a, acts);
#endif
  quant_detail::quant_matmul_portable(a, acts);
}

}  // namespace engine
