"""SAM's ascent over the parameter list in two fused ops per bucket of parameters that share a
group, device, dtype and scale rule: ``sam_sq_norm`` (``||T g||^2`` accumulated in float64) and
``sam_perturb_`` (save ``w``, add ``T^2 g s`` in one pass); the restore is ``torch._foreach_copy_``,
in place.

The ops read each tensor as a flat buffer: a contiguous one through ``view(-1)``, a dense one in
another layout (channels-last) through its storage, where its gradient has its strides. A tensor
laid out otherwise (overlapping or with gaps: rare for parameters), or whose gradient is, takes the
same formula in PyTorch ops. A :class:`Plan` sorts the parameters once for as long as the same ones
have gradients, so a step costs the ops and little else.
"""
from __future__ import annotations

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


class _Bucket(NamedTuple):
    group: int
    adaptive: bool
    eta: float
    params: list            # the parameters
    flat_params: list       # their flat views
    flat_saved: list        # their saved copies' flat views


class Plan:
    """The fused calls of one set of parameters with gradients (``groups``: the items of each
    parameter group), and the parameters the ops cannot read."""

    def __init__(self, groups: list[list[Item]], saved: dict):
        by_key: dict = {}
        self.others: list[tuple[int, Item]] = []
        for gi, items in enumerate(groups):
            for it in items:
                p = it.param
                view = flat(p)
                if view is None or not _ops.available(p.device):
                    self.others.append((gi, it))
                    continue
                key = (gi, p.device, p.dtype, it.adaptive, it.eta)
                b = by_key.setdefault(key, _Bucket(gi, it.adaptive, it.eta, [], [], []))
                b.params.append(p)
                b.flat_params.append(view)
                b.flat_saved.append(flat(saved[p]))
        self.buckets = list(by_key.values())
        self.params = [it.param for items in groups for it in items]
        self._grads: list = []

    def take_gradients(self) -> None:
        """Read this step's gradients (each bucket's flat views, None where one is laid out
        otherwise than its parameter): before :meth:`sq_norm` and :meth:`perturb`."""
        self._grads = [self._flat_grads(b.params) for b in self.buckets]

    @staticmethod
    def _flat_grads(params: list) -> list | None:
        out = []
        for p in params:
            g = p.grad
            if g.dtype != p.dtype or g.stride() != p.stride():
                return None
            out.append(g.view(-1) if g.is_contiguous() else g.as_strided((g.numel(),), (1,), g.storage_offset()))
        return out

    def sq_norm(self, device: torch.device) -> torch.Tensor:
        """``sum ||T g||^2`` over every parameter (float64, on ``device``)."""
        parts = []
        for b, grads in zip(self.buckets, self._grads):
            if grads is None:
                parts += [_sq_norm_one(Item(p, b.adaptive, b.eta)).to(device) for p in b.params]
            else:
                parts.append(_ops.sam_sq_norm(grads, b.flat_params, b.adaptive, b.eta).to(device))
        parts += [_sq_norm_one(it).to(device) for _, it in self.others]
        return torch.stack(parts).sum() if len(parts) > 1 else parts[0]

    def perturb(self, steps: list[torch.Tensor], saved: dict) -> None:
        """``saved = w``, ``w += T^2 g s`` for every parameter, ``s = steps[its group]``."""
        for b, grads in zip(self.buckets, self._grads):
            s = steps[b.group].to(b.params[0].device)
            if grads is None:
                for p in b.params:
                    _perturb_one(Item(p, b.adaptive, b.eta), saved[p], s)
            else:
                _ops.sam_perturb_(b.flat_params, b.flat_saved, grads, b.adaptive, b.eta, s)
        for gi, it in self.others:
            _perturb_one(it, saved[it.param], steps[gi].to(it.param.device))


def _sq_norm_one(it: Item) -> torch.Tensor:
    t = it.param.abs() + it.eta if it.adaptive else 1.0
    return (t * it.param.grad).double().pow(2).sum()


def _perturb_one(it: Item, saved: torch.Tensor, s: torch.Tensor) -> None:
    p = it.param
    saved.copy_(p)
    t = p.abs() + it.eta if it.adaptive else torch.ones_like(p)
    p.add_(((t * t) * p.grad) * s.to(p.dtype))


def restore(params: list[torch.Tensor], saved: dict) -> None:
    """Every perturbed parameter back to its saved value, in place (addresses kept)."""
    if params:
        torch._foreach_copy_(params, [saved[p] for p in params])
