// Internal to rope and rope_kv_cache_write: a validated rope call, token by token.
#pragma once

#include <cstdint>

#include "engine/check.h"
#include "engine/tensor.h"

namespace engine {

// Rotates num_heads heads of one token (rope.cpp: the ISA's copy).
using RopeHeadsFn = void (*)(float* head, int64_t num_heads, int64_t head_stride,
                             const float* cos_sin, int64_t half);

struct RopeCall {
  int64_t num_tokens = 0;
  RopeHeads q, k;
  float *q_data = nullptr, *k_data = nullptr;
  const int32_t* pos = nullptr;
  int64_t pos_stride = 0;
  const float* cache = nullptr;
  int64_t cache_stride = 0, half = 0;
  RopeHeadsFn heads_fn = nullptr;

  // Rotates token t's q and k heads in place.
  void token(int64_t t) const {
    const float* cs = cache + pos[t * pos_stride] * cache_stride;
    heads_fn(q_data + t * q.token_stride, q.num_heads, q.head_stride, cs, half);
    heads_fn(k_data + t * k.token_stride, k.num_heads, k.head_stride, cs, half);
  }
};

// Checks rope's arguments (every position included; errors name `op`) and picks the kernel.
RopeCall prepare_rope(const TensorView& positions, const TensorView& q, const TensorView& k,
                      const TensorView& cos_sin_cache, int64_t head_dim, const char* op);

}  // namespace engine
