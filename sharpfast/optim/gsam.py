"""GSAM (Zhuang et al. 2022, surrogate-gap guided SAM) as juntang-zhuang/GSAM computes it.

After SAM's ascent from the first-pass gradient ``g`` and the second pass's ``g_p`` at ``w + e``,
the step's direction is ``g_p - alpha g_perp``, ``g_perp = g - cos(g, g_p) ||g|| g_p / (||g_p|| + eps)``
the part of ``g`` orthogonal to ``g_p`` (gsam.py ``gradient_decompose``; ``cos`` with ``eps`` in its
denominator). ``alpha = 0`` is SAM, bit for bit. The radius follows the learning rate through
:class:`ProportionScheduler` (gsam/scheduler.py), applied by ``update_rho_t()`` after each
learning-rate step, as the public example does.
"""
from __future__ import annotations

import math

import torch

from .sam import SAM, global_norm


class ProportionScheduler:
    """``rho_t = min_value + (max_value - min_value) (lr - min_lr) / (max_lr - min_lr)``, ``lr`` the
    scheduler's last learning rate (its optimizer's first group's where it has none); ``max_value``
    while ``max_lr == min_lr``."""

    def __init__(self, lr_scheduler, max_lr: float, min_lr: float, max_value: float, min_value: float):
        if not (max_lr > min_lr or (max_lr == min_lr and max_value == min_value)):
            raise ValueError("rho evolves in proportion to lr: max_lr must exceed min_lr (or, for a constant lr, "
                             "max_value must equal min_value)")
        if not max_value >= min_value:
            raise ValueError(f"max_value ({max_value}) must be >= min_value ({min_value})")
        self.lr_scheduler = lr_scheduler
        self.max_lr, self.min_lr, self.max_value, self.min_value = max_lr, min_lr, max_value, min_value

    def step(self) -> float:
        last = getattr(self.lr_scheduler, "_last_lr", None)
        lr = last[0] if last else self.lr_scheduler.optimizer.param_groups[0]["lr"]
        if self.max_lr > self.min_lr:
            return self.min_value + (self.max_value - self.min_value) * (lr - self.min_lr) / (self.max_lr - self.min_lr)
        return self.max_value


class GSAM(SAM):
    """SAM whose step is ``g_p - alpha g_perp`` (see the module). Public example: ``rho=2.0``
    (``adaptive=True``), ``alpha=0.4``; ``rho_scheduler`` (a :class:`ProportionScheduler`) sets ``rho``
    on every ``update_rho_t()``. Other arguments as :class:`SAM`; no gradient accumulation (the
    public code has none: the decomposition needs one first-pass gradient per step)."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, alpha: float = 0.4, adaptive: bool = False, *,
                 rho_scheduler: ProportionScheduler | None = None, **kwargs):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        if kwargs.get("accumulation_steps", 1) != 1:
            raise ValueError("GSAM decomposes one first-pass gradient per step: accumulation_steps must be 1")
        if kwargs.get("compat") is not None:
            raise ValueError("GSAM has no compat path: its public code is matched to rounding, not bit for bit")
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)
        self.alpha, self.rho_scheduler = float(alpha), rho_scheduler
        if rho_scheduler is not None:
            self.update_rho_t()

    def update_rho_t(self) -> float:
        """``rho`` from the scheduler (call it after each learning-rate step); returns it."""
        if self.rho_scheduler is None:
            raise RuntimeError("GSAM was built without a rho_scheduler")
        rho = float(self.rho_scheduler.step())
        for group in self.param_groups:
            group["rho"] = rho
        return rho

    def _before_ascent(self, params: list[torch.Tensor]) -> None:
        self._keep_first_gradients(params)

    def _direction(self) -> None:
        ps = [p for p in self._parameters(with_grad=True) if p in self._first_grads]
        if not ps:
            return
        g_p, g = [p.grad for p in ps], [self._first_grads[p] for p in ps]
        inner = torch.stack([(a.double() * b.double()).sum() for a, b in zip(g, g_p)]).sum()
        norm_p, norm_g = global_norm(g_p), global_norm(g)
        cosine = inner / (norm_p * norm_g + self.eps)
        coefficient = cosine * norm_g / (norm_p + self.eps)
        vertical = torch._foreach_sub(g, torch._foreach_mul(g_p, coefficient.to(g_p[0].dtype)))
        torch._foreach_add_(g_p, vertical, alpha=-self.alpha)
