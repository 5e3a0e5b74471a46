"""RSAM (arXiv 2510.07758) as QiaozheZhang/RSAM's NEWRSAM computes it (utils/sam.py): with
``S = ||g||^2 + 1e-16`` and ``P = sum |g_i|^(2 alpha) + 1e-16``, ``rho_t = sign(1 - alpha) rho P / S^(alpha + 1)``
and ``e = -rho_t g`` (with ``p_i = g_i^2 / ||g||^2``, ``alpha > 1``: ``e = rho (sum p_i^alpha) g / ||g||^2``,
a diagonal proxy for the Rényi sum). The public recipe: ``rho`` (its ``renyi_s``) 0.65, ``alpha`` 1.2.
RSAM is not a reduction of SAM: ``||e||`` grows as ``||g||`` shrinks. Under AMP the gradients are
unscaled inside ``S`` and ``P``.
"""
from __future__ import annotations

import math

import torch

from .sam import SAM

RSAM_EPS = 1e-16   # added to S and to P


class RSAM(SAM):
    def __init__(self, params, base_optimizer, rho: float = 0.65, alpha: float = 1.2, **kwargs):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0 \
                or alpha == 1:
            raise ValueError(f"alpha must be a positive number other than 1 (sign(1 - alpha) = 0 moves nothing), "
                             f"got {alpha!r}")
        if kwargs.get("adaptive") or kwargs.get("compat") is not None:
            raise ValueError("RSAM's ascent is -rho_t g: it takes no adaptive and no compat")
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        self.alpha = float(alpha)

    def _step_sizes(self, groups, plan, device, inverse_scale):
        g = [p.grad for p in plan.params]
        s_sq = plan.sq_norm(device)
        p_sum = torch.stack([x.double().abs().pow(2 * self.alpha).sum().to(device) for x in g]).sum()
        if inverse_scale is not None:   # unscaled: S by 1/scale^2, P by 1/scale^(2 alpha)
            overflow = self._note_overflow(s_sq)
            s_sq, p_sum = s_sq * inverse_scale**2, p_sum * inverse_scale ** (2 * self.alpha)
        ratio = (p_sum + RSAM_EPS) / (s_sq + RSAM_EPS) ** (self.alpha + 1)
        out = []
        for group in groups:
            s = -math.copysign(1.0, 1 - self.alpha) * group["rho"] * ratio
            out.append(s if inverse_scale is None else torch.where(overflow, torch.zeros_like(s), s) * inverse_scale)
        return out
