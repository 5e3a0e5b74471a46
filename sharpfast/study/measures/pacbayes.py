"""The PAC-Bayes and sharpness measures with their searches for a radius (Jiang et al.'s, as
Dziugaite et al.'s code computes them), the searches run by sharpfast's own sharpness functions."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .context import Context

ACCURACY_DEVIATION = 0.1     # the searches' target: the perturbation that moves the training error by this much
DEVIATION_TOLERANCE = 1e-2
SEARCH_STEPS = 15            # bisection steps over (0, SEARCH_MAX]
SEARCH_MAX = 2.0
MC_SAMPLES = 10              # Gaussian draws per PAC-Bayes search step
ASCENT_STEPS = 20            # APGD iterations per sharpness search step
MAG_EPS = 1e-3               # the magnitude-aware perturbation's floor


def _search(deviation: Callable[[float], float]) -> float:
    """The largest radius in ``(0, SEARCH_MAX]`` whose training-error deviation is ``0.1`` (within
    ``1e-2``), by bisection (Jiang et al.'s search; ``SEARCH_MAX`` where even that moves it less)."""
    lo, hi = 0.0, SEARCH_MAX
    if deviation(hi) <= ACCURACY_DEVIATION:
        return hi
    r = hi
    for _ in range(SEARCH_STEPS):
        r = (lo + hi) / 2
        d = deviation(r)
        if abs(d - ACCURACY_DEVIATION) < DEVIATION_TOLERANCE:
            break
        lo, hi = (lo, r) if d > ACCURACY_DEVIATION else (r, hi)
    return r


def _magnitude_scale(model: nn.Module, radius: float) -> dict:
    """``c`` with ``radius * c_i = sqrt(radius^2 w_i^2 + eps^2)`` (Gaussian) or ``radius |w_i| + eps`` (box)."""
    return {n: (p.detach().abs() ** 2 + (MAG_EPS / radius) ** 2).sqrt() for n, p in model.named_parameters()}


def _deviation(ctx: Context, radius: float, worst: bool, magnitude: bool) -> float:
    """The training-error increase at ``radius``: the mean over Gaussian draws ``w + radius c xi``
    (PAC-Bayes), or the largest APGD finds in the box ``|u_i| <= radius c_i`` (sharpness), by the
    sharpness functions themselves; ``c = 1``, or magnitude-aware."""
    import sharpfast

    kw = dict(adaptive=magnitude, adaptive_eta=MAG_EPS / radius) if (magnitude and worst) else (
        dict(adaptive=False, scale=_magnitude_scale(ctx.model, radius)) if magnitude else dict(adaptive=False))
    data = [(ctx.x, ctx.y)]
    if worst:
        r = sharpfast.worst_case_sharpness(ctx.model, data, rho=radius, norm="linf", n_iters=ASCENT_STEPS, **kw)
    else:
        r = sharpfast.average_sharpness(ctx.model, data, rho=radius, norm="l2", n_samples=MC_SAMPLES, **kw)
    if r.err_sharpness is None:
        raise ValueError("the PAC-Bayes and sharpness searches need class labels (a training error)")
    return abs(r.err_sharpness)


def _radius(ctx: Context, worst: bool, magnitude: bool) -> float:
    return ctx.cached(("radius", worst, magnitude),
                      lambda: _search(lambda r: _deviation(ctx, r, worst, magnitude)))


# Which parameters the PAC-Bayes and sharpness bounds count (their ||w||, ||w - w0|| and omega):
# "weights": the layers' weights, biases left out, as Dziugaite et al.'s code does (omega is then
#            num-params); "all": every parameter (Jiang et al.'s omega read as "parameters").
def _bound_tensors(ctx: Context, model: nn.Module) -> list[torch.Tensor]:
    if ctx.bound_parameters == "all":
        return list(model.parameters())
    modules = dict(model.named_modules())
    return [modules[n].weight for n, _ in ctx.layers]


def _bound_vector(ctx: Context, model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in _bound_tensors(ctx, model)])


def _omega(ctx: Context) -> int:
    """The number of parameters the bounds count (``ctx.bound_parameters``)."""
    return sum(p.numel() for p in _bound_tensors(ctx, ctx.model))


def _weights(ctx: Context, reference: str) -> torch.Tensor:
    """The bounds' parameters (``ctx.bound_parameters``) as one vector, or their distance to the initial ones."""
    w = _bound_vector(ctx, ctx.model)
    if reference == "orig":
        return w
    if ctx.init is None:
        raise ValueError("this measure needs the initial weights (the zoo's init_checkpoint)")
    return w - _bound_vector(ctx, ctx.init)


def _pacbayes(ctx: Context, reference: str, sigma: float) -> float:
    """``||w_ref||^2 / (4 sigma^2) + log(m / sigma) + 10`` (Jiang et al. eq. 48-49)."""
    return float(_weights(ctx, reference).pow(2).sum()) / (4 * sigma**2) + math.log(len(ctx.y) / sigma) + 10


def _pacbayes_mag(ctx: Context, reference: str, sigma: float) -> float:
    """``1/4 sum_i log((eps^2 + (sigma^2 + 1) ||w_ref||^2 / omega) / (eps^2 + sigma^2 (w - w0)_i^2))
    + log(m / sigma) + 10`` (eq. 56-57; the denominator is the distance to initialization for both
    references, as Jiang et al. write it, so both need the initial weights)."""
    ref = _weights(ctx, reference)
    dist = _weights(ctx, "init")
    num = MAG_EPS**2 + (sigma**2 + 1) * float(ref.pow(2).sum()) / ref.numel()
    return float(0.25 * torch.log(num / (MAG_EPS**2 + sigma**2 * dist**2)).sum()) + math.log(len(ctx.y) / sigma) + 10


def _sharpness_sigma(ctx: Context, alpha: float) -> float:
    """The Gaussian scale whose bound a box of half-width ``alpha`` gives: ``alpha / sqrt(2 log(2 omega))``."""
    omega = _omega(ctx)
    return alpha / math.sqrt(2 * math.log(2 * omega))


def _sharpness(ctx: Context, reference: str) -> float:
    """``||w_ref||^2 log(2 omega) / (4 alpha^2) + log(m / sigma) + 10`` (eq. 50-51)."""
    alpha = _radius(ctx, worst=True, magnitude=False)
    omega = _omega(ctx)
    sigma = _sharpness_sigma(ctx, alpha)
    return (float(_weights(ctx, reference).pow(2).sum()) * math.log(2 * omega) / (4 * alpha**2)
            + math.log(len(ctx.y) / sigma) + 10)


MEASURES: dict[str, Callable[[Context], float]] = {
    "pacbayes-init": lambda c: _pacbayes(c, "init", _radius(c, worst=False, magnitude=False)),
    "pacbayes-orig": lambda c: _pacbayes(c, "orig", _radius(c, worst=False, magnitude=False)),
    "1/sigma-pacbayes": lambda c: 1 / _radius(c, worst=False, magnitude=False) ** 2,
    "sharpness-init": lambda c: _sharpness(c, "init"),
    "sharpness-orig": lambda c: _sharpness(c, "orig"),
    "1/alpha-sharpness": lambda c: 1 / _radius(c, worst=True, magnitude=False) ** 2,
    "pacbayes-mag-init": lambda c: _pacbayes_mag(c, "init", _radius(c, worst=False, magnitude=True)),
    "pacbayes-mag-orig": lambda c: _pacbayes_mag(c, "orig", _radius(c, worst=False, magnitude=True)),
    "1/sigma-pacbayes-mag": lambda c: 1 / _radius(c, worst=False, magnitude=True) ** 2,
    "pac-sharpness-mag-init": lambda c: _pacbayes_mag(c, "init", _sharpness_sigma(c, _radius(c, True, True))),
    "pac-sharpness-mag-orig": lambda c: _pacbayes_mag(c, "orig", _sharpness_sigma(c, _radius(c, True, True))),
    "1/alpha-sharpness-mag": lambda c: 1 / _radius(c, worst=True, magnitude=True) ** 2,
}
NEEDS_INIT = ("pacbayes-init", "sharpness-init", "pacbayes-mag-init", "pac-sharpness-mag-init",
                           "pacbayes-mag-orig", "pac-sharpness-mag-orig")
