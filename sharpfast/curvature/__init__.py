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
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from .. import precision
from ..objective import batches_on_device
from ..params import ModelGuard
from ..result import check_batches, check_finite_loss
from ..settings import Measurement, _positive_int
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
    s = CurvatureSettings(**_measurement(locals()))
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
    s = CurvatureSettings(**_measurement(locals()))
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
    s = CurvatureSettings(**_measurement(locals()))
    if n_probes is not None:
        n_probes = _positive_int("n_probes", n_probes)

    diags, names = _per_batch(model, data, s, lambda b, A: _diagonal(A, n_probes, s.seed, b), with_params=True)
    mean = torch.stack(diags).mean(0)
    return {name: mean[off:off + num].reshape(shape).detach().cpu() for name, off, num, shape in names}


@dataclass
class SpectrumResult:
    """The quadratures of every probe of every batch (``nodes[b][j]``, ``weights[b][j]``) of the
    ``n``-dimensional ``C H C``; ``density`` smooths them into the spectral density, ``trace_of``
    estimates ``tr f(C H C)``, ``plot`` draws the density."""

    nodes: list[list[torch.Tensor]]
    weights: list[list[torch.Tensor]]
    n: int

    def trace_of(self, f) -> float:
        """``tr f(A)``, averaged over batches: ``n * mean_j sum_k weights_jk f(nodes_jk)``."""
        per_batch = [self.n * sum(float((w * f(x)).sum()) for x, w in zip(xs, ws)) / len(xs)
                     for xs, ws in zip(self.nodes, self.weights)]
        return sum(per_batch) / len(per_batch)

    def density(self, grid: torch.Tensor | None = None, sigma: float | None = None, n_grid: int = 512):
        """``(grid, density)``: the mean over probes and batches of Gaussians of width ``sigma``
        (default 1% of the spectrum's span) at the nodes, weighted; integrates to 1."""
        nodes = torch.cat([x for xs in self.nodes for x in xs])
        weights = torch.cat([w for ws in self.weights for w in ws]) / sum(len(xs) for xs in self.nodes)
        lo, hi = float(nodes.min()), float(nodes.max())
        span = max(hi - lo, 1e-12 * max(1.0, abs(hi)))
        sigma = 0.01 * span if sigma is None else float(sigma)
        if grid is None:
            grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, n_grid, dtype=torch.float64)
        z = (grid[:, None] - nodes[None, :]) / sigma
        return grid, (weights[None, :] * torch.exp(-0.5 * z ** 2)).sum(1) / (sigma * math.sqrt(2 * math.pi))

    def plot(self, ax=None, log: bool = True, **density_kwargs):
        """The density on a matplotlib axis (created if not given); returns the axis."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.2))
        grid, dens = self.density(**density_kwargs)
        ax.plot(grid.numpy(), dens.clamp(min=1e-12 if log else 0).numpy())
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("eigenvalue of C H C")
        ax.set_ylabel("density")
        return ax


@dataclass
class AdamResult:
    """``value``: the mean over batches of ``sum_i sqrt(max(d_i, 0))``, ``d = diag(C H C)``;
    ``negative``: per batch, the fraction of coordinates whose ``d_i < 0`` (counted as 0);
    ``exact``: the diagonal was computed, not estimated."""

    value: float
    per_batch: list[float]
    negative: list[float]
    exact: bool


@dataclass
class RenyiResult:
    """``value``: the mean over batches of ``log tr(P^alpha) / (alpha - 1)``, ``P = A_+ / tr A_+``;
    ``negative_mass``: per batch, the share of the spectrum's absolute mass on negative eigenvalues,
    which ``A_+`` (the positive part) leaves out (0 for the GGN)."""

    value: float
    per_batch: list[float]
    negative_mass: list[float]
    alpha: float


def hessian_spectrum(model: nn.Module, data: Iterable, adaptive: bool = True, scale: Mapping | None = None,
                     loss_fn: Callable | None = None, normalize_logits: bool | str = False,
                     curvature: str = "hessian", seed: int = 0, eval_mode: bool = True, n_vectors: int = 10,
                     n_iter: int = 100, **options) -> SpectrumResult:
    """The eigenvalue density of ``C H C`` by stochastic Lanczos quadrature: ``n_iter`` Lanczos
    steps from each of ``n_vectors`` Gaussian probes per batch. Others as :func:`hessian_trace`."""
    s = CurvatureSettings(**_measurement(locals()))
    n_vectors, n_iter = _positive_int("n_vectors", n_vectors), _positive_int("n_iter", n_iter)
    quads, names = _per_batch(model, data, s, lambda b, A: estimators.slq(A, n_vectors, n_iter, s.seed, b),
                              with_params=True)
    n = sum(num for _, _, num, _ in names)
    return SpectrumResult([[q.nodes for q in qs] for qs in quads], [[q.weights for q in qs] for qs in quads], n)


def adam_sharpness(model: nn.Module, data: Iterable, adaptive: bool = True, scale: Mapping | None = None,
                   loss_fn: Callable | None = None, normalize_logits: bool | str = False, curvature: str = "hessian",
                   seed: int = 0, eval_mode: bool = True, n_probes: int | None = None, **options) -> AdamResult:
    """Adam's sharpness ``tr(diag(C H C)^{1/2}) = sum_i c_i sqrt(H_ii)`` per batch, averaged.

    Negative diagonal entries (a Hessian away from a minimum) count as 0 and are reported in
    ``negative``. ``n_probes=None`` uses the exact diagonal (see :func:`hessian_diagonal`); with an
    estimated diagonal the square root is biased low (Jensen: ``E sqrt(d_est) <= sqrt(d)``), by
    less as ``n_probes`` grows. Others as :func:`hessian_trace`."""
    s = CurvatureSettings(**_measurement(locals()))
    if n_probes is not None:
        n_probes = _positive_int("n_probes", n_probes)

    def one(b, A):
        d = _diagonal(A, n_probes, s.seed, b)
        return float(d.clamp(min=0).sqrt().sum()), float((d < 0).double().mean())

    values = _per_batch(model, data, s, one)
    per_batch = [v for v, _ in values]
    return AdamResult(sum(per_batch) / len(per_batch), per_batch, [neg for _, neg in values], n_probes is None)


def renyi_sharpness(model: nn.Module, data: Iterable, adaptive: bool = True, scale: Mapping | None = None,
                    loss_fn: Callable | None = None, normalize_logits: bool | str = False, curvature: str = "hessian",
                    seed: int = 0, eval_mode: bool = True, alpha: float = 2.0, n_vectors: int = 10,
                    n_iter: int = 100, **options) -> RenyiResult:
    """Rényi sharpness ``log tr(P^alpha) / (alpha - 1)``, ``P = A_+ / tr A_+`` for ``A = C H C``, from
    stochastic Lanczos quadrature (:func:`hessian_spectrum`), per batch, averaged.

    The eigenvalue distribution needs a positive semi-definite matrix: ``curvature="ggn"`` is one;
    for an indefinite Hessian the negative eigenvalues are left out (``A_+``, its positive part)
    and their share of the spectrum is reported in ``negative_mass``. ``alpha > 0``, ``alpha != 1``."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0 or alpha == 1:
        raise ValueError(f"alpha must be a positive number other than 1, got {alpha!r}")
    spectrum = hessian_spectrum(model, data, adaptive=adaptive, scale=scale, loss_fn=loss_fn,
                                normalize_logits=normalize_logits, curvature=curvature, seed=seed,
                                eval_mode=eval_mode, n_vectors=n_vectors, n_iter=n_iter, **options)
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
    names = ("adaptive", "scale", "loss_fn", "normalize_logits", "curvature", "seed", "eval_mode")
    return {**{k: args[k] for k in names}, **args["options"]}


def _per_batch(model, data, s: CurvatureSettings, fn, with_params: bool = False):
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


__all__ = ["hessian_trace", "hessian_eigenvalues", "hessian_diagonal", "hessian_spectrum", "adam_sharpness",
           "renyi_sharpness", "CurvatureSettings", "TraceResult", "EigenResult", "SpectrumResult", "AdamResult",
           "RenyiResult", "CURVATURES", "ESTIMATORS"]
