"""The sharpness definitions: a radius ``rho`` in a norm, evaluated by ``sharpfast.evaluate_sharpness``
with the core's settings object each builds (``settings()``): the average case (``avg``), the
worst case (``max``) and geodesic sharpness (``geodesic``)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import sharpfast
from sharpfast import NORMS
from sharpfast.geodesic import METRICS, GeodesicCorrectionWarning, NoGLBlockWarning
from sharpfast.settings import INITS, SOLVERS, ApgdSettings

from .base import ConfigError, Definition, check_choice, check_count, check_flag, check_number, core_default


@dataclass(frozen=True, kw_only=True)
class Sharpness(Definition):
    """What the three sharpness kinds share: the norm and the radius."""

    required: ClassVar[tuple[str, ...]] = ("kind", "norm", "rho")
    needs_rho: ClassVar[bool] = True
    stackable: ClassVar[bool] = True

    norm: str = "l2"
    rho: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rho is None:
            raise ConfigError(f"kind {self.kind!r} needs a radius rho")
        check_choice("norm", self.norm, NORMS)
        self._set("rho", check_number("rho", self.rho))
        if not self.rho > 0 or self.rho == float("inf"):
            raise ConfigError(f"rho must be a positive finite number, got {self.rho!r}")

    def _geometry(self) -> str:
        return self.norm

    def _with_defaults(self) -> Definition:
        return type(self)(kind=self.kind, norm=self.norm, rho=1.0, m=self.m)

    def settings(self, backend: str = "auto") -> sharpfast.settings.Settings:
        """The core's settings object for this definition, evaluated by ``sharpfast.evaluate_sharpness``."""
        raise NotImplementedError

    def _common(self, backend: str) -> dict[str, Any]:
        return dict(self.model_side(), rho=self.rho, norm=self.norm, backend=backend)

    def evaluate(self, model, batches, backend: str = "auto", init=None, metrics: dict | None = None) -> dict[str, Any]:
        return self.measured(sharpfast.evaluate_sharpness(model, batches, self.settings(backend)))

    @staticmethod
    def measured(r) -> dict[str, Any]:
        """The store's columns of a sharpness result (``sharpfast.SharpnessResult``); an exception
        in its place (``sharpfast.evaluate_many(errors="return")``) is raised."""
        if isinstance(r, BaseException):
            raise r
        out = dict(value=float(r.sharpness), err_value=None if r.err_sharpness is None else float(r.err_sharpness),
                   per_batch=[float(v) for v in r.per_batch], delta_norm=float(r.delta_norm), backend=r.backend)
        if r.geodesic_correction is not None:   # stored (and counted by the report) instead of warned per row
            out["geodesic_correction"] = float(r.geodesic_correction)
        if r.gl_blocks is not None:   # 0: the adaptive worst case, which the report keeps apart
            out["gl_blocks"] = int(r.gl_blocks)
        return out


@dataclass(frozen=True, kw_only=True)
class AverageCase(Sharpness):
    """Average-case sharpness (``sharpfast.AverageCaseSettings``): ``n_samples`` noise draws per batch."""

    kinds: ClassVar[tuple[str, ...]] = ("avg",)
    kind: str = "avg"
    n_samples: int = core_default(sharpfast.AverageCaseSettings, "n_samples")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("n_samples", self.n_samples)

    def settings(self, backend: str = "auto") -> sharpfast.AverageCaseSettings:
        return sharpfast.AverageCaseSettings(n_samples=self.n_samples, **self._common(backend))


@dataclass(frozen=True, kw_only=True)
class Apgd(Sharpness):
    """What the kinds solved by APGD share: iterations, restarts, the start and the step's multiplier."""

    n_iters: int = core_default(ApgdSettings, "n_iters")
    n_restarts: int = core_default(ApgdSettings, "n_restarts")
    rand_init: bool = core_default(sharpfast.WorstCaseSettings, "rand_init")
    step_size_mult: float = core_default(ApgdSettings, "step_size_mult")
    init: str | None = None   # "zero" | "random" | "eigen"; None: follows rand_init

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_iters", "n_restarts"):
            check_count(name, getattr(self, name))
        check_flag("rand_init", self.rand_init)
        init = self.init if self.init is not None else ("random" if self.rand_init else "zero")
        check_choice("init", init, INITS)
        if self.rand_init and init != "random":
            raise ConfigError(f"rand_init=true means init='random'; it contradicts init={init!r}")
        self._set("init", init)
        self._set("rand_init", init == "random")
        self._set("step_size_mult", check_number("step_size_mult", self.step_size_mult))
        if not self.step_size_mult > 0:
            raise ConfigError(f"step_size_mult must be positive, got {self.step_size_mult!r}")

    def _apgd(self, backend: str) -> dict[str, Any]:
        return dict(self._common(backend), n_iters=self.n_iters, n_restarts=self.n_restarts, init=self.init,
                    step_size_mult=self.step_size_mult)


@dataclass(frozen=True, kw_only=True)
class WorstCase(Apgd):
    """Worst-case sharpness (``sharpfast.WorstCaseSettings``): the published APGD or the scaled solver.
    The solver and the start at their published meaning (``rand_init`` says zero or random) are
    left out of the key, so definitions stored before they existed keep theirs."""

    kinds: ClassVar[tuple[str, ...]] = ("max",)
    kind: str = "max"
    solver: str = core_default(sharpfast.WorstCaseSettings, "solver")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("solver", self.solver, SOLVERS)

    def canonical(self) -> dict[str, Any]:
        d = super().canonical()
        if d["solver"] == "published":
            d.pop("solver")
        if d["init"] in ("zero", "random"):
            d.pop("init")
        return d

    def settings(self, backend: str = "auto") -> sharpfast.WorstCaseSettings:
        return sharpfast.WorstCaseSettings(solver=self.solver, **self._apgd(backend))


@dataclass(frozen=True, kw_only=True)
class Geodesic(Apgd):
    """Geodesic sharpness (``sharpfast.GeodesicSettings``): the worst case in a GL-invariant metric,
    from ``xi = 0`` or random starts (``rand_init`` says which, so ``init`` is not keyed)."""

    kinds: ClassVar[tuple[str, ...]] = ("geodesic",)
    required: ClassVar[tuple[str, ...]] = ("kind", "rho")
    unkeyed: ClassVar[tuple[str, ...]] = ("init",)
    stackable: ClassVar[bool] = False   # evaluate_many stacks the worst and average cases only
    kind: str = "geodesic"
    metric: str = core_default(sharpfast.GeodesicSettings, "metric")
    eps: float = core_default(sharpfast.GeodesicSettings, "eps")    # the Gram matrices' relaxation
    second_order: bool = core_default(sharpfast.GeodesicSettings, "second_order")

    def __post_init__(self) -> None:
        if self.norm != "l2":
            raise ConfigError(f"kind 'geodesic' is a ball in a Riemannian metric: norm must be 'l2', "
                              f"got {self.norm!r}")
        if self.init == "eigen":
            raise ConfigError("kind 'geodesic' starts at init 'zero' or 'random' (rand_init), not 'eigen'")
        super().__post_init__()
        check_choice("metric", self.metric, METRICS)
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 <= self.eps < float("inf"):
            raise ConfigError(f"eps must be a finite number >= 0, got {self.eps!r}")
        self._set("eps", float(self.eps))
        check_flag("second_order", self.second_order)

    def _geometry(self) -> str:
        return self.metric

    def settings(self, backend: str = "auto") -> sharpfast.GeodesicSettings:
        return sharpfast.GeodesicSettings(metric=self.metric, eps=self.eps, second_order=self.second_order,
                                          **self._apgd(backend))

    def evaluate(self, model, batches, backend: str = "auto", init=None, metrics: dict | None = None) -> dict[str, Any]:
        with warnings.catch_warnings():   # the row keeps geodesic_correction and gl_blocks; the report counts them
            warnings.simplefilter("ignore", category=GeodesicCorrectionWarning)
            warnings.simplefilter("ignore", category=NoGLBlockWarning)
            return super().evaluate(model, batches, backend)
