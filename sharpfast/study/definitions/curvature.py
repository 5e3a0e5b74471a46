"""The curvature definitions (``sharpfast.curvature``), the limits sharpness tends to as rho -> 0:
``tr(C H C)``, ``lambda_max(C H C)``, Adam's and Rényi sharpness. No radius, no norm."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import sharpfast
from sharpfast.curvature import CURVATURES, CurvatureSettings

from .base import ConfigError, Definition, check_choice, check_count, core_default

# the settings each curvature kind uses: the others are not keyed
USES = {"trace": ("curvature", "n_probes"), "lambda_max": ("curvature",), "adam": ("curvature", "n_probes"),
        "renyi": ("curvature", "alpha", "n_vectors", "n_lanczos")}


@dataclass(frozen=True, kw_only=True)
class Curvature(Definition):
    kinds: ClassVar[tuple[str, ...]] = tuple(USES)
    is_curvature: ClassVar[bool] = True

    curvature: str = core_default(CurvatureSettings, "curvature")   # "hessian" or "ggn"
    n_probes: int = 100     # trace, adam: Hessian-vector products per batch (adam: the diagonal's estimate)
    alpha: float = 2.0      # renyi
    n_vectors: int = 10     # renyi: quadrature probes per batch
    n_lanczos: int = 50     # renyi: Lanczos steps per probe (the core's default is 100; the study's, 50)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("curvature", self.curvature, CURVATURES)
        for name in ("n_probes", "n_vectors", "n_lanczos"):
            check_count(name, getattr(self, name))
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0 \
                or self.alpha == 1:
            raise ConfigError(f"alpha must be a positive number other than 1, got {self.alpha!r}")
        self._set("alpha", float(self.alpha))

    def canonical(self) -> dict[str, Any]:
        d = super().canonical()
        for name in ("curvature", "n_probes", "alpha", "n_vectors", "n_lanczos"):
            if name not in USES[self.kind]:
                d.pop(name)
        return d

    def _geometry(self) -> str:
        return self.curvature

    def _with_defaults(self) -> Definition:
        return Curvature(kind=self.kind, m=self.m)

    def evaluate(self, model, batches, backend: str = "auto", init=None, metrics: dict | None = None) -> dict[str, Any]:
        common = dict(self.model_side(), curvature=self.curvature)
        if self.kind == "trace":
            per_batch = sharpfast.hessian_trace(model, batches, n_probes=self.n_probes, **common).per_batch
        elif self.kind == "lambda_max":
            per_batch = [v[0] for v in sharpfast.hessian_eigenvalues(model, batches, k=1, **common).per_batch]
        elif self.kind == "adam":
            per_batch = sharpfast.adam_sharpness(model, batches, n_probes=self.n_probes, **common).per_batch
        else:
            per_batch = sharpfast.renyi_sharpness(model, batches, alpha=self.alpha, n_vectors=self.n_vectors,
                                                  n_iter=self.n_lanczos, **common).per_batch
        return dict(value=sum(per_batch) / len(per_batch), err_value=None, per_batch=[float(v) for v in per_batch],
                    delta_norm=0.0, backend="curvature")

