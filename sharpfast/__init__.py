"""sharpfast: fast, exact sharpness measures for PyTorch models.

>>> r = sharpfast.worst_case_sharpness(model, batches, rho=0.002, norm="linf", adaptive=True)
>>> r.sharpness, r.err_sharpness, r.per_batch, r.delta_norm

The names below are imported on first use (PEP 562), so ``import sharpfast`` itself does not load
torch: the ``sharpfast`` command can say "interrupted" for a Ctrl-C that arrives while torch loads.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# each public name, and the module that defines it
_EXPORTS = {
    **dict.fromkeys(["worst_case_sharpness", "average_sharpness", "geodesic_sharpness", "evaluate_sharpness"], "api"),
    **dict.fromkeys(["hessian_trace", "hessian_eigenvalues", "hessian_diagonal", "hessian_spectrum", "adam_sharpness",
                     "renyi_sharpness"], "curvature"),
    **dict.fromkeys(["GLBlock", "GLFactor", "find_gl_blocks", "NoGLBlockWarning", "GeodesicCorrectionWarning",
                     "GeodesicSettings"], "geodesic"),
    **dict.fromkeys(["selftest", "SelfTestReport"], "kernel_check"),
    "evaluate_many": "many",
    **dict.fromkeys(["landscape", "LandscapeResult"], "landscapes"),
    **dict.fromkeys(["LOGIT_NORMALIZATIONS", "map_tensors"], "objective"),
    "SharpnessResult": "result",
    **dict.fromkeys(["NORMS", "WorstCaseSettings", "AverageCaseSettings"], "settings"),
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:   # a submodule (sharpfast.geodesic, sharpfast.compat, ...), as an eager package would have it
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
