// matmul on tensor cores for decode batches (kGemvMaxTokens < num_tokens <=
// kSkinnyMaxTokens) and f16/bf16 weights: bound by reading w once, so every CTA streams
// a long run of w tiles through a deep cp.async ring.
//
// 1. round_x_kernel: x (f32, strided) -> xh (w's dtype, [M, K] contiguous, in the
//    scratch), once per call, so the GEMM CTAs read half the bytes of f32 x and load both
//    operands with cp.async. Same rounding as the mma kernel (nearest even).
// 2. skinny_kernel: CTA tile BM x 64 (BM = 32, 64 or 128: all of M up to 128) x 64 of K,
//    128 threads = 4 warps as 2 (M) x 2 (N), each (BM / 2) x 32, mma.sync.m16n8k16. A
//    kStages ring of (x, w) tiles arrives by cp.async (zero-filled past M, N, K); shared
//    rows are padded to 144 bytes so ldmatrix is conflict-free. Every BM uses 108 KB of
//    shared memory (8, 6, 4 stages), 2 CTAs per SM. M-tiles of one N-tile are neighbours
//    in blockIdx.x so they read a w tile from DRAM once.
// 3. When M-tiles x N-tiles is under one CTA per SM, K is split over gridDim.z to reach
//    about 2 CTAs per SM; slices write partial tiles to the scratch and
//    launch_split_reduce adds them in a fixed order (deterministic).
//
// Needs: in_features % 8 == 0 (< 2^30), x rows and w 16-byte aligned (x_stride % 4 == 0).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "cuda_ops.h"
#include "matmul.cuh"
#include "matmul_ptx.cuh"

namespace engine_cuda {
namespace matmul_detail {
namespace {

constexpr int kThreads = 128;
constexpr int kBN = 64;
constexpr int kBK = 64;
constexpr int kLd = kBK + 8;  // shared row length in 16-bit elements (144 bytes)
constexpr int kCtasPerSm = 2;
constexpr int kMinTilesPerSplit = 4;
constexpr int kMaxSplits = 16;

// Stages for a BM: each configuration takes 8 * 96 * 144 = 110592 bytes of shared memory.
__host__ __device__ constexpr int stages_for(int bm) { return bm == 32 ? 8 : bm == 64 ? 6 : 4; }
__host__ __device__ constexpr int smem_bytes(int bm) {
  return stages_for(bm) * (bm + kBN) * kLd * 2;
}
static_assert(smem_bytes(32) == 110592 && smem_bytes(64) == 110592 && smem_bytes(128) == 110592);

// ---- x -> w's dtype -------------------------------------------------------------------

template <typename W>
__global__ void __launch_bounds__(256)
round_x_kernel(const float* __restrict__ x,  // [M, K], row stride x_stride; row m = blockIdx.y
               int64_t x_stride,
               W* __restrict__ xh,           // [M, K] contiguous
               int K) {
  pdl_begin();
  const int64_t m = blockIdx.y;
  const float4* src = reinterpret_cast<const float4*>(x + m * x_stride);
  uint4* dst = reinterpret_cast<uint4*>(xh + m * K);
  for (int v = blockIdx.x * blockDim.x + threadIdx.x; v < K / 8; v += gridDim.x * blockDim.x) {
    const float4 lo = __ldg(src + 2 * v), hi = __ldg(src + 2 * v + 1);
    dst[v] = make_uint4(pack2<W>(lo.x, lo.y), pack2<W>(lo.z, lo.w), pack2<W>(hi.x, hi.y),
                        pack2<W>(hi.z, hi.w));
  }
}

// ---- GEMM -----------------------------------------------------------------------------

template <typename W, int BM>
__global__ void __launch_bounds__(kThreads, kCtasPerSm)
skinny_kernel(const W* __restrict__ xh,       // [M, K] contiguous
              const W* __restrict__ w,        // [N, K] contiguous
              const float* __restrict__ bias, // [N] or nullptr
              float* __restrict__ out,        // [M, N], row stride out_stride
              int64_t out_stride,
              float* __restrict__ partial,    // [gridDim.z, M, N] when gridDim.z > 1, else unused
              int M, int64_t N, int K, int m_tiles, int tiles_per_split) {
  constexpr int kStages = stages_for(BM);
  constexpr int kWarpM = BM / 2;
  constexpr int kMT = kWarpM / 16;  // m16 tiles per warp
  constexpr int kNT = 4;            // n8 tiles per warp (32 columns)
  constexpr int kAChunks = BM * (kBK / 8) / kThreads;   // 16-byte chunks of x per thread
  constexpr int kBChunks = kBN * (kBK / 8) / kThreads;  // 16-byte chunks of w per thread
  static_assert(kAChunks * kThreads == BM * kBK / 8 && kBChunks * kThreads == kBN * kBK / 8);

  extern __shared__ __align__(16) unsigned char smem[];
  W* s_a = reinterpret_cast<W*>(smem);  // [kStages][BM][kLd]
  W* s_b = s_a + kStages * BM * kLd;    // [kStages][kBN][kLd]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp / 2, warp_n = warp % 2;
  const int m0 = static_cast<int>(blockIdx.x % m_tiles) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x / m_tiles) * kBN;
  const int m_left = min(M - m0, BM);
  const int n_left = static_cast<int>(min(N - n0, static_cast<int64_t>(kBN)));
  const int k_tiles = (K + kBK - 1) / kBK;
  const int kt_begin = static_cast<int>(blockIdx.z) * tiles_per_split;
  const int num_tiles = min(k_tiles, kt_begin + tiles_per_split) - kt_begin;
  const W* x_blk = xh + static_cast<int64_t>(m0) * K;  // row m0
  const W* w_blk = w + n0 * K;                         // row n0

  // x and w tiles (kt) -> stage, asynchronously. K % 8 == 0: a chunk is all in or all out.
  auto load_tile = [&](int stage, int kt) {
    const int k_base = kt * kBK;
#pragma unroll
    for (int i = 0; i < kAChunks; ++i) {
      const int c = tid + i * kThreads;
      const int row = c / (kBK / 8), col = c % (kBK / 8) * 8;
      const bool ok = row < m_left && k_base + col < K;
      cp_async16(s_a + (stage * BM + row) * kLd + col,
                 ok ? x_blk + static_cast<int64_t>(row) * K + k_base + col : xh, ok ? 16 : 0);
    }
#pragma unroll
    for (int i = 0; i < kBChunks; ++i) {
      const int c = tid + i * kThreads;
      const int row = c / (kBK / 8), col = c % (kBK / 8) * 8;
      const bool ok = row < n_left && k_base + col < K;
      cp_async16(s_b + (stage * kBN + row) * kLd + col,
                 ok ? w_blk + static_cast<int64_t>(row) * K + k_base + col : w, ok ? 16 : 0);
    }
  };

  float acc[kMT][kNT][4];
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  // The weights are no kernel's output: the prologue's w tiles start into L2 before the
  // wait for the kernel before (which writes x).
  for (int s = 0; s < kStages - 1 && s < num_tiles; ++s)
#pragma unroll
    for (int i = 0; i < kBChunks; ++i) {
      const int c = tid + i * kThreads;
      const int row = c / (kBK / 8), col = c % (kBK / 8) * 8;
      const int k = (kt_begin + s) * kBK + col;
      if (row < n_left && k < K) prefetch_l2(w_blk + static_cast<int64_t>(row) * K + k);
    }
  pdl_begin();

  // ---- pipeline: prologue fills kStages - 1 stages; one commit group per tile ----------
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_tiles) load_tile(s, kt_begin + s);
    cp_async_commit();
  }

  for (int t = 0; t < num_tiles; ++t) {
    cp_async_wait<kStages - 2>();  // tile t has landed (for this thread) ...
    __syncthreads();               // ... for all threads; stage (t - 1) is free again
    const int next = t + kStages - 1;
    if (next < num_tiles) load_tile(next % kStages, kt_begin + next);
    cp_async_commit();

    const W* a_tile = s_a + (t % kStages) * BM * kLd;
    const W* b_tile = s_b + (t % kStages) * kBN * kLd;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t a_frag[kMT][4], b_frag[kNT][2];
#pragma unroll
      for (int i = 0; i < kMT; ++i) {
        const int row = warp_m * kWarpM + i * 16 + lane % 16;
        ldmatrix_x4(a_frag[i], a_tile + row * kLd + kk + lane / 16 * 8);
      }
#pragma unroll
      for (int j = 0; j < kNT; j += 2) {
        const int row = warp_n * 32 + j * 8 + lane / 16 * 8 + lane % 8;
        uint32_t r[4];
        ldmatrix_x4(r, b_tile + row * kLd + kk + lane / 8 % 2 * 8);
        b_frag[j][0] = r[0];
        b_frag[j][1] = r[1];
        b_frag[j + 1][0] = r[2];
        b_frag[j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < kMT; ++i)
#pragma unroll
        for (int j = 0; j < kNT; ++j) mma16816<W>(acc[i][j], a_frag[i], b_frag[j]);
    }
  }
  cp_async_wait<0>();  // only empty groups can be left; no copy outlives the CTA

  // ---- epilogue: acc[i][j][2h], [2h + 1] at (row g + 8h, cols 2q, 2q + 1) -------------
  // A K slice (gridDim.z > 1) stores its plain partial sums; the reduce adds the bias.
  float* slice = gridDim.z > 1 ? partial + static_cast<int64_t>(blockIdx.z) * M * N : nullptr;
  const bool pairs_aligned = N % 2 == 0;  // then slice + m * N + n (n even) is 8-byte aligned
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + warp_m * kWarpM + i * 16 + lane / 4 + h * 8;
        const int64_t n = n0 + warp_n * 32 + j * 8 + lane % 4 * 2;
        if (m >= M || n >= N) continue;
        const float v0 = acc[i][j][2 * h], v1 = acc[i][j][2 * h + 1];
        if (slice != nullptr) {
          float* dst = slice + static_cast<int64_t>(m) * N + n;
          if (pairs_aligned) {
            *reinterpret_cast<float2*>(dst) = make_float2(v0, v1);  // n + 1 < N as N is even
          } else {
            dst[0] = v0;
            if (n + 1 < N) dst[1] = v1;
          }
        } else {
          float* dst = out + static_cast<int64_t>(m) * out_stride + n;
          dst[0] = v0 + (bias != nullptr ? bias[n] : 0.0f);
          if (n + 1 < N) dst[1] = v1 + (bias != nullptr ? bias[n + 1] : 0.0f);
        }
      }
}

// ---- launch ---------------------------------------------------------------------------

// The tile shape and K split for a problem size (shapes and the SM count only).
struct SkinnyPlan {
  int bm;                   // 32, 64 or 128 rows of x per CTA
  int64_t m_tiles, n_tiles;
  int64_t splits;           // K slices (grid.z); 1: no split
  int64_t tiles_per_split;  // k-tiles of kBK per slice (the last may have fewer)
  int64_t xh_bytes;         // rounded x at the scratch's start (a multiple of 256)
  int64_t partial_bytes;    // [splits, M, N] f32 after it; 0 without a split
};

SkinnyPlan plan_skinny(int64_t M, int64_t N, int64_t K) {
  SkinnyPlan p;
  p.bm = M <= 32 ? 32 : M <= 64 ? 64 : 128;
  p.m_tiles = (M + p.bm - 1) / p.bm;
  p.n_tiles = (N + kBN - 1) / kBN;
  const int64_t k_tiles = (K + kBK - 1) / kBK;
  const int64_t ctas = p.m_tiles * p.n_tiles;
  const int64_t sms = sm_count();
  int64_t splits = 1;
  if (ctas < sms)  // under one CTA per SM: split K up to kCtasPerSm CTAs per SM (one wave)
    splits = std::max<int64_t>(
        1, std::min<int64_t>({kCtasPerSm * sms / ctas, k_tiles / kMinTilesPerSplit, kMaxSplits}));
  p.tiles_per_split = (k_tiles + splits - 1) / splits;
  p.splits = (k_tiles + p.tiles_per_split - 1) / p.tiles_per_split;  // no empty slice
  p.xh_bytes = (M * K * 2 + 255) / 256 * 256;
  p.partial_bytes = p.splits > 1 ? p.splits * M * N * static_cast<int64_t>(sizeof(float)) : 0;
  return p;
}

template <typename W, int BM>
void launch_skinny_for(const MatmulArgs& a, const SkinnyPlan& p, void* scratch,
                       cudaStream_t stream) {
  constexpr int kSmem = smem_bytes(BM);
  static const bool configured = [] {  // once per instantiation (not a stream operation)
    check_cuda(cudaFuncSetAttribute(skinny_kernel<W, BM>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem),
               "matmul", "cudaFuncSetAttribute");
    check_cuda(cudaFuncSetAttribute(skinny_kernel<W, BM>,
                                    cudaFuncAttributePreferredSharedMemoryCarveout,
                                    cudaSharedmemCarveoutMaxShared),
               "matmul", "cudaFuncSetAttribute");
    return true;
  }();
  (void)configured;

  W* xh = static_cast<W*>(scratch);
  float* partial = p.splits > 1
                       ? reinterpret_cast<float*>(static_cast<char*>(scratch) + p.xh_bytes)
                       : nullptr;
  const int K = static_cast<int>(a.in_features);
  const int64_t vec_blocks = std::min<int64_t>((K / 8 + 255) / 256, 64);
  launch_kernel(round_x_kernel<W>,
                dim3(static_cast<unsigned>(vec_blocks), static_cast<unsigned>(a.num_tokens)), 256,
                0, stream, a.x, a.x_stride, xh, K);

  const dim3 grid(static_cast<unsigned>(p.m_tiles * p.n_tiles), 1,
                  static_cast<unsigned>(p.splits));
  launch_kernel(skinny_kernel<W, BM>, grid, kThreads, kSmem, stream, xh, static_cast<const W*>(a.w),
                a.bias, a.out, a.out_stride, partial, static_cast<int>(a.num_tokens),
                a.out_features, K, static_cast<int>(p.m_tiles),
                static_cast<int>(p.tiles_per_split));
  if (p.splits > 1) launch_split_reduce(a, partial, p.splits, stream);
}

template <typename W>
void launch_skinny_typed(const MatmulArgs& a, const SkinnyPlan& p, void* scratch,
                         cudaStream_t stream) {
  if (p.bm == 32)
    launch_skinny_for<W, 32>(a, p, scratch, stream);
  else if (p.bm == 64)
    launch_skinny_for<W, 64>(a, p, scratch, stream);
  else
    launch_skinny_for<W, 128>(a, p, scratch, stream);
}

}  // namespace

int64_t skinny_scratch_bytes(int64_t num_tokens, int64_t out_features, int64_t in_features) {
  const SkinnyPlan p = plan_skinny(num_tokens, out_features, in_features);
  return p.xh_bytes + p.partial_bytes;
}

void launch_skinny(const MatmulArgs& a, void* scratch, cudaStream_t stream) {
  const SkinnyPlan p = plan_skinny(a.num_tokens, a.out_features, a.in_features);
  if (a.w_dtype == engine::DType::bf16)
    launch_skinny_typed<__nv_bfloat16>(a, p, scratch, stream);
  else
    launch_skinny_typed<__half>(a, p, scratch, stream);
}

}  // namespace matmul_detail
}  // namespace engine_cuda
