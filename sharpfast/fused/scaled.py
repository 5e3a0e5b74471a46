"""Fused worst-case sharpness with the scaled solver (``solver="scaled"``; the reference is
``reference.scaled_apgd_restart``, which says what the algorithm is): Croce & Hein's APGD in
``u = delta / c``, every step one fused op over flat buffers and the bookkeeping on the device.

linf: the step clamps twice per element, one pass. l2: both of a step's projections are
rescalings, so the new ``u`` is ``a u + b (c g) + e u_prev``; :func:`l2_coefficients` computes
``a, b, e`` on the device from the inner products of ``u``, ``u_prev`` and ``c g`` (one reduction
pass, ``_ops.scaled_gram``, which also gives ``||delta||^2`` for the record). No bisection, no
host sync: l2 costs what linf costs.

Memory: the perturbed weights and their gradient (which the model views), ``w0``, ``u``,
``u_prev``, the best point ``u_best`` (the step size's halving moves ``u`` back to it) and its
gradient: one buffer more than the published solver.
"""
from __future__ import annotations

import torch

from .. import _ops, apgd, starts
from ..params import ParamSet
from ..philox import RAND_INIT_SAMPLE_BASE, noise_distribution
from ..settings import Settings
from .bookkeeping import Bookkeeping
from .flat import FlatState

UU, UP, PP, UG, PG, GG, DD = range(len(_ops.GRAM_ENTRIES))


def l2_coefficients(gram: torch.Tensor, step: torch.Tensor, rho: float, alpha: float) -> torch.Tensor:
    """``(a, b, e)`` with ``a u + b (c g) + e u_prev`` the scaled l2 step (float64, ``[..., 3]``).

    With ``d = c g / (||c g|| + 1e-12)``: ``z = f1 (u + step d)``, ``f1 = min(1, rho / ||u + step d||)``;
    ``v = u + alpha (z - u) + (1 - alpha)(u - u_prev) = A u + B d - E u_prev``; ``u' = f2 v``,
    ``f2 = min(1, rho / ||v||)``. Both norms follow from the inner products in ``gram``."""
    uu, up, pp, ug, pg, gg = (gram[..., k] for k in (UU, UP, PP, UG, PG, GG))
    gn = gg.sqrt() + 1e-12
    ud, pd, dd = ug / gn, pg / gn, gg / gn**2
    zz = (uu + 2 * step * ud + step**2 * dd).clamp(min=0)
    f1 = torch.where(zz > rho**2, rho / zz.sqrt(), torch.ones_like(zz))
    A, B, E = 2 * (1 - alpha) + alpha * f1, alpha * f1 * step, torch.full_like(zz, 1 - alpha)
    vv = (A**2 * uu + B**2 * dd + E**2 * pp + 2 * A * B * ud - 2 * A * E * up - 2 * B * E * pd).clamp(min=0)
    f2 = torch.where(vv > rho**2, rho / vv.sqrt(), torch.ones_like(vv))
    return torch.stack([f2 * A, f2 * B / gn, -f2 * E], dim=-1)


class ScaledRun:
    """A group's scaled-APGD buffers (one row per problem) and its fused steps. ``pool`` keeps the
    buffers for the next group of the same size."""

    def __init__(self, group, flat: FlatState, s: Settings, params: ParamSet, pool: dict, local=None):
        self.group, self.flat, self.s, self.local = group, flat, s, local
        current = group.current
        if current.shape[0] not in pool:
            pool[current.shape[0]] = [torch.empty_like(current) for _ in range(4)]
        self.u, self.u_prev, self.u_best, self.best_grad = pool[current.shape[0]]
        self.rows = range(current.shape[0])
        single = current.shape[0] == 1
        self.at = (lambda t, r: t) if single else (lambda t, r: t[r])   # per-problem scalars: 0-dim for one
        self.views = [(current[r], group.grad[r], self.u[r], self.u_prev[r]) for r in self.rows]
        self.loss_sum = torch.zeros(() if single else (len(self.rows),), dtype=torch.float64,
                                    device=current.device)   # non-finite iff some iterate's loss was
        current.copy_(flat.w0.expand_as(current))   # L0 is evaluated here first

    def start(self, start: int) -> None:
        """``u`` of this start (``sharpfast.starts``); the weights to ``w0 + c u``."""
        s = self.s
        for r, stream in zip(self.rows, self.group.streams):
            u = self.u[r]
            c = self.flat.scale_values(self.best_grad[r])   # best_grad is free until the first gradient
            if s.init == "eigen":
                u.copy_(starts.eigen_start(self.local[stream], start, s, c))
            elif s.init == "random":
                _ops.draw_(u, s.seed, stream, RAND_INIT_SAMPLE_BASE + start, 0, noise_distribution(s.norm))
                u.copy_(starts.random_start(u, s, c))
            else:
                u.zero_()
            torch.addcmul(self.flat.w0, c, u, out=self.group.current[r])
        self.u_prev.copy_(self.u)

    def solve(self, loss, err, L0, E0, checkpoints, results) -> Bookkeeping:
        """One scaled-APGD run from the start just evaluated (``loss``, ``err``: its forward)."""
        s = self.s
        gram = self.gram()
        book = Bookkeeping(s, loss, err, start_sq=gram[..., DD], count_increases=True)
        self.u_best.copy_(self.u)
        self.best_grad.copy_(self.group.grad)
        for i in range(s.n_iters):
            self.step(book.step, 1.0 if i == 0 else apgd.MOMENTUM, gram)
            final = i == s.n_iters - 1
            loss, err, results.labelled = self.group.evaluate(with_grad=not final)   # final: its loss only
            self.loss_sum += loss
            gram = self.gram()   # at the final point the gradient is stale: only ||delta||^2 is used
            improved = book.record(loss, err, gram[..., DD])
            if final:
                break
            self.keep_best(improved)
            if i in checkpoints:
                self.back_to_best(book.checkpoint(i))
                gram = self.gram()
        return book

    def gram(self) -> torch.Tensor:
        """``_ops.scaled_gram`` of every row: ``[7]`` for one problem, ``[B, 7]`` for B."""
        w0, c = self.flat.w0, self.flat.c
        g = [_ops.scaled_gram(u, u_prev, grad, w0, c) for _, grad, u, u_prev in self.views]
        return g[0] if len(g) == 1 else torch.stack(g)

    def keep_best(self, where) -> None:
        """The new point and its gradient become the best where the loss improved."""
        for r, (_, grad, u, _) in zip(self.rows, self.views):
            _ops.copy_if_(self.u_best[r], u, self.at(where, r))
            _ops.copy_if_(self.best_grad[r], grad, self.at(where, r))

    def back_to_best(self, where) -> None:
        """Where the step was halved, ``u`` (and its gradient) move back to the best point; ``u_prev``
        stays, so the momentum continues from it, as in Croce & Hein's code. The next step rewrites
        every weight from ``u``."""
        for r, (_, grad, u, _) in zip(self.rows, self.views):
            _ops.copy_if_(u, self.u_best[r], self.at(where, r))
            _ops.copy_if_(grad, self.best_grad[r], self.at(where, r))

    @torch.no_grad()
    def step(self, step_size: torch.Tensor, alpha: float, gram: torch.Tensor) -> None:
        s, w0, c = self.s, self.flat.w0, self.flat.c
        if s.norm == "l2":
            coefficients = l2_coefficients(gram, step_size, s.rho, alpha)
        for r, (current, grad, u, u_prev) in enumerate(self.views):
            if s.norm == "linf":
                _ops.scaled_step_linf_(current, u, u_prev, grad, w0, c, self.at(step_size, r), s.rho, alpha)
            else:
                _ops.scaled_step_l2_(current, u, u_prev, grad, w0, c, self.at(coefficients, r))
