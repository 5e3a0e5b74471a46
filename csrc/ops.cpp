// sharpfast._C: one registration of every op (TORCH_LIBRARY) plus a pybind11 module that
// reports how the extension was built.
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

#include <stdexcept>
#include <string>

#include "cpu/isa.h"

namespace py = pybind11;

#ifdef SHARPFAST_WITH_CUDA
namespace sharpfast { namespace cuda { int build_cuda_version(); const char* build_cuda_archs(); } }
#endif

// Seeds are 64-bit unsigned integers carried in the int64 `seed` arguments (bit reinterpretation;
// sharpfast/_ops.py maps s >= 2^63 to s - 2^64). `rng_stream` (the Philox stream, not a CUDA
// stream) and `sample` are in [0, 2^32).
// Element i of a buffer has the global element index offset + i for the counter RNG.
// The scale c: the buffer `c`, or when it is None, derived from w0 in the kernels:
// |w0| + eta (rounded to the buffer's dtype) where `adaptive`, else 1.
// Every op, once: its name and schema. TORCH_LIBRARY defines them; build_info lists them.
struct OpSchema {
  const char* name;
  const char* schema;
};
constexpr OpSchema kOps[] = {
    {"draw_", "(Tensor(a!) out, int seed, int rng_stream, int sample, int offset, str distribution) -> ()"},
    {"perturb_", "(Tensor(a!) out, Tensor w0, Tensor? c, bool adaptive, float eta, float rho, int seed, "
                 "int rng_stream, int sample, int offset, str distribution) -> ()"},
    {"perturb_batched_", "(Tensor(a!) out, Tensor w0, Tensor? c, bool adaptive, float eta, float rho, int seed, "
                         "int rng_stream, int first_sample, int offset, str distribution, bool antithetic) -> ()"},
    // perturb_ over pieces of one coordinate space (a model's parameter tensors, read where they
    // lie); c: one tensor per piece, or none (derived from w0)
    {"perturb_tensors_", "(Tensor(a!)[] out, Tensor[] w0, Tensor[] c, bool adaptive, float eta, float rho, int seed, "
                         "int rng_stream, int sample, int[] offsets, str distribution) -> ()"},
    {"apgd_step_linf_", "(Tensor(a!) params, Tensor(b!) delta, Tensor(c!) delta_prev, Tensor grad, Tensor w0, "
                        "Tensor? c, bool adaptive, float eta, Tensor step_size, float rho, float momentum) -> ()"},
    {"ellipsoid_sq_norms", "(Tensor delta, Tensor grad, Tensor w0, Tensor? c, bool adaptive, float eta, "
                           "Tensor grad_scale, Tensor lambdas) -> Tensor"},
    {"apgd_step_l2_", "(Tensor(a!) params, Tensor(b!) delta, Tensor(c!) delta_prev, Tensor grad, Tensor w0, "
                      "Tensor? c, bool adaptive, float eta, Tensor grad_scale, Tensor lam, float momentum) -> ()"},
    // the scaled solver (APGD in u = delta / c): params = w0 + c u
    {"scaled_step_linf_", "(Tensor(a!) params, Tensor(b!) u, Tensor(c!) u_prev, Tensor grad, Tensor w0, "
                          "Tensor? c, bool adaptive, float eta, Tensor step_size, float rho, float momentum) -> ()"},
    {"scaled_step_l2_", "(Tensor(a!) params, Tensor(b!) u, Tensor(c!) u_prev, Tensor grad, Tensor w0, "
                        "Tensor? c, bool adaptive, float eta, Tensor gram, Tensor step_size, float rho, "
                        "float momentum) -> ()"},
    {"scaled_gram", "(Tensor u, Tensor u_prev, Tensor grad, Tensor w0, Tensor? c, bool adaptive, float eta) -> Tensor"},
    {"copy_if_", "(Tensor(a!) dst, Tensor src, Tensor cond) -> ()"},
    {"sum_squares", "(Tensor x) -> Tensor"},
    // SAM (sharpfast.optim) over a parameter list, T = |w| + eta (adaptive) or 1: sum_p ||T g_p||^2
    // (float64); then saved = w and w += T^2 g s in one pass (s: a 0-dim float64 device tensor)
    {"sam_sq_norm", "(Tensor[] grad, Tensor[] w, bool adaptive, float eta) -> Tensor"},
    {"sam_perturb_", "(Tensor(a!)[] w, Tensor(b!)[] saved, Tensor[] grad, bool adaptive, float eta, Tensor s) -> ()"},
};

TORCH_LIBRARY(sharpfast, m) {
  for (const OpSchema& op : kOps) m.def((std::string(op.name) + op.schema).c_str());  // parsed at once
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "sharpfast native core";
  m.def("build_info", []() {
    py::dict info;
#ifdef SHARPFAST_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    info["torch"] = TORCH_VERSION;
#ifdef _OPENMP
    info["openmp"] = true;   // at::parallel_for runs in parallel only in OpenMP-compiled code
#else
    info["openmp"] = false;
#endif
#ifdef SHARPFAST_WITH_CUDA
    {
      const int v = sharpfast::cuda::build_cuda_version();  // CUDART_VERSION, e.g. 12080
      info["cuda_version"] = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
      py::list archs;  // "800,900" -> ["sm_80", "sm_90"]
      std::string list = sharpfast::cuda::build_cuda_archs();
      for (size_t start = 0; start < list.size();) {
        size_t end = list.find(',', start);
        if (end == std::string::npos) end = list.size();
        const int arch = std::stoi(list.substr(start, end - start));
        archs.append("sm_" + std::to_string(arch / 10));
        start = end + 1;
      }
      info["cuda_archs"] = archs;
    }
#else
    info["cuda_version"] = py::none();
    info["cuda_archs"] = py::list();
#endif
    py::list dtypes;
    for (const char* d : {"float32", "float64", "float16", "bfloat16"}) dtypes.append(d);
    info["dtypes"] = dtypes;
    py::list ops;
    for (const OpSchema& op : kOps) ops.append(op.name);
    info["ops"] = ops;
    info["rng"] = "philox4x32-10";
    py::list isas;
    for (sharpfast::cpu::Isa isa : sharpfast::cpu::supported_isas()) isas.append(sharpfast::cpu::isa_name(isa));
    info["cpu_isas"] = isas;
    return info;
  });
  // the CPU sampling loops' instruction set (csrc/cpu/isa.h): read, or set by name (tests force each)
  m.def("cpu_isa", []() { return std::string(sharpfast::cpu::isa_name(sharpfast::cpu::active_isa())); });
  m.def("set_cpu_isa", [](const std::string& name) { sharpfast::cpu::set_isa(name); });  // ValueError if unknown
}
