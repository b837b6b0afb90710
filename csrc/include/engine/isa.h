// Run-time instruction-set selection. Launchers ask current_isa() and call the
// matching kernel variant; variants exist only in files compiled for that ISA.
#pragma once

namespace engine {

enum class Isa : int { portable = 0, avx2 = 1, avx512 = 2 };

Isa current_isa();

}  // namespace engine
