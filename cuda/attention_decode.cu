// paged_attention, decode: split-KV ("flash-decoding") for head_dim 64 and 128.
//
// grid (num_seqs, num_kv_heads * num_chunks, num_splits), 128 threads. A CTA reads the
// KV positions [split * P, (split + 1) * P) of one sequence and one KV head (P =
// partition_size: 512, or less when the grid would not fill the GPU), for up to GMAX
// query heads of that KV head's group at once (a chunk), so each K/V row is loaded once
// per chunk. Inside, every group of LPK = head_dim / 8 lanes is a worker that owns 8 dims
// and reads one key per step with 16-byte loads (2 steps in flight), keeping its own
// online softmax (m, l, acc) per head; the CTA merges its workers in shared memory. With one split the CTA writes out directly; otherwise it writes a
// partial (m, l, acc) and merge_kernel combines the splits. Scores are in the exp2
// domain (q is pre-scaled by scale * log2(e)).
//
// Each sequence's new tokens are looped over, so a batch whose shapes look like decode
// (num_tokens == num_seqs) is right even when a sequence has 0 or 2 new tokens.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "attention.cuh"
#include "common.cuh"

namespace engine_cuda {
namespace attention {
namespace {

constexpr int kThreads = 128, kWarps = 4, kEpl = 8;  // kEpl: dims per lane

// ================================================================================
// Loads: 8 consecutive cache values as f32
// ================================================================================

__device__ __forceinline__ void load8(const float* ptr, float (&x)[kEpl]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(ptr));
  const float4 b = __ldg(reinterpret_cast<const float4*>(ptr) + 1);
  x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w;
  x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
}

__device__ __forceinline__ void load8(const __nv_bfloat16* ptr, float (&x)[kEpl]) {
  const uint4 a = __ldg(reinterpret_cast<const uint4*>(ptr));
  const uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // little-endian: element 2i is the low half of word i
    x[2 * i] = __uint_as_float(w[i] << 16);
    x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

// ================================================================================
// Split kernel
// ================================================================================

// Occupancy target per chunk size: registers grow with GMAX (m, l, acc per head).
template <int GMAX>
constexpr int min_blocks() { return GMAX >= 8 ? 3 : (GMAX >= 4 ? 4 : 5); }

template <typename T, int D, int GMAX>
__global__ void __launch_bounds__(kThreads, min_blocks<GMAX>())
    decode_kernel(Params p, int num_chunks, int num_splits,
                  float* __restrict__ part_ml,     // [num_tokens, num_q_heads, num_splits, 2]
                  float* __restrict__ part_acc) {  // [num_tokens, num_q_heads, num_splits, D]
  pdl_begin();
  constexpr int LPK = D / kEpl;        // lanes per key: 8 (D = 64) or 16 (D = 128)
  constexpr int KPW = 32 / LPK;        // keys one warp reads per step
  constexpr int NWORK = kWarps * KPW;  // workers in the CTA
  __shared__ __align__(16) float q_s[GMAX][D];
  __shared__ __align__(16) float acc_s[NWORK][GMAX][D];
  __shared__ float m_s[NWORK][GMAX], l_s[NWORK][GMAX];

  const int s = blockIdx.x;
  const int kv_head = blockIdx.y / num_chunks;
  const int g0 = (blockIdx.y % num_chunks) * GMAX;
  const int num_g = min(GMAX, p.group - g0);  // heads of this chunk, >= 1
  const int head0 = kv_head * p.group + g0;
  const int split = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int key_in_warp = lane / LPK, sub = lane % LPK;
  const int worker = warp * KPW + key_in_warp;
  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  const SeqInfo info = seq_info(p, s);

  for (int j = 0; j < info.num_new; ++j) {  // CTA-uniform loop (1 step for decode)
    const int64_t token = info.start + j;
    const int kv_end = min(info.context_len + j + 1, info.seq_len);  // keys [0, kv_end)
    const int p0 = split * p.partition_size;
    const int p1 = min(p0 + p.partition_size, kv_end);
    if (p0 >= p1 && num_splits > 1) {  // nothing to read: an empty partial
      for (int idx = threadIdx.x; idx < num_g * D; idx += kThreads) {
        const int g = idx / D, d = idx % D;
        const int64_t part = (token * p.num_q_heads + head0 + g) * num_splits + split;
        part_acc[part * D + d] = 0.0f;
        if (d == 0) part_ml[2 * part] = -INFINITY, part_ml[2 * part + 1] = 0.0f;
      }
      continue;
    }
    for (int idx = threadIdx.x; idx < GMAX * D; idx += kThreads) {
      const int g = idx / D, d = idx % D;
      q_s[g][d] = g < num_g
                      ? p.q[token * p.q_stride0 + (head0 + g) * p.q_stride1 + d] * p.scale_log2
                      : 0.0f;
    }
    __syncthreads();

    float m[GMAX], l[GMAX], acc[GMAX][kEpl];
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      m[g] = -INFINITY, l[g] = 0.0f;
#pragma unroll
      for (int i = 0; i < kEpl; ++i) acc[g][i] = 0.0f;
    }
    // Warp-uniform loop: this warp's workers read keys base + u * NWORK + key_in_warp.
    for (int base = p0 + warp * KPW; base < p1; base += 2 * NWORK) {
      float kf[2][kEpl], vf[2][kEpl];
      bool ok[2];
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int pos = base + u * NWORK + key_in_warp;
        ok[u] = false;
        if (pos < p1) {
          const int blk = pos / p.block_size;
          const int64_t id = physical_block(p, s, blk);
          if (id >= 0) {
            const int64_t slot = id * p.block_size + (pos - blk * p.block_size);
            const int64_t off = (slot * p.num_kv_heads + kv_head) * D + sub * kEpl;
            load8(k_cache + off, kf[u]);
            load8(v_cache + off, vf[u]);
            ok[u] = true;
          }
        }
        if (!ok[u]) {
#pragma unroll
          for (int i = 0; i < kEpl; ++i) kf[u][i] = 0.0f, vf[u][i] = 0.0f;
        }
      }
#pragma unroll
      for (int u = 0; u < 2; ++u) {
#pragma unroll
        for (int g = 0; g < GMAX; ++g) {
          if (g >= num_g) break;  // CTA-uniform: the shuffles below see every lane
          const float4 qa = *reinterpret_cast<const float4*>(&q_s[g][sub * kEpl]);
          const float4 qb = *reinterpret_cast<const float4*>(&q_s[g][sub * kEpl + 4]);
          float sc = qa.x * kf[u][0] + qa.y * kf[u][1] + qa.z * kf[u][2] + qa.w * kf[u][3] +
                     qb.x * kf[u][4] + qb.y * kf[u][5] + qb.z * kf[u][6] + qb.w * kf[u][7];
#pragma unroll
          for (int o = LPK / 2; o > 0; o /= 2) sc += __shfl_xor_sync(0xffffffffu, sc, o);
          if (ok[u]) {
            if (sc > m[g]) {  // a new max: rescale what was summed so far
              const float c = exp2f(m[g] - sc);
              l[g] *= c;
#pragma unroll
              for (int i = 0; i < kEpl; ++i) acc[g][i] *= c;
              m[g] = sc;
            }
            const float pr = exp2f(sc - m[g]);  // NaN scores stay NaN
            l[g] += pr;
#pragma unroll
            for (int i = 0; i < kEpl; ++i) acc[g][i] += pr * vf[u][i];
          }
        }
      }
    }

    // Merge the workers: out = sum_w f_w acc_w / sum_w f_w l_w, f_w = exp2(m_w - max m).
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      if (sub == 0) m_s[worker][g] = m[g], l_s[worker][g] = l[g];
      float4* dst = reinterpret_cast<float4*>(&acc_s[worker][g][sub * kEpl]);
      dst[0] = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
      dst[1] = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < num_g * D; idx += kThreads) {
      const int g = idx / D, d = idx % D;
      float big = -INFINITY;
      for (int w = 0; w < NWORK; ++w) big = fmaxf(big, m_s[w][g]);
      float sum = 0.0f, a = 0.0f;
      for (int w = 0; w < NWORK; ++w) {
        const float f = m_s[w][g] == -INFINITY ? 0.0f : exp2f(m_s[w][g] - big);
        sum += f * l_s[w][g];
        a += f * acc_s[w][g][d];
      }
      const int64_t head = head0 + g;
      if (num_splits == 1) {
        p.out[token * p.out_stride0 + head * p.out_stride1 + d] = sum == 0.0f ? 0.0f : a / sum;
      } else {
        const int64_t part = (token * p.num_q_heads + head) * num_splits + split;
        part_acc[part * D + d] = a;
        if (d == 0) part_ml[2 * part] = big, part_ml[2 * part + 1] = sum;
      }
    }
    __syncthreads();  // q_s and acc_s are reused by the next token
  }
}

// ================================================================================
// Merge kernel: grid (num_tokens, num_q_heads), D threads
// ================================================================================

template <int D>
__global__ void __launch_bounds__(D)
    merge_kernel(Params p, int num_splits,
                 const float* __restrict__ part_ml,     // [num_tokens, num_q_heads, num_splits, 2]
                 const float* __restrict__ part_acc) {  // [num_tokens, num_q_heads, num_splits, D]
  pdl_begin();
  const int64_t token = blockIdx.x, head = blockIdx.y;
  const int d = threadIdx.x;
  const int64_t part0 = (token * p.num_q_heads + head) * num_splits;
  float big = -INFINITY;
  for (int k = 0; k < num_splits; ++k) big = fmaxf(big, part_ml[2 * (part0 + k)]);
  float sum = 0.0f, a = 0.0f;
  for (int k = 0; k < num_splits; ++k) {
    const float m = part_ml[2 * (part0 + k)];
    const float f = m == -INFINITY ? 0.0f : exp2f(m - big);  // an empty split adds nothing
    sum += f * part_ml[2 * (part0 + k) + 1];
    a += f * part_acc[(part0 + k) * D + d];
  }
  p.out[token * p.out_stride0 + head * p.out_stride1 + d] = sum == 0.0f ? 0.0f : a / sum;
}

template <typename T, int D, int GMAX>
void launch_split(const Params& p, int num_splits, float* scratch, cudaStream_t stream) {
  const int num_chunks = (p.group + GMAX - 1) / GMAX;
  const dim3 grid(static_cast<unsigned>(p.num_seqs),
                  static_cast<unsigned>(p.num_kv_heads * num_chunks),
                  static_cast<unsigned>(num_splits));
  float* part_ml = scratch;
  float* part_acc =
      scratch ? scratch + 2 * static_cast<int64_t>(p.num_tokens) * p.num_q_heads * num_splits
              : nullptr;
  launch_kernel(decode_kernel<T, D, GMAX>, grid, kThreads, 0, stream, p, num_chunks, num_splits,
                part_ml, part_acc);
  if (num_splits > 1) {
    const dim3 merge_grid(static_cast<unsigned>(p.num_tokens),
                          static_cast<unsigned>(p.num_q_heads));
    launch_kernel(merge_kernel<D>, merge_grid, D, 0, stream, p, num_splits, part_ml, part_acc);
  }
}

template <typename T, int D>
void launch_dim(const Params& p, int num_splits, float* scratch, cudaStream_t stream) {
  switch (decode_chunk_heads(p.group)) {
    case 1: launch_split<T, D, 1>(p, num_splits, scratch, stream); break;
    case 2: launch_split<T, D, 2>(p, num_splits, scratch, stream); break;
    case 4: launch_split<T, D, 4>(p, num_splits, scratch, stream); break;
    default: launch_split<T, D, 8>(p, num_splits, scratch, stream); break;
  }
}

template <typename T>
void launch_type(const Params& p, int num_splits, float* scratch, cudaStream_t stream) {
  if (p.head_dim == 64)
    launch_dim<T, 64>(p, num_splits, scratch, stream);
  else
    launch_dim<T, 128>(p, num_splits, scratch, stream);
}

}  // namespace

// Caller guarantees head_dim is 64 or 128 and both caches are 16-byte aligned.
void launch_decode(const Params& p, bool is_bf16, int num_splits, float* scratch,
                   cudaStream_t stream) {
  if (is_bf16)
    launch_type<__nv_bfloat16>(p, num_splits, scratch, stream);
  else
    launch_type<float>(p, num_splits, scratch, stream);
}

}  // namespace attention
}  // namespace engine_cuda
