"""Geodesic sharpness's settings: the core's :class:`~sharpfast.settings.Settings` with the metric,
the blocks, the Gram relaxation and the solver's options (DESIGN.md §2c)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..settings import ApgdSettings, _positive_float
from .blocks import GLBlock
from .metric import check_metric

GEODESIC_EPS = 1e-8   # the Gram matrices' relaxation P + eps I, Q + eps I (DESIGN.md §2c.2)


@dataclass(frozen=True, kw_only=True)
class GeodesicSettings(ApgdSettings):
    """Geodesic sharpness (DESIGN.md §2c): the worst case over a geodesic ball of radius ``rho`` in a
    GL-invariant metric (``metric="mix"`` or ``"inv"``) on the attention blocks ``blocks``
    (``"auto"``: :func:`sharpfast.find_gl_blocks`; or a list of :class:`sharpfast.GLBlock`), the
    other parameters in the adaptive geometry of the scale rule (``||xi / c||_2``), solved by the
    scaled solver's APGD from ``xi = 0`` (``init="zero"``) or from ``n_restarts`` random points of the
    sphere (``init="random"``). ``second_order=False`` drops the geodesic correction."""

    kind: ClassVar[str] = "geodesic"
    norm: str = "l2"
    metric: str = "mix"
    blocks: Any = "auto"
    eps: float = GEODESIC_EPS
    second_order: bool = True
    init: str = "zero"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.norm != "l2":
            raise ValueError(f"geodesic sharpness is a ball in a Riemannian metric: norm must be 'l2', got {self.norm!r}")
        check_metric(self.metric)
        if isinstance(self.blocks, str):
            if self.blocks != "auto":
                raise ValueError(f"blocks must be 'auto' or a list of GLBlock, got {self.blocks!r}")
        else:
            blocks = tuple(self.blocks) if not isinstance(self.blocks, GLBlock) else None
            if blocks is None or not all(isinstance(b, GLBlock) for b in blocks):
                raise TypeError("blocks must be 'auto' or a list of sharpfast.GLBlock")
            self._set("blocks", blocks)
        self._set("eps", _positive_float("eps", self.eps, allow_zero=True))
        self._set("second_order", bool(self.second_order))
        if self.init not in ("zero", "random"):
            raise ValueError(f"geodesic sharpness starts at init='zero' or 'random', got {self.init!r}")
        if self.n_restarts > 1 and self.init == "zero":
            raise ValueError("n_restarts > 1 needs init='random': restarts from xi = 0 are identical")

    def describe(self) -> dict:
        d = super().describe()
        if not isinstance(self.blocks, str):
            d["blocks"] = [b.describe() for b in self.blocks]
        return d
