// Torch-free interface of sharpfast's CUDA kernels: raw pointers, an element count, a dtype
// tag and a cudaStream_t. Every launcher enqueues on `stream`, never synchronizes, and returns
// the launch error (cudaGetLastError) for the caller to check. Scalars that the evaluators
// update on the device (step size, gradient scale, lambda, copy condition) are passed as
// device pointers and read inside the kernels. The scale `c` may be nullptr: the kernels then
// derive it from w0 by `rule` (sharpfast/elementwise.h).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "sharpfast/elementwise.h"
#include "sharpfast/philox.h"

namespace sharpfast {
namespace cuda {

enum class DType : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

// Lambdas handled per pass over memory by ellipsoid_sq_norms (more are done in several passes).
constexpr int kMaxLambdasPerPass = 32;

int build_cuda_version();
// The compute capabilities compiled into the kernels, as nvcc lists them ("800,900").
const char* build_cuda_archs();

// Number of per-block partial sums the reductions write (a function of n only, so the
// summation order, and hence the result, is the same on every device).
int64_t reduce_partials(int64_t n);

cudaError_t draw(void* out, DType dtype, int64_t n, uint64_t seed, uint32_t rng_stream, uint32_t sample,
                 uint64_t offset, Dist dist, cudaStream_t stream);

// out: [n_rows, n] with n_rows = n_samples (or 2 n_samples when antithetic): row r uses sample
// first_sample + r (antithetic: first_sample + r / 2 with sign (-1)^r).
cudaError_t perturb_rows(void* out, const void* w0, const void* c, ScaleRule rule, DType dtype, int64_t n, double rho,
                         uint64_t seed, uint32_t rng_stream, uint32_t first_sample, uint64_t offset, Dist dist,
                         int64_t n_samples, bool antithetic, cudaStream_t stream);

cudaError_t apgd_step_linf(void* params, void* delta, void* delta_prev, const void* grad, const void* w0,
                           const void* c, ScaleRule rule, DType dtype, int64_t n, const double* step_size, double rho,
                           double momentum, cudaStream_t stream);

cudaError_t apgd_step_l2(void* params, void* delta, void* delta_prev, const void* grad, const void* w0,
                         const void* c, ScaleRule rule, DType dtype, int64_t n, const double* grad_scale,
                         const double* lam, double momentum, cudaStream_t stream);

// out[0] = sum x^2 (float64). partials: reduce_partials(n) doubles of scratch.
cudaError_t sum_squares(const void* x, DType dtype, int64_t n, double* partials, double* out, cudaStream_t stream);

// out[j] = sum_i (z_i c_i / (c_i^2 + 2 lambdas[j]))^2, z = delta + grad_scale * grad * c, for
// j < L. partials: reduce_partials(n) * min(L, kMaxLambdasPerPass) doubles of scratch.
cudaError_t ellipsoid_sq_norms(const void* delta, const void* grad, const void* w0, const void* c, ScaleRule rule,
                            DType dtype, int64_t n,
                            const double* grad_scale, const double* lambdas, int64_t L, double* partials,
                            double* out, cudaStream_t stream);

// dst = src (nbytes) iff *cond; the kernel reads cond and returns early when it is false.
cudaError_t copy_if(void* dst, const void* src, int64_t nbytes, const bool* cond, cudaStream_t stream);

}  // namespace cuda
}  // namespace sharpfast
