// kv_cache_copy: copy whole blocks of the paged K and V caches, src -> dst.
//
// Copy-on-write for forked sequences: a shared block is copied into a fresh one
// before a sequence writes into it (f32, bf16 or f16 caches, bytes copied as they are).
// Every id is checked before anything is written, so a rejected call leaves both
// caches untouched. No dst may repeat or
// also be a src, so the pairs are independent and their order does not matter.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "engine/check.h"
#include "engine/ops.h"

namespace engine {
namespace {

constexpr const char* kOp = "kv_cache_copy";

// ---- validation -------------------------------------------------------------------

void check_cache(const TensorView& t, const char* arg) {
  check_dtype(t, kOp, arg, {DType::f32, DType::bf16, DType::f16});
  check_ndim(t, kOp, arg, 4);
  check_contiguous(t, kOp, arg);
}

void check_ids(const TensorView& ids, const char* arg, int64_t num_blocks) {
  const int32_t* p = ids.ptr<int32_t>();
  for (int64_t i = 0; i < ids.size(0); ++i) {
    const int64_t id = p[i * ids.stride(0)];
    if (id < 0 || id >= num_blocks)
      fail(kOp, std::string(arg) + "[" + std::to_string(i) + "] = " + std::to_string(id) +
                    " is outside the cache's " + std::to_string(num_blocks) + " blocks (expected 0.." +
                    std::to_string(num_blocks - 1) + ")");
  }
}

// No dst twice, and no dst that is also a src: the copies must not depend on each other.
void check_independent(const TensorView& src, const TensorView& dst) {
  const int64_t n = dst.size(0);
  std::vector<int32_t> dsts(n), srcs(n);
  for (int64_t i = 0; i < n; ++i) {
    dsts[i] = dst.ptr<int32_t>()[i * dst.stride(0)];
    srcs[i] = src.ptr<int32_t>()[i * src.stride(0)];
  }
  std::sort(dsts.begin(), dsts.end());
  auto repeat = std::adjacent_find(dsts.begin(), dsts.end());
  if (repeat != dsts.end())
    fail(kOp, "dst_blocks repeats block " + std::to_string(*repeat));
  for (int32_t s : srcs)
    if (std::binary_search(dsts.begin(), dsts.end(), s))
      fail(kOp, "block " + std::to_string(s) + " is both in src_blocks and in dst_blocks");
}

void validate(const TensorView& k_cache, const TensorView& v_cache, const TensorView& src,
              const TensorView& dst) {
  check_cache(k_cache, "k_cache");
  check_cache(v_cache, "v_cache");
  check_shape(v_cache, kOp, "v_cache",
              {k_cache.size(0), k_cache.size(1), k_cache.size(2), k_cache.size(3)});
  check_same_dtype(v_cache, k_cache, kOp, "v_cache", "k_cache");
  ENGINE_CHECK(k_cache.data != v_cache.data || k_cache.numel() == 0, kOp,
               "k_cache and v_cache must be different arrays");
  check_dtype(src, kOp, "src_blocks", {DType::i32});
  check_ndim(src, kOp, "src_blocks", 1);
  check_dtype(dst, kOp, "dst_blocks", {DType::i32});
  check_shape(dst, kOp, "dst_blocks", {src.size(0)});
  check_ids(src, "src_blocks", k_cache.size(0));
  check_ids(dst, "dst_blocks", k_cache.size(0));
  check_independent(src, dst);
}

}  // namespace

void kv_cache_copy(const TensorView& k_cache, const TensorView& v_cache,
                   const TensorView& src_blocks, const TensorView& dst_blocks) {
  validate(k_cache, v_cache, src_blocks, dst_blocks);
  const int64_t num_pairs = src_blocks.size(0);
  const int64_t block_bytes = k_cache.size(1) * k_cache.size(2) * k_cache.size(3) *
                              static_cast<int64_t>(dtype_size(k_cache.dtype));
  const int32_t* src = src_blocks.ptr<int32_t>();
  const int32_t* dst = dst_blocks.ptr<int32_t>();
  char* k = static_cast<char*>(k_cache.data);
  char* v = static_cast<char*>(v_cache.data);
  // A handful of pairs per step (one per forked sequence): threads only for large batches.
#pragma omp parallel for schedule(static) if (num_pairs * block_bytes >= (1 << 20))
  for (int64_t i = 0; i < num_pairs; ++i) {
    const int64_t s = src[i * src_blocks.stride(0)], d = dst[i * dst_blocks.stride(0)];
    std::memcpy(k + d * block_bytes, k + s * block_bytes, static_cast<size_t>(block_bytes));
    std::memcpy(v + d * block_bytes, v + s * block_bytes, static_cast<size_t>(block_bytes));
  }
}

}  // namespace engine
