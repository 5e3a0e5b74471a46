"""The fast geometry: the reference's formulas (``geodesic.reference``) batched over every head of
one head width, in all layers and both sides at once, with what depends only on ``w0`` computed
once per call.

Layout. A group stacks its heads' two factors as one ``[2B, n, h]`` tensor ``F``: rows ``0..B-1``
are the heads' ``G``, rows ``B..2B-1`` their ``H`` (factors with fewer rows are padded with zero
rows, which every formula keeps at zero), so a tangent vector's block part is one ``T`` of the same
shape and each formula is a few batched products, the ``G`` and ``H`` sides in one. ``partner``
swaps the halves: the mix metric weighs ``xG`` by ``Q`` (its partner's Gram matrix) and ``xH`` by
``P``. The stacked Gram matrices ``M = F^T F + eps I`` are ``P`` (first half) and ``Q``.

Precomputed (float64, whatever the parameters' dtype): ``M``, ``M^-1``, the products the
projections need (mix ``F M^-1``, inv ``F partner(M)``), and for inv the Sylvester solve's
eigenbasis (DESIGN.md §2c.4): ``C = P^1/2 Q P^1/2 = U diag(c) U^T``, with which a projection is
``X = R ((U^T P^-1/2 B R) * D) U^T P^-1/2``, ``R = P^1/2 U``, ``D_ij = 1 / (c_i + c_j)``,
``B = P H^T xH - xG^T G Q``.
"""
from __future__ import annotations

import torch

from .blocks import Heads
from .metric import Geometry, check_grams, sym_power

sym = lambda M: M + M.mT


class _Group:
    """Every head of one width ``h``: ``F`` ``[2B, n, h]`` and the precomputed matrices."""

    def __init__(self, heads: list[Heads], w0: torch.Tensor, metric: str, eps: float):
        n = max(max(k.g.shape[1], k.hh.shape[1]) for k in heads)
        pad = lambda idx: torch.nn.functional.pad(idx, (0, 0, 0, n - idx.shape[1]), value=-1)
        index = torch.cat([pad(k.g) for k in heads] + [pad(k.hh) for k in heads])   # -1: a padding row
        self.B, self.shape = index.shape[0] // 2, index.shape
        # int32 where the parameters allow it: the indices are as many as the blocks' entries
        small = w0.numel() < 2**31
        real = index >= 0
        self.padded = not bool(real.all())
        if self.padded:   # the real entries' flat indices and their positions in T.view(-1)
            self.real_pos = real.reshape(-1).nonzero().squeeze(1)
            self.index = index.reshape(-1)[self.real_pos]
            if small:
                self.real_pos = self.real_pos.int()
        else:
            self.index = index
        if small:
            self.index = self.index.int()
        del index, real
        F = self.gather(w0).double()
        eye = torch.eye(F.shape[-1], dtype=torch.float64, device=w0.device)
        M = F.mT @ F + eps * eye
        P, Q = M[:self.B], M[self.B:]
        check_grams(P, Q)
        M_inv = torch.linalg.inv(M)
        cast = lambda t: t.to(w0.dtype)
        self.F = cast(F)
        # M^-1/2 of the metric, for random starts: inv (P^1/2 | Q^1/2), mix (Q^-1/2 | P^-1/2)
        self.whiten_M = cast(sym_power(M, 0.5) if metric == "inv" else self.partner(sym_power(M, -0.5)))
        if metric == "mix":
            self.norm_M, self.gradient_M = cast(self.partner(M)), cast(self.partner(M_inv))
            self.F_M_inv, self.christoffel_M = cast(F @ M_inv), cast(self.partner(M_inv))
        else:
            self.norm_M, self.gradient_M, self.christoffel_M = cast(M_inv), cast(M), cast(M_inv)
            self.F_partner_M = cast(F @ self.partner(M))
            p, V = torch.linalg.eigh(P)
            P_half = V @ torch.diag_embed(p.sqrt()) @ V.mT
            c, U = torch.linalg.eigh(P_half @ Q @ P_half)
            self.R = cast(P_half @ U)
            self.Ut_P_minus_half = cast(U.mT @ V @ torch.diag_embed(p.rsqrt()) @ V.mT)
            self.denominator = cast(1 / (c[:, :, None] + c[:, None, :]))

    def partner(self, X):
        return torch.cat([X[self.B:], X[:self.B]])

    def gather(self, flat):
        """A flat vector's block part, ``[2B, n, h]`` (padding rows 0)."""
        if not self.padded:
            return flat[self.index]
        T = flat.new_zeros(self.shape)
        T.view(-1)[self.real_pos] = flat[self.index]
        return T

    def scatter(self, out, T):
        """``T``'s real entries written into the flat vector ``out``."""
        out[self.index] = T.reshape(-1)[self.real_pos] if self.padded else T

    def horizontal(self, metric, T):
        B, F = self.B, self.F
        if metric == "mix":   # L = (xH^T H Q^-1 - P^-1 G^T xG) / 2
            K = T.mT @ self.F_M_inv
            L = (K[B:] - K[:B].mT) / 2
        else:                 # the Sylvester solve of B = P H^T xH - xG^T G Q
            K = T.mT @ self.F_partner_M
            left, R = self.Ut_P_minus_half, self.R
            L = (R @ ((left @ (K[B:].mT - K[:B]) @ R) * self.denominator) @ left).mT
        return T.add_(F @ torch.cat([L, -L.mT]))   # T: a gathered copy (block-sized results in place)

    def christoffel(self, metric, T):
        """``Gamma(T, T)`` and what its vector-Jacobian product reuses."""
        F = self.F
        S, TtT = sym(T.mT @ F), T.mT @ T   # S: (xG^T G + G^T xG | xH^T H + H^T xH)
        if metric == "mix":   # Gamma_G = (xG S_H - G xH^T xH) Q^-1, Gamma_H likewise with G, H swapped
            gamma = (T @ self.partner(S)).sub_(F @ self.partner(TtT)) @ self.christoffel_M
        else:                 # Gamma_F = -xF M^-1 S_F + F M^-1 xF^T xF
            M_inv = self.christoffel_M
            gamma = (F @ (M_inv @ TtT)).sub_(T @ (M_inv @ S))
        return gamma, S

    def christoffel_vjp(self, metric, T, S, C):
        """The gradient in ``T`` of ``<C, Gamma(T, T)>``, written out (autograd through these small
        products costs more than the products)."""
        F, M = self.F, self.christoffel_M
        if metric == "mix":
            Ct = C @ M
            out = (Ct @ self.partner(S)).add_(F @ self.partner(sym(T.mT @ Ct)))
            return out.sub_(T @ self.partner(sym(F.mT @ Ct)))
        out = (C @ (S @ M)).neg_().sub_(F @ sym(M @ (T.mT @ C)))
        return out.add_(T @ sym(M @ (F.mT @ C)))


class BatchedGeometry(Geometry):
    def __init__(self, w0, c, heads: list[Heads], metric: str, eps: float, second_order: bool):
        super().__init__(w0, c, heads, metric, eps, second_order)
        by_width: dict[int, list[Heads]] = {}
        for group in heads:
            by_width.setdefault(group.g.shape[-1], []).append(group)
        self.groups = [_Group(same, w0, metric, eps) for same in by_width.values()]

    def blocks_sq_norm(self, xi):
        total = torch.zeros((), dtype=xi.dtype, device=xi.device)
        for k in self.groups:
            T = k.gather(xi)
            total = total + (T @ k.norm_M).mul_(T).sum()
        return total

    def blocks_riemannian(self, g, out):
        for k in self.groups:
            k.scatter(out, k.gather(g) @ k.gradient_M)
        return out

    def blocks_horizontal(self, xi, out):
        for k in self.groups:
            k.scatter(out, k.horizontal(self.metric, k.gather(xi)))
        return out

    def blocks_whiten(self, z, out):
        for k in self.groups:
            k.scatter(out, k.gather(z) @ k.whiten_M)
        return out

    def second_order_retract(self, xi, out=None):
        """``w0 + xi - Gamma(xi, xi)/2`` (into ``out`` where given) and its pullback ``g -> g - grad <g,
        Gamma(xi, xi)> / 2``, computed in ``g``'s own buffer."""
        v = torch.add(self.w0, xi, out=out)
        parts = []
        for k in self.groups:
            T = k.gather(xi)
            gamma, S = k.christoffel(self.metric, T)
            k.scatter(v, k.gather(v).sub_(gamma.div_(2)))
            del gamma
            parts.append((k, T, S))

        def pullback(g):   # the groups' entries are disjoint: each reads its part before writing it
            for k, T, S in parts:
                C = k.gather(g)
                k.scatter(g, C.sub_(k.christoffel_vjp(self.metric, T, S, C).div_(2)))
            return g
        return v, pullback
