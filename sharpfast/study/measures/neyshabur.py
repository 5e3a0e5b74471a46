"""Neyshabur et al.'s norms over the margin, l_p path-norms and norm-based bounds, as their
generalization-bounds code computes them."""
from __future__ import annotations

import math
from typing import Callable

import torch

from .context import Context, _powered_network
from .layers import lpq_norm, schatten_norm

def _log_prod(ctx: Context, norm: Callable[[torch.Tensor], float]) -> float:
    return sum(math.log(norm(m.weight)) for _, m in ctx.layers)


def _exp(log_value: float) -> float:
    if log_value > 709:   # exp overflows float64 beyond e^709
        raise ValueError(f"the measure is e^{log_value:.0f}, beyond float64 (its log would rank the models alike)")
    return math.exp(log_value)


def _over_margin(ctx: Context, norm: Callable[[torch.Tensor], float]) -> float:
    """``prod_l norm(W_l) / gamma`` (Neyshabur et al.'s ``calc_measure(..., 'product') / margin``)."""
    return _exp(_log_prod(ctx, norm) - math.log(ctx.gamma("percentile5")))


def _lp_path_norm(ctx: Context, p: float) -> float:
    """Neyshabur et al. (2015)'s l_p path-norm ``(sum_i f_{|w|^p}(1)_i)^(1/p)``."""
    return _powered_network(ctx, p) ** (1 / p)


def _layer_params(ctx: Context) -> int:
    """Weights and biases of the layers (Neyshabur et al.'s ``n_param``, BatchNorm folded away)."""
    return sum(m.weight.numel() + (0 if m.bias is None else m.bias.numel()) for _, m in ctx.layers)


def _input_size(ctx: Context) -> int:
    return math.prod(ctx.x.shape[1:])


def _capacity_alpha(ctx: Context) -> float:
    """``sqrt(d + log(input size))``: the depth dependence of Golowich et al. (2018) that Neyshabur
    et al.'s code puts in the norm-based bounds."""
    return math.sqrt(ctx.d + math.log(_input_size(ctx)))


def _spectral_ratio(ctx: Context, q: int, power: float) -> float:
    """``(sum_l (h_l^(1 - 1/q) ||W_l - W0_l||_{2,q} / ||W_l||_2)^power)^(1/power)``, ``h_l`` the layer's
    output units (Neyshabur et al.'s ``h_dist_op_norm`` summed under ``calc_measure(..., 'norm')``)."""
    terms = [(m.weight.shape[0] ** (1 - 1 / q) * lpq_norm(dw, 2, q) / spec) ** power
             for (_, m), dw, spec in zip(ctx.layers, ctx.distances(), ctx.spec())]
    return sum(terms) ** (1 / power)


def _spectral_bound(ctx: Context, factor: float, q: int, power: float) -> float:
    """``factor * prod_l ||W_l||_2 / gamma * ratio / sqrt(m)`` (Bartlett 2017, Neyshabur 2018)."""
    log_value = (math.log(factor) + sum(math.log(v) for v in ctx.spec())
                 - math.log(ctx.gamma("percentile5")) + math.log(_spectral_ratio(ctx, q, power))
                 - 0.5 * math.log(len(ctx.y)))
    return _exp(log_value)


MEASURES: dict[str, Callable[[Context], float]] = {
    "num-params": lambda c: float(sum(m.weight.numel() for _, m in c.layers)),
    "l1,inf-norm/margin": lambda c: _over_margin(c, lambda w: lpq_norm(w, 1, math.inf)),
    "l3,1.5-norm/margin": lambda c: _over_margin(c, lambda w: lpq_norm(w, 3, 1.5)),
    "fro-norm/margin": lambda c: _over_margin(c, lambda w: lpq_norm(w, 2, 2)),
    "spec-norm/margin": lambda c: _exp(sum(math.log(v) for v in c.spec()) - math.log(c.gamma("percentile5"))),
    "schatten-1.5-norm/margin": lambda c: _over_margin(c, lambda w: schatten_norm(w, 1.5)),
    "trace-norm/margin": lambda c: _over_margin(c, lambda w: schatten_norm(w, 1)),
    "l1-path-norm/margin": lambda c: _lp_path_norm(c, 1) / c.gamma("percentile5"),
    "l1.5-path-norm/margin": lambda c: _lp_path_norm(c, 1.5) / c.gamma("percentile5"),
    "l2-path-norm/margin": lambda c: _lp_path_norm(c, 2) / c.gamma("percentile5"),
    # the bounds, without their constants and additive log factors (as the code reports them)
    "bound-l1,inf-bartlett-mendelson-2002": lambda c: _capacity_alpha(c) * MEASURES["l1,inf-norm/margin"](c)
    / math.sqrt(len(c.y)),
    "bound-fro-neyshabur-2015": lambda c: _capacity_alpha(c) * MEASURES["fro-norm/margin"](c) / math.sqrt(len(c.y)),
    "bound-l3,1.5-neyshabur-2015": lambda c: _capacity_alpha(c) * MEASURES["l3,1.5-norm/margin"](c)
    / len(c.y) ** (1 / 3),
    "bound-spec-l2,1-bartlett-2017": lambda c: _spectral_bound(
        c, math.log(len(c.y)) * math.log(_layer_params(c)), q=1, power=2 / 3),
    "bound-spec-fro-neyshabur-2018": lambda c: _spectral_bound(c, c.d, q=2, power=2),
}
NEEDS_INIT = ("bound-spec-l2,1-bartlett-2017", "bound-spec-fro-neyshabur-2018")
NEYSHABUR = ("l1,inf-norm/margin", "fro-norm/margin", "l3,1.5-norm/margin", "spec-norm/margin",
             "schatten-1.5-norm/margin", "trace-norm/margin", "l1-path-norm/margin", "l1.5-path-norm/margin",
             "l2-path-norm/margin", "bound-l1,inf-bartlett-mendelson-2002", "bound-fro-neyshabur-2015",
             "bound-l3,1.5-neyshabur-2015", "bound-spec-l2,1-bartlett-2017", "bound-spec-fro-neyshabur-2018")
