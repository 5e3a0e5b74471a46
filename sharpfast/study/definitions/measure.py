"""The generalization measures of Jiang et al. (2020) and Neyshabur et al. as definitions: a function
of the weights and the data (``sharpfast.study.measures``), keyed by the measure's name, the number
of examples and the revision of the measures' conventions (values of an earlier revision are not
reused)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .. import measures
from .base import ConfigError, Definition, DEFAULT_EXAMPLES


@dataclass(frozen=True, kw_only=True)
class Measure(Definition):
    kinds: ClassVar[tuple[str, ...]] = ("measure",)
    required: ClassVar[tuple[str, ...]] = ("kind", "measure")
    is_measure: ClassVar[bool] = True

    kind: str = "measure"
    measure: str | None = None   # the measure's name, e.g. "prod-of-spec"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.measure not in measures.MEASURES:
            raise ConfigError(f"measure must be one of {sorted(measures.MEASURES)}, got {self.measure!r}")

    def canonical(self) -> dict[str, Any]:
        return {"kind": self.kind, "measure": self.measure, "n_examples": self.n_examples,
                "revision": measures.MEASURES_REVISION}

    @property
    def family(self) -> str:
        return self.measure + ("" if self.n_examples == DEFAULT_EXAMPLES else f" n_examples={self.n_examples}")

    def evaluate(self, model, batches, backend: str = "auto", init=None, metrics: dict | None = None) -> dict[str, Any]:
        if not all(isinstance(b[0], torch.Tensor) for b in batches):
            raise TypeError("the Jiang et al. measures take models with one tensor input, not dict or tuple inputs")
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        value = measures.measure(self.measure, model, x, y, init=init, metrics=metrics)
        return dict(value=value, err_value=None, per_batch=[value], delta_norm=0.0, backend="measure")
