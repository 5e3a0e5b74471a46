"""The directions of a loss landscape, as tomgoldstein/loss-landscape builds them (net_plotter.py),
drawn from Philox instead of the global RNG.

A direction is ``{name: tensor}`` over the model's parameters (``dir_type="weights"``) or its whole
``state_dict`` (``"states"``: BatchNorm's running statistics too). A random one is a standard
normal draw per tensor keyed by ``(seed, axis, name)`` (the same on every device and thread count,
and independent of the other tensors), then normalized against the weights ``w``:

- a tensor with 0 or 1 dimensions (biases, BatchNorm's affine and statistics) gets 0 with
  ``ignore="biasbn"``, else **a copy of w** (neither random nor normalized, as the public code does);
- ``norm="filter"``: each filter (a slice along dim 0) ``d_f * ||w_f|| / (||d_f|| + 1e-10)``;
  ``"layer"``: ``d * ||w|| / ||d||``; ``"weight"``: ``d * w`` (the elementwise adaptive
  direction); ``"dfilter"``: each filter to unit norm (``+ 1e-10``); ``"dlayer"``: each tensor to
  unit norm; ``None``: as drawn.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from .. import _ops
from ..philox import philox_draw

NORMS = ("filter", "layer", "weight", "dfilter", "dlayer", None)
IGNORES = ("biasbn", None)
DIR_TYPES = ("weights", "states")
FILTER_EPS = 1e-10   # the public code's: ||w_f|| / (||d_f|| + 1e-10)


def space(model: nn.Module, dir_type: str) -> dict[str, torch.Tensor]:
    """The tensors a direction spans: the parameters (``weights``) or the floating-point entries of
    the ``state_dict`` (``states``; ``num_batches_tracked`` has no direction: in eval mode it is
    never read)."""
    if dir_type == "weights":
        return {n: p.detach() for n, p in model.named_parameters()}
    return {n: t.detach() for n, t in model.state_dict(keep_vars=True).items() if t.is_floating_point()}


def philox_key(seed: int, axis: int, name: str) -> tuple[int, int, int]:
    """``(seed, stream, sample)`` of a tensor's draw: the axis is the Philox stream, the sample a
    32-bit hash of the name, so a tensor's draw depends on nothing but its name."""
    return seed, axis, int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def draw(seed: int, axis: int, w: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Standard normal tensors shaped like ``w``'s, and their Philox keys."""
    out, keys = {}, {}
    for name, t in w.items():
        key = philox_key(seed, axis, name)
        dtype = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
        if _ops.available(t.device):
            flat = _ops.draw_(torch.empty(t.numel(), dtype=dtype, device=t.device), key[0], key[1], key[2], 0, "normal")
        else:
            flat = philox_draw("normal", key[0], key[1], key[2], 0, t.numel(), dtype=dtype, device=t.device)
        out[name], keys[name] = flat.view(t.shape).to(t.dtype), key
    return out, keys


def normalize(d: torch.Tensor, w: torch.Tensor, norm: str | None, ignore: str | None) -> torch.Tensor:
    """One tensor's direction normalized against its weights (see the module)."""
    if d.dim() <= 1:
        return torch.zeros_like(d) if ignore == "biasbn" else w.detach().clone().to(d.dtype)
    w = w.detach()
    if norm == "filter":
        scale = w.flatten(1).norm(dim=1) / (d.flatten(1).norm(dim=1) + FILTER_EPS)
        return d * scale.view(-1, *[1] * (d.dim() - 1))
    if norm == "layer":
        return d * (w.norm() / d.norm())
    if norm == "weight":
        return d * w
    if norm == "dfilter":
        return d / (d.flatten(1).norm(dim=1) + FILTER_EPS).view(-1, *[1] * (d.dim() - 1))
    if norm == "dlayer":
        return d / d.norm()
    return d.clone()


def normalized(raw: dict, w: dict, norm: str | None, ignore: str | None) -> dict:
    return {n: normalize(raw[n], w[n], norm, ignore) for n in w}


def check(direction, w: dict, what: str) -> dict[str, torch.Tensor]:
    """A user's direction: a ``{name: tensor}`` naming exactly the tensors of ``w``, each of its shape."""
    if not isinstance(direction, dict):
        raise TypeError(f"{what} must be a dict {{parameter name: tensor}}, got {type(direction).__name__}")
    unknown, missing = sorted(set(direction) - set(w)), sorted(set(w) - set(direction))
    if unknown:
        raise ValueError(f"{what} names {unknown[0]!r}, which the model has no tensor of (known: "
                         f"{', '.join(list(w)[:6])}{', ...' if len(w) > 6 else ''})")
    if missing:
        raise ValueError(f"{what} has no tensor for {missing[0]!r} (give every tensor; zeros where it should not move)")
    out = {}
    for n, t in w.items():
        d = direction[n]
        if not isinstance(d, torch.Tensor):
            raise TypeError(f"{what}[{n!r}] must be a tensor, got {type(d).__name__}")
        if tuple(d.shape) != tuple(t.shape):
            raise ValueError(f"{what}[{n!r}] has shape {tuple(d.shape)}, but the tensor has shape {tuple(t.shape)}")
        if not torch.isfinite(d).all():
            raise ValueError(f"{what}[{n!r}] has non-finite entries")
        out[n] = d.detach().to(device=t.device, dtype=t.dtype)
    return out


def target(w: dict, w2: dict) -> dict:
    """``w2 - w``, unnormalized (the interpolation's direction)."""
    return {n: w2[n] - w[n] for n in w}


def cosine(d1: dict, d2: dict) -> float:
    dot = sum(float((d1[n].double() * d2[n].double()).sum()) for n in d1)
    n1 = sum(float(d1[n].double().pow(2).sum()) for n in d1) ** 0.5
    n2 = sum(float(d2[n].double().pow(2).sum()) for n in d2) ** 0.5
    return dot / (n1 * n2) if n1 > 0 and n2 > 0 else float("nan")
