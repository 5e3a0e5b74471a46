"""The settings of one sharpness evaluation: frozen, kind-specific dataclasses that hold every
default and validate themselves, so no backend ever sees a configuration that could produce a
NaN (bad input gets a ``ValueError``/``TypeError`` naming the problem).

The public functions build them directly from their arguments; ``sharpfast.evaluate_sharpness``
takes one; the study's definitions produce them. What depends on the model (which parameters
``scale`` names, their shapes) is checked by :meth:`Settings.bind`.
"""
from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from .objective import Objective, resolve_logit_normalization
from .params import ParamSet, ScaleSpec
from .precision import check_policy

# APGD's constants (Croce & Hein 2020, as the published code sets them), written once here
MOMENTUM = 0.75            # alpha: delta_new = alpha * z + (1 - alpha) * delta_prev
MIN_UPDATE_RATIO = 0.75    # halve the step when fewer than this fraction of steps improved
PUBLISHED_BISECTION_TOL = 1e-5  # the published code stops at | ||z_lambda / c|| - rho | <= 1e-5


def bisection_tolerance(rho: float, projection_tol: float | None = None) -> float:
    """Absolute tolerance of the ellipsoid bisection.

    The published 1e-5 is absolute: at the small radii used with adaptive sharpness
    (rho ~ 5e-4) it lets an iterate leave the ellipsoid by 2% of its radius. By default
    sharpfast uses ``1e-5 * min(1, rho)``: the published value for rho >= 1, 1e-5 relative below.
    ``projection_tol`` overrides it (``sharpfast.compat`` passes the published 1e-5).
    """
    return PUBLISHED_BISECTION_TOL * min(1.0, rho) if projection_tol is None else projection_tol


NORMS = ("l2", "linf")
BACKENDS = ("auto", "reference", "fused")
SOLVERS = ("published", "scaled")
INITS = ("zero", "random", "eigen")


@dataclass(frozen=True, kw_only=True)
class Measurement:
    """What every measure of a model shares: the scale ``c``, the objective, the noise seed, the
    mode and the precision policy. Arguments as :func:`sharpfast.worst_case_sharpness` documents them."""

    adaptive: bool = True
    scale: Mapping[str, torch.Tensor] | None = None
    loss_fn: Callable | None = None
    error_fn: Callable | None = None
    normalize_logits: bool | str = False
    seed: int = 0
    adaptive_eta: float = 0.0
    adaptive_weights_only: bool = False
    eval_mode: bool = True
    low_precision: str = "float32"

    def __post_init__(self) -> None:
        for name in ("loss_fn", "error_fn"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise TypeError(f"{name} must be callable as {name}(output, y)")
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2^64), got {seed!r}")
        self._set("seed", int(seed))
        self._set("adaptive_eta", _positive_float("adaptive_eta", self.adaptive_eta, allow_zero=True))
        if self.scale is not None and not isinstance(self.scale, Mapping):
            raise TypeError(f"scale must be a dict {{parameter name: tensor}}, got {type(self.scale).__name__}")
        for name in ("adaptive", "adaptive_weights_only", "eval_mode"):
            self._set(name, bool(getattr(self, name)))
        resolve_logit_normalization(self.normalize_logits)
        check_policy(self.low_precision)

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)   # normalizing a field of a frozen dataclass

    @functools.cached_property
    def objective(self) -> Objective:
        return Objective(loss_fn=self.loss_fn, logit_normalization=resolve_logit_normalization(self.normalize_logits),
                         error_fn=self.error_fn)

    def bind(self, model: nn.Module) -> ParamSet:
        """The model's perturbed parameters (checked: trainable floating-point ones exist, finite,
        on one device), with the scale rule of these settings, ``scale`` checked against them."""
        params = check_model(model)
        params.scaling = ScaleSpec(adaptive=self.adaptive, eta=self.adaptive_eta,
                                   weights_only=self.adaptive_weights_only, custom=_check_scale(self.scale, params))
        return params

    def describe(self) -> dict:
        """Every setting that changes the value, by field (callables by name, ``scale`` by the
        parameters it names); the l2 bisection's tolerance as applied."""
        d = {"kind": self.kind}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "backend":
                continue
            if callable(v):
                v = getattr(v, "__qualname__", type(v).__name__)
            elif f.name == "scale" and v is not None:
                v = sorted(v)
            elif f.name == "normalize_logits":
                v = resolve_logit_normalization(v)
            d[f.name] = v
        return d


@dataclass(frozen=True, kw_only=True)
class Settings(Measurement):
    """What both sharpness kinds share beyond :class:`Measurement`: the radius, the norm, the backend."""

    kind: ClassVar[str]
    rho: float
    norm: str
    backend: str = "auto"

    def __post_init__(self) -> None:
        self._set("rho", _positive_float("rho", self.rho))
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; expected 'l2' or 'linf'")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {BACKENDS}")
        super().__post_init__()


def _check_scale_squares(params: ParamSet) -> None:
    """The published l2 projection divides by ``c^2 + 2 lambda``: refuse a scale whose square is
    not a number of the parameters' dtype (weights near its largest value), which would project
    nothing (a sharpness of 0) or give NaN."""
    dtype = params.tensors[0].dtype
    if not params.largest_scale < math.sqrt(torch.finfo(dtype).max):
        raise ValueError(f"the scale c reaches {params.largest_scale:.3g}, whose square overflows "
                         f"{str(dtype).replace('torch.', '')} (the published l2 projection divides by c^2 + 2 "
                         "lambda): use solver='scaled' or norm='linf', which never square c")


@dataclass(frozen=True, kw_only=True)
class ApgdSettings(Settings):
    """The fields of every measure solved by APGD (the worst case, geodesic sharpness), checked here
    once: iterations per batch and run, runs, the step's multiplier and the halving rule's ratio."""

    n_iters: int = 20
    n_restarts: int = 1
    step_size_mult: float = 1.0
    min_update_ratio: float = MIN_UPDATE_RATIO

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("n_iters", _positive_int("n_iters", self.n_iters))
        self._set("n_restarts", _positive_int("n_restarts", self.n_restarts))
        self._set("step_size_mult", _positive_float("step_size_mult", self.step_size_mult))
        self._set("min_update_ratio", _positive_float("min_update_ratio", self.min_update_ratio, allow_zero=True))


@dataclass(frozen=True, kw_only=True)
class WorstCaseSettings(ApgdSettings):
    """Worst-case sharpness by APGD in weight space: the published variant (DESIGN.md §2) or the
    scaled solver (``solver="scaled"``, DESIGN.md §2b), from the start ``init``.

    ``init=None`` follows ``rand_init`` (``"random"`` where it is set, else ``"zero"``), and
    ``rand_init`` is normalized to ``init == "random"``. ``init="eigen"`` runs two starts per restart,
    ``+-rho`` times the restart's eigenvector of ``C H C`` (the top ``n_restarts`` by Lanczos)."""

    kind: ClassVar[str] = "worst"
    norm: str = "linf"
    rand_init: bool = False
    projection_tol: float | None = None   # None: bisection_tolerance(rho)
    solve_batches_together: bool | None = None
    solver: str = "published"
    init: str | None = None
    quadratic_model: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; expected one of {SOLVERS}")
        if self.init is None:
            self._set("init", "random" if self.rand_init else "zero")
        elif self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; expected one of {INITS}")
        elif self.rand_init and self.init != "random":
            raise ValueError(f"rand_init=True means init='random'; it contradicts init={self.init!r}")
        self._set("rand_init", self.init == "random")
        if self.n_restarts > 1 and self.init == "zero":
            raise ValueError("n_restarts > 1 needs init='random' or 'eigen' (rand_init=True): restarts from "
                             "delta = 0 are identical")
        if self.solve_batches_together is not None and not isinstance(self.solve_batches_together, bool):
            raise TypeError(f"solve_batches_together must be True, False or None, got {self.solve_batches_together!r}")
        if self.projection_tol is not None:
            self._set("projection_tol", _positive_float("projection_tol", self.projection_tol))
        self._set("quadratic_model", bool(self.quadratic_model))
        if self.quadratic_model and self.norm != "l2":
            raise ValueError("quadratic_model=True is the l2 model rho ||c g|| + rho^2/2 lambda_max(C H C); "
                             "it needs norm='l2'")

    def bind(self, model: nn.Module) -> ParamSet:
        params = super().bind(model)
        if self.norm == "l2" and self.solver == "published" and not params.unit_scale:
            _check_scale_squares(params)
        return params

    @property
    def bisection_tol(self) -> float:
        """The absolute tolerance the l2 ellipsoid bisection stops at."""
        return bisection_tolerance(self.rho, self.projection_tol)

    @property
    def with_quadratic_model(self) -> bool:
        """Whether the result carries the l2 quadratic model: asked for, or free (the eigen start's
        Lanczos run has computed everything it needs)."""
        return self.norm == "l2" and (self.quadratic_model or self.init == "eigen")

    @property
    def n_starts(self) -> int:
        """APGD runs per m-batch: one per restart, two (both signs) with the eigen start."""
        return 2 * self.n_restarts if self.init == "eigen" else self.n_restarts

    def describe(self) -> dict:
        d = super().describe()
        d.pop("quadratic_model")   # a diagnostic: it does not change the value
        if self.solver == "published":
            d["projection_tol"] = self.bisection_tol
        else:
            d.pop("projection_tol")   # no bisection: the scaled solver projects by a rescale or a clamp
        return d


@dataclass(frozen=True, kw_only=True)
class AverageCaseSettings(Settings):
    """Average-case sharpness: ``n_samples`` Gaussian (l2) or uniform (linf) draws per batch."""

    kind: ClassVar[str] = "average"
    norm: str = "l2"
    n_samples: int = 20
    antithetic: bool = False
    samples_per_pass: int | None = None   # None: by device (average_case.fused.samples_per_pass)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("n_samples", _positive_int("n_samples", self.n_samples))
        self._set("antithetic", bool(self.antithetic))
        if self.antithetic and self.n_samples % 2:
            raise ValueError(f"antithetic=True pairs +xi and -xi: n_samples must be even, got {self.n_samples}")
        if self.samples_per_pass is not None:
            self._set("samples_per_pass", _positive_int("samples_per_pass", self.samples_per_pass))


def _positive_int(name: str, v: Any, minimum: int = 1) -> int:
    """The one check of a count, for every measure: ``TypeError`` for what is not an integer,
    ``ValueError`` below ``minimum``."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be {'a positive integer' if minimum == 1 else f'>= {minimum}'}, got {v}")
    return int(v)


def _positive_float(name: str, v: Any, allow_zero: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {v}")
    return v


def _check_scale(scale: Mapping[str, torch.Tensor] | None, params: ParamSet) -> dict | None:
    if scale is None:
        return None
    shapes = dict(zip(params.names, (p.shape for p in params.tensors)))
    checked = {}
    for name, c in scale.items():
        if name not in shapes:
            raise ValueError(f"scale names {name!r}, which is not a trainable floating-point "
                             f"parameter of the model (known: {', '.join(params.names[:8])}"
                             f"{', ...' if len(params.names) > 8 else ''})")
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"scale[{name!r}] must be a tensor, got {type(c).__name__}")
        if tuple(c.shape) != tuple(shapes[name]):
            raise ValueError(f"scale[{name!r}] has shape {tuple(c.shape)}, but the parameter has "
                             f"shape {tuple(shapes[name])}")
        c = c.detach()
        if not torch.isfinite(c).all():
            raise ValueError(f"scale[{name!r}] has non-finite entries")
        if (c < 0).any():
            raise ValueError(f"scale[{name!r}] has negative entries; c must be >= 0 (0 freezes a coordinate)")
        checked[name] = c
    return checked


def check_model(model: nn.Module) -> ParamSet:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = ParamSet(model)
    if len(params) == 0 or params.numel == 0:
        raise ValueError("the model has no trainable floating-point parameters "
                         "(requires_grad=True) to perturb")
    for name, p in zip(params.names, params.tensors):
        if not torch.isfinite(p.detach()).all():
            raise ValueError(f"parameter {name!r} has non-finite values (NaN or inf)")
    devices = {p.device for p in params.tensors}
    if len(devices) > 1:
        raise ValueError(f"all trainable parameters must be on one device, found {sorted(map(str, devices))}")
    return params
