// apply_penalties: repetition, frequency and presence penalties and logit bias, in
// place on a batch of logits, each sequence from its own CSR slices of token ids.
// Reproduces ops.reference.apply_penalties bit for bit: penalties in double,
// rounded to float once; biases added in float, in list order.
//
// Speed: the work is O(tokens in the lists), never O(vocab) per row beyond the
// first call of a thread: each thread keeps a zeroed count array and a seen
// array of vocab entries, marks the row's tokens, and clears only those again.
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "engine/check.h"
#include "engine/ops.h"

namespace engine {
namespace {

constexpr const char* kOp = "apply_penalties";

// A 1-d list with its stride, read as i32 or f32.
template <typename T>
struct List {
  const T* data;
  int64_t stride;
  T operator[](int64_t i) const { return data[i * stride]; }
};

template <typename T>
List<T> list_of(const TensorView& t) {
  return {t.ptr<T>(), t.ndim == 1 ? t.stride(0) : 1};
}

// ============================================================================
// Validation
// ============================================================================

void check_list(const TensorView& t, const char* arg, DType dtype) {
  check_dtype(t, kOp, arg, {dtype});
  check_ndim(t, kOp, arg, 1);
}

// offsets [num_seqs + 1] i32: non-decreasing, within [0, len(tokens)]; every id
// they cover in [0, vocab).
void check_csr(const TensorView& tokens, const char* tokens_arg, const TensorView& offsets,
               const char* offsets_arg, int64_t num_seqs, int64_t vocab) {
  check_list(tokens, tokens_arg, DType::i32);
  check_dtype(offsets, kOp, offsets_arg, {DType::i32});
  check_shape(offsets, kOp, offsets_arg, {num_seqs + 1});
  const List<int32_t> off = list_of<int32_t>(offsets);
  const int64_t num_tokens = tokens.size(0);
  const std::string name(offsets_arg);
  ENGINE_CHECK(off[0] >= 0, kOp, name + "[0] = " + std::to_string(off[0]) + " is negative");
  for (int64_t s = 0; s < num_seqs; ++s)
    if (off[s + 1] < off[s])
      fail(kOp, name + " must be non-decreasing, got " + name + "[" + std::to_string(s + 1) + "] = " +
              std::to_string(off[s + 1]) + " < " + name + "[" + std::to_string(s) + "] = " +
              std::to_string(off[s]));
  ENGINE_CHECK(off[num_seqs] <= num_tokens, kOp,
               name + "[" + std::to_string(num_seqs) + "] = " + std::to_string(off[num_seqs]) +
                   " is past the end of " + tokens_arg + " (length " + std::to_string(num_tokens) +
                   ")");
  const List<int32_t> ids = list_of<int32_t>(tokens);
  for (int64_t j = off[0]; j < off[num_seqs]; ++j)
    if (ids[j] < 0 || ids[j] >= vocab)
      fail(kOp, std::string(tokens_arg) + "[" + std::to_string(j) + "] = " + std::to_string(ids[j]) +
              " is out of range [0, " + std::to_string(vocab) + ")");
}

void check_penalty(const TensorView& t, const char* arg, int64_t num_seqs, bool is_factor) {
  check_dtype(t, kOp, arg, {DType::f32});
  check_shape(t, kOp, arg, {num_seqs});
  const List<float> v = list_of<float>(t);
  for (int64_t s = 0; s < num_seqs; ++s) {
    const bool ok = std::isfinite(v[s]) && (!is_factor || v[s] > 0.0f);
    if (!ok)
      fail(kOp, std::string(arg) + "[" + std::to_string(s) + "] = " + std::to_string(v[s]) +
              (is_factor ? " must be finite and > 0" : " must be finite"));
  }
}

void check_bias_values(const TensorView& bias_values, const TensorView& bias_offsets,
                       int64_t num_seqs, int64_t num_bias) {
  check_list(bias_values, "bias_values", DType::f32);
  ENGINE_CHECK(bias_values.size(0) == num_bias, kOp,
               "bias_values must have the length of bias_ids (" + std::to_string(num_bias) +
                   "), got " + bias_values.describe());
  const List<int32_t> off = list_of<int32_t>(bias_offsets);
  const List<float> v = list_of<float>(bias_values);
  for (int64_t j = off[0]; j < off[num_seqs]; ++j)
    if (std::isnan(v[j]) || v[j] == std::numeric_limits<float>::infinity())
      fail(kOp, "bias_values[" + std::to_string(j) + "] = " + std::to_string(v[j]) +
              " must not be NaN or +inf");
}

// ============================================================================
// One sequence
// ============================================================================

struct Scratch {
  std::vector<int32_t> counts;  // [vocab] output-token counts; all zero between rows
  std::vector<uint8_t> seen;    // [vocab] 1 = already penalised this row; all zero between rows
};

struct Slice {
  List<int32_t> ids;
  int64_t begin, end;
};

void penalise_row(float* row, const Slice& prompt, const Slice& output, double presence,
                  double frequency, double repetition, Scratch& scratch) {
  int32_t* counts = scratch.counts.data();
  uint8_t* seen = scratch.seen.data();
  const bool has_repetition = repetition != 1.0;
  for (int64_t j = output.begin; j < output.end; ++j) ++counts[output.ids[j]];
  for (int64_t j = output.begin; j < output.end; ++j) {
    const int32_t v = output.ids[j];
    if (seen[v]) continue;
    seen[v] = 1;
    double x = row[v];
    if (has_repetition) x = x > 0.0 ? x / repetition : x * repetition;
    x -= frequency * counts[v] + presence;
    row[v] = static_cast<float>(x);
  }
  if (has_repetition) {
    for (int64_t j = prompt.begin; j < prompt.end; ++j) {
      const int32_t v = prompt.ids[j];
      if (seen[v]) continue;
      seen[v] = 1;
      const double x = row[v];
      row[v] = static_cast<float>(x > 0.0 ? x / repetition : x * repetition);
    }
  }
  // Restore the all-zero invariant, touching only this row's tokens.
  for (int64_t j = output.begin; j < output.end; ++j) counts[output.ids[j]] = seen[output.ids[j]] = 0;
  if (has_repetition)
    for (int64_t j = prompt.begin; j < prompt.end; ++j) seen[prompt.ids[j]] = 0;
}

}  // namespace

// ============================================================================
// Launcher
// ============================================================================

void apply_penalties(const TensorView& logits, const TensorView& prompt_tokens,
                     const TensorView& prompt_offsets, const TensorView& output_tokens,
                     const TensorView& output_offsets, const TensorView& presence_penalty,
                     const TensorView& frequency_penalty, const TensorView& repetition_penalty,
                     const TensorView& bias_ids, const TensorView& bias_values,
                     const TensorView& bias_offsets) {
  check_dtype(logits, kOp, "logits", {DType::f32});
  check_ndim(logits, kOp, "logits", 2);
  if (logits.numel() > 0) check_row_contiguous(logits, kOp, "logits");
  const int64_t num_seqs = logits.size(0), vocab = logits.size(1);
  ENGINE_CHECK(
      vocab > 0 && vocab <= std::numeric_limits<int32_t>::max(), kOp,
      "logits must have between 1 and 2^31 - 1 columns (the vocab), got " + logits.describe());
  check_csr(prompt_tokens, "prompt_tokens", prompt_offsets, "prompt_offsets", num_seqs, vocab);
  check_csr(output_tokens, "output_tokens", output_offsets, "output_offsets", num_seqs, vocab);
  check_csr(bias_ids, "bias_ids", bias_offsets, "bias_offsets", num_seqs, vocab);
  check_bias_values(bias_values, bias_offsets, num_seqs, bias_ids.size(0));
  check_penalty(presence_penalty, "presence_penalty", num_seqs, false);
  check_penalty(frequency_penalty, "frequency_penalty", num_seqs, false);
  check_penalty(repetition_penalty, "repetition_penalty", num_seqs, true);

  float* lp = logits.ptr<float>();
  const int64_t ls = logits.stride(0);
  const List<int32_t> p_ids = list_of<int32_t>(prompt_tokens), p_off = list_of<int32_t>(prompt_offsets);
  const List<int32_t> o_ids = list_of<int32_t>(output_tokens), o_off = list_of<int32_t>(output_offsets);
  const List<int32_t> b_ids = list_of<int32_t>(bias_ids), b_off = list_of<int32_t>(bias_offsets);
  const List<float> b_val = list_of<float>(bias_values);
  const List<float> presence = list_of<float>(presence_penalty);
  const List<float> frequency = list_of<float>(frequency_penalty);
  const List<float> repetition = list_of<float>(repetition_penalty);
  const int64_t num_listed = (p_off[num_seqs] - p_off[0]) + (o_off[num_seqs] - o_off[0]);

#pragma omp parallel for schedule(dynamic, 1) if (num_seqs > 1 && num_listed >= (1 << 14))
  for (int64_t s = 0; s < num_seqs; ++s) {
    float* row = lp + s * ls;
    const Slice prompt{p_ids, p_off[s], p_off[s + 1]}, output{o_ids, o_off[s], o_off[s + 1]};
    if (prompt.end > prompt.begin || output.end > output.begin) {
      thread_local Scratch scratch;
      if (static_cast<int64_t>(scratch.counts.size()) < vocab) {  // new entries are zero
        scratch.counts.resize(static_cast<size_t>(vocab));
        scratch.seen.resize(static_cast<size_t>(vocab));
      }
      penalise_row(row, prompt, output, presence[s], frequency[s], repetition[s], scratch);
    }
    for (int64_t j = b_off[s]; j < b_off[s + 1]; ++j) row[b_ids[j]] += b_val[j];
  }
}

}  // namespace engine
