// CUDA sampling kernels: Philox draws and perturbed rows written straight into the output.
#include "common.cuh"

namespace sharpfast {
namespace cuda {

namespace {

template <typename A>
__device__ __forceinline__ void block_draws(Dist dist, uint64_t seed, uint32_t stream, uint32_t sample,
                                            uint64_t block, A xi[4]) {
  draws4<A>(dist, philox_block(seed, stream, sample, block), xi);
}

// One thread per (philox block, sample). Rows: `rows_per_sample` (1, or 2 for antithetic
// pairs with signs +1, -1). DRAW_ONLY writes xi, otherwise w0 + sign * rho * c * xi.
template <typename S, bool DRAW_ONLY, bool VEC4>
__global__ void sample_kernel(S* __restrict__ out, const S* __restrict__ w0, const S* __restrict__ c,
                              ScaleRule rule, int64_t n, double rho, uint64_t seed, uint32_t rng_stream,
                              uint32_t first_sample, uint64_t offset, Dist dist, int rows_per_sample) {
  using A = typename AccOf<S>::type;
  const uint64_t first_block = offset >> 2;
  const int64_t head = static_cast<int64_t>(offset & 3u);
  const int64_t n_blocks = (head + n + 3) >> 2;
  const uint32_t s = blockIdx.y;
  const uint32_t sample = first_sample + s;
  const A rp = static_cast<A>(rho), rm = static_cast<A>(-rho);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < n_blocks; b += stride) {
    A xi[4];
    block_draws<A>(dist, seed, rng_stream, sample, first_block + static_cast<uint64_t>(b), xi);
    const int64_t i0 = 4 * b - head;  // local index of the block's lane 0 (may be negative)
    if (VEC4 && i0 + 3 < n) {  // head == 0 here, so i0 >= 0 and i0 % 4 == 0
      Vec<S, 4> W{}, C{};
      A cs[4] = {A(0), A(0), A(0), A(0)};
      if (!DRAW_ONLY) {
        W = load_vec<S, 4>(w0, i0 >> 2);
        if (c != nullptr) C = load_vec<S, 4>(c, i0 >> 2);
#pragma unroll
        for (int k = 0; k < 4; ++k) cs[k] = c != nullptr ? to_acc(C.v[k]) : derived_scale_of<S>(W.v[k], rule);
      }
      for (int r = 0; r < rows_per_sample; ++r) {
        Vec<S, 4> O;
#pragma unroll
        for (int k = 0; k < 4; ++k)
          O.v[k] = DRAW_ONLY ? from_acc<S>(xi[k]) : from_acc<S>(perturb<A>(to_acc(W.v[k]), cs[k], r ? rm : rp, xi[k]));
        store_vec<S, 4>(out + (static_cast<int64_t>(s) * rows_per_sample + r) * n, i0 >> 2, O);
      }
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int64_t i = i0 + k;
        if (i < 0 || i >= n) continue;
        const A ci = DRAW_ONLY ? A(0) : scale_at<S>(c, i, w0[i], rule);
        for (int r = 0; r < rows_per_sample; ++r) {
          S* row = out + (static_cast<int64_t>(s) * rows_per_sample + r) * n;
          row[i] = DRAW_ONLY ? from_acc<S>(xi[k]) : from_acc<S>(perturb<A>(to_acc(w0[i]), ci, r ? rm : rp, xi[k]));
        }
      }
    }
  }
}

template <typename S, bool DRAW_ONLY>
cudaError_t launch_sample(const SampleArgs& a, cudaStream_t stream) {
  const int64_t n = a.n, n_samples = a.n_samples;
  const int rows_per_sample = a.antithetic ? 2 : 1;
  if (n == 0 || n_samples == 0) return cudaSuccess;
  if (n_samples > 65535) return cudaErrorInvalidValue;
  const int64_t n_blocks = (static_cast<int64_t>(a.offset & 3u) + n + 3) >> 2;
  const size_t vb = 4 * sizeof(S);
  const bool vec = (a.offset & 3u) == 0 && aligned(a.out, vb) &&
                   (DRAW_ONLY || (aligned(a.w0, vb) && aligned(a.c, vb))) &&
                   (n % 4 == 0 || n_samples * rows_per_sample == 1);
  dim3 grid(grid_for(n_blocks), static_cast<unsigned>(n_samples));
  auto o = static_cast<S*>(a.out);
  auto w = static_cast<const S*>(a.w0);
  auto cc = static_cast<const S*>(a.c);
  if (vec)
    sample_kernel<S, DRAW_ONLY, true><<<grid, kThreads, 0, stream>>>(o, w, cc, a.rule, n, a.rho, a.seed, a.rng_stream,
                                                                     a.first_sample, a.offset, a.dist, rows_per_sample);
  else
    sample_kernel<S, DRAW_ONLY, false><<<grid, kThreads, 0, stream>>>(o, w, cc, a.rule, n, a.rho, a.seed,
                                                                      a.rng_stream, a.first_sample, a.offset, a.dist,
                                                                      rows_per_sample);
  return cudaGetLastError();
}

// One thread per Philox block of the launch: the piece holding it (binary search over the
// pieces' first blocks), then that block's four elements, as sample_kernel's scalar path.
template <typename S>
__global__ void pieces_kernel(const Piece* __restrict__ pieces, int64_t n_pieces, int64_t total_blocks,
                              ScaleRule rule, double rho, uint64_t seed, uint32_t rng_stream, uint32_t sample,
                              Dist dist) {
  using A = typename AccOf<S>::type;
  const A r = static_cast<A>(rho);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < total_blocks; g += stride) {
    int64_t lo = 0, hi = n_pieces - 1;  // the last piece with first_block <= g
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (pieces[mid].first_block <= g) lo = mid;
      else hi = mid - 1;
    }
    const Piece p = pieces[lo];
    const int64_t b = g - p.first_block;
    A xi[4];
    block_draws<A>(dist, seed, rng_stream, sample, (p.offset >> 2) + static_cast<uint64_t>(b), xi);
    const int64_t i0 = 4 * b - static_cast<int64_t>(p.offset & 3u);  // the block's lane 0 (may be negative)
    S* out = static_cast<S*>(p.out);
    const S* w0 = static_cast<const S*>(p.w0);
    const S* c = static_cast<const S*>(p.c);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t i = i0 + k;
      if (i < 0 || i >= p.n) continue;
      out[i] = from_acc<S>(perturb<A>(to_acc(w0[i]), scale_at<S>(c, i, w0[i], rule), r, xi[k]));
    }
  }
}

template <typename S> struct PiecesF {
  static cudaError_t run(const Piece* pieces, int64_t n_pieces, int64_t total_blocks, ScaleRule rule, double rho,
                         uint64_t seed, uint32_t rng_stream, uint32_t sample, Dist dist, cudaStream_t st) {
    pieces_kernel<S><<<grid_for(total_blocks), kThreads, 0, st>>>(pieces, n_pieces, total_blocks, rule, rho, seed,
                                                                   rng_stream, sample, dist);
    return cudaGetLastError();
  }
};

template <typename S> struct DrawF {
  static cudaError_t run(const SampleArgs& a, cudaStream_t st) { return launch_sample<S, true>(a, st); }
};
template <typename S> struct PerturbF {
  static cudaError_t run(const SampleArgs& a, cudaStream_t st) { return launch_sample<S, false>(a, st); }
};

}  // namespace

cudaError_t perturb_pieces(const Piece* pieces, int64_t n_pieces, int64_t total_blocks, ScaleRule rule, DType dtype,
                           double rho, uint64_t seed, uint32_t rng_stream, uint32_t sample, Dist dist,
                           cudaStream_t stream) {
  if (n_pieces == 0 || total_blocks == 0) return cudaSuccess;
  return dispatch<PiecesF>(dtype, pieces, n_pieces, total_blocks, rule, rho, seed, rng_stream, sample, dist, stream);
}

cudaError_t draw(const SampleArgs& a, cudaStream_t stream) { return dispatch<DrawF>(a.dtype, a, stream); }

cudaError_t perturb_rows(const SampleArgs& a, cudaStream_t stream) { return dispatch<PerturbF>(a.dtype, a, stream); }

}  // namespace cuda
}  // namespace sharpfast
