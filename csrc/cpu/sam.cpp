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
        const scalar_t* __restrict__ g = grad[ch.piece].data_ptr<scalar_t>() + ch.begin;
        const scalar_t* __restrict__ x = w[ch.piece].data_ptr<scalar_t>() + ch.begin;
        double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t j = 0;
        for (; j + 8 <= ch.n; j += 8)
          for (int u = 0; u < 8; ++u) {
            const A t = derived_scale_rounded<CpuRoundTrip<scalar_t>, A>(static_cast<A>(x[j + u]), e, adaptive);
            const double v = static_cast<double>(t * static_cast<A>(g[j + u]));
            acc[u] += v * v;
          }
        for (; j < ch.n; ++j) {
          const A t = derived_scale_rounded<CpuRoundTrip<scalar_t>, A>(static_cast<A>(x[j]), e, adaptive);
          const double v = static_cast<double>(t * static_cast<A>(g[j]));
          acc[0] += v * v;
        }
        partial[static_cast<size_t>(k)] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
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
        scalar_t* __restrict__ x = w[ch.piece].data_ptr<scalar_t>() + ch.begin;
        scalar_t* __restrict__ keep = saved[ch.piece].data_ptr<scalar_t>() + ch.begin;
        const scalar_t* __restrict__ g = grad[ch.piece].data_ptr<scalar_t>() + ch.begin;
        for (int64_t j = 0; j < ch.n; ++j) {
          const scalar_t wj = x[j];
          keep[j] = wj;
          const A t = derived_scale_rounded<CpuRoundTrip<scalar_t>, A>(static_cast<A>(wj), e, adaptive);
          x[j] = static_cast<scalar_t>(sam_ascent<A>(static_cast<A>(wj), static_cast<A>(g[j]), t, sa));
        }
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
