// Bytes a kernel asks the memory system for while it computes: what the op after it reads.
//
// A one-token decode step streams every weight once and is bound by memory bandwidth, yet
// some of its ops (attention over cached positions, once those are in cache) leave the
// memory idle while they compute, and attention itself waits on its KV lines. So the
// quantised one-token matmul before attention requests the KV blocks attention will read,
// and attention requests the weights of the matmul after it: each moves bytes the next op
// would otherwise wait for in time the memory had spare. (1B Q4_0 decode on an AMD EPYC, 2
// threads, one process switching the requests on and off: 0.964-0.994x the step time.) A
// hint only: results never depend on it.
#pragma once

#include <cstdint>

namespace engine {

// Byte ranges, at most kMaxRanges, requested in order.
struct Prefetch {
  static constexpr int kMaxRanges = 16;
  const char* begin[kMaxRanges] = {};
  int64_t bytes[kMaxRanges] = {};
  int count = 0;
};

// Share `part` of `parts` of a Prefetch: the same fraction of each range (so that a thread
// asks for the K and the V of the same positions), requested a few 64-byte lines at a time
// into L2 (prefetcht1 on x86). A request never faults, whatever the address.
class PrefetchCursor {
 public:
  PrefetchCursor() = default;
  PrefetchCursor(const Prefetch& p, int64_t part, int64_t parts)
      : p_(&p), part_(part), parts_(parts) {
    for (int i = 0; i < p.count; ++i)
      left_ += (p.bytes[i] * (part + 1) / parts - p.bytes[i] * part / parts + 63) / 64;
    start(0);
  }

  int64_t lines_left() const { return left_; }

  // The next `lines` lines of the share (fewer where it ends).
  void request(int64_t lines) {
    for (; lines > 0 && left_ > 0; --lines, --left_) {
      __builtin_prefetch(at_, 0, 2);
      at_ += 64;
      if (at_ >= end_) start(range_ + 1);
    }
  }

 private:
  void start(int range) {  // at the share of the first non-empty range from `range` on
    for (range_ = range; range_ < p_->count; ++range_) {
      const char* b = p_->begin[range_];
      at_ = b + p_->bytes[range_] * part_ / parts_;
      end_ = b + p_->bytes[range_] * (part_ + 1) / parts_;
      if (at_ < end_) return;
    }
    left_ = 0;
  }

  const Prefetch* p_ = nullptr;
  int64_t part_ = 0, parts_ = 1, left_ = 0;
  int range_ = 0;
  const char* at_ = nullptr;
  const char* end_ = nullptr;
};

}  // namespace engine
