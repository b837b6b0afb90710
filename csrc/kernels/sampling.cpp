// sample: one token per row of logits, with temperature, top-k, top-p and min-p,
// drawn from each sequence's own SplitMix64 generator. Reproduces
// ops.reference.sample: the same probabilities (double, numpy's pairwise sum for
// the softmax denominator), the same candidate order (descending probability, ties
// to the lower id), the same filters and the same inverse-CDF draw.
//
// Speed: only the part of the descending order that a row needs is ever sorted.
// The kept set is narrowed with nth_element (top_k, min_p) and sorted in growing
// chunks while the top_p walk or the draw moves down it, so a peaked distribution
// over a 150k vocab sorts tens of ids, not 150k.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "engine/check.h"
#include "engine/ops.h"

namespace engine {
namespace {

// ============================================================================
// Generator
// ============================================================================

// One SplitMix64 step: advances state, returns 64 random bits.
inline uint64_t splitmix64(uint64_t& state) {
  state += 0x9E3779B97F4A7C15ull;
  uint64_t z = state;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// A double in [0, 1) from the top 53 bits.
inline double uniform(uint64_t bits) { return static_cast<double>(bits >> 11) * 0x1.0p-53; }

// ============================================================================
// Softmax pieces that must match numpy bit for bit
// ============================================================================

// numpy's pairwise summation (umath loops: 8 accumulators below 128 elements,
// halves at multiples of 8 above), which np.sum uses for a contiguous float64 row.
double pairwise_sum(const double* a, int64_t n) {
  if (n < 8) {
    double res = 0.0;
    for (int64_t i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    int64_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  int64_t n2 = n / 2;
  n2 -= n2 % 8;
  return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

// prob[i] = softmax(row / temperature)[i], as reference.kept_candidates computes it.
void softmax_f64(const float* row, int64_t vocab, double temperature, double* prob) {
  double x_max = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < vocab; ++i) {
    prob[i] = static_cast<double>(row[i]) / temperature;
    x_max = std::max(x_max, prob[i]);
  }
  for (int64_t i = 0; i < vocab; ++i) prob[i] = std::exp(prob[i] - x_max);
  const double sum = pairwise_sum(prob, vocab);
  for (int64_t i = 0; i < vocab; ++i) prob[i] /= sum;
}

// ============================================================================
// One sampled row
// ============================================================================

struct RowParams {
  double temperature, top_p, min_p, u;
  int64_t top_k;
};

// Kept sets up to this size are sorted whole, which makes the kept mass the exact
// sequential sum the reference takes. Above it (no top_p, loose top_k / min_p) the
// unsorted tail's mass is summed in id order: it differs from the reference's by
// rounding only (~1e-13), so a different token needs u within that of a boundary.
constexpr int64_t kFullSortMax = 1 << 13;

// The descending order, revealed lazily: idx[0, num_sorted) is sorted, and
// idx[0, size) always holds the top-`size` ids as a set.
class Order {
 public:
  Order(const double* prob, int32_t* idx, int64_t size) : prob_(prob), idx_(idx), size_(size) {}

  bool before(int32_t a, int32_t b) const {
    return prob_[a] > prob_[b] || (prob_[a] == prob_[b] && a < b);
  }
  // Narrows the set to its top n (n <= size).
  void keep_top(int64_t n) {
    if (n >= size_) return;
    if (n > num_sorted_) {  // else the sorted prefix already starts with the top n
      auto cmp = [this](int32_t a, int32_t b) { return before(a, b); };
      std::nth_element(idx_ + num_sorted_, idx_ + n, idx_ + size_, cmp);
    }
    size_ = n;
    num_sorted_ = std::min(num_sorted_, n);
  }
  // Makes idx[0, n) sorted (n <= size).
  void sort_prefix(int64_t n) {
    if (n <= num_sorted_) return;
    auto cmp = [this](int32_t a, int32_t b) { return before(a, b); };
    if (n < size_) std::nth_element(idx_ + num_sorted_, idx_ + n, idx_ + size_, cmp);
    std::sort(idx_ + num_sorted_, idx_ + n, cmp);
    num_sorted_ = n;
  }
  // The j-th id in descending order, sorting the next chunk when j reaches it.
  int32_t at(int64_t j) {
    if (j >= num_sorted_) sort_prefix(std::min(size_, std::max<int64_t>(2 * num_sorted_, 64)));
    return idx_[j];
  }
  int64_t size() const { return size_; }
  int64_t num_sorted() const { return num_sorted_; }
  int32_t raw(int64_t j) const { return idx_[j]; }
  int32_t* data() { return idx_; }

 private:
  const double* prob_;
  int32_t* idx_;
  int64_t size_;
  int64_t num_sorted_ = 0;
};

int32_t sample_row(const float* row, int64_t vocab, const RowParams& rp) {
  thread_local std::vector<double> prob_buf;
  thread_local std::vector<int32_t> idx_buf;
  prob_buf.resize(static_cast<size_t>(vocab));
  idx_buf.resize(static_cast<size_t>(vocab));
  double* prob = prob_buf.data();
  softmax_f64(row, vocab, rp.temperature, prob);
  std::iota(idx_buf.begin(), idx_buf.end(), 0);
  Order order(prob, idx_buf.data(), vocab);

  // top_k: the set of the k most probable.
  if (rp.top_k > 0) order.keep_top(std::min(rp.top_k, vocab));

  // min_p: those with p >= min_p * p_max are a prefix of the order; at least one stays.
  if (rp.min_p > 0.0) {
    const double p_max = prob[order.at(0)];
    const double threshold = rp.min_p * p_max;
    int32_t* begin = order.data();
    const int64_t num_above =
        std::partition(begin, begin + order.size(), [&](int32_t i) { return prob[i] >= threshold; }) -
        begin;
    // partition moved ids: forget the sorted prefix, then re-sort the top one.
    Order narrowed(prob, begin, order.size());
    narrowed.keep_top(std::max<int64_t>(1, num_above));
    order = narrowed;
  }

  // top_p: the shortest prefix whose cumulative probability reaches top_p (within
  // the set so far; with min_p that is min(top_p prefix, min_p count), as in the reference).
  if (rp.top_p < 1.0) {
    double cum = 0.0;
    for (int64_t j = 0; j < order.size(); ++j) {
      cum += prob[order.at(j)];
      if (cum >= rp.top_p) {
        order.keep_top(j + 1);
        break;
      }
    }
  }

  // Draw: the first kept id whose cumulative probability exceeds u * kept mass.
  const int64_t num_kept = order.size();
  if (num_kept <= kFullSortMax) order.sort_prefix(num_kept);
  double mass = 0.0;
  for (int64_t j = 0; j < num_kept; ++j) mass += prob[order.raw(j)];
  const double target = rp.u * mass;
  double cum = 0.0;
  for (int64_t j = 0; j < num_kept; ++j) {
    const int32_t id = order.at(j);
    cum += prob[id];
    if (cum > target) return id;
  }
  return order.at(num_kept - 1);
}

// argmax with the lowest index on ties (the row holds no NaN: checked first). Two passes
// that vectorise, the maximum and then its first index, instead of one whose every step
// waits on the last (16 rows of 49152 greedy, with the checks: 0.75 -> 0.33 ms, 2 threads).
int32_t greedy_row(const float* row, int64_t vocab) {
  float m = row[0];
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < vocab; ++i) m = row[i] > m ? row[i] : m;
  constexpr int64_t kStep = 64;
  int64_t i = 0;
  for (; i + kStep <= vocab; i += kStep) {
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t l = 0; l < kStep; ++l) hit |= row[i + l] == m;
    if (hit) break;
  }
  for (; i < vocab; ++i)
    if (row[i] == m) return static_cast<int32_t>(i);
  return 0;  // unreachable: m is one of the row's values
}

// ============================================================================
// Validation
// ============================================================================

void check_per_row(const TensorView& t, const char* arg, DType dtype, int64_t num_seqs) {
  check_dtype(t, "sample", arg, {dtype});
  check_shape(t, "sample", arg, {num_seqs});
}

// Why row i cannot be sampled, or "" if it can. NaN anywhere is an error; a row
// that is sampled (temperature > 0) also needs finite logits below +inf and at
// least one above -inf, else its softmax is undefined.
std::string row_problem(const float* row, int64_t vocab, float temperature, float top_p,
                        float min_p) {
  if (std::isnan(temperature)) return "temperature is NaN";
  if (std::isnan(top_p)) return "top_p is NaN";
  if (std::isnan(min_p)) return "min_p is NaN";
  bool any_finite = false;
  for (int64_t i = 0; i < vocab; ++i) {
    if (std::isnan(row[i])) return "logits contain NaN";
    if (temperature > 0.0f && row[i] == std::numeric_limits<float>::infinity())
      return "logits contain +inf (temperature > 0 needs finite logits)";
    any_finite |= std::isfinite(row[i]);
  }
  if (temperature > 0.0f && !any_finite) return "logits are all -inf";
  return "";
}

// Without an early exit, so that the loop vectorises (a row is almost always fine).
bool row_ok(const float* row, int64_t vocab, float temperature, float top_p, float min_p) {
  if (std::isnan(temperature) || std::isnan(top_p) || std::isnan(min_p)) return false;
  const bool sampled = temperature > 0.0f;
  const float inf = std::numeric_limits<float>::infinity();
  int bad = 0, any_finite = 0;
  for (int64_t i = 0; i < vocab; ++i) {
    const float v = row[i];
    bad |= (v != v) | (sampled & (v == inf));  // NaN, or +inf where sampled
    any_finite |= (v - v) == 0.0f;             // finite: v - v is NaN for +-inf and NaN
  }
  return !bad && (!sampled || any_finite);
}

}  // namespace

// ============================================================================
// Launcher
// ============================================================================

void sample(const TensorView& logits, const TensorView& temperature, const TensorView& top_k,
            const TensorView& top_p, const TensorView& min_p, const TensorView& rng_state,
            const TensorView& out) {
  const char* op = "sample";
  check_dtype(logits, op, "logits", {DType::f32});
  check_ndim(logits, op, "logits", 2);
  check_nonempty_row_contiguous(logits, op, "logits");
  const int64_t num_seqs = logits.size(0), vocab = logits.size(1);
  ENGINE_CHECK(
      vocab > 0 && vocab <= std::numeric_limits<int32_t>::max(), op,
      "logits must have between 1 and 2^31 - 1 columns (the vocab), got " + logits.describe());
  check_per_row(temperature, "temperature", DType::f32, num_seqs);
  check_per_row(top_k, "top_k", DType::i32, num_seqs);
  check_per_row(top_p, "top_p", DType::f32, num_seqs);
  check_per_row(min_p, "min_p", DType::f32, num_seqs);
  check_per_row(rng_state, "rng_state", DType::u64, num_seqs);
  check_per_row(out, "out", DType::i32, num_seqs);

  const float* lp = logits.ptr<float>();
  const int64_t ls = logits.stride(0);
  const float* temp = temperature.ptr<float>();
  const int32_t* tk = top_k.ptr<int32_t>();
  const float* tp = top_p.ptr<float>();
  const float* mp = min_p.ptr<float>();
  uint64_t* rng = rng_state.ptr<uint64_t>();
  int32_t* op_out = out.ptr<int32_t>();
  const int64_t ts = temperature.stride(0), ks = top_k.stride(0), ps = top_p.stride(0);
  const int64_t ms = min_p.stride(0), rs = rng_state.stride(0), os = out.stride(0);

  // Every row is checked before any generator advances or any token is written.
  int64_t first_bad = num_seqs;
#pragma omp parallel for schedule(static) reduction(min : first_bad) \
    if (num_seqs * vocab >= (1 << 16))
  for (int64_t i = 0; i < num_seqs; ++i)
    if (!row_ok(lp + i * ls, vocab, temp[i * ts], tp[i * ps], mp[i * ms]))
      first_bad = std::min(first_bad, i);
  if (first_bad < num_seqs) {
    const int64_t i = first_bad;
    fail(op, "row " + std::to_string(i) + ": " +
                 row_problem(lp + i * ls, vocab, temp[i * ts], tp[i * ps], mp[i * ms]));
  }

#pragma omp parallel for schedule(dynamic, 1) if (num_seqs > 1 && num_seqs * vocab >= (1 << 15))
  for (int64_t i = 0; i < num_seqs; ++i) {
    uint64_t state = rng[i * rs];
    const uint64_t bits = splitmix64(state);
    rng[i * rs] = state;
    const float* row = lp + i * ls;
    if (temp[i * ts] <= 0.0f) {
      op_out[i * os] = greedy_row(row, vocab);
      continue;
    }
    RowParams rp;
    rp.temperature = temp[i * ts];
    rp.top_k = tk[i * ks];
    rp.top_p = tp[i * ps];
    rp.min_p = mp[i * ms];
    rp.u = uniform(bits);
    op_out[i * os] = sample_row(row, vocab, rp);
  }
}

}  // namespace engine
