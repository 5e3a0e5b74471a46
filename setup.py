"""Build sharpfast and its extension ``sharpfast._C``.

The C++ sources are always compiled. CUDA sources are added when the installed torch was
built with CUDA *and* a CUDA toolkit is found (``CUDA_HOME``); a CPU-only torch wheel lacks
the c10/cuda headers even where ``nvcc`` is on the PATH. Override with ``FORCE_CUDA=1`` or
``FORCE_ONLY_CPU=1``. Install with ``pip install --no-build-isolation -e .`` so the build uses
the torch that is already installed (pin ``torch==2.13.0``; never let pip pick another).
"""
import glob
import os
import sys

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
# IEEE division and square root, subnormals kept, no FMA contraction (.ci/nvcc_check.sh uses the same)
NVCC_EXACT_MATH = ["-fmad=false", "--prec-div=true", "--prec-sqrt=true", "--ftz=false"]
# A range, never a pin: CI builds against 2.13.0 (CPU) and 2.14.1 (CUDA 13); 2.11 is what the
# GPU machines sharpfast is run on provide.
TORCH_REQUIREMENT = "torch>=2.11"


def _want_cuda() -> bool:
    if os.environ.get("FORCE_ONLY_CPU") == "1":
        return False
    if os.environ.get("FORCE_CUDA") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # -fno-math-errno: sqrt/log without errno bookkeeping, so the sampling loops vectorize.
    # -ffp-contract=off: no FMA contraction (GCC's default is "fast", which contracts wherever
    # the target has FMA instructions, aarch64 among them), so CPU and CUDA round alike.
    # -fopenmp: at::parallel_for is a header template that runs serially unless the extension
    # itself is compiled with OpenMP (torch's own libgomp.so.1 is reused at load time).
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    cxx = ["-O3", "-fno-math-errno", "-ffp-contract=off"] + openmp
    if _want_cuda():
        # torch-free kernels (*.cu, checked by .ci/nvcc_check.sh) + ATen host glue (*.cpp)
        sources += rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
        nvcc = ["-O3", "-lineinfo"] + NVCC_EXACT_MATH
        return CUDAExtension("sharpfast._C", sources, include_dirs=include_dirs,
                             define_macros=[("SHARPFAST_WITH_CUDA", "1")],
                             extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=openmp)
    return CppExtension("sharpfast._C", sources, include_dirs=include_dirs,
                        extra_compile_args={"cxx": cxx}, extra_link_args=openmp)


setup(
    name="sharpfast",
    version="0.1.0",
    description="Fast, exact sharpness measures (average- and worst-case, adaptive) for PyTorch models",
    packages=find_packages(include=["sharpfast", "sharpfast.*"]),
    python_requires=">=3.10",
    install_requires=[TORCH_REQUIREMENT, "numpy", "scipy", "scikit-learn", "safetensors", "tqdm",
                      "pyyaml", "matplotlib", "plotly>=5.0"],
    extras_require={"test": ["pytest", "hypothesis", "pytest-benchmark", "ray", "transformers", "selenium", "h5py"],
                    "ray": ["ray"], "hf": ["transformers"], "landscape": ["h5py"]},
    entry_points={"console_scripts": ["sharpfast=sharpfast.__main__:main"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
