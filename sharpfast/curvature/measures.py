"""The curvature measures (see the package's docstring), each per m-batch and averaged over
batches, the model guarded and the precision policy applied as the sharpness functions do."""
from __future__ import annotations

import math
import numbers
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from .. import precision
from ..objective import batches_on_device
from ..params import ModelGuard
from ..result import check_batches, check_finite_loss
from ..settings import _positive_int
from . import estimators
from .operator import CurvatureOperator
from .results import AdamResult, EigenResult, RenyiResult, SpectrumResult, TraceResult
from .settings import ESTIMATORS, CurvatureSettings as C

MAX_EXACT_DIAGONAL = 50_000   # parameters: the exact diagonal costs one product per coordinate


def hessian_trace(model: nn.Module, data: Iterable, adaptive: bool = C.adaptive, scale: Mapping | None = None,
        loss_fn: Callable | None = None, normalize_logits: bool | str = C.normalize_logits,
        curvature: str = C.curvature, seed: int = C.seed, eval_mode: bool = C.eval_mode,
        n_probes: int = 100, estimator: str = "hutch++", *,
        adaptive_eta: float = C.adaptive_eta, adaptive_weights_only: bool = C.adaptive_weights_only,
        low_precision: str = C.low_precision) -> TraceResult:
    """``tr(C H C)`` of each m-batch's loss, averaged over batches.

    Args:
        model, data, adaptive, scale, loss_fn, normalize_logits, seed, eval_mode: as
            :func:`sharpfast.average_sharpness` takes them, with ``adaptive_eta``,
            ``adaptive_weights_only`` and ``low_precision``.
        curvature: ``"hessian"`` or ``"ggn"`` (the generalized Gauss-Newton matrix).
        n_probes: matrix-vector products per batch.
        estimator: ``"hutch++"`` (a third of the products trace the dominant subspace exactly;
            far lower variance where a few eigenvalues dominate) or ``"hutchinson"``.

    Returns:
        A :class:`TraceResult`.
    """
    s = C(**_measurement(locals()))
    n_probes = _positive_int("n_probes", n_probes)
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
    fn = estimators.hutch_plus_plus if estimator == "hutch++" else estimators.hutchinson
    est = _per_batch(model, data, s, lambda b, A: fn(A, n_probes, s.seed, b))
    per_batch = [e.value for e in est]
    per_batch_stderr = [e.stderr for e in est]
    stderr = sum(e ** 2 for e in per_batch_stderr) ** 0.5 / len(est)
    return TraceResult(sum(per_batch) / len(est), stderr, per_batch, per_batch_stderr, n_probes, estimator)


def hessian_eigenvalues(model: nn.Module, data: Iterable, adaptive: bool = C.adaptive, scale: Mapping | None = None,
        loss_fn: Callable | None = None, normalize_logits: bool | str = C.normalize_logits,
        curvature: str = C.curvature, seed: int = C.seed, eval_mode: bool = C.eval_mode,
        k: int = 1, tol: float = 1e-6, max_iter: int = 300, return_vectors: bool = False, *,
        adaptive_eta: float = C.adaptive_eta, adaptive_weights_only: bool = C.adaptive_weights_only,
        low_precision: str = C.low_precision) -> EigenResult:
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
    s = C(**_measurement(locals()))
    k, max_iter = _positive_int("k", k), _positive_int("max_iter", max_iter)
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol > 0:
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    def top(b, A):
        if k > A.n:
            raise ValueError(f"k={k} eigenvalues asked of a {A.n}-dimensional C H C (the model has {A.n} parameters)")
        return estimators.lanczos(A, k, float(tol), max_iter, s.seed, b)

    ritz, names = _per_batch(model, data, s, top, with_params=True)
    per_batch = [r.values.tolist() for r in ritz]
    width = min(len(v) for v in per_batch)
    values = [sum(v[i] for v in per_batch) / len(per_batch) for i in range(width)]
    vectors = None
    if return_vectors:
        vectors = [{name: r.vectors[off:off + num].T.reshape(-1, *shape).detach().cpu()
                    for name, off, num, shape in names} for r in ritz]
    return EigenResult(values, per_batch, [r.iterations for r in ritz], [r.converged for r in ritz], vectors)


def hessian_diagonal(model: nn.Module, data: Iterable, adaptive: bool = C.adaptive, scale: Mapping | None = None,
        loss_fn: Callable | None = None, normalize_logits: bool | str = C.normalize_logits,
        curvature: str = C.curvature, seed: int = C.seed, eval_mode: bool = C.eval_mode,
        n_probes: int | None = None, *,
        adaptive_eta: float = C.adaptive_eta, adaptive_weights_only: bool = C.adaptive_weights_only,
        low_precision: str = C.low_precision) -> dict[str, torch.Tensor]:
    """``diag(C H C)`` of each m-batch, averaged over batches, as ``{parameter name: tensor}``.

    Args:
        n_probes: ``None`` for the exact diagonal (one product per coordinate; refused above
            ``MAX_EXACT_DIAGONAL`` parameters), else the Rademacher estimate from that many products.
        Others: as :func:`hessian_trace`.
    """
    s = C(**_measurement(locals()))
    if n_probes is not None:
        n_probes = _positive_int("n_probes", n_probes)

    diags, names = _per_batch(model, data, s, lambda b, A: _diagonal(A, n_probes, s.seed, b), with_params=True)
    mean = torch.stack(diags).mean(0)
    return {name: mean[off:off + num].reshape(shape).detach().cpu() for name, off, num, shape in names}


def hessian_spectrum(model: nn.Module, data: Iterable, adaptive: bool = C.adaptive, scale: Mapping | None = None,
        loss_fn: Callable | None = None, normalize_logits: bool | str = C.normalize_logits,
        curvature: str = C.curvature, seed: int = C.seed, eval_mode: bool = C.eval_mode,
        n_vectors: int = 10, n_iter: int = 100, *,
        adaptive_eta: float = C.adaptive_eta, adaptive_weights_only: bool = C.adaptive_weights_only,
        low_precision: str = C.low_precision) -> SpectrumResult:
    """The eigenvalue density of ``C H C`` by stochastic Lanczos quadrature: ``n_iter`` Lanczos
    steps from each of ``n_vectors`` Gaussian probes per batch. Others as :func:`hessian_trace`."""
    s = C(**_measurement(locals()))
    n_vectors, n_iter = _positive_int("n_vectors", n_vectors), _positive_int("n_iter", n_iter)
    quads, names = _per_batch(model, data, s, lambda b, A: estimators.slq(A, n_vectors, n_iter, s.seed, b),
                              with_params=True)
    n = sum(num for _, _, num, _ in names)
    return SpectrumResult([[q.nodes for q in qs] for qs in quads], [[q.weights for q in qs] for qs in quads], n)


def adam_sharpness(model: nn.Module, data: Iterable, adaptive: bool = C.adaptive, scale: Mapping | None = None,
        loss_fn: Callable | None = None, normalize_logits: bool | str = C.normalize_logits,
        curvature: str = C.curvature, seed: int = C.seed, eval_mode: bool = C.eval_mode,
        n_probes: int | None = None, *,
        adaptive_eta: float = C.adaptive_eta, adaptive_weights_only: bool = C.adaptive_weights_only,
        low_precision: str = C.low_precision) -> AdamResult:
    """Adam's sharpness ``tr(diag(C H C)^{1/2}) = sum_i c_i sqrt(H_ii)`` per batch, averaged.

    Negative diagonal entries (a Hessian away from a minimum) count as 0 and are reported in
    ``negative``. ``n_probes=None`` uses the exact diagonal (see :func:`hessian_diagonal`); with an
    estimated diagonal the square root is biased low (Jensen: ``E sqrt(d_est) <= sqrt(d)``), by
    less as ``n_probes`` grows. Others as :func:`hessian_trace`."""
    s = C(**_measurement(locals()))
    if n_probes is not None:
        n_probes = _positive_int("n_probes", n_probes)

    def one(b, A):
        d = _diagonal(A, n_probes, s.seed, b)
        return float(d.clamp(min=0).sqrt().sum()), float((d < 0).double().mean())

    values = _per_batch(model, data, s, one)
    per_batch = [v for v, _ in values]
    return AdamResult(sum(per_batch) / len(per_batch), per_batch, [neg for _, neg in values], n_probes is None)


def renyi_sharpness(model: nn.Module, data: Iterable, adaptive: bool = C.adaptive, scale: Mapping | None = None,
        loss_fn: Callable | None = None, normalize_logits: bool | str = C.normalize_logits,
        curvature: str = C.curvature, seed: int = C.seed, eval_mode: bool = C.eval_mode,
        alpha: float = 2.0, n_vectors: int = 10, n_iter: int = 100, *,
        adaptive_eta: float = C.adaptive_eta, adaptive_weights_only: bool = C.adaptive_weights_only,
        low_precision: str = C.low_precision) -> RenyiResult:
    """Rényi sharpness ``log tr(P^alpha) / (alpha - 1)``, ``P = A_+ / tr A_+`` for ``A = C H C``, from
    stochastic Lanczos quadrature (:func:`hessian_spectrum`), per batch, averaged.

    The eigenvalue distribution needs a positive semi-definite matrix: ``curvature="ggn"`` is one;
    for an indefinite Hessian the negative eigenvalues are left out (``A_+``, its positive part)
    and their share of the spectrum is reported in ``negative_mass``. ``alpha > 0``, ``alpha != 1``."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0 or alpha == 1:
        raise ValueError(f"alpha must be a positive number other than 1, got {alpha!r}")
    spectrum = hessian_spectrum(model, data, adaptive=adaptive, scale=scale, loss_fn=loss_fn,
                                normalize_logits=normalize_logits, curvature=curvature, seed=seed,
                                eval_mode=eval_mode, n_vectors=n_vectors, n_iter=n_iter, adaptive_eta=adaptive_eta,
                                adaptive_weights_only=adaptive_weights_only, low_precision=low_precision)
    per_batch, negative = [], []
    for xs, ws in zip(spectrum.nodes, spectrum.weights):
        pos = [x.clamp(min=0) for x in xs]
        t1 = sum(float((w * p).sum()) for p, w in zip(pos, ws)) / len(xs)          # tr(A_+) / n
        ta = sum(float((w * p ** alpha).sum()) for p, w in zip(pos, ws)) / len(xs)  # tr(A_+^alpha) / n
        if not t1 > 0:
            raise ValueError("the curvature has no positive eigenvalues in this batch: its eigenvalue "
                             "distribution P = A_+ / tr A_+ is undefined")
        n = spectrum.n
        per_batch.append(math.log(n * ta / (n * t1) ** alpha) / (alpha - 1))
        mass = sum(float((w * x.abs()).sum()) for x, w in zip(xs, ws))
        negative.append(sum(float((w * (-x).clamp(min=0)).sum()) for x, w in zip(xs, ws)) / mass if mass else 0.0)
    return RenyiResult(sum(per_batch) / len(per_batch), per_batch, negative, float(alpha))


def _diagonal(A, n_probes: int | None, seed: int, stream: int) -> torch.Tensor:
    """The exact diagonal (``n_probes=None``; refused above ``MAX_EXACT_DIAGONAL`` parameters) or its estimate."""
    if n_probes is not None:
        return estimators.estimated_diagonal(A, n_probes, seed, stream)
    if A.n > MAX_EXACT_DIAGONAL:
        raise ValueError(f"the exact diagonal costs one Hessian-vector product per parameter, and the model "
                         f"has {A.n} (more than {MAX_EXACT_DIAGONAL}); pass n_probes= for an estimate")
    return estimators.exact_diagonal(A)


def _measurement(args: dict) -> dict:
    """The :class:`CurvatureSettings` arguments among a public function's arguments."""
    names = ("adaptive", "scale", "loss_fn", "normalize_logits", "curvature", "seed", "eval_mode", "adaptive_eta",
             "adaptive_weights_only", "low_precision")
    return {k: args[k] for k in names}


def _per_batch(model, data, s: C, fn, with_params: bool = False):
    """``fn(batch index, operator)`` for every m-batch, the model guarded (restored after, also
    after an exception) and the precision policy applied."""
    params = s.bind(model)
    batches = check_batches(data)
    names = [(n, off, num, p.shape) for n, off, num, p in zip(params.names, params.offsets, params.numels,
                                                              params.tensors)]
    def operator(b, x, y) -> CurvatureOperator:
        if isinstance(y, torch.Tensor) and y.dim() > 0 and y.shape[0] == 0:
            raise ValueError(f"batch {b} has no examples: the curvature of an empty batch's loss is undefined")
        A = CurvatureOperator(model, params, s.objective, x, y, s.curvature)
        check_finite_loss(A.loss_at_weights(), f"at the weights (batch {b})")   # NaN in, NaN out: refused
        return A

    with ModelGuard(model, eval_mode=s.eval_mode):
        batches = precision.apply_policy(model, params, batches, s.low_precision)
        out = [fn(b, operator(b, x, y)) for b, x, y in batches_on_device(batches, params.device)]
    return (out, names) if with_params else out
