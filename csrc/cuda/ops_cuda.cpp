// CUDA implementations of sharpfast's ops: argument checks, device guard, current CUDA stream and
// scratch buffers (ATen side); the kernels (sampling.cu, apgd.cu, reductions.cu) see raw pointers only. Compiled only
// when the extension is built with CUDA. Nothing here synchronizes with the host.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "../ops_common.h"
#include "kernels.h"

namespace sharpfast {
namespace cuda {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kDouble: return DType::f64;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    default: TORCH_CHECK(false, "sharpfast: unsupported dtype ", t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "sharpfast: argument '", name, "' must be a CUDA tensor, got ", t.device());
}

// A 0-dim scalar as a float64 device tensor (a float32 one is converted on the device).
at::Tensor as_double(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? t : t.to(at::kDouble); }

void draw_cuda(at::Tensor& out, int64_t seed, int64_t rng_stream, int64_t sample, int64_t offset,
               c10::string_view distribution) {
  const SampleCall call = check_draw(out, seed, rng_stream, sample, offset, distribution);
  check_cuda(out, "out");
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const SampleArgs a{out.data_ptr(), nullptr, nullptr, call.rule, dtype_of(out), out.numel(), 0.0, call.k.seed,
                     call.k.rng_stream, call.k.sample, call.k.offset, call.dist, 1, false};
  C10_CUDA_CHECK(sharpfast::cuda::draw(a, c10::cuda::getCurrentCUDAStream()));
}

// The scale buffer's data pointer, or nullptr when c is derived from w0.
const void* scale_ptr(const at::Tensor* c) { return c != nullptr ? c->data_ptr() : nullptr; }

// Rows w0 + sign * rho * c * xi of a checked sampling call.
void launch_perturb(at::Tensor& out, const at::Tensor& w0, const SampleCall& call, double rho, bool antithetic) {
  if (w0.numel() == 0 || call.n_samples == 0) return;
  TORCH_CHECK(call.n_samples <= 65535, "sharpfast: at most 65535 samples per perturb_batched_ call on CUDA, got ",
              call.n_samples);
  const c10::cuda::CUDAGuard guard(w0.device());
  const SampleArgs a{out.data_ptr(), w0.data_ptr(), scale_ptr(call.c), call.rule, dtype_of(w0), w0.numel(), rho,
                     call.k.seed, call.k.rng_stream, call.k.sample, call.k.offset, call.dist, call.n_samples,
                     antithetic};
  C10_CUDA_CHECK(perturb_rows(a, c10::cuda::getCurrentCUDAStream()));
}

void perturb_cuda(at::Tensor& out, const at::Tensor& w0, const std::optional<at::Tensor>& c, bool adaptive, double eta,
                  double rho, int64_t seed, int64_t rng_stream, int64_t sample, int64_t offset,
                  c10::string_view distribution) {
  const SampleCall call = check_perturb(out, w0, c, adaptive, eta, seed, rng_stream, sample, offset, distribution);
  check_cuda(w0, "w0");
  launch_perturb(out, w0, call, rho, false);
}

void perturb_batched_cuda(at::Tensor& out, const at::Tensor& w0, const std::optional<at::Tensor>& c, bool adaptive,
                          double eta, double rho, int64_t seed, int64_t rng_stream, int64_t first_sample, int64_t offset,
                          c10::string_view distribution, bool antithetic) {
  const SampleCall call = check_perturb_batched(out, w0, c, adaptive, eta, seed, rng_stream, first_sample, offset,
                                                distribution, antithetic);
  check_cuda(w0, "w0");
  launch_perturb(out, w0, call, rho, antithetic);
}

void perturb_tensors_cuda(at::TensorList out, at::TensorList w0, at::TensorList c, bool adaptive, double eta,
                          double rho, int64_t seed, int64_t rng_stream, int64_t sample, at::IntArrayRef offsets,
                          c10::string_view distribution) {
  const Pieces pieces = check_pieces(out, w0, c, offsets, adaptive, eta, seed, rng_stream, sample, distribution);
  if (w0.empty()) return;
  check_cuda(w0[0], "w0");
  const c10::cuda::CUDAGuard guard(w0[0].device());
  // One launch for every piece: the pieces' table goes to the device through pinned memory
  // (the caching host allocator keeps it alive until the asynchronous copy is done).
  std::vector<Piece> table;
  int64_t total_blocks = 0;
  for (size_t p = 0; p < w0.size(); ++p) {
    if (w0[p].numel() == 0) continue;
    const auto offset = static_cast<uint64_t>(offsets[p]);
    table.push_back({out[p].data_ptr(), w0[p].data_ptr(), scale_ptr(pieces.scales[p]), w0[p].numel(), offset,
                     total_blocks});
    total_blocks += piece_blocks(w0[p].numel(), offset);
  }
  if (table.empty()) return;
  const auto bytes = static_cast<int64_t>(table.size() * sizeof(Piece));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), table.data(), static_cast<size_t>(bytes));
  at::Tensor device_table = at::empty({bytes}, w0[0].options().dtype(at::kByte));
  device_table.copy_(host, /*non_blocking=*/true);
  const Counter& k = pieces.counter;
  C10_CUDA_CHECK(perturb_pieces(static_cast<const Piece*>(device_table.data_ptr()),
                                static_cast<int64_t>(table.size()), total_blocks, pieces.rule, dtype_of(w0[0]), rho,
                                k.seed, k.rng_stream, k.sample, pieces.dist, c10::cuda::getCurrentCUDAStream()));
}

// One APGD step of a checked call; s1, s2, s3: its device scalars as float64 (nullptr where unused).
void launch_step(Step kind, at::Tensor& params, at::Tensor& delta, at::Tensor& delta_prev, const at::Tensor& grad,
                 const at::Tensor& w0, const StepCall& call, const double* s1, const double* s2, const double* s3,
                 double rho, double momentum) {
  const ApgdArgs a{params.data_ptr(), delta.data_ptr(), delta_prev.data_ptr(), grad.data_ptr(), w0.data_ptr(),
                   scale_ptr(call.c), call.rule, dtype_of(params), params.numel(), s1, s2, s3, rho, momentum};
  C10_CUDA_CHECK(apgd_step(kind, a, c10::cuda::getCurrentCUDAStream()));
}

void apgd_step_linf_cuda(at::Tensor& params, at::Tensor& delta, at::Tensor& delta_prev, const at::Tensor& grad,
                         const at::Tensor& w0, const std::optional<at::Tensor>& c, bool adaptive, double eta,
                         const at::Tensor& step_size, double rho, double momentum) {
  const StepCall call = check_apgd_linf("apgd_step_linf_", params, delta, delta_prev, grad, w0, c, adaptive, eta,
                                        step_size);
  check_cuda(params, "params");
  if (params.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(params.device());
  const at::Tensor step = as_double(step_size);
  launch_step(Step::linf, params, delta, delta_prev, grad, w0, call, step.data_ptr<double>(), nullptr, nullptr, rho,
              momentum);
}

void apgd_step_l2_cuda(at::Tensor& params, at::Tensor& delta, at::Tensor& delta_prev, const at::Tensor& grad,
                       const at::Tensor& w0, const std::optional<at::Tensor>& c, bool adaptive, double eta,
                       const at::Tensor& grad_scale, const at::Tensor& lam, double momentum) {
  const StepCall call = check_apgd_l2(params, delta, delta_prev, grad, w0, c, adaptive, eta, grad_scale, lam);
  check_cuda(params, "params");
  if (params.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(params.device());
  const at::Tensor gs = as_double(grad_scale);
  launch_step(Step::l2, params, delta, delta_prev, grad, w0, call, gs.data_ptr<double>(), lam.data_ptr<double>(),
              nullptr, 0.0, momentum);
}

void scaled_step_linf_cuda(at::Tensor& params, at::Tensor& u, at::Tensor& u_prev, const at::Tensor& grad,
                           const at::Tensor& w0, const std::optional<at::Tensor>& c, bool adaptive, double eta,
                           const at::Tensor& step_size, double rho, double momentum) {
  const StepCall call = check_apgd_linf("scaled_step_linf_", params, u, u_prev, grad, w0, c, adaptive, eta, step_size);
  check_cuda(params, "params");
  if (params.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(params.device());
  const at::Tensor step = as_double(step_size);
  launch_step(Step::scaled_linf, params, u, u_prev, grad, w0, call, step.data_ptr<double>(), nullptr, nullptr, rho,
              momentum);
}

void scaled_step_l2_cuda(at::Tensor& params, at::Tensor& u, at::Tensor& u_prev, const at::Tensor& grad,
                         const at::Tensor& w0, const std::optional<at::Tensor>& c, bool adaptive, double eta,
                         const at::Tensor& gram, const at::Tensor& step_size, double rho, double momentum) {
  const StepCall call = check_scaled_l2(params, u, u_prev, grad, w0, c, adaptive, eta, gram, step_size);
  check_cuda(params, "params");
  if (params.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(params.device());
  const at::Tensor step = as_double(step_size);
  launch_step(Step::scaled_l2, params, u, u_prev, grad, w0, call, gram.data_ptr<double>(), step.data_ptr<double>(),
              nullptr, rho, momentum);
}

at::Tensor scaled_gram_cuda(const at::Tensor& u, const at::Tensor& u_prev, const at::Tensor& grad, const at::Tensor& w0,
                            const std::optional<at::Tensor>& c, bool adaptive, double eta) {
  const StepCall call = check_scaled_gram(u, u_prev, grad, w0, c, adaptive, eta);
  check_cuda(u, "u");
  const c10::cuda::CUDAGuard guard(u.device());
  at::Tensor out = at::zeros({kGramEntries}, u.options().dtype(at::kDouble));
  if (u.numel() == 0) return out;
  at::Tensor partials = at::empty({reduce_partials(u.numel()) * kGramEntries}, u.options().dtype(at::kDouble));
  const GramArgs a{u.data_ptr(), u_prev.data_ptr(), grad.data_ptr(), w0.data_ptr(), scale_ptr(call.c), call.rule,
                   dtype_of(u), u.numel(), partials.data_ptr<double>(), out.data_ptr<double>()};
  C10_CUDA_CHECK(sharpfast::cuda::scaled_gram(a, c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor sum_squares_cuda(const at::Tensor& x) {
  check_flat(x, "x");
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::zeros({}, x.options().dtype(at::kDouble));
  if (x.numel() == 0) return out;
  at::Tensor partials = at::empty({reduce_partials(x.numel())}, x.options().dtype(at::kDouble));
  C10_CUDA_CHECK(sharpfast::cuda::sum_squares(x.data_ptr(), dtype_of(x), x.numel(), partials.data_ptr<double>(),
                                              out.data_ptr<double>(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor ellipsoid_sq_norms_cuda(const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& w0,
                                const std::optional<at::Tensor>& c, bool adaptive, double eta,
                                const at::Tensor& grad_scale, const at::Tensor& lambdas) {
  const StepCall call = check_ellipsoid_sq_norms(delta, grad, w0, c, adaptive, eta, grad_scale, lambdas);
  check_cuda(delta, "delta");
  const c10::cuda::CUDAGuard guard(delta.device());
  const int64_t L = lambdas.numel();
  at::Tensor out = at::zeros({L}, delta.options().dtype(at::kDouble));
  if (delta.numel() == 0 || L == 0) return out;
  const at::Tensor lam = lambdas.contiguous();
  const at::Tensor gs = as_double(grad_scale);
  const int64_t per_pass = L < kMaxLambdasPerPass ? L : kMaxLambdasPerPass;
  at::Tensor partials = at::empty({reduce_partials(delta.numel()) * per_pass}, delta.options().dtype(at::kDouble));
  const EllipsoidArgs a{delta.data_ptr(), grad.data_ptr(), w0.data_ptr(), scale_ptr(call.c), call.rule,
                        dtype_of(delta), delta.numel(), gs.data_ptr<double>(), lam.data_ptr<double>(), L,
                        partials.data_ptr<double>(), out.data_ptr<double>()};
  C10_CUDA_CHECK(sharpfast::cuda::ellipsoid_sq_norms(a, c10::cuda::getCurrentCUDAStream()));
  return out;
}

void copy_if_cuda(at::Tensor& dst, const at::Tensor& src, const at::Tensor& cond) {
  check_copy_if(dst, src, cond);
  check_cuda(dst, "dst");
  if (dst.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(dst.device());
  C10_CUDA_CHECK(sharpfast::cuda::copy_if(dst.data_ptr(), src.data_ptr(),
                                          static_cast<int64_t>(dst.numel() * dst.element_size()),
                                          cond.data_ptr<bool>(), c10::cuda::getCurrentCUDAStream()));
}

// The device table of a SAM call's tensors (pinned host memory, copied asynchronously; the caching
// host allocator keeps it alive until the copy is done) and its number of blocks.
std::pair<at::Tensor, int64_t> sam_table(at::TensorList w, const at::TensorList* saved, at::TensorList grad,
                                          size_t* n_pieces) {
  std::vector<SamPiece> table;
  int64_t total_blocks = 0;
  for (size_t p = 0; p < w.size(); ++p) {
    if (w[p].numel() == 0) continue;
    table.push_back({w[p].data_ptr(), saved != nullptr ? (*saved)[p].data_ptr() : nullptr, grad[p].data_ptr(),
                     w[p].numel(), total_blocks});
    total_blocks += sam_blocks(w[p].numel());
  }
  *n_pieces = table.size();
  const auto bytes = static_cast<int64_t>(std::max<size_t>(table.size(), 1) * sizeof(SamPiece));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  if (!table.empty()) std::memcpy(host.data_ptr(), table.data(), table.size() * sizeof(SamPiece));
  at::Tensor device_table = at::empty({bytes}, w[0].options().dtype(at::kByte));
  device_table.copy_(host, /*non_blocking=*/true);
  return {device_table, total_blocks};
}

at::Tensor sam_sq_norm_cuda(at::TensorList grad, at::TensorList w, bool adaptive, double eta) {
  check_sam(w, nullptr, grad, eta, "sam_sq_norm");
  TORCH_CHECK(!w.empty(), "sharpfast: sam_sq_norm needs at least one tensor on CUDA (the device of its result)");
  check_cuda(w[0], "w");
  const c10::cuda::CUDAGuard guard(w[0].device());
  at::Tensor out = at::zeros({}, w[0].options().dtype(at::kDouble));
  size_t n_pieces = 0;
  const auto [table, total_blocks] = sam_table(w, nullptr, grad, &n_pieces);
  if (n_pieces == 0) return out;
  at::Tensor partials = at::empty({total_blocks}, w[0].options().dtype(at::kDouble));
  C10_CUDA_CHECK(sharpfast::cuda::sam_sq_norm(static_cast<const SamPiece*>(table.data_ptr()),
                                              static_cast<int64_t>(n_pieces), total_blocks, ScaleRule{adaptive, eta},
                                              dtype_of(w[0]), partials.data_ptr<double>(), out.data_ptr<double>(),
                                              c10::cuda::getCurrentCUDAStream()));
  return out;
}

void sam_perturb_cuda(at::TensorList w, at::TensorList saved, at::TensorList grad, bool adaptive, double eta,
                      const at::Tensor& s) {
  check_sam(w, &saved, grad, eta, "sam_perturb_");
  if (w.empty()) return;
  check_cuda(w[0], "w");
  check_scalar(s, "s", w[0].device(), false);
  const c10::cuda::CUDAGuard guard(w[0].device());
  size_t n_pieces = 0;
  const auto [table, total_blocks] = sam_table(w, &saved, grad, &n_pieces);
  if (n_pieces == 0) return;
  C10_CUDA_CHECK(sharpfast::cuda::sam_perturb(static_cast<const SamPiece*>(table.data_ptr()),
                                              static_cast<int64_t>(n_pieces), total_blocks, ScaleRule{adaptive, eta},
                                              dtype_of(w[0]), s.data_ptr<double>(),
                                              c10::cuda::getCurrentCUDAStream()));
}

}  // namespace
}  // namespace cuda
}  // namespace sharpfast

TORCH_LIBRARY_IMPL(sharpfast, CUDA, m) {
  using namespace sharpfast::cuda;
  m.impl("draw_", &draw_cuda);
  m.impl("perturb_", &perturb_cuda);
  m.impl("perturb_batched_", &perturb_batched_cuda);
  m.impl("perturb_tensors_", &perturb_tensors_cuda);
  m.impl("apgd_step_linf_", &apgd_step_linf_cuda);
  m.impl("ellipsoid_sq_norms", &ellipsoid_sq_norms_cuda);
  m.impl("apgd_step_l2_", &apgd_step_l2_cuda);
  m.impl("scaled_step_linf_", &scaled_step_linf_cuda);
  m.impl("scaled_step_l2_", &scaled_step_l2_cuda);
  m.impl("scaled_gram", &scaled_gram_cuda);
  m.impl("copy_if_", &copy_if_cuda);
  m.impl("sum_squares", &sum_squares_cuda);
  m.impl("sam_sq_norm", &sam_sq_norm_cuda);
  m.impl("sam_perturb_", &sam_perturb_cuda);
}
