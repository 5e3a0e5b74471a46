// CUDA reductions: sum of squares, the ellipsoid projection's squared norms and the scaled
// solver's inner products, two-stage and deterministic. Also how the kernels were built.
#include "common.cuh"

namespace sharpfast {
namespace cuda {

namespace {

template <typename S>
__global__ void sum_squares_kernel(const S* __restrict__ x, int64_t n, double* __restrict__ partials) {
  __shared__ double smem[kReduceThreads / 32];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  double acc = 0.0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const double v = static_cast<double>(to_acc(x[i]));
    acc += v * v;
  }
  const double t = block_sum(acc, smem);
  if (threadIdx.x == 0) partials[blockIdx.x] = t;
}

// out[j] = sum_b partials[b * L + j], one block per j, fixed order.
__global__ void finish_kernel(const double* __restrict__ partials, int64_t n_partials, int L,
                              double* __restrict__ out) {
  __shared__ double smem[kReduceThreads / 32];
  const int j = blockIdx.x;
  double acc = 0.0;
  for (int64_t b = threadIdx.x; b < n_partials; b += blockDim.x) acc += partials[b * L + j];
  const double t = block_sum(acc, smem);
  if (threadIdx.x == 0) out[j] = t;
}

template <typename S>
__global__ void ellipsoid_kernel(const S* __restrict__ delta, const S* __restrict__ grad, const S* __restrict__ w0,
                                 const S* __restrict__ c, ScaleRule rule, int64_t n,
                                 const double* __restrict__ grad_scale, const double* __restrict__ lambdas, int L,
                                 double* __restrict__ partials) {
  using A = typename AccOf<S>::type;
  __shared__ double two_lam[kMaxLambdasPerPass];
  __shared__ double smem[kReduceThreads / 32][kMaxLambdasPerPass];
  if (threadIdx.x < L) two_lam[threadIdx.x] = 2.0 * lambdas[threadIdx.x];
  __syncthreads();
  const A gs = static_cast<A>(*grad_scale);
  double acc[kMaxLambdasPerPass];
#pragma unroll
  for (int j = 0; j < kMaxLambdasPerPass; ++j) acc[j] = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const A ci = scale_at<S>(c, i, w0[i], rule);
    if (ci == A(0)) continue;  // frozen coordinate: term 0, never divided by
    const double z = static_cast<double>(l2_ascent<A>(to_acc(delta[i]), to_acc(grad[i]), ci, gs));
    const double cd = static_cast<double>(ci);
    const double zc = z * cd, c2 = cd * cd;
    // Candidates in pairs: 1/A and 1/B from one division 1/(A B) (fp64 division is the
    // bottleneck, not memory, for L >~ 8 on data-center GPUs).
#pragma unroll
    for (int j = 0; j < kMaxLambdasPerPass; j += 2) {
      if (j + 1 < L) {
        const double A = c2 + two_lam[j], B = c2 + two_lam[j + 1];
        const double r = zc / (A * B);
        const double q0 = r * B, q1 = r * A;
        acc[j] += q0 * q0;
        acc[j + 1] += q1 * q1;
      } else if (j < L) {
        const double q = zc / (c2 + two_lam[j]);
        acc[j] += q * q;
      }
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < kMaxLambdasPerPass; ++j) {
    if (j < L) {
      const double t = warp_sum(acc[j]);
      if (lane == 0) smem[warp][j] = t;
    }
  }
  __syncthreads();
  if (threadIdx.x < L) {
    double t = 0.0;
    for (int w = 0; w < kReduceThreads / 32; ++w) t += smem[w][threadIdx.x];
    partials[static_cast<int64_t>(blockIdx.x) * L + threadIdx.x] = t;
  }
}

// Per-block partial sums of the scaled solver's inner products (elementwise.h GramEntry).
template <typename S>
__global__ void gram_kernel(const S* __restrict__ u, const S* __restrict__ u_prev, const S* __restrict__ grad,
                            const S* __restrict__ w0, const S* __restrict__ c, ScaleRule rule, int64_t n,
                            double* __restrict__ partials) {
  using A = typename AccOf<S>::type;
  __shared__ double smem[kReduceThreads / 32][kGramEntries];
  double acc[kGramEntries] = {0, 0, 0, 0, 0, 0, 0};
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const A ci = scale_at<S>(c, i, w0[i], rule), ua = to_acc(u[i]);
    const double uj = static_cast<double>(ua), pj = static_cast<double>(to_acc(u_prev[i]));
    const double gj = static_cast<double>(ci * to_acc(grad[i]));
    const double dj = static_cast<double>(ci * ua);
    acc[kUU] += uj * uj;
    acc[kUP] += uj * pj;
    acc[kPP] += pj * pj;
    acc[kUG] += uj * gj;
    acc[kPG] += pj * gj;
    acc[kGG] += gj * gj;
    acc[kDD] += dj * dj;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int e = 0; e < kGramEntries; ++e) {
    const double t = warp_sum(acc[e]);
    if (lane == 0) smem[warp][e] = t;
  }
  __syncthreads();
  if (threadIdx.x < kGramEntries) {
    double t = 0.0;
    for (int w = 0; w < kReduceThreads / 32; ++w) t += smem[w][threadIdx.x];
    partials[static_cast<int64_t>(blockIdx.x) * kGramEntries + threadIdx.x] = t;
  }
}

template <typename S> struct GramF {
  static cudaError_t run(const GramArgs& a, cudaStream_t st) {
    const int64_t nb = reduce_partials(a.n);
    gram_kernel<S><<<static_cast<unsigned>(nb), kReduceThreads, 0, st>>>(
        static_cast<const S*>(a.u), static_cast<const S*>(a.u_prev), static_cast<const S*>(a.grad),
        static_cast<const S*>(a.w0), static_cast<const S*>(a.c), a.rule, a.n, a.partials);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    finish_kernel<<<kGramEntries, kReduceThreads, 0, st>>>(a.partials, nb, kGramEntries, a.out);
    return cudaGetLastError();
  }
};

template <typename S> struct SumSqF {
  static cudaError_t run(const void* x, int64_t n, double* partials, double* out, cudaStream_t st) {
    const int64_t nb = reduce_partials(n);
    sum_squares_kernel<S><<<static_cast<unsigned>(nb), kReduceThreads, 0, st>>>(static_cast<const S*>(x), n, partials);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    finish_kernel<<<1, kReduceThreads, 0, st>>>(partials, nb, 1, out);
    return cudaGetLastError();
  }
};
template <typename S> struct EllipsoidF {
  static cudaError_t run(const EllipsoidArgs& a, cudaStream_t st) {
    const int64_t nb = reduce_partials(a.n);
    for (int64_t j0 = 0; j0 < a.L; j0 += kMaxLambdasPerPass) {
      const int l = static_cast<int>(a.L - j0 < kMaxLambdasPerPass ? a.L - j0 : kMaxLambdasPerPass);
      ellipsoid_kernel<S><<<static_cast<unsigned>(nb), kReduceThreads, 0, st>>>(
          static_cast<const S*>(a.delta), static_cast<const S*>(a.grad), static_cast<const S*>(a.w0),
          static_cast<const S*>(a.c), a.rule, a.n, a.grad_scale, a.lambdas + j0, l, a.partials);
      cudaError_t e = cudaGetLastError();
      if (e != cudaSuccess) return e;
      finish_kernel<<<static_cast<unsigned>(l), kReduceThreads, 0, st>>>(a.partials, nb, l, a.out + j0);
      e = cudaGetLastError();
      if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
  }
};

}  // namespace

int build_cuda_version() { return CUDART_VERSION; }

// nvcc defines __CUDA_ARCH_LIST__ (e.g. 800,900) in host and device passes alike since CUDA 11.5.
#define SF_STRINGIFY_(...) #__VA_ARGS__
#define SF_STRINGIFY(...) SF_STRINGIFY_(__VA_ARGS__)
const char* build_cuda_archs() {
#ifdef __CUDA_ARCH_LIST__
  return SF_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

int64_t reduce_partials(int64_t n) {
  const int64_t per_block = static_cast<int64_t>(kReduceThreads) * 8;
  int64_t b = (n + per_block - 1) / per_block;
  if (b < 1) b = 1;
  return b < kMaxPartials ? b : kMaxPartials;
}

cudaError_t sum_partials(const double* partials, int64_t n_partials, double* out, cudaStream_t stream) {
  finish_kernel<<<1, kReduceThreads, 0, stream>>>(partials, n_partials, 1, out);
  return cudaGetLastError();
}

cudaError_t sum_squares(const void* x, DType dtype, int64_t n, double* partials, double* out, cudaStream_t stream) {
  return dispatch<SumSqF>(dtype, x, n, partials, out, stream);
}

cudaError_t scaled_gram(const GramArgs& a, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  return dispatch<GramF>(a.dtype, a, stream);
}

cudaError_t ellipsoid_sq_norms(const EllipsoidArgs& a, cudaStream_t stream) {
  if (a.L == 0) return cudaSuccess;
  return dispatch<EllipsoidF>(a.dtype, a, stream);
}

}  // namespace cuda
}  // namespace sharpfast
