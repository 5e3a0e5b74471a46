// CPU APGD steps, published and scaled: the shared element update over flat buffers in one
// pass; copy_if_.
#include "cpu_common.h"

namespace sharpfast {
namespace cpu {
namespace {

template <typename S>
struct ApgdBuffers {
  S* p;
  S* d;   // delta (published) or u (scaled)
  S* dp;  // its previous value
  const S* g;
  const S* w;
  const S* c;  // nullptr: derived from w
  ApgdBuffers(at::Tensor& params, at::Tensor& delta, at::Tensor& delta_prev, const at::Tensor& grad,
              const at::Tensor& w0, const at::Tensor* cc)
      : p(params.data_ptr<S>()), d(delta.data_ptr<S>()), dp(delta_prev.data_ptr<S>()), g(grad.data_ptr<S>()),
        w(w0.data_ptr<S>()), c(scale_data<S>(cc)) {}
};

template <typename S>
struct StepScalars {
  at::opmath_type<S> s1, s2, s3, rho, alpha;
};

// One APGD step over m elements (a plain function with restrict pointers, so it vectorizes): the
// shared element update (elementwise.h step_update), history shift and parameter write.
template <typename S, Step K, ScaleMode M>
void apgd_sub(S* __restrict__ p, S* __restrict__ d, S* __restrict__ dp, const S* __restrict__ g,
              const S* __restrict__ w, const S* __restrict__ c, int64_t m, at::opmath_type<S> eta,
              StepScalars<S> k) {
  using A = at::opmath_type<S>;
  for (int64_t i = 0; i < m; ++i) {
    const A di = static_cast<A>(d[i]), gi = static_cast<A>(g[i]), wi = static_cast<A>(w[i]);
    const A ci = scale_of<M, S, A>(c, i, wi, eta);
    const A nw = step_update<A, K>(di, static_cast<A>(dp[i]), gi, ci, k.s1, k.s2, k.s3, k.rho, k.alpha);
    dp[i] = d[i];
    d[i] = static_cast<S>(nw);
    p[i] = static_cast<S>(wi + perturbation_of<A, K>(nw, ci));
  }
}

// The step of a checked call over all n elements, in parallel (elementwise: any split, same bits).
template <Step K>
void run_step(at::Tensor& params, at::Tensor& delta, at::Tensor& delta_prev, const at::Tensor& grad,
              const at::Tensor& w0, const StepCall& call, double s1, double s2, double s3, double rho,
              double momentum) {
  const int64_t n = params.numel();
  if (n == 0) return;
  const ScaleRule rule = call.rule;
  SF_DISPATCH(params.scalar_type(), "sharpfast::apgd_step", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ApgdBuffers<scalar_t> buf(params, delta, delta_prev, grad, w0, call.c);
    const StepScalars<scalar_t> k{static_cast<acc_t>(s1), static_cast<acc_t>(s2), static_cast<acc_t>(s3),
                                  static_cast<acc_t>(rho), static_cast<acc_t>(momentum)};
    const acc_t eta = eta_of<scalar_t>(rule);
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      const scalar_t* c = buf.c ? buf.c + b : nullptr;
      with_scale_mode(c, rule, [&](auto mode) {
        apgd_sub<scalar_t, K, decltype(mode)::value>(buf.p + b, buf.d + b, buf.dp + b, buf.g + b, buf.w + b, c, e - b,
                                                     eta, k);
      });
    });
  });
}

void apgd_step_linf_cpu(at::Tensor& params, at::Tensor& delta, at::Tensor& delta_prev, const at::Tensor& grad,
                        const at::Tensor& w0, const std::optional<at::Tensor>& c, bool adaptive, double eta,
                        const at::Tensor& step_size, double rho, double momentum) {
  const StepCall call = check_apgd_linf("apgd_step_linf_", params, delta, delta_prev, grad, w0, c, adaptive, eta,
                                        step_size);
  run_step<Step::linf>(params, delta, delta_prev, grad, w0, call, read_scalar(step_size), 0.0, 0.0, rho, momentum);
}

void apgd_step_l2_cpu(at::Tensor& params, at::Tensor& delta, at::Tensor& delta_prev, const at::Tensor& grad,
                      const at::Tensor& w0, const std::optional<at::Tensor>& c, bool adaptive, double eta,
                      const at::Tensor& grad_scale, const at::Tensor& lam, double momentum) {
  const StepCall call = check_apgd_l2(params, delta, delta_prev, grad, w0, c, adaptive, eta, grad_scale, lam);
  run_step<Step::l2>(params, delta, delta_prev, grad, w0, call, read_scalar(grad_scale), read_scalar(lam), 0.0, 0.0,
                     momentum);
}

void scaled_step_linf_cpu(at::Tensor& params, at::Tensor& u, at::Tensor& u_prev, const at::Tensor& grad,
                          const at::Tensor& w0, const std::optional<at::Tensor>& c, bool adaptive, double eta,
                          const at::Tensor& step_size, double rho, double momentum) {
  const StepCall call = check_apgd_linf("scaled_step_linf_", params, u, u_prev, grad, w0, c, adaptive, eta, step_size);
  run_step<Step::scaled_linf>(params, u, u_prev, grad, w0, call, read_scalar(step_size), 0.0, 0.0, rho, momentum);
}

void scaled_step_l2_cpu(at::Tensor& params, at::Tensor& u, at::Tensor& u_prev, const at::Tensor& grad,
                        const at::Tensor& w0, const std::optional<at::Tensor>& c, bool adaptive, double eta,
                        const at::Tensor& gram, const at::Tensor& step_size, double rho, double momentum) {
  const StepCall call = check_scaled_l2(params, u, u_prev, grad, w0, c, adaptive, eta, gram, step_size);
  const ScaledL2Coefficients k = scaled_l2_coefficients(gram.data_ptr<double>(), read_scalar(step_size), rho,
                                                        momentum);
  run_step<Step::scaled_l2>(params, u, u_prev, grad, w0, call, k.a, k.b, k.e, 0.0, 0.0);
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
  m.impl("scaled_step_linf_", &scaled_step_linf_cpu);
  m.impl("scaled_step_l2_", &scaled_step_l2_cpu);
  m.impl("copy_if_", &copy_if_cpu);
}
