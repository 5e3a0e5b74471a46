// CPU APGD steps: the shared element update over flat buffers in one pass; copy_if_.
#include "cpu_common.h"

namespace sharpfast {
namespace cpu {
namespace {

template <typename S>
struct ApgdBuffers {
  S* p;
  S* d;
  S* dp;
  const S* g;
  const S* w;
  const S* c;  // nullptr: derived from w
  ApgdBuffers(at::Tensor& params, at::Tensor& delta, at::Tensor& delta_prev, const at::Tensor& grad,
              const at::Tensor& w0, const at::Tensor* cc)
      : p(params.data_ptr<S>()), d(delta.data_ptr<S>()), dp(delta_prev.data_ptr<S>()), g(grad.data_ptr<S>()),
        w(w0.data_ptr<S>()), c(scale_data<S>(cc)) {}
};

// One APGD step over m elements (a plain function with restrict pointers, so it vectorizes): the
// shared element update (elementwise.h apgd_update), history shift and parameter write.
template <typename S, bool L2, ScaleMode M>
void apgd_sub(S* __restrict__ p, S* __restrict__ d, S* __restrict__ dp, const S* __restrict__ g,
              const S* __restrict__ w, const S* __restrict__ c, int64_t m, at::opmath_type<S> eta,
              at::opmath_type<S> s1, at::opmath_type<S> s2, at::opmath_type<S> rho, at::opmath_type<S> alpha) {
  using A = at::opmath_type<S>;
  for (int64_t i = 0; i < m; ++i) {
    const A di = static_cast<A>(d[i]), gi = static_cast<A>(g[i]), wi = static_cast<A>(w[i]);
    const A ci = scale_of<M, S, A>(c, i, wi, eta);
    const A nw = apgd_update<A, L2>(di, static_cast<A>(dp[i]), gi, ci, s1, s2, rho, alpha);
    dp[i] = d[i];
    d[i] = static_cast<S>(nw);
    p[i] = static_cast<S>(wi + nw);
  }
}

template <typename S, bool L2>
void apgd_range(const ApgdBuffers<S>& buf, const ScaleRule& rule, int64_t b, int64_t e, at::opmath_type<S> s1,
                at::opmath_type<S> s2, at::opmath_type<S> rho, at::opmath_type<S> alpha) {
  const at::opmath_type<S> eta = eta_of<S>(rule);
  const S* c = buf.c ? buf.c + b : nullptr;
  with_scale_mode(c, rule, [&](auto mode) {
    apgd_sub<S, L2, decltype(mode)::value>(buf.p + b, buf.d + b, buf.dp + b, buf.g + b, buf.w + b, c, e - b, eta, s1,
                                           s2, rho, alpha);
  });
}

void apgd_step_linf_cpu(at::Tensor& params, at::Tensor& delta, at::Tensor& delta_prev, const at::Tensor& grad,
                        const at::Tensor& w0, const std::optional<at::Tensor>& c, bool adaptive, double eta,
                        const at::Tensor& step_size, double rho, double momentum) {
  const StepCall call = check_apgd_linf(params, delta, delta_prev, grad, w0, c, adaptive, eta, step_size);
  const at::Tensor* cc = call.c;
  const ScaleRule rule = call.rule;
  const int64_t n = params.numel();
  if (n == 0) return;
  const double step = read_scalar(step_size);
  SF_DISPATCH(params.scalar_type(), "sharpfast::apgd_step_linf_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ApgdBuffers<scalar_t> buf(params, delta, delta_prev, grad, w0, cc);
    const acc_t st = static_cast<acc_t>(step), r = static_cast<acc_t>(rho), a = static_cast<acc_t>(momentum);
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      apgd_range<scalar_t, false>(buf, rule, b, e, st, acc_t(0), r, a);
    });
  });
}

void apgd_step_l2_cpu(at::Tensor& params, at::Tensor& delta, at::Tensor& delta_prev, const at::Tensor& grad,
                      const at::Tensor& w0, const std::optional<at::Tensor>& c, bool adaptive, double eta,
                      const at::Tensor& grad_scale, const at::Tensor& lam, double momentum) {
  const StepCall call = check_apgd_l2(params, delta, delta_prev, grad, w0, c, adaptive, eta, grad_scale, lam);
  const at::Tensor* cc = call.c;
  const ScaleRule rule = call.rule;
  const int64_t n = params.numel();
  if (n == 0) return;
  const double gs = read_scalar(grad_scale), lm = read_scalar(lam);
  SF_DISPATCH(params.scalar_type(), "sharpfast::apgd_step_l2_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ApgdBuffers<scalar_t> buf(params, delta, delta_prev, grad, w0, cc);
    const acc_t s = static_cast<acc_t>(gs), l = static_cast<acc_t>(lm), a = static_cast<acc_t>(momentum);
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      apgd_range<scalar_t, true>(buf, rule, b, e, s, l, acc_t(0), a);
    });
  });
}

void copy_if_cpu(at::Tensor& dst, const at::Tensor& src, const at::Tensor& cond) {
  check_copy_if(dst, src, cond);
  if (*cond.data_ptr<bool>()) dst.copy_(src);
}

}  // namespace
}  // namespace cpu
}  // namespace sharpfast

TORCH_LIBRARY_IMPL(sharpfast, CPU, m) {
  using namespace sharpfast::cpu;
  m.impl("apgd_step_linf_", &apgd_step_linf_cpu);
  m.impl("apgd_step_l2_", &apgd_step_l2_cpu);
  m.impl("copy_if_", &copy_if_cpu);
}
