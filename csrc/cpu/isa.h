// Which vector instructions the CPU sampling loops use: the widest the CPU has (AVX-512, AVX2,
// or the baseline "scalar" loop, which the compiler still vectorizes to SSE2), or the one
// SHARPFAST_CPU_ISA names at the first draw, or the one set_isa sets (tests force each). Every
// choice gives the same bits: the loops are integer and IEEE double arithmetic without FMA.
#pragma once
#include <string>
#include <vector>

namespace sharpfast {
namespace cpu {

enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2 };

const char* isa_name(Isa isa);
std::vector<Isa> supported_isas();         // scalar first, the widest last
Isa active_isa();                          // read on every tile: one relaxed atomic load
void set_isa(const std::string& name);     // std::invalid_argument: unknown, or not on this CPU

}  // namespace cpu
}  // namespace sharpfast
