"""SSAM (Mi et al., NeurIPS 2022), sparse SAM as Mi-Peng/Sparse-Sharpness-Aware-Minimization
computes it (solver/sam.py): ``e = M * rho g / (||g|| + 1e-7)``, the norm over the unmasked ``g``,
``M`` a 0/1 mask over every parameter entry keeping a fraction ``1 - sparsity`` of them.

``mask="fisher"`` (SSAM-F): the mask starts empty (no perturbation) and :meth:`SSAM.update_mask`
keeps the entries of the largest Fisher score, the sum of squared single-example gradients (the
public code: 1024 examples, every 5 epochs). ``mask="dynamic"`` (SSAM-D): a random mask, and
:meth:`SSAM.update_mask(epoch)` drops the live entries of the smallest score (``|g|`` by default) at
the death rate ``drop_rate (1 + cos(pi (epoch - T_start) / (T_end - T_start))) / 2`` and grows as
many dead ones (at random by default). The public defaults: ``rho=0.05``, ``sparsity=0.2``,
``drop_rate=0.5``. ``sparsity=0`` is SAM with ``eps=1e-7``, bit for bit. Both passes stay dense:
the mask saves no arithmetic.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .sam import SAM

SSAM_EPS = 1e-7
MASKS = ("fisher", "dynamic")
SCORES = ("weight", "gradient", "random")


class SSAM(SAM):
    def __init__(self, params, base_optimizer, rho: float = 0.05, sparsity: float = 0.2, mask: str = "dynamic", *,
                 drop_rate: float = 0.5, drop_strategy: str = "gradient", growth_strategy: str = "random",
                 T_start: int = 0, T_end: int = 200, seed: int = 0, **kwargs):
        if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity <= 1.0):
            raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
        if not (isinstance(drop_rate, (int, float)) and 0.0 <= drop_rate <= 1.0):
            raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate!r}")
        for name, v in (("drop_strategy", drop_strategy), ("growth_strategy", growth_strategy)):
            if v not in SCORES:
                raise ValueError(f"{name} must be one of {SCORES}, got {v!r}")
        if not T_end > T_start:
            raise ValueError(f"T_end ({T_end}) must be after T_start ({T_start})")
        if kwargs.get("adaptive") or kwargs.get("compat") is not None:
            raise ValueError("SSAM's ascent is M rho g / (||g|| + 1e-7): it takes no adaptive and no compat")
        kwargs.setdefault("eps", SSAM_EPS)
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        self.sparsity, self.mask_kind = float(sparsity), mask
        self.drop_rate, self.drop_strategy, self.growth_strategy = float(drop_rate), drop_strategy, growth_strategy
        self.T_start, self.T_end = T_start, T_end
        self.generator = torch.Generator().manual_seed(seed)
        self.masks: dict[torch.Tensor, torch.Tensor] = {}
        params = self._parameters()
        if mask == "fisher":
            self.masks = {p: torch.zeros_like(p, dtype=torch.bool) for p in params}
        else:
            scores = torch.rand(sum(p.numel() for p in params), generator=self.generator, dtype=torch.float64)
            self._set_masks(self._top(scores, len(scores) - math.ceil(len(scores) * self.sparsity)))

    @staticmethod
    def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
        keep = torch.zeros(len(scores), dtype=torch.bool)
        keep[torch.topk(scores, k).indices] = True
        return keep

    def _set_masks(self, flat: torch.Tensor) -> None:
        start = 0
        for p in self._parameters():
            self.masks[p] = flat[start:start + p.numel()].reshape(p.shape).to(p.device)
            start += p.numel()

    def density(self) -> float:
        """The fraction of entries the mask keeps (the public code's ``mask_info``)."""
        return sum(int(m.sum()) for m in self.masks.values()) / sum(m.numel() for m in self.masks.values())

    def death_rate(self, epoch: int) -> float:
        return self.drop_rate * (1 + math.cos(math.pi * (epoch - self.T_start) / (self.T_end - self.T_start))) / 2

    @torch.no_grad()
    def update_mask(self, epoch: int | None = None, fisher: dict | Callable[[], dict] | None = None) -> None:
        """SSAM-F: ``fisher`` is ``{parameter: summed squared single-example gradients}`` (or a
        function returning it; :func:`fisher_scores` computes it). SSAM-D: the mask at ``epoch``,
        scored by the gradients the parameters hold now (the public code calls it after the first
        pass)."""
        params = self._parameters()
        if self.mask_kind == "fisher":
            if fisher is None:
                raise ValueError("SSAM-F's update_mask needs fisher= (see sharpfast.optim.ssam.fisher_scores)")
            fisher = fisher() if callable(fisher) else fisher
            scores = torch.cat([fisher[p].detach().double().flatten().cpu() for p in params])
            self._set_masks(self._top(scores, int(len(scores) * (1 - self.sparsity))))
            return
        if epoch is None:
            raise ValueError("SSAM-D's update_mask needs the epoch (its death rate follows a cosine in it)")
        live = torch.cat([self.masks[p].flatten().cpu() for p in params])
        n = len(live)
        rate = self.death_rate(epoch)
        death = torch.cat([self._score(p, self.drop_strategy) for p in params]) + 1e-7
        growth = torch.cat([self._score(p, self.growth_strategy) for p in params]) + 1e-7
        kept = self._top(death * live, int((n - n * self.sparsity) * (1 - rate)))
        grown = self._top(growth * ~live, int(min((n - n * self.sparsity) * rate, n * self.sparsity)))
        self._set_masks(kept | grown)

    def _score(self, p: torch.Tensor, strategy: str) -> torch.Tensor:
        if strategy == "weight":
            return p.detach().abs().double().flatten().cpu()
        if strategy == "gradient":
            if p.grad is None:
                raise ValueError("SSAM-D's gradient score needs the gradients: call update_mask after a backward")
            return p.grad.detach().abs().double().flatten().cpu()
        return torch.rand(p.numel(), generator=self.generator, dtype=torch.float64)

    def _before_perturb(self, params) -> None:
        """e = M (g s), s from the unmasked g's norm: the first-pass gradient is masked in place."""
        for p in params:
            p.grad.mul_(self.masks[p])


def fisher_scores(model: torch.nn.Module, examples, loss_fn: Callable | None = None) -> dict:
    """``{parameter: sum over examples of the squared gradient}``, one example at a time (SSAM-F's
    Fisher information, as the public code computes it with cross-entropy)."""
    loss_fn = torch.nn.functional.cross_entropy if loss_fn is None else loss_fn
    params = [p for p in model.parameters() if p.requires_grad]
    scores = {p: torch.zeros_like(p) for p in params}
    for x, y in examples:
        grads = torch.autograd.grad(loss_fn(model(x.unsqueeze(0)), y.unsqueeze(0)), params, allow_unused=True)
        for p, g in zip(params, grads):
            if g is not None:
                scores[p] += g.detach().square()
    return scores
