"""Which parameters are perturbed, their scale vector ``c``, and the guard that restores a model.

The perturbed parameters are the floating-point parameters that require grad, in
``named_parameters()`` order, each counted once even when tied. Their concatenation defines
the global element index used by the counter-based sampler (``sharpfast.philox``), so every
backend draws the same noise for the same coordinate.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class ScaleSpec:
    """How the per-coordinate scale ``c`` is chosen (DESIGN.md §1).

    ``adaptive``: ``c = |w| + eta`` (Kwon et al. 2021; ``eta > 0`` is ASAM's variant), else ``c = 1``.
    ``weights_only``: only parameters with two or more dimensions (weight matrices and kernels)
    are adaptive; biases and normalization parameters get ``c = 1``.
    ``custom``: ``{name: tensor}`` overriding ``c`` for those parameters; ``c = 0`` freezes a
    coordinate (never perturbed, never divided by).
    """

    adaptive: bool = True
    eta: float = 0.0
    weights_only: bool = False
    custom: Mapping[str, torch.Tensor] | None = None

    def is_adaptive_for(self, w: torch.Tensor) -> bool:
        """Whether a parameter without a custom scale gets ``|w| + eta`` (else 1)."""
        return self.adaptive and (w.dim() >= 2 or not self.weights_only)

    def scale_for(self, name: str, w: torch.Tensor) -> torch.Tensor:
        if self.custom is not None and name in self.custom:
            return self.custom[name].detach().to(device=w.device, dtype=w.dtype)
        if self.is_adaptive_for(w):
            return w.detach().abs() + self.eta
        return torch.ones_like(w)

    def uniform_rule(self, params: "ParamSet") -> tuple[bool, float] | None:
        """``(adaptive, eta)`` when one rule gives every parameter its scale (``|w| + eta``
        everywhere, or 1 everywhere), so that ``c`` can be derived from ``w`` where it is needed
        instead of stored; None for custom scales and for weights-only mixes."""
        if self.custom and any(name in self.custom for name in params.names):
            return None
        adaptive = [self.is_adaptive_for(p) for p in params.tensors]
        if all(adaptive):
            return True, self.eta
        if not any(adaptive):
            return False, 0.0
        return None

    def is_identity(self, params: "ParamSet") -> bool:
        """True when ``c = 1`` for every coordinate (the l2 projection is then a rescaling)."""
        return self.uniform_rule(params) == (False, 0.0)


class ParamSet:
    """The trainable floating-point parameters of a model, deduplicated, in a fixed order, and
    ``scaling``, how their scale ``c`` is chosen (set by ``Settings.bind``)."""

    def __init__(self, model: nn.Module, scaling: ScaleSpec | None = None):
        self.scaling = scaling or ScaleSpec()
        named = [(n, p) for n, p in model.named_parameters()  # remove_duplicate=True: tied once
                 if p.requires_grad and p.is_floating_point()]
        self.names = [n for n, _ in named]
        self.tensors = [p for _, p in named]
        self.numels = [p.numel() for p in self.tensors]
        self.offsets = [sum(self.numels[:i]) for i in range(len(self.numels))]
        self.numel = sum(self.numels)
        self._unused: set[int] = set()   # found by check_gradients not to change the loss

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat vector shaped like the parameters."""
        return [chunk.view_as(p) for chunk, p in zip(flat.split(self.numels), self.tensors)]

    def scales(self) -> list[torch.Tensor]:
        """``c`` for every parameter, as a tensor shaped like it."""
        return [self.scaling.scale_for(n, p) for n, p in zip(self.names, self.tensors)]

    def uniform_rule(self) -> tuple[bool, float] | None:
        """See :meth:`ScaleSpec.uniform_rule`."""
        return self.scaling.uniform_rule(self)

    @functools.cached_property
    def largest_scale(self) -> float:
        """``max c`` over every coordinate, without forming ``c`` (a pass over the weights, once a call)."""
        custom = self.scaling.custom or {}
        peaks = []
        for name, w in zip(self.names, self.tensors):
            if w.numel() == 0:
                continue
            if name in custom:
                peaks.append(custom[name].detach().abs().max().to(w.device, torch.float64))
            elif self.scaling.is_adaptive_for(w):
                low, high = torch.aminmax(w.detach())
                peaks.append(torch.maximum(-low, high).double() + self.scaling.eta)
            else:
                peaks.append(torch.ones((), dtype=torch.float64, device=w.device))
        return float(torch.stack(peaks).max()) if peaks else 0.0

    def check_gradients(self, received: Sequence[bool], loss_at: Callable[[], torch.Tensor]) -> None:
        """Raise ``ValueError`` naming the parameters that receive no gradient (``received[i]`` False)
        although moving them changes the loss ``loss_at()``: autograd does not see them, so a
        gradient-based search would treat them as frozen. Parameters the loss does not use (a head
        it skips) are fine, and are moved once per call to tell the two apart."""
        missing = [i for i, got in enumerate(received) if not got and i not in self._unused]
        if not missing:
            return
        kept = [self.tensors[i].data for i in missing]
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        # both losses with one random state (dropout in train mode), the caller's own left as it was
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            torch.manual_seed(0)
            before = float(loss_at())
            generator = torch.Generator().manual_seed(0)
            try:
                for i, w in zip(missing, kept):   # a pattern of signs: no uniform rescale a norm layer would undo
                    shift = torch.randn(w.shape, generator=generator, dtype=torch.float64).to(w.device, w.dtype)
                    self.tensors[i].data = w + (w.abs() + 1) * shift
                torch.manual_seed(0)
                after = float(loss_at())
            finally:
                for i, w in zip(missing, kept):
                    self.tensors[i].data = w
        if after != before:
            names = [self.names[i] for i in missing]
            raise ValueError(
                f"parameter(s) {', '.join(map(repr, names[:5]))}{' and more' if len(names) > 5 else ''} change "
                "the loss but receive no gradient, so the search would treat them as frozen: autograd does not "
                "see them (activation checkpointing with use_reentrant=True on inputs that do not require grad, "
                "a forward under torch.no_grad() or on detached weights). Use use_reentrant=False, or exclude them "
                "on purpose (requires_grad_(False), or a scale of 0)")
        self._unused.update(missing)

    @property
    def unit_scale(self) -> bool:
        """True when ``c = 1`` for every coordinate (the l2 projection is then a rescaling)."""
        return self.scaling.is_identity(self)


class ModelGuard(contextlib.AbstractContextManager):
    """Leaves a model exactly as it was found, whatever happens inside the ``with`` block.

    On entry it records, for every parameter, its ``.data`` tensor (the user's storage),
    ``.grad`` and ``requires_grad``; every module's ``training`` flag; and every buffer, which
    it replaces by a private copy so that in-place updates (BatchNorm statistics in train mode)
    never reach the user's tensors. On exit, also after an exception or ``KeyboardInterrupt``,
    it points everything back. The evaluators never write into the user's parameter storage:
    they point ``param.data`` at their own tensors, so restoring is bit-exact. The block runs with
    autograd on, whatever the caller's mode (``torch.no_grad()``, ``torch.inference_mode()``):
    the measurements differentiate the loss.
    """

    def __init__(self, model: nn.Module, eval_mode: bool = True):
        self.model = model
        self.eval_mode = eval_mode

    def __enter__(self):
        model = self.model
        inference = [n for n, p in model.named_parameters() if p.is_inference()]
        if inference:
            raise ValueError(f"the model's parameters ({inference[0]!r} first) were created under "
                             "torch.inference_mode(), so autograd cannot differentiate them: build or load the "
                             "model outside it (calling sharpfast inside inference_mode is fine)")
        self._autograd = contextlib.ExitStack()
        self._autograd.enter_context(torch.inference_mode(False))
        self._autograd.enter_context(torch.enable_grad())
        self._params = [(p, p.data, p.grad, p.requires_grad)
                        for p in model.parameters()]
        self._training = [(m, m.training) for m in model.modules()]
        self._buffers = []
        for module in model.modules():
            for name, buf in module._buffers.items():
                self._buffers.append((module, name, buf))
                if buf is not None:
                    module._buffers[name] = buf.clone()
        if self.eval_mode:
            model.eval()
        return self

    def __exit__(self, *exc):
        for p, data, grad, requires_grad in self._params:
            p.data = data
            p.grad = grad
            p.requires_grad_(requires_grad)
        for module, training in self._training:
            module.training = training
        for module, name, buf in self._buffers:
            module._buffers[name] = buf
        self._autograd.close()
        return False


def set_weights(params: ParamSet, values: list[torch.Tensor]) -> None:
    """Point each parameter at ``values`` (the reference's tensors of its own, never the caller's:
    the caller's ``ModelGuard`` points them back)."""
    for p, v in zip(params.tensors, values):
        p.data = v


def set_kept(params: ParamSet, kept: list[torch.Tensor]) -> None:
    """Point the parameters at a copy of a kept point (``w0``, which is the caller's storage, or the
    best point): a forward that writes into its own weights (an in-place clamp or weight norm) must
    change neither the caller's model nor the point kept."""
    set_weights(params, [v.clone() for v in kept])
