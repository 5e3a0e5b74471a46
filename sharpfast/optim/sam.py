"""Sharpness-aware minimization (Foret et al. 2021) and adaptive SAM (Kwon et al. 2021), drop-ins
for davda54/sam's ``SAM`` and SamsungLabs/ASAM's ``ASAM``.

One step, given the gradient ``g`` at ``w`` (the caller's first forward and backward):
``first_step`` moves to ``w + e``, ``e = rho T^2 g / (||T g|| + eps)`` with ``T = |w| + eta`` where
adaptive (else 1), and ``second_step`` puts ``w`` back and lets the base optimizer step with the
gradient taken at ``w + e``. The |w|-scaled ascent is the scale rule the sharpness measures use
(``adaptive``, ``adaptive_eta``).

``compat=None`` (the default) runs the fused ops (:mod:`.fused`): the norm accumulated in float64,
``w`` saved and ``e`` added in one pass, the restore an in-place copy. ``compat="davda54"`` /
``"samsung"`` run the public code's arithmetic tensor by tensor (:mod:`.reference`), which gives its
weights bit for bit.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import nn

from . import fused, reference

COMPATS = (None, "davda54", "samsung")
PERTURBATIONS = ("replica", "global")


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``||(t_1, t_2, ...)||`` in float64 (GSAM's and LookSAM's decompositions)."""
    return torch.stack([t.double().norm() for t in tensors]).norm()


def _check_radius(rho) -> float:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 0:
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
    return float(rho)


class SAM(torch.optim.Optimizer):
    """SAM around a base optimizer, as davda54/sam builds it: ``SAM(params, torch.optim.SGD, rho=0.05,
    adaptive=False, lr=0.1, momentum=0.9)``; the base optimizer is built on the same ``param_groups``.

    Args:
        params: parameters or parameter groups (a group may set its own ``rho``, ``adaptive``, ``eta``).
        base_optimizer: the optimizer class that takes the step at ``w`` with the gradient at ``w + e``.
        rho: the ascent's radius (``0``: the base optimizer's step, bit for bit).
        adaptive: scale the ascent by ``T = |w| + eta`` (ASAM's ascent; davda54's ``adaptive``).
        compat: ``"davda54"`` for davda54/sam's arithmetic bit for bit (``eta`` must be 0);
            ``"samsung"`` for SamsungLabs/ASAM's ``SAM`` class (its restore subtracts ``e``).
        eta: added to ``|w|`` where adaptive.
        eps: added to the norm (None: 1e-12 as davda54/sam; 1e-16 with ``compat="samsung"``).
        model: the model, to keep the BatchNorm running statistics of the first pass only (as the
            original JAX code keeps them; the second pass's update is undone in ``second_step``).
            Without it both passes update them, as in davda54/sam.
        accumulation_steps: micro-batches per step, each with its own perturbation (m-SAM, as
            tml-epfl's understanding-sam does): each ``first_step``/``second_step`` pair is one
            micro-batch, and every ``accumulation_steps``-th ``second_step`` steps the base optimizer
            with the sum of their second-pass gradients (scale the loss by 1/K as for any
            accumulation). One perturbation for all micro-batches ("global") needs nothing here:
            accumulate both passes' gradients as usual around one pair of steps.
        perturbation: under DistributedDataParallel (``model=`` the DDP module), ``"replica"``: each
            replica perturbs with its own gradient (Foret et al.; m = the per-replica batch), the
            first backward run inside :meth:`first_pass` (``no_sync``); ``"global"``: one
            perturbation from the all-reduced gradient (:meth:`first_pass` syncs as usual).
        **base_kwargs: the base optimizer's arguments (``lr``, ``momentum``, ``weight_decay``, ...).

    ``state_dict()`` is the base optimizer's (its momentum or moments; no copy of the weights), so
    a save and load continues exactly where an uninterrupted run would be.
    """

    _scales_by_name = False   # ASAM: only parameters whose name holds "weight" are scaled
    needs_second_pass = True  # whether the step first_step began needs the second pass (LookSAM: not always)

    def __init__(self, params, base_optimizer: Callable[..., torch.optim.Optimizer], rho: float = 0.05,
                 adaptive: bool = False, *, compat: str | None = None, eta: float = 0.0,
                 eps: float | None = None, model: nn.Module | None = None, accumulation_steps: int = 1,
                 perturbation: str = "replica", **base_kwargs):
        if compat not in COMPATS:
            raise ValueError(f"compat must be one of {COMPATS}, got {compat!r}")
        rho = _check_radius(rho)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        public_eps = reference.SAMSUNG_EPS if compat == "samsung" else reference.DAVDA54_EPS
        eps = public_eps if eps is None else eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        if compat is not None and eps != public_eps:
            raise ValueError(f"compat={compat!r} is the public code's arithmetic: its eps is {public_eps:g}")
        if compat == "davda54" and eta != 0:
            raise ValueError("compat='davda54' is davda54/sam's arithmetic: it scales by |w|, eta must be 0")
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer class (e.g. torch.optim.SGD), "
                            f"got {base_optimizer!r}")
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be a positive integer, got {accumulation_steps!r}")
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        super().__init__(params, dict(rho=rho, adaptive=bool(adaptive), eta=float(eta), **base_kwargs))
        for group in self.param_groups:
            _check_radius(group["rho"])
        self.compat, self.eps, self.model = compat, float(eps), model
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.state = self.base_optimizer.state   # one state, the base optimizer's: state_dict() carries it
        self._saved: dict[torch.Tensor, torch.Tensor] = {}   # w before the ascent: one copy, reused
        self._ascent: dict[torch.Tensor, torch.Tensor] = {}  # compat="samsung": e, for its restore
        self._perturbed: list[torch.Tensor] | None = None    # between first_step and second_step
        self._bn_saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.accumulation_steps = accumulation_steps
        self.perturbation = perturbation
        self._micro = 0                                        # micro-batches of this step so far
        self._accumulated: dict[torch.Tensor, torch.Tensor] = {}   # their second-pass gradients
        self._found_inf: torch.Tensor | None = None            # a first pass overflowed (AMP)
        self._first_grads: dict[torch.Tensor, torch.Tensor] = {}   # GSAM, LookSAM: g at w
        self._key: tuple | None = None                          # the parameters (and storage) of the last step
        self._plan: fused.Plan | None = None                    # the fused calls for them

    # -- the two steps ------------------------------------------------------------------------
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, scaler: torch.amp.GradScaler | None = None) -> None:
        """Move every parameter with a gradient to ``w + e``. With AMP, pass the ``GradScaler`` whose
        scaled loss gave the gradients: they are unscaled inside the norm, and a non-finite one
        makes ``e = 0`` and the whole step skipped (``second_step``)."""
        if self._perturbed is not None:
            raise RuntimeError("first_step() called twice: second_step() puts the weights back in between")
        groups = [(group, [p for p in group["params"] if p.grad is not None]) for group in self.param_groups]
        params = [p for _, ps in groups for p in ps]
        # the same parameters where they lay last step: the saved copies and the fused calls stand;
        # else (another set, rebound .data, a model moved or converted) they are made again
        key = (tuple((id(p), p.data_ptr(), p.stride()) for p in params),
               tuple((g["adaptive"], g["eta"]) for g, _ in groups))
        if key != self._key:
            for p in params:
                kept = self._saved.get(p)
                if kept is None or (kept.device, kept.dtype, kept.shape, kept.stride()) != (p.device, p.dtype,
                                                                                           p.shape, p.stride()):
                    self._saved[p] = torch.empty_like(p)
            self._key, self._plan = key, None
        self._keep_batchnorm_statistics()
        self._before_ascent(params)
        if params:
            self._ascend(groups, self._inverse_scale(scaler))
        self._perturbed = params
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, scaler: torch.amp.GradScaler | None = None,
                    max_grad_norm: float | None = None) -> None:
        """Put back every parameter ``first_step`` moved (also one without a gradient now), then
        take the base optimizer's step with the gradient at ``w + e`` (with ``accumulation_steps``,
        on the last micro-batch, with their sum). ``max_grad_norm`` clips it first. With
        ``scaler``: ``unscale_``, clip, ``scaler.step`` (skipped where a pass overflowed) and
        ``scaler.update()``, the whole AMP protocol."""
        self._restore()
        self._micro += 1
        if self._micro < self.accumulation_steps:
            self._accumulate()
            return
        self._micro = 0
        if self.accumulation_steps > 1:
            self._accumulate(final=True)
        self._direction()
        self._take_step(zero_grad, scaler, max_grad_norm)

    def _parameters(self, with_grad: bool = False) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if not with_grad or p.grad is not None]

    def _before_ascent(self, params: list[torch.Tensor]) -> None:
        """What a variant keeps of the first pass (SAM: nothing)."""

    def _before_perturb(self, params: list[torch.Tensor]) -> None:
        """What a variant does to the first-pass gradients between the norm and the ascent (SSAM: its mask)."""

    def _direction(self) -> None:
        """The gradient the base optimizer steps with, from the second pass's (SAM: as it is)."""

    def _keep_first_gradients(self, params: list[torch.Tensor]) -> None:
        """A copy of the first pass's gradients (GSAM, LookSAM), one buffer per parameter, reused."""
        for p in params:
            if p not in self._first_grads:
                self._first_grads[p] = torch.empty_like(p)
        if params:
            torch._foreach_copy_([self._first_grads[p] for p in params], [p.grad for p in params])

    def _take_step(self, zero_grad: bool, scaler: torch.amp.GradScaler | None, max_grad_norm: float | None) -> None:
        if scaler is not None and scaler.is_enabled():
            self._skip_if_overflowed()
            scaler.unscale_(self.base_optimizer)
            self._clip(max_grad_norm)
            scaler.step(self.base_optimizer)
            scaler.update()
        else:
            self._clip(max_grad_norm)
            self.base_optimizer.step()
        self._found_inf = None
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """``first_step(zero_grad=True)``, ``closure()`` (a full forward and backward at ``w + e``),
        ``second_step()``; the caller has done the first forward and backward. Returns the closure's
        loss (None where ``first_step`` took the whole step). If the closure raises, the weights are
        put back before the exception propagates."""
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure that does a full forward and backward pass")
        self.first_step(zero_grad=True)
        if not self.needs_second_pass:   # first_step took the whole step
            return None
        try:
            with torch.enable_grad():
                loss = closure()
        except BaseException:
            self._restore()
            raise
        self.second_step()
        return loss

    def first_pass(self):
        """The context of the first backward: ``model.no_sync()`` for a DDP model with
        ``perturbation="replica"`` (each replica's own gradient), else nothing."""
        if self.perturbation == "replica" and isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    # -- the ascent and the restore -----------------------------------------------------------
    def _scaled(self, group: dict) -> list[bool]:
        """Whether each parameter of ``group`` is scaled by ``|w| + eta``."""
        if not group["adaptive"]:
            return [False] * len(group["params"])
        if not self._scales_by_name:
            return [True] * len(group["params"])
        names = group.get("param_names")
        if names is None:
            raise ValueError(f"{type(self).__name__} scales the parameters whose name holds 'weight' "
                             "(SamsungLabs/ASAM): pass model.named_parameters()")
        return ["weight" in n for n in names]

    def _inverse_scale(self, scaler: torch.amp.GradScaler | None) -> torch.Tensor | None:
        """1 / the GradScaler's scale, on its device (no host sync), or None without AMP."""
        if scaler is None or not scaler.is_enabled():
            return None
        if self.compat is not None:
            raise ValueError(f"compat={self.compat!r} is the public code's arithmetic, which has no GradScaler "
                             "protocol; use compat=None with AMP")
        scale = scaler._scale   # the tensor GradScaler.unscale_ divides by (get_scale() would sync)
        if scale is None:
            raise RuntimeError("the GradScaler has no scale yet: backward scaler.scale(loss) before first_step")
        return scale.double().reciprocal()

    def _ascend(self, groups: list, inverse_scale: torch.Tensor | None) -> None:
        if self.compat == "davda54":
            reference.davda54_perturb([(g["rho"], g["adaptive"], ps) for g, ps in groups], self._saved)
            return
        if self.compat == "samsung":
            flags = [dict(zip(g["params"], self._scaled(g))) for g, _ in groups]
            for _, ps in groups:
                for p in ps:
                    if p not in self._ascent:
                        self._ascent[p] = torch.empty_like(p)
            reference.samsung_perturb([(g["rho"], g["eta"], [(p, f[p]) for p in ps])
                                       for (g, ps), f in zip(groups, flags)], self._saved, self._ascent)
            return
        if self._plan is None:   # sorted into the ops' calls once per set of parameters (first_step's key)
            flags = [dict(zip(g["params"], self._scaled(g))) for g, _ in groups]
            items = [[fused.Item(p, f[p], g["eta"]) for p in ps] for (g, ps), f in zip(groups, flags)]
            self._plan = fused.Plan(items, self._saved)
        plan = self._plan
        plan.take_gradients()
        device = self.param_groups[0]["params"][0].device   # as davda54/sam: the first parameter's
        inverse_scale = None if inverse_scale is None else inverse_scale.to(device)
        steps = self._step_sizes([g for g, _ in groups], plan, device, inverse_scale)
        self._before_perturb(plan.params)
        plan.perturb(steps, self._saved)

    def _step_sizes(self, groups: list[dict], plan: fused.Plan, device: torch.device,
                    inverse_scale: torch.Tensor | None) -> list[torch.Tensor]:
        """Each group's ``s`` in ``e = T^2 g s``: ``rho / (||T g|| + eps)``. With AMP the gradients
        are the scaled ones: their norm is unscaled here, ``s`` takes the inverse scale, and an
        overflow gives ``e = 0`` (and a skipped step)."""
        norm = plan.sq_norm(device).sqrt()
        if inverse_scale is not None:
            overflow = self._note_overflow(norm)
            norm = norm * inverse_scale
        out = []
        for group in groups:
            s = group["rho"] / (norm + self.eps)
            out.append(s if inverse_scale is None else torch.where(overflow, torch.zeros_like(s), s) * inverse_scale)
        return out

    def _note_overflow(self, value: torch.Tensor) -> torch.Tensor:
        overflow = ~torch.isfinite(value)
        self._found_inf = overflow if self._found_inf is None else self._found_inf | overflow
        return overflow

    def _skip_if_overflowed(self) -> None:
        """Where a first pass overflowed, an inf in one gradient makes GradScaler skip the step
        and lower its scale, as for an overflow in the second pass (no host sync here)."""
        if self._found_inf is None:
            return
        p = next(iter(self._parameters(with_grad=True)), None)
        if p is not None:
            first = p.grad[(0,) * p.grad.dim()]
            first.copy_(torch.where(self._found_inf.to(first.device), torch.full_like(first, float("inf")), first))

    def _accumulate(self, final: bool = False) -> None:
        """m-SAM: the micro-batch's second-pass gradients are added to the step's sum (and taken
        off the parameters, for the next micro-batch's first pass); on the last one the sum is
        the gradient the base optimizer steps with."""
        params = self._parameters(with_grad=True)
        for p in params:
            if p not in self._accumulated:
                self._accumulated[p] = torch.zeros_like(p)
        if params:
            torch._foreach_add_([self._accumulated[p] for p in params], [p.grad for p in params])
        if not final:
            for p in params:
                p.grad = None
            return
        for p, total in self._accumulated.items():
            if p.grad is None:
                p.grad = total.clone()
            else:
                p.grad.copy_(total)
            total.zero_()

    def _clip(self, max_grad_norm: float | None) -> None:
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self._parameters(), max_grad_norm)

    def _restore(self) -> None:
        if self._perturbed is None:
            raise RuntimeError("second_step() without first_step(): no weights to put back")
        with torch.no_grad():
            if self.compat == "samsung":
                reference.samsung_restore(self._perturbed, self._ascent)
            else:
                fused.restore(self._perturbed, self._saved)
            for saved, buf in self._bn_saved:
                buf.copy_(saved)
        self._perturbed = None

    def _keep_batchnorm_statistics(self) -> None:
        """With a model: its BatchNorm buffers now (after the first pass), put back in ``_restore``."""
        if self.model is None:
            return
        if not self._bn_saved:
            self._bn_saved = [(buf.clone(), buf) for m in self.model.modules()
                              if isinstance(m, nn.modules.batchnorm._BatchNorm) for buf in m.buffers()]
        for saved, buf in self._bn_saved:
            saved.copy_(buf)

    # -- checkpoints --------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state


class ASAM(SAM):
    """Adaptive SAM as SamsungLabs/ASAM computes it: ``T = |w| + eta`` on the parameters whose
    name holds ``"weight"`` (pass ``model.named_parameters()``), 1 on the others (biases); ``rho=0.5``,
    ``eta=0.01``, ``eps=1e-16`` added to the norm. ``compat="samsung"`` gives its weights bit for bit
    (its restore subtracts ``e``); the default restores by copy."""

    _scales_by_name = True

    def __init__(self, params, base_optimizer, rho: float = 0.5, eta: float = 0.01, *, compat: str | None = None,
                 eps: float = reference.SAMSUNG_EPS, model: nn.Module | None = None, **base_kwargs):
        if compat == "davda54":
            raise ValueError("ASAM's compat is 'samsung' (davda54/sam's adaptive SAM is SAM(adaptive=True, "
                             "compat='davda54'))")
        super().__init__(params, base_optimizer, rho=rho, adaptive=True, compat=compat, eta=eta, eps=eps, model=model,
                         **base_kwargs)
