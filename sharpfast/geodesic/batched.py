"""The fast geometry: the reference's formulas (``geodesic.reference``) batched over every head of
equal shape, in all layers at once, with what depends only on ``w0`` computed once per call: the
factors ``G, H``, ``P, Q`` and their inverses, and for the inv metric the Sylvester solve's
eigenbasis (GEODESIC.md §4): ``C = P^1/2 Q P^1/2 = U diag(c) U^T``, after which a projection is
``X = P^1/2 U [(U^T P^-1/2 B P^1/2 U)_ij / (c_i + c_j)] U^T P^-1/2`` with ``B = P H^T xH - xG^T G Q``:
matrix products only. The factorizations run in float64, whatever the parameters' dtype.
"""
from __future__ import annotations

import torch

from .blocks import Heads
from .metric import Geometry, check_grams


class _Group:
    """One shape's heads: index maps ``g`` ``[B, n, h]``, ``hh`` ``[B, m, h]`` and the precomputed matrices."""

    def __init__(self, heads: Heads, w0: torch.Tensor, metric: str, eps: float):
        self.g, self.hh = heads.g, heads.hh
        G, H = w0[self.g].double(), w0[self.hh].double()
        eye = torch.eye(G.shape[-1], dtype=torch.float64, device=w0.device)
        P, Q = G.mT @ G + eps * eye, H.mT @ H + eps * eye
        check_grams(P, Q)
        cast = lambda t: t.to(w0.dtype)
        self.G, self.H, self.P, self.Q = cast(G), cast(H), cast(P), cast(Q)
        self.P_inv, self.Q_inv = cast(torch.linalg.inv(P)), cast(torch.linalg.inv(Q))
        if metric == "inv":
            p, V = torch.linalg.eigh(P)
            P_half = V @ torch.diag_embed(p.sqrt()) @ V.mT
            P_minus_half = V @ torch.diag_embed(p.rsqrt()) @ V.mT
            c, U = torch.linalg.eigh(P_half @ Q @ P_half)
            self.P_half, self.P_minus_half, self.U = cast(P_half), cast(P_minus_half), cast(U)
            self.denominator = cast(1 / (c[:, :, None] + c[:, None, :]))

    def horizontal(self, metric, xG, xH):
        if metric == "mix":
            L = (xH.mT @ self.H @ self.Q_inv - self.P_inv @ self.G.mT @ xG) / 2
        else:
            B = self.P @ self.H.mT @ xH - xG.mT @ self.G @ self.Q
            B_tilde = self.P_minus_half @ B @ self.P_half
            Y = self.U @ ((self.U.mT @ B_tilde @ self.U) * self.denominator) @ self.U.mT
            L = (self.P_half @ Y @ self.P_minus_half).mT
        return xG + self.G @ L, xH - self.H @ L.mT

    def christoffel(self, metric, xG, xH):
        G, H = self.G, self.H
        if metric == "inv":
            gamma = lambda F, xF, M_inv: -xF @ M_inv @ (xF.mT @ F + F.mT @ xF) + F @ M_inv @ xF.mT @ xF
            return gamma(G, xG, self.P_inv), gamma(H, xH, self.Q_inv)
        return ((xG @ (xH.mT @ H + H.mT @ xH) - G @ xH.mT @ xH) @ self.Q_inv,
                (xH @ (xG.mT @ G + G.mT @ xG) - H @ xG.mT @ xG) @ self.P_inv)


class BatchedGeometry(Geometry):
    def __init__(self, w0, c, heads: list[Heads], metric: str, eps: float, second_order: bool):
        super().__init__(w0, c, heads, metric, eps, second_order)
        self.groups = [_Group(h, w0, metric, eps) for h in heads]

    def blocks_sq_norm(self, xi):
        total = torch.zeros((), dtype=xi.dtype, device=xi.device)
        for k in self.groups:
            xG, xH = xi[k.g], xi[k.hh]
            MG, MH = (k.P_inv, k.Q_inv) if self.metric == "inv" else (k.Q, k.P)
            total = total + (xG * (xG @ MG)).sum() + (xH * (xH @ MH)).sum()
        return total

    def blocks_riemannian(self, g, out):
        for k in self.groups:
            MG, MH = (k.P, k.Q) if self.metric == "inv" else (k.Q_inv, k.P_inv)
            out[k.g], out[k.hh] = g[k.g] @ MG, g[k.hh] @ MH
        return out

    def blocks_horizontal(self, xi, out):
        for k in self.groups:
            out[k.g], out[k.hh] = k.horizontal(self.metric, xi[k.g], xi[k.hh])
        return out

    def blocks_correction(self, xi):
        correction = torch.zeros_like(xi)
        for k in self.groups:
            gamma_G, gamma_H = k.christoffel(self.metric, xi[k.g], xi[k.hh])
            correction = correction.index_put((k.g,), -gamma_G / 2).index_put((k.hh,), -gamma_H / 2)
        return correction
