// matmul internals shared by matmul.cu (launcher, tiled f32 kernel), matmul_gemv.cu
// (few tokens, 16-bit weights) and matmul_mma.cu (tensor cores, 16-bit weights).
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

// Each launcher below launches on `stream` and leaves check_launch to the caller.
// out = x @ w^T + bias for num_tokens <= kGemvMaxTokens; needs in_features % 8 == 0 and
// 16-byte aligned rows of x and w.
void launch_gemv(const MatmulArgs& a, cudaStream_t stream);
// Tensor cores; needs 16-bit w, in_features % 8 == 0, 16-byte aligned rows of x and w.
void launch_mma(const MatmulArgs& a, cudaStream_t stream);
// out[m, n] = bias[n] (or 0): the start value of a split-K accumulation.
void launch_fill_bias(const MatmulArgs& a, cudaStream_t stream);

}  // namespace matmul_detail
}  // namespace engine_cuda
