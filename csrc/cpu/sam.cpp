// CPU loops of SAM's op family (sharpfast.optim) over a parameter list: the scaled gradient's
// squared norm (fixed chunks summed in order: the same bits for any thread count) and the
// save-and-perturb pass (elementwise.h sam_ascent).
#include "cpu_common.h"
#include <ATen/ops/zeros.h>

namespace sharpfast {
namespace cpu {
namespace {

// A range [begin, begin + n) of tensor `piece`: the unit of parallel work over a tensor list.
struct Chunk {
  size_t piece;
  int64_t begin, n;
};

std::vector<Chunk> chunks_of(at::TensorList w, int64_t size) {
  std::vector<Chunk> out;
  for (size_t p = 0; p < w.size(); ++p)
    for (int64_t b = 0; b < w[p].numel(); b += size) out.push_back({p, b, std::min(size, w[p].numel() - b)});
  return out;
}

// One chunk's sum of (T g)^2 with 8 interleaved float64 accumulators, T by the rule (hoisted out
// of the loop, so each branch vectorizes). Inlined into AVX2-cloned functions for float and double.
template <typename S, typename A>
__attribute__((always_inline)) inline double sq_norm_body(const S* __restrict__ g, const S* __restrict__ w, int64_t n,
                                                          bool adaptive, A eta) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  auto term = [&](int64_t j) {
    const A t = derived_scale_rounded<CpuRoundTrip<S>, A>(static_cast<A>(w[j]), eta, adaptive);
    const double v = static_cast<double>(t * static_cast<A>(g[j]));
    return v * v;
  };
  int64_t j = 0;
  if (adaptive) {
    for (; j + 8 <= n; j += 8)
      for (int u = 0; u < 8; ++u) acc[u] += term(j + u);
  } else {
    for (; j + 8 <= n; j += 8)
      for (int u = 0; u < 8; ++u) {
        const double v = static_cast<double>(static_cast<A>(g[j + u]));
        acc[u] += v * v;
      }
  }
  for (; j < n; ++j) acc[0] += term(j);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// saved = w; w = w + ((T T) g) s over one chunk.
template <typename S, typename A>
__attribute__((always_inline)) inline void perturb_body(S* __restrict__ w, S* __restrict__ saved,
                                                        const S* __restrict__ g, int64_t n, bool adaptive, A eta, A s) {
  if (adaptive) {
    for (int64_t j = 0; j < n; ++j) {
      const S wj = w[j];
      saved[j] = wj;
      const A t = derived_scale_rounded<CpuRoundTrip<S>, A>(static_cast<A>(wj), eta, true);
      w[j] = static_cast<S>(sam_ascent<A>(static_cast<A>(wj), static_cast<A>(g[j]), t, s));
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const S wj = w[j];
      saved[j] = wj;
      w[j] = static_cast<S>(sam_ascent<A>(static_cast<A>(wj), static_cast<A>(g[j]), A(1), s));
    }
  }
}

// fp16 / bf16 (computed in float): the portable loops.
template <typename S, typename A>
double sq_norm_chunk(const S* g, const S* w, int64_t n, bool adaptive, A eta) {
  return sq_norm_body<S, A>(g, w, n, adaptive, eta);
}
SF_CPU_CLONES double sq_norm_chunk(const float* g, const float* w, int64_t n, bool adaptive, float eta) {
  return sq_norm_body<float, float>(g, w, n, adaptive, eta);
}
SF_CPU_CLONES double sq_norm_chunk(const double* g, const double* w, int64_t n, bool adaptive, double eta) {
  return sq_norm_body<double, double>(g, w, n, adaptive, eta);
}

template <typename S, typename A>
void perturb_chunk(S* w, S* saved, const S* g, int64_t n, bool adaptive, A eta, A s) {
  perturb_body<S, A>(w, saved, g, n, adaptive, eta, s);
}
SF_CPU_CLONES void perturb_chunk(float* w, float* saved, const float* g, int64_t n, bool adaptive, float eta, float s) {
  perturb_body<float, float>(w, saved, g, n, adaptive, eta, s);
}
SF_CPU_CLONES void perturb_chunk(double* w, double* saved, const double* g, int64_t n, bool adaptive, double eta,
                                 double s) {
  perturb_body<double, double>(w, saved, g, n, adaptive, eta, s);
}

at::Tensor sam_sq_norm_cpu(at::TensorList grad, at::TensorList w, bool adaptive, double eta) {
  check_sam(w, nullptr, grad, eta, "sam_sq_norm");
  at::Tensor out = at::zeros({}, at::TensorOptions().dtype(at::kDouble));
  if (w.empty()) return out;
  const std::vector<Chunk> chunks = chunks_of(w, kReduceChunk);
  std::vector<double> partial(chunks.size(), 0.0);
  const ScaleRule rule{adaptive, eta};
  SF_DISPATCH(w[0].scalar_type(), "sharpfast::sam_sq_norm", [&] {
    using A = at::opmath_type<scalar_t>;
    const A e = eta_of<scalar_t>(rule);
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
      for (int64_t k = c0; k < c1; ++k) {
        const Chunk& ch = chunks[static_cast<size_t>(k)];
        partial[static_cast<size_t>(k)] = sq_norm_chunk(grad[ch.piece].data_ptr<scalar_t>() + ch.begin,
                                                        w[ch.piece].data_ptr<scalar_t>() + ch.begin, ch.n, adaptive, e);
      }
    });
  });
  double total = 0.0;
  for (double v : partial) total += v;
  *out.data_ptr<double>() = total;
  return out;
}

void sam_perturb_cpu(at::TensorList w, at::TensorList saved, at::TensorList grad, bool adaptive, double eta,
                     const at::Tensor& s) {
  check_sam(w, &saved, grad, eta, "sam_perturb_");
  if (w.empty()) return;
  check_scalar(s, "s", w[0].device(), false);
  const double sd = read_scalar(s);
  const std::vector<Chunk> chunks = chunks_of(w, kGrain);
  const ScaleRule rule{adaptive, eta};
  SF_DISPATCH(w[0].scalar_type(), "sharpfast::sam_perturb_", [&] {
    using A = at::opmath_type<scalar_t>;
    const A e = eta_of<scalar_t>(rule);
    const A sa = static_cast<A>(sd);
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
      for (int64_t k = c0; k < c1; ++k) {
        const Chunk& ch = chunks[static_cast<size_t>(k)];
        perturb_chunk(w[ch.piece].data_ptr<scalar_t>() + ch.begin, saved[ch.piece].data_ptr<scalar_t>() + ch.begin,
                      grad[ch.piece].data_ptr<scalar_t>() + ch.begin, ch.n, adaptive, e, sa);
      }
    });
  });
}

}  // namespace
}  // namespace cpu
}  // namespace sharpfast

TORCH_LIBRARY_IMPL(sharpfast, CPU, m) {
  using namespace sharpfast::cpu;
  m.impl("sam_sq_norm", &sam_sq_norm_cpu);
  m.impl("sam_perturb_", &sam_perturb_cpu);
}
