"""The curvature of one m-batch's loss as a linear operator on the flat parameter vector:
``v -> C M C v`` with ``M`` the Hessian (or the generalized Gauss-Newton matrix) at the model's
weights and ``C = diag(c)`` the sharpness scale (DESIGN.md §1: sharpness tends to these
quantities as rho -> 0).

Hessian products differentiate the gradient's graph, built once per batch (``create_graph``):
one backward per vector on a CPU, one batched backward (``is_grads_batched``) per block on a GPU.
Measured on a 13K-parameter CNN on the CPU (benchmarks/CURVATURE_RESULTS.md) a product costs
about one gradient there (as PyHessian's, which differentiates the same graph), where forward-over-reverse (``torch.func.jvp`` of ``grad``), which
recomputes the forward and backward for every block, costs 2.9. A model whose ops lack a double backward falls back to
forward-over-reverse, vmapped over the block (or one vector at a time where vmap cannot trace
it). The GGN ``J^T H_L J`` pushes ``v`` forward through the model (``jvp``), applies the loss's
Hessian in output space and pulls back (``vjp``). Attention runs on the math backend inside the
products, and ``nn.MultiheadAttention`` / ``nn.TransformerEncoder`` off their inference fast path
(taken in eval mode wherever nothing requires grad, as inside ``jvp``): the fused CPU/GPU attention
kernels have neither a forward-mode derivative nor a double backward.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..objective import Objective
from ..params import ParamSet

log = logging.getLogger("sharpfast.curvature")

CURVATURES = ("hessian", "ggn")


@contextlib.contextmanager
def differentiable_attention():
    """Attention on the paths autograd can differentiate twice and forward AD can push through: the
    math SDPA backend, and the PyTorch attention modules off their fused inference fast path."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


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

        self._loss = loss
        self._graph = None   # (w, its gradient with create_graph), built at the first Hessian product
        if curvature == "hessian":
            def product(v):
                return jvp(grad(loss), (self.w,), (v,))[1]
        else:
            def product(v):
                out, jv = jvp(outputs, (self.w,), (v,))
                hjv = jvp(grad(lambda o: objective.loss(o, y)), (out.detach(),), (jv,))[1]
                return vjp(outputs, self.w)[1](hjv)[0]
        def scaled(v):
            with differentiable_attention():
                return self.c * product(self.c * v)
        self._product = scaled
        self._batched = vmap(self._product, in_dims=1, out_dims=1, randomness="error")
        self._vmappable = True

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``C M C v`` for a vector ``[N]`` or every column of ``[N, k]``; a product that is not
        finite (a loss whose curvature diverges at the weights) is refused by name."""
        out = self._matvec(v)
        if not bool(torch.isfinite(out).all()):
            raise ValueError("the curvature's products are not finite at the weights (NaN or inf in the "
                             f"{self.curvature} times a vector, with a finite loss): the curvature is undefined here")
        return out

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        if self.curvature == "hessian" and self._graph is not False:
            try:
                return self._through_graph(v)
            except (RuntimeError, NotImplementedError) as e:
                if "not implemented" not in str(e) and "not supported" not in str(e):
                    raise
                # an op without a double backward (or a batching rule for it): forward-over-reverse
                log.debug("sharpfast: no batched double backward (%s); forward-over-reverse products", e)
                self._graph = False
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

    def loss_at_weights(self) -> float:
        """The batch's loss at the weights (one forward pass)."""
        with torch.no_grad():
            return float(self._loss(self.w))

    def scaled_gradient(self) -> torch.Tensor:
        """``C g``, the loss's gradient at the weights in the problem's coordinates ``u = delta / c``."""
        with differentiable_attention(), torch.enable_grad():
            if self._graph:
                return self.c * self._graph[1].detach()
            w = self.w.clone().requires_grad_(True)
            return self.c * torch.autograd.grad(self._loss(w), w)[0]

    def _through_graph(self, v: torch.Tensor) -> torch.Tensor:
        """``C H C v`` by backward passes through the gradient's graph (built on first use): one per
        vector on a CPU (measured faster there than one batched backward, 11 vs 19 ms per product on
        the benchmark CNN), one batched backward for a block elsewhere."""
        with differentiable_attention(), torch.enable_grad():
            if self._graph is None:
                w = self.w.clone().requires_grad_(True)
                self._graph = (w, torch.autograd.grad(self._loss(w), w, create_graph=True)[0])
            w, g = self._graph
            back = lambda cols, batched: torch.autograd.grad(g, w, grad_outputs=cols, retain_graph=True,
                                                             is_grads_batched=batched)[0]
            if v.dim() == 1:
                return self.c * back(self.c * v, False)
            cols = self.c[:, None] * v
            if w.device.type == "cpu":
                hv = torch.stack([back(cols[:, j], False) for j in range(cols.shape[1])], dim=1)
            else:
                hv = back(cols.T.contiguous(), True).T
        return self.c[:, None] * hv
