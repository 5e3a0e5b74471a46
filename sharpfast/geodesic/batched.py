"""The fast geometry: the reference's formulas (``geodesic.reference``) batched over every head of
equal shape, in all layers at once, with what depends only on ``w0`` computed once per call: the
factors ``G, H``, ``P, Q`` and their inverses, and for the inv metric the Sylvester solve's
eigenbasis (GEODESIC.md §4): ``C = P^1/2 Q P^1/2 = U diag(c) U^T``, after which a projection is
``X = P^1/2 U [(U^T P^-1/2 B P^1/2 U)_ij / (c_i + c_j)] U^T P^-1/2`` with ``B = P H^T xH - xG^T G Q``:
matrix products only, with the fixed factors (``P H^T``, ``G Q``, ``P^1/2 U``, ``U^T P^-1/2``,
``H Q^-1``, ``P^-1 G^T``) multiplied out beforehand. The factorizations run in float64, whatever the
parameters' dtype.
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
        # the horizontal projection's fixed products (mix: L = (xH^T (H Q^-1) - (P^-1 G^T) xG) / 2)
        self.H_Q_inv, self.P_inv_Gt = cast(H @ torch.linalg.inv(Q)), cast(torch.linalg.inv(P) @ G.mT)
        if metric == "inv":
            p, V = torch.linalg.eigh(P)
            P_half = V @ torch.diag_embed(p.sqrt()) @ V.mT
            P_minus_half = V @ torch.diag_embed(p.rsqrt()) @ V.mT
            c, U = torch.linalg.eigh(P_half @ Q @ P_half)
            # B = (P H^T) xH - xG^T (G Q);  X = R ((U^T P^-1/2) B R * D) (U^T P^-1/2),  R = P^1/2 U
            self.P_Ht, self.G_Q = cast(P @ H.mT), cast(G @ Q)
            self.R, self.Ut_P_minus_half = cast(P_half @ U), cast(U.mT @ P_minus_half)
            self.denominator = cast(1 / (c[:, :, None] + c[:, None, :]))

    def horizontal(self, metric, xG, xH):
        if metric == "mix":
            L = (xH.mT @ self.H_Q_inv - self.P_inv_Gt @ xG) / 2
        else:
            B = self.P_Ht @ xH - xG.mT @ self.G_Q
            left, R = self.Ut_P_minus_half, self.R
            L = (R @ ((left @ B @ R) * self.denominator) @ left).mT
        return xG + self.G @ L, xH - self.H @ L.mT

    def christoffel(self, metric, xG, xH):
        G, H = self.G, self.H
        if metric == "inv":   # -xF M^-1 (xF^T F + F^T xF) + F M^-1 xF^T xF
            def gamma(F, xF, M_inv):
                xF_F = xF.mT @ F
                return -xF @ (M_inv @ (xF_F + xF_F.mT)) + F @ (M_inv @ (xF.mT @ xF))
            return gamma(G, xG, self.P_inv), gamma(H, xH, self.Q_inv)
        xG_G, xH_H = xG.mT @ G, xH.mT @ H
        return ((xG @ (xH_H + xH_H.mT) - G @ (xH.mT @ xH)) @ self.Q_inv,
                (xH @ (xG_G + xG_G.mT) - H @ (xG.mT @ xG)) @ self.P_inv)


    def christoffel_vjp(self, metric, xG, xH, CG, CH):
        """The gradient in ``(xG, xH)`` of ``<C, Gamma(x, x)>``, written out (autograd through the small
        matrix products costs more than the products themselves)."""
        G, H = self.G, self.H
        sym = lambda M: M + M.mT
        if metric == "inv":   # Gamma_F = -xF M^-1 S_F + F M^-1 xF^T xF, S_F = xF^T F + F^T xF
            def grad(F, xF, M_inv, C):
                S = xF.mT @ F
                return (-C @ (sym(S) @ M_inv) - F @ sym(M_inv @ (xF.mT @ C)) + xF @ sym(M_inv @ (F.mT @ C)))
            return grad(G, xG, self.P_inv, CG), grad(H, xH, self.Q_inv, CH)
        # mix: Gamma_G = (xG S_H - G xH^T xH) Q^-1, Gamma_H = (xH S_G - H xG^T xG) P^-1
        CG, CH = CG @ self.Q_inv, CH @ self.P_inv
        S_G, S_H = sym(xG.mT @ G), sym(xH.mT @ H)
        return (CG @ S_H + G @ sym(xH.mT @ CH) - xG @ sym(H.mT @ CH),
                CH @ S_G + H @ sym(xG.mT @ CG) - xH @ sym(G.mT @ CG))


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

    def retract(self, xi):
        """``w0 + xi - Gamma(xi, xi)/2`` and its pullback ``g -> g - grad <g, Gamma(xi, xi)> / 2``."""
        v = self.w0 + xi
        if not self.second_order:
            return v, lambda g: g
        parts = [(k, xi[k.g], xi[k.hh]) for k in self.groups]
        for k, xG, xH in parts:
            gamma_G, gamma_H = k.christoffel(self.metric, xG, xH)
            v[k.g] -= gamma_G / 2
            v[k.hh] -= gamma_H / 2

        def pullback(g):
            out = g.clone()
            for k, xG, xH in parts:
                dG, dH = k.christoffel_vjp(self.metric, xG, xH, g[k.g], g[k.hh])
                out[k.g] -= dG / 2
                out[k.hh] -= dH / 2
            return out
        return v, pullback

    def blocks_correction(self, xi):
        correction = torch.zeros_like(xi)
        for k in self.groups:
            gamma_G, gamma_H = k.christoffel(self.metric, xi[k.g], xi[k.hh])
            correction = correction.index_put((k.g,), -gamma_G / 2).index_put((k.hh,), -gamma_H / 2)
        return correction
