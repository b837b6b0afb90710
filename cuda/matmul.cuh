// matmul internals shared by matmul.cu (launcher, tiled f32 kernel, split-K reduce,
// scratch), matmul_gemv.cu (few tokens, 16-bit weights), matmul_skinny.cu (decode batches,
// tensor cores) and matmul_mma.cu (many tokens, tensor cores).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "engine/tensor.h"

namespace engine_cuda {
namespace matmul_detail {

// Up to this many tokens, 16-bit weights go through the bandwidth-bound kernel in f32
// math; above it, through tensor cores with x rounded to the weights' dtype. The tests
// mirror this rule.
constexpr int64_t kGemvMaxTokens = 8;
// From kGemvMaxTokens + 1 up to this many tokens, 16-bit weights go through the skinny
// kernel (unless ENGINE_CUDA_MATMUL_SKINNY=0); above it, through the mma kernel.
constexpr int64_t kSkinnyMaxTokens = 256;

// The arguments of every matmul kernel: raw pointers, sizes and row strides (elements).
struct MatmulArgs {
  const float* x;     // [num_tokens, in_features], row stride x_stride
  const void* w;      // [out_features, in_features] contiguous, f32/f16/bf16
  const float* bias;  // [out_features] or nullptr
  float* out;         // [num_tokens, out_features], row stride out_stride
  int64_t x_stride;
  int64_t out_stride;
  int64_t num_tokens;    // M
  int64_t out_features;  // N
  int64_t in_features;   // K
  engine::DType w_dtype;
};

// Split-K: a kernel whose grid.z > 1 slices K; slice z writes its partial sums to
// partial[z] of a [splits, M, N] f32 scratch array, then launch_split_reduce sets
// out = sum over z in order 0, 1, ... (+ bias): the same bits on every run.
//
// Each launcher below launches on `stream` and leaves check_launch to the caller.
// out = x @ w^T + bias for num_tokens <= kGemvMaxTokens; needs in_features % 8 == 0 and
// 16-byte aligned rows of x and w.
void launch_gemv(const MatmulArgs& a, cudaStream_t stream);
// Tensor cores; needs 16-bit w, in_features % 8 == 0 (and < 2^30), 16-byte aligned rows of
// x and w. `scratch`: at least mma_scratch_bytes(M, N, K) bytes, 256-byte aligned.
int64_t mma_scratch_bytes(int64_t num_tokens, int64_t out_features, int64_t in_features);
void launch_mma(const MatmulArgs& a, void* scratch, cudaStream_t stream);
// Tensor cores for kGemvMaxTokens < num_tokens <= kSkinnyMaxTokens, same needs as
// launch_mma; scratch: skinny_scratch_bytes(M, N, K) bytes, 256-byte aligned.
int64_t skinny_scratch_bytes(int64_t num_tokens, int64_t out_features, int64_t in_features);
void launch_skinny(const MatmulArgs& a, void* scratch, cudaStream_t stream);
// out[m, n] = sum_z partial[z, m, n] (+ bias[n]), partial [splits, M, N] contiguous.
void launch_split_reduce(const MatmulArgs& a, const float* partial, int64_t splits,
                         cudaStream_t stream);
// out[m, n] = bias[n] (or 0): the result when in_features == 0.
void launch_fill_bias(const MatmulArgs& a, cudaStream_t stream);
// Streaming multiprocessors of the current device (asked once; 132 if that fails).
int sm_count();

}  // namespace matmul_detail
}  // namespace engine_cuda
