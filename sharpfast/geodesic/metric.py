"""What both geodesic backends share: the metric on the parameters outside every GL block (the
adaptive scale rule, ``||xi / c||_2``), the metric projection onto ``{horizontal, ||xi|| <= rho}``,
and the interface the solver uses (:class:`Geometry`).

All vectors are flat ``[N]`` tensors over the concatenated parameters (``ParamSet`` order). A
geometry is built once per call at the base point ``w0``: everything that depends only on ``w0``
(Gram matrices, their inverses, the Sylvester solve's eigenbasis) is computed there.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..params import ParamSet
from .blocks import Heads

METRICS = ("mix", "inv")


class Geometry:
    """The tangent space at ``w0``: ``sq_norm`` (the metric), ``riemannian`` (the metric's inverse
    applied to a gradient), ``horizontal`` (the metric-orthogonal projection onto the horizontal
    space), ``retract`` (``w0 + xi - Gamma(xi, xi) / 2``, with the pullback of a gradient at the
    result to one in ``xi``). Subclasses add the blocks' parts to the adaptive rest's."""

    def __init__(self, w0: torch.Tensor, c: torch.Tensor, heads: list[Heads], metric: str, eps: float,
                 second_order: bool):
        self.w0, self.metric, self.eps, self.second_order = w0, metric, eps, second_order
        in_block = torch.zeros_like(w0, dtype=torch.bool)
        for group in heads:
            in_block[group.g.reshape(-1)] = True
            in_block[group.hh.reshape(-1)] = True
        # the rest: c = |w| (or the settings' scale rule); c = 0 is frozen, never divided by. Two
        # parameter-sized vectors (c^2 is formed where it is used)
        self.c_rest = torch.where(in_block, torch.zeros_like(c), c)
        frozen = (c == 0) & ~in_block   # rarely any (a custom scale with zeros): then a mask
        self.frozen = frozen if bool(frozen.any()) else None
        del in_block, c, frozen
        self.inv_c_rest = torch.where(self.c_rest > 0, 1 / self.c_rest.where(self.c_rest > 0, 1.0), 0.0)

    # the rest's parts, then the blocks' (subclasses)
    def sq_norm(self, xi: torch.Tensor) -> torch.Tensor:
        return torch.mul(xi, self.inv_c_rest).square_().sum() + self.blocks_sq_norm(xi)

    def riemannian(self, g: torch.Tensor) -> torch.Tensor:
        return self.blocks_riemannian(g, self.c_rest.square().mul_(g))

    def horizontal(self, xi: torch.Tensor) -> torch.Tensor:
        return self.horizontal_(xi.clone())

    def horizontal_(self, xi: torch.Tensor) -> torch.Tensor:
        """:meth:`horizontal` in place: frozen coordinates to 0, the blocks' parts projected (each
        block reads its part before writing it back)."""
        if self.frozen is not None:
            xi.masked_fill_(self.frozen, 0)
        return self.blocks_horizontal(xi, xi)

    def whiten(self, z: torch.Tensor) -> torch.Tensor:
        """``M^-1/2 z``: a vector whose metric norm is ``||z||`` (``c z`` outside the blocks)."""
        return self.blocks_whiten(z, self.c_rest * z)

    def retract(self, xi: torch.Tensor, out: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """``(v, pullback)``: the point ``w0 + xi - Gamma(xi, xi)/2`` (written into ``out`` where the
        geometry can) and ``g_v -> g_xi``, which may overwrite ``g_v``."""
        if not self.second_order:
            return torch.add(self.w0, xi, out=out), lambda g: g
        return self.second_order_retract(xi, out)

    def project(self, xi: torch.Tensor, rho: float) -> torch.Tensor:
        """The metric projection onto ``{horizontal, ||xi|| <= rho}``: the horizontal projection
        (metric-orthogonal onto a subspace), then a radial rescale in the metric."""
        return self.shrink(self.horizontal(xi), rho)

    def shrink(self, xi: torch.Tensor, rho: float) -> torch.Tensor:
        """The radial part of :meth:`project`: ``xi`` rescaled onto the ball where it is outside."""
        return self.shrink_(xi.clone(), rho)

    def shrink_(self, xi: torch.Tensor, rho: float) -> torch.Tensor:
        """:meth:`shrink` in place."""
        return xi.mul_(torch.clamp(rho / self.norm(xi), max=1.0))

    def norm(self, xi: torch.Tensor) -> torch.Tensor:
        return self.sq_norm(xi).sqrt()

    # the blocks' parts
    def blocks_sq_norm(self, xi):
        raise NotImplementedError

    def blocks_riemannian(self, g, out):
        raise NotImplementedError

    def blocks_horizontal(self, xi, out):
        raise NotImplementedError

    def blocks_whiten(self, z, out):
        raise NotImplementedError

    def second_order_retract(self, xi, out=None):
        raise NotImplementedError


def check_grams(P: torch.Tensor, Q: torch.Tensor) -> None:
    """``P``, ``Q`` (``[..., h, h]``, relaxed) must be positive definite: both metrics invert them."""
    for name, M in (("G^T G", P), ("H^T H", Q)):
        e = torch.linalg.eigvalsh(M.double())
        if not bool((e[..., 0] > e[..., -1] * torch.finfo(torch.float64).eps * M.shape[-1]).all()):
            raise ValueError(f"a GL block head's Gram matrix {name} + eps I is singular (a factor without full "
                             "column rank, e.g. a head whose weights are zero): pass eps > 0")


def sym_power(M: torch.Tensor, p: float) -> torch.Tensor:
    """``M^p`` of symmetric positive definite ``M`` (``[..., h, h]``), by its eigendecomposition."""
    e, V = torch.linalg.eigh(M)
    return V @ torch.diag_embed(e**p) @ V.mT


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected 'mix' or 'inv'")
    return metric


def flat_scale(params: ParamSet) -> torch.Tensor:
    return torch.cat([c.reshape(-1) for c in params.scales()])
