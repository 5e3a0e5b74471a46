"""Sharpness definitions: one configuration of the public API, its stable key, configs, presets.

A :class:`Definition` is everything that changes a sharpness value: average- or worst-case,
the norm, adaptive or not, logit normalization, ``m`` (the m-sharpness batch size), the
number of examples, the radius ``rho`` and the estimator's settings. Its ``key`` (a hash of
all fields) identifies it in the results store, so a changed setting is a new definition.

Configs (YAML or TOML)::

    defaults:                      # optional, applied to every definition
      m: 128
      n_examples: 512
    preset: default                # optional: start from a preset's definitions
    definitions:
      - {kind: max, norm: linf, adaptive: true, normalize_logits: true, rho: [0.001, 0.002]}
      - {kind: avg, norm: l2, adaptive: true, rho: 0.1, n_samples: 20}

``rho`` may be a number or a list (one definition per radius).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Iterable

from sharpfast import LOGIT_NORMALIZATIONS, NORMS
from sharpfast.geodesic import GEODESIC_EPS, METRICS
from sharpfast.geodesic import GeodesicCorrectionWarning, NoGLBlockWarning

from .measures import MEASURES_REVISION, NEYSHABUR as MEASURE_NAMES_NEYSHABUR

if TYPE_CHECKING:
    from .zoo.checkpoints import Manifest

# The kinds the core calls average- and worst-case, named as the paper and the published code
# name them; definition names and keys of existing stores carry these spellings (DESIGN.md §7).
SHARPNESS_KINDS = ("avg", "max")
# Curvature measures (sharpfast.curvature): tr(C H C), lambda_max(C H C), Adam's and Renyi sharpness.
CURVATURE_KINDS = ("trace", "lambda_max", "adam", "renyi")
# The generalization measures of Jiang et al. (2020), named as in their table (sharpfast.study.measures).
MEASURE_KIND = "measure"
# Geodesic sharpness (sharpfast.geodesic_sharpness): the worst case in the GL-invariant geometry.
GEODESIC_KIND = "geodesic"
KINDS = SHARPNESS_KINDS + (GEODESIC_KIND,) + CURVATURE_KINDS + (MEASURE_KIND,)
LOGIT_NORMS = (False, *LOGIT_NORMALIZATIONS)
SHARPNESS_FIELDS = ("norm", "rho")
WORST_FIELDS = ("n_iters", "n_restarts", "rand_init", "step_size_mult", "solver", "init")
SOLVERS = ("published", "scaled")
INITS = ("zero", "random", "eigen")
AVERAGE_FIELDS = ("n_samples",)
GEODESIC_FIELDS = ("metric", "eps", "second_order")
# the worst-case fields the geodesic solver does not take (its own APGD; the start is rand_init's)
GEODESIC_UNUSED = ("solver", "init")
CURVATURE_FIELDS = ("curvature", "n_probes", "alpha", "n_vectors", "n_lanczos")
# the curvature fields each curvature kind uses
CURVATURE_USES = {"trace": ("curvature", "n_probes"), "lambda_max": ("curvature",),
                  "adam": ("curvature", "n_probes"), "renyi": ("curvature", "alpha", "n_vectors", "n_lanczos")}


DEFAULT_EXAMPLES = 512


class ConfigError(ValueError):
    """A sharpness-definition config or flag combination that cannot be used."""


@dataclass(frozen=True)
class Definition:
    kind: str                      # "avg" (average-case), "max" (worst-case, APGD), or a curvature kind
    norm: str = "l2"               # sharpness: "l2" or "linf"
    rho: float | None = None       # sharpness: the radius
    adaptive: bool = True
    normalize_logits: Any = False  # False | "norm" (published code) | "std" (slides)
    m: int = 128                   # examples per m-sharpness batch
    n_examples: int | None = None  # examples sharpness is measured on (a multiple of m); None: the
                                   # largest multiple of m up to DEFAULT_EXAMPLES (512 for every m dividing it)
    n_iters: int = 20              # worst-case: APGD iterations
    n_restarts: int = 1            # worst-case
    rand_init: bool = False        # worst-case
    step_size_mult: float = 1.0    # worst-case
    solver: str = "published"      # worst-case: "published" APGD or "scaled" (sharpfast.worst_case_sharpness)
    init: str | None = None        # worst-case: "zero" | "random" | "eigen"; None: follows rand_init
    n_samples: int = 20            # average-case: noise draws per batch
    seed: int = 0
    adaptive_eta: float = 0.0
    adaptive_weights_only: bool = False
    curvature: str = "hessian"     # curvature kinds: "hessian" or "ggn"
    n_probes: int = 100            # trace, adam: Hessian-vector products per batch (adam: the diagonal's estimate)
    alpha: float = 2.0             # renyi
    n_vectors: int = 10            # renyi: quadrature probes per batch
    n_lanczos: int = 50            # renyi: Lanczos steps per probe
    measure: str | None = None     # kind "measure": the Jiang et al. measure's name, e.g. "prod-of-spec"
    metric: str = "mix"            # geodesic: "mix" or "inv"
    eps: float = GEODESIC_EPS      # geodesic: the Gram matrices' relaxation
    second_order: bool = True      # geodesic: the geodesic's second-order correction

    @property
    def is_curvature(self) -> bool:
        return self.kind in CURVATURE_KINDS

    @property
    def is_measure(self) -> bool:
        return self.kind == MEASURE_KIND

    @property
    def needs_rho(self) -> bool:
        return self.kind in SHARPNESS_KINDS or self.kind == GEODESIC_KIND

    @property
    def stackable(self) -> bool:
        """Whether ``sharpfast.evaluate_many`` evaluates it for many checkpoints at once."""
        return self.kind in SHARPNESS_KINDS

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.is_measure:
            from .measures import MEASURES
            if self.measure not in MEASURES:
                raise ConfigError(f"measure must be one of {sorted(MEASURES)}, got {self.measure!r}")
            object.__setattr__(self, "rho", None)
            object.__setattr__(self, "norm", "l2")
        elif self.measure is not None:
            raise ConfigError(f"'measure' is for kind {MEASURE_KIND!r}; kind {self.kind!r} does not take it")
        if self.is_curvature:
            if self.curvature not in ("hessian", "ggn"):
                raise ConfigError(f"curvature must be 'hessian' or 'ggn', got {self.curvature!r}")
            for name in ("n_probes", "n_vectors", "n_lanczos"):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ConfigError(f"{name} must be a positive integer, got {v!r}")
            if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0 \
                    or self.alpha == 1:
                raise ConfigError(f"alpha must be a positive number other than 1, got {self.alpha!r}")
            object.__setattr__(self, "alpha", float(self.alpha))
            object.__setattr__(self, "rho", None)   # radius and norm mean nothing for curvature
            object.__setattr__(self, "norm", "l2")
        elif self.rho is None and self.needs_rho:
            raise ConfigError(f"kind {self.kind!r} needs a radius rho")
        if self.norm not in NORMS:
            raise ConfigError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.kind == GEODESIC_KIND:
            if self.norm != "l2":
                raise ConfigError(f"kind 'geodesic' is a ball in a Riemannian metric: norm must be 'l2', "
                                  f"got {self.norm!r}")
            if self.metric not in METRICS:
                raise ConfigError(f"metric must be one of {METRICS}, got {self.metric!r}")
            if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 <= self.eps < float("inf"):
                raise ConfigError(f"eps must be a finite number >= 0, got {self.eps!r}")
            object.__setattr__(self, "eps", float(self.eps))
            if self.init == "eigen":
                raise ConfigError("kind 'geodesic' starts at init 'zero' or 'random' (rand_init), not 'eigen'")
        nl = self.normalize_logits
        if nl is True:
            object.__setattr__(self, "normalize_logits", "norm")
        elif nl in (None, "none", "false", "off"):
            object.__setattr__(self, "normalize_logits", False)
        if self.normalize_logits not in LOGIT_NORMS:
            raise ConfigError(f"normalize_logits must be false, true/'norm' or 'std', got {nl!r}")
        for name in ("adaptive", "rand_init", "adaptive_weights_only", "second_order"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        init = self.init if self.init is not None else ("random" if self.rand_init else "zero")
        if init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {self.init!r}")
        if self.rand_init and init != "random":
            raise ConfigError(f"rand_init=true means init='random'; it contradicts init={init!r}")
        object.__setattr__(self, "init", init)
        object.__setattr__(self, "rand_init", init == "random")
        if isinstance(self.m, int) and not isinstance(self.m, bool) and self.m >= 1 and self.n_examples is None:
            object.__setattr__(self, "n_examples", self.m * max(1, DEFAULT_EXAMPLES // self.m))
        for name in ("m", "n_examples", "n_iters", "n_restarts", "n_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        for name in ("step_size_mult", "adaptive_eta") + (("rho",) if self.needs_rho else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{name} must be a number, got {v!r}")
            object.__setattr__(self, name, float(v))
        if self.needs_rho and (not self.rho > 0 or self.rho == float("inf")):
            raise ConfigError(f"rho must be a positive finite number, got {self.rho!r}")
        if not self.step_size_mult > 0:
            raise ConfigError(f"step_size_mult must be positive, got {self.step_size_mult!r}")
        if self.adaptive_eta < 0:
            raise ConfigError(f"adaptive_eta must be >= 0, got {self.adaptive_eta!r}")
        if self.n_examples % self.m:
            raise ConfigError(f"n_examples ({self.n_examples}) must be a multiple of m ({self.m}): "
                              "every m-sharpness batch has m examples")

    # -- identity -------------------------------------------------------------------------
    def canonical(self) -> dict[str, Any]:
        """The fields that matter for this kind (worst-case settings are dropped for avg and
        vice versa, curvature settings for both), so irrelevant settings do not split one
        definition into several keys, and the keys of definitions that existed before a field
        was added do not change."""
        d = asdict(self)
        if d["measure"] is None:
            d.pop("measure")   # keys of the definitions that existed before measures did stay the same
        if self.is_measure:   # a function of the weights and the data: nothing else matters, but the
            # conventions the measures follow (their revision: values of an earlier one are not reused)
            return {**{k: d[k] for k in ("kind", "measure", "n_examples")}, "revision": MEASURES_REVISION}
        if self.is_curvature:
            drop = SHARPNESS_FIELDS + WORST_FIELDS + AVERAGE_FIELDS + tuple(
                f for f in CURVATURE_FIELDS if f not in CURVATURE_USES[self.kind])
        elif self.kind == GEODESIC_KIND:
            drop = CURVATURE_FIELDS + AVERAGE_FIELDS + GEODESIC_UNUSED
        else:
            drop = CURVATURE_FIELDS + (WORST_FIELDS if self.kind == "avg" else AVERAGE_FIELDS)
        if self.kind != GEODESIC_KIND:   # keys of the definitions that existed before it stay the same
            drop += GEODESIC_FIELDS
        for k in drop:
            d.pop(k)
        # the solver fields at their published meaning (rand_init says zero or random) are left
        # out, so the definitions of stores written before they existed keep their keys
        if d.get("solver") == "published":
            d.pop("solver")
        if d.get("init") in ("zero", "random"):
            d.pop("init")
        return d

    @property
    def key(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def family(self) -> str:
        """The definition without its radius, e.g. ``max-linf-adaptive-norm m=128``."""
        if self.is_measure:
            return self.measure + ("" if self.n_examples == DEFAULT_EXAMPLES else f" n_examples={self.n_examples}")
        parts = [self.kind, self.curvature if self.is_curvature else self.metric if self.kind == GEODESIC_KIND
                 else self.norm, "adaptive" if self.adaptive else "standard"]
        if self.normalize_logits:
            parts.append("lognorm" if self.normalize_logits == "norm" else "logstd")
        name = "-".join(parts) + f" m={self.m}"
        base = Definition(self.kind, self.norm, None if self.is_curvature else 1.0, m=self.m)
        extra = [f"{k}={v}" for k, v in self.canonical().items()
                 if k not in ("kind", "norm", "rho", "adaptive", "normalize_logits", "m", "curvature", "revision",
                              "metric")
                 and v != base.canonical().get(k)]
        return name + ("" if not extra else " " + " ".join(extra))

    @property
    def name(self) -> str:
        return f"{self.family} rho={self.rho:g}" if self.needs_rho else self.family

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self, model, batches, backend: str = "auto", init=None, metrics: dict | None = None) -> dict[str, Any]:
        """This definition's value on ``batches``: ``value``, ``err_value``, ``per_batch``,
        ``delta_norm``, ``backend`` (the store's columns), through the core's public API (the
        Jiang et al. measures: ``sharpfast.study.measures``, with the initial weights ``init`` and
        the zoo's recorded ``metrics``)."""
        import sharpfast

        if self.is_measure:
            import torch

            from . import measures
            if not all(isinstance(b[0], torch.Tensor) for b in batches):
                raise TypeError("the Jiang et al. measures take models with one tensor input, not dict or tuple inputs")
            x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
            value = measures.measure(self.measure, model, x, y, init=init, metrics=metrics)
            return dict(value=value, err_value=None, per_batch=[value], delta_norm=0.0, backend="measure")

        if not self.is_curvature:
            with warnings.catch_warnings():
                if self.kind == GEODESIC_KIND:   # the row keeps geodesic_correction and gl_blocks; the report
                    warnings.simplefilter("ignore", category=GeodesicCorrectionWarning)   # counts them
                    warnings.simplefilter("ignore", category=NoGLBlockWarning)
                return self.measured(sharpfast.evaluate_sharpness(model, batches, self.settings(backend)))
        common = dict(self._model_side(), curvature=self.curvature)
        if self.kind == "trace":
            r = sharpfast.hessian_trace(model, batches, n_probes=self.n_probes, **common)
            per_batch = r.per_batch
        elif self.kind == "lambda_max":
            r = sharpfast.hessian_eigenvalues(model, batches, k=1, **common)
            per_batch = [v[0] for v in r.per_batch]
        elif self.kind == "adam":
            per_batch = sharpfast.adam_sharpness(model, batches, n_probes=self.n_probes, **common).per_batch
        else:
            per_batch = sharpfast.renyi_sharpness(model, batches, alpha=self.alpha, n_vectors=self.n_vectors,
                                                  n_iter=self.n_lanczos, **common).per_batch
        return dict(value=sum(per_batch) / len(per_batch), err_value=None, per_batch=[float(v) for v in per_batch],
                    delta_norm=0.0, backend="curvature")

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

    def settings(self, backend: str = "auto"):
        """The core's settings object for this definition (``sharpfast.WorstCaseSettings`` for
        ``max``, ``AverageCaseSettings`` for ``avg``, ``GeodesicSettings`` for ``geodesic``), evaluated
        by ``sharpfast.evaluate_sharpness``."""
        import sharpfast

        common = dict(self._model_side(), rho=self.rho, norm=self.norm, backend=backend)
        if self.kind == GEODESIC_KIND:
            return sharpfast.GeodesicSettings(metric=self.metric, eps=self.eps, second_order=self.second_order,
                                              n_iters=self.n_iters, n_restarts=self.n_restarts, init=self.init,
                                              step_size_mult=self.step_size_mult, **common)
        if self.kind == "max":
            return sharpfast.WorstCaseSettings(n_iters=self.n_iters, n_restarts=self.n_restarts, init=self.init,
                                               step_size_mult=self.step_size_mult, solver=self.solver, **common)
        return sharpfast.AverageCaseSettings(n_samples=self.n_samples, **common)

    def _model_side(self) -> dict[str, Any]:
        """The arguments every measure takes alike (``sharpfast.settings.Measurement``'s fields)."""
        return dict(adaptive=self.adaptive, normalize_logits=self.normalize_logits, seed=self.seed,
                    adaptive_eta=self.adaptive_eta, adaptive_weights_only=self.adaptive_weights_only)

    def to_json(self) -> str:
        return json.dumps(self.canonical(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "definition") -> "Definition":
        d = dict(d)
        revision = d.pop("revision", MEASURES_REVISION)   # canonical() writes it for measures
        if revision != MEASURES_REVISION:
            raise ConfigError(f"{where}: measures of revision {revision!r} cannot be computed any more; this "
                              f"sharpfast computes revision {MEASURES_REVISION} (see sharpfast.study.measures)")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        missing = ({"kind", "norm", "rho"} if d.get("kind") in SHARPNESS_KINDS else
                   {"kind", "rho"} if d.get("kind") == GEODESIC_KIND else
                   {"kind", "measure"} if d.get("kind") == MEASURE_KIND else {"kind"}) - set(d)
        if missing:
            raise ConfigError(f"{where}: missing field(s) {sorted(missing)}")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------- presets

def _grid(kind: str, norm: str, radii: dict[str, list[float]], **common: Any) -> list[dict[str, Any]]:
    variants = {"standard": dict(adaptive=False), "adaptive": dict(adaptive=True),
                "adaptive-lognorm": dict(adaptive=True, normalize_logits="norm")}
    return [dict(kind=kind, norm=norm, rho=r, **variants[v], **common)
            for v, rs in radii.items() for r in rs]


def _paper() -> list[dict[str, Any]]:
    """The published CIFAR-10 ResNet-18 grid (sh/eval_sharpness_final.sh of the paper's code):
    {avg, max} x {l2, linf} x {standard, adaptive, adaptive + logit normalization} x 4 radii,
    m = 128 on 1024 training examples, 20 APGD iterations / 20 noise draws, no random init."""
    same = lambda rs: {"standard": rs, "adaptive": rs, "adaptive-lognorm": rs}
    common = dict(m=128, n_examples=1024, n_iters=20, n_samples=20)
    return (_grid("avg", "l2", same([0.05, 0.1, 0.2, 0.4]), **common)
            + _grid("avg", "linf", same([0.1, 0.2, 0.4, 0.8]), **common)
            + _grid("max", "l2", same([0.25, 0.5, 1.0, 2.0]), **common)
            + _grid("max", "linf", {"standard": [0.0005, 0.001, 0.002, 0.004],
                                    "adaptive": [0.001, 0.002, 0.004, 0.008],
                                    "adaptive-lognorm": [0.001, 0.002, 0.004, 0.008]}, **common))


PRESETS: dict[str, list[dict[str, Any]]] = {
    "paper": _paper(),
    # the main job on the digits zoo: the paper's four families, one radius each, m = 128 on 512
    # training examples (radii chosen so the loss increase is well above noise yet < ~1 nat)
    "default": [
        dict(kind="max", norm="linf", adaptive=True, normalize_logits="norm", rho=0.002),
        dict(kind="max", norm="linf", adaptive=True, rho=0.002),
        dict(kind="max", norm="l2", adaptive=True, rho=0.5),
        dict(kind="max", norm="l2", adaptive=False, rho=0.1),
        dict(kind="avg", norm="l2", adaptive=True, rho=0.1),
        dict(kind="avg", norm="linf", adaptive=True, normalize_logits="norm", rho=0.2),
    ],
    # the curvature the sharpness definitions tend to as rho -> 0, and the measures beside it
    "curvature": [
        dict(kind="trace", adaptive=True), dict(kind="trace", adaptive=False),
        dict(kind="lambda_max", adaptive=True), dict(kind="lambda_max", adaptive=False),
        dict(kind="adam", adaptive=False), dict(kind="renyi", adaptive=False, curvature="ggn"),
    ],
    # the worst-case solvers side by side: the published APGD and the scaled solver (from delta = 0
    # and from the top eigenvector of C H C) on the default's worst-case families
    "solvers": [
        dict(kind="max", norm=norm, adaptive=True, rho=rho, solver=solver, **start)
        for norm, rho in (("l2", 0.5), ("linf", 0.002))
        for solver, start in (("published", {}), ("scaled", {}), ("scaled", dict(init="eigen")))
    ],
    # geodesic sharpness (da Silva et al., 2025) beside the adaptive worst case it corrects: the same
    # APGD (the scaled solver), radius and batches; on models without attention blocks the three
    # agree. rho = 0.1: at 0.5 the mix metric's second-order map leaves its domain on the zoo's ViTs
    # (geodesic_correction > 1), and inv reaches several nats
    "geodesic": [
        dict(kind="max", norm="l2", adaptive=True, rho=0.1, solver="scaled"),
        dict(kind=GEODESIC_KIND, metric="inv", rho=0.1),
        dict(kind=GEODESIC_KIND, metric="mix", rho=0.1),
    ],
    # the generalization measures of Jiang et al. (2020) that sharpness is compared with
    "jiang": [dict(kind=MEASURE_KIND, measure=name) for name in (
        "param-norm", "frob-distance", "spec-dist", "fro/spec", "prod-of-spec", "prod-of-spec/margin", "sum-of-spec",
        "sum-of-spec/margin", "prod-of-fro", "prod-of-fro/margin", "sum-of-fro", "sum-of-fro/margin",
        "spectral-init", "spectral-orig", "path-norm", "path-norm/margin", "1/margin", "cross-entropy",
        "neg-entropy", "fisher-rao", "num-step-to-0.1-loss", "pacbayes-init", "pacbayes-orig", "1/sigma-pacbayes",
        "sharpness-init", "sharpness-orig", "1/alpha-sharpness", "pacbayes-mag-init", "pacbayes-mag-orig",
        "1/sigma-pacbayes-mag", "pac-sharpness-mag-init", "pac-sharpness-mag-orig", "1/alpha-sharpness-mag",
        "num-params")],
    # the norms over the margin and the generalization bounds of Neyshabur et al.'s generalization-bounds code
    "neyshabur": [dict(kind=MEASURE_KIND, measure=name) for name in MEASURE_NAMES_NEYSHABUR],
    # smoke tests: two cheap definitions
    "quick": [
        dict(kind="max", norm="linf", adaptive=True, rho=0.002, n_iters=5, m=64, n_examples=128),
        dict(kind="avg", norm="l2", adaptive=True, rho=0.1, n_samples=4, m=64, n_examples=128),
    ],
}


def preset(name: str, **overrides: Any) -> list[Definition]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return [Definition.from_dict({**d, **overrides}, f"preset {name!r} #{i}") for i, d in enumerate(PRESETS[name])]


# ----------------------------------------------------------------------------- configs

def _expand(d: dict[str, Any], defaults: dict[str, Any], where: str) -> list[Definition]:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    merged = {**defaults, **d}
    rhos = merged.get("rho")
    if isinstance(rhos, (list, tuple)):
        if not rhos:
            raise ConfigError(f"{where}: 'rho' is an empty list")
        return [Definition.from_dict({**merged, "rho": r}, f"{where} (rho={r!r})") for r in rhos]
    return [Definition.from_dict(merged, where)]


def parse_config(raw: Any, where: str = "config") -> list[Definition]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(raw).__name__}")
    unknown = set(raw) - {"defaults", "definitions", "preset"}
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {sorted(unknown)}; "
                          "expected 'defaults', 'definitions', 'preset'")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{where}: 'defaults' must be a mapping")
    out: list[Definition] = []
    if raw.get("preset") is not None:
        names = raw["preset"] if isinstance(raw["preset"], list) else [raw["preset"]]
        for n in names:
            if n not in PRESETS:
                raise ConfigError(f"{where}: unknown preset {n!r}; available: {sorted(PRESETS)}")
            out += [d for i, p in enumerate(PRESETS[n]) for d in _expand(p, defaults, f"{where}: preset {n} #{i}")]
    defs = raw.get("definitions", [])
    if not isinstance(defs, list):
        raise ConfigError(f"{where}: 'definitions' must be a list")
    for i, d in enumerate(defs):
        out += _expand(d, defaults, f"{where}: definitions[{i}]")
    if not out:
        raise ConfigError(f"{where}: no definitions (give 'definitions' or 'preset')")
    return dedupe(out)


def load_config(path: str) -> list[Definition]:
    """Definitions from a ``.yaml``/``.yml``/``.json`` or ``.toml`` file."""
    if not os.path.isfile(path):
        raise ConfigError(f"config {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".toml":
            import tomllib

            with open(path, "rb") as f:
                raw = tomllib.load(f)
        elif ext in (".yaml", ".yml", ".json"):
            import yaml

            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f)
        else:
            raise ConfigError(f"config {path!r}: unknown extension {ext!r}; use .yaml, .yml, .json or .toml")
    except ConfigError:
        raise
    except Exception as e:  # yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError
        raise ConfigError(f"config {path!r} cannot be parsed: {e}") from e
    return parse_config(raw, f"config {path!r}")


def dedupe(defs: Iterable[Definition]) -> list[Definition]:
    seen: dict[str, Definition] = {}
    for d in defs:
        seen.setdefault(d.key, d)
    return list(seen.values())


def with_overrides(defs: Iterable[Definition], **overrides: Any) -> list[Definition]:
    """Apply ``n_examples=...``, ``m=...`` etc. to every definition (``None`` values ignored)."""
    ov = {k: v for k, v in overrides.items() if v is not None}
    if not ov:
        return list(defs)
    try:
        return dedupe(replace(d, **ov) for d in defs)
    except ConfigError as e:
        raise ConfigError(f"override {ov}: {e}") from None


# ----------------------------------------------------------------------------- fitted to a zoo's data

def _provides(manifest: Manifest, n: int) -> bool:
    try:
        return len(manifest.sharpness_data(n)[1]) >= n
    except Exception:  # noqa: BLE001 - a factory that cannot serve n, for whatever reason it says
        return False


def fit_to_data(manifest: Manifest, defs: list[Definition]) -> tuple[list[Definition], str | None]:
    """``defs`` with every ``n_examples`` the zoo's data cannot provide lowered to the largest
    multiple of every definition's ``m`` that it can (a small zoo's data, e.g. the tiny preset's 256
    training examples under the default 512), and the line that says so (None if nothing changed).
    The data factory is asked by bisection over those multiples."""
    need = max(d.n_examples for d in defs)
    if _provides(manifest, need) or not _provides(manifest, min(d.m for d in defs)):
        return defs, None   # enough, or a factory that fails for any number (check_data says why)
    step = math.lcm(*(d.m for d in defs))
    lo, hi = 0, need // step     # the largest k whose k * step examples the data provide
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _provides(manifest, mid * step) else (lo, mid - 1)
    if lo == 0:
        raise ConfigError(f"the zoo's sharpness data ({manifest.data['factory']}) cannot provide {step} examples, "
                          f"the smallest multiple of every definition's m ({sorted({d.m for d in defs})}): use a "
                          "smaller --m")
    n = lo * step
    fitted = dedupe([replace(d, n_examples=min(d.n_examples, n)) for d in defs])
    asked = sorted({d.n_examples for d in defs if d.n_examples > n})
    return fitted, (f"the zoo's data provides fewer than {need} examples: definitions asking for "
                    f"{', '.join(map(str, asked))} use {n}, the largest multiple of every definition's m ({step}) "
                    "that it provides (--n-examples N sets the number)")


def check_data(manifest: Manifest, defs: list[Definition]) -> None:
    """Fail fast, before any work, when the zoo's data cannot serve a definition (a config
    problem, not a checkpoint's): e.g. the paper preset's 1024 examples on a 600-example set, or
    a data factory that cannot be imported or raises."""
    factory = manifest.data["factory"]
    for n in sorted({d.n_examples for d in defs}):
        try:
            x, y = manifest.sharpness_data(n)
            if len(y) < n:
                raise ValueError(f"it returned {len(y)} examples")
        except Exception as e:  # noqa: BLE001 - whatever the user's factory raises, said as a config error
            if _provides(manifest, 1):   # the factory works: the count is the problem
                raise ConfigError(f"the zoo's sharpness data ({factory}) cannot provide {n} examples: {e}. Use "
                                  "fewer examples (--n-examples N, a multiple of every definition's m)") from e
            raise ConfigError(f"the zoo's data factory {factory} failed: {type(e).__name__}: {e}") from e
