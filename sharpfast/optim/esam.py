"""ESAM (Du et al., ICLR 2022) as dydjw9/Efficient_SAM computes it (utils/Esam.py), as a step that
runs the training passes itself, since its data selection needs the per-example losses:

- stochastic weight perturbation: after the restore each parameter tensor sits out the next first
  backward with probability ``1 - beta`` (``requires_grad=False``, back on in ``first_step``), and
  the ascent is ``e = (rho / beta) T^2 g_kept / (||T g_kept|| + 1e-7)``;
- sharpness-sensitive data selection: the per-example loss increase at ``w + e`` over ``w`` ranks the
  batch and the second pass is the mean loss of the examples above the ``int(gamma B)``-th largest
  (``gamma >= 0.99``: all of them, and no extra forward).

The public defaults: ``rho=0.05``, ``beta=gamma=1``; its scripts use ``beta`` 0.5-0.6, ``gamma`` 0.5.
``beta = gamma = 1`` is SAM with ``eps=1e-7``, bit for bit. The public code draws the sitting-out
tensors with Python's ``random``; here a seeded ``torch.Generator`` draws them.
"""
from __future__ import annotations

from typing import Callable

import torch

from .sam import SAM

ESAM_EPS = 1e-7
ALL_EXAMPLES = 0.99   # gamma at or above it keeps the whole batch (the public code's cut)


class ESAM(SAM):
    def __init__(self, params, base_optimizer, rho: float = 0.05, beta: float = 1.0, gamma: float = 1.0,
                 adaptive: bool = False, *, seed: int = 0, **kwargs):
        for name, v in (("beta", beta), ("gamma", gamma)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {v!r}")
        if kwargs.get("compat") is not None or kwargs.get("accumulation_steps", 1) != 1:
            raise ValueError("ESAM runs its own passes: it takes no compat and no accumulation_steps")
        kwargs.setdefault("eps", ESAM_EPS)
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)
        self.beta, self.gamma = float(beta), float(gamma)
        self.generator = torch.Generator().manual_seed(seed)

    def _step_sizes(self, groups, plan, device, inverse_scale):
        return [s / self.beta for s in super()._step_sizes(groups, plan, device, inverse_scale)]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, scaler=None) -> None:
        super().first_step(zero_grad, scaler)
        for p in self._parameters():
            p.requires_grad_(True)   # the tensors that sat out the first pass take part in the second

    def step(self, model: torch.nn.Module, inputs, targets, loss_fn: Callable) -> torch.Tensor:
        """One ESAM step on a batch. ``loss_fn(outputs, targets)`` returns the per-example losses
        (``reduction="none"``). Returns those of the first pass."""
        with torch.enable_grad():
            before = loss_fn(model(inputs), targets)
            before.mean().backward()
        self.first_step(zero_grad=True)
        try:
            if self.gamma >= ALL_EXAMPLES:
                keep = slice(None)
            else:
                with torch.no_grad():
                    sharpness = loss_fn(model(inputs), targets) - before.detach()
                cutoff = torch.topk(sharpness, int(len(targets) * self.gamma)).values[-1]
                keep = sharpness > cutoff
            with torch.enable_grad():
                loss_fn(model(inputs[keep]), targets[keep]).mean().backward()
        except BaseException:
            self._restore()
            raise
        self.second_step(zero_grad=True)
        if self.beta < 1:
            draws = torch.rand(len(self._parameters()), generator=self.generator)
            for p, u in zip(self._parameters(), draws.tolist()):
                if u > self.beta:
                    p.requires_grad_(False)
        return before.detach()
