// Argument checks shared by the CPU and CUDA implementations of sharpfast's ops (ATen side;
// the kernels themselves only see raw pointers).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "sharpfast/elementwise.h"
#include "sharpfast/philox.h"

namespace sharpfast {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// A flat buffer: 1-D, contiguous, fp32/fp64/fp16/bf16.
inline void check_flat(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "sharpfast: argument '", name, "' is undefined");
  TORCH_CHECK(t.dim() == 1, "sharpfast: argument '", name, "' must be a 1-D flat buffer, got shape ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "sharpfast: argument '", name, "' must be contiguous");
  TORCH_CHECK(is_supported_float(t.scalar_type()), "sharpfast: argument '", name,
              "' must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

// `t` must match `ref` in dtype, device and length.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  check_flat(t, name);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "sharpfast: argument '", name, "' has dtype ",
              t.scalar_type(), " but '", ref_name, "' has dtype ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "sharpfast: argument '", name, "' is on ", t.device(), " but '",
              ref_name, "' is on ", ref.device());
  TORCH_CHECK(t.numel() == ref.numel(), "sharpfast: argument '", name, "' has ", t.numel(),
              " elements but '", ref_name, "' has ", ref.numel());
}

// A 0-dim scalar tensor on `device`, float64 (or float32 where allow_float is set).
inline void check_scalar(const at::Tensor& t, const char* name, const at::Device& device, bool allow_float) {
  TORCH_CHECK(t.defined(), "sharpfast: argument '", name, "' is undefined");
  TORCH_CHECK(t.dim() == 0, "sharpfast: argument '", name, "' must be a 0-dim tensor, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kDouble || (allow_float && t.scalar_type() == at::kFloat),
              "sharpfast: argument '", name, "' must be a float64", allow_float ? " (or float32)" : "",
              " tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, "sharpfast: argument '", name, "' is on ", t.device(),
              " but the buffers are on ", device);
}

// The memory an op argument spans, for the overlap check below (flat buffers are contiguous,
// so a tensor's elements lie in [data, data + nbytes)).
struct Span {
  uintptr_t begin, end;
  const char* name;
  int64_t index;  // position in a tensor list, or -1
  bool written;
};

inline void add_span(std::vector<Span>& spans, const at::Tensor* t, const char* name, bool written,
                     int64_t index = -1) {
  if (t == nullptr || !t->defined() || t->numel() == 0) return;
  const auto begin = reinterpret_cast<uintptr_t>(t->data_ptr());
  spans.push_back({begin, begin + static_cast<uintptr_t>(t->numel() * t->element_size()), name, index, written});
}

inline std::string span_label(const Span& s) {
  return "'" + std::string(s.name) + (s.index >= 0 ? "[" + std::to_string(s.index) + "]" : "") + "'";
}

// No tensor an op writes may share memory with any other argument: the kernels take
// __restrict__ pointers, and an aliased write would silently change what is read. Sorted by
// start address, a span overlaps an earlier one iff it starts before that one ends, so one
// sweep (tracking the furthest end of any span and of any written span) finds every clash.
inline void check_no_overlap(std::vector<Span> spans, const char* op) {
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  const Span* furthest = nullptr;          // the span reaching furthest so far
  const Span* furthest_written = nullptr;  // ... among the written ones
  for (const Span& s : spans) {
    const Span* clash = nullptr;
    if (furthest_written != nullptr && s.begin < furthest_written->end) clash = furthest_written;
    else if (s.written && furthest != nullptr && s.begin < furthest->end) clash = furthest;
    TORCH_CHECK(clash == nullptr, "sharpfast: ", op, " writes ", span_label(clash && clash->written ? *clash : s),
                " but it shares memory with ", span_label(clash && clash->written ? s : *clash),
                "; pass separate buffers");
    if (furthest == nullptr || s.end > furthest->end) furthest = &s;
    if (s.written && (furthest_written == nullptr || s.end > furthest_written->end)) furthest_written = &s;
  }
}

inline Dist parse_distribution(c10::string_view s) {
  if (s == "normal") return Dist::normal;
  if (s == "uniform") return Dist::uniform;
  if (s == "rademacher") return Dist::rademacher;
  TORCH_CHECK(false, "sharpfast: unknown distribution '", std::string(s.data(), s.size()),
              "'; expected 'normal', 'uniform' or 'rademacher'");
}

inline uint32_t check_u32(int64_t v, const char* name) {
  TORCH_CHECK(v >= 0 && v <= static_cast<int64_t>(UINT32_MAX), "sharpfast: argument '", name,
              "' must be in [0, 2^32), got ", v);
  return static_cast<uint32_t>(v);
}

// Counter arguments of the sampling ops. `seed` is a 64-bit unsigned seed passed through an
// int64 schema argument (bit reinterpretation: Python maps s >= 2^63 to s - 2^64).
struct Counter {
  uint64_t seed;
  uint32_t rng_stream;
  uint32_t sample;
  uint64_t offset;
};

inline Counter check_counter(int64_t seed, int64_t rng_stream, int64_t sample, int64_t offset, int64_t numel,
                             int64_t n_samples = 1) {
  Counter k;
  k.seed = static_cast<uint64_t>(seed);
  k.rng_stream = check_u32(rng_stream, "rng_stream");
  k.sample = check_u32(sample, "sample");
  TORCH_CHECK(n_samples <= 1 || static_cast<int64_t>(k.sample) + n_samples - 1 <= static_cast<int64_t>(UINT32_MAX),
              "sharpfast: sample indices ", sample, " .. ", sample + n_samples - 1, " exceed 2^32 - 1");
  TORCH_CHECK(offset >= 0, "sharpfast: argument 'offset' must be >= 0, got ", offset);
  TORCH_CHECK(numel <= INT64_MAX - offset, "sharpfast: offset + numel overflows");
  k.offset = static_cast<uint64_t>(offset);
  return k;
}

// The scale argument of an op: a buffer `c` like `ref`, or none, in which case the kernels
// derive c from w0 by the rule (adaptive, eta). Returns the buffer or nullptr.
inline void check_eta(double eta) {
  TORCH_CHECK(std::isfinite(eta) && eta >= 0.0, "sharpfast: argument 'eta' must be finite and >= 0, got ", eta);
}

inline const at::Tensor* check_scale(const std::optional<at::Tensor>& c, const at::Tensor& ref, const char* ref_name,
                                     bool adaptive, double eta) {
  check_eta(eta);
  if (!c.has_value() || !c->defined()) return nullptr;
  check_like(*c, "c", ref, ref_name);
  return &*c;
}

// The scale buffer's data, or nullptr when c is derived from w0.
template <typename S>
const S* scale_data(const at::Tensor* c) {
  return c ? c->data_ptr<S>() : nullptr;
}

// The checked arguments of perturb_tensors_: each piece's scale buffer (nullptr: derived from
// w0) and the counter shared by the pieces (each piece draws from its own offset).
struct Pieces {
  std::vector<const at::Tensor*> scales;
  Counter counter;
  Dist dist;
  ScaleRule rule;
};

// Checks of perturb_tensors_: pieces out[p] like w0[p] (one dtype and device for all), their
// scales (none: derived from w0), offsets and counters.
inline Pieces check_pieces(at::TensorList out, at::TensorList w0, at::TensorList c, at::IntArrayRef offsets,
                           bool adaptive, double eta, int64_t seed, int64_t rng_stream, int64_t sample,
                           c10::string_view distribution) {
  const size_t P = w0.size();
  TORCH_CHECK(out.size() == P && offsets.size() == P, "sharpfast: perturb_tensors_ needs as many 'out' tensors (",
              out.size(), ") and offsets (", offsets.size(), ") as 'w0' tensors (", P, ")");
  TORCH_CHECK(c.empty() || c.size() == P, "sharpfast: argument 'c' must be empty (c derived from w0) or hold one "
              "tensor per piece, got ", c.size(), " for ", P, " pieces");
  check_eta(eta);
  Pieces pieces{std::vector<const at::Tensor*>(P, nullptr), check_counter(seed, rng_stream, sample, 0, 0),
                parse_distribution(distribution), ScaleRule{adaptive, eta}};
  for (size_t p = 0; p < P; ++p) {
    check_flat(w0[p], "w0");
    TORCH_CHECK(w0[p].scalar_type() == w0[0].scalar_type() && w0[p].device() == w0[0].device(),
                "sharpfast: the 'w0' pieces must share one dtype and device");
    check_like(out[p], "out", w0[p], "w0");
    check_counter(seed, rng_stream, sample, offsets[p], w0[p].numel());
    if (!c.empty()) {
      check_like(c[p], "c", w0[p], "w0");
      pieces.scales[p] = &c[p];  // the caller's list outlives the op
    }
  }
  std::vector<Span> spans;
  for (size_t p = 0; p < P; ++p) {
    const auto i = static_cast<int64_t>(p);
    add_span(spans, &out[p], "out", true, i);
    add_span(spans, &w0[p], "w0", false, i);
    add_span(spans, pieces.scales[p], "c", false, i);
  }
  check_no_overlap(std::move(spans), "perturb_tensors_");
  return pieces;
}

// Checks of the batched perturbation; returns the number of distinct samples.
inline int64_t check_batched(const at::Tensor& out, const at::Tensor& w0, bool antithetic) {
  check_flat(w0, "w0");
  TORCH_CHECK(out.dim() == 2, "sharpfast: argument 'out' must be a [K, N] tensor, got shape ", out.sizes());
  TORCH_CHECK(out.is_contiguous(), "sharpfast: argument 'out' must be contiguous");
  TORCH_CHECK(out.scalar_type() == w0.scalar_type(), "sharpfast: argument 'out' has dtype ", out.scalar_type(),
              " but 'w0' has dtype ", w0.scalar_type());
  TORCH_CHECK(out.device() == w0.device(), "sharpfast: argument 'out' is on ", out.device(), " but 'w0' is on ",
              w0.device());
  TORCH_CHECK(out.size(1) == w0.numel(), "sharpfast: argument 'out' has rows of length ", out.size(1),
              " but 'w0' has ", w0.numel(), " elements");
  const int64_t K = out.size(0);
  TORCH_CHECK(!antithetic || K % 2 == 0, "sharpfast: antithetic sampling needs an even number of rows, got K = ", K);
  return antithetic ? K / 2 : K;
}

inline void check_step_buffers(const at::Tensor& params, const at::Tensor& delta, const at::Tensor& delta_prev,
                               const at::Tensor& grad, const at::Tensor& w0) {
  check_flat(params, "params");
  check_like(delta, "delta", params, "params");
  check_like(delta_prev, "delta_prev", params, "params");
  check_like(grad, "grad", params, "params");
  check_like(w0, "w0", params, "params");
}

// The overlap checks of the ops that write: a perturbation's rows, an APGD step's buffers.
inline void check_out_no_overlap(const char* op, const at::Tensor& out, const at::Tensor& w0, const at::Tensor* c) {
  std::vector<Span> spans;
  add_span(spans, &out, "out", true);
  add_span(spans, &w0, "w0", false);
  add_span(spans, c, "c", false);
  check_no_overlap(std::move(spans), op);
}

inline void check_step_no_overlap(const char* op, const at::Tensor& params, const at::Tensor& delta,
                                  const at::Tensor& delta_prev, const at::Tensor& grad, const at::Tensor& w0,
                                  const at::Tensor* c) {
  std::vector<Span> spans;
  add_span(spans, &params, "params", true);
  add_span(spans, &delta, "delta", true);
  add_span(spans, &delta_prev, "delta_prev", true);
  add_span(spans, &grad, "grad", false);
  add_span(spans, &w0, "w0", false);
  add_span(spans, c, "c", false);
  check_no_overlap(std::move(spans), op);
}

inline void check_lambdas(const at::Tensor& lambdas, const at::Device& device) {
  TORCH_CHECK(lambdas.dim() == 1, "sharpfast: argument 'lambdas' must be 1-D, got shape ", lambdas.sizes());
  TORCH_CHECK(lambdas.scalar_type() == at::kDouble, "sharpfast: argument 'lambdas' must be float64, got ",
              lambdas.scalar_type());
  TORCH_CHECK(lambdas.device() == device, "sharpfast: argument 'lambdas' is on ", lambdas.device(),
              " but the buffers are on ", device);
}

inline void check_copy_if(const at::Tensor& dst, const at::Tensor& src, const at::Tensor& cond) {
  TORCH_CHECK(dst.is_contiguous() && src.is_contiguous(), "sharpfast: copy_if_ needs contiguous 'dst' and 'src'");
  TORCH_CHECK(dst.scalar_type() == src.scalar_type(), "sharpfast: argument 'src' has dtype ", src.scalar_type(),
              " but 'dst' has dtype ", dst.scalar_type());
  TORCH_CHECK(dst.device() == src.device(), "sharpfast: argument 'src' is on ", src.device(), " but 'dst' is on ",
              dst.device());
  TORCH_CHECK(dst.sizes() == src.sizes(), "sharpfast: argument 'src' has shape ", src.sizes(),
              " but 'dst' has shape ", dst.sizes());
  TORCH_CHECK(cond.dim() == 0 && cond.scalar_type() == at::kBool,
              "sharpfast: argument 'cond' must be a 0-dim bool tensor, got ", cond.scalar_type(), " of shape ",
              cond.sizes());
  TORCH_CHECK(cond.device() == dst.device(), "sharpfast: argument 'cond' is on ", cond.device(),
              " but 'dst' is on ", dst.device());
  std::vector<Span> spans;
  add_span(spans, &dst, "dst", true);
  add_span(spans, &src, "src", false);
  add_span(spans, &cond, "cond", false);
  check_no_overlap(std::move(spans), "copy_if_");
}

// ------------------------------------------------------------------------------------------
// One check per op, shared by the CPU and CUDA implementations: every argument checked, parsed
// into what the loops and kernels take. (The CUDA glue adds only that the tensors are on a GPU.)

// A sampling op: the counter, the distribution, the scale (buffer or rule) and the rows.
struct SampleCall {
  Counter k;
  Dist dist;
  const at::Tensor* c;  // nullptr: derived from w0 by rule
  ScaleRule rule;
  int64_t n_samples;    // distinct samples (rows / 2 when antithetic)
};

inline SampleCall check_draw(const at::Tensor& out, int64_t seed, int64_t rng_stream, int64_t sample, int64_t offset,
                             c10::string_view distribution) {
  check_flat(out, "out");
  return {check_counter(seed, rng_stream, sample, offset, out.numel()), parse_distribution(distribution), nullptr,
          ScaleRule{false, 0.0}, 1};
}

inline SampleCall check_perturb(const at::Tensor& out, const at::Tensor& w0, const std::optional<at::Tensor>& c,
                                bool adaptive, double eta, int64_t seed, int64_t rng_stream, int64_t sample,
                                int64_t offset, c10::string_view distribution) {
  check_flat(w0, "w0");
  check_like(out, "out", w0, "w0");
  const at::Tensor* cc = check_scale(c, w0, "w0", adaptive, eta);
  check_out_no_overlap("perturb_", out, w0, cc);
  return {check_counter(seed, rng_stream, sample, offset, w0.numel()), parse_distribution(distribution), cc,
          ScaleRule{adaptive, eta}, 1};
}

inline SampleCall check_perturb_batched(const at::Tensor& out, const at::Tensor& w0,
                                        const std::optional<at::Tensor>& c, bool adaptive, double eta, int64_t seed,
                                        int64_t rng_stream, int64_t first_sample, int64_t offset,
                                        c10::string_view distribution, bool antithetic) {
  const int64_t n_samples = check_batched(out, w0, antithetic);
  const at::Tensor* cc = check_scale(c, w0, "w0", adaptive, eta);
  check_out_no_overlap("perturb_batched_", out, w0, cc);
  return {check_counter(seed, rng_stream, first_sample, offset, w0.numel(), n_samples),
          parse_distribution(distribution), cc, ScaleRule{adaptive, eta}, n_samples};
}

// An APGD step: the scale; its device scalars are checked here, read by the backend.
struct StepCall {
  const at::Tensor* c;  // nullptr: derived from w0 by rule
  ScaleRule rule;
};

inline StepCall check_apgd_step(const char* op, const at::Tensor& params, const at::Tensor& delta,
                                const at::Tensor& delta_prev, const at::Tensor& grad, const at::Tensor& w0,
                                const std::optional<at::Tensor>& c, bool adaptive, double eta) {
  check_step_buffers(params, delta, delta_prev, grad, w0);
  const at::Tensor* cc = check_scale(c, params, "params", adaptive, eta);
  check_step_no_overlap(op, params, delta, delta_prev, grad, w0, cc);
  return {cc, ScaleRule{adaptive, eta}};
}

// apgd_step_linf_ and scaled_step_linf_ (one schema; `op` names the one called).
inline StepCall check_apgd_linf(const char* op, const at::Tensor& params, const at::Tensor& delta,
                                const at::Tensor& delta_prev, const at::Tensor& grad, const at::Tensor& w0,
                                const std::optional<at::Tensor>& c, bool adaptive, double eta,
                                const at::Tensor& step_size) {
  const StepCall call = check_apgd_step(op, params, delta, delta_prev, grad, w0, c, adaptive, eta);
  check_scalar(step_size, "step_size", params.device(), true);
  return call;
}

inline StepCall check_apgd_l2(const at::Tensor& params, const at::Tensor& delta, const at::Tensor& delta_prev,
                              const at::Tensor& grad, const at::Tensor& w0, const std::optional<at::Tensor>& c,
                              bool adaptive, double eta, const at::Tensor& grad_scale, const at::Tensor& lam) {
  const StepCall call = check_apgd_step("apgd_step_l2_", params, delta, delta_prev, grad, w0, c, adaptive, eta);
  check_scalar(grad_scale, "grad_scale", params.device(), true);
  check_scalar(lam, "lam", params.device(), false);
  return call;
}

// The scaled l2 step: `gram` is scaled_gram's float64 [7] result for (u, u_prev, grad), on the
// buffers' device; the step size a device scalar.
inline StepCall check_scaled_l2(const at::Tensor& params, const at::Tensor& u, const at::Tensor& u_prev,
                                const at::Tensor& grad, const at::Tensor& w0, const std::optional<at::Tensor>& c,
                                bool adaptive, double eta, const at::Tensor& gram, const at::Tensor& step_size) {
  const StepCall call = check_apgd_step("scaled_step_l2_", params, u, u_prev, grad, w0, c, adaptive, eta);
  TORCH_CHECK(gram.dim() == 1 && gram.numel() == kGramEntries && gram.is_contiguous(),
              "sharpfast: argument 'gram' must be a contiguous [", static_cast<int>(kGramEntries),
              "] tensor (scaled_gram's result), got shape ", gram.sizes());
  TORCH_CHECK(gram.scalar_type() == at::kDouble, "sharpfast: argument 'gram' must be float64, got ",
              gram.scalar_type());
  TORCH_CHECK(gram.device() == params.device(), "sharpfast: argument 'gram' is on ", gram.device(),
              " but the buffers are on ", params.device());
  check_scalar(step_size, "step_size", params.device(), true);
  return call;
}

inline StepCall check_scaled_gram(const at::Tensor& u, const at::Tensor& u_prev, const at::Tensor& grad,
                                  const at::Tensor& w0, const std::optional<at::Tensor>& c, bool adaptive,
                                  double eta) {
  check_flat(u, "u");
  check_like(u_prev, "u_prev", u, "u");
  check_like(grad, "grad", u, "u");
  check_like(w0, "w0", u, "u");
  return {check_scale(c, u, "u", adaptive, eta), ScaleRule{adaptive, eta}};
}

inline StepCall check_ellipsoid_sq_norms(const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& w0,
                                         const std::optional<at::Tensor>& c, bool adaptive, double eta,
                                         const at::Tensor& grad_scale, const at::Tensor& lambdas) {
  check_flat(delta, "delta");
  check_like(grad, "grad", delta, "delta");
  check_like(w0, "w0", delta, "delta");
  const at::Tensor* cc = check_scale(c, delta, "delta", adaptive, eta);
  check_scalar(grad_scale, "grad_scale", delta.device(), true);
  check_lambdas(lambdas, delta.device());
  return {cc, ScaleRule{adaptive, eta}};
}

// Checks of SAM's op family over a parameter list: grad[p] (and saved[p], where given) like w[p],
// one dtype and device for all; nothing written shares memory with anything else.
inline void check_sam(at::TensorList w, const at::TensorList* saved, at::TensorList grad, double eta, const char* op) {
  const size_t P = w.size();
  TORCH_CHECK(grad.size() == P && (saved == nullptr || saved->size() == P), "sharpfast: ", op,
              " needs as many 'grad' tensors (", grad.size(), ")", saved != nullptr ? " and 'saved' tensors (" : "",
              saved != nullptr ? std::to_string(saved->size()) + ")" : std::string(), " as 'w' tensors (", P, ")");
  check_eta(eta);
  std::vector<Span> spans;
  for (size_t p = 0; p < P; ++p) {
    check_flat(w[p], "w");
    TORCH_CHECK(w[p].scalar_type() == w[0].scalar_type() && w[p].device() == w[0].device(), "sharpfast: ", op,
                ": the 'w' tensors must share one dtype and device");
    check_like(grad[p], "grad", w[p], "w");
    const auto i = static_cast<int64_t>(p);
    add_span(spans, &w[p], "w", saved != nullptr, i);
    add_span(spans, &grad[p], "grad", false, i);
    if (saved != nullptr) {
      check_like((*saved)[p], "saved", w[p], "w");
      add_span(spans, &(*saved)[p], "saved", true, i);
    }
  }
  check_no_overlap(std::move(spans), op);
}

}  // namespace sharpfast
