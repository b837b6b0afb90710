// log_softmax_topk on the GPU: per row, log p = (x - max) - log(sum(exp(x - max))) in
// double, the chosen token's log p, and the k most probable ids (logit descending, ties
// to the lower id) with their log p, best first.
//
// One block of 1024 threads per row. The top k come out in rounds of up to 1024: a count
// select (select.cuh) finds the last element of the round, the round's elements are
// gathered into shared memory and bitonic-sorted. k <= 1024 (the usual k <= 20) is one
// round; any k up to vocab is correct, in ceil(k / 1024) rounds.
//
// Rows the CPU rejects (NaN, +inf, or every logit -inf) cannot raise here without a sync:
// they get NaN log-probabilities and ids -1. A token id outside [0, vocab) gets NaN.
#include <climits>

#include "common.cuh"
#include "cuda_ops.h"
#include "select.cuh"

namespace engine_cuda {
namespace {

using engine::DType;
constexpr int kThreads = 1024;  // also the round size
constexpr const char* kOp = "log_softmax_topk";

struct NoWeight {
  __device__ uint64_t operator()(float) const { return 1; }
};

struct Args {
  const float* logits;  // [num_seqs, vocab], row stride ls
  int64_t ls, vocab, k;
  const int32_t* token_ids;  // [num_seqs], stride ts
  int64_t ts;
  float* out_token_logprob;  // [num_seqs], stride os
  int64_t os;
  int32_t* out_topk_ids;  // [num_seqs, k], row stride is
  int64_t is;
  float* out_topk_logprobs;  // [num_seqs, k], row stride ps
  int64_t ps;
};

// Sorts keys[0, kThreads) descending (bitonic); every thread of the block calls it.
__device__ void sort_descending(unsigned long long* keys) {
  const int t = threadIdx.x;
  for (int size = 2; size <= kThreads; size <<= 1) {
    for (int j = size >> 1; j > 0; j >>= 1) {
      const int other = t ^ j;
      if (other > t) {
        const unsigned long long a = keys[t], b = keys[other];
        const bool descending = (t & size) == 0;
        if (descending ? a < b : a > b) keys[t] = b, keys[other] = a;
      }
      __syncthreads();
    }
  }
}

__global__ void __launch_bounds__(kThreads, 1) log_softmax_topk_kernel(Args a) {
  pdl_begin();
  __shared__ SelectScratch s;
  __shared__ unsigned long long keys[kThreads];  // (order key << 32) | (~id): descending = best first
  __shared__ int32_t s_count;
  const int64_t r = blockIdx.x, vocab = a.vocab, k = a.k;
  const float* row = a.logits + r * a.ls;
  int32_t* ids = a.out_topk_ids + r * a.is;
  float* lps = a.out_topk_logprobs + r * a.ps;

  // max and validity
  float x_max = -INFINITY;
  int flags = 0;  // 1: NaN or +inf, 2: some logit above -inf
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float x = row[i];
    if (isnan(x) || x == INFINITY) flags |= 1;
    else if (x != -INFINITY) flags |= 2, x_max = fmaxf(x_max, x);
  }
  {
    __shared__ float s_max[32];
    __shared__ int s_flags[32];
    for (int off = 16; off > 0; off >>= 1) {
      x_max = fmaxf(x_max, __shfl_xor_sync(0xffffffffu, x_max, off));
      flags |= __shfl_xor_sync(0xffffffffu, flags, off);
    }
    if ((threadIdx.x & 31) == 0) s_max[threadIdx.x >> 5] = x_max, s_flags[threadIdx.x >> 5] = flags;
    __syncthreads();
    for (int w = 0; w < kThreads / 32; ++w) x_max = fmaxf(x_max, s_max[w]), flags |= s_flags[w];
    __syncthreads();
  }
  if ((flags & 1) || !(flags & 2)) {
    if (threadIdx.x == 0) a.out_token_logprob[r * a.os] = NAN;
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) ids[j] = -1, lps[j] = NAN;
    return;
  }

  const double m = x_max;
  double part = 0.0;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) part += exp(static_cast<double>(row[i]) - m);
  const double lse = log(block_sum(part));
  auto log_prob = [&](float x) { return static_cast<float>((static_cast<double>(x) - m) - lse); };
  if (threadIdx.x == 0) {
    const int32_t tok = a.token_ids[r * a.ts];
    a.out_token_logprob[r * a.os] = (tok >= 0 && tok < vocab) ? log_prob(row[tok]) : NAN;
  }

  Cut done_cut = cut_before_all();
  for (int64_t done = 0; done < k; done += kThreads) {
    const int64_t n = min(static_cast<int64_t>(kThreads), k - done);
    const Cut c = select_cut<false>(row, vocab, done_cut, cut_after_all(),
                                    static_cast<double>(n), true, NoWeight{}, s);
    keys[threadIdx.x] = 0;  // below every real key
    if (threadIdx.x == 0) s_count = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
      const uint32_t o = order_key(row[i]);
      if (!in_range(o, i, done_cut, c)) continue;
      const int slot = atomicAdd(&s_count, 1);
      if (slot < kThreads)
        keys[slot] = (static_cast<unsigned long long>(o) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(i));
    }
    __syncthreads();
    sort_descending(keys);
    if (threadIdx.x < n) {
      const unsigned long long key = keys[threadIdx.x];
      ids[done + threadIdx.x] = static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(key));
      lps[done + threadIdx.x] = log_prob(key_to_float(static_cast<uint32_t>(key >> 32)));
    }
    __syncthreads();  // keys are refilled by the next round
    done_cut = c;
  }
}

void check_out(const TensorView& t, const char* arg, DType dtype, std::initializer_list<int64_t> shape) {
  engine::check_dtype(t, kOp, arg, {dtype});
  engine::check_shape(t, kOp, arg, shape);
}

}  // namespace

void log_softmax_topk(const TensorView& logits, const TensorView& token_ids, int64_t k,
                      const TensorView& out_token_logprob, const TensorView& out_topk_ids,
                      const TensorView& out_topk_logprobs, cudaStream_t stream) {
  engine::check_dtype(logits, kOp, "logits", {DType::f32});
  engine::check_ndim(logits, kOp, "logits", 2);
  check_nonempty_row_contiguous(logits, kOp, "logits");
  const int64_t num_seqs = logits.size(0), vocab = logits.size(1);
  ENGINE_CHECK(
      vocab > 0 && vocab <= INT_MAX, kOp,
      "logits must have between 1 and 2^31 - 1 columns (the vocab), got " + logits.describe());
  ENGINE_CHECK(
      k >= 0 && k <= vocab, kOp,
      "k must be in [0, " + std::to_string(vocab) + "] (the vocab), got " + std::to_string(k));
  check_out(token_ids, "token_ids", DType::i32, {num_seqs});
  check_out(out_token_logprob, "out_token_logprob", DType::f32, {num_seqs});
  check_out(out_topk_ids, "out_topk_ids", DType::i32, {num_seqs, k});
  check_nonempty_row_contiguous(out_topk_ids, kOp, "out_topk_ids");
  check_out(out_topk_logprobs, "out_topk_logprobs", DType::f32, {num_seqs, k});
  check_nonempty_row_contiguous(out_topk_logprobs, kOp, "out_topk_logprobs");
  ENGINE_CHECK(num_seqs <= INT_MAX, kOp, "logits must have at most 2^31 - 1 rows");
  if (num_seqs == 0) return;

  Args a;
  a.logits = logits.ptr<float>();
  a.ls = logits.stride(0), a.vocab = vocab, a.k = k;
  a.token_ids = token_ids.ptr<int32_t>(), a.ts = token_ids.stride(0);
  a.out_token_logprob = out_token_logprob.ptr<float>(), a.os = out_token_logprob.stride(0);
  a.out_topk_ids = out_topk_ids.ptr<int32_t>(), a.is = k > 0 ? out_topk_ids.stride(0) : 0;
  a.out_topk_logprobs = out_topk_logprobs.ptr<float>(), a.ps = k > 0 ? out_topk_logprobs.stride(0) : 0;
  launch_kernel(log_softmax_topk_kernel, static_cast<unsigned>(num_seqs), kThreads, 0, stream, a);
  check_launch(kOp);
}

}  // namespace engine_cuda
