// paged_attention internals shared by the launcher (attention.cu) and its two kernels:
// split-KV decode (attention_decode.cu) and tiled prefill (attention_prefill.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace engine_cuda {
namespace attention {

// Everything a kernel needs, passed by value. Shapes and strides in elements.
struct Params {
  const float* q;                 // [num_tokens, num_q_heads, head_dim], last stride 1
  int64_t q_stride0, q_stride1;
  const void* k_cache;            // [num_blocks, block_size, num_kv_heads, head_dim] f32/bf16
  const void* v_cache;            // [num_blocks, block_size, num_kv_heads, head_dim] f32/bf16
  const int32_t* block_tables;    // [num_seqs, max_blocks]
  int64_t bt_stride0, bt_stride1;
  const int32_t* seq_lens;        // [num_seqs]
  int64_t seq_lens_stride;
  const int32_t* query_start_loc; // [num_seqs + 1]
  int64_t qsl_stride;
  float* out;                     // [num_tokens, num_q_heads, head_dim], last stride 1
  int64_t out_stride0, out_stride1;
  int64_t num_blocks;
  int num_tokens, num_seqs, num_q_heads, num_kv_heads, group, head_dim, block_size, max_blocks;
  float scale_log2;               // scale * log2(e): scores live in the exp2 domain
  int partition_size;             // decode: KV positions per split (a power of 2, 64..512)
};

// One sequence's rows and lengths, every device value clamped so that nothing read
// through them goes out of bounds: new tokens [start, start + num_new) within
// [0, num_tokens), seq_len within the block table. context_len = seq_len - num_new is
// the position of the first new token (negative only for inconsistent inputs, whose
// early rows then see no keys and come out as zeros).
struct SeqInfo {
  int start, num_new, seq_len, context_len;
};

__device__ __forceinline__ int clamp_int(int x, int lo, int hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

__device__ __forceinline__ SeqInfo seq_info(const Params& p, int s) {
  SeqInfo info;
  const int start = clamp_int(p.query_start_loc[(int64_t)s * p.qsl_stride], 0, p.num_tokens);
  const int end = clamp_int(p.query_start_loc[(int64_t)(s + 1) * p.qsl_stride], 0, p.num_tokens);
  info.start = start;
  info.num_new = end > start ? end - start : 0;
  info.seq_len = clamp_int(p.seq_lens[(int64_t)s * p.seq_lens_stride], 0,
                           p.max_blocks * p.block_size);
  info.context_len = info.seq_len - info.num_new;
  return info;
}

// Physical block of position pos (< seq_len) of sequence s, or -1 when the table's entry
// is outside the cache (such positions are skipped, as if masked).
__device__ __forceinline__ int64_t physical_block(const Params& p, int s, int block_idx) {
  const int64_t id =
      p.block_tables[(int64_t)s * p.bt_stride0 + (int64_t)block_idx * p.bt_stride1];
  return id >= 0 && id < p.num_blocks ? id : -1;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Query heads one decode CTA handles (its template GMAX): the group, rounded up to
// 1, 2, 4 or 8; a larger group is cut into chunks of 8.
inline int decode_chunk_heads(int group) {
  return group <= 1 ? 1 : (group <= 2 ? 2 : (group <= 4 ? 4 : 8));
}

// Launchers of the two kernels (arguments already checked).
// scratch: num_tokens * num_q_heads * num_splits * (head_dim + 2) floats, or null when
// num_splits == 1.
void launch_decode(const Params& p, bool is_bf16, int num_splits, float* scratch,
                   cudaStream_t stream);
void launch_prefill(const Params& p, bool is_bf16, cudaStream_t stream);

}  // namespace attention
}  // namespace engine_cuda
