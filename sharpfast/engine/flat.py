"""The flat state of one fused call, and what every fused evaluator shares: whether the fused
backend can take the parameters, the loss and error at the current weights as device tensors,
and the one read-back of a call's results.

Every parameter-sized quantity of a call lives in one flat buffer, and the model's parameters
(and their ``.grad``) point at views of it for the duration of the call (DESIGN.md §4, "Flat
buffers"); the user's storage is only read.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import torch

from .. import _ops
from ..result import SharpnessResult, check_finite_loss, summarize
from ..settings import Settings
from ..params import ParamSet

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def available(params: ParamSet) -> tuple[bool, str]:
    """Whether the fused backend can evaluate these parameters, and if not, why."""
    if not _ops.available(params.device):
        return False, (f"the extension could not be loaded ({_ops.IMPORT_ERROR})" if _ops.IMPORT_ERROR else
                       f"the extension was built without support for {params.device.type} devices")
    dtypes = {p.dtype for p in params.tensors}
    if len(dtypes) > 1:
        return False, f"the parameters have several dtypes ({sorted(map(str, dtypes))}); one is needed"
    dtype = dtypes.pop()
    if dtype not in SUPPORTED_DTYPES:
        return False, f"parameters of dtype {dtype} are not supported"
    return True, ""


class FlatState:
    """The weights and scale of one call. ``w0`` is a flat copy of the user's weights, made when
    first used (the one-sample-at-a-time average-case reads the user's own, never written,
    tensors instead). ``c`` is a buffer only for custom or mixed scales; ``|w| + eta`` and ``1``
    are derived from ``w0`` inside the kernels (``_ops.DerivedScale``). ``attach`` allocates the
    flat weights (and, ``with_grad``, the flat gradient) that the model's parameters (and grads)
    then view; the batched paths have their own rows and never attach."""

    def __init__(self, params: ParamSet, s: Settings):
        self.params = params
        self.originals = [p.detach() for p in params.tensors]   # the user's storage: read, never written
        rule = params.uniform_rule()
        self.c = (_ops.DerivedScale(*rule) if rule is not None else
                  torch.cat([c.reshape(-1) for c in params.scales()]).to(self.originals[0].dtype))
        self.current = self.grad = self._pieces = None
        self._views = []
        self._gradients_checked = False

    @functools.cached_property
    def w0(self) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in self.originals])

    def attach(self, with_grad: bool = True) -> None:
        self.current = torch.empty(self.params.numel, dtype=self.originals[0].dtype, device=self.params.device)
        self.grad = torch.zeros_like(self.current) if with_grad else None
        grads = self.params.split(self.grad) if with_grad else [None] * len(self.params)
        self._views = list(zip(self.params.tensors, self.params.split(self.current), grads))
        self._pieces = None
        self.reset()
        for p, value, grad in self._views:
            p.data = value
            if grad is not None:
                p.grad = grad

    def reset(self) -> None:
        """The attached weights back to w0."""
        torch._foreach_copy_([value for _, value, _ in self._views], self.originals)

    def perturb(self, rho: float, seed: int, stream: int, sample: int, dist: str) -> None:
        """The attached weights to ``w0 + rho c xi`` (Philox draws of the flat coordinates), in one op
        over the parameter tensors that reads ``w0`` from the user's tensors: no flat copy of ``w0``."""
        if self._pieces is None:   # (out, w0, c) of each parameter tensor, as flat views
            c = self.c if isinstance(self.c, _ops.DerivedScale) else [t.view(-1) for t in self.params.split(self.c)]
            self._pieces = ([value.view(-1) for _, value, _ in self._views], [w.reshape(-1) for w in self.originals], c)
        out, w0, c = self._pieces
        _ops.perturb_tensors_(out, w0, c, rho, seed, stream, sample, self.params.offsets, dist)

    def scale_values(self, out: torch.Tensor) -> torch.Tensor:
        """``c`` as a tensor: the buffer itself, or written into ``out`` (a free buffer) when derived,
        exactly as the reference builds it."""
        if isinstance(self.c, torch.Tensor):
            return self.c
        if self.c.adaptive:
            return torch.abs(self.w0, out=out).add_(self.c.eta)
        return out.fill_(1)

    def backward(self, loss: torch.Tensor, loss_at: Callable[[], torch.Tensor]) -> None:
        """The gradient at the current weights, accumulated in place into ``self.grad``. The first
        backward of a call also checks that every parameter the loss ``loss_at()`` depends on
        receives a gradient (``ParamSet.check_gradients``)."""
        for p, _, grad in self._views:
            if p.grad is not grad:  # pointed elsewhere since the last backward: DDP with
                p.grad = grad       # gradient_as_bucket_view rebuilds its buckets in a forward
        self.grad.zero_()
        if self._gradients_checked:
            loss.backward()
        else:
            received = [False] * len(self.params)
            mark = lambda i: lambda _: received.__setitem__(i, True)
            hooks = [p.register_post_accumulate_grad_hook(mark(i)) for i, p in enumerate(self.params.tensors)]
            try:
                if loss.requires_grad:   # else no parameter is seen: check_gradients says which matter
                    loss.backward()
            finally:
                for h in hooks:
                    h.remove()
            self.params.check_gradients(received, loss_at)
            self._gradients_checked = True
        for p, _, grad in self._views:
            if p.grad is not grad:  # autograd replaced it (a hook, an unusual layout): copy back
                grad.copy_(p.grad)
                p.grad = grad


def loss_and_error(s: Settings, model, x, y):
    """(loss, error) as device tensors; error is a zero tensor where there are no labels."""
    loss, err = s.objective.loss_and_error(model, x, y)
    has_err = err is not None
    return loss, (err if has_err else torch.zeros((), device=loss.device)), has_err


class Outcomes(NamedTuple):
    """What each problem (an m-batch of a model) of a call ends with, one entry per problem: on the
    device while the call runs, read back to the host once (:func:`read_back`)."""

    per_batch: list
    per_batch_err: list
    init_losses: list
    init_errs: list
    delta_norms: list
    nonfinite: list   # a perturbed loss was not finite


def finish(s: Settings, outcomes: Outcomes, has_err: bool) -> SharpnessResult:
    """One model's result from its problems' device values: one read-back."""
    return result_of(s, read_back(outcomes)[0], has_err)


def read_back(outcomes: Outcomes, extras: tuple = ()) -> tuple[Outcomes, list[list[float]]]:
    """The per-problem device scalars of ``outcomes`` and of ``extras`` (more lists, one entry per
    problem), copied to the host in one transfer (as float64)."""
    host = torch.stack([torch.stack(v).double() for v in (*outcomes, *extras)]).tolist()
    return Outcomes(*host[:len(Outcomes._fields)]), host[len(Outcomes._fields):]


def result_of(s: Settings, host: Outcomes, has_err: bool) -> SharpnessResult:
    """One model's result from its problems' host values; a non-finite loss is an error naming where."""
    for b, (bad, l0) in enumerate(zip(host.nonfinite, host.init_losses)):
        check_finite_loss(l0, f"at the unperturbed weights (batch {b})")
        if bad:
            check_finite_loss(math.nan, f"at a perturbed point (batch {b})")
    return summarize(s, "fused", host.per_batch, host.per_batch_err if has_err else [], host.init_losses,
                     host.init_errs if has_err else [], max(host.delta_norms))


def results_by_model(s: Settings, host: Outcomes, extras: list[list[float]], owners: list[int], n_models: int,
                     has_err: bool) -> list[tuple]:
    """``(result, its extras)`` per model from the host values of every problem (``owners``: each
    problem's model, whose problems are taken in order); ``result`` is the exception its values raise
    where they do."""
    out = []
    for k in range(n_models):
        rows = [r for r, owner in enumerate(owners) if owner == k]
        mine = Outcomes(*([values[r] for r in rows] for values in host))
        own_extras = [[values[r] for r in rows] for values in extras]
        try:
            out.append((result_of(s, mine, has_err), own_extras))
        except Exception as e:  # noqa: BLE001 - one model's non-finite loss is its own error
            out.append((e, own_extras))
    return out


SAFE_NORM = 1e150   # norms below this have squares (and sums of up to 1e8 of them) far from float64's maximum


def norm_scale(flats, rho: float) -> float:
    """What ``||delta||^2`` is summed over, as a divisor of ``delta``: 1, or where float64 weights are
    so large that the squares could overflow, ``k = rho * max c``. Every constraint set lies in the
    box ``|delta_i| <= rho c_i``, so ``||delta / k||^2 <= N`` and ``||delta|| = k ||delta / k||`` is
    finite wherever the norm itself is (``max c`` is each call's ``ParamSet.largest_scale``)."""
    w0 = flats[0].w0
    if w0.dtype != torch.float64:   # float32/half: summed in float64, no square can overflow
        return 1.0
    k = rho * max(f.params.largest_scale for f in {id(f): f for f in flats}.values())
    return k if k * math.sqrt(w0.numel()) > SAFE_NORM else 1.0
