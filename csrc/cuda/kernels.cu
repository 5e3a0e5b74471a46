// sharpfast's CUDA kernels. Torch-free (cuda_runtime, cuda_fp16, cuda_bf16 and the shared
// headers only) so `nvcc -c` checks them on any machine with a CUDA toolkit.
//
// Elementwise kernels are grid-stride loops with 64-bit indices and 16-byte vector loads when
// every pointer is aligned; the sampling kernels give one thread one Philox block (4 elements),
// so draws never depend on the launch shape. Reductions are two-stage and deterministic: the
// number of partials and the order of every sum depend on n only.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels.h"
#include "sharpfast/elementwise.h"
#include "sharpfast/philox.h"

namespace sharpfast {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kReduceThreads = 256;
constexpr int64_t kMaxPartials = 1024;

template <typename S> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename S> __device__ __forceinline__ S from_acc(typename AccOf<S>::type x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename S, int V>
struct alignas(sizeof(S) * V) Vec {
  S v[V];
};

template <typename S, int V>
__device__ __forceinline__ Vec<S, V> load_vec(const S* p, int64_t i) {
  return reinterpret_cast<const Vec<S, V>*>(p)[i];
}
template <typename S, int V>
__device__ __forceinline__ void store_vec(S* p, int64_t i, const Vec<S, V>& x) {
  reinterpret_cast<Vec<S, V>*>(p)[i] = x;
}

// The storage round trip of the derived-scale rule (elementwise.h): to dtype S and back.
template <typename S>
struct CudaRoundTrip {
  static __device__ __forceinline__ typename AccOf<S>::type apply(typename AccOf<S>::type x) {
    return to_acc(from_acc<S>(x));
  }
};

// c_i derived from w0_i (no scale buffer) by the shared rule.
template <typename S>
__device__ __forceinline__ typename AccOf<S>::type derived_scale_of(S w, const ScaleRule& rule) {
  using A = typename AccOf<S>::type;
  const A eta = rounded_eta<CudaRoundTrip<S>, A>(rule.eta);
  return derived_scale_rounded<CudaRoundTrip<S>, A>(to_acc(w), eta, rule.adaptive);
}

// c_i from the buffer c, or derived from w0_i where there is none.
template <typename S>
__device__ __forceinline__ typename AccOf<S>::type scale_at(const S* __restrict__ c, int64_t i, S w,
                                                            const ScaleRule& rule) {
  return c != nullptr ? to_acc(c[i]) : derived_scale_of<S>(w, rule);
}

inline bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

int sm_count() {
  static int cache[64] = {0};  // per device; a benign race writes the same value
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 80;
  if (dev >= 0 && dev < 64 && cache[dev] > 0) return cache[dev];
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) return 80;
  if (dev >= 0 && dev < 64) cache[dev] = sms;
  return sms;
}

// Grid for a grid-stride loop over `work` items: enough blocks to fill the device, no more.
unsigned grid_for(int64_t work) {
  const int64_t want = (work + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sm_count()) * 16;
  const int64_t g = want < cap ? want : cap;
  return static_cast<unsigned>(g < 1 ? 1 : g);
}

// ------------------------------------------------------------------------------- sampling

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

// ------------------------------------------------------------------------------- APGD steps

// One fused pass: the shared element update (elementwise.h apgd_update), history shift,
// parameter write. s1 = step size (linf) or gradient scale (l2); s2 = lambda (l2).
template <typename S, int V, bool L2>
__global__ void apgd_kernel(S* __restrict__ params, S* __restrict__ delta, S* __restrict__ delta_prev,
                            const S* __restrict__ grad, const S* __restrict__ w0, const S* __restrict__ c,
                            ScaleRule rule, int64_t n, const double* __restrict__ s1p, const double* __restrict__ s2p,
                            double rho, double momentum) {
  using A = typename AccOf<S>::type;
  const A s1 = static_cast<A>(*s1p);
  const A s2 = L2 ? static_cast<A>(*s2p) : A(0);
  const A r = static_cast<A>(rho), alpha = static_cast<A>(momentum);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nv = n / V;
  for (int64_t v = tid; v < nv; v += stride) {
    const Vec<S, V> D = load_vec<S, V>(delta, v), DP = load_vec<S, V>(delta_prev, v), G = load_vec<S, V>(grad, v),
                    W = load_vec<S, V>(w0, v);
    Vec<S, V> C{};
    if (c != nullptr) C = load_vec<S, V>(c, v);
    Vec<S, V> ND, P;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const A ck = c != nullptr ? to_acc(C.v[k]) : derived_scale_of<S>(W.v[k], rule);
      const A nd = apgd_update<A, L2>(to_acc(D.v[k]), to_acc(DP.v[k]), to_acc(G.v[k]), ck, s1, s2, r, alpha);
      ND.v[k] = from_acc<S>(nd);
      P.v[k] = from_acc<S>(to_acc(W.v[k]) + nd);
    }
    store_vec<S, V>(delta_prev, v, D);
    store_vec<S, V>(delta, v, ND);
    store_vec<S, V>(params, v, P);
  }
  for (int64_t i = nv * V + tid; i < n; i += stride) {
    const S d = delta[i];
    const S w = w0[i];
    const A nd = apgd_update<A, L2>(to_acc(d), to_acc(delta_prev[i]), to_acc(grad[i]), scale_at<S>(c, i, w, rule), s1,
                                    s2, r, alpha);
    delta_prev[i] = d;
    delta[i] = from_acc<S>(nd);
    params[i] = from_acc<S>(to_acc(w) + nd);
  }
}

template <typename S, bool L2>
cudaError_t launch_apgd(const ApgdArgs& a, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  constexpr int V = 16 / sizeof(S);
  const bool vec = aligned(a.params, 16) && aligned(a.delta, 16) && aligned(a.delta_prev, 16) && aligned(a.grad, 16) &&
                   aligned(a.w0, 16) && aligned(a.c, 16);
  auto P = static_cast<S*>(a.params);
  auto D = static_cast<S*>(a.delta);
  auto DP = static_cast<S*>(a.delta_prev);
  auto G = static_cast<const S*>(a.grad);
  auto W = static_cast<const S*>(a.w0);
  auto C = static_cast<const S*>(a.c);
  const double rho = L2 ? 0.0 : a.rho;
  if (vec)
    apgd_kernel<S, V, L2><<<grid_for(a.n / V + 1), kThreads, 0, stream>>>(P, D, DP, G, W, C, a.rule, a.n, a.s1, a.lam,
                                                                           rho, a.momentum);
  else
    apgd_kernel<S, 1, L2><<<grid_for(a.n), kThreads, 0, stream>>>(P, D, DP, G, W, C, a.rule, a.n, a.s1, a.lam, rho,
                                                                   a.momentum);
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------- reductions

__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  return x;
}

// Fixed-order block sum of one value per thread (result valid in thread 0).
__device__ __forceinline__ double block_sum(double x, double* smem /* [kReduceThreads / 32] */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  x = warp_sum(x);
  __syncthreads();
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  double t = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kReduceThreads / 32; ++w) t += smem[w];
  return t;
}

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

// ------------------------------------------------------------------------------- copy_if

__global__ void copy_if_kernel(uint8_t* __restrict__ dst, const uint8_t* __restrict__ src, int64_t nbytes,
                               const bool* __restrict__ cond, bool vec16) {
  if (!*cond) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vec16) {
    const int64_t nv = nbytes / 16;
    for (int64_t v = tid; v < nv; v += stride) reinterpret_cast<uint4*>(dst)[v] = reinterpret_cast<const uint4*>(src)[v];
    done = nv * 16;
  }
  for (int64_t i = done + tid; i < nbytes; i += stride) dst[i] = src[i];
}

template <template <typename> class F, typename... Args>
cudaError_t dispatch(DType t, Args... args) {
  switch (t) {
    case DType::f32: return F<float>::run(args...);
    case DType::f64: return F<double>::run(args...);
    case DType::f16: return F<__half>::run(args...);
    case DType::bf16: return F<__nv_bfloat16>::run(args...);
  }
  return cudaErrorInvalidValue;
}

template <typename S> struct DrawF {
  static cudaError_t run(const SampleArgs& a, cudaStream_t st) { return launch_sample<S, true>(a, st); }
};
template <typename S> struct PerturbF {
  static cudaError_t run(const SampleArgs& a, cudaStream_t st) { return launch_sample<S, false>(a, st); }
};
template <typename S> struct LinfF {
  static cudaError_t run(const ApgdArgs& a, cudaStream_t st) { return launch_apgd<S, false>(a, st); }
};
template <typename S> struct L2F {
  static cudaError_t run(const ApgdArgs& a, cudaStream_t st) { return launch_apgd<S, true>(a, st); }
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

cudaError_t draw(const SampleArgs& a, cudaStream_t stream) { return dispatch<DrawF>(a.dtype, a, stream); }

cudaError_t perturb_rows(const SampleArgs& a, cudaStream_t stream) { return dispatch<PerturbF>(a.dtype, a, stream); }

cudaError_t apgd_step_linf(const ApgdArgs& a, cudaStream_t stream) { return dispatch<LinfF>(a.dtype, a, stream); }

cudaError_t apgd_step_l2(const ApgdArgs& a, cudaStream_t stream) { return dispatch<L2F>(a.dtype, a, stream); }

cudaError_t sum_squares(const void* x, DType dtype, int64_t n, double* partials, double* out, cudaStream_t stream) {
  return dispatch<SumSqF>(dtype, x, n, partials, out, stream);
}

cudaError_t ellipsoid_sq_norms(const EllipsoidArgs& a, cudaStream_t stream) {
  if (a.L == 0) return cudaSuccess;
  return dispatch<EllipsoidF>(a.dtype, a, stream);
}

cudaError_t copy_if(void* dst, const void* src, int64_t nbytes, const bool* cond, cudaStream_t stream) {
  if (nbytes == 0) return cudaSuccess;
  const bool vec16 = aligned(dst, 16) && aligned(src, 16);
  copy_if_kernel<<<grid_for(vec16 ? nbytes / 16 + 1 : nbytes), kThreads, 0, stream>>>(
      static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src), nbytes, cond, vec16);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sharpfast
