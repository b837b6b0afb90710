// varlen_attention: attention within each sequence of a packed batch, with no KV cache
// and no padding (see ops.h). Bidirectional for encoders (BERT); causal for a decoder
// run over whole prompts (embeddings from a Llama-family model).
//
// The launcher validates the layout, cuts the batch into work items of (sequence, query
// head, block of query rows), gives each thread its own scratch and runs the items in
// parallel; the kernel (varlen_attention_kernels.h) is shared by every ISA.
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "engine/check.h"
#include "engine/isa.h"
#include "engine/ops.h"
#include "varlen_attention_kernels.h"

namespace engine {
namespace varlen {
namespace {

constexpr const char* kOp = "varlen_attention";

// ================================================================================
// Validation
// ================================================================================

int64_t at(const TensorView& t, int64_t i) { return t.ptr<int32_t>()[i * t.stride(0)]; }

void check_heads(const TensorView& t, const char* arg) {
  check_dtype(t, kOp, arg, {DType::f32});
  check_ndim(t, kOp, arg, 3);
  if (t.numel() > 0) check_row_contiguous(t, kOp, arg);
}

void check_tensors(const TensorView& q, const TensorView& k, const TensorView& v,
                   const TensorView& query_start_loc, double scale, const TensorView& out) {
  check_heads(q, "q");
  const int64_t num_tokens = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  check_heads(k, "k");
  check_shape(k, kOp, "k", {num_tokens, -1, head_dim});
  check_heads(v, "v");
  check_shape(v, kOp, "v", {num_tokens, k.size(1), head_dim});
  const int64_t num_kv_heads = k.size(1);
  ENGINE_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, kOp,
               "q's " + std::to_string(num_heads) + " heads must be a multiple of k's " +
                   std::to_string(num_kv_heads) + " KV heads");
  check_dtype(query_start_loc, kOp, "query_start_loc", {DType::i32});
  check_ndim(query_start_loc, kOp, "query_start_loc", 1);
  ENGINE_CHECK(query_start_loc.size(0) >= 1, kOp,
               "query_start_loc must hold num_seqs + 1 >= 1 entries");
  check_heads(out, "out");
  check_shape(out, kOp, "out", {num_tokens, num_heads, head_dim});
  ENGINE_CHECK(!overlaps(out, q) && !overlaps(out, k) && !overlaps(out, v), kOp,
               "out must not share memory with q, k or v");
  ENGINE_CHECK(std::isfinite(scale), kOp, "scale must be finite, got " + std::to_string(scale));
}

// query_start_loc partitions [0, num_tokens) into sequences, in order.
void check_batch(const TensorView& query_start_loc, int64_t num_tokens) {
  const int64_t num_seqs = query_start_loc.size(0) - 1;
  ENGINE_CHECK(at(query_start_loc, 0) == 0, kOp,
               "query_start_loc[0] must be 0, got " + std::to_string(at(query_start_loc, 0)));
  for (int64_t s = 0; s < num_seqs; ++s)
    ENGINE_CHECK(at(query_start_loc, s + 1) >= at(query_start_loc, s), kOp,
                 "query_start_loc must be non-decreasing, but query_start_loc[" +
                     std::to_string(s + 1) + "] = " + std::to_string(at(query_start_loc, s + 1)) +
                     " < query_start_loc[" + std::to_string(s) +
                     "] = " + std::to_string(at(query_start_loc, s)));
  ENGINE_CHECK(at(query_start_loc, num_seqs) == num_tokens, kOp,
               "query_start_loc[" + std::to_string(num_seqs) + "] must equal q's " +
                   std::to_string(num_tokens) + " tokens, got " +
                   std::to_string(at(query_start_loc, num_seqs)));
}

// ================================================================================
// Portable vector type (the baseline build: SSE2 on x86-64)
// ================================================================================

struct PortableOps {
  static constexpr int kWidth = 8;
  static constexpr int kRows = 4;
  static constexpr int kVecs = 1;
  struct Vec {
    float x[8];
  };

  static Vec zero() { return set1(0.0f); }
  static Vec load(const float* p) {
    Vec r;
    for (int i = 0; i < 8; ++i) r.x[i] = p[i];
    return r;
  }
  static void store(float* p, const Vec& v) {
    for (int i = 0; i < 8; ++i) p[i] = v.x[i];
  }
  static Vec set1(float a) {
    Vec r;
    for (int i = 0; i < 8; ++i) r.x[i] = a;
    return r;
  }
  static Vec fma(const Vec& a, const Vec& b, const Vec& c) {
    Vec r;
    for (int i = 0; i < 8; ++i) r.x[i] = a.x[i] * b.x[i] + c.x[i];
    return r;
  }
  static Vec mul(const Vec& a, const Vec& b) {
    Vec r;
    for (int i = 0; i < 8; ++i) r.x[i] = a.x[i] * b.x[i];
    return r;
  }
  static Vec add(const Vec& a, const Vec& b) {
    Vec r;
    for (int i = 0; i < 8; ++i) r.x[i] = a.x[i] + b.x[i];
    return r;
  }
  static Vec sub(const Vec& a, const Vec& b) {
    Vec r;
    for (int i = 0; i < 8; ++i) r.x[i] = a.x[i] - b.x[i];
    return r;
  }
  static Vec max(const Vec& a, const Vec& b) {  // a NaN in b is kept, as maxps does
    Vec r;
    for (int i = 0; i < 8; ++i) r.x[i] = a.x[i] > b.x[i] ? a.x[i] : b.x[i];
    return r;
  }
  static float reduce_max(const Vec& v) {
    float m = v.x[0];
    for (int i = 1; i < 8; ++i) m = v.x[i] > m ? v.x[i] : m;
    return m;
  }
  static float reduce_add(const Vec& v) {
    return ((v.x[0] + v.x[4]) + (v.x[1] + v.x[5])) + ((v.x[2] + v.x[6]) + (v.x[3] + v.x[7]));
  }
  static Vec exp(const Vec& v) {
    Vec r;
    for (int i = 0; i < 8; ++i) r.x[i] = expf(v.x[i]);
    return r;
  }
};

void attend_item_portable(const Args& a, const Item& it, float* scratch) {
  attend_item<PortableOps>(a, it, scratch);
}

using AttendFn = void (*)(const Args&, const Item&, float*);

AttendFn pick_kernel() {
#if defined(ENGINE_X86)
  switch (current_isa()) {
    case Isa::avx512: return attend_item_avx512;
    case Isa::avx2: return attend_item_avx2;
    default: break;
  }
#endif
  return attend_item_portable;
}

// ================================================================================
// Work items
// ================================================================================

// Query rows per item: enough to amortise packing the sequence's K and V (O(keys * dim)
// against O(rows * keys * dim)), few enough that one long sequence still feeds every thread.
constexpr int64_t kBlockRows = 64;
// Below this many multiply-adds a parallel region costs more than it saves.
constexpr double kMinParallelWork = 64.0 * 1024;

struct Plan {
  std::vector<Item> items;
  std::vector<float> scratch;  // per thread: scratch_floats(max_seq_len, head_dim)
};

// The calling thread's plan: reused across calls, so steady state allocates nothing.
Plan& thread_plan() {
  static thread_local Plan plan;
  return plan;
}

}  // namespace
}  // namespace varlen

void varlen_attention(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& query_start_loc, double scale, bool causal,
                      const TensorView& out) {
  using namespace varlen;
  check_tensors(q, k, v, query_start_loc, scale, out);
  check_batch(query_start_loc, q.size(0));
  const int64_t num_heads = q.size(1), head_dim = q.size(2);
  if (q.numel() == 0) return;

  const Args a{q.ptr<float>(), q.stride(0), q.stride(1),
               k.ptr<float>(), k.stride(0), k.stride(1),
               v.ptr<float>(), v.stride(0), v.stride(1),
               out.ptr<float>(), out.stride(0), out.stride(1),
               head_dim, num_heads / k.size(1), static_cast<float>(scale), causal};
  Plan& p = thread_plan();
  p.items.clear();
  const int64_t num_kv_heads = k.size(1);
  int64_t max_len = 0;
  double work = 0.0;
  for (int64_t s = 0; s + 1 < query_start_loc.size(0); ++s) {
    const int64_t begin = at(query_start_loc, s), len = at(query_start_loc, s + 1) - begin;
    max_len = len > max_len ? len : max_len;
    work += static_cast<double>(len) * len * num_heads * head_dim;
    for (int64_t h = 0; h < num_kv_heads; ++h)
      for (int64_t r = 0; r < len; r += kBlockRows)
        p.items.push_back({begin, len, h, r, r + kBlockRows < len ? r + kBlockRows : len});
  }
  const int64_t num_items = static_cast<int64_t>(p.items.size());
  const bool parallel = work >= kMinParallelWork && num_items > 1;
  const int num_threads = parallel ? omp_get_max_threads() : 1;
  const int64_t per_thread = scratch_floats(max_len, head_dim);
  if (static_cast<int64_t>(p.scratch.size()) < num_threads * per_thread)
    p.scratch.resize(static_cast<size_t>(num_threads * per_thread));

  const AttendFn attend = pick_kernel();
  float* scratch = p.scratch.data();
  const Item* items = p.items.data();
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (parallel)
  for (int64_t i = 0; i < num_items; ++i)
    attend(a, items[i], scratch + omp_get_thread_num() * per_thread);
}

}  // namespace engine
