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

// A sampling launch: `out` is [rows, n], rows = n_samples (or 2 n_samples when antithetic); row r
// uses sample first_sample + r (antithetic: first_sample + r / 2 with sign (-1)^r) and holds
// w0 + sign * rho * c * xi, or xi itself for `draw` (w0, c, rule and rho unused).
struct SampleArgs {
  void* out;
  const void* w0;
  const void* c;  // nullptr: derived from w0 by rule
  ScaleRule rule;
  DType dtype;
  int64_t n;
  double rho;
  uint64_t seed;
  uint32_t rng_stream;
  uint32_t first_sample;
  uint64_t offset;  // global element index of element 0
  Dist dist;
  int64_t n_samples;
  bool antithetic;
};

cudaError_t draw(const SampleArgs& a, cudaStream_t stream);
cudaError_t perturb_rows(const SampleArgs& a, cudaStream_t stream);

// One piece of a multi-tensor perturbation: n elements at global indices offset .. offset + n - 1,
// whose Philox blocks are blocks first_block .. of the launch (prefix sums over the pieces).
struct Piece {
  void* out;
  const void* w0;
  const void* c;  // nullptr: derived from w0 by rule
  int64_t n;
  uint64_t offset;
  int64_t first_block;
};

// Philox blocks a piece of n elements starting at global index `offset` touches.
inline int64_t piece_blocks(int64_t n, uint64_t offset) { return (static_cast<int64_t>(offset & 3u) + n + 3) >> 2; }

// out = w0 + rho * c * xi(sample) for every piece, in one launch over total_blocks Philox blocks;
// `pieces`: n_pieces non-empty pieces in device memory, ordered by first_block.
cudaError_t perturb_pieces(const Piece* pieces, int64_t n_pieces, int64_t total_blocks, ScaleRule rule, DType dtype,
                           double rho, uint64_t seed, uint32_t rng_stream, uint32_t sample, Dist dist,
                           cudaStream_t stream);

// An APGD step's buffers and scalars (elementwise.h step_update): `delta` is delta (published) or
// u (scaled); s1, s2, s3 device scalars (nullptr where the step has fewer): published linf the
// step size; published l2 the gradient scale and the ellipsoid multiplier; scaled linf the step
// size; scaled l2 s1 = scaled_gram's 7 entries and s2 = the step size (each thread computes the
// step's coefficients from them: elementwise.h scaled_l2_coefficients).
struct ApgdArgs {
  void* params;
  void* delta;
  void* delta_prev;
  const void* grad;
  const void* w0;
  const void* c;  // nullptr: derived from w0 by rule
  ScaleRule rule;
  DType dtype;
  int64_t n;
  const double* s1;
  const double* s2;
  const double* s3;
  double rho;
  double momentum;
};

cudaError_t apgd_step(Step kind, const ApgdArgs& a, cudaStream_t stream);

// out[0] = partials[0] + partials[1] + ... in that order (float64).
cudaError_t sum_partials(const double* partials, int64_t n_partials, double* out, cudaStream_t stream);

// One tensor of a SAM call (sharpfast.optim): n elements of w, saved (nullptr for the norm) and
// grad, handled by the launch's blocks first_block .. first_block + sam_blocks(n) - 1.
struct SamPiece {
  void* w;
  void* saved;
  const void* grad;
  int64_t n;
  int64_t first_block;
};

// Elements per block: a function of n only, so the norm's partial sums, and their sum, are the
// same on every device.
constexpr int64_t kSamBlockElements = 4096;
inline int64_t sam_blocks(int64_t n) { return (n + kSamBlockElements - 1) / kSamBlockElements; }

// out[0] = sum over the pieces of (T g)^2, T = |w| + eta (rule.adaptive) or 1, in float64;
// partials: total_blocks doubles of scratch. `pieces`: n_pieces non-empty pieces in device memory,
// ordered by first_block.
cudaError_t sam_sq_norm(const SamPiece* pieces, int64_t n_pieces, int64_t total_blocks, ScaleRule rule, DType dtype,
                        double* partials, double* out, cudaStream_t stream);
// saved = w, w = w + T^2 g s (elementwise.h sam_ascent) for every piece; s: a device scalar.
cudaError_t sam_perturb(const SamPiece* pieces, int64_t n_pieces, int64_t total_blocks, ScaleRule rule, DType dtype,
                        const double* s, cudaStream_t stream);

// out[0] = sum x^2 (float64). partials: reduce_partials(n) doubles of scratch.
cudaError_t sum_squares(const void* x, DType dtype, int64_t n, double* partials, double* out, cudaStream_t stream);

// out[j] = sum_i (z_i c_i / (c_i^2 + 2 lambdas[j]))^2, z = delta + grad_scale * grad * c, for
// j < L. partials: reduce_partials(n) * min(L, kMaxLambdasPerPass) doubles of scratch.
struct EllipsoidArgs {
  const void* delta;
  const void* grad;
  const void* w0;
  const void* c;  // nullptr: derived from w0 by rule
  ScaleRule rule;
  DType dtype;
  int64_t n;
  const double* grad_scale;
  const double* lambdas;
  int64_t L;
  double* partials;
  double* out;
};

cudaError_t ellipsoid_sq_norms(const EllipsoidArgs& a, cudaStream_t stream);

// out[e] = the scaled solver's inner products (elementwise.h GramEntry) of u, u_prev and c g, and
// ||c u||^2. partials: reduce_partials(n) * kGramEntries doubles of scratch.
struct GramArgs {
  const void* u;
  const void* u_prev;
  const void* grad;
  const void* w0;
  const void* c;  // nullptr: derived from w0 by rule
  ScaleRule rule;
  DType dtype;
  int64_t n;
  double* partials;
  double* out;
};

cudaError_t scaled_gram(const GramArgs& a, cudaStream_t stream);

// dst = src (nbytes) iff *cond; the kernel reads cond and returns early when it is false.
cudaError_t copy_if(void* dst, const void* src, int64_t nbytes, const bool* cond, cudaStream_t stream);

}  // namespace cuda
}  // namespace sharpfast
