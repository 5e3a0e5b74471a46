// What the CPU implementations of sharpfast's ops share: the loop constants, the dtype dispatch,
// the SIMD clones and the scale of an element (a buffer, |w0| + eta by the shared rule, or 1).
// Elementwise ops depend on nothing but the element, so any thread split gives the same bits;
// reductions use fixed chunks (kReduceChunk elements) whose partial sums are combined in
// chunk order, so they too are identical for every thread count.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../ops_common.h"
#include "sharpfast/elementwise.h"

namespace sharpfast {
namespace cpu {

inline constexpr int64_t kGrain = 32768;        // elements per parallel task (elementwise)
inline constexpr int64_t kTile = 512;           // elements whose draws are generated together
inline constexpr int64_t kReduceChunk = 16384;  // elements per partial sum (reductions)

#define SF_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// The reduction loops are branch-free, so they vectorize; on x86-64 with GCC an AVX2 clone is
// picked at load time where the CPU has it (no FMA in either clone, so both give the same bits).
// The sampling loops choose their instruction set themselves (isa.h).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SF_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SF_CPU_CLONES
#endif

// Where an op's scale c comes from: the buffer, |w0| + eta, or 1 (see ScaleRule). A template
// argument, so that every loop below vectorizes with its scale inlined.
enum class ScaleMode { buffer, abs_eta, one };

// f(std::integral_constant<ScaleMode, M>{}) for the mode of this scale (a buffer c, or the rule).
template <typename F>
void with_scale_mode(const void* c, const ScaleRule& rule, F&& f) {
  using M = ScaleMode;
  if (c != nullptr) return f(std::integral_constant<M, M::buffer>{});
  if (rule.adaptive) return f(std::integral_constant<M, M::abs_eta>{});
  return f(std::integral_constant<M, M::one>{});
}

// The storage round trip of the derived-scale rule (elementwise.h): to dtype S and back.
template <typename S>
struct CpuRoundTrip {
  template <typename A>
  static A apply(A x) {
    return static_cast<A>(static_cast<S>(x));
  }
};

template <typename S>
at::opmath_type<S> eta_of(const ScaleRule& rule) {
  return sharpfast::rounded_eta<CpuRoundTrip<S>, at::opmath_type<S>>(rule.eta);
}

// c_i in the compute type: from the buffer, or derived from w_i by the shared rule.
template <ScaleMode M, typename S, typename A>
inline A scale_of(const S* c, int64_t i, A w, A eta) {
  if constexpr (M == ScaleMode::buffer) {
    return static_cast<A>(c[i]);
  } else if constexpr (M == ScaleMode::abs_eta) {
    return derived_scale_rounded<CpuRoundTrip<S>, A>(w, eta, true);
  } else {
    return A(1);
  }
}

template <ScaleMode M, typename S, typename A>
void fill_scales_as(const S* __restrict__ c, const S* __restrict__ w, A eta, int64_t m, A* __restrict__ out) {
  for (int64_t j = 0; j < m; ++j) out[j] = scale_of<M, S, A>(c, j, static_cast<A>(w[j]), eta);
}

// c of m elements in the compute type (the sampling and reduction ops gather a tile's scales first).
template <typename S, typename A>
void fill_scales(const S* c, const S* w, const ScaleRule& rule, int64_t m, A* out) {
  const A eta = eta_of<S>(rule);
  with_scale_mode(c, rule, [&](auto mode) { fill_scales_as<decltype(mode)::value>(c, w, eta, m, out); });
}

inline double read_scalar(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? *t.data_ptr<double>() : static_cast<double>(*t.data_ptr<float>());
}

}  // namespace cpu
}  // namespace sharpfast
