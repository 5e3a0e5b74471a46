// What sharpfast's CUDA kernels share: launch constants, the compute type of each storage type
// and its conversions, vector loads, the scale of an element (a buffer or the shared derived
// rule), launch shapes and the dtype dispatch. Torch-free (cuda_runtime, cuda_fp16, cuda_bf16
// and the shared headers only), so `nvcc -c` checks the kernels on any machine with a toolkit.
//
// Elementwise kernels are grid-stride loops with 64-bit indices and 16-byte vector loads when
// every pointer is aligned; the sampling kernels give one thread one Philox block (4 elements),
// so draws never depend on the launch shape. Reductions are two-stage and deterministic: the
// number of partials and the order of every sum depend on n only.
#pragma once
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

}  // namespace
}  // namespace cuda
}  // namespace sharpfast
