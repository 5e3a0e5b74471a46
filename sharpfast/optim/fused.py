"""SAM's ascent over the parameter list in two fused ops per (device, dtype, scale rule) bucket:
``sam_sq_norm`` (``||T g||^2`` accumulated in float64) and ``sam_perturb_`` (save ``w``, add
``T^2 g s`` in one pass); the restore is ``torch._foreach_copy_``, in place.

The ops read each tensor as a flat buffer: a contiguous one through ``view(-1)``, a dense one in
another layout (channels-last) through its storage, where its gradient has its strides. A tensor
laid out otherwise (overlapping or with gaps: rare for parameters) takes the same formula in
PyTorch ops (:func:`_perturb_one`).
"""
from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import torch

from .. import _ops


class Item(NamedTuple):
    """One parameter of a SAM step: its gradient is ``param.grad``; ``adaptive``: its scale is
    ``|w| + eta`` (else 1)."""

    param: torch.Tensor
    adaptive: bool
    eta: float


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill ``[storage_offset, storage_offset + numel)`` exactly once."""
    expected = 1
    for size, stride in sorted((s, st) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def flat(t: torch.Tensor) -> torch.Tensor | None:
    """``t``'s elements as a 1-D view in memory order, or None where they are not one dense block."""
    if t.is_contiguous():
        return t.view(-1)
    if _dense(t):
        return t.as_strided((t.numel(),), (1,), t.storage_offset())
    return None


def _buckets(items: list[Item]) -> dict:
    """Items the ops take in one call: one device, dtype and scale rule; the rest apart."""
    out: dict = defaultdict(list)
    for it in items:
        out[(it.param.device, it.param.dtype, it.adaptive, it.eta)].append(it)
    return out


def _fusable(it: Item) -> bool:
    p, g = it.param, it.param.grad
    return (_ops.available(p.device) and g.dtype == p.dtype and g.stride() == p.stride()
            and flat(p) is not None)


def sq_norm(items: list[Item], device: torch.device) -> torch.Tensor:
    """``sum ||T g||^2`` over the items (float64, on ``device``)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for (dev, _, adaptive, eta), its in _buckets(items).items():
        fused = [it for it in its if _fusable(it)]
        if fused:
            total += _ops.sam_sq_norm([flat(it.param.grad) for it in fused], [flat(it.param) for it in fused],
                                      adaptive, eta).to(device)
        for it in its:
            if not _fusable(it):
                t = it.param.abs() + eta if adaptive else 1.0
                total += (t * it.param.grad).double().pow(2).sum().to(device)
    return total


def perturb(items: list[Item], saved: dict, s: torch.Tensor) -> None:
    """``saved[p] = w``, ``w += T^2 g s`` for every item (``s``: a 0-dim float64 tensor)."""
    for (dev, _, adaptive, eta), its in _buckets(items).items():
        s_dev = s.to(dev)
        fused = [it for it in its if _fusable(it)]
        if fused:
            _ops.sam_perturb_([flat(it.param) for it in fused], [flat(saved[it.param]) for it in fused],
                              [flat(it.param.grad) for it in fused], adaptive, eta, s_dev)
        for it in its:
            if not _fusable(it):
                _perturb_one(it, saved[it.param], s_dev)


def _perturb_one(it: Item, saved: torch.Tensor, s: torch.Tensor) -> None:
    p = it.param
    saved.copy_(p)
    t = p.abs() + it.eta if it.adaptive else torch.ones_like(p)
    p.add_(((t * t) * p.grad) * s.to(p.dtype))


def restore(params: list[torch.Tensor], saved: dict) -> None:
    """Every perturbed parameter back to its saved value, in place (addresses kept)."""
    if params:
        torch._foreach_copy_(params, [saved[p] for p in params])
