"""The APGD schedule in weight space, shared by every backend and the geodesic solver (DESIGN.md §2).

The step-size checkpoints and the bisection that finds the Lagrange multiplier of the
ellipsoid projection are plain Python on scalars: the backends differ only in how they
evaluate the norms the bisection asks for.
"""
from __future__ import annotations

import bisect
import copy
import math
from typing import Callable

STEP_SIZE_SCALER = 0.5
CROSSING_RESOLUTION = 0.1   # replayed bisection: a crossing this close (fraction of the band) is found
BISECTION_MAX_STEPS = 500  # guard: the published loop could spin forever when tol < float resolution


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


def too_few_updates(n_updates, ratio: float, gap: int):
    """APGD's first halving condition, ``n_updates < ratio * gap``, with the threshold in float64
    as the published (Python) code compares it. ``n_updates`` may be an integer tensor (the fused
    backend keeps it on the device): comparing that with a Python float would round the threshold
    to float32, and ``0.28 * 25`` is 7.000000000000001 in float64 but 7.0 in float32."""
    threshold = ratio * gap
    if hasattr(n_updates, "double"):
        return n_updates.double() < threshold
    return n_updates < threshold


class StepSchedule:
    """APGD's step size and its halving rule on host scalars, as the reference runs it (the fused
    backend's device twin is ``bookkeeping.Bookkeeping``). ``count`` records whether a step
    counts toward the first condition (published: it improved the best; scaled: it raised the loss
    over the previous iterate); :meth:`halves_at` applies both conditions at the checkpoints."""

    def __init__(self, s, best_loss: float):
        self.step = 2 * s.rho * s.step_size_mult
        self.ratio = s.min_update_ratio
        self.checkpoints = set(checkpoint_schedule(s.n_iters))
        self.prev_step, self.prev_best, self.prev_checkpoint, self.n_updates = self.step, best_loss, 0, 0

    def count(self, counted: bool) -> None:
        self.n_updates += counted

    def halves_at(self, i: int, best_loss: float) -> bool:
        """At iteration ``i``: halve the step where fewer than ``ratio`` of the steps since the last
        checkpoint counted, or where neither the step nor the best loss changed; True if it did."""
        if i not in self.checkpoints:
            return False
        too_few = too_few_updates(self.n_updates, self.ratio, i - self.prev_checkpoint)
        stalled = self.prev_step == self.step and self.prev_best == best_loss
        self.prev_step, self.prev_best, self.prev_checkpoint, self.n_updates = self.step, best_loss, i, 0
        if too_few or stalled:
            self.step *= STEP_SIZE_SCALER
            return True
        return False


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


def bisection_tree(state: BisectionState, levels: int) -> list[float]:
    """Every lambda the bisection can evaluate in its next ``levels`` steps (above/below branches)."""
    out, frontier = [], [state]
    for _ in range(levels):
        nxt = []
        for node in frontier:
            if node.done:
                continue
            out.append(node.lam)
            for forced in (math.inf, -math.inf):   # a norm above / below rho
                child = copy.copy(node)
                child.update(forced)
                nxt.append(child)
        frontier = nxt
    return list(dict.fromkeys(out))


class _KnownNorms:
    """Evaluated points of the decreasing function ``n(lambda)``, kept sorted by lambda."""

    def __init__(self, norms_at: Callable[[list[float]], list[float]]):
        self.norms_at = norms_at
        self.lams: list[float] = []
        self.values: list[float] = []
        self.evaluations = 0

    def add(self, lams: list[float]) -> None:
        new = sorted({lam for lam in lams if lam >= 0.0 and math.isfinite(lam)} - set(self.lams))
        if not new:
            return
        self.evaluations += len(new)
        for lam, value in zip(new, self.norms_at(new)):
            i = bisect.bisect(self.lams, lam)
            self.lams.insert(i, lam)
            self.values.insert(i, value)

    def value_at(self, lam: float) -> float | None:
        """``n(lam)`` where it was evaluated, else None."""
        i = bisect.bisect_left(self.lams, lam)
        return self.values[i] if i < len(self.lams) and self.lams[i] == lam else None

    def bounds(self, lam: float) -> tuple[float, float]:
        """``(low, high)`` with ``low <= n(lam) <= high``, from the evaluated neighbours."""
        i = bisect.bisect_left(self.lams, lam)
        if i < len(self.lams) and self.lams[i] == lam:
            return self.values[i], self.values[i]
        high = self.values[i - 1] if i > 0 else math.inf
        low = self.values[i] if i < len(self.lams) else 0.0
        return low, high

    def crossing_estimates(self, above: float, below: float) -> list[float]:
        """A guess left of where ``n`` crosses ``above`` and one right of where it crosses ``below``.

        ``1 / n(lambda)`` is increasing and concave, and nearly linear (exactly so for one
        coordinate: the trust-region secular equation, More & Sorensen 1983). So the secant
        through the two evaluated points left of a crossing lands left of it, and the chord from
        the nearest point left of a crossing to the nearest point right of it lands right of it:
        the two close in on the accepted interval from both sides, superlinearly.
        """
        left = [(lam, v) for lam, v in zip(self.lams, self.values) if v > above]
        right = [(lam, v) for lam, v in zip(self.lams, self.values) if 0 < v < below]
        # A crossing approached to within 10% of the accepted band needs no more guesses: few
        # visited lambdas fall into so narrow a gap, and those are evaluated directly.
        close = CROSSING_RESOLUTION * (above - below)
        left_pinned = bool(left) and left[-1][1] - above <= close
        right_pinned = bool(right) and below - right[0][1] <= close
        out = []
        if len(left) >= 2 and not left_pinned:
            (l1, v1), (l2, v2) = left[-2], left[-1]
            slope = (1 / v2 - 1 / v1) / (l2 - l1)
            if slope > 0:
                out.append(l2 + (1 / above - 1 / v2) / slope)
        if left and right and not right_pinned:
            (l1, v1), (l2, v2) = left[-1], right[0]
            out.append(l1 + (l2 - l1) * (1 / below - 1 / v1) / (1 / v2 - 1 / v1))
        elif left and not right and not out:
            out.append(2 * left[-1][0] + 1.0)   # nothing to interpolate yet: look further right
        return out


def replayed_ellipsoid_lambda(norms_at: Callable[[list[float]], list[float]], rho: float, tol: float,
                              hint: float | None = None, levels: int = 1) -> tuple[float, int]:
    """The multiplier :func:`ellipsoid_lambda` returns, from far fewer norm evaluations.

    ``norms_at(lams)`` returns ``||z c / (c^2 + 2 lam)||_2`` for several ``lam`` in one pass over
    memory. That norm decreases in ``lambda``, so the published bisection's path is fixed by
    where it crosses ``rho + tol`` and ``rho - tol``: a visited ``lambda`` left of both goes up,
    right of both goes down, between them is accepted. The path is replayed on the host from
    the values evaluated so far; when they cannot classify the next visited ``lambda``, one
    pass evaluates it (with the bisection's next ``levels`` steps) and secant estimates of
    both crossings. ``hint`` (the previous APGD step's multiplier) joins the first pass.
    Returns ``(lambda, number of norm evaluations)``.
    """
    known = _KnownNorms(norms_at)
    known.add([0.0, 0.1] + ([hint] if hint else []))
    unprojected = known.values[0]
    if unprojected <= rho or abs(unprojected - rho) <= tol:
        return 0.0, known.evaluations
    state = BisectionState(rho, tol)
    while True:
        while not state.done:   # advance while the known values decide the step
            exact = known.value_at(state.lam)
            if exact is not None:   # the bisection's own step on its value (a NaN norm too)
                state.update(exact)
                continue
            low, high = known.bounds(state.lam)
            if low > rho + tol:
                state.update(math.inf)
            elif high < rho - tol:
                state.update(-math.inf)
            elif low >= rho - tol and high <= rho + tol:
                state.update(rho)
            else:
                break
        if state.done:
            return state.accepted, known.evaluations
        # A pass costs mostly its reads of memory, little per candidate: evaluate the undecided
        # step (so the loop always advances) together with the crossing estimates.
        known.add(bisection_tree(state, levels) + known.crossing_estimates(rho + tol, rho - tol))
