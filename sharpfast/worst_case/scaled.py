"""Fused worst-case sharpness with the scaled solver (``solver="scaled"``; the reference is
``reference.scaled_apgd_restart``, which says what the algorithm is): Croce & Hein's APGD in
``u = delta / c``, every step one fused op over flat buffers and the bookkeeping on the device.

linf: the step clamps twice per element, one pass. l2: both of a step's projections are
rescalings, so the new ``u`` is ``a u + b (c g) + e u_prev``, with ``a, b, e`` computed inside the
step op from the inner products of ``u``, ``u_prev`` and ``c g`` (``_ops.scaled_gram``: one
reduction pass). No bisection, no host sync: l2 costs one reduction more than linf. The solver
keeps its best point, so ``||delta||`` is taken there once at the end, not at every step.

Memory: the perturbed weights and their gradient (which the model views), ``w0``, ``u``,
``u_prev``, the best point ``u_best`` (the step size's halving moves ``u`` back to it) and its
gradient: one buffer more than the published solver.
"""
from __future__ import annotations

import torch

from .. import _ops
from ..engine.problems import GroupRun
from ..philox import RAND_INIT_SAMPLE_BASE, noise_distribution
from ..settings import MOMENTUM, Settings
from . import starts
from .bookkeeping import Bookkeeping

DD = _ops.GRAM_ENTRIES.index("dd")


class ScaledRun(GroupRun):
    """A group's scaled-APGD buffers (one row per problem) and its fused steps."""

    def __init__(self, group, s: Settings, pool: dict, local=None):
        super().__init__(group, s, pool, local, n_buffers=4)
        self.u, self.u_prev, self.u_best, self.best_grad = self.buffers
        self.views = [(group.current[r], group.grad[r], self.u[r], self.u_prev[r]) for r in self.rows]

    def start(self, start: int) -> None:
        """``u`` of this start (``.starts``); the weights to ``w0 + c u``."""
        s = self.s
        for r, stream in zip(self.rows, self.group.streams):
            u = self.u[r]
            c = self.flats[r].scale_values(self.best_grad[r])   # best_grad is free until the first gradient
            if s.init == "eigen":
                starts.eigen_start(self.local[r], start, s, c, out=u)
            elif s.init == "random":
                _ops.draw_(u, s.seed, stream, RAND_INIT_SAMPLE_BASE + start, 0, noise_distribution(s.norm))
                starts.random_start(u, s, c)
            else:
                u.zero_()
            torch.addcmul(self.w0s[r], c, u, out=self.group.current[r])
        self.u_prev.copy_(self.u)

    def solve(self, loss, err, L0, E0, checkpoints, results) -> Bookkeeping:
        """One scaled-APGD run from the start just evaluated (``loss``, ``err``: its forward)."""
        s = self.s
        book = Bookkeeping(s, loss, err, count_increases=True, norm_scale=self.norm_scale)
        self.u_best.copy_(self.u)
        self.best_grad.copy_(self.group.grad)
        for i in range(s.n_iters):
            self.step(book.step, 1.0 if i == 0 else MOMENTUM)
            final = i == s.n_iters - 1
            loss, err, results.labelled = self.group.evaluate(with_grad=not final)   # final: its loss only
            self.loss_sum += loss
            improved = book.record(loss, err)
            self.keep_best(improved, final)
            if final:
                break
            if i in checkpoints:
                self.back_to_best(book.checkpoint(i))
        book.best_sq = self.best_sq()
        return book

    def best_sq(self) -> torch.Tensor:
        """``||delta / k||^2 = ||c u_best / k||^2`` of every problem (0-dim for one), ``k = self.norm_scale``."""
        if self.norm_scale != 1.0:   # weights near float64's maximum: scaled before squaring
            sq = [(self.flats[r].scale_values(torch.empty_like(best)) * best / self.norm_scale).square().sum()
                  for r, best in zip(self.rows, self.u_best)]
        else:
            sq = [_ops.scaled_gram(best, best, grad, w0, c)[DD]
                  for best, (_, grad, _, _), w0, c in zip(self.u_best, self.views, self.w0s, self.cs)]
        return sq[0] if len(sq) == 1 else torch.stack(sq)

    def keep_best(self, where, final: bool) -> None:
        """The new point (and, but at the final point, its gradient) becomes the best where the loss
        improved."""
        for r, (_, grad, u, _) in zip(self.rows, self.views):
            _ops.copy_if_(self.u_best[r], u, self.at(where, r))
            if not final:
                _ops.copy_if_(self.best_grad[r], grad, self.at(where, r))

    def back_to_best(self, where) -> None:
        """Where the step was halved, ``u`` (and its gradient) move back to the best point; ``u_prev``
        stays, so the momentum continues from it, as in Croce & Hein's code. The next step rewrites
        every weight from ``u``."""
        for r, (_, grad, u, _) in zip(self.rows, self.views):
            _ops.copy_if_(u, self.u_best[r], self.at(where, r))
            _ops.copy_if_(grad, self.best_grad[r], self.at(where, r))

    @torch.no_grad()
    def step(self, step_size: torch.Tensor, alpha: float) -> None:
        s = self.s
        for r, (current, grad, u, u_prev) in enumerate(self.views):
            w0, c = self.w0s[r], self.cs[r]
            if s.norm == "linf":
                _ops.scaled_step_linf_(current, u, u_prev, grad, w0, c, self.at(step_size, r), s.rho, alpha)
            else:   # the step's two rescalings follow from these inner products (inside the op)
                gram = _ops.scaled_gram(u, u_prev, grad, w0, c)
                _ops.scaled_step_l2_(current, u, u_prev, grad, w0, c, gram, self.at(step_size, r), s.rho, alpha)
