// log_softmax_topk: each row's log-probability of its chosen token and its k most
// probable tokens, for OpenAI / vLLM `logprobs`. Matches ops.reference.log_softmax_topk:
// log p = (x - max) - log(sum(exp(x - max))) in double, top-k by logit with ties
// to the lower id (log_softmax is monotonic, so the order is the logits' order).
//
// Speed: one pass for the max, one for the sum of exponentials, and one that keeps
// the top k in a heap of k entries (most ids fail a single comparison with the
// heap's worst), so a 150k vocab with k = 20 sorts nothing of size vocab.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "engine/check.h"
#include "engine/ops.h"

namespace engine {
namespace {

constexpr const char* kOp = "log_softmax_topk";
constexpr float kInf = std::numeric_limits<float>::infinity();

// ============================================================================
// Validation
// ============================================================================

// Why row cannot be normalised, or "" if it can.
std::string row_problem(const float* row, int64_t vocab) {
  bool any_finite = false;
  for (int64_t i = 0; i < vocab; ++i) {
    if (std::isnan(row[i])) return "logits contain NaN";
    if (row[i] == kInf) return "logits contain +inf";
    any_finite |= row[i] != -kInf;
  }
  return any_finite ? "" : "logits are all -inf";
}

bool row_ok(const float* row, int64_t vocab) {
  bool any_finite = false;
  for (int64_t i = 0; i < vocab; ++i) {
    const float v = row[i];
    if (std::isnan(v) || v == kInf) return false;
    any_finite |= v != -kInf;
  }
  return any_finite;
}

// ============================================================================
// One row
// ============================================================================

// log(sum(exp(x - max))) in double; x - max is exact in double for float x.
double log_sum_exp_shifted(const float* row, int64_t vocab, double x_max) {
  double sum = 0.0;
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(row[i]) - x_max);
  return std::log(sum);
}

// The k best (logit descending, id ascending) of row into ids[0, k), best first.
// heap holds (logit, id) with the worst of the kept ones at its front.
void top_k(const float* row, int64_t vocab, int64_t k, int32_t* ids,
           std::vector<std::pair<float, int32_t>>& heap) {
  auto better = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  heap.clear();
  for (int64_t i = 0; i < k; ++i) heap.emplace_back(row[i], static_cast<int32_t>(i));
  std::make_heap(heap.begin(), heap.end(), better);
  // Ids rise through the scan, so an equal logit never beats the kept worst.
  for (int64_t i = k; i < vocab; ++i) {
    if (!(row[i] > heap.front().first)) continue;
    std::pop_heap(heap.begin(), heap.end(), better);
    heap.back() = {row[i], static_cast<int32_t>(i)};
    std::push_heap(heap.begin(), heap.end(), better);
  }
  std::sort(heap.begin(), heap.end(), better);
  for (int64_t i = 0; i < k; ++i) ids[i] = heap[i].second;
}

}  // namespace

// ============================================================================
// Launcher
// ============================================================================

void log_softmax_topk(const TensorView& logits, const TensorView& token_ids, int64_t k,
                      const TensorView& out_token_logprob, const TensorView& out_topk_ids,
                      const TensorView& out_topk_logprobs) {
  check_dtype(logits, kOp, "logits", {DType::f32});
  check_ndim(logits, kOp, "logits", 2);
  check_nonempty_row_contiguous(logits, kOp, "logits");
  const int64_t num_seqs = logits.size(0), vocab = logits.size(1);
  ENGINE_CHECK(
      vocab > 0 && vocab <= std::numeric_limits<int32_t>::max(), kOp,
      "logits must have between 1 and 2^31 - 1 columns (the vocab), got " + logits.describe());
  ENGINE_CHECK(
      k >= 0 && k <= vocab, kOp,
      "k must be in [0, " + std::to_string(vocab) + "] (the vocab), got " + std::to_string(k));
  check_dtype(token_ids, kOp, "token_ids", {DType::i32});
  check_shape(token_ids, kOp, "token_ids", {num_seqs});
  check_dtype(out_token_logprob, kOp, "out_token_logprob", {DType::f32});
  check_shape(out_token_logprob, kOp, "out_token_logprob", {num_seqs});
  check_dtype(out_topk_ids, kOp, "out_topk_ids", {DType::i32});
  check_shape(out_topk_ids, kOp, "out_topk_ids", {num_seqs, k});
  check_nonempty_row_contiguous(out_topk_ids, kOp, "out_topk_ids");
  check_dtype(out_topk_logprobs, kOp, "out_topk_logprobs", {DType::f32});
  check_shape(out_topk_logprobs, kOp, "out_topk_logprobs", {num_seqs, k});
  check_nonempty_row_contiguous(out_topk_logprobs, kOp, "out_topk_logprobs");

  const float* lp = logits.ptr<float>();
  const int32_t* tok = token_ids.ptr<int32_t>();
  const int64_t ls = logits.stride(0), ts = token_ids.stride(0);
  for (int64_t i = 0; i < num_seqs; ++i)
    if (tok[i * ts] < 0 || tok[i * ts] >= vocab)
      fail(kOp, "token_ids[" + std::to_string(i) + "] = " + std::to_string(tok[i * ts]) +
              " is out of range [0, " + std::to_string(vocab) + ")");

  // Every row is checked before any output is written.
  const bool is_big = num_seqs * vocab >= (1 << 16);
  int64_t first_bad = num_seqs;
#pragma omp parallel for schedule(static) reduction(min : first_bad) if (is_big)
  for (int64_t i = 0; i < num_seqs; ++i)
    if (!row_ok(lp + i * ls, vocab)) first_bad = std::min(first_bad, i);
  if (first_bad < num_seqs)
    fail(kOp, "row " + std::to_string(first_bad) + ": " + row_problem(lp + first_bad * ls, vocab));

  float* out_tok = out_token_logprob.ptr<float>();
  int32_t* out_ids = out_topk_ids.ptr<int32_t>();
  float* out_lps = out_topk_logprobs.ptr<float>();
  const int64_t os = out_token_logprob.stride(0);
  const int64_t is = k > 0 ? out_topk_ids.stride(0) : 0;
  const int64_t ps = k > 0 ? out_topk_logprobs.stride(0) : 0;

#pragma omp parallel for schedule(dynamic, 1) if (num_seqs > 1 && is_big)
  for (int64_t i = 0; i < num_seqs; ++i) {
    const float* row = lp + i * ls;
    const double x_max = *std::max_element(row, row + vocab);
    const double lse = log_sum_exp_shifted(row, vocab, x_max);
    auto log_prob = [&](int32_t v) {
      return static_cast<float>((static_cast<double>(row[v]) - x_max) - lse);
    };
    out_tok[i * os] = log_prob(tok[i * ts]);
    if (k == 0) continue;
    thread_local std::vector<std::pair<float, int32_t>> heap;
    int32_t* ids = out_ids + i * is;
    top_k(row, vocab, k, ids, heap);
    for (int64_t j = 0; j < k; ++j) out_lps[i * ps + j] = log_prob(ids[j]);
  }
}

}  // namespace engine
