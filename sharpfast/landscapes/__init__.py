"""Loss landscapes: the loss along one or two directions of weight space, as the public code draws
them (tomgoldstein/loss-landscape's filter-normalized plots, Goodfellow et al.'s interpolation,
PyHessian's eigenvector plots, a trajectory's PCA plane), many grid points per vmapped forward.

``directions`` (drawing and normalizing them), ``evaluate`` (the grid: the fast path and the public
loop), ``result`` (the landscape, its plots and h5 files), ``api`` (:func:`landscape`).
"""
from .api import landscape
from .result import LandscapeResult

__all__ = ["landscape", "LandscapeResult"]
