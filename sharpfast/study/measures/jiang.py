"""Jiang et al.'s measures (ICLR 2020, appendix C), as Dziugaite et al.'s code computes them: norms,
products and sums of norms, margins, path-norm, entropy, Fisher-Rao and the trajectory."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .context import Context, _powered_network

def _log_prod_sq(norms: list[float]) -> float:
    return sum(2 * math.log(v) for v in norms)


def _path_norm(ctx: Context) -> float:
    return _powered_network(ctx, 2)


def _fisher_rao(ctx: Context) -> float:
    model, params = ctx.model, [p for p in ctx.model.parameters() if p.requires_grad]
    total = 0.0
    for i in range(len(ctx.y)):
        loss = F.cross_entropy(model(ctx.x[i:i + 1]), ctx.y[i:i + 1])
        grads = torch.autograd.grad(loss, params)
        total += float(sum((p.detach().double() * g.double()).sum() for p, g in zip(params, grads))) ** 2
    return (ctx.d + 1) ** 2 / len(ctx.y) * total


def _outputs(ctx: Context) -> torch.Tensor:
    return ctx.cached("out", lambda: ctx.model(ctx.x).detach().double())


def _spectral(ctx: Context, reference: str, exact: bool) -> float:
    spec = ctx.spec(exact)
    terms = ([float(dw.double().norm()) ** 2 for dw in ctx.distances()] if reference == "init"
             else [f ** 2 for f in ctx.fro()])
    return _log_prod_sq(spec) - 2 * math.log(ctx.gamma()) + math.log(sum(t / s**2 for t, s in zip(terms, spec)))


def _spectral_measures(exact: bool) -> dict[str, Callable[[Context], float]]:
    """The measures built on ``||W||_2``: the reshaped kernel's, or (``exact``, named ``-exact``) the
    convolution's operator norm."""
    x = "-exact" if exact else ""
    return {
        f"spec-dist{x}": lambda c: sum(s**2 for s in c.dist_spec(exact)),
        f"fro/spec{x}": lambda c: sum(f**2 / s**2 for f, s in zip(c.fro(), c.spec(exact))),
        f"prod-of-spec{x}": lambda c: _log_prod_sq(c.spec(exact)),
        f"prod-of-spec{x}/margin": lambda c: _log_prod_sq(c.spec(exact)) - 2 * math.log(c.gamma()),
        f"sum-of-spec{x}": lambda c: math.log(c.d) + _log_prod_sq(c.spec(exact)) / c.d,
        f"sum-of-spec{x}/margin": lambda c: math.log(c.d) + (_log_prod_sq(c.spec(exact)) - 2 * math.log(c.gamma()))
        / c.d,
        f"spectral-init{x}": lambda c: _spectral(c, "init", exact),
        f"spectral-orig{x}": lambda c: _spectral(c, "origin", exact),
    }


MEASURES: dict[str, Callable[[Context], float]] = {
    "param-norm": lambda c: sum(f**2 for f in c.fro()),
    "frob-distance": lambda c: sum(float(dw.double().norm()) ** 2 for dw in c.distances()),
    **_spectral_measures(exact=False),
    "prod-of-fro": lambda c: _log_prod_sq(c.fro()),
    "prod-of-fro/margin": lambda c: _log_prod_sq(c.fro()) - 2 * math.log(c.gamma()),
    "sum-of-fro": lambda c: math.log(c.d) + _log_prod_sq(c.fro()) / c.d,
    "sum-of-fro/margin": lambda c: math.log(c.d) + (_log_prod_sq(c.fro()) - 2 * math.log(c.gamma())) / c.d,
    "path-norm": _path_norm,
    "path-norm/margin": lambda c: _path_norm(c) / c.gamma() ** 2,
    "1/margin": lambda c: 1.0 / c.gamma() ** 2,
    "cross-entropy": lambda c: float(F.cross_entropy(_outputs(c), c.y)),
    "neg-entropy": lambda c: float((F.softmax(_outputs(c), 1) * F.log_softmax(_outputs(c), 1)).sum(1).mean()),
    "fisher-rao": _fisher_rao,
    "num-step-to-0.1-loss": lambda c: _recorded(c, "steps_to_loss_0.1"),
    **_spectral_measures(exact=True),
}
NEEDS_INIT = ("frob-distance", "spec-dist", "spectral-init", "spec-dist-exact", "spectral-init-exact")


def _recorded(ctx: Context, metric: str) -> float:
    if metric not in ctx.metrics:
        raise ValueError(f"the zoo did not record {metric!r} for this model (never reached, or trained before "
                         "trajectory facts were recorded)")
    return float(ctx.metrics[metric])
