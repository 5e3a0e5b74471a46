"""sharpfast: fast, exact sharpness measures for PyTorch models.

>>> r = sharpfast.worst_case_sharpness(model, batches, rho=0.002, norm="linf", adaptive=True)
>>> r.sharpness, r.err_sharpness, r.per_batch, r.delta_norm
"""
from .api import average_sharpness, evaluate_sharpness, geodesic_sharpness, worst_case_sharpness
from .curvature import (adam_sharpness, hessian_diagonal, hessian_eigenvalues, hessian_spectrum, hessian_trace,
                        renyi_sharpness)
from .geodesic import GLBlock, GLFactor, NoGLBlockWarning, find_gl_blocks
from .kernel_check import SelfTestReport, selftest
from .many import evaluate_many
from .objective import LOGIT_NORMALIZATIONS, map_tensors
from .result import SharpnessResult
from .settings import NORMS, AverageCaseSettings, GeodesicSettings, WorstCaseSettings

__version__ = "0.1.0"
__all__ = ["worst_case_sharpness", "average_sharpness", "geodesic_sharpness", "GLBlock", "GLFactor", "find_gl_blocks", "NoGLBlockWarning",
           "GeodesicSettings", "evaluate_sharpness", "evaluate_many", "hessian_trace", "hessian_eigenvalues",
           "hessian_diagonal", "hessian_spectrum", "adam_sharpness", "renyi_sharpness", "WorstCaseSettings",
           "AverageCaseSettings", "SharpnessResult", "selftest", "SelfTestReport", "NORMS", "LOGIT_NORMALIZATIONS",
           "map_tensors", "__version__"]
