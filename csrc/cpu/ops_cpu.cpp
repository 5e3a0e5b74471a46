// CPU implementations of sharpfast's ops: loops over flat buffers with at::parallel_for.
// Elementwise ops depend on nothing but the element, so any thread split gives the same bits;
// reductions use fixed chunks (kReduceChunk elements) whose partial sums are combined in
// chunk order, so they too are identical for every thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../ops_common.h"
#include "sharpfast/elementwise.h"

namespace sharpfast {
namespace cpu {
namespace {

constexpr int64_t kGrain = 32768;        // elements per parallel task (elementwise)
constexpr int64_t kTile = 512;           // elements whose draws are generated together
constexpr int64_t kReduceChunk = 16384;  // elements per partial sum (reductions)

#define SF_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// The sampling loops below are branch-free (see philox.h), so they vectorize; on x86-64 with
// GCC an AVX2 clone is picked at load time where the CPU has it (no FMA in either clone, so
// both give the same bits).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SF_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SF_CPU_CLONES
#endif

// The 4 * blocks words of philox blocks first_block, first_block + 1, ...
SF_CPU_CLONES void philox_words(uint64_t seed, uint32_t rng_stream, uint32_t sample, uint64_t first_block,
                                int64_t blocks, uint32_t* __restrict__ w) {
  for (int64_t b = 0; b < blocks; ++b) {
    const Words4 r = philox_block(seed, rng_stream, sample, first_block + static_cast<uint64_t>(b));
    w[4 * b] = r.v[0];
    w[4 * b + 1] = r.v[1];
    w[4 * b + 2] = r.v[2];
    w[4 * b + 3] = r.v[3];
  }
}

// Box-Muller over `pairs` word pairs (w[2p], w[2p + 1]) -> (z[2p], z[2p + 1]).
SF_CPU_CLONES void box_muller_pairs(const uint32_t* __restrict__ w, double* __restrict__ z, int64_t pairs) {
  for (int64_t p = 0; p < pairs; ++p) box_muller(w[2 * p], w[2 * p + 1], z[2 * p], z[2 * p + 1]);
}

// Draws of elements e0 .. e0 + n - 1 (global indices, n <= kTile) into xi[0 .. n - 1]: the
// words of every block the range touches, then the transform over the whole tile.
template <typename T>
void fill_draws(Dist dist, const Counter& k, uint32_t sample, uint64_t e0, int64_t n, T* xi) {
  constexpr int64_t kMaxWords = kTile + 8;
  uint32_t w[kMaxWords];
  const int64_t lane0 = static_cast<int64_t>(e0 & 3u);
  const int64_t blocks = (lane0 + n + 3) >> 2;
  philox_words(k.seed, k.rng_stream, sample, e0 >> 2, blocks, w);
  const uint32_t* __restrict__ wl = w + lane0;
  if (dist == Dist::normal) {
    double z[kMaxWords];
    box_muller_pairs(w, z, 2 * blocks);
    for (int64_t i = 0; i < n; ++i) xi[i] = static_cast<T>(z[lane0 + i]);
  } else if (dist == Dist::uniform) {
    for (int64_t i = 0; i < n; ++i) xi[i] = static_cast<T>(uniform_pm1(wl[i]));
  } else {
    for (int64_t i = 0; i < n; ++i) xi[i] = static_cast<T>(rademacher(wl[i]));
  }
}

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

template <typename S>
struct ApgdBuffers {
  S* p;
  S* d;
  S* dp;
  const S* g;
  const S* w;
  const S* c;  // nullptr: derived from w
  ApgdBuffers(at::Tensor& params, at::Tensor& delta, at::Tensor& delta_prev, const at::Tensor& grad,
              const at::Tensor& w0, const at::Tensor* cc)
      : p(params.data_ptr<S>()), d(delta.data_ptr<S>()), dp(delta_prev.data_ptr<S>()), g(grad.data_ptr<S>()),
        w(w0.data_ptr<S>()), c(scale_data<S>(cc)) {}
};

// One APGD step over m elements (a plain function with restrict pointers, so it vectorizes): the
// shared element update (elementwise.h apgd_update), history shift and parameter write.
template <typename S, bool L2, ScaleMode M>
void apgd_sub(S* __restrict__ p, S* __restrict__ d, S* __restrict__ dp, const S* __restrict__ g,
              const S* __restrict__ w, const S* __restrict__ c, int64_t m, at::opmath_type<S> eta,
              at::opmath_type<S> s1, at::opmath_type<S> s2, at::opmath_type<S> rho, at::opmath_type<S> alpha) {
  using A = at::opmath_type<S>;
  for (int64_t i = 0; i < m; ++i) {
    const A di = static_cast<A>(d[i]), gi = static_cast<A>(g[i]), wi = static_cast<A>(w[i]);
    const A ci = scale_of<M, S, A>(c, i, wi, eta);
    const A nw = apgd_update<A, L2>(di, static_cast<A>(dp[i]), gi, ci, s1, s2, rho, alpha);
    dp[i] = d[i];
    d[i] = static_cast<S>(nw);
    p[i] = static_cast<S>(wi + nw);
  }
}

template <typename S, bool L2>
void apgd_range(const ApgdBuffers<S>& buf, const ScaleRule& rule, int64_t b, int64_t e, at::opmath_type<S> s1,
                at::opmath_type<S> s2, at::opmath_type<S> rho, at::opmath_type<S> alpha) {
  const at::opmath_type<S> eta = eta_of<S>(rule);
  const S* c = buf.c ? buf.c + b : nullptr;
  with_scale_mode(c, rule, [&](auto mode) {
    apgd_sub<S, L2, decltype(mode)::value>(buf.p + b, buf.d + b, buf.dp + b, buf.g + b, buf.w + b, c, e - b, eta, s1,
                                           s2, rho, alpha);
  });
}

double read_scalar(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? *t.data_ptr<double>() : static_cast<double>(*t.data_ptr<float>());
}

void draw_cpu(at::Tensor& out, int64_t seed, int64_t rng_stream, int64_t sample, int64_t offset,
              c10::string_view distribution) {
  const SampleCall call = check_draw(out, seed, rng_stream, sample, offset, distribution);
  const Counter& k = call.k;
  const Dist dist = call.dist;
  const int64_t n = out.numel();
  if (n == 0) return;
  SF_DISPATCH(out.scalar_type(), "sharpfast::draw_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, (n + kTile - 1) / kTile, std::max<int64_t>(1, kGrain / kTile), [&](int64_t t0, int64_t t1) {
      acc_t xi[kTile];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t * kTile, m = std::min(kTile, n - b);
        fill_draws<acc_t>(dist, k, k.sample, k.offset + b, m, xi);
        for (int64_t j = 0; j < m; ++j) o[b + j] = static_cast<scalar_t>(xi[j]);
      }
    });
  });
}

// A piece of one coordinate space: n elements at global indices offset .. offset + n - 1, whose
// perturbed rows start at out (row r at out + r * n), read from w and the scale c (or derived).
template <typename S>
struct Segment {
  S* out;
  const S* w;
  const S* c;
  int64_t n;
  uint64_t offset;
};

// Rows of every segment: row r = w0 + sign_r * rho * c * xi(sample_r), tiles of all segments in
// one parallel loop. Antithetic pairs share their draws (generated once, written twice).
template <typename S>
void perturb_segments(const std::vector<Segment<S>>& segs, const ScaleRule& rule, double rho, const Counter& k,
                      int64_t n_samples, bool antithetic, Dist dist) {
  using acc_t = at::opmath_type<S>;
  std::vector<int64_t> first(segs.size() + 1, 0);  // first tile of each segment (per sample)
  for (size_t g = 0; g < segs.size(); ++g) first[g + 1] = first[g] + (segs[g].n + kTile - 1) / kTile;
  const int64_t tiles = first.back();
  if (tiles == 0 || n_samples == 0) return;
  const acc_t rp = static_cast<acc_t>(rho), rm = static_cast<acc_t>(-rho);
  const int64_t rows = antithetic ? 2 : 1;
  at::parallel_for(0, tiles * n_samples, std::max<int64_t>(1, kGrain / kTile), [&](int64_t t0, int64_t t1) {
    acc_t xi[kTile], cs[kTile];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = t / tiles, tile = t % tiles;
      const size_t g = static_cast<size_t>(std::upper_bound(first.begin(), first.end(), tile) - first.begin() - 1);
      const Segment<S>& seg = segs[g];
      const int64_t b = (tile - first[g]) * kTile, m = std::min(kTile, seg.n - b);
      fill_draws<acc_t>(dist, k, k.sample + static_cast<uint32_t>(s), seg.offset + b, m, xi);
      const S* __restrict__ w = seg.w + b;
      fill_scales<S>(seg.c ? seg.c + b : nullptr, w, rule, m, cs);
      for (int64_t r = 0; r < rows; ++r) {
        S* __restrict__ dst = seg.out + (s * rows + r) * seg.n + b;
        const acc_t rr = r ? rm : rp;
        for (int64_t j = 0; j < m; ++j)
          dst[j] = static_cast<S>(perturb<acc_t>(static_cast<acc_t>(w[j]), cs[j], rr, xi[j]));
      }
    }
  });
}

void perturb_rows(at::Tensor& out, const at::Tensor& w0, const SampleCall& call, double rho, bool antithetic) {
  SF_DISPATCH(w0.scalar_type(), "sharpfast::perturb_", [&] {
    const std::vector<Segment<scalar_t>> segs{{out.data_ptr<scalar_t>(), w0.data_ptr<scalar_t>(),
                                               scale_data<scalar_t>(call.c), w0.numel(), call.k.offset}};
    perturb_segments<scalar_t>(segs, call.rule, rho, call.k, call.n_samples, antithetic, call.dist);
  });
}

void perturb_cpu(at::Tensor& out, const at::Tensor& w0, const std::optional<at::Tensor>& c, bool adaptive, double eta,
                 double rho, int64_t seed, int64_t rng_stream, int64_t sample, int64_t offset,
                 c10::string_view distribution) {
  const SampleCall call = check_perturb(out, w0, c, adaptive, eta, seed, rng_stream, sample, offset, distribution);
  perturb_rows(out, w0, call, rho, false);
}

void perturb_batched_cpu(at::Tensor& out, const at::Tensor& w0, const std::optional<at::Tensor>& c, bool adaptive,
                         double eta, double rho, int64_t seed, int64_t rng_stream, int64_t first_sample, int64_t offset,
                         c10::string_view distribution, bool antithetic) {
  const SampleCall call = check_perturb_batched(out, w0, c, adaptive, eta, seed, rng_stream, first_sample, offset,
                                                distribution, antithetic);
  perturb_rows(out, w0, call, rho, antithetic);
}

void perturb_tensors_cpu(at::TensorList out, at::TensorList w0, at::TensorList c, bool adaptive, double eta,
                         double rho, int64_t seed, int64_t rng_stream, int64_t sample, at::IntArrayRef offsets,
                         c10::string_view distribution) {
  const Pieces pieces = check_pieces(out, w0, c, offsets, adaptive, eta, seed, rng_stream, sample, distribution);
  if (w0.empty()) return;
  SF_DISPATCH(w0[0].scalar_type(), "sharpfast::perturb_tensors_", [&] {
    std::vector<Segment<scalar_t>> segs;
    for (size_t p = 0; p < w0.size(); ++p)
      segs.push_back({out[p].data_ptr<scalar_t>(), w0[p].data_ptr<scalar_t>(), scale_data<scalar_t>(pieces.scales[p]),
                      w0[p].numel(), static_cast<uint64_t>(offsets[p])});
    perturb_segments<scalar_t>(segs, pieces.rule, rho, pieces.counter, 1, false, pieces.dist);
  });
}

void apgd_step_linf_cpu(at::Tensor& params, at::Tensor& delta, at::Tensor& delta_prev, const at::Tensor& grad,
                        const at::Tensor& w0, const std::optional<at::Tensor>& c, bool adaptive, double eta,
                        const at::Tensor& step_size, double rho, double momentum) {
  const StepCall call = check_apgd_linf(params, delta, delta_prev, grad, w0, c, adaptive, eta, step_size);
  const at::Tensor* cc = call.c;
  const ScaleRule rule = call.rule;
  const int64_t n = params.numel();
  if (n == 0) return;
  const double step = read_scalar(step_size);
  SF_DISPATCH(params.scalar_type(), "sharpfast::apgd_step_linf_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ApgdBuffers<scalar_t> buf(params, delta, delta_prev, grad, w0, cc);
    const acc_t st = static_cast<acc_t>(step), r = static_cast<acc_t>(rho), a = static_cast<acc_t>(momentum);
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      apgd_range<scalar_t, false>(buf, rule, b, e, st, acc_t(0), r, a);
    });
  });
}

void apgd_step_l2_cpu(at::Tensor& params, at::Tensor& delta, at::Tensor& delta_prev, const at::Tensor& grad,
                      const at::Tensor& w0, const std::optional<at::Tensor>& c, bool adaptive, double eta,
                      const at::Tensor& grad_scale, const at::Tensor& lam, double momentum) {
  const StepCall call = check_apgd_l2(params, delta, delta_prev, grad, w0, c, adaptive, eta, grad_scale, lam);
  const at::Tensor* cc = call.c;
  const ScaleRule rule = call.rule;
  const int64_t n = params.numel();
  if (n == 0) return;
  const double gs = read_scalar(grad_scale), lm = read_scalar(lam);
  SF_DISPATCH(params.scalar_type(), "sharpfast::apgd_step_l2_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ApgdBuffers<scalar_t> buf(params, delta, delta_prev, grad, w0, cc);
    const acc_t s = static_cast<acc_t>(gs), l = static_cast<acc_t>(lm), a = static_cast<acc_t>(momentum);
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      apgd_range<scalar_t, true>(buf, rule, b, e, s, l, acc_t(0), a);
    });
  });
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

void copy_if_cpu(at::Tensor& dst, const at::Tensor& src, const at::Tensor& cond) {
  check_copy_if(dst, src, cond);
  if (*cond.data_ptr<bool>()) dst.copy_(src);
}

}  // namespace
}  // namespace cpu
}  // namespace sharpfast

TORCH_LIBRARY_IMPL(sharpfast, CPU, m) {
  using namespace sharpfast::cpu;
  m.impl("draw_", &draw_cpu);
  m.impl("perturb_", &perturb_cpu);
  m.impl("perturb_batched_", &perturb_batched_cpu);
  m.impl("perturb_tensors_", &perturb_tensors_cpu);
  m.impl("apgd_step_linf_", &apgd_step_linf_cpu);
  m.impl("ellipsoid_sq_norms", &ellipsoid_sq_norms_cpu);
  m.impl("apgd_step_l2_", &apgd_step_l2_cpu);
  m.impl("copy_if_", &copy_if_cpu);
  m.impl("sum_squares", &sum_squares_cpu);
}
