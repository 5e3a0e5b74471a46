"""The loss and error at many points ``w + x d1 + y d2`` of the weights, K points per forward.

The fast path (:func:`surface`) never writes into the model: each pass evaluates K points by one
vmapped ``torch.func.functional_call`` over the points' stacked tensors (the other parameters and
buffers as they are), and sums each point's ``mean loss * batch size`` and errors over the batches
in float64 (as the public code sums ``loss.item() * batch_size``). The perturbation is formed
before it is added to ``w`` (``w + (x d1 + y d2)`` in the tensors' dtype, the public code's order).

The reference (:func:`surface_reference`) is the public code's loop: write each point into the
model's tensors, evaluate every batch, one point after another; the model is put back bit for bit
(``ModelGuard``-style, in a ``finally``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, vmap

from ..objective import Objective, call_model, unwrap_logits


def _point_tensors(base: dict, dirs: list[dict], coords: torch.Tensor) -> dict:
    """``{name: [K, *shape]}``: ``w + sum_a coords[:, a] d_a`` for the K points of ``coords``."""
    out = {}
    for n, w in base.items():
        shape = (-1,) + (1,) * w.dim()
        step = None
        for a, d in enumerate(dirs):
            term = coords[:, a].to(w.dtype).view(shape) * d[n]
            step = term if step is None else step + term
        out[n] = w.unsqueeze(0) + step
    return out


def surface(model: nn.Module, batches: list, base: dict, dirs: list[dict], coords: torch.Tensor,
            objective: Objective, points_per_pass: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The loss (``[P]``, float64) and error (``[P]`` or None) at ``P`` points, ``coords``: ``[P, A]``.
    One point per pass is written into the model's tensors (a plain forward, the cheapest where
    vmapping gains nothing) and the model put back bit for bit; more are vmapped and write nothing.
    Either way the values stay on the device until the end (no host sync per batch)."""
    x0, y0 = batches[0]   # whether the objective has an error (classification) for these targets
    has_error = objective.error(unwrap_logits(call_model(model, x0)), y0) is not None
    if points_per_pass == 1:
        return _one_point_per_pass(model, batches, base, dirs, coords, objective, has_error)
    losses, errors = [], []   # per chunk: [K, n_batches], kept on the device
    for start in range(0, len(coords), points_per_pass):
        moved = _point_tensors(base, dirs, coords[start:start + points_per_pass])

        def one_point(tensors, x, y):
            f = unwrap_logits(functional_call(model, tensors, (x,)) if not isinstance(x, dict)
                              else functional_call(model, tensors, (), x))
            loss = objective.loss(f, y)
            err = objective.error(f, y)
            return loss, (err if err is not None else torch.zeros((), device=loss.device))

        per_batch = [vmap(one_point, in_dims=(0, None, None))(moved, x, y) for x, y in batches]
        losses.append(torch.stack([loss for loss, _ in per_batch], dim=1))
        errors.append(torch.stack([err for _, err in per_batch], dim=1))
    return _weighted_mean(torch.cat(losses), batches), (_weighted_mean(torch.cat(errors), batches) if has_error
                                                        else None)


def _weighted_mean(per_batch: torch.Tensor, batches: list) -> torch.Tensor:
    """Each point's ``sum_b value_b |b| / N`` in float64 (the public code's ``loss.item() * batch_size``
    sums), from ``[P, n_batches]`` values."""
    sizes = torch.tensor([float(len(y)) for _, y in batches], dtype=torch.float64)
    return (per_batch.detach().double().cpu() @ sizes) / float(sizes.sum())


def _one_point_per_pass(model, batches, base, dirs, coords, objective, has_error):
    """Each point written into the model's tensors (``w + (x d1 + y d2)``, the public order, through
    one reused buffer per tensor), every batch's loss and error kept on the device and summed once
    at the end; the originals put back in a ``finally``."""
    tensors = dict(model.state_dict(keep_vars=True))
    kept = {n: tensors[n].detach().clone() for n in base}
    step = {n: torch.empty_like(t) for n, t in kept.items()}
    losses, errors = [], []
    try:
        dtype = next(iter(kept.values())).dtype
        for at in coords.to(dtype).tolist():   # each coordinate rounded to the tensors' dtype, as in the vmapped path
            for name, w in kept.items():
                torch.mul(dirs[0][name], at[0], out=step[name])
                for a in range(1, len(at)):
                    step[name].add_(dirs[a][name] * at[a])
                torch.add(w, step[name], out=tensors[name].detach())
            for x, y in batches:
                f = unwrap_logits(call_model(model, x))
                losses.append(objective.loss(f, y))
                if has_error:
                    errors.append(objective.error(f, y))
    finally:
        for name, t in kept.items():
            tensors[name].detach().copy_(t)
    per_point = lambda values: _weighted_mean(torch.stack(values).view(len(coords), -1), batches)
    return per_point(losses), (per_point(errors) if has_error else None)


def surface_reference(model: nn.Module, batches: list, base: dict, dirs: list[dict], coords: torch.Tensor,
                      objective: Objective) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The public code's loop: each point written into the model, every batch evaluated."""
    tensors = dict(model.state_dict(keep_vars=True))
    kept = {n: tensors[n].detach().clone() for n in base}
    loss_out = torch.zeros(len(coords), dtype=torch.float64)
    err_out = torch.zeros(len(coords), dtype=torch.float64)
    has_error = True
    try:
        with torch.no_grad():
            for i in range(len(coords)):
                point = _point_tensors(kept, dirs, coords[i:i + 1])   # from the copy: base views the model
                for n, t in point.items():
                    tensors[n].copy_(t[0])
                total = err = 0.0
                count = 0
                for x, y in batches:
                    f = unwrap_logits(call_model(model, x))
                    loss = objective.loss(f, y)
                    e = objective.error(f, y)
                    total += float(loss) * len(y)
                    err += 0.0 if e is None else float(e) * len(y)
                    has_error = has_error and e is not None
                    count += len(y)
                loss_out[i], err_out[i] = total / count, err / count
    finally:
        with torch.no_grad():
            for n, t in kept.items():
                tensors[n].copy_(t)
    return loss_out, (err_out if has_error else None)
