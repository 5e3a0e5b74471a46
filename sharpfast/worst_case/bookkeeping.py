"""APGD's record of one restart, kept on the device for every problem of a group at once.

The best loss found, its error and ``||delta||^2`` there, the step size, and the halving rule at
the checkpoints (DESIGN.md §2): every quantity is a tensor of shape
``()`` for one problem or ``(B,)`` for B problems, and every decision a ``torch.where``, so
the loop never waits for the host.
"""
from __future__ import annotations

import torch

from . import apgd
from ..settings import Settings


class Bookkeeping:
    """The published solver starts its best at ``(L0, E0)`` with ``||delta|| = 0`` and counts the
    steps that improved the best; the scaled solver (``count_increases``) starts it at the start
    point and counts the steps whose loss exceeded the previous iterate's, as Croce & Hein's APGD
    does (it keeps the best point itself, and sets ``best_sq`` from it at the end)."""

    def __init__(self, s: Settings, L0: torch.Tensor, E0: torch.Tensor, count_increases: bool = False,
                 norm_scale: float = 1.0):
        f64 = dict(dtype=torch.float64, device=L0.device)
        self.norm_scale = norm_scale   # best_sq is ||delta / norm_scale||^2 (see norm_scale)
        self.ratio = s.min_update_ratio
        self.step = torch.full(L0.shape, 2 * s.rho * s.step_size_mult, **f64)
        self.n_updates = torch.zeros(L0.shape, dtype=torch.int64, device=L0.device)
        self.prev_checkpoint = 0
        self.best_loss, self.best_err = L0.clone(), E0.clone()
        self.best_sq = torch.zeros(L0.shape, **f64)   # ||delta||^2 at the best point (0 at the start)
        self.prev_step, self.prev_best = self.step.clone(), self.best_loss.clone()
        self.count_increases, self.prev_loss = count_increases, L0

    def record(self, loss: torch.Tensor, err: torch.Tensor, sq: torch.Tensor | None = None) -> torch.Tensor:
        """A new point's loss, error and ``||delta||^2`` (None: not tracked); returns where it
        improved on the best."""
        improved = loss > self.best_loss
        self.best_loss = torch.where(improved, loss, self.best_loss)
        self.best_err = torch.where(improved, err, self.best_err)
        if sq is not None:
            self.best_sq = torch.where(improved, sq, self.best_sq)
        self.n_updates += (loss > self.prev_loss) if self.count_increases else improved
        self.prev_loss = loss
        return improved

    def checkpoint(self, i: int) -> torch.Tensor:
        """At checkpoint iteration ``i``: halve the step where too few steps improved since the last
        checkpoint, or where neither the step nor the best loss changed; returns where it halved
        (the caller moves those problems back to their best point)."""
        too_few = apgd.too_few_updates(self.n_updates, self.ratio, i - self.prev_checkpoint)
        stalled = (self.prev_step == self.step) & (self.prev_best == self.best_loss)
        self.prev_step, self.prev_best, self.prev_checkpoint = self.step.clone(), self.best_loss.clone(), i
        self.n_updates = torch.zeros_like(self.n_updates)
        halve = too_few | stalled
        self.step = torch.where(halve, self.step * apgd.STEP_SIZE_SCALER, self.step)
        return halve

    def delta_norm(self, L0: torch.Tensor) -> torch.Tensor:
        """``||delta||`` at the best point, 0 where nothing beat the start."""
        return torch.where(self.best_loss > L0, self.best_sq.sqrt() * self.norm_scale, torch.zeros_like(self.best_sq))
