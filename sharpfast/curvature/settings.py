"""The settings of the curvature measures: the model-side choices every measure shares
(:class:`~sharpfast.settings.Measurement`) and the curvature (the Hessian or the GGN)."""
from __future__ import annotations

from dataclasses import dataclass

from ..settings import Measurement
from .operator import CURVATURES

ESTIMATORS = ("hutch++", "hutchinson")


@dataclass(frozen=True, kw_only=True)
class CurvatureSettings(Measurement):
    """The model-side choices of a curvature measure (see :class:`~sharpfast.settings.Measurement`)."""

    kind = "curvature"
    curvature: str = "hessian"

    def __post_init__(self) -> None:
        if self.curvature not in CURVATURES:
            raise ValueError(f"unknown curvature {self.curvature!r}; expected one of {CURVATURES}")
        super().__post_init__()
