"""What the measures of one model share, computed once (:class:`Context`)."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.func import functional_call

from .layers import _positive_margin, batchnorm_folded, input_shapes, layers, operator_norm, schatten_norm

BOUND_PARAMETERS = ("weights", "all")


class Context:
    """What the measures of one model share, computed once: layers, norms, the margin."""

    def __init__(self, model: nn.Module, init: nn.Module | None, x, y, metrics: dict | None = None,
                 fold_batchnorm: bool = True, bound_parameters: str = "weights"):
        if bound_parameters not in BOUND_PARAMETERS:
            raise ValueError(f"bound_parameters must be one of {BOUND_PARAMETERS}, got {bound_parameters!r}")
        self.bound_parameters = bound_parameters
        if not isinstance(x, torch.Tensor):
            raise TypeError("the Jiang et al. measures take models with one tensor input (their layers, margins and "
                            f"path-norm are defined for classifiers f(x)); got inputs of type {type(x).__name__}")
        # measured on copies (the caller's models keep their mode and weights), BatchNorm folded
        prepare = (lambda m: batchnorm_folded(m, x)) if fold_batchnorm else (lambda m: copy.deepcopy(m).eval())
        self.model = prepare(model)
        self.init = None if init is None else prepare(init)
        self.x, self.y, self.metrics = x, y, metrics or {}
        self.layers = layers(self.model)
        self.shapes = input_shapes(self.model, x)
        self._cache: dict = {}

    def cached(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @property
    def d(self) -> int:
        return len(self.layers)

    def spec(self, exact: bool = False) -> list[float]:
        """Each layer's ``||W||_2``: its reshaped ``[out, in * kernel]`` matrix's largest singular value
        (the authors' code), or ``exact``, the operator norm of the map the layer applies."""
        if exact:
            return self.cached("spec-exact", lambda: [operator_norm(m, m.weight, self.shapes.get(n))
                                                      for n, m in self.layers])
        return self.cached("spec", lambda: [schatten_norm(m.weight, math.inf) for _, m in self.layers])

    def dist_spec(self, exact: bool = False) -> list[float]:
        """``||W - W0||_2`` of each layer, taken as :meth:`spec` takes ``||W||_2``."""
        if exact:
            return [operator_norm(m, dw, self.shapes.get(n)) for (n, m), dw in zip(self.layers, self.distances())]
        return [schatten_norm(dw, math.inf) for dw in self.distances()]

    def fro(self) -> list[float]:
        return self.cached("fro", lambda: [float(m.weight.detach().double().norm()) for _, m in self.layers])

    def init_layers(self) -> list[torch.Tensor]:
        if self.init is None:
            raise ValueError("this measure needs the initial weights (the zoo's init_checkpoint)")
        return self.cached("init", lambda: [dict(self.init.named_modules())[n].weight.detach() for n, _ in self.layers])

    def distances(self) -> list[torch.Tensor]:
        return [m.weight.detach() - w0 for (_, m), w0 in zip(self.layers, self.init_layers())]

    def gamma(self, convention: str = "kth") -> float:
        return self.cached(("gamma", convention), lambda: _positive_margin(self.model, self.x, self.y, convention))


def _powered_network(ctx: Context, p: float) -> float:
    """``sum_i f_{|w|^p}(1)_i``: the network with every parameter's magnitude raised to the p-th
    power, on an all-ones input (for ReLU networks, the sum over input-output paths of the
    products of the weights' p-th powers)."""
    powered = {n: w.detach().abs() ** p for n, w in ctx.model.named_parameters()}
    ones = torch.ones((1,) + tuple(ctx.x.shape[1:]), dtype=ctx.x.dtype, device=ctx.x.device)
    with torch.no_grad():
        return float(functional_call(ctx.model, {**powered, **dict(ctx.model.named_buffers())}, (ones,)).double().sum())
