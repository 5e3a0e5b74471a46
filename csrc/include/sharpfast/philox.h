// Philox4x32-10 counter-based RNG and the transforms sharpfast uses, shared by the CPU loops
// and the CUDA kernels. The contract is sharpfast/philox.py (the pure-PyTorch twin):
//
//   key     = (seed mod 2^32, seed >> 32)                  seed: 64-bit unsigned
//   counter = (block mod 2^32, block >> 32, sample, stream) block = element / 4
//   element e takes word e % 4 of philox4x32_10(counter, key)
//
//   uniform(-1, 1): ((x >> 8) - 2^23) * 2^-23  (exact in float32)
//   rademacher:     +1 if the top bit of x is 0, else -1
//   normal:         Box-Muller in double on the word pairs (0, 1), (2, 3):
//                   u1 = (x_a + 1) 2^-32, theta = (2 pi 2^-32) x_b, r = sqrt(-2 log u1),
//                   lane a = r cos(theta), lane b = r sin(theta)
//
// The double-precision log and sincos below are branch-free polynomials (the angle is reduced
// exactly in integers), so CPU loops vectorize and CPU/CUDA share one implementation; they agree
// with the twin's libm-based values to a few 1e-15 absolute (tests: 1e-12 relative + 1e-14).
// Note: fp64-heavy; on GPUs with a low fp64 rate the normal sampler is compute-bound.
//
// Header-only, no torch, usable from host and device code.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SF_HOST_DEVICE inline
#endif

namespace sharpfast {

enum class Dist : int { normal = 0, uniform = 1, rademacher = 2 };

struct Words4 {
  uint32_t v[4];
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

SF_HOST_DEVICE void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

// Philox4x32 with 10 rounds (Salmon et al., SC 2011; Random123 known-answer vectors).
SF_HOST_DEVICE Words4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                    uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(c0, kPhiloxM0, hi0, lo0);
    mulhilo32(c2, kPhiloxM1, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  Words4 w;
  w.v[0] = c0;
  w.v[1] = c1;
  w.v[2] = c2;
  w.v[3] = c3;
  return w;
}

// The four words of philox block `block` for (seed, stream, sample).
SF_HOST_DEVICE Words4 philox_block(uint64_t seed, uint32_t stream, uint32_t sample, uint64_t block) {
  return philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), sample, stream,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

SF_HOST_DEVICE float uniform_pm1(uint32_t x) {
  // (x >> 8) has 24 bits; minus 2^23 fits int32 exactly, times 2^-23 is exact in float.
  return static_cast<float>(static_cast<int32_t>(x >> 8) - (1 << 23)) * 1.1920928955078125e-07f;
}

SF_HOST_DEVICE float rademacher(uint32_t x) { return 1.0f - 2.0f * static_cast<float>(x >> 31); }  // branch-free

SF_HOST_DEVICE uint64_t bits_of(double x) {
  uint64_t b;
  memcpy(&b, &x, sizeof(b));
  return b;
}
SF_HOST_DEVICE double double_of(uint64_t b) {
  double x;
  memcpy(&x, &b, sizeof(x));
  return x;
}

// sin and cos of 2 pi x / 2^32 for a 32-bit word x. The reduction is exact in integers
// (nearest quadrant q, remainder r in [-2^29, 2^29)), then Taylor polynomials on |a| <= pi/4
// (truncation < 1e-19) and a quadrant rotation; no branches, no libm. Differs from libm's
// sin/cos of the rounded double angle by a few 1e-16 (the angle's own rounding).
SF_HOST_DEVICE void sincos_2pi_u32(uint32_t x, double& s_out, double& c_out) {
  const uint32_t q = (x + 0x20000000u) >> 30;
  const int32_t r = static_cast<int32_t>(x - (q << 30));
  const double a = static_cast<double>(r) * 1.4629180792671596e-09;  // 2 pi / 2^32
  const double a2 = a * a;
  const double sp =
      a + a * a2 * (-1.6666666666666666e-01 +
                    a2 * (8.3333333333333332e-03 +
                          a2 * (-1.9841269841269841e-04 +
                                a2 * (2.7557319223985893e-06 +
                                      a2 * (-2.5052108385441720e-08 +
                                            a2 * (1.6059043836821613e-10 +
                                                  a2 * (-7.6471637318198164e-13 + a2 * 2.8114572543455206e-15)))))));
  const double cp =
      1.0 + a2 * (-0.5 +
                  a2 * (4.1666666666666664e-02 +
                        a2 * (-1.3888888888888889e-03 +
                              a2 * (2.4801587301587302e-05 +
                                    a2 * (-2.7557319223985888e-07 +
                                          a2 * (2.0876756987868100e-09 +
                                                a2 * (-1.1470745597729725e-11 +
                                                      a2 * (4.7794773323873853e-14 - a2 * 1.5619206968586225e-16))))))));
  // quadrant rotation with bit masks (no selects, so the CPU loop vectorizes)
  const uint64_t swap = 0ull - static_cast<uint64_t>(q & 1u);
  const uint64_t sb = bits_of(sp), cb = bits_of(cp);
  const uint64_t sr = (sb & ~swap) | (cb & swap);
  const uint64_t cr = (cb & ~swap) | (sb & swap);
  s_out = double_of(sr ^ (static_cast<uint64_t>((q >> 1) & 1u) << 63));
  c_out = double_of(cr ^ (static_cast<uint64_t>(((q + 1u) >> 1) & 1u) << 63));
}

// Natural log of a positive normal double, branch-free (vectorizes on the CPU):
// u = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s), s = (m - 1) / (m + 1),
// |s| <= 0.172, series to s^23 (truncation < 1e-18 relative); e ln 2 in two parts. Accurate to a
// few ulp, also near u = 1 (m - 1 is exact there).
SF_HOST_DEVICE double log_positive(double u) {
  const uint64_t bits = bits_of(u);
  const uint64_t mant = bits & 0x000FFFFFFFFFFFFFull;
  const uint64_t big = static_cast<uint64_t>(mant > 0x6A09E667F3BCDull);  // m > sqrt(2)  (integer ops only)
  const double m = double_of((mant | 0x3FF0000000000000ull) - (big << 52));                        // exact
  const double e = double_of(((bits >> 52) + big) | 0x4330000000000000ull) - (4503599627370496.0 + 1023.0);
  const double s = (m - 1.0) / (m + 1.0);
  const double s2 = s * s;
  const double p =
      s2 * (6.6666666666666663e-01 +
            s2 * (4.0000000000000002e-01 +
                  s2 * (2.8571428571428570e-01 +
                        s2 * (2.2222222222222221e-01 +
                              s2 * (1.8181818181818182e-01 +
                                    s2 * (1.5384615384615385e-01 +
                                          s2 * (1.3333333333333333e-01 +
                                                s2 * (1.1764705882352941e-01 +
                                                      s2 * (1.0526315789473684e-01 +
                                                            s2 * (9.5238095238095233e-02 +
                                                                  s2 * 8.6956521739130432e-02))))))))));
  const double log_m = 2.0 * s + s * p;
  return e * 6.9314670562744141e-01 + (e * 4.7493250390316726e-07 + log_m);  // ln 2 = hi + lo
}

// Box-Muller on one word pair: a gets the cosine lane, b the sine lane.
SF_HOST_DEVICE void box_muller(uint32_t xa, uint32_t xb, double& a, double& b) {
  // (double)xa via a signed conversion (vectorizable; exact): xa = (xa ^ 2^31 as int32) + 2^31
  const double xad = static_cast<double>(static_cast<int32_t>(xa ^ 0x80000000u)) + 2147483648.0;
  const double u1 = (xad + 1.0) * 2.3283064365386963e-10;  // 2^-32, in (0, 1]
  const double r = sqrt(-2.0 * log_positive(u1));
  double s, c;
  sincos_2pi_u32(xb, s, c);
  a = r * c;
  b = r * s;
}

// The four draws of one block, as T (float or double). Normal draws are computed in double
// and rounded once to T; uniform and Rademacher draws are exact in float.
template <typename T>
SF_HOST_DEVICE void draws4(Dist dist, const Words4& w, T out[4]) {
  if (dist == Dist::uniform) {
    for (int k = 0; k < 4; ++k) out[k] = static_cast<T>(uniform_pm1(w.v[k]));
  } else if (dist == Dist::rademacher) {
    for (int k = 0; k < 4; ++k) out[k] = static_cast<T>(rademacher(w.v[k]));
  } else {
    double a, b, c, d;
    box_muller(w.v[0], w.v[1], a, b);
    box_muller(w.v[2], w.v[3], c, d);
    out[0] = static_cast<T>(a);
    out[1] = static_cast<T>(b);
    out[2] = static_cast<T>(c);
    out[3] = static_cast<T>(d);
  }
}

}  // namespace sharpfast
