// apply_penalties on the GPU: repetition, frequency and presence penalties and logit
// bias, in place, each sequence from its own CSR slices; bit for bit as the CPU op
// (penalties in double without FMA contraction, rounded to float once; biases added in
// float, in list order).
//
// One block of 256 threads per row. Each distinct token is written by exactly one thread,
// its "owner": the thread whose atomicOr first sets the token's bit in a shared bitmap
// of the vocab (vocab > 256K: the thread of its first list position). The owner counts
// the token's occurrences by scanning the (short) list, so work is O(n * distinct).
// Values only the device sees are guarded: a row whose offsets are out of order or past
// the end of their list uses an empty slice; an id outside [0, vocab) is skipped.
#include <climits>

#include "common.cuh"
#include "cuda_ops.h"

namespace engine_cuda {
namespace {

using engine::DType;
constexpr int kThreads = 256;
constexpr int64_t kBitmapVocab = 1 << 18;  // 32 KiB of shared bits
constexpr const char* kOp = "apply_penalties";

// A 1-d device list with its stride.
template <typename T>
struct List {
  const T* data;
  int64_t stride, size;
  __device__ T operator[](int64_t i) const { return data[i * stride]; }
};

template <typename T>
List<T> list_of(const TensorView& t) {
  return {t.ptr<T>(), t.ndim == 1 ? t.stride(0) : 1, t.numel()};
}

struct Slice {
  int64_t begin, end;
};

// Sequence s's slice of a CSR list; empty if its offsets are bad.
__device__ Slice slice_of(const List<int32_t>& offsets, int64_t s, int64_t list_size) {
  const int64_t b = offsets[s], e = offsets[s + 1];
  if (b < 0 || e < b || e > list_size) return {0, 0};
  return {b, e};
}

struct Args {
  float* logits;  // [num_seqs, vocab], row stride ls
  int64_t ls, vocab;
  List<int32_t> prompt, prompt_offsets;   // [num_prompt_tokens], [num_seqs + 1]
  List<int32_t> output, output_offsets;   // [num_output_tokens], [num_seqs + 1]
  List<float> presence, frequency, repetition;  // [num_seqs] each
  List<int32_t> bias_ids, bias_offsets;   // [num_bias], [num_seqs + 1]
  List<float> bias_values;                // [num_bias]
};

// True for exactly one of the positions that hold id v, across all calls between clears.
__device__ bool claim(uint32_t* bits, bool use_bits, const List<int32_t>& list, Slice sl,
                      int64_t j, int32_t v) {
  if (use_bits) {
    const uint32_t bit = 1u << (v & 31);
    return !(atomicOr(&bits[v >> 5], bit) & bit);
  }
  for (int64_t i = sl.begin; i < j; ++i)
    if (list[i] == v) return false;
  return true;
}

__device__ bool contains(const List<int32_t>& list, Slice sl, int32_t v) {
  for (int64_t i = sl.begin; i < sl.end; ++i)
    if (list[i] == v) return true;
  return false;
}

__device__ double repeat_penalised(double x, double rep) {
  return x > 0.0 ? __ddiv_rn(x, rep) : __dmul_rn(x, rep);
}

__global__ void __launch_bounds__(kThreads) apply_penalties_kernel(Args a) {
  pdl_begin();
  __shared__ uint32_t bits[kBitmapVocab / 32];
  const int64_t s = blockIdx.x, vocab = a.vocab;
  float* row = a.logits + s * a.ls;
  const bool use_bits = vocab <= kBitmapVocab;
  const int64_t num_words = use_bits ? (vocab + 31) / 32 : 0;
  auto clear_bits = [&] {
    for (int64_t w = threadIdx.x; w < num_words; w += blockDim.x) bits[w] = 0;
    __syncthreads();
  };
  const Slice prompt = slice_of(a.prompt_offsets, s, a.prompt.size);
  const Slice output = slice_of(a.output_offsets, s, a.output.size);
  const Slice bias = slice_of(a.bias_offsets, s, a.bias_ids.size);
  const double presence = a.presence[s], frequency = a.frequency[s], rep = a.repetition[s];

  // 1. output tokens: repetition, then frequency * count + presence (double, one rounding)
  clear_bits();
  for (int64_t j = output.begin + threadIdx.x; j < output.end; j += blockDim.x) {
    const int32_t v = a.output[j];
    if (v < 0 || v >= vocab || !claim(bits, use_bits, a.output, output, j, v)) continue;
    int64_t count = 0;
    for (int64_t i = output.begin; i < output.end; ++i) count += a.output[i] == v;
    const double x = repeat_penalised(static_cast<double>(row[v]), rep);
    const double penalty = __dadd_rn(__dmul_rn(frequency, static_cast<double>(count)), presence);
    row[v] = static_cast<float>(__dsub_rn(x, penalty));
  }
  __syncthreads();  // every output id is claimed before the prompt's are
  // 2. prompt tokens not in the output: repetition only
  if (rep != 1.0) {
    for (int64_t j = prompt.begin + threadIdx.x; j < prompt.end; j += blockDim.x) {
      const int32_t v = a.prompt[j];
      if (v < 0 || v >= vocab) continue;
      if (use_bits ? !claim(bits, true, a.prompt, prompt, j, v)
                   : (!claim(bits, false, a.prompt, prompt, j, v) || contains(a.output, output, v)))
        continue;
      row[v] = static_cast<float>(repeat_penalised(static_cast<double>(row[v]), rep));
    }
  }
  __syncthreads();  // penalties land before the biases read them
  // 3. biases in list order, in float: the owner of an id adds all of its biases
  clear_bits();
  for (int64_t j = bias.begin + threadIdx.x; j < bias.end; j += blockDim.x) {
    const int32_t v = a.bias_ids[j];
    if (v < 0 || v >= vocab || !claim(bits, use_bits, a.bias_ids, bias, j, v)) continue;
    float x = row[v];
    for (int64_t i = bias.begin; i < bias.end; ++i)
      if (a.bias_ids[i] == v) x = __fadd_rn(x, a.bias_values[i]);
    row[v] = x;
  }
}

// ============================================================================
// Validation
// ============================================================================

void check_list(const TensorView& t, const char* arg, DType dtype) {
  engine::check_dtype(t, kOp, arg, {dtype});
  engine::check_ndim(t, kOp, arg, 1);
}

void check_per_seq(const TensorView& t, const char* arg, DType dtype, int64_t n) {
  engine::check_dtype(t, kOp, arg, {dtype});
  engine::check_shape(t, kOp, arg, {n});
}

}  // namespace

void apply_penalties(const TensorView& logits, const TensorView& prompt_tokens,
                     const TensorView& prompt_offsets, const TensorView& output_tokens,
                     const TensorView& output_offsets, const TensorView& presence_penalty,
                     const TensorView& frequency_penalty, const TensorView& repetition_penalty,
                     const TensorView& bias_ids, const TensorView& bias_values,
                     const TensorView& bias_offsets, cudaStream_t stream) {
  engine::check_dtype(logits, kOp, "logits", {DType::f32});
  engine::check_ndim(logits, kOp, "logits", 2);
  check_nonempty_row_contiguous(logits, kOp, "logits");
  const int64_t num_seqs = logits.size(0), vocab = logits.size(1);
  ENGINE_CHECK(
      vocab > 0 && vocab <= INT_MAX, kOp,
      "logits must have between 1 and 2^31 - 1 columns (the vocab), got " + logits.describe());
  check_list(prompt_tokens, "prompt_tokens", DType::i32);
  check_per_seq(prompt_offsets, "prompt_offsets", DType::i32, num_seqs + 1);
  check_list(output_tokens, "output_tokens", DType::i32);
  check_per_seq(output_offsets, "output_offsets", DType::i32, num_seqs + 1);
  check_list(bias_ids, "bias_ids", DType::i32);
  check_per_seq(bias_offsets, "bias_offsets", DType::i32, num_seqs + 1);
  check_list(bias_values, "bias_values", DType::f32);
  ENGINE_CHECK(bias_values.size(0) == bias_ids.size(0), kOp,
               "bias_values must have the length of bias_ids (" + std::to_string(bias_ids.size(0)) +
                   "), got " + bias_values.describe());
  check_per_seq(presence_penalty, "presence_penalty", DType::f32, num_seqs);
  check_per_seq(frequency_penalty, "frequency_penalty", DType::f32, num_seqs);
  check_per_seq(repetition_penalty, "repetition_penalty", DType::f32, num_seqs);
  ENGINE_CHECK(num_seqs <= INT_MAX, kOp, "logits must have at most 2^31 - 1 rows");
  if (num_seqs == 0) return;

  Args a;
  a.logits = logits.ptr<float>();
  a.ls = logits.stride(0), a.vocab = vocab;
  a.prompt = list_of<int32_t>(prompt_tokens), a.prompt_offsets = list_of<int32_t>(prompt_offsets);
  a.output = list_of<int32_t>(output_tokens), a.output_offsets = list_of<int32_t>(output_offsets);
  a.presence = list_of<float>(presence_penalty), a.frequency = list_of<float>(frequency_penalty);
  a.repetition = list_of<float>(repetition_penalty);
  a.bias_ids = list_of<int32_t>(bias_ids), a.bias_offsets = list_of<int32_t>(bias_offsets);
  a.bias_values = list_of<float>(bias_values);
  launch_kernel(apply_penalties_kernel, static_cast<unsigned>(num_seqs), kThreads, 0, stream, a);
  check_launch(kOp);
}

}  // namespace engine_cuda
