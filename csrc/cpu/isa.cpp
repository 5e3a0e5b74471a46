// The CPU sampling loops' instruction set (isa.h).
#include "isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace sharpfast {
namespace cpu {
namespace {

std::atomic<int> g_isa{-1};   // -1: not chosen yet

bool cpu_has(Isa isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  switch (isa) {
    case Isa::scalar: return true;
    case Isa::avx2: return __builtin_cpu_supports("avx2");
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  }
  return false;
#else
  return isa == Isa::scalar;
#endif
}

Isa parse(const std::string& name) {
  for (Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512})
    if (name == isa_name(isa)) {
      if (!cpu_has(isa)) throw std::invalid_argument("sharpfast: this CPU has no " + name + " instructions");
      return isa;
    }
  throw std::invalid_argument("sharpfast: unknown CPU instruction set '" + name + "'; expected scalar, avx2 or avx512");
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    default: return "scalar";
  }
}

std::vector<Isa> supported_isas() {
  std::vector<Isa> out;
  for (Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512})
    if (cpu_has(isa)) out.push_back(isa);
  return out;
}

Isa active_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    const char* env = std::getenv("SHARPFAST_CPU_ISA");
    isa = static_cast<int>(env && *env ? parse(env) : supported_isas().back());
    g_isa.store(isa, std::memory_order_relaxed);
  }
  return static_cast<Isa>(isa);
}

void set_isa(const std::string& name) { g_isa.store(static_cast<int>(parse(name)), std::memory_order_relaxed); }

}  // namespace cpu
}  // namespace sharpfast
