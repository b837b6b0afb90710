// TEMPORARY during development: removed when the real kernel file lands.
#include <stdexcept>
#include "engine/ops.h"
namespace engine {
void rms_norm(const TensorView&, const TensorView&, double, const TensorView&) { throw std::runtime_error("not implemented yet"); }
void fused_add_rms_norm(const TensorView&, const TensorView&, const TensorView&, double) { throw std::runtime_error("not implemented yet"); }
void rope(const TensorView&, const TensorView&, const TensorView&, const TensorView&, int64_t) { throw std::runtime_error("not implemented yet"); }
void silu_and_mul(const TensorView&, const TensorView&) { throw std::runtime_error("not implemented yet"); }
void embedding(const TensorView&, const TensorView&, const TensorView&) { throw std::runtime_error("not implemented yet"); }
void sample(const TensorView&, const TensorView&, const TensorView&, const TensorView&, const TensorView&, const TensorView&, const TensorView&) { throw std::runtime_error("not implemented yet"); }
}
