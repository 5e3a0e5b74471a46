// CPU sampling ops: Philox draws, perturbed copies of the weights (one row, K rows, or the
// pieces of a model's parameter tensors), generated tile by tile straight into the output.
#include "cpu_common.h"
#include "isa.h"
#include "philox_x86.h"

namespace sharpfast {
namespace cpu {
namespace {

// The 4 * blocks words of philox blocks first_block, first_block + 1, ... with the active
// instruction set (isa.h; the same words on every one).
void philox_words(uint64_t seed, uint32_t rng_stream, uint32_t sample, uint64_t first_block, int64_t blocks,
                  uint32_t* __restrict__ w) {
#ifdef SF_HAVE_X86_PHILOX
  switch (active_isa()) {
    case Isa::avx512: return philox_words_avx512(seed, rng_stream, sample, first_block, blocks, w);
    case Isa::avx2: return philox_words_avx2(seed, rng_stream, sample, first_block, blocks, w);
    default: break;
  }
#endif
  philox_words_scalar(seed, rng_stream, sample, first_block, blocks, w);
}

// Box-Muller over `pairs` word pairs (w[2p], w[2p + 1]) -> (z[2p], z[2p + 1]): one loop, which the
// compiler vectorizes for each instruction set (philox.h's log and sincos are branch-free).
#define SF_BOX_MULLER_LOOP \
  for (int64_t p = 0; p < pairs; ++p) box_muller(w[2 * p], w[2 * p + 1], z[2 * p], z[2 * p + 1]);
void box_muller_scalar(const uint32_t* __restrict__ w, double* __restrict__ z, int64_t pairs) { SF_BOX_MULLER_LOOP }
#ifdef SF_HAVE_X86_PHILOX
SF_TARGET_AVX2 void box_muller_avx2(const uint32_t* __restrict__ w, double* __restrict__ z, int64_t pairs) {
  SF_BOX_MULLER_LOOP
}
SF_TARGET_AVX512 void box_muller_avx512(const uint32_t* __restrict__ w, double* __restrict__ z, int64_t pairs) {
  SF_BOX_MULLER_LOOP
}
#endif

// uniform(-1, 1) or Rademacher draws of n words, as T: one loop per instruction set as well.
#define SF_WORDS_LOOP                                                                    \
  if (dist == Dist::uniform) {                                                           \
    for (int64_t i = 0; i < n; ++i) xi[i] = static_cast<T>(uniform_pm1(w[i]));           \
  } else {                                                                               \
    for (int64_t i = 0; i < n; ++i) xi[i] = static_cast<T>(rademacher(w[i]));            \
  }
template <typename T>
void words_scalar(Dist dist, const uint32_t* __restrict__ w, int64_t n, T* __restrict__ xi) { SF_WORDS_LOOP }
#ifdef SF_HAVE_X86_PHILOX
template <typename T>
SF_TARGET_AVX2 void words_avx2(Dist dist, const uint32_t* __restrict__ w, int64_t n, T* __restrict__ xi) {
  SF_WORDS_LOOP
}
template <typename T>
SF_TARGET_AVX512 void words_avx512(Dist dist, const uint32_t* __restrict__ w, int64_t n, T* __restrict__ xi) {
  SF_WORDS_LOOP
}
#endif

template <typename T>
void words_to_draws(Dist dist, const uint32_t* __restrict__ w, int64_t n, T* __restrict__ xi) {
#ifdef SF_HAVE_X86_PHILOX
  switch (active_isa()) {
    case Isa::avx512: return words_avx512<T>(dist, w, n, xi);
    case Isa::avx2: return words_avx2<T>(dist, w, n, xi);
    default: break;
  }
#endif
  words_scalar<T>(dist, w, n, xi);
}

void box_muller_pairs(const uint32_t* __restrict__ w, double* __restrict__ z, int64_t pairs) {
#ifdef SF_HAVE_X86_PHILOX
  switch (active_isa()) {
    case Isa::avx512: return box_muller_avx512(w, z, pairs);
    case Isa::avx2: return box_muller_avx2(w, z, pairs);
    default: break;
  }
#endif
  box_muller_scalar(w, z, pairs);
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
  } else {
    words_to_draws<T>(dist, wl, n, xi);
  }
}

void draw_cpu(at::Tensor& out, int64_t seed, int64_t rng_stream, int64_t sample, int64_t offset,
              c10::string_view distribution) {
  const SampleCall call = check_draw(out, seed, rng_stream, sample, offset, distribution);
  const Counter& k = call.k;
  const Dist dist = call.dist;
  const int64_t n = out.numel();
  if (n == 0) return;
  active_isa();   // chosen here, outside the parallel loop (a bad SHARPFAST_CPU_ISA raises here)
  SF_DISPATCH(out.scalar_type(), "sharpfast::draw_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, (n + kTile - 1) / kTile, std::max<int64_t>(1, kGrain / kTile), [&](int64_t t0, int64_t t1) {
      acc_t xi[kTile];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t * kTile, m = std::min(kTile, n - b);
        if constexpr (std::is_same_v<scalar_t, acc_t>) {   // float, double: straight into the output
          fill_draws<acc_t>(dist, k, k.sample, k.offset + b, m, reinterpret_cast<acc_t*>(o + b));
        } else {
          fill_draws<acc_t>(dist, k, k.sample, k.offset + b, m, xi);
          for (int64_t j = 0; j < m; ++j) o[b + j] = static_cast<scalar_t>(xi[j]);
        }
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
  active_isa();   // chosen here, outside the parallel loop (a bad SHARPFAST_CPU_ISA raises here)
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

}  // namespace
}  // namespace cpu
}  // namespace sharpfast

TORCH_LIBRARY_IMPL(sharpfast, CPU, m) {
  using namespace sharpfast::cpu;
  m.impl("draw_", &draw_cpu);
  m.impl("perturb_", &perturb_cpu);
  m.impl("perturb_batched_", &perturb_batched_cpu);
  m.impl("perturb_tensors_", &perturb_tensors_cpu);
}
