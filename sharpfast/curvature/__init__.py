"""Curvature: the rho -> 0 limits of sharpness and the Hessian measures beside it, per m-batch
and averaged over batches as the sharpness functions are.

``C = diag(c)`` is the sharpness scale (``adaptive=True``: ``c = |w|``, as the sharpness
functions default to; ``adaptive=False``: the plain Hessian measures). ``curvature="ggn"`` uses
the generalized Gauss-Newton matrix (positive semi-definite for convex losses) in place of the
Hessian. Every function leaves the model exactly as it was, and measures float16/bfloat16 models
on a float32 copy (``low_precision``), as the sharpness functions do.

* :func:`hessian_trace` — ``tr(C H C)`` by Hutch++ or Hutchinson, with its standard error;
* :func:`hessian_eigenvalues` — the largest eigenvalues of ``C H C`` by Lanczos, to a tolerance;
* :func:`hessian_diagonal` — ``diag(C H C)``, exact (one product per coordinate) or estimated;
* :func:`hessian_spectrum` — stochastic Lanczos quadrature of the eigenvalue density;
* :func:`adam_sharpness` — ``tr(diag(C H C)^{1/2})``, the quantity Adam's implicit bias favours
  small (where SGD with label noise favours a small ``tr(H)``);
* :func:`renyi_sharpness` — ``log tr(P^alpha) / (alpha - 1)`` for ``P = H / tr H``, the negative
  Rényi entropy of the eigenvalue distribution.
"""
from .measures import (MAX_EXACT_DIAGONAL, adam_sharpness, hessian_diagonal, hessian_eigenvalues, hessian_spectrum,
                       hessian_trace, renyi_sharpness)
from .operator import CURVATURES
from .results import AdamResult, EigenResult, RenyiResult, SpectrumResult, TraceResult
from .settings import ESTIMATORS, CurvatureSettings

__all__ = ["hessian_trace", "hessian_eigenvalues", "hessian_diagonal", "hessian_spectrum", "adam_sharpness",
           "renyi_sharpness", "CurvatureSettings", "TraceResult", "EigenResult", "SpectrumResult", "AdamResult",
           "RenyiResult", "CURVATURES", "ESTIMATORS", "MAX_EXACT_DIAGONAL"]
