"""The curvature of one m-batch's loss as a linear operator on the flat parameter vector:
``v -> C M C v`` with ``M`` the Hessian (or the generalized Gauss-Newton matrix) at the model's
weights and ``C = diag(c)`` the sharpness scale (DESIGN.md §1: sharpness tends to these
quantities as rho -> 0).

Products are forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``) through
``functional_call`` on the flat weights, vmapped over blocks of vectors; the GGN ``J^T H_L J``
pushes ``v`` forward through the model (``jvp``), applies the loss's Hessian in output space
and pulls back (``vjp``). A model that vmap cannot trace is applied one vector at a time.
Attention runs on the math backend inside the products: the fused CPU/GPU attention kernels
have no forward-mode derivative.
"""
from __future__ import annotations

import logging

import torch
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..objective import Objective
from ..params import ParamSet

log = logging.getLogger("sharpfast.curvature")

CURVATURES = ("hessian", "ggn")


class CurvatureOperator:
    """``C M C`` of one batch at the model's current weights; ``matvec`` takes ``[N]`` or ``[N, k]``."""

    def __init__(self, model, params: ParamSet, objective: Objective, x, y, curvature: str = "hessian"):
        if curvature not in CURVATURES:
            raise ValueError(f"unknown curvature {curvature!r}; expected one of {CURVATURES}")
        self.curvature = curvature
        self.w = torch.cat([p.detach().reshape(-1) for p in params.tensors])
        self.c = torch.cat([c.reshape(-1) for c in params.scales()]).to(self.w.dtype)
        self.n = self.w.numel()
        names, numels, shapes = params.names, params.numels, [p.shape for p in params.tensors]

        def outputs(w):
            weights = {name: t.view(shape) for name, t, shape in zip(names, w.split(numels), shapes)}
            return objective.logits(lambda *a, **kw: functional_call(model, weights, a, kw), x)

        def loss(w):
            return objective.loss(outputs(w), y)

        if curvature == "hessian":
            def product(v):
                return jvp(grad(loss), (self.w,), (v,))[1]
        else:
            def product(v):
                out, jv = jvp(outputs, (self.w,), (v,))
                hjv = jvp(grad(lambda o: objective.loss(o, y)), (out.detach(),), (jv,))[1]
                return vjp(outputs, self.w)[1](hjv)[0]
        def scaled(v):
            with sdpa_kernel([SDPBackend.MATH]):
                return self.c * product(self.c * v)
        self._product = scaled
        self._batched = vmap(self._product, in_dims=1, out_dims=1, randomness="error")
        self._vmappable = True

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``C M C v`` for a vector ``[N]`` or every column of ``[N, k]``."""
        if v.dim() == 1:
            return self._product(v)
        if self._vmappable:
            try:
                return self._batched(v)
            except Exception as e:  # noqa: BLE001 - any vmap limitation: one vector at a time
                log.debug("sharpfast: cannot vmap the curvature products (%s: %s); one at a time",
                          type(e).__name__, e)
                self._vmappable = False
        return torch.stack([self._product(v[:, j]) for j in range(v.shape[1])], dim=1)
