"""Scalar parts of APGD in weight space shared by every backend (DESIGN §2).

The step-size checkpoints and the bisection that finds the Lagrange multiplier of the
ellipsoid projection are plain Python on scalars: the backends differ only in how they
evaluate the norms the bisection asks for.
"""
from __future__ import annotations

import math
from typing import Callable

MOMENTUM = 0.75            # alpha: delta_new = alpha * z + (1 - alpha) * delta_prev
MIN_UPDATE_RATIO = 0.75    # halve the step when fewer than this fraction of steps improved
STEP_SIZE_SCALER = 0.5
PUBLISHED_BISECTION_TOL = 1e-5  # the published code stops at | ||z_lambda / c|| - rho | <= 1e-5
BISECTION_MAX_STEPS = 500  # guard: the published loop could spin forever when tol < float resolution


def bisection_tolerance(rho: float, projection_tol: float | None = None) -> float:
    """Absolute tolerance of the ellipsoid bisection.

    The published 1e-5 is absolute: at the small radii used with adaptive sharpness
    (rho ~ 5e-4) it lets an iterate leave the ellipsoid by 2% of its radius. By default
    sharpfast uses ``1e-5 * min(1, rho)``: the published value for rho >= 1, 1e-5 relative below.
    ``projection_tol`` overrides it (``sharpfast.compat`` passes the published 1e-5).
    """
    return PUBLISHED_BISECTION_TOL * min(1.0, rho) if projection_tol is None else projection_tol


def checkpoint_schedule(n_iters: int) -> list[int]:
    """Iterations at which APGD may halve its step (APGD, Croce & Hein 2020).

    Fractions ``p = [0, 0.22]``, then ``p_next = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)``;
    iteration ``ceil(p * n_iters)``; generated while the last is ``< n_iters`` and differs from
    the one before; the leading 0 dropped.
    """
    p = [0.0, 0.22]
    w = [0, math.ceil(n_iters * 0.22)]
    while w[-1] < n_iters and w[-1] != w[-2]:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
        w.append(math.ceil(p[-1] * n_iters))
    return w[1:]


class BisectionState:
    """The published bisection for ``lambda >= 0`` with ``||z / (1 + 2 lambda / c^2) / c||_2 = rho``.

    Start ``lambda = 0.1`` in the bracket ``[0, 10]``; after evaluating the norm at ``lambda``:
    if it exceeds rho, move up (``lambda <- (lambda + hi) / 2``, ``lo <- lambda``), else down
    (``lambda <- (lo + lambda) / 2``, ``hi <- lambda``); double the bracket's limit (and ``hi``)
    whenever ``hi`` comes within 1e-2 of it. Stops at the first evaluated ``lambda`` whose norm
    is within ``tol`` of rho; that ``lambda`` is the one applied.
    """

    def __init__(self, rho: float, tol: float):
        self.rho, self.tol = rho, tol
        self.lam, self.lo, self.hi, self.limit = 0.1, 0.0, 10.0, 10.0
        self.steps = 0
        self.done = False
        self.accepted: float | None = None      # the lambda applied once done
        self.best_feasible: float | None = None  # fallback if the guard trips

    def update(self, norm: float) -> None:
        """Record ``norm`` = the weighted norm at ``self.lam`` and advance."""
        lam = self.lam
        self.steps += 1
        if norm <= self.rho and (self.best_feasible is None or lam < self.best_feasible):
            self.best_feasible = lam
        if abs(norm - self.rho) <= self.tol:
            self.done, self.accepted = True, lam
            return
        if norm > self.rho:
            self.lam, self.lo = (lam + self.hi) / 2, lam
        else:
            self.lam, self.hi = (self.lo + lam) / 2, lam
        if self.limit - self.hi < 1e-2:
            self.limit, self.hi = self.limit * 2, self.hi * 2
        if self.steps >= BISECTION_MAX_STEPS:
            # Float resolution cannot meet tol: keep the smallest lambda seen that is feasible.
            self.done = True
            self.accepted = self.best_feasible if self.best_feasible is not None else lam


def ellipsoid_lambda(weighted_norm_at: Callable[[float], float], rho: float, tol: float) -> float:
    """The multiplier the published projection applies (0.0: ``z`` already inside the ellipsoid).

    ``weighted_norm_at(lam)`` returns ``|| z c / (c^2 + 2 lam) ||_2`` (terms with ``c = 0`` are 0).
    """
    unprojected = weighted_norm_at(0.0)
    if unprojected <= rho or abs(unprojected - rho) <= tol:
        return 0.0
    state = BisectionState(rho, tol)
    while not state.done:
        state.update(weighted_norm_at(state.lam))
    return state.accepted
