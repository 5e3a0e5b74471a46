// CPU reductions: sum of squares and the ellipsoid projection's squared norms for many
// multipliers in one pass, in fixed chunks summed in order (the same bits for any thread count).
#include "cpu_common.h"
#include <ATen/ops/zeros.h>

#include <cstring>

namespace sharpfast {
namespace cpu {
namespace {

// Terms (zc / (c2 + 2 lam_l))^2 of one sub-tile (q8 a multiple of 8) added to acc[l * 8 + u]
// (8 interleaved accumulators per candidate). Candidates in pairs share one division 1/(A B):
// divisions bound this loop.
SF_CPU_CLONES void ellipsoid_tile(const double* __restrict__ zc, const double* __restrict__ c2, int64_t q8,
                                  const double* __restrict__ lam, int64_t L, double* __restrict__ acc) {
  int64_t l = 0;
  for (; l + 1 < L; l += 2) {
    const double t0 = 2.0 * lam[l], t1 = 2.0 * lam[l + 1];
    double s0[8] = {0, 0, 0, 0, 0, 0, 0, 0}, s1[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t j = 0; j < q8; j += 8)
      for (int u = 0; u < 8; ++u) {
        const double A = c2[j + u] + t0, B = c2[j + u] + t1;
        const double r = zc[j + u] / (A * B);
        const double v0 = r * B, v1 = r * A;
        s0[u] += v0 * v0;
        s1[u] += v1 * v1;
      }
    for (int u = 0; u < 8; ++u) {
      acc[l * 8 + u] += s0[u];
      acc[l * 8 + 8 + u] += s1[u];
    }
  }
  for (; l < L; ++l) {
    const double tl = 2.0 * lam[l];
    double s0[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t j = 0; j < q8; j += 8)
      for (int u = 0; u < 8; ++u) {
        const double v = zc[j + u] / (c2[j + u] + tl);
        s0[u] += v * v;
      }
    for (int u = 0; u < 8; ++u) acc[l * 8 + u] += s0[u];
  }
}

// The operands of ellipsoid_tile for one sub-tile: zc = z c and c2 = c^2 in double, with
// z = delta + s g c (c2 := 1 where c = 0, so that term is 0, never 0/0). Inlined into an
// AVX2-cloned function for float and double buffers: this prologue, not the divisions, was
// most of a pass's cost with few candidates.
template <typename S, typename A>
__attribute__((always_inline)) inline void ellipsoid_prep_body(const S* __restrict__ d, const S* __restrict__ g,
                                                               const A* __restrict__ c, A s, int64_t q,
                                                               double* __restrict__ zc, double* __restrict__ c2) {
  for (int64_t j = 0; j < q; ++j) {
    const A cj = c[j];
    const double z = static_cast<double>(l2_ascent<A>(static_cast<A>(d[j]), static_cast<A>(g[j]), cj, s));
    const double cd = static_cast<double>(cj);
    zc[j] = cd == 0.0 ? 0.0 : z * cd;
    c2[j] = cd == 0.0 ? 1.0 : cd * cd;
  }
}

// fp16 / bf16 buffers (computed in float): the portable loop.
template <typename S, typename A>
void ellipsoid_prep(const S* d, const S* g, const A* c, A s, int64_t q, double* zc, double* c2) {
  ellipsoid_prep_body<S, A>(d, g, c, s, q, zc, c2);
}

SF_CPU_CLONES void ellipsoid_prep(const float* __restrict__ d, const float* __restrict__ g, const float* __restrict__ c,
                                  float s, int64_t q, double* __restrict__ zc, double* __restrict__ c2) {
  ellipsoid_prep_body<float, float>(d, g, c, s, q, zc, c2);
}

SF_CPU_CLONES void ellipsoid_prep(const double* __restrict__ d, const double* __restrict__ g,
                                  const double* __restrict__ c, double s, int64_t q, double* __restrict__ zc,
                                  double* __restrict__ c2) {
  ellipsoid_prep_body<double, double>(d, g, c, s, q, zc, c2);
}

// sum_i f(i) over fixed chunks, each summed with 8 interleaved accumulators, chunks in order.
template <typename F>
void chunked_sums(int64_t n, int64_t L, double* result, const F& chunk_fn) {
  const int64_t chunks = (n + kReduceChunk - 1) / kReduceChunk;
  std::vector<double> partial(static_cast<size_t>(chunks * L), 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t b = ch * kReduceChunk;
      chunk_fn(b, std::min(kReduceChunk, n - b), partial.data() + ch * L);
    }
  });
  for (int64_t j = 0; j < L; ++j) {
    double s = 0.0;
    for (int64_t ch = 0; ch < chunks; ++ch) s += partial[ch * L + j];
    result[j] = s;
  }
}

at::Tensor sum_squares_cpu(const at::Tensor& x) {
  check_flat(x, "x");
  at::Tensor out = at::zeros({}, x.options().dtype(at::kDouble));
  const int64_t n = x.numel();
  if (n == 0) return out;
  SF_DISPATCH(x.scalar_type(), "sharpfast::sum_squares", [&] {
    const scalar_t* __restrict__ p = x.data_ptr<scalar_t>();
    chunked_sums(n, 1, out.data_ptr<double>(), [&](int64_t b, int64_t m, double* res) {
      double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t j = 0;
      for (; j + 8 <= m; j += 8)
        for (int u = 0; u < 8; ++u) {
          const double v = static_cast<double>(p[b + j + u]);
          acc[u] += v * v;
        }
      for (; j < m; ++j) {
        const double v = static_cast<double>(p[b + j]);
        acc[0] += v * v;
      }
      res[0] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    });
  });
  return out;
}

at::Tensor ellipsoid_sq_norms_cpu(const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& w0,
                               const std::optional<at::Tensor>& c, bool adaptive, double eta,
                               const at::Tensor& grad_scale, const at::Tensor& lambdas) {
  const StepCall call = check_ellipsoid_sq_norms(delta, grad, w0, c, adaptive, eta, grad_scale, lambdas);
  const at::Tensor* c_buf = call.c;
  const ScaleRule rule = call.rule;
  const int64_t L = lambdas.numel();
  at::Tensor out = at::zeros({L}, delta.options().dtype(at::kDouble));
  const int64_t n = delta.numel();
  if (n == 0 || L == 0) return out;
  const at::Tensor lam_c = lambdas.contiguous();
  const double* lam = lam_c.data_ptr<double>();
  const double gs = read_scalar(grad_scale);
  SF_DISPATCH(delta.scalar_type(), "sharpfast::ellipsoid_sq_norms", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* __restrict__ d = delta.data_ptr<scalar_t>();
    const scalar_t* __restrict__ g = grad.data_ptr<scalar_t>();
    const scalar_t* __restrict__ w = w0.data_ptr<scalar_t>();
    const scalar_t* cc = scale_data<scalar_t>(c_buf);
    const acc_t s = static_cast<acc_t>(gs);
    constexpr int64_t kSub = 256;
    chunked_sums(n, L, out.data_ptr<double>(), [&](int64_t b, int64_t m, double* res) {
      // Per sub-tile: zc = z c and c2 = c^2 (c2 := 1 where c = 0, so the term is 0, never 0/0),
      // then every candidate lambda over the sub-tile with 8 interleaved accumulators.
      double zc[kSub], c2[kSub];
      acc_t cs[kSub];
      std::vector<double> acc(static_cast<size_t>(L * 8), 0.0);
      for (int64_t t = 0; t < m; t += kSub) {
        const int64_t q = std::min(kSub, m - t);
        const int64_t i = b + t;
        fill_scales<scalar_t>(cc ? cc + i : nullptr, w + i, rule, q, cs);
        ellipsoid_prep(d + i, g + i, static_cast<const acc_t*>(cs), s, q, zc, c2);
        for (int64_t j = q; j < ((q + 7) / 8) * 8 && j < kSub; ++j) {
          zc[j] = 0.0;
          c2[j] = 1.0;
        }
        const int64_t q8 = ((q + 7) / 8) * 8;
        ellipsoid_tile(zc, c2, q8, lam, L, acc.data());
      }
      for (int64_t l = 0; l < L; ++l) {
        const double* a = acc.data() + l * 8;
        res[l] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
      }
    });
  });
  return out;
}

// One sub-tile of scaled_gram (q4 a multiple of 4, operands in double): every entry summed in 4
// lanes, acc[e * 4 + lane]. Written with GCC/Clang vector types (one register per entry): the
// auto-vectorizer interleaves seven accumulators badly (permutes and spills, 4 ns per element).
#if defined(__GNUC__)
typedef double Lanes4 __attribute__((vector_size(32)));
SF_CPU_CLONES void gram_tile(const double* __restrict__ x, const double* __restrict__ p, const double* __restrict__ g,
                             const double* __restrict__ d, int64_t q4, double* __restrict__ acc) {
  Lanes4 uu = {0, 0, 0, 0}, up = uu, pp = uu, ug = uu, pg = uu, gg = uu, dd = uu;
  for (int64_t j = 0; j < q4; j += 4) {
    Lanes4 xj, pj, gj, dj;
    std::memcpy(&xj, x + j, sizeof xj);
    std::memcpy(&pj, p + j, sizeof pj);
    std::memcpy(&gj, g + j, sizeof gj);
    std::memcpy(&dj, d + j, sizeof dj);
    uu += xj * xj;
    up += xj * pj;
    pp += pj * pj;
    ug += xj * gj;
    pg += pj * gj;
    gg += gj * gj;
    dd += dj * dj;
  }
  const Lanes4 sums[kGramEntries] = {uu, up, pp, ug, pg, gg, dd};
  for (int e = 0; e < kGramEntries; ++e)
    for (int l = 0; l < 4; ++l) acc[e * 4 + l] += sums[e][l];
}
#else
void gram_tile(const double* x, const double* p, const double* g, const double* d, int64_t q4, double* acc) {
  for (int64_t j = 0; j < q4; j += 4)
    for (int l = 0; l < 4; ++l) {
      const double xj = x[j + l], pj = p[j + l], gj = g[j + l], dj = d[j + l];
      const double terms[kGramEntries] = {xj * xj, xj * pj, pj * pj, xj * gj, pj * gj, gj * gj, dj * dj};
      for (int e = 0; e < kGramEntries; ++e) acc[e * 4 + l] += terms[e];
    }
}
#endif

// The operands of gram_tile for one sub-tile, widened to double: u, u_prev, c g and c u (the
// products in the compute type, as the step computes them). A function of restrict pointers,
// cloned for AVX2 for float and double buffers (as ellipsoid_prep: inside the op's lambdas the
// loop does not vectorize).
template <typename S, typename A>
__attribute__((always_inline)) inline void gram_prep_body(const S* __restrict__ xs, const S* __restrict__ ps,
                                                          const S* __restrict__ gs, const A* __restrict__ c, int64_t q,
                                                          double* __restrict__ x, double* __restrict__ p,
                                                          double* __restrict__ g, double* __restrict__ d) {
  for (int64_t j = 0; j < q; ++j) {
    const A ua = static_cast<A>(xs[j]);
    x[j] = static_cast<double>(ua);
    p[j] = static_cast<double>(static_cast<A>(ps[j]));
    g[j] = static_cast<double>(c[j] * static_cast<A>(gs[j]));
    d[j] = static_cast<double>(c[j] * ua);
  }
}

template <typename S, typename A>
void gram_prep(const S* xs, const S* ps, const S* gs, const A* c, int64_t q, double* x, double* p, double* g,
               double* d) {
  gram_prep_body<S, A>(xs, ps, gs, c, q, x, p, g, d);
}

SF_CPU_CLONES void gram_prep(const float* __restrict__ xs, const float* __restrict__ ps, const float* __restrict__ gs,
                             const float* __restrict__ c, int64_t q, double* __restrict__ x, double* __restrict__ p,
                             double* __restrict__ g, double* __restrict__ d) {
  gram_prep_body<float, float>(xs, ps, gs, c, q, x, p, g, d);
}

SF_CPU_CLONES void gram_prep(const double* __restrict__ xs, const double* __restrict__ ps,
                             const double* __restrict__ gs, const double* __restrict__ c, int64_t q,
                             double* __restrict__ x, double* __restrict__ p, double* __restrict__ g,
                             double* __restrict__ d) {
  gram_prep_body<double, double>(xs, ps, gs, c, q, x, p, g, d);
}

// The scaled solver's inner products (elementwise.h GramEntry) of u, u_prev and c g, and
// ||c u||^2, with c g and c u rounded to the compute type as the step computes them, summed in
// double. One pass over memory: per sub-tile the operands are widened to double, then summed.
at::Tensor scaled_gram_cpu(const at::Tensor& u, const at::Tensor& u_prev, const at::Tensor& grad, const at::Tensor& w0,
                           const std::optional<at::Tensor>& c, bool adaptive, double eta) {
  const StepCall call = check_scaled_gram(u, u_prev, grad, w0, c, adaptive, eta);
  at::Tensor out = at::zeros({kGramEntries}, u.options().dtype(at::kDouble));
  const int64_t n = u.numel();
  if (n == 0) return out;
  const ScaleRule rule = call.rule;
  SF_DISPATCH(u.scalar_type(), "sharpfast::scaled_gram", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* __restrict__ xs = u.data_ptr<scalar_t>();
    const scalar_t* __restrict__ ps = u_prev.data_ptr<scalar_t>();
    const scalar_t* __restrict__ gs = grad.data_ptr<scalar_t>();
    const scalar_t* __restrict__ w = w0.data_ptr<scalar_t>();
    const scalar_t* cc = scale_data<scalar_t>(call.c);
    constexpr int64_t kSub = 256;
    chunked_sums(n, kGramEntries, out.data_ptr<double>(), [&](int64_t b, int64_t m, double* res) {
      acc_t cs[kSub];
      double x[kSub], p[kSub], g[kSub], d[kSub];
      double acc[kGramEntries * 4] = {};
      for (int64_t t = 0; t < m; t += kSub) {
        const int64_t q = std::min(kSub, m - t);
        const int64_t i = b + t;
        fill_scales<scalar_t>(cc ? cc + i : nullptr, w + i, rule, q, cs);
        gram_prep(xs + i, ps + i, gs + i, static_cast<const acc_t*>(cs), q, x, p, g, d);
        const int64_t q4 = (q + 3) / 4 * 4;
        for (int64_t j = q; j < q4; ++j) x[j] = p[j] = g[j] = d[j] = 0.0;
        gram_tile(x, p, g, d, q4, acc);
      }
      for (int e = 0; e < kGramEntries; ++e) {
        const double* a = acc + e * 4;
        res[e] = (a[0] + a[1]) + (a[2] + a[3]);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace sharpfast

TORCH_LIBRARY_IMPL(sharpfast, CPU, m) {
  using namespace sharpfast::cpu;
  m.impl("sum_squares", &sum_squares_cpu);
  m.impl("scaled_gram", &scaled_gram_cpu);
  m.impl("ellipsoid_sq_norms", &ellipsoid_sq_norms_cpu);
}
