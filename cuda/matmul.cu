// matmul on the GPU: out = x @ w^T (+ bias). The launcher validates and picks a kernel
// from the shapes and dtypes (and 16-byte alignment of x and w):
//   f16/bf16 w, num_tokens <= kGemvMaxTokens  -> launch_gemv (matmul_gemv.cu), f32 math
//   f16/bf16 w, up to kSkinnyMaxTokens        -> launch_skinny (matmul_skinny.cu), x rounded
//                                                to w's dtype; ENGINE_CUDA_MATMUL_SKINNY=0
//                                                (read at every call) sends these to:
//   f16/bf16 w, more tokens                   -> launch_mma (matmul_mma.cu), x rounded
//   f32 w, or K % 8 != 0, or unaligned rows   -> tiled_kernel here (x rounded the same way
//                                                when the tensor-core path would round it)
// The tensor-core paths may split K; their partial sums live in a grow-only scratch
// buffer here and are added in a fixed order by split_reduce_kernel (deterministic).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "cuda_ops.h"
#include "engine/check.h"
#include "matmul.cuh"

namespace engine_cuda {

using engine::DType;

namespace matmul_detail {
namespace {

// ---- tiled kernel: any dtype, any sizes and strides ------------------------------------

constexpr int kTile = 64;   // outputs per CTA along M and along N
constexpr int kTileK = 16;  // K per step
constexpr int kTiledThreads = 256;  // 16 x 16, each 4 x 4 outputs

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// x rounded to W's precision (the tensor-core kernel's numerics).
__device__ __forceinline__ float round_to(float v, __half) { return __half2float(__float2half_rn(v)); }
__device__ __forceinline__ float round_to(float v, __nv_bfloat16) {
  return __bfloat162float(__float2bfloat16_rn(v));
}
__device__ __forceinline__ float round_to(float v, float) { return v; }

template <typename W, bool kRoundX>
__global__ void __launch_bounds__(kTiledThreads)
tiled_kernel(const float* __restrict__ x,     // [M, K], row stride x_stride
             int64_t x_stride,
             const W* __restrict__ w,         // [N, K] contiguous
             const float* __restrict__ bias,  // [N] or nullptr
             float* __restrict__ out,         // [M, N], row stride out_stride
             int64_t out_stride, int64_t M, int64_t N, int64_t K) {
  pdl_begin();
  __shared__ float s_x[kTileK][kTile + 1];  // [k][token]
  __shared__ float s_w[kTileK][kTile + 1];  // [k][feature]
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTile;

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
#pragma unroll
    for (int i = 0; i < kTile * kTileK / kTiledThreads; ++i) {
      const int c = threadIdx.x + i * kTiledThreads;
      const int r = c / kTileK, kk = c % kTileK;  // consecutive threads walk along K
      const int64_t k = k0 + kk;
      float xv = 0.0f, wv = 0.0f;
      if (m0 + r < M && k < K) xv = x[(m0 + r) * x_stride + k];
      if (n0 + r < N && k < K) wv = to_f32(w[(n0 + r) * K + k]);
      s_x[kk][r] = kRoundX ? round_to(xv, W()) : xv;
      s_w[kk][r] = wv;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = s_x[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = s_w[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
      if (m < M && n < N) out[m * out_stride + n] = acc[i][j] + (bias != nullptr ? bias[n] : 0.0f);
    }
}

template <typename W, bool kRoundX>
void launch_tiled_for(const MatmulArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.out_features + kTile - 1) / kTile),
                  static_cast<unsigned>((a.num_tokens + kTile - 1) / kTile));
  launch_kernel(tiled_kernel<W, kRoundX>, grid, kTiledThreads, 0, stream, a.x, a.x_stride,
                static_cast<const W*>(a.w), a.bias, a.out, a.out_stride, a.num_tokens,
                a.out_features, a.in_features);
}

void launch_tiled(const MatmulArgs& a, cudaStream_t stream) {
  const bool round_x = a.num_tokens > kGemvMaxTokens;
  switch (a.w_dtype) {
    case DType::f16:
      return round_x ? launch_tiled_for<__half, true>(a, stream)
                     : launch_tiled_for<__half, false>(a, stream);
    case DType::bf16:
      return round_x ? launch_tiled_for<__nv_bfloat16, true>(a, stream)
                     : launch_tiled_for<__nv_bfloat16, false>(a, stream);
    default:
      return launch_tiled_for<float, false>(a, stream);
  }
}

// ---- bias fill (K == 0) and split-K reduce ---------------------------------------------

__global__ void fill_bias_kernel(const float* __restrict__ bias,  // [N] or nullptr
                                 float* __restrict__ out,         // [M, N], row stride out_stride
                                 int64_t out_stride, int64_t M, int64_t N) {
  pdl_begin();
  const int64_t total = M * N;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / N, n = i % N;
    out[m * out_stride + n] = bias != nullptr ? bias[n] : 0.0f;
  }
}

// Column n = blockIdx.x * 256 + threadIdx.x; rows blockIdx.y, + gridDim.y, ...
__global__ void __launch_bounds__(256)
split_reduce_kernel(const float* __restrict__ partial,  // [splits, M, N] contiguous
                    const float* __restrict__ bias,     // [N] or nullptr
                    float* __restrict__ out,            // [M, N], row stride out_stride
                    int64_t out_stride, int64_t M, int64_t N, int splits) {
  pdl_begin();
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const int64_t plane = M * N;
  const float b = bias != nullptr ? bias[n] : 0.0f;
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    const float* p = partial + m * N + n;
    float sum = p[0];
#pragma unroll 4
    for (int z = 1; z < splits; ++z) sum += p[z * plane];  // always slice 0, 1, 2, ...
    out[m * out_stride + n] = sum + b;
  }
}

}  // namespace

void launch_fill_bias(const MatmulArgs& a, cudaStream_t stream) {
  const int64_t total = a.num_tokens * a.out_features;
  const int64_t blocks = std::min<int64_t>((total + 255) / 256, 4096);
  launch_kernel(fill_bias_kernel, static_cast<unsigned>(blocks), 256, 0, stream, a.bias, a.out,
                a.out_stride, a.num_tokens, a.out_features);
}

void launch_split_reduce(const MatmulArgs& a, const float* partial, int64_t splits,
                         cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.out_features + 255) / 256),
                  static_cast<unsigned>(std::min<int64_t>(a.num_tokens, 65535)));
  launch_kernel(split_reduce_kernel, grid, 256, 0, stream, partial, a.bias, a.out, a.out_stride,
                a.num_tokens, a.out_features, static_cast<int>(splits));
}

int sm_count() {
  static const int count = [] {
    int device = 0, n = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        n <= 0) {
      cudaGetLastError();
      return 132;  // an H100 SXM
    }
    return n;
  }();
  return count;
}

}  // namespace matmul_detail

// ---- launcher --------------------------------------------------------------------------

namespace {

constexpr const char* kOp = "matmul";

bool is_aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ENGINE_CUDA_MATMUL_SKINNY=0 sends decode batches to the mma kernel instead of the skinny
// one: a switch for tests and for ruling the skinny kernel out when a result looks wrong.
bool is_skinny_enabled() {
  const char* v = std::getenv("ENGINE_CUDA_MATMUL_SKINNY");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

enum class Path { tiled, gemv, skinny, mma };

// Scratch bytes a path needs: 0, or a multiple-of-256-aligned region for the tensor cores.
int64_t scratch_bytes(Path path, int64_t M, int64_t N, int64_t K) {
  if (path == Path::skinny) return matmul_detail::skinny_scratch_bytes(M, N, K);
  if (path == Path::mma) return matmul_detail::mma_scratch_bytes(M, N, K);
  return 0;
}

// The split-K partials and rounded x: grow-only, sized outside graph capture; growing
// while the stream is capturing is an error. An outgrown buffer is never freed: a graph
// captured earlier still holds its address. When it must grow for a decode batch, it grows
// to what every batch size up to kSkinnyMaxTokens needs with these weights, so capturing
// the smaller batches after running any one of them never needs more.
void* scratch(Path path, int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  using matmul_detail::kGemvMaxTokens;
  using matmul_detail::kSkinnyMaxTokens;
  const int64_t need = scratch_bytes(path, M, N, K);
  if (need == 0) return nullptr;
  static std::mutex mutex;
  static void* buffer = nullptr;
  static int64_t capacity = 0;  // bytes
  std::lock_guard<std::mutex> lock(mutex);
  if (need <= capacity) return buffer;
  if (is_capturing(stream))
    throw std::runtime_error(
        "matmul: the split-K scratch must grow (to " + std::to_string(need) +
        " bytes) while the stream is being captured; run the largest batch once before capture");
  int64_t grown = std::max(need, capacity + capacity / 2);
  if (M > kGemvMaxTokens && M <= kSkinnyMaxTokens)  // one path for all these M
    for (int64_t m = kGemvMaxTokens + 1; m <= kSkinnyMaxTokens; ++m)
      grown = std::max(grown, scratch_bytes(path, m, N, K));
  void* fresh = nullptr;
  check_cuda(cudaMalloc(&fresh, static_cast<size_t>(grown)), kOp, "cudaMalloc");
  buffer = fresh;
  capacity = grown;
  return buffer;
}

}  // namespace

void matmul(const TensorView& x, const TensorView& w, const TensorView& bias,
            const TensorView& out, cudaStream_t stream) {
  engine::check_float_linear(x, w, bias, out, kOp);
  using namespace matmul_detail;
  MatmulArgs a;
  a.x = x.ptr<const float>();
  a.w = w.data;
  a.bias = engine::present(bias) ? bias.ptr<const float>() : nullptr;
  a.out = out.ptr<float>();
  a.num_tokens = x.shape[0];
  a.in_features = x.shape[1];
  a.out_features = w.shape[0];
  a.x_stride = a.num_tokens > 1 ? x.strides[0] : a.in_features;
  a.out_stride = a.num_tokens > 1 ? out.strides[0] : a.out_features;
  a.w_dtype = w.dtype;
  if (a.num_tokens == 0 || a.out_features == 0) return;

  if (a.in_features == 0) {
    launch_fill_bias(a, stream);
  } else {
    // 16-byte vector loads of x rows and w rows (the x stride only matters past row 0);
    // the tensor-core kernels keep K (rounded up to a tile) in an int.
    const bool is_vector_ok = a.in_features % 8 == 0 && a.in_features < (int64_t{1} << 30) &&
                              is_aligned16(a.w) && is_aligned16(a.x) &&
                              (a.num_tokens == 1 || a.x_stride % 4 == 0);
    Path path = Path::mma;
    if (w.dtype == DType::f32 || !is_vector_ok)
      path = Path::tiled;
    else if (a.num_tokens <= kGemvMaxTokens)
      path = Path::gemv;
    else if (a.num_tokens <= kSkinnyMaxTokens && is_skinny_enabled())
      path = Path::skinny;
    void* buffer = scratch(path, a.num_tokens, a.out_features, a.in_features, stream);
    switch (path) {
      case Path::tiled: launch_tiled(a, stream); break;
      case Path::gemv: launch_gemv(a, stream); break;
      case Path::skinny: launch_skinny(a, buffer, stream); break;
      case Path::mma: launch_mma(a, buffer, stream); break;
    }
  }
  check_launch(kOp);
}

}  // namespace engine_cuda
