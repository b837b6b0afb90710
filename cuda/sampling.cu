// sample on the GPU: one token per row of logits, with temperature, top-k, top-p and
// min-p, drawn from each sequence's own SplitMix64 generator advanced exactly as on the
// CPU (one step per row per call, greedy or not), so a sequence's stream does not depend
// on the device.
//
// One block of 1024 threads per row; nothing is sorted. The kept set is a prefix of the
// order (probability descending = logit descending, ties to the lower id), so each filter
// is a Cut (select.cuh) and the kept set is the earliest of them:
//   top_k  the k-th element (a count select),
//   top_p  the first element where the cumulative probability reaches top_p (a mass select),
//   min_p  the last element with p >= min_p * p_max (at least the first),
// then the draw is the first kept element whose cumulative probability exceeds u * kept
// mass (a mass select within the kept set). Probabilities are exp(x / T - max) / sum in
// double, as the reference; masses are sums of p * 2^62 as uint64 (exact, order free),
// so a different token than the CPU's needs u or top_p within ~1e-13 of a boundary.
//
// Rows the CPU rejects (NaN anywhere, NaN parameters, +inf or all -inf logits in a
// sampled row) cannot raise here without a sync: they get token -1 (the generator still
// advances once).
#include <climits>

#include "common.cuh"
#include "cuda_ops.h"
#include "select.cuh"

namespace engine_cuda {
namespace {

using engine::DType;
constexpr int kThreads = 1024;

// ============================================================================
// Generator (as csrc/kernels/sampling.cpp)
// ============================================================================

__device__ __forceinline__ uint64_t splitmix64(uint64_t& state) {
  state += 0x9E3779B97F4A7C15ull;
  uint64_t z = state;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

__device__ __forceinline__ double uniform(uint64_t bits) {
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

// ============================================================================
// Row statistics
// ============================================================================

// p(x) * 2^62 as an integer: p = exp(x / T - m) / sum, scale = 2^62 / sum.
struct FixedMass {
  double temperature, x_max_scaled, scale;
  __device__ uint64_t operator()(float x) const {
    return __double2ull_rz(exp(static_cast<double>(x) / temperature - x_max_scaled) * scale);
  }
};

struct RowScan {
  float x_max;
  int32_t argmax;  // lowest id of the max (NaN ignored)
  bool has_nan, has_posinf, has_finite;
};

__device__ RowScan scan_row(const float* row, int64_t vocab) {
  __shared__ float s_x[32];
  __shared__ int32_t s_i[32];
  __shared__ int s_flags[32];
  float bx = -INFINITY;
  int32_t bi = INT_MAX;
  int flags = 0;  // 1: NaN, 2: +inf, 4: finite
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float x = row[i];
    if (isnan(x)) {
      flags |= 1;
      continue;
    }
    flags |= x == INFINITY ? 2 : (x != -INFINITY ? 4 : 0);
    if (x > bx || (x == bx && i < bi)) bx = x, bi = static_cast<int32_t>(i);
  }
  for (int off = 16; off > 0; off >>= 1) {
    const float ox = __shfl_xor_sync(0xffffffffu, bx, off);
    const int32_t oi = __shfl_xor_sync(0xffffffffu, bi, off);
    flags |= __shfl_xor_sync(0xffffffffu, flags, off);
    if (ox > bx || (ox == bx && oi < bi)) bx = ox, bi = oi;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) s_x[warp] = bx, s_i[warp] = bi, s_flags[warp] = flags;
  __syncthreads();
  RowScan r{-INFINITY, INT_MAX, false, false, false};
  int all = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) {
    all |= s_flags[w];
    if (s_x[w] > r.x_max || (s_x[w] == r.x_max && s_i[w] < r.argmax)) r.x_max = s_x[w], r.argmax = s_i[w];
  }
  __syncthreads();
  r.has_nan = all & 1;
  r.has_posinf = all & 2;
  r.has_finite = all & 4;
  return r;
}

// min_p: the last element with p >= min_p * p_max, or `top` if none.
__device__ Cut min_p_cut(const float* row, int64_t vocab, const FixedMass& m, double sum,
                         double min_p, Cut top) {
  __shared__ uint32_t s_ord;
  __shared__ int32_t s_id;
  const double threshold = min_p * (1.0 / sum);  // p_max = exp(0) / sum
  if (threadIdx.x == 0) s_ord = 0xFFFFFFFFu, s_id = -1;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float x = row[i];
    const double p = exp(static_cast<double>(x) / m.temperature - m.x_max_scaled) / sum;
    if (p >= threshold) atomicMin(&s_ord, order_key(x));
  }
  __syncthreads();
  const uint32_t last_ord = s_ord;
  if (last_ord == 0xFFFFFFFFu) return top;  // uniform across the block
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x)
    if (order_key(row[i]) == last_ord) atomicMax(&s_id, static_cast<int32_t>(i));
  __syncthreads();
  const Cut c{last_ord, s_id};
  __syncthreads();
  return c;
}

// ============================================================================
// Kernel
// ============================================================================

struct SampleArgs {
  const float* logits;  // [num_seqs, vocab], row stride logits_stride
  int64_t logits_stride, vocab;
  const float* temperature;  // [num_seqs]
  const int32_t* top_k;      // [num_seqs]
  const float* top_p;        // [num_seqs]
  const float* min_p;        // [num_seqs]
  uint64_t* rng_state;       // [num_seqs]
  int32_t* out;              // [num_seqs]
  int64_t ts, ks, ps, ms, rs, os;  // strides of the per-row arrays
};

__global__ void __launch_bounds__(kThreads, 1) sample_kernel(SampleArgs a) {
  pdl_begin();
  __shared__ SelectScratch s;
  const int64_t r = blockIdx.x;
  const float* row = a.logits + r * a.logits_stride;
  const int64_t vocab = a.vocab;
  const float temp = a.temperature[r * a.ts], top_p = a.top_p[r * a.ps], min_p = a.min_p[r * a.ms];
  const int32_t top_k = a.top_k[r * a.ks];
  uint64_t state = a.rng_state[r * a.rs];  // read by all before thread 0 writes (barriers below)
  const double u = uniform(splitmix64(state));

  const RowScan scan = scan_row(row, vocab);  // has barriers
  if (threadIdx.x == 0) a.rng_state[r * a.rs] = state;
  const bool is_sampled = temp > 0.0f;
  const bool bad = isnan(temp) || isnan(top_p) || isnan(min_p) || scan.has_nan ||
                   (is_sampled && (scan.has_posinf || !scan.has_finite));
  if (bad || !is_sampled) {
    if (threadIdx.x == 0) a.out[r * a.os] = bad ? -1 : scan.argmax;
    return;
  }

  // softmax(x / T): the denominator in double
  const double t = temp, x_max_scaled = static_cast<double>(scan.x_max) / t;
  double part = 0.0;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x)
    part += exp(static_cast<double>(row[i]) / t - x_max_scaled);
  const double sum = block_sum(part);
  const FixedMass mass_of{t, x_max_scaled, 0x1.0p62 / sum};

  // the kept set: the earliest of the filters' cuts
  const Cut top{order_key(scan.x_max), scan.argmax};
  Cut kept = cut_after_all();
  if (top_k > 0 && top_k < vocab)
    kept = earlier(kept, select_cut<false>(row, vocab, cut_before_all(), cut_after_all(),
                                           static_cast<double>(top_k), true, mass_of, s));
  if (top_p < 1.0f)
    kept = earlier(kept, select_cut<true>(row, vocab, cut_before_all(), cut_after_all(),
                                          static_cast<double>(top_p) * 0x1.0p62, true, mass_of, s));
  if (min_p > 0.0f)
    kept = earlier(kept, min_p_cut(row, vocab, mass_of, sum, static_cast<double>(min_p), top));

  // the draw: first kept element whose cumulative mass exceeds u * kept mass
  unsigned long long kept_part = 0;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float x = row[i];
    if (at_or_before(order_key(x), i, kept)) kept_part += mass_of(x);
  }
  const unsigned long long kept_mass = block_sum(kept_part);
  const Cut pick = select_cut<true>(row, vocab, cut_before_all(), kept,
                                    u * static_cast<double>(kept_mass), false, mass_of, s);
  if (threadIdx.x == 0) a.out[r * a.os] = pick.id;
}

void check_per_row(const TensorView& t, const char* arg, DType dtype, int64_t num_seqs) {
  engine::check_dtype(t, "sample", arg, {dtype});
  engine::check_shape(t, "sample", arg, {num_seqs});
}

}  // namespace

// ============================================================================
// Launcher
// ============================================================================

void sample(const TensorView& logits, const TensorView& temperature, const TensorView& top_k,
            const TensorView& top_p, const TensorView& min_p, const TensorView& rng_state,
            const TensorView& out, cudaStream_t stream) {
  const char* op = "sample";
  engine::check_dtype(logits, op, "logits", {DType::f32});
  engine::check_ndim(logits, op, "logits", 2);
  check_nonempty_row_contiguous(logits, op, "logits");
  const int64_t num_seqs = logits.size(0), vocab = logits.size(1);
  ENGINE_CHECK(
      vocab > 0 && vocab <= INT_MAX, op,
      "logits must have between 1 and 2^31 - 1 columns (the vocab), got " + logits.describe());
  check_per_row(temperature, "temperature", DType::f32, num_seqs);
  check_per_row(top_k, "top_k", DType::i32, num_seqs);
  check_per_row(top_p, "top_p", DType::f32, num_seqs);
  check_per_row(min_p, "min_p", DType::f32, num_seqs);
  check_per_row(rng_state, "rng_state", DType::u64, num_seqs);
  check_per_row(out, "out", DType::i32, num_seqs);
  ENGINE_CHECK(num_seqs <= INT_MAX, op, "logits must have at most 2^31 - 1 rows");
  if (num_seqs == 0) return;

  SampleArgs a;
  a.logits = logits.ptr<float>();
  a.logits_stride = logits.stride(0);
  a.vocab = vocab;
  a.temperature = temperature.ptr<float>();
  a.top_k = top_k.ptr<int32_t>();
  a.top_p = top_p.ptr<float>();
  a.min_p = min_p.ptr<float>();
  a.rng_state = rng_state.ptr<uint64_t>();
  a.out = out.ptr<int32_t>();
  a.ts = temperature.stride(0), a.ks = top_k.stride(0), a.ps = top_p.stride(0);
  a.ms = min_p.stride(0), a.rs = rng_state.stride(0), a.os = out.stride(0);
  launch_kernel(sample_kernel, static_cast<unsigned>(num_seqs), kThreads, 0, stream, a);
  check_launch(op);
}

}  // namespace engine_cuda
