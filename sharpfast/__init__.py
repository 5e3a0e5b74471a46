"""sharpfast: fast, exact sharpness measures for PyTorch models.

>>> r = sharpfast.worst_case_sharpness(model, batches, rho=0.002, norm="linf", adaptive=True)
>>> r.sharpness, r.err_sharpness, r.per_batch, r.delta_norm
"""
from .api import average_sharpness, evaluate_sharpness, worst_case_sharpness
from .curvature import hessian_diagonal, hessian_eigenvalues, hessian_trace
from .kernel_check import SelfTestReport, selftest
from .objective import LOGIT_NORMALIZATIONS
from .result import SharpnessResult
from .settings import NORMS, AverageCaseSettings, WorstCaseSettings

__version__ = "0.1.0"
__all__ = ["worst_case_sharpness", "average_sharpness", "evaluate_sharpness", "hessian_trace", "hessian_eigenvalues",
           "hessian_diagonal", "WorstCaseSettings",
           "AverageCaseSettings", "SharpnessResult", "selftest", "SelfTestReport", "NORMS", "LOGIT_NORMALIZATIONS",
           "__version__"]
