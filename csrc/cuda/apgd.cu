// CUDA APGD steps, published and scaled (the shared element update in one pass), and copy_if_.
#include "common.cuh"

namespace sharpfast {
namespace cuda {

namespace {

// One fused pass: the shared element update (elementwise.h step_update), history shift,
// parameter write (w0 + the perturbation the new value stands for).
template <typename S, int V, Step K>
__global__ void apgd_kernel(S* __restrict__ params, S* __restrict__ delta, S* __restrict__ delta_prev,
                            const S* __restrict__ grad, const S* __restrict__ w0, const S* __restrict__ c,
                            ScaleRule rule, int64_t n, const double* __restrict__ s1p, const double* __restrict__ s2p,
                            const double* __restrict__ s3p, double rho, double momentum) {
  using A = typename AccOf<S>::type;
  A s1, s2, s3;
  if constexpr (K == Step::scaled_l2) {   // s1p: the Gram entries, s2p: the step size
    const ScaledL2Coefficients k = scaled_l2_coefficients(s1p, *s2p, rho, momentum);
    s1 = static_cast<A>(k.a), s2 = static_cast<A>(k.b), s3 = static_cast<A>(k.e);
  } else {
    s1 = static_cast<A>(*s1p);
    s2 = s2p != nullptr ? static_cast<A>(*s2p) : A(0);
    s3 = s3p != nullptr ? static_cast<A>(*s3p) : A(0);
  }
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
      const A nd = step_update<A, K>(to_acc(D.v[k]), to_acc(DP.v[k]), to_acc(G.v[k]), ck, s1, s2, s3, r, alpha);
      ND.v[k] = from_acc<S>(nd);
      P.v[k] = from_acc<S>(to_acc(W.v[k]) + perturbation_of<A, K>(nd, ck));
    }
    store_vec<S, V>(delta_prev, v, D);
    store_vec<S, V>(delta, v, ND);
    store_vec<S, V>(params, v, P);
  }
  for (int64_t i = nv * V + tid; i < n; i += stride) {
    const S d = delta[i];
    const S w = w0[i];
    const A ci = scale_at<S>(c, i, w, rule);
    const A nd = step_update<A, K>(to_acc(d), to_acc(delta_prev[i]), to_acc(grad[i]), ci, s1, s2, s3, r, alpha);
    delta_prev[i] = d;
    delta[i] = from_acc<S>(nd);
    params[i] = from_acc<S>(to_acc(w) + perturbation_of<A, K>(nd, ci));
  }
}

template <typename S, Step K>
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
  if (vec)
    apgd_kernel<S, V, K><<<grid_for(a.n / V + 1), kThreads, 0, stream>>>(P, D, DP, G, W, C, a.rule, a.n, a.s1, a.s2,
                                                                          a.s3, a.rho, a.momentum);
  else
    apgd_kernel<S, 1, K><<<grid_for(a.n), kThreads, 0, stream>>>(P, D, DP, G, W, C, a.rule, a.n, a.s1, a.s2, a.s3,
                                                                  a.rho, a.momentum);
  return cudaGetLastError();
}

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

template <typename S> struct StepF {
  static cudaError_t run(Step kind, const ApgdArgs& a, cudaStream_t st) {
    switch (kind) {
      case Step::linf: return launch_apgd<S, Step::linf>(a, st);
      case Step::l2: return launch_apgd<S, Step::l2>(a, st);
      case Step::scaled_linf: return launch_apgd<S, Step::scaled_linf>(a, st);
      case Step::scaled_l2: return launch_apgd<S, Step::scaled_l2>(a, st);
    }
    return cudaErrorInvalidValue;
  }
};

}  // namespace

cudaError_t apgd_step(Step kind, const ApgdArgs& a, cudaStream_t stream) {
  return dispatch<StepF>(a.dtype, kind, a, stream);
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
