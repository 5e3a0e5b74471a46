// sharpfast._C: one registration of every op (TORCH_LIBRARY) plus a pybind11 module that
// reports how the extension was built.
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

namespace py = pybind11;

TORCH_LIBRARY(sharpfast, m) {}

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
    return info;
  });
}
