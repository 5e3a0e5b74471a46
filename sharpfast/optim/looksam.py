"""LookSAM (Liu et al., CVPR 2022): a full SAM step every ``k`` steps, one pass in between.

On a full step the second pass's gradient ``g_s`` is split against the first pass's ``g``: the part
orthogonal to ``g``, ``g_v = g_s - (<g, g_s> / ||g||^2) g`` (``||g_s|| cos(g, g_s) g / ||g||`` taken
off), is kept. The steps in between take one pass and step with ``g + alpha (||g|| / ||g_v||) g_v``.
No official code is public; the defaults (``rho=0.1``, ``alpha=0.7``, global norms) are those of
Leminhbinh0209/LookSAM, ``k=5`` the paper's. ``k=1`` is SAM, bit for bit.
"""
from __future__ import annotations

import torch

from .sam import SAM, global_norm


class LookSAM(SAM):
    """SAM every ``k``-th step, the reused direction ``g_v`` in between. ``needs_second_pass`` says
    whether the step ``first_step`` began needs the second forward and backward (and ``second_step``);
    on the others ``first_step`` has taken the whole step. ``step(closure)`` does either."""

    def __init__(self, params, base_optimizer, rho: float = 0.1, k: int = 5, alpha: float = 0.7, **kwargs):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if kwargs.get("accumulation_steps", 1) != 1 or kwargs.get("compat") is not None:
            raise ValueError("LookSAM takes no accumulation_steps and no compat (it has no public code)")
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        self.k, self.alpha = k, float(alpha)
        self.needs_second_pass = True
        self._t = 0
        self._g_v: dict[torch.Tensor, torch.Tensor] = {}

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, scaler: torch.amp.GradScaler | None = None,
                   max_grad_norm: float | None = None) -> None:
        self.needs_second_pass = self._t % self.k == 0 or not self._g_v
        if self.needs_second_pass:
            super().first_step(zero_grad, scaler)
            return
        ps = [p for p in self._parameters(with_grad=True) if p in self._g_v]
        g, g_v = [p.grad for p in ps], [self._g_v[p] for p in ps]
        ratio = (global_norm(g) / global_norm(g_v)).to(g[0].dtype)
        torch._foreach_add_(g, torch._foreach_mul(g_v, ratio), alpha=self.alpha)
        self._t += 1
        self._take_step(zero_grad, scaler, max_grad_norm)

    def _before_ascent(self, params: list[torch.Tensor]) -> None:
        self._keep_first_gradients(params)

    def _direction(self) -> None:
        self._t += 1
        ps = [p for p in self._parameters(with_grad=True) if p in self._first_grads]
        if not ps:
            return
        g, g_s = [self._first_grads[p] for p in ps], [p.grad for p in ps]
        inner = torch.stack([(a.double() * b.double()).sum() for a, b in zip(g, g_s)]).sum()
        coefficient = (inner / global_norm(g) ** 2).to(g[0].dtype)
        for p, v in zip(ps, torch._foreach_sub(g_s, torch._foreach_mul(g, coefficient))):
            self._g_v[p] = v
