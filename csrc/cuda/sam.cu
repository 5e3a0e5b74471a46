// CUDA kernels of SAM's op family (sharpfast.optim) over a parameter list, one launch for every
// tensor: a block handles kSamBlockElements elements of one tensor (found by binary search over
// the tensors' first blocks). The norm's block sums are added in block order (deterministic).
#include "common.cuh"

namespace sharpfast {
namespace cuda {
namespace {

// The piece block g belongs to: the last piece whose first_block <= g.
__device__ __forceinline__ SamPiece piece_of(const SamPiece* __restrict__ pieces, int64_t n_pieces, int64_t g) {
  int64_t lo = 0, hi = n_pieces - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (pieces[mid].first_block <= g) lo = mid;
    else hi = mid - 1;
  }
  return pieces[lo];
}

template <typename S>
__global__ void sam_sq_norm_kernel(const SamPiece* __restrict__ pieces, int64_t n_pieces, ScaleRule rule,
                                   double* __restrict__ partials) {
  using A = typename AccOf<S>::type;
  __shared__ double smem[kReduceThreads / 32];
  const int64_t g = blockIdx.x;
  const SamPiece p = piece_of(pieces, n_pieces, g);
  const int64_t begin = (g - p.first_block) * kSamBlockElements;
  const int64_t end = begin + kSamBlockElements < p.n ? begin + kSamBlockElements : p.n;
  const S* __restrict__ w = static_cast<const S*>(p.w);
  const S* __restrict__ grad = static_cast<const S*>(p.grad);
  double acc = 0.0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const A t = derived_scale_of<S>(w[i], rule);
    const double v = static_cast<double>(t * to_acc(grad[i]));
    acc += v * v;
  }
  const double total = block_sum(acc, smem);
  if (threadIdx.x == 0) partials[g] = total;
}

template <typename S>
__global__ void sam_perturb_kernel(const SamPiece* __restrict__ pieces, int64_t n_pieces, ScaleRule rule,
                                   const double* __restrict__ s) {
  using A = typename AccOf<S>::type;
  const int64_t g = blockIdx.x;
  const SamPiece p = piece_of(pieces, n_pieces, g);
  const int64_t begin = (g - p.first_block) * kSamBlockElements;
  const int64_t end = begin + kSamBlockElements < p.n ? begin + kSamBlockElements : p.n;
  S* __restrict__ w = static_cast<S*>(p.w);
  S* __restrict__ saved = static_cast<S*>(p.saved);
  const S* __restrict__ grad = static_cast<const S*>(p.grad);
  const A sa = static_cast<A>(*s);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const S wi = w[i];
    saved[i] = wi;
    const A t = derived_scale_of<S>(wi, rule);
    w[i] = from_acc<S>(sam_ascent<A>(to_acc(wi), to_acc(grad[i]), t, sa));
  }
}

template <typename S> struct SamNormF {
  static cudaError_t run(const SamPiece* pieces, int64_t n_pieces, int64_t total_blocks, ScaleRule rule,
                         double* partials, double* out, cudaStream_t st) {
    sam_sq_norm_kernel<S><<<static_cast<unsigned>(total_blocks), kReduceThreads, 0, st>>>(pieces, n_pieces, rule,
                                                                                          partials);
    const cudaError_t e = cudaGetLastError();
    return e != cudaSuccess ? e : sum_partials(partials, total_blocks, out, st);
  }
};

template <typename S> struct SamPerturbF {
  static cudaError_t run(const SamPiece* pieces, int64_t n_pieces, int64_t total_blocks, ScaleRule rule,
                         const double* s, cudaStream_t st) {
    sam_perturb_kernel<S><<<static_cast<unsigned>(total_blocks), kThreads, 0, st>>>(pieces, n_pieces, rule, s);
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t sam_sq_norm(const SamPiece* pieces, int64_t n_pieces, int64_t total_blocks, ScaleRule rule, DType dtype,
                        double* partials, double* out, cudaStream_t stream) {
  if (n_pieces == 0 || total_blocks == 0) return cudaSuccess;
  return dispatch<SamNormF>(dtype, pieces, n_pieces, total_blocks, rule, partials, out, stream);
}

cudaError_t sam_perturb(const SamPiece* pieces, int64_t n_pieces, int64_t total_blocks, ScaleRule rule, DType dtype,
                        const double* s, cudaStream_t stream) {
  if (n_pieces == 0 || total_blocks == 0) return cudaSuccess;
  return dispatch<SamPerturbF>(dtype, pieces, n_pieces, total_blocks, rule, s, stream);
}

}  // namespace cuda
}  // namespace sharpfast
