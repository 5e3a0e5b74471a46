"""The APGD problems of a worst-case call, as rows of flat buffers, and how they are evaluated.

Each m-batch is one APGD problem. A *group* holds problems solved together: ``current`` and
``grad`` are ``[B, N]`` (one row per problem), and ``evaluate`` returns the loss and error of
every row at its current weights (and, with grad, fills ``grad``). Two kinds:

* :class:`OneBatch`: one problem on the model itself, whose parameters view the flat weights;
  autograd accumulates the gradient into the flat gradient buffer.
* :class:`AllBatches`: every problem at once, one vmapped forward (+ backward) through
  ``torch.func.functional_call`` (batches of one shape only).
* :class:`ManyModels`: every m-batch of K models of one architecture at once (rows are
  (model, batch) pairs), one vmap over the models of a vmap over the batches.

Every group says, per row, whose problem it is: ``flats[r]`` (that model's ``w0`` and ``c``),
``streams[r]`` (the Philox stream: the batch index) and ``owners[r]`` (the model's index), and
``grid`` = ``(models, batches, N)``, the shape its ``[B, N]`` rows take by model.

:func:`plan` makes the choice once, before the APGD loop, and the group it returns keeps the
evaluation its vmap probe took at ``w0`` for the loop's first step (no forward is wasted).
"""
from __future__ import annotations

import logging

import torch
from torch.func import functional_call, vmap

from ..settings import Settings
from ..objective import batches_on_device, to_device, unpack_batch
from ..params import ParamSet
from . import budget
from .flat import FlatState, loss_and_error, norm_scale

log = logging.getLogger("sharpfast.fused")



class OneBatch:
    """One m-batch's problem on the model itself: its row is the flat weights the model views."""

    def __init__(self, model, s: Settings, flat: FlatState, index: int, x, y):
        self.model, self.s, self.flat, self.x, self.y = model, s, flat, x, y   # flat: attached
        self.streams, self.flats, self.owners = [index], [flat], [0]
        self.current, self.grad = flat.current.view(1, -1), flat.grad.view(1, -1)
        self.grid = (1, 1, flat.current.numel())
        self.w0_grid = flat.w0.view(1, 1, -1)

    def evaluate(self, with_grad: bool):
        """(loss, error, labelled) at the current row, 0-dim; with_grad also fills ``grad``."""
        with torch.set_grad_enabled(with_grad):
            loss, err, labelled = loss_and_error(self.s, self.model, self.x, self.y)
        if with_grad:
            self.flat.backward(loss, lambda: loss_and_error(self.s, self.model, self.x, self.y)[0])
        return loss.detach(), err, labelled


class AllBatches:
    """Every m-batch's problem at once: row b of ``current`` holds batch b's weights, and one
    vmapped forward (+ backward) evaluates them all. Rows start at ``w0``."""

    def __init__(self, model, s: Settings, params: ParamSet, flat: FlatState, xs, ys):
        B, n = len(ys), flat.w0.numel()
        self.streams, self.flats, self.owners = list(range(B)), [flat] * B, [0] * B
        self.grid = (1, B, n)
        self.w0_grid = flat.w0.view(1, 1, n)
        self.current = flat.w0.expand(B, n).clone()
        self.grad = torch.zeros_like(self.current)
        self.x, self.y = _stack(xs), torch.stack(ys)
        self.labelled = True
        self._kept = None   # the probe's evaluation at w0, for the first evaluate()
        at_row = loss_and_error_at_row(model, s, params)

        def loss_and_err(row, x, y):
            loss, err, labelled = at_row(row, x, y)
            self.labelled = labelled   # decided by shapes and dtypes: the same for every row
            return loss, err

        self._values = vmap(loss_and_err, randomness="error")
        self._grads = vmap(torch.func.grad_and_value(loss_and_err, has_aux=True), randomness="error")

    def probe(self) -> None:
        """Evaluate at ``w0`` (with grad) now, raising if vmap cannot trace the model; the result
        is what the first :meth:`evaluate` returns (the loop's first evaluation is at ``w0``)."""
        self._kept = self._evaluate(with_grad=True)

    def evaluate(self, with_grad: bool):
        if self._kept is not None:
            kept, self._kept = self._kept, None
            return kept
        return self._evaluate(with_grad)

    def _evaluate(self, with_grad: bool):
        if with_grad:
            grad, (loss, err) = self._grads(self.current, self.x, self.y)
            self.grad.copy_(grad)
        else:
            with torch.no_grad():
                loss, err = self._values(self.current, self.x, self.y)
        return loss.detach(), err, self.labelled


class ManyModels(AllBatches):
    """Every m-batch of K models of one architecture at once: row ``k * B + b`` holds model k's
    weights for batch b, and one vmap over the models (their weights and their own buffers and
    frozen parameters, :func:`stacked_state`) of a vmap over the batches evaluates them all.
    Rows start at each model's ``w0``. ``flats[k].w0`` are the rows of one ``[K, N]`` tensor."""

    def __init__(self, models, s: Settings, params_list: list[ParamSet], flats: list[FlatState], w0: torch.Tensor,
                 xs, ys):
        K, B, n = len(models), len(ys), params_list[0].numel
        self.streams = list(range(B)) * K
        self.flats = [f for f in flats for _ in range(B)]
        self.owners = [k for k in range(K) for _ in range(B)]
        self.grid, self.w0_grid = (K, B, n), w0[:, None]
        self.current = torch.empty((K * B, n), dtype=w0.dtype, device=w0.device)   # GroupRun sets it to w0
        self.grad = torch.zeros_like(self.current)
        self.x, self.y = _stack(xs), torch.stack(ys)
        self.labelled = True
        self._kept = None
        state = stacked_state(models, params_list[0])
        at_row = loss_and_error_at_row(models[0], s, params_list[0])

        def loss_and_err(row, extra, x, y):
            loss, err, labelled = at_row(row, x, y, extra)
            self.labelled = labelled
            return loss, err

        def per_model(f):   # models outside (their rows [B, N] and state), batches inside
            inner = vmap(f, in_dims=(0, None, 0, 0), randomness="error")
            outer = vmap(inner, in_dims=(0, 0, None, None), randomness="error")
            return lambda rows, x, y: outer(rows.view(self.grid), state, x, y)

        values = per_model(loss_and_err)
        grads = per_model(torch.func.grad_and_value(loss_and_err, has_aux=True))
        flatten = lambda t: t.reshape(K * B, *t.shape[2:])
        self._values = lambda rows, x, y: tuple(map(flatten, values(rows, x, y)))

        def grads_flat(rows, x, y):
            grad, (loss, err) = grads(rows, x, y)
            return flatten(grad), (flatten(loss), flatten(err))
        self._grads = grads_flat


def stacked_state(models, params: ParamSet) -> dict[str, torch.Tensor]:
    """``{name: [K, ...]}``: every buffer and every parameter that is not perturbed (frozen, or not
    floating point) of each model, stacked: what ``functional_call`` must take from each model
    besides its perturbed weights."""
    perturbed = set(params.names)
    each = [{n: t for n, t in [*m.named_parameters(), *m.named_buffers()] if n not in perturbed} for m in models]
    return {name: torch.stack([tensors[name].detach() for tensors in each]) for name in each[0]}


def stacked_flats(params_list: list[ParamSet], s: Settings) -> tuple[list[FlatState], torch.Tensor]:
    """One :class:`FlatState` per model, and ``w0``, ``[K, N]``, whose rows their ``w0`` are."""
    flats = [FlatState(p, s) for p in params_list]
    w0 = torch.stack([torch.cat([t.reshape(-1) for t in f.originals]) for f in flats])
    for f, row in zip(flats, w0):
        f.__dict__["w0"] = row   # the cached property, set to the stacked row
    return flats, w0


class GroupRun:
    """What a group's APGD run holds whatever the solver: ``n_buffers`` more ``[B, N]`` buffers
    (``self.buffers``, from ``pool``, which keeps them for the next group of the same size: one
    batch at a time, every batch reuses them), the per-problem scalar accessor ``at`` (0-dim
    scalars for one problem), the sum of the iterates' losses (non-finite iff one was), and the
    rows set to ``w0``, where ``L0`` is evaluated first."""

    def __init__(self, group, s: Settings, pool: dict, local, n_buffers: int):
        self.group, self.s = group, s
        current = group.current
        if current.shape[0] not in pool:
            pool[current.shape[0]] = [torch.empty_like(current) for _ in range(n_buffers)]
        self.buffers = pool[current.shape[0]]
        self.rows = range(current.shape[0])
        # each row's own w0, c and local model (``local``: per model, per batch, or None)
        self.flats = group.flats
        self.w0s, self.cs = [f.w0 for f in self.flats], [f.c for f in self.flats]
        self.local = None if local is None else [local[k][b] for k, b in zip(group.owners, group.streams)]
        single = current.shape[0] == 1
        self.at = (lambda t, r: t) if single else (lambda t, r: t[r])
        self.loss_sum = torch.zeros(() if single else (len(self.rows),), dtype=torch.float64, device=current.device)
        self.norm_scale = norm_scale(self.flats, s.rho)   # ||delta|| = norm_scale * ||delta / norm_scale||
        self.to_w0(current)

    def to_w0(self, out: torch.Tensor, delta: torch.Tensor | None = None) -> None:
        """``out`` (``[B, N]``) to every row's ``w0`` (plus ``delta``), without a ``[B, N]`` copy of w0."""
        grid, w0 = self.group.grid, self.group.w0_grid
        if delta is None:
            out.view(grid).copy_(w0.expand(grid))
        else:
            torch.add(w0, delta.view(grid), out=out.view(grid))


def loss_and_error_at_row(model, s: Settings, params: ParamSet):
    """``(row, x, y, extra=None) -> (loss, error, labelled)`` with the model's parameters taken from
    ``row``, a flat weight vector (``functional_call``, so it composes with vmap and grad), and
    its other parameters and buffers from ``extra`` where given (another model's, see
    :func:`stacked_state`); the error is a zero tensor where there are no labels."""
    names, numels, shapes = params.names, params.numels, [p.shape for p in params.tensors]

    def at_row(row, x, y, extra=None):
        weights = {name: t.view(shape) for name, t, shape in zip(names, row.split(numels), shapes)}
        if extra is not None:
            weights.update(extra)
        f = s.objective.logits(lambda *a, **kw: functional_call(model, weights, a, kw), x)
        err = s.objective.error(f.detach(), y)
        return s.objective.loss(f, y), (err if err is not None else torch.zeros((), device=f.device)), err is not None
    return at_row


def plan(model, batches, params: ParamSet, s: Settings, flat: FlatState) -> list:
    """The groups of a call: ``[AllBatches]`` where the m-batches are solved together, else one
    :class:`OneBatch` per batch (a generator: each batch moves to the device when its turn comes,
    and the model's parameters are attached to the flat buffers first)."""
    unpacked = [unpack_batch(batch, index) for index, batch in enumerate(batches)]   # still on the host
    xs, ys = [x for x, _ in unpacked], [y for _, y in unpacked]
    same_shapes = stackable(xs) and stackable(ys)
    device = flat.w0.device
    on_device = lambda values: [to_device(v, device) for v in values]
    together = s.solve_batches_together
    if together:
        if not same_shapes:
            raise ValueError("solve_batches_together=True needs batches of one shape (the m-batches are "
                             "stacked into one vmapped forward); the batches given differ")
        if not s.eval_mode:
            raise ValueError("solve_batches_together=True needs eval_mode=True: in train mode, layers such "
                             "as BatchNorm update their buffers batch after batch")
        if len(ys) > 1:   # asked for: errors (e.g. a model vmap cannot trace) reach the caller
            return [AllBatches(model, s, params, flat, on_device(xs), on_device(ys))]
    elif together is None and _together_by_default(s, flat, len(ys), same_shapes):
        group = AllBatches(model, s, params, flat, on_device(xs), on_device(ys))
        try:
            group.probe()
            return [group]
        except Exception as e:  # noqa: BLE001 - any vmap limitation: solve one batch at a time
            log.debug("sharpfast: cannot vmap this model (%s: %s); solving the m-batches one by one",
                      type(e).__name__, e)
    flat.attach()   # one batch at a time (a single batch is its own "together")
    return (OneBatch(model, s, flat, b, x, y) for b, x, y in batches_on_device(batches, device))


def _together_by_default(s: Settings, flat: FlatState, n_batches: int, same_shapes: bool) -> bool:
    """On a GPU, in eval mode, for several batches of one shape whose [B, N] buffers fit (:mod:`.budget`)."""
    return s.eval_mode and same_shapes and budget.together(flat.w0.device.type, s.solver, n_batches, flat.w0.numel(),
                                                         flat.w0.element_size())


def _stack(xs):
    """The inputs of equally shaped batches stacked along a new leading dimension."""
    first = xs[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(xs)
    if isinstance(first, dict):
        return {k: _stack([x[k] for x in xs]) for k in first}
    return type(first)(_stack(list(parts)) for parts in zip(*xs))


def _signature(v):
    """Shapes and dtypes of a batch's tensors (None if something in it is not a tensor)."""
    if isinstance(v, torch.Tensor):
        return tuple(v.shape), v.dtype
    if isinstance(v, (dict, tuple, list)):
        parts = [(k, _signature(u)) for k, u in (v.items() if isinstance(v, dict) else enumerate(v))]
        return None if any(sig is None for _, sig in parts) else (type(v).__name__, tuple(parts))
    return None


def stackable(items) -> bool:
    """Whether batches (or their inputs, or labels) have one structure of shapes and dtypes."""
    first = _signature(items[0])
    return first is not None and all(_signature(v) == first for v in items[1:])
