// paged_attention: causal, grouped-query attention of a packed varlen batch over
// the paged KV cache (see ops.h for the layout).
//
// The launcher validates every index it will follow before computing anything,
// cuts the batch into work items of (sequence, KV head, tile of query rows) and,
// when there are too few of those to feed every thread (decode of a few long
// sequences), also splits each item's KV range; split partials (max, sum,
// unnormalised output) are merged afterwards, as in flash-decoding.
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "attention_kernels.h"
#include "engine/check.h"
#include "engine/isa.h"
#include "engine/ops.h"

namespace engine {
namespace attention {
namespace {

constexpr const char* kOp = "paged_attention";

// Layout checks that an empty array (numpy gives it zero strides) passes.
void check_rows(const TensorView& t, const char* arg) {
  if (t.numel() > 0) check_row_contiguous(t, kOp, arg);
}
void check_dense(const TensorView& t, const char* arg) {
  if (t.numel() > 0) check_contiguous(t, kOp, arg);
}

// ================================================================================
// Validation
// ================================================================================

// 1-d int32 views with any stride.
int64_t at(const TensorView& t, int64_t i) { return t.ptr<int32_t>()[i * t.stride(0)]; }

void check_tensors(const TensorView& q, const TensorView& k_cache, const TensorView& v_cache,
                   const TensorView& block_tables, const TensorView& seq_lens,
                   const TensorView& query_start_loc, double scale, const TensorView& out) {
  check_dtype(q, kOp, "q", {DType::f32});
  check_ndim(q, kOp, "q", 3);
  check_rows(q, "q");
  const int64_t num_tokens = q.size(0), num_q_heads = q.size(1), head_dim = q.size(2);
  for (const auto* c : {&k_cache, &v_cache}) {
    const char* arg = c == &k_cache ? "k_cache" : "v_cache";
    check_dtype(*c, kOp, arg, {DType::f32, DType::bf16, DType::f16});
    check_ndim(*c, kOp, arg, 4);
    check_dense(*c, arg);
  }
  check_same_dtype(v_cache, k_cache, kOp, "v_cache", "k_cache");
  check_shape(k_cache, kOp, "k_cache", {-1, -1, -1, head_dim});
  check_shape(v_cache, kOp, "v_cache", {k_cache.size(0), k_cache.size(1), k_cache.size(2), head_dim});
  const int64_t num_kv_heads = k_cache.size(2);
  ENGINE_CHECK(num_kv_heads > 0 && num_q_heads % num_kv_heads == 0, kOp,
               "q's " + std::to_string(num_q_heads) + " heads must be a multiple of k_cache's " +
                   std::to_string(num_kv_heads) + " KV heads");
  ENGINE_CHECK(k_cache.size(1) > 0, kOp,
               "k_cache must have a block size of at least 1, got " + k_cache.describe());
  check_dtype(block_tables, kOp, "block_tables", {DType::i32});
  check_ndim(block_tables, kOp, "block_tables", 2);
  const int64_t num_seqs = block_tables.size(0);
  check_dtype(seq_lens, kOp, "seq_lens", {DType::i32});
  check_shape(seq_lens, kOp, "seq_lens", {num_seqs});
  check_dtype(query_start_loc, kOp, "query_start_loc", {DType::i32});
  check_shape(query_start_loc, kOp, "query_start_loc", {num_seqs + 1});
  check_dtype(out, kOp, "out", {DType::f32});
  check_shape(out, kOp, "out", {num_tokens, num_q_heads, head_dim});
  check_rows(out, "out");
  ENGINE_CHECK(!overlaps(out, q) && !overlaps(out, k_cache) && !overlaps(out, v_cache), kOp,
               "out must not share memory with q, k_cache or v_cache");
  ENGINE_CHECK(std::isfinite(scale), kOp, "scale must be finite, got " + std::to_string(scale));
}

// query_start_loc partitions [0, num_tokens); each sequence's new tokens fit in its
// length, its length in its block table, and every block it uses is in the cache.
void check_batch(const TensorView& q, const TensorView& k_cache, const TensorView& block_tables,
                 const TensorView& seq_lens, const TensorView& query_start_loc) {
  const int64_t num_seqs = seq_lens.size(0), num_tokens = q.size(0);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1);
  const int64_t max_blocks = block_tables.size(1);
  ENGINE_CHECK(at(query_start_loc, 0) == 0, kOp,
               "query_start_loc[0] must be 0, got " + std::to_string(at(query_start_loc, 0)));
  ENGINE_CHECK(at(query_start_loc, num_seqs) == num_tokens, kOp,
               "query_start_loc[" + std::to_string(num_seqs) + "] must equal q's " +
                   std::to_string(num_tokens) + " tokens, got " +
                   std::to_string(at(query_start_loc, num_seqs)));
  const int32_t* table = block_tables.ptr<int32_t>();
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t num_new = at(query_start_loc, s + 1) - at(query_start_loc, s);
    const int64_t seq_len = at(seq_lens, s);
    ENGINE_CHECK(num_new >= 0, kOp,
                 "query_start_loc must be non-decreasing, but query_start_loc[" +
                     std::to_string(s + 1) + "] < query_start_loc[" + std::to_string(s) + "]");
    ENGINE_CHECK(seq_len >= num_new && seq_len <= max_blocks * block_size, kOp,
                 "seq_lens[" + std::to_string(s) + "] = " + std::to_string(seq_len) +
                     " must lie between its " + std::to_string(num_new) +
                     " new tokens and the block table's " +
                     std::to_string(max_blocks * block_size) + " slots");
    const int64_t used = (seq_len + block_size - 1) / block_size;
    for (int64_t b = 0; b < used; ++b) {
      const int64_t id = table[s * block_tables.stride(0) + b * block_tables.stride(1)];
      if (id < 0 || id >= num_blocks)
        fail(kOp, "block_tables[" + std::to_string(s) + ", " + std::to_string(b) +
                      "] = " + std::to_string(id) + " is outside the cache's " +
                      std::to_string(num_blocks) + " blocks");
    }
  }
}

// ================================================================================
// Portable primitives (the baseline build: SSE2 on x86-64)
// ================================================================================

struct PortableOps {
  static constexpr bool kSoftwareWiden = true;
  template <typename T>
  static float dot(const float* a, const T* b, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // independent sums the compiler can vectorise
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      for (int k = 0; k < 8; ++k) acc[k] += a[i + k] * to_f32(b[i + k]);
    float sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; ++i) sum += a[i] * to_f32(b[i]);
    return sum;
  }
  template <typename T>
  static void dot4(const float* a, const T* b, int64_t b_stride, int64_t n, float* s) {
    for (int r = 0; r < 4; ++r) s[r] = dot(a, b + r * b_stride, n);
  }
  static void scale(float* y, float alpha, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] *= alpha;
  }
  static float exp_sum(float* s, float m, int64_t n) {
    float sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
      s[j] = expf(s[j] - m);
      sum += s[j];
    }
    return sum;
  }
  template <typename T>
  static void widen(const T* x, int64_t x_stride, int64_t n, int64_t dim, float* y) {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < dim; ++i) y[j * dim + i] = to_f32(x[j * x_stride + i]);
  }
  template <typename T>
  static void axpy_rows(float* y, const float* p, const T* x, int64_t x_stride, int64_t n,
                        int64_t dim) {
    for (int64_t j = 0; j < n; ++j) {
      const float pj = p[j];
      const T* xj = x + j * x_stride;
      for (int64_t i = 0; i < dim; ++i) y[i] += pj * to_f32(xj[i]);
    }
  }
};

void attend_item_portable(const Args& a, const Item& it, const Dest& d) {
  with_float_type(a.cache_dtype, [&](auto t) { attend_item<PortableOps, decltype(t)>(a, it, d); });
}

using AttendFn = void (*)(const Args&, const Item&, const Dest&);

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
// Work items and the split-KV merge
// ================================================================================

constexpr int64_t kSplitKv = 512;       // KV positions per split piece of a per-head item
constexpr int64_t kSplitKvDecode = 64;  // of a decode item (all KV heads: more work per position)

struct Plan {
  std::vector<Item> items;
  std::vector<int64_t> split_slot;  // per item: scratch slot, or -1 when it writes out directly
  std::vector<int64_t> groups;      // per split group: its first item, then one past its last
  std::vector<float> scratch;       // per slot: acc [(kMaxRows + group) * head_dim], m, l
  int64_t slot_size = 0;
  bool one_decode = false;          // one sequence, one new token: items in position order
};

// The calling thread's plan: reused across calls, so steady state allocates nothing.
Plan& thread_plan() {
  static thread_local Plan plan;
  return plan;
}

int64_t rows_per_tile(int64_t group) {
  return group <= kMaxRows ? (kMaxRows / group) * group : kMaxRows;
}

// A split item's scratch accumulators: its rows (< kMaxRows) start at row_begin % width of
// a token's width = num_heads * group query heads (width <= kMaxRows for decode items).
int64_t acc_floats(const Args& a) {
  return (kMaxRows + (a.group > kMaxRows ? a.group : kMaxRows)) * a.head_dim;
}

void make_plan(Plan& p, const Args& a, const TensorView& seq_lens,
               const TensorView& query_start_loc, int num_threads) {
  p.items.clear();
  p.split_slot.clear();
  p.groups.clear();
  p.one_decode = seq_lens.size(0) == 1 && at(query_start_loc, 1) - at(query_start_loc, 0) == 1;
  const int64_t tile = rows_per_tile(a.group);
  const int64_t num_q_heads = a.num_kv_heads * a.group;
  for (int64_t s = 0; s < seq_lens.size(0); ++s) {
    const int64_t start = at(query_start_loc, s), num_new = at(query_start_loc, s + 1) - start;
    const int64_t context_len = at(seq_lens, s) - num_new;
    if (num_new == 1 && num_q_heads <= kMaxRows) {  // decode: one item over every head
      p.items.push_back(
          {s, 0, a.num_kv_heads, start, context_len, 0, num_q_heads, 0, context_len + 1});
      continue;
    }
    for (int64_t h = 0; h < a.num_kv_heads; ++h)
      for (int64_t r = 0; r < num_new * a.group; r += tile) {
        const int64_t r_end = r + tile < num_new * a.group ? r + tile : num_new * a.group;
        const int64_t kv_end = context_len + (r_end - 1) / a.group + 1;
        p.items.push_back({s, h, 1, start, context_len, r, r_end, 0, kv_end});
      }
  }
  // Long KV ranges are split into pieces at fixed multiples of kSplitKv (flash-decoding), so
  // that one long sequence still uses every thread. The pieces depend on the item alone, never
  // on the batch or the thread count: a sequence's result is the same in any batch.
  std::vector<Item> whole;
  whole.swap(p.items);
  int64_t num_slots = 0;
  for (const Item& it : whole) {
    const int64_t split = it.num_heads > 1 ? kSplitKvDecode : kSplitKv;
    const int64_t n = (it.kv_end + split - 1) / split;
    if (n <= 1) {
      p.items.push_back(it);
      p.split_slot.push_back(-1);
      continue;
    }
    p.groups.push_back(static_cast<int64_t>(p.items.size()));  // first piece
    for (int64_t k = 0; k < n; ++k) {
      Item part = it;
      part.kv_begin = k * split;
      part.kv_end = (k + 1) * split < it.kv_end ? (k + 1) * split : it.kv_end;
      p.items.push_back(part);
      p.split_slot.push_back(num_slots++);
    }
    p.groups.push_back(static_cast<int64_t>(p.items.size()));  // one past the last piece
  }
  p.slot_size = acc_floats(a) + 2 * kMaxRows;
  if (static_cast<int64_t>(p.scratch.size()) < num_slots * p.slot_size)
    p.scratch.resize(num_slots * p.slot_size);
}

Dest dest_for(Plan& p, const Args& a, int64_t i) {
  const Item& it = p.items[i];
  const int64_t slot = p.split_slot[i];
  if (slot < 0) {
    float* base = a.out + it.q_start * a.out_token_stride + it.kv_head * a.group * a.out_head_stride;
    return {base, a.out_token_stride, a.out_head_stride, 0, nullptr, nullptr};
  }
  const int64_t width = it.num_heads * a.group;
  float* base = p.scratch.data() + slot * p.slot_size;
  float* m = base + acc_floats(a);
  return {base, width * a.head_dim, a.head_dim, it.row_begin / width, m, m + kMaxRows};
}

// out = sum_k acc_k * exp(m_k - M) / sum_k l_k * exp(m_k - M), M = max_k m_k, per row.
void merge_group(Plan& p, const Args& a, int64_t first, int64_t last) {
  const Item& it = p.items[first];
  const int64_t D = a.head_dim, W = it.num_heads * a.group;
  for (int64_t i = 0; i < it.row_end - it.row_begin; ++i) {
    const int64_t r = it.row_begin + i, t = r / W, g = r % W;
    const int64_t h = it.kv_head * a.group + g;
    float* y = a.out + (it.q_start + t) * a.out_token_stride + h * a.out_head_stride;
    float big = -INFINITY;
    for (int64_t k = first; k < last; ++k) {
      const Dest d = dest_for(p, a, k);
      big = d.m[i] > big ? d.m[i] : big;
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < D; ++j) y[j] = 0.0f;
    for (int64_t k = first; k < last; ++k) {
      const Dest d = dest_for(p, a, k);
      // A split that saw none of this row's positions has m = -inf, l = 0, acc = 0.
      const float w = d.m[i] == -INFINITY && big != -INFINITY ? 0.0f : expf(d.m[i] - big);
      sum += w * d.l[i];
      const float* acc = d.base + (t - d.token0) * d.token_stride + g * d.head_stride;
      for (int64_t j = 0; j < D; ++j) y[j] += w * acc[j];
    }
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < D; ++j) y[j] *= inv;
  }
}

}  // namespace
}  // namespace attention

PrefetchCursor& attention::thread_prefetch() {
  static thread_local PrefetchCursor cursor;
  return cursor;
}

void paged_attention(const TensorView& q, const TensorView& k_cache, const TensorView& v_cache,
                     const TensorView& block_tables, const TensorView& seq_lens,
                     const TensorView& query_start_loc, double scale, const TensorView& out,
                     const Prefetch* prefetch) {
  using namespace attention;
  check_tensors(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out);
  check_batch(q, k_cache, block_tables, seq_lens, query_start_loc);

  // clang-format off
  const Args a{q.ptr<float>(), q.stride(0), q.stride(1),
               k_cache.data, v_cache.data, k_cache.dtype,
               k_cache.size(1), k_cache.size(2), q.size(2), q.size(1) / k_cache.size(2),
               block_tables.ptr<int32_t>(), block_tables.stride(0), block_tables.stride(1),
               out.ptr<float>(), out.stride(0), out.stride(1), static_cast<float>(scale)};
  // clang-format on
  if (a.head_dim == 0 || q.size(0) == 0 || q.size(1) == 0) return;

  Plan& p = thread_plan();
  make_plan(p, a, seq_lens, query_start_loc, omp_get_max_threads());
  const AttendFn attend = pick_kernel();
  const int64_t num_items = static_cast<int64_t>(p.items.size());
  const bool ahead = prefetch != nullptr && prefetch->count > 0;
#pragma omp parallel if (num_items > 1)
  {
    // Thread t takes share t of the prefetch: the rows thread t of the next matmul reads.
    // Set (or emptied) on every call, so that no thread keeps an earlier call's ranges.
    thread_prefetch() = ahead ? PrefetchCursor(*prefetch, omp_get_thread_num(),
                                               omp_get_num_threads())
                              : PrefetchCursor();
    if (p.one_decode) {
      // One sequence's decode: thread t takes the t-th run of pieces, the positions whose
      // K and V share t of the QKV matmul before requested (llama.py). Against pieces of
      // 128 positions handed out dynamically, 1B Q4_0 decode over 512-1150 positions, one
      // process switching between the two every 8 steps: attention 0.85-0.87x, the step
      // 0.97-0.99x.
      const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
      for (int64_t i = num_items * t / T; i < num_items * (t + 1) / T; ++i)
        attend(a, p.items[i], dest_for(p, a, i));
    } else {
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t i = 0; i < num_items; ++i) attend(a, p.items[i], dest_for(p, a, i));
    }
    thread_prefetch() = PrefetchCursor();
  }

  const int64_t num_groups = static_cast<int64_t>(p.groups.size()) / 2;
  // A merge is a few KiB of arithmetic: a second parallel region costs more for a few groups.
#pragma omp parallel for schedule(dynamic, 1) if (num_groups >= 16)
  for (int64_t g = 0; g < num_groups; ++g) merge_group(p, a, p.groups[2 * g], p.groups[2 * g + 1]);
}

}  // namespace engine
