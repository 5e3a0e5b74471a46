"""The pure-PyTorch reference: sharpness exactly as defined in DESIGN.md §1-2, written to be read.

For weights ``w``, a batch ``S``, radius ``rho`` and per-coordinate scale ``c``:

* average-case  ``S_avg = E_S E_xi [L_S(w + rho * c * xi) - L_S(w)]``, ``xi ~ N(0, I)`` (l2)
  or ``U(-1, 1)`` (linf), estimated with ``n_samples`` draws per batch;
* worst-case    ``S_max = E_S max_{||delta / c||_p <= rho} L_S(w + delta) - L_S(w)``, the inner
  max found by APGD in weight space (momentum 0.75, step halving at fixed checkpoints, the
  iterate moved back to the best point found when the step is halved).

Every batch is one m-sharpness batch with a perturbation of its own. The noise comes from the
counter-based sampler (``sharpfast.philox``), so the fused backend draws the same numbers.
This module works on lists of per-parameter tensors and never touches the user's storage:
it points each ``param.data`` at tensors of its own; the caller's ``ModelGuard`` points them back.
"""
from __future__ import annotations

import math

import torch

from . import apgd
from .result import SharpnessResult, check_finite_loss
from .settings import Settings
from .objective import Objective, batches_on_device
from .params import ParamSet
from .philox import AVERAGE_SAMPLE_BASE, RAND_INIT_SAMPLE_BASE, noise_distribution, philox_draw

Tensors = list[torch.Tensor]


# ----------------------------------------------------------------------------- helpers

def set_weights(params: ParamSet, values: Tensors) -> None:
    for p, v in zip(params.tensors, values):
        p.data = v


def draw_noise(params: ParamSet, s: Settings, stream: int, sample: int) -> Tensors:
    """``xi`` for every parameter: one draw over the concatenated parameter vector."""
    xi = philox_draw(noise_distribution(s.norm), s.seed, stream, sample, 0, params.numel,
                     dtype=torch.float64, device=params.device)
    return [x.to(p.dtype) for x, p in zip(params.split(xi), params.tensors)]


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


@torch.no_grad()
def evaluate(model, objective: Objective, x, y) -> tuple[float, float | None]:
    loss, err = objective.loss_and_error(model, x, y)
    return float(loss), (None if err is None else float(err))


def gradient(model, objective: Objective, params: ParamSet, x, y) -> Tensors:
    loss = objective.loss(objective.logits(model, x), y)
    grads = torch.autograd.grad(loss, params.tensors, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.tensors)]


def _mean(values):
    return sum(values) / len(values)


# ----------------------------------------------------------------------------- average-case

def average_sharpness(model, batches, params: ParamSet, s: Settings) -> SharpnessResult:
    w0 = [p.data for p in params.tensors]
    c = params.scales()
    per_batch, per_batch_err, init_losses, init_errs = [], [], [], []
    for b, x, y in batches_on_device(batches, params.device):
        set_weights(params, w0)
        L0, E0 = evaluate(model, s.objective, x, y)
        check_finite_loss(L0, f"at the unperturbed weights (batch {b})")
        losses, errs = [], []
        for k in range(s.n_samples):
            # Antithetic pairs share one draw: sample 2j uses +xi_j, sample 2j+1 uses -xi_j.
            sample, sign = (k // 2, (-1) ** k) if s.antithetic else (k, 1)
            xi = draw_noise(params, s, stream=b, sample=AVERAGE_SAMPLE_BASE + sample)
            set_weights(params, [w + (sign * s.rho) * ci * x_ for w, ci, x_ in zip(w0, c, xi)])
            L, E = evaluate(model, s.objective, x, y)
            check_finite_loss(L, f"at a perturbed point (batch {b}, sample {k})")
            losses.append(L)
            errs.append(E)
        per_batch.append(_mean(losses) - L0)
        init_losses.append(L0)
        if E0 is not None:
            per_batch_err.append(_mean(errs) - E0)
            init_errs.append(E0)
    set_weights(params, w0)
    return _result(s, "reference", per_batch, per_batch_err, init_losses, init_errs, delta_norm=0.0)


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


def apgd_restart(model, params: ParamSet, s: Settings, x, y, w0: Tensors, c: Tensors,
                 L0: float, E0, stream: int, restart: int, on_iterate=None):
    """One APGD run on one batch; returns ``(best loss, its error, ||delta||_2 there)``."""
    c_is_one = params.unit_scale
    if s.rand_init:
        xi = draw_noise(params, s, stream=stream, sample=RAND_INIT_SAMPLE_BASE + restart)
        if s.norm == "l2":
            # A Gaussian direction on the ellipsoid's surface, ||delta / c||_2 = rho: the raw
            # rho * c * xi has ||xi||_2 ~ sqrt(N) times the radius, far outside the ball.
            xi_norm = weighted_norm([x_ * ci for x_, ci in zip(xi, c)], c)
            xi = [x_ / xi_norm for x_ in xi]
        delta = [s.rho * ci * x_ for ci, x_ in zip(c, xi)]  # linf: uniform(-1, 1), inside the box
    else:
        delta = [torch.zeros_like(w) for w in w0]
    set_weights(params, [w + d for w, d in zip(w0, delta)])
    delta_prev = [d.clone() for d in delta]

    best_loss, best_err, best_norm = L0, E0, 0.0
    best_weights = [p.data for p in params.tensors]
    step = 2 * s.rho * s.step_size_mult
    checkpoints = set(apgd.checkpoint_schedule(s.n_iters))
    prev_step, prev_best, prev_checkpoint, n_updates = step, L0, 0, 0

    for i in range(s.n_iters):
        g = gradient(model, s.objective, params, x, y)               # at the current weights
        with torch.no_grad():
            z = project(ascent(delta, g, c, step, s.norm), c, s.rho, s.norm, c_is_one, s.bisection_tol)
            delta, delta_prev = [apgd.MOMENTUM * zi + (1 - apgd.MOMENTUM) * dp
                                 for zi, dp in zip(z, delta_prev)], delta
            set_weights(params, [w + d for w, d in zip(w0, delta)])
        if on_iterate is not None:
            on_iterate(delta, c)
        L, E = evaluate(model, s.objective, x, y)
        check_finite_loss(L, f"at an APGD iterate (batch {stream}, iteration {i})")
        if L > best_loss:
            best_loss, best_err, best_norm = L, E, l2_norm(delta)
            best_weights = [p.data for p in params.tensors]
            n_updates += 1
        if i in checkpoints:
            too_few_updates = apgd.too_few_updates(n_updates, s.min_update_ratio, i - prev_checkpoint)
            stalled = prev_step == step and prev_best == best_loss
            prev_step, prev_best, prev_checkpoint, n_updates = step, best_loss, i, 0
            if too_few_updates or stalled:
                step *= apgd.STEP_SIZE_SCALER
                set_weights(params, best_weights)   # continue from the best point; delta unchanged
    return best_loss, best_err, best_norm


def worst_case_sharpness(model, batches, params: ParamSet, s: Settings, on_iterate=None) -> SharpnessResult:
    w0 = [p.data for p in params.tensors]
    c = params.scales()
    per_batch, per_batch_err, init_losses, init_errs, delta_norm = [], [], [], [], 0.0
    for b, x, y in batches_on_device(batches, params.device):
        set_weights(params, w0)
        L0, E0 = evaluate(model, s.objective, x, y)
        check_finite_loss(L0, f"at the unperturbed weights (batch {b})")
        worst_loss, worst_err, worst_norm = L0, E0, 0.0
        for restart in range(s.n_restarts):
            L, E, norm = apgd_restart(model, params, s, x, y, w0, c, L0, E0, b, restart, on_iterate)
            if L > worst_loss:
                worst_loss, worst_err, worst_norm = L, E, norm
            set_weights(params, w0)
        per_batch.append(worst_loss - L0)
        init_losses.append(L0)
        if E0 is not None:
            per_batch_err.append(worst_err - E0)
            init_errs.append(E0)
        delta_norm = max(delta_norm, worst_norm)
    return _result(s, "reference", per_batch, per_batch_err, init_losses, init_errs, delta_norm)


def _result(s: Settings, backend: str, per_batch, per_batch_err, init_losses, init_errs, delta_norm):
    has_err = len(per_batch_err) == len(per_batch)
    return SharpnessResult(
        sharpness=_mean(per_batch), err_sharpness=_mean(per_batch_err) if has_err else None,
        per_batch=per_batch, per_batch_err=per_batch_err if has_err else None,
        delta_norm=delta_norm, init_loss=_mean(init_losses),
        init_err=_mean(init_errs) if has_err else None, backend=backend, kind=s.kind,
        settings=s.describe())
