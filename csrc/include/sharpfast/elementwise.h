// Per-element formulas of sharpfast's fused ops, shared by the CPU loops and the CUDA
// kernels. `T` is the compute type: float for fp32/fp16/bf16 buffers, double for fp64.
// A coordinate with scale c = 0 is frozen: never perturbed, never divided by.
#pragma once
#include "sharpfast/philox.h"

namespace sharpfast {

// Where the per-coordinate scale c comes from when no c buffer is passed: derived from w0 in
// the kernels, as the reference builds it (`w.abs() + eta` in the buffer's dtype, eta itself
// rounded to that dtype first as torch does, when adaptive; else 1). Saves a parameter-sized
// buffer and its reads for the common definitions; custom and weights-only scales still come
// as a buffer.
struct ScaleRule {
  bool adaptive;
  double eta;
};

// The unrounded derived scale in the compute type (see derived_scale_rounded).
template <typename T>
SF_HOST_DEVICE T derived_scale(T w0, T eta, bool adaptive) {
  return adaptive ? (w0 < T(0) ? -w0 : w0) + eta : T(1);
}

// The derived-scale rule bit for bit as the reference builds c (`w.abs() + eta` in the buffer's
// dtype): eta is rounded to the dtype first, as torch rounds a scalar operand, and the sum is
// rounded to the dtype. `RoundTrip::apply(x)` rounds a compute-type value to the storage dtype
// and back (the CPU and CUDA backends convert half types with different intrinsics).
template <typename RoundTrip, typename T>
SF_HOST_DEVICE T rounded_eta(double eta) {
  return RoundTrip::apply(static_cast<T>(eta));
}

template <typename RoundTrip, typename T>
SF_HOST_DEVICE T derived_scale_rounded(T w0, T eta_rounded, bool adaptive) {
  return adaptive ? RoundTrip::apply(derived_scale<T>(w0, eta_rounded, true)) : T(1);
}

// Perturbation: w0 + (rho * c) * xi, rho already carrying the antithetic sign.
// Same association as the reference (`w + (sign * rho) * c * xi`).
template <typename T>
SF_HOST_DEVICE T perturb(T w0, T c, T rho, T xi) {
  return w0 + (rho * c) * xi;
}

// torch.sign semantics: sign(0) = 0.
template <typename T>
SF_HOST_DEVICE T sign_of(T g) {
  return static_cast<T>((g > T(0)) - (g < T(0)));
}

// linf ascent and projection: clamp(delta + step * sign(g) * c, -rho c, rho c).
template <typename T>
SF_HOST_DEVICE T linf_ascent_clamp(T delta, T g, T c, T step, T rho) {
  const T z = delta + step * sign_of(g) * c;
  const T bound = rho * c;
  // min then max, written in the operand order that maps to minps/maxps (branch-free, vectorizes)
  const T hi = z < bound ? z : bound;
  return hi > -bound ? hi : -bound;
}

// l2 ascent: delta + grad_scale * g * c  (grad_scale = step / (||g|| + 1e-12)).
template <typename T>
SF_HOST_DEVICE T l2_ascent(T delta, T g, T c, T grad_scale) {
  return delta + grad_scale * g * c;
}

// Ellipsoid shrink z / (1 + 2 lam / c^2) written as z c^2 / (c^2 + 2 lam): 0 where c = 0,
// exactly z where lam = 0 and c != 0.
// Selects, not branches, so CPU loops vectorize (the discarded quotient may be 0/0 there).
template <typename T>
SF_HOST_DEVICE T ellipsoid_shrink(T z, T c, T lam) {
  const T c2 = c * c;
  const T shrunk = z * c2 / (c2 + T(2) * lam);
  const T r = lam == T(0) ? z : shrunk;
  return c == T(0) ? T(0) : r;
}

// One term of ||shrink(z, lam) / c||^2: (z c / (c^2 + 2 lam))^2, 0 where c = 0.
SF_HOST_DEVICE double ellipsoid_term(double z, double c, double lam) {
  if (c == 0.0) return 0.0;
  const double q = z * c / (c * c + 2.0 * lam);
  return q * q;
}

// APGD momentum: alpha * z + (1 - alpha) * delta_prev.
template <typename T>
SF_HOST_DEVICE T momentum_mix(T z, T delta_prev, T alpha) {
  return alpha * z + (T(1) - alpha) * delta_prev;
}

// One APGD element update, as both backends apply it: z = the ascent projected onto the
// constraint (linf: clamp to the box; l2: the ellipsoid shrink with multiplier s2), then the
// momentum mix with delta_prev. s1 is the step size (linf) or the gradient scale
// step / ||g|| (l2). Returns delta's new value; the parameter becomes w0 + that.
template <typename T, bool L2>
SF_HOST_DEVICE T apgd_update(T delta, T delta_prev, T g, T c, T s1, T s2, T rho, T alpha) {
  T z;
  if (L2) {
    z = ellipsoid_shrink<T>(l2_ascent<T>(delta, g, c, s1), c, s2);
  } else {
    z = linf_ascent_clamp<T>(delta, g, c, s1, rho);
  }
  return momentum_mix<T>(z, delta_prev, alpha);
}

}  // namespace sharpfast
