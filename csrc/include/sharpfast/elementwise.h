// Per-element formulas of sharpfast's fused ops, shared by the CPU loops and the CUDA
// kernels. `T` is the compute type: float for fp32/fp16/bf16 buffers, double for fp64.
// A coordinate with scale c = 0 is frozen: never perturbed, never divided by.
#pragma once
#include <math.h>

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

// ---- The scaled solver: APGD in u = delta / c, where the constraint is a plain ball (l2) or
// box (linf). A frozen coordinate (c = 0) has c g = 0 and u = u_prev = 0, so it stays at 0.

// clamp(x, -rho, rho), min then max as linf_ascent_clamp writes it.
template <typename T>
SF_HOST_DEVICE T clamp_to_box(T x, T rho) {
  const T hi = x < rho ? x : rho;
  return hi > -rho ? hi : -rho;
}

// linf: z = clamp(u + step * sign(c g)), u' = clamp(u + alpha (z - u) + (1 - alpha) (u - u_prev))
// (the reference's association: ((u + alpha (z - u)) + (1 - alpha) (u - u_prev))).
template <typename T>
SF_HOST_DEVICE T scaled_linf_update(T u, T u_prev, T g, T c, T step, T rho, T alpha) {
  const T z = clamp_to_box<T>(u + step * sign_of<T>(c * g), rho);
  return clamp_to_box<T>(u + alpha * (z - u) + (T(1) - alpha) * (u - u_prev), rho);
}

// l2: both of the step's projections are rescalings, so the step is linear in u, c g and u_prev:
// u' = a u + b (c g) + e u_prev, with (a, b, e) from their inner products (scaled_l2_coefficients).
template <typename T>
SF_HOST_DEVICE T scaled_l2_update(T u, T u_prev, T g, T c, T a, T b, T e) {
  return (a * u + b * (c * g)) + e * u_prev;
}

// The four APGD steps. The published ones update delta; the scaled ones update u.
enum class Step : int { linf, l2, scaled_linf, scaled_l2 };

// One APGD element update, as every backend applies it. x / x_prev: delta (published) or u
// (scaled). Scalars: published linf s1 = step; published l2 s1 = step / ||g||, s2 = the ellipsoid
// multiplier (z = the ascent projected onto the ellipsoid, then the momentum mix with delta_prev);
// scaled linf s1 = step; scaled l2 (s1, s2, s3) = (a, b, e). Returns x's new value.
template <typename T, Step K>
SF_HOST_DEVICE T step_update(T x, T x_prev, T g, T c, T s1, T s2, T s3, T rho, T alpha) {
  if constexpr (K == Step::linf) {
    return momentum_mix<T>(linf_ascent_clamp<T>(x, g, c, s1, rho), x_prev, alpha);
  } else if constexpr (K == Step::l2) {
    return momentum_mix<T>(ellipsoid_shrink<T>(l2_ascent<T>(x, g, c, s1), c, s2), x_prev, alpha);
  } else if constexpr (K == Step::scaled_linf) {
    return scaled_linf_update<T>(x, x_prev, g, c, s1, rho, alpha);
  } else {
    return scaled_l2_update<T>(x, x_prev, g, c, s1, s2, s3);
  }
}

// The perturbation a state value stands for: delta itself, or c u. The parameter is w0 + that.
template <typename T, Step K>
SF_HOST_DEVICE T perturbation_of(T x, T c) {
  if constexpr (K == Step::scaled_linf || K == Step::scaled_l2) {
    return c * x;
  } else {
    return x;
  }
}

// The inner products the scaled l2 step needs, and ||delta||^2 (scaled_gram's entries, in order).
enum GramEntry : int { kUU, kUP, kPP, kUG, kPG, kGG, kDD, kGramEntries };

struct ScaledL2Coefficients {
  double a, b, e;
};

// The scaled l2 step from the inner products of u, u_prev and c g (double, GramEntry order).
// With d = c g / (||c g|| + 1e-12): z = f1 (u + step d), f1 = min(1, rho / ||u + step d||);
// v = u + alpha (z - u) + (1 - alpha) (u - u_prev) = A u + B d - E u_prev; u' = f2 v,
// f2 = min(1, rho / ||v||). Both norms follow from the inner products, so u' = a u + b (c g) + e u_prev.
SF_HOST_DEVICE ScaledL2Coefficients scaled_l2_coefficients(const double* gram, double step, double rho,
                                                            double alpha) {
  const double gn = sqrt(gram[kGG]) + 1e-12;
  const double ud = gram[kUG] / gn, pd = gram[kPG] / gn, dd = gram[kGG] / (gn * gn);
  double zz = gram[kUU] + 2.0 * step * ud + step * step * dd;
  zz = zz > 0.0 ? zz : 0.0;   // rounding can take a sum of squares below 0
  const double f1 = zz > rho * rho ? rho / sqrt(zz) : 1.0;
  const double A = 2.0 * (1.0 - alpha) + alpha * f1, B = alpha * f1 * step, E = 1.0 - alpha;
  double vv = A * A * gram[kUU] + B * B * dd + E * E * gram[kPP] + 2.0 * A * B * ud - 2.0 * A * E * gram[kUP] -
              2.0 * B * E * pd;
  vv = vv > 0.0 ? vv : 0.0;
  const double f2 = vv > rho * rho ? rho / sqrt(vv) : 1.0;
  return {f2 * A, f2 * B / gn, -f2 * E};
}

// SAM's ascent (sharpfast.optim): w + T^2 g s in the public code's operation order ((T T) g) s,
// with T the tensor's scale (|w| + eta where it is scaled, else 1) and s = rho / (||T g|| + eps).
template <typename T>
SF_HOST_DEVICE T sam_ascent(T w, T g, T scale, T s) {
  return w + ((scale * scale) * g) * s;
}

}  // namespace sharpfast
