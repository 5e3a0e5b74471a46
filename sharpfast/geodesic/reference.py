"""The reference geometry: DESIGN.md §2c.3-5 written head by head, one small matrix at a time.

For a head, ``G`` (``n x h``) and ``H`` (``m x h``) are its two factors at the base point and
``P = G^T G + eps I``, ``Q = H^T H + eps I``. A tangent vector has the parts ``xG``, ``xH``.

* metric    inv: ``tr(P^-1 xG^T xG) + tr(Q^-1 xH^T xH)``;  mix: ``tr(Q xG^T xG) + tr(P xH^T xH)``
* gradient  inv: ``(gG P, gH Q)``;  mix: ``(gG Q^-1, gH P^-1)``
* horizontal projection  ``(xG + G L, xH - H L^T)``: mix ``L = (xH^T H Q^-1 - P^-1 G^T xG) / 2``;
  inv ``L = X^T`` with ``A X + X A = B``, ``A = P Q``, ``B = P H^T xH - xG^T G Q`` (solved here
  as the linear system ``(I (x) A + A^T (x) I) vec X = vec B``, the definition itself)
* second-order term ``Gamma`` of §5; the perturbed head is ``(G + xG - Gamma_G/2, H + xH - Gamma_H/2)``
"""
from __future__ import annotations

import torch

from .blocks import Heads
from .metric import Geometry, check_grams, sym_power

inv = torch.linalg.inv


def metric_sq(metric, P, Q, xG, xH):
    if metric == "inv":
        return torch.trace(inv(P) @ xG.T @ xG) + torch.trace(inv(Q) @ xH.T @ xH)
    return torch.trace(Q @ xG.T @ xG) + torch.trace(P @ xH.T @ xH)


def riemannian_gradient(metric, P, Q, gG, gH):
    if metric == "inv":
        return gG @ P, gH @ Q
    return gG @ inv(Q), gH @ inv(P)


def horizontal_projection(metric, G, H, P, Q, xG, xH):
    if metric == "mix":
        L = (xH.T @ H @ inv(Q) - inv(P) @ G.T @ xG) / 2
    else:
        A, B = P @ Q, P @ H.T @ xH - xG.T @ G @ Q
        I = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        vec_X = torch.linalg.solve(torch.kron(I, A) + torch.kron(A.T.contiguous(), I), B.T.reshape(-1))
        L = vec_X.reshape(A.shape)   # vec is column-major: this row-major reshape is X^T = L
    return xG + G @ L, xH - H @ L.T


def whiten(metric, P, Q, zG, zH):
    """``M^-1/2 z``: inv ``(zG P^1/2, zH Q^1/2)``, mix ``(zG Q^-1/2, zH P^-1/2)``."""
    if metric == "inv":
        return zG @ sym_power(P, 0.5), zH @ sym_power(Q, 0.5)
    return zG @ sym_power(Q, -0.5), zH @ sym_power(P, -0.5)


def christoffel(metric, G, H, P, Q, xG, xH):
    if metric == "inv":
        gamma = lambda F, xF, M: -xF @ inv(M) @ (xF.T @ F + F.T @ xF) + F @ inv(M) @ xF.T @ xF
        return gamma(G, xG, P), gamma(H, xH, Q)
    return (xG @ (xH.T @ H + H.T @ xH) @ inv(Q) - G @ xH.T @ xH @ inv(Q),
            xH @ (xG.T @ G + G.T @ xG) @ inv(P) - H @ xG.T @ xG @ inv(P))


class ReferenceGeometry(Geometry):
    """Every head on its own: the formulas above in a loop."""

    def __init__(self, w0, c, heads: list[Heads], metric: str, eps: float, second_order: bool):
        super().__init__(w0, c, heads, metric, eps, second_order)
        self.heads = []
        for group in heads:
            for ig, ih in zip(group.g, group.hh):
                G, H = w0[ig], w0[ih]
                I = torch.eye(G.shape[1], dtype=w0.dtype, device=w0.device)
                P, Q = G.T @ G + eps * I, H.T @ H + eps * I
                check_grams(P, Q)
                self.heads.append((ig, ih, G, H, P, Q))

    def blocks_sq_norm(self, xi):
        return sum((metric_sq(self.metric, P, Q, xi[ig], xi[ih]) for ig, ih, _, _, P, Q in self.heads),
                   torch.zeros((), dtype=xi.dtype, device=xi.device))

    def blocks_riemannian(self, g, out):
        for ig, ih, _, _, P, Q in self.heads:
            out[ig], out[ih] = riemannian_gradient(self.metric, P, Q, g[ig], g[ih])
        return out

    def blocks_horizontal(self, xi, out):
        for ig, ih, G, H, P, Q in self.heads:
            out[ig], out[ih] = horizontal_projection(self.metric, G, H, P, Q, xi[ig], xi[ih])
        return out

    def blocks_whiten(self, z, out):
        for ig, ih, _, _, P, Q in self.heads:
            out[ig], out[ih] = whiten(self.metric, P, Q, z[ig], z[ih])
        return out

    def second_order_retract(self, xi, out=None):   # out: unused, the point is a fresh tensor
        """``v = w0 + xi - Gamma(xi, xi)/2``, its pullback by autograd through the formulas."""
        xi = xi.detach().requires_grad_(True)
        with torch.enable_grad():
            v = self.w0 + xi
            for ig, ih, G, H, P, Q in self.heads:
                gamma_G, gamma_H = christoffel(self.metric, G, H, P, Q, xi[ig], xi[ih])
                v = v.index_put((ig,), v[ig] - gamma_G / 2).index_put((ih,), v[ih] - gamma_H / 2)
        return v.detach(), lambda g: torch.autograd.grad(v, xi, g)[0]
