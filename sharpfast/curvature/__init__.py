"""Curvature: the rho -> 0 limits of sharpness and the Hessian measures beside it, per m-batch
and averaged over batches as the sharpness functions are.

``C = diag(c)`` is the sharpness scale (``adaptive=True``: ``c = |w|``, as the sharpness
functions default to; ``adaptive=False``: the plain Hessian measures). ``curvature="ggn"`` uses
the generalized Gauss-Newton matrix (positive semi-definite for convex losses) in place of the
Hessian. Every function leaves the model exactly as it was, and measures float16/bfloat16 models
on a float32 copy (``low_precision``), as the sharpness functions do.

* :func:`hessian_trace` — ``tr(C H C)`` by Hutch++ or Hutchinson, with its standard error;
* :func:`hessian_eigenvalues` — the largest eigenvalues of ``C H C`` by Lanczos, to a tolerance;
* :func:`hessian_diagonal` — ``diag(C H C)``, exact (one product per coordinate) or estimated.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from .. import precision
from ..objective import batches_on_device
from ..params import ModelGuard
from ..result import check_batches
from ..settings import Measurement
from . import estimators
from .operator import CURVATURES, CurvatureOperator

ESTIMATORS = ("hutch++", "hutchinson")
MAX_EXACT_DIAGONAL = 50_000   # parameters: the exact diagonal costs one product per coordinate


@dataclass(frozen=True, kw_only=True)
class CurvatureSettings(Measurement):
    """The model-side choices of a curvature measure (see :class:`~sharpfast.settings.Measurement`)."""

    kind = "curvature"
    curvature: str = "hessian"

    def __post_init__(self) -> None:
        if self.curvature not in CURVATURES:
            raise ValueError(f"unknown curvature {self.curvature!r}; expected one of {CURVATURES}")
        super().__post_init__()


@dataclass
class TraceResult:
    """``value``: the mean over batches of ``tr(C H C)``; ``stderr``: its standard error (from the
    probes' spread); ``per_batch`` / ``per_batch_stderr``: one per batch."""

    value: float
    stderr: float
    per_batch: list[float]
    per_batch_stderr: list[float]
    n_probes: int
    estimator: str


@dataclass
class EigenResult:
    """``values``: the ``k`` largest eigenvalues of ``C H C``, largest first, averaged over batches;
    ``per_batch``: each batch's; ``vectors``: each batch's eigenvectors ``{name: [k, *shape]}``
    (with ``return_vectors=True``); ``iterations`` and ``converged`` per batch."""

    values: list[float]
    per_batch: list[list[float]]
    iterations: list[int]
    converged: list[bool]
    vectors: list[dict[str, torch.Tensor]] | None = field(default=None, repr=False)


def hessian_trace(model: nn.Module, data: Iterable, adaptive: bool = True, scale: Mapping | None = None,
                  loss_fn: Callable | None = None, normalize_logits: bool | str = False, curvature: str = "hessian",
                  seed: int = 0, eval_mode: bool = True, n_probes: int = 100, estimator: str = "hutch++",
                  **options) -> TraceResult:
    """``tr(C H C)`` of each m-batch's loss, averaged over batches.

    Args:
        model, data, adaptive, scale, loss_fn, normalize_logits, seed, eval_mode: as
            :func:`sharpfast.average_sharpness` takes them (``options``: ``adaptive_eta``,
            ``adaptive_weights_only``, ``low_precision``).
        curvature: ``"hessian"`` or ``"ggn"`` (the generalized Gauss-Newton matrix).
        n_probes: matrix-vector products per batch.
        estimator: ``"hutch++"`` (a third of the products trace the dominant subspace exactly;
            far lower variance where a few eigenvalues dominate) or ``"hutchinson"``.

    Returns:
        A :class:`TraceResult`.
    """
    s = CurvatureSettings(adaptive=adaptive, scale=scale, loss_fn=loss_fn, normalize_logits=normalize_logits,
                          curvature=curvature, seed=seed, eval_mode=eval_mode, **options)
    n_probes = _positive_int("n_probes", n_probes)
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
    fn = estimators.hutch_plus_plus if estimator == "hutch++" else estimators.hutchinson
    est = _per_batch(model, data, s, lambda b, A: fn(A, n_probes, s.seed, b))
    per_batch = [e.value for e in est]
    per_batch_stderr = [e.stderr for e in est]
    stderr = sum(e ** 2 for e in per_batch_stderr) ** 0.5 / len(est)
    return TraceResult(sum(per_batch) / len(est), stderr, per_batch, per_batch_stderr, n_probes, estimator)


def hessian_eigenvalues(model: nn.Module, data: Iterable, adaptive: bool = True, scale: Mapping | None = None,
                        loss_fn: Callable | None = None, normalize_logits: bool | str = False,
                        curvature: str = "hessian", seed: int = 0, eval_mode: bool = True, k: int = 1,
                        tol: float = 1e-6, max_iter: int = 300, return_vectors: bool = False,
                        **options) -> EigenResult:
    """The ``k`` largest (algebraic) eigenvalues of ``C H C`` of each m-batch, averaged over batches.

    Args:
        k: how many eigenvalues.
        tol: each is converged when its Ritz residual is at most ``tol * max(1, |lambda|)``.
        max_iter: the most Lanczos steps (``converged`` says whether ``tol`` was reached).
        return_vectors: also return each batch's eigenvectors, shaped like the parameters.
        Others: as :func:`hessian_trace`.

    Returns:
        An :class:`EigenResult`.
    """
    s = CurvatureSettings(adaptive=adaptive, scale=scale, loss_fn=loss_fn, normalize_logits=normalize_logits,
                          curvature=curvature, seed=seed, eval_mode=eval_mode, **options)
    k, max_iter = _positive_int("k", k), _positive_int("max_iter", max_iter)
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol > 0:
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    ritz, names = _per_batch(model, data, s, lambda b, A: estimators.lanczos(A, k, float(tol), max_iter, s.seed, b),
                             with_params=True)
    per_batch = [r.values.tolist() for r in ritz]
    width = min(len(v) for v in per_batch)
    values = [sum(v[i] for v in per_batch) / len(per_batch) for i in range(width)]
    vectors = None
    if return_vectors:
        vectors = [{name: r.vectors[off:off + num].T.reshape(-1, *shape).detach().cpu()
                    for name, off, num, shape in names} for r in ritz]
    return EigenResult(values, per_batch, [r.iterations for r in ritz], [r.converged for r in ritz], vectors)


def hessian_diagonal(model: nn.Module, data: Iterable, adaptive: bool = True, scale: Mapping | None = None,
                     loss_fn: Callable | None = None, normalize_logits: bool | str = False,
                     curvature: str = "hessian", seed: int = 0, eval_mode: bool = True, n_probes: int | None = None,
                     **options) -> dict[str, torch.Tensor]:
    """``diag(C H C)`` of each m-batch, averaged over batches, as ``{parameter name: tensor}``.

    Args:
        n_probes: ``None`` for the exact diagonal (one product per coordinate; refused above
            ``MAX_EXACT_DIAGONAL`` parameters), else the Rademacher estimate from that many products.
        Others: as :func:`hessian_trace`.
    """
    s = CurvatureSettings(adaptive=adaptive, scale=scale, loss_fn=loss_fn, normalize_logits=normalize_logits,
                          curvature=curvature, seed=seed, eval_mode=eval_mode, **options)
    if n_probes is not None:
        n_probes = _positive_int("n_probes", n_probes)

    def diagonal(b, A):
        if n_probes is None:
            if A.n > MAX_EXACT_DIAGONAL:
                raise ValueError(f"the exact diagonal costs one Hessian-vector product per parameter, and the model "
                                 f"has {A.n} (more than {MAX_EXACT_DIAGONAL}); pass n_probes= for an estimate")
            return estimators.exact_diagonal(A)
        return estimators.estimated_diagonal(A, n_probes, s.seed, b)

    diags, names = _per_batch(model, data, s, diagonal, with_params=True)
    mean = torch.stack(diags).mean(0)
    return {name: mean[off:off + num].reshape(shape).detach().cpu() for name, off, num, shape in names}


def _per_batch(model, data, s: CurvatureSettings, fn, with_params: bool = False):
    """``fn(batch index, operator)`` for every m-batch, the model guarded (restored after, also
    after an exception) and the precision policy applied."""
    params = s.bind(model)
    batches = check_batches(data)
    names = [(n, off, num, p.shape) for n, off, num, p in zip(params.names, params.offsets, params.numels,
                                                              params.tensors)]
    with ModelGuard(model, eval_mode=s.eval_mode):
        batches = precision.apply_policy(model, params, batches, s.low_precision)
        out = [fn(b, CurvatureOperator(model, params, s.objective, x, y, s.curvature))
               for b, x, y in batches_on_device(batches, params.device)]
    return (out, names) if with_params else out


def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


__all__ = ["hessian_trace", "hessian_eigenvalues", "hessian_diagonal", "CurvatureSettings", "TraceResult",
           "EigenResult", "CURVATURES", "ESTIMATORS"]
