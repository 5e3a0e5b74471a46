"""What every definition is: the model side it shares with the core (``sharpfast.settings.Measurement``),
the examples it is measured on, and its identity in the store.

``Definition(kind, ...)`` builds the class of that kind (:mod:`.sharpness`, :mod:`.curvature`,
:mod:`.measure`). Settings another kind takes are accepted and ignored, so one config's
``defaults`` can serve every kind; a name no kind takes is an error.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar

from sharpfast import LOGIT_NORMALIZATIONS
from sharpfast.settings import Measurement

from ..measures import MEASURES_REVISION

DEFAULT_EXAMPLES = 512
LOGIT_NORMS = (False, *LOGIT_NORMALIZATIONS)
# The order of a definition's fields where it is printed (``sharpfast definitions``): the order they
# have always had, whatever class holds them.
FIELD_ORDER = ("kind", "norm", "rho", "adaptive", "normalize_logits", "m", "n_examples", "n_iters", "n_restarts",
               "rand_init", "step_size_mult", "solver", "init", "n_samples", "seed", "adaptive_eta",
               "adaptive_weights_only", "curvature", "n_probes", "alpha", "n_vectors", "n_lanczos", "measure",
               "metric", "eps", "second_order", "revision")
# The fields a definition's name spells out; the others appear as key=value where not at their default.
NAMED_FIELDS = ("kind", "norm", "rho", "adaptive", "normalize_logits", "m", "curvature", "revision", "metric")


class ConfigError(ValueError):
    """A sharpness-definition config or flag combination that cannot be used."""


def core_default(settings_class: type, name: str) -> Any:
    """A setting's default as the core writes it, so a definition's default is written once."""
    for f in fields(settings_class):
        if f.name == name and f.default is not MISSING:
            return f.default
    raise LookupError(f"{settings_class.__name__} has no default for {name!r}")


# -- one check per kind of value, raising ConfigError with the field's name --------------------

def check_count(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    return v


def check_number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{name} must be a number, got {v!r}")
    return float(v)


def check_flag(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{name} must be true or false, got {v!r}")
    return v


def check_choice(name: str, v: Any, choices: tuple) -> Any:
    if v not in choices:
        raise ConfigError(f"{name} must be one of {choices}, got {v!r}")
    return v


class _ByKind(type):
    """``Definition(kind, norm, rho, **settings)`` builds the class registered for ``kind`` from the
    settings that class takes."""

    def __call__(cls, *args: Any, **kwargs: Any):
        if cls is not Definition:
            return super().__call__(*args, **kwargs)
        if len(args) > 3:
            raise TypeError(f"Definition takes kind, norm and rho by position, got {len(args)} positional arguments")
        for name, value in zip(("kind", "norm", "rho"), args):
            if name in kwargs:
                raise TypeError(f"Definition got {name!r} by position and by name")
            kwargs[name] = value
        kind = kwargs.get("kind")
        if kind not in Definition.classes:
            raise ConfigError(f"kind must be one of {kinds()}, got {kind!r}")
        unknown = set(kwargs) - all_fields()
        if unknown:
            raise TypeError(f"Definition got unknown field(s) {sorted(unknown)}")
        if kwargs.get("measure") is not None and kind != "measure":   # a measure's name is never a setting
            raise ConfigError(f"'measure' is for kind 'measure'; kind {kind!r} does not take it")
        own = Definition.classes[kind]
        return own(**{k: v for k, v in kwargs.items() if k in own.field_names()})


@dataclass(frozen=True, kw_only=True)
class Definition(metaclass=_ByKind):
    """A sharpness definition: everything that changes a value. Its ``key`` (a hash of the fields
    that matter for its kind) identifies it in the results store, so a changed setting is a new
    definition, and a setting its kind does not use never splits one definition into two keys."""

    classes: ClassVar[dict[str, type]] = {}   # kind -> class, filled by the subclasses
    kinds: ClassVar[tuple[str, ...]] = ()     # the kinds a subclass stands for
    required: ClassVar[tuple[str, ...]] = ("kind",)   # what a config must give
    unkeyed: ClassVar[tuple[str, ...]] = ()   # fields its key leaves out (always, whatever their value)
    is_curvature: ClassVar[bool] = False
    is_measure: ClassVar[bool] = False
    needs_rho: ClassVar[bool] = False
    stackable: ClassVar[bool] = False         # evaluated for many checkpoints at once (sharpfast.evaluate_many)
    rho: ClassVar[float | None] = None        # the radius: None for the kinds without one

    kind: str
    adaptive: bool = core_default(Measurement, "adaptive")
    normalize_logits: Any = core_default(Measurement, "normalize_logits")  # False | "norm" (published) | "std"
    m: int = 128                   # examples per m-sharpness batch
    n_examples: int | None = None  # examples measured (a multiple of m); None: the largest multiple of m
                                   # up to DEFAULT_EXAMPLES (512 for every m dividing it)
    seed: int = core_default(Measurement, "seed")
    adaptive_eta: float = core_default(Measurement, "adaptive_eta")
    adaptive_weights_only: bool = core_default(Measurement, "adaptive_weights_only")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for kind in cls.__dict__.get("kinds", ()):
            Definition.classes[kind] = cls

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)   # normalizing a field of a frozen dataclass

    def __post_init__(self) -> None:
        if self.kind not in self.kinds:
            raise ConfigError(f"kind must be one of {self.kinds}, got {self.kind!r}")
        nl = self.normalize_logits
        if nl is True:
            self._set("normalize_logits", "norm")
        elif nl in (None, "none", "false", "off"):
            self._set("normalize_logits", False)
        if self.normalize_logits not in LOGIT_NORMS:
            raise ConfigError(f"normalize_logits must be false, true/'norm' or 'std', got {nl!r}")
        for name in ("adaptive", "adaptive_weights_only"):
            check_flag(name, getattr(self, name))
        check_count("m", self.m)
        if self.n_examples is None:
            self._set("n_examples", self.m * max(1, DEFAULT_EXAMPLES // self.m))
        check_count("n_examples", self.n_examples)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        self._set("adaptive_eta", check_number("adaptive_eta", self.adaptive_eta))
        if self.adaptive_eta < 0:
            raise ConfigError(f"adaptive_eta must be >= 0, got {self.adaptive_eta!r}")
        if self.n_examples % self.m:
            raise ConfigError(f"n_examples ({self.n_examples}) must be a multiple of m ({self.m}): "
                              "every m-sharpness batch has m examples")

    # -- identity -------------------------------------------------------------------------
    def canonical(self) -> dict[str, Any]:
        """The fields that matter for this kind, in :data:`FIELD_ORDER`. The key of a definition
        that existed before a field was added stays the same: a new field is keyed only by the
        kinds that use it, and a new setting at its old meaning is left out (see the subclasses)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.unkeyed}
        return {k: d[k] for k in sorted(d, key=FIELD_ORDER.index)}

    @property
    def key(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(self.canonical(), sort_keys=True)

    def _geometry(self) -> str:
        """The word after the kind in the name: the norm, the metric or the curvature."""
        raise NotImplementedError

    def _with_defaults(self) -> "Definition":
        """This kind at its defaults, with this definition's norm and m (and radius 1), the
        reference its name lists the differing settings against."""
        raise NotImplementedError

    @property
    def family(self) -> str:
        """The definition without its radius, e.g. ``max-linf-adaptive-norm m=128``."""
        parts = [self.kind, self._geometry(), "adaptive" if self.adaptive else "standard"]
        if self.normalize_logits:
            parts.append("lognorm" if self.normalize_logits == "norm" else "logstd")
        name = "-".join(parts) + f" m={self.m}"
        base = self._with_defaults().canonical()
        extra = [f"{k}={v}" for k, v in self.canonical().items() if k not in NAMED_FIELDS and v != base.get(k)]
        return name + ("" if not extra else " " + " ".join(extra))

    @property
    def name(self) -> str:
        return f"{self.family} rho={self.rho:g}" if self.needs_rho else self.family

    def model_side(self) -> dict[str, Any]:
        """The arguments every measure of the core takes alike (``sharpfast.settings.Measurement``'s)."""
        return dict(adaptive=self.adaptive, normalize_logits=self.normalize_logits, seed=self.seed,
                    adaptive_eta=self.adaptive_eta, adaptive_weights_only=self.adaptive_weights_only)

    def evaluate(self, model, batches, backend: str = "auto", init=None, metrics: dict | None = None) -> dict[str, Any]:
        """This definition's value on ``batches``: ``value``, ``err_value``, ``per_batch``,
        ``delta_norm``, ``backend`` (the store's columns), through the core's public API (the
        Jiang et al. measures: ``sharpfast.study.measures``, with the initial weights ``init`` and
        the zoo's recorded ``metrics``)."""
        raise NotImplementedError

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "definition") -> "Definition":
        d = dict(d)
        revision = d.pop("revision", MEASURES_REVISION)   # canonical() writes it for measures
        if revision != MEASURES_REVISION:
            raise ConfigError(f"{where}: measures of revision {revision!r} cannot be computed any more; this "
                              f"sharpfast computes revision {MEASURES_REVISION} (see sharpfast.study.measures)")
        known = all_fields()
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        own = Definition.classes.get(d.get("kind"), Definition)
        missing = set(own.required) - set(d)
        if missing:
            raise ConfigError(f"{where}: missing field(s) {sorted(missing)}")
        try:
            return Definition(**d)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{where}: {e}") from None

    def replace(self, **changes: Any) -> "Definition":
        """This definition with ``changes`` (settings its kind does not take are ignored)."""
        return Definition(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})



def kinds() -> tuple[str, ...]:
    return tuple(Definition.classes)


def all_fields() -> frozenset[str]:
    """The fields of every kind: what a config may name."""
    return frozenset().union(*(c.field_names() for c in Definition.classes.values()))
