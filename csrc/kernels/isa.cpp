// Detects the CPU's instruction sets once and holds the one in use.
#include "engine/isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "engine/ops.h"

namespace engine {
namespace {

bool cpu_has(Isa isa) {
#if defined(ENGINE_X86) && (defined(__GNUC__) || defined(__clang__))
  switch (isa) {
    case Isa::portable: return true;
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             cpu_has(Isa::avx2);
  }
  return false;
#else
  return isa == Isa::portable;
#endif
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "portable";
  }
}

Isa parse_isa(const std::string& name) {
  if (name == "avx512") return Isa::avx512;
  if (name == "avx2") return Isa::avx2;
  if (name == "portable") return Isa::portable;
  throw std::invalid_argument("set_isa: unknown instruction set '" + name +
                              "', expected avx512, avx2 or portable");
}

Isa detect_best() {
  if (cpu_has(Isa::avx512)) return Isa::avx512;
  if (cpu_has(Isa::avx2)) return Isa::avx2;
  return Isa::portable;
}

Isa initial_isa() {
  Isa best = detect_best();
  const char* env = std::getenv("ENGINE_ISA");
  if (env == nullptr || *env == '\0') return best;
  Isa wanted = parse_isa(env);
  return cpu_has(wanted) ? wanted : best;
}

std::atomic<int> g_isa{static_cast<int>(initial_isa())};

}  // namespace

Isa current_isa() { return static_cast<Isa>(g_isa.load(std::memory_order_relaxed)); }

std::string isa() { return isa_name(current_isa()); }

std::string best_isa() { return isa_name(detect_best()); }

void set_isa(const std::string& name) {
  Isa wanted = parse_isa(name);
  if (!cpu_has(wanted))
    throw std::invalid_argument("set_isa: this CPU does not support " + name +
                                " (best available: " + best_isa() + ")");
  g_isa.store(static_cast<int>(wanted), std::memory_order_relaxed);
}

}  // namespace engine
