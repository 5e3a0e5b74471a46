"""The pure-PyTorch reference of worst-case sharpness, exactly as defined in DESIGN.md §1-2, written
to be read.

For weights ``w``, a batch ``S``, radius ``rho`` and per-coordinate scale ``c``:
``S_max = E_S max_{||delta / c||_p <= rho} L_S(w + delta) - L_S(w)``, the inner max found by APGD in
weight space: the published variant (momentum 0.75, step halving at fixed checkpoints, the
gradient taken at the best point found when the step is halved), or the scaled solver, Croce &
Hein's APGD in ``u = delta / c`` (see :func:`scaled_apgd_restart`).

Every batch is one m-sharpness batch with a perturbation of its own. The random starts come from
the counter-based sampler (``sharpfast.philox``), so the fused backend draws the same numbers.
This module works on lists of per-parameter tensors and never touches the user's storage:
it points each ``param.data`` at tensors of its own; the caller's ``ModelGuard`` points them back.
"""
from __future__ import annotations

import math

import torch

from ..objective import batches_on_device, evaluate, gradient
from ..params import ParamSet, set_kept, set_weights
from ..philox import RAND_INIT_SAMPLE_BASE, draw_noise, noise_distribution, philox_draw
from ..result import SharpnessResult, check_finite_loss, delta_l2_norm, summarize
from ..settings import MOMENTUM, Settings
from . import apgd, starts

Tensors = list[torch.Tensor]


# ----------------------------------------------------------------------------- norms

def l2_norm(tensors: Tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def weighted_norm(delta: Tensors, c: Tensors) -> float:
    """``||delta / c||_2`` over the coordinates with ``c > 0`` (``c = 0`` is frozen, never divided by)."""
    total = 0.0
    for d, ci in zip(delta, c):
        ratio = torch.where(ci > 0, d.double() / ci.double(), torch.zeros((), dtype=torch.float64, device=d.device))
        total += float(ratio.pow(2).sum())
    return math.sqrt(total)


def shrink(z: Tensors, c: Tensors, lam: float) -> Tensors:
    """The ellipsoid projection's ``z / (1 + 2 lambda / c^2)``; 0 where ``c = 0``."""
    return [torch.where(ci > 0, zi / (1 + 2 * lam / ci**2), torch.zeros_like(zi)) for zi, ci in zip(z, c)]


# ----------------------------------------------------------------------------- worst-case

def ascent(delta: Tensors, g: Tensors, c: Tensors, step: float, norm: str) -> Tensors:
    """``z = delta + step * sign(g) * c`` (linf) or ``delta + step * g * c / ||g||_2`` (l2)."""
    if norm == "linf":
        return [d + step * gi.sign() * ci for d, gi, ci in zip(delta, g, c)]
    g_norm = l2_norm(g)
    return [d + step / (g_norm + 1e-12) * gi * ci for d, gi, ci in zip(delta, g, c)]


def project(z: Tensors, c: Tensors, rho: float, norm: str, c_is_one: bool, tol: float) -> Tensors:
    """Onto ``{||delta / c||_p <= rho}``: a clamp (linf), a rescaling (l2, c = 1) or the
    ellipsoid projection ``z / (1 + 2 lambda / c^2)`` with the published bisection for lambda."""
    if norm == "linf":
        return [torch.maximum(torch.minimum(zi, rho * ci), -rho * ci) for zi, ci in zip(z, c)]
    if c_is_one:
        z_norm = l2_norm(z)
        return [zi * (rho / z_norm) for zi in z] if z_norm > rho else z
    lam = apgd.ellipsoid_lambda(lambda lam: weighted_norm(shrink(z, c, lam), c), rho, tol)
    return z if lam == 0.0 else shrink(z, c, lam)


def published_start(params: ParamSet, s: Settings, c: Tensors, stream: int, restart: int) -> Tensors:
    """``delta`` where a published restart begins: 0, or the random start."""
    if not s.rand_init:
        return [torch.zeros_like(ci) for ci in c]
    xi = draw_noise(params, s, stream=stream, sample=RAND_INIT_SAMPLE_BASE + restart)
    if s.norm == "l2":
        # A Gaussian direction on the ellipsoid's surface, ||delta / c||_2 = rho: the raw
        # rho * c * xi has ||xi||_2 ~ sqrt(N) times the radius, far outside the ball.
        xi_norm = weighted_norm([x_ * ci for x_, ci in zip(xi, c)], c)
        xi = [x_ / xi_norm for x_ in xi]
    return [s.rho * ci * x_ for ci, x_ in zip(c, xi)]  # linf: uniform(-1, 1), inside the box


def start_in_u(params: ParamSet, s: Settings, c: torch.Tensor, local, stream: int, start: int) -> Tensors:
    """``u = delta / c`` where run ``start`` begins (:mod:`.starts`; ``c`` flat)."""
    if s.init == "eigen":
        u = starts.eigen_start(local[stream], start, s, c, torch.empty_like(c))
    elif s.init == "random":
        u = starts.random_start(philox_draw(noise_distribution(s.norm), s.seed, stream, RAND_INIT_SAMPLE_BASE + start,
                                            0, params.numel, dtype=c.dtype, device=c.device), s, c)
    else:
        u = torch.zeros_like(c)
    return params.split(u)


def apgd_restart(model, params: ParamSet, s: Settings, x, y, w0: Tensors, c: Tensors,
                 L0: float, E0, stream: int, delta: Tensors, on_iterate=None):
    """One run of the published APGD on one batch from ``delta``; returns ``(best loss, its error,
    ||delta||_2 there)``. The best starts at ``L0`` (the start's own loss is never taken)."""
    c_is_one = params.unit_scale
    set_weights(params, [w + d for w, d in zip(w0, delta)])
    delta_prev = [d.clone() for d in delta]

    best_loss, best_err, best_norm = L0, E0, 0.0
    best_weights = [p.data for p in params.tensors]
    schedule = apgd.StepSchedule(s, L0)

    for i in range(s.n_iters):
        g = gradient(model, s.objective, params, x, y)               # at the current weights
        with torch.no_grad():
            z = project(ascent(delta, g, c, schedule.step, s.norm), c, s.rho, s.norm, c_is_one, s.bisection_tol)
            delta, delta_prev = [MOMENTUM * zi + (1 - MOMENTUM) * dp
                                 for zi, dp in zip(z, delta_prev)], delta
            set_weights(params, [w + d for w, d in zip(w0, delta)])
        if on_iterate is not None:
            on_iterate(delta, c)
        L, E = evaluate(model, s.objective, x, y)
        check_finite_loss(L, f"at an APGD iterate (batch {stream}, iteration {i})")
        schedule.count(L > best_loss)   # the steps that improved the best
        if L > best_loss:
            best_loss, best_err, best_norm = L, E, delta_l2_norm(delta)
            best_weights = [p.data for p in params.tensors]
        if schedule.halves_at(i, best_loss):
            set_kept(params, best_weights)   # continue from the best point; delta unchanged
    return best_loss, best_err, best_norm


def scaled_direction(g_u: Tensors, norm: str) -> Tensors:
    """Steepest ascent in ``u`` for the constraint's norm: ``sign(g_u)`` (linf), ``g_u / ||g_u||`` (l2)."""
    if norm == "linf":
        return [gi.sign() for gi in g_u]
    g_norm = l2_norm(g_u)
    return [gi / (g_norm + 1e-12) for gi in g_u]


def project_ball(u: Tensors, rho: float, norm: str) -> Tensors:
    """Onto ``{||u||_p <= rho}``: a clamp (linf) or a rescaling (l2)."""
    if norm == "linf":
        return [ui.clamp(-rho, rho) for ui in u]
    u_norm = l2_norm(u)
    return [ui * (rho / u_norm) for ui in u] if u_norm > rho else u


def scaled_apgd_restart(model, params: ParamSet, s: Settings, x, y, w0: Tensors, c: Tensors,
                        stream: int, u: Tensors, on_iterate=None):
    """APGD of Croce & Hein (2020) on ``f(u) = L(w0 + c u)`` over ``||u||_p <= rho``, from ``u``.

    In ``u`` the constraint is a plain ball (l2) or box (linf), the ascent direction is the one the
    norm makes steepest for ``grad_u f = c g``, and projection is a rescale or a clamp. Each step
    ``z = P(u + eta d)``, ``u' = P(u + alpha (z - u) + (1 - alpha)(u - u_prev))`` (``alpha = 1`` at
    the first step, 0.75 after). At the checkpoints of ``apgd.checkpoint_schedule`` the step size
    halves where fewer than ``min_update_ratio`` of the steps since the last one increased the loss
    over the iterate before, or where neither the step nor the best loss changed; ``u`` then moves
    back to the best point found. The start point is the first candidate for the best.
    Returns ``(best loss, its error, ||c u||_2 there)``."""
    def move_to(u):
        set_weights(params, [w + ci * ui for w, ci, ui in zip(w0, c, u)])

    def loss_at(u, i):
        move_to(u)
        L, E = evaluate(model, s.objective, x, y)
        check_finite_loss(L, f"at an APGD iterate (batch {stream}, iteration {i})")
        return L, E

    L, E = loss_at(u, "start")
    best_loss, best_err, best_u = L, E, u
    prev_loss = L
    schedule = apgd.StepSchedule(s, best_loss)
    u_prev = u
    for i in range(s.n_iters):
        g_u = [ci * gi for ci, gi in zip(c, gradient(model, s.objective, params, x, y))]   # at u
        alpha = 1.0 if i == 0 else MOMENTUM
        with torch.no_grad():
            z = project_ball([ui + schedule.step * di for ui, di in zip(u, scaled_direction(g_u, s.norm))],
                             s.rho, s.norm)
            u, u_prev = project_ball([ui + alpha * (zi - ui) + (1 - alpha) * (ui - pi)
                                      for ui, zi, pi in zip(u, z, u_prev)], s.rho, s.norm), u
        if on_iterate is not None:
            on_iterate([ci * ui for ci, ui in zip(c, u)], c)
        L, E = loss_at(u, i)
        schedule.count(L > prev_loss)   # the steps that raised the loss over the previous iterate
        prev_loss = L
        if L > best_loss:
            best_loss, best_err, best_u = L, E, u
        if schedule.halves_at(i, best_loss):
            u = best_u   # back to the best point (u_prev stays: the momentum continues from it)
            move_to(u)
    return best_loss, best_err, delta_l2_norm([ci * ui for ci, ui in zip(c, best_u)])


def solve(model, batches, params: ParamSet, s: Settings, on_iterate=None) -> SharpnessResult:
    w0 = [p.data for p in params.tensors]
    c = params.scales()
    c_flat = torch.cat([ci.reshape(-1) for ci in c])
    local = starts.for_call(model, params, s, batches)
    per_batch, per_batch_err, init_losses, init_errs, delta_norm, improved = [], [], [], [], 0.0, []
    for b, x, y in batches_on_device(batches, params.device):
        set_kept(params, w0)
        L0, E0 = evaluate(model, s.objective, x, y)
        check_finite_loss(L0, f"at the unperturbed weights (batch {b})")
        worst_loss, worst_err, worst_norm, n_improved = L0, E0, 0.0, 0
        for start in range(s.n_starts):
            if s.solver == "scaled":
                L, E, norm = scaled_apgd_restart(model, params, s, x, y, w0, c, b,
                                                 start_in_u(params, s, c_flat, local, b, start), on_iterate)
            else:
                delta = ([ci * ui for ci, ui in zip(c, start_in_u(params, s, c_flat, local, b, start))]
                         if s.init == "eigen" else published_start(params, s, c, b, start))
                L, E, norm = apgd_restart(model, params, s, x, y, w0, c, L0, E0, b, delta, on_iterate)
            if L > worst_loss:
                n_improved += start > 0
                worst_loss, worst_err, worst_norm = L, E, norm
            set_kept(params, w0)
        per_batch.append(worst_loss - L0)
        improved.append(n_improved)
        init_losses.append(L0)
        if E0 is not None:
            per_batch_err.append(worst_err - E0)
            init_errs.append(E0)
        delta_norm = max(delta_norm, worst_norm)
    return summarize(s, "reference", per_batch, per_batch_err, init_losses, init_errs, delta_norm,
                     **starts.diagnostics(s, improved, local))
