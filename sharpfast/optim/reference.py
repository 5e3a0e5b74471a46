"""SAM's ascent and restore tensor by tensor, as the public code writes them (the ``compat`` paths).

``davda54``: davda54/sam's ``SAM.first_step`` — the two-level norm ``||(||T_i g_i||)_i||`` on the
first parameter's device, ``scale = rho / (norm + 1e-12)``, ``e_i = T_i^2 g_i scale`` with
``T_i = |w_i|`` where the group is adaptive (else ``1.0 * g_i``), the weights restored by copy.
``samsung``: SamsungLabs/ASAM's ``ascent_step`` — ``T = |w| + eta`` for parameters whose name holds
``"weight"`` (else 1), ``g`` multiplied by ``T`` in place before the norm and again after it,
``e = (T (T g)) (rho / (norm + 1e-16))``, the weights restored by subtracting ``e``.

Every expression keeps the public code's operation order, so the weights are theirs bit for bit.
"""
from __future__ import annotations

import torch

DAVDA54_EPS = 1e-12   # davda54/sam: rho / (grad_norm + 1e-12)
SAMSUNG_EPS = 1e-16   # SamsungLabs/ASAM: norm(...) + 1e-16


def davda54_grad_norm(items: list) -> torch.Tensor:
    """``items``: ``(param, adaptive)`` pairs with a gradient, in group and parameter order."""
    shared_device = items[0][0].device   # the public code's "put everything on the same device"
    return torch.norm(torch.stack([((torch.abs(p) if adaptive else 1.0) * p.grad).norm(p=2).to(shared_device)
                                   for p, adaptive in items]), p=2)


def davda54_perturb(groups: list, saved: dict) -> None:
    """``groups``: ``(rho, adaptive, params with a gradient)`` per group; saves each ``w`` in ``saved``."""
    grad_norm = davda54_grad_norm([(p, adaptive) for _, adaptive, ps in groups for p in ps])
    for rho, adaptive, params in groups:
        scale = rho / (grad_norm + DAVDA54_EPS)
        for p in params:
            saved[p].copy_(p)
            e_w = (torch.pow(p, 2) if adaptive else 1.0) * p.grad * scale.to(p)
            p.add_(e_w)


def samsung_perturb(groups: list, saved: dict, eps: dict) -> None:
    """``groups``: ``(rho, eta, [(param, scaled)])`` per group (``scaled``: its name holds "weight");
    keeps each ``e`` in ``eps`` (the restore subtracts it) and ``w`` in ``saved``. The gradients are
    left multiplied by ``T^2``, as the public code leaves them."""
    wgrads = []
    for _, eta, params in groups:
        for p, scaled in params:
            if scaled:
                p.grad.mul_(p.abs().add_(eta))
            wgrads.append(torch.norm(p.grad, p=2))
    wgrad_norm = torch.norm(torch.stack(wgrads), p=2) + SAMSUNG_EPS
    for rho, eta, params in groups:
        for p, scaled in params:
            if scaled:
                p.grad.mul_(p.abs().add_(eta))
            saved[p].copy_(p)
            e = eps[p]
            e.copy_(p.grad)
            e.mul_(rho / wgrad_norm)
            p.add_(e)


def samsung_restore(params: list, eps: dict) -> None:
    for p in params:
        p.sub_(eps[p])
