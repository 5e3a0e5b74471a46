"""Fast evaluators on the extension's fused ops: the reference's numbers, many times faster.

Worst-case (APGD) keeps every parameter-sized quantity in one flat buffer per call: the
perturbed weights (the model's ``param.data`` point at views of it), the gradient (``.grad``
views that autograd accumulates into in place), ``w0``, ``delta``, ``delta_prev`` and the
gradient at the best point: four beyond the weights and gradient a training step holds. The
scale ``c`` is derived from ``w0`` inside the kernels (a fifth buffer only for custom or mixed
scales), and the best point itself is never stored: moving back to it is only ever followed by
a step that rewrites every weight from its gradient, and its ``||delta||`` is a scalar kept on
the device. Each step is one fused op over the buffers.
The best-loss bookkeeping and the step-halving decisions are tensors on the device, so the
loop never waits for the host (the adaptive l2 projection is the exception: it replays the
published bisection from norms read back, a few passes per step, see ``apgd``). The loss at
a new point comes from the forward pass of the next gradient step; when a checkpoint moves
back to the best point, the gradient stored with that point is reused. Per batch and restart
that is ``n_iters`` forward+backward passes and one forward, exactly what the algorithm needs.
The m-batches' problems are rows of these buffers: one row at a time through the model itself
(``_OneBatch``), or all rows in one vmapped forward/backward (``_AllBatches``,
``solve_batches_together``); the same loop drives both.

Average-case writes K perturbed copies of the weights at once from the Philox stream into a
``[K, N]`` buffer and evaluates them in one batched forward (``functional_call`` + ``vmap``),
or one forward per sample (the CPU default, and the fallback when the model cannot be vmapped),
in which case the one perturbed copy is written straight from the user's tensors.
"""
from __future__ import annotations

import functools
import logging
import math

import torch
from torch.func import functional_call, vmap

from . import _ops, apgd
from .config import Settings, SharpnessResult, check_finite_loss
from .objective import to_device, unpack_batch
from .params import ParamSet
from .philox import AVERAGE_SAMPLE_BASE, RAND_INIT_SAMPLE_BASE, noise_distribution

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
MAX_SAMPLES_PER_PASS = 32           # average-case: perturbed copies evaluated in one forward
SAMPLE_BUFFER_BYTES = 256 * 2**20   # ... within this much memory for the [K, N] buffer
TOGETHER_DEVICES = ("cuda",)        # worst-case: where m-batches are solved together by default ...
TOGETHER_BUFFER_BYTES = 2**30       # ... when their [B, N] buffers fit in this much memory
# bisection steps speculated per pass over memory: each costs an fp64 division per coordinate
# on a CPU (~15% of a pass), next to nothing on a GPU
BISECTION_LEVELS = {"cpu": 1, "cuda": 4}


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
        rule = s.scale.uniform_rule(params)
        self.c = (_ops.DerivedScale(*rule) if rule is not None else
                  torch.cat([c.reshape(-1) for c in params.scales(s.scale)]).to(self.originals[0].dtype))
        self.current = self.grad = self._pieces = None
        self._views = []

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

    def backward(self, loss: torch.Tensor) -> None:
        """The gradient at the current weights, accumulated in place into ``self.grad``."""
        self.grad.zero_()
        loss.backward()
        for p, _, grad in self._views:
            if p.grad is not grad:  # autograd replaced it (a hook, an unusual layout): copy back
                grad.copy_(p.grad)
                p.grad = grad


def _batches(batches, device):
    for index, batch in enumerate(batches):
        x, y = unpack_batch(batch, index)
        yield index, to_device(x, device), to_device(y, device)


def _loss_err(s: Settings, model, x, y):
    """(loss, error) as device tensors; error is a zero tensor where there are no labels."""
    loss, err = s.objective.loss_and_error(model, x, y)
    has_err = err is not None
    return loss, (err if has_err else torch.zeros((), device=loss.device)), has_err


def _finish(s: Settings, per_batch, per_batch_err, init_losses, init_errs, delta_norms, has_err, nonfinite):
    """The one read-back of a call: everything stacked and copied to the host together."""
    values = torch.stack([torch.stack(v).double() for v in (per_batch, per_batch_err, init_losses, init_errs)]
                         + [torch.stack(delta_norms).double(), torch.stack(nonfinite).double()])
    per_batch, per_batch_err, init_losses, init_errs, delta_norms, nonfinite = values.tolist()
    for b, (bad, l0) in enumerate(zip(nonfinite, init_losses)):
        check_finite_loss(l0, f"at the unperturbed weights (batch {b})")
        if bad:
            check_finite_loss(math.nan, f"at a perturbed point (batch {b})")
    mean = lambda v: sum(v) / len(v)
    return SharpnessResult(
        sharpness=mean(per_batch), err_sharpness=mean(per_batch_err) if has_err else None,
        per_batch=per_batch, per_batch_err=per_batch_err if has_err else None,
        delta_norm=max(delta_norms), init_loss=mean(init_losses), init_err=mean(init_errs) if has_err else None,
        backend="fused", kind=s.kind, settings=s.describe())


# ----------------------------------------------------------------------------- worst-case

class _Projection:
    """The l2 projection's multiplier lambda for one APGD problem, as a device scalar (see ``apgd``)."""

    def __init__(self, w0: torch.Tensor, c: _ops.Scale, s: Settings, c_is_one: bool):
        self.w0, self.c, self.s, self.c_is_one = w0, c, s, c_is_one
        self.device = w0.device
        self.levels = BISECTION_LEVELS.get(self.device.type, 3)
        self.zero = torch.zeros(1, dtype=torch.float64, device=self.device)
        self.hint = None

    def norms(self, delta, grad, grad_scale, lams):
        sq = _ops.ellipsoid_norms(delta, grad, self.w0, self.c, grad_scale,
                                  torch.as_tensor(lams, dtype=torch.float64, device=self.device))
        return sq.sqrt()

    def __call__(self, delta, grad, grad_scale) -> torch.Tensor:
        rho = self.s.rho
        if self.c_is_one:  # rescale to norm rho: z / (1 + 2 lambda) = z rho / ||z||, no host sync
            z_norm = self.norms(delta, grad, grad_scale, self.zero)[0]
            return torch.where(z_norm > rho, (z_norm / rho - 1) / 2, torch.zeros_like(z_norm))
        # The published bisection's multiplier, replayed from a few passes over memory (see
        # apgd.replayed_ellipsoid_lambda); the previous step's multiplier is the first guess.
        lam, _ = apgd.replayed_ellipsoid_lambda(lambda lams: self.norms(delta, grad, grad_scale, lams).tolist(),
                                                rho, self.s.projection_tol, hint=self.hint, levels=self.levels)
        self.hint = lam or self.hint
        return torch.tensor(lam, dtype=torch.float64, device=self.device)


class _OneBatch:
    """One m-batch's APGD problem on the model itself: a row of flat weights that the model's
    parameters view, its gradient accumulated by autograd into the flat gradient buffer."""

    def __init__(self, model, s: Settings, flat: FlatState, index: int, x, y):
        self.model, self.s, self.flat, self.x, self.y = model, s, flat, x, y   # flat: attached
        self.streams = [index]
        self.current, self.grad = flat.current.view(1, -1), flat.grad.view(1, -1)

    def evaluate(self, with_grad: bool):
        """(loss, error, labelled) at the current row, 0-dim; with_grad also fills ``grad``."""
        with torch.set_grad_enabled(with_grad):
            loss, err, labelled = _loss_err(self.s, self.model, self.x, self.y)
        if with_grad:
            self.flat.backward(loss)
        return loss.detach(), err, labelled


class _AllBatches:
    """Every m-batch's APGD problem at once: row b of ``current`` holds batch b's weights, and one
    vmapped forward (+ backward) evaluates them all (``torch.func``). Batches of one shape only."""

    def __init__(self, model, s: Settings, params: ParamSet, flat: FlatState, xs, ys):
        self.s = s
        B, n = len(ys), flat.w0.numel()
        self.streams = list(range(B))
        self.current = flat.w0.expand(B, n).clone()
        self.grad = torch.zeros_like(self.current)
        self.x, self.y = _stack(xs), torch.stack(ys)
        at_row = _loss_and_error_at_row(model, s, params)
        self.labelled = True

        def loss_and_error(row, x, y):
            loss, err, labelled = at_row(row, x, y)
            self.labelled = labelled   # decided by shapes and dtypes: the same for every row
            return loss, err

        self._values = vmap(loss_and_error, randomness="error")
        self._grads = vmap(torch.func.grad_and_value(loss_and_error, has_aux=True), randomness="error")

    def evaluate(self, with_grad: bool):
        if with_grad:
            grad, (loss, err) = self._grads(self.current, self.x, self.y)
            self.grad.copy_(grad)
        else:
            with torch.no_grad():
                loss, err = self._values(self.current, self.x, self.y)
        return loss.detach(), err, self.labelled


def _loss_and_error_at_row(model, s: Settings, params: ParamSet):
    """``(row, x, y) -> (loss, error, labelled)`` with the model's parameters taken from ``row``, a
    flat weight vector (``functional_call``, so it composes with vmap and grad); the error is a
    zero tensor where there are no labels."""
    names, numels, shapes = params.names, params.numels, [p.shape for p in params.tensors]

    def at_row(row, x, y):
        weights = {name: t.view(shape) for name, t, shape in zip(names, row.split(numels), shapes)}
        f = s.objective.logits(lambda *a, **kw: functional_call(model, weights, a, kw), x)
        err = s.objective.error(f.detach(), y)
        return s.objective.loss(f, y), (err if err is not None else torch.zeros((), device=f.device)), err is not None
    return at_row


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


def _stackable(items) -> bool:
    first = _signature(items[0])
    return first is not None and all(_signature(v) == first for v in items[1:])


def _problems(model, batches, params: ParamSet, s: Settings, flat: FlatState):
    """The APGD problems of a call, all m-batches at once where asked (and possible), else one by
    one (each batch moved to the device when its turn comes); with a first evaluation at w0 when
    the batched path had to be tried (else None)."""
    together = s.solve_batches_together
    unpacked = [unpack_batch(batch, index) for index, batch in enumerate(batches)]   # still on the host
    xs, ys = [x for x, _ in unpacked], [y for _, y in unpacked]
    stackable = _stackable(xs) and _stackable(ys)
    if together:
        if not stackable:
            raise ValueError("solve_batches_together=True needs batches of one shape (the m-batches are "
                             "stacked into one vmapped forward); the batches given differ")
        if not s.eval_mode:
            raise ValueError("solve_batches_together=True needs eval_mode=True: in train mode, layers such "
                             "as BatchNorm update their buffers batch after batch")
    device = flat.w0.device
    on_device = lambda values: [to_device(v, device) for v in values]
    if together is None:   # auto: on a GPU, in eval mode, when the [B, N] buffers fit
        # current, grad, 3 APGD buffers and the vmapped gradient before it is copied into grad
        memory = 6 * len(ys) * flat.w0.numel() * flat.w0.element_size()
        together = (device.type in TOGETHER_DEVICES and s.eval_mode and len(ys) > 1 and stackable
                    and memory <= TOGETHER_BUFFER_BYTES)
        if together:
            try:
                problems = _AllBatches(model, s, params, flat, on_device(xs), on_device(ys))
                return [problems], problems.evaluate(with_grad=True)   # fails here if vmap cannot trace the model
            except Exception as e:  # noqa: BLE001 - any vmap limitation: solve one batch at a time
                log.debug("sharpfast: cannot vmap this model (%s: %s); solving the m-batches one by one",
                          type(e).__name__, e)
                together = False
    if together and len(ys) > 1:   # asked for: errors (e.g. a model vmap cannot trace) reach the caller
        return [_AllBatches(model, s, params, flat, on_device(xs), on_device(ys))], None
    flat.attach()   # one batch at a time (a single batch is its own "together")
    return (_OneBatch(model, s, flat, b, x, y) for b, x, y in _batches(batches, device)), None


def worst_case_sharpness(model, batches, params: ParamSet, s: Settings) -> SharpnessResult:
    flat = FlatState(params, s)
    w0, c = flat.w0, flat.c
    device = w0.device
    f64 = dict(dtype=torch.float64, device=device)
    checkpoints = set(apgd.checkpoint_schedule(s.n_iters))
    dist = noise_distribution(s.norm)
    per_batch, per_batch_err, init_losses, init_errs, delta_norms, nonfinite = [], [], [], [], [], []
    has_err = True
    groups, first = _problems(model, batches, params, s, flat)   # first: a done evaluation at w0, or None
    buffers = {}

    for group in groups:   # rows: the m-batch problems solved together
        current, grad = group.current, group.grad
        B = current.shape[0]
        rows = range(B)
        shape = () if B == 1 else (B,)   # per-problem scalars; 0-dim for one problem (no indexing per step)
        at = (lambda t, r: t) if B == 1 else (lambda t, r: t[r])
        if B not in buffers:
            buffers[B] = [torch.empty_like(current) for _ in range(3)]
        delta, delta_prev, best_grad = buffers[B]
        row_views = [(current[r], grad[r], delta[r], delta_prev[r], best_grad[r]) for r in rows]
        if first is None:
            current.copy_(w0.expand_as(current))
        L0 = E0 = None
        if s.rand_init:  # the first gradient is taken at the random start: L0 needs its own forward
            (L0, E0, has_err), first = first or group.evaluate(with_grad=False), None
        worst_loss = worst_err = worst_norm = None
        loss_sum = torch.zeros(shape, **f64)   # non-finite iff some iterate's loss was (checked once, at the end)
        for restart in range(s.n_restarts):
            if s.rand_init:
                for r, stream in zip(rows, group.streams):
                    c_r = flat.scale_values(best_grad[r])   # best_grad is free until the first gradient
                    _ops.draw_(delta[r], s.seed, stream, RAND_INIT_SAMPLE_BASE + restart, 0, dist)
                    if s.norm == "l2":  # a Gaussian direction on the ellipsoid's surface (see reference)
                        counted = torch.sign(c_r, out=delta_prev[r]).mul_(delta[r])   # frozen (c = 0) do not count
                        delta[r].div_(_ops.sum_squares(counted).sqrt().to(delta.dtype))
                    delta[r].mul_(c_r).mul_(s.rho)   # frozen coordinates do not move
                torch.add(w0, delta, out=current)
            else:
                delta.zero_()
                current.copy_(w0.expand_as(current))
            delta_prev.copy_(delta)
            step = torch.full(shape, 2 * s.rho * s.step_size_mult, **f64)
            n_updates = torch.zeros(shape, dtype=torch.int64, device=device)
            prev_checkpoint = 0
            projections = [_Projection(w0, c, s, s.scale.is_identity(params)) for _ in rows] if s.norm == "l2" else None
            for i in range(s.n_iters + 1):
                last = i == s.n_iters
                if first is not None:                      # the vmap check took this forward at w0
                    (loss, err, labelled), first = first, None
                else:
                    loss, err, labelled = group.evaluate(with_grad=not last)  # last: the final point's loss only
                has_err = labelled
                if i == 0:
                    best_grad.copy_(grad)                  # the start point is the first "best"
                    if L0 is None:                         # delta = 0: this forward was at w0
                        L0, E0 = loss, err
                    L_best, E_best = L0.clone(), E0.clone()
                    best_sq = torch.zeros(shape, **f64)    # ||delta||^2 at the best point (0 at the start)
                    prev_step, prev_best = step.clone(), L_best.clone()
                else:                                      # bookkeeping for the point of step i-1
                    loss_sum += loss
                    improved = loss > L_best
                    L_best = torch.where(improved, loss, L_best)
                    E_best = torch.where(improved, err, E_best)
                    sq = [_ops.sum_squares(delta_r) for _, _, delta_r, _, _ in row_views]  # still step i-1's delta
                    best_sq = torch.where(improved, sq[0] if B == 1 else torch.stack(sq), best_sq)
                    if not last:
                        for r, (_, grad_r, _, _, best_grad_r) in zip(rows, row_views):
                            _ops.copy_if_(best_grad_r, grad_r, at(improved, r))
                    n_updates += improved
                    if not last and (i - 1) in checkpoints:
                        j = i - 1
                        too_few = apgd.too_few_updates(n_updates, s.min_update_ratio, j - prev_checkpoint)
                        stalled = (prev_step == step) & (prev_best == L_best)
                        prev_step, prev_best, prev_checkpoint = step.clone(), L_best.clone(), j
                        n_updates = torch.zeros_like(n_updates)
                        halve = too_few | stalled
                        step = torch.where(halve, step * apgd.STEP_SIZE_SCALER, step)
                        # Back to the best point: the next step starts from the gradient taken there
                        # (and, as published, the unchanged delta). The step writes every weight, so
                        # the best weights themselves are never needed: only their gradient is kept.
                        for r, (_, grad_r, _, _, best_grad_r) in zip(rows, row_views):
                            _ops.copy_if_(grad_r, best_grad_r, at(halve, r))
                if last:
                    break
                with torch.no_grad():
                    for r, (cur_r, grad_r, delta_r, delta_prev_r, _) in zip(rows, row_views):
                        if s.norm == "linf":
                            _ops.apgd_step_linf_(cur_r, delta_r, delta_prev_r, grad_r, w0, c, at(step, r), s.rho,
                                                 apgd.MOMENTUM)
                        else:
                            grad_scale = at(step, r) / (_ops.sum_squares(grad_r).sqrt() + 1e-12)
                            lam = projections[r](delta_r, grad_r, grad_scale)
                            _ops.apgd_step_l2_(cur_r, delta_r, delta_prev_r, grad_r, w0, c, grad_scale, lam,
                                               apgd.MOMENTUM)
            restart_norm = torch.where(L_best > L0, best_sq.sqrt(), torch.zeros(shape, **f64))
            if worst_loss is None:
                worst_loss, worst_err, worst_norm = L0.clone(), E0.clone(), torch.zeros(shape, **f64)
            better = L_best > worst_loss
            worst_loss = torch.where(better, L_best, worst_loss)
            worst_err = torch.where(better, E_best, worst_err)
            worst_norm = torch.where(better, restart_norm, worst_norm)
        per_batch += list((worst_loss - L0).reshape(-1))
        per_batch_err += list((worst_err - E0).reshape(-1))
        init_losses += list(L0.reshape(-1))
        init_errs += list(E0.reshape(-1))
        delta_norms += list(worst_norm.reshape(-1))
        nonfinite += list((~torch.isfinite(loss_sum)).reshape(-1))
    return _finish(s, per_batch, per_batch_err, init_losses, init_errs, delta_norms, has_err, nonfinite)


# ----------------------------------------------------------------------------- average-case

def _samples_per_pass(s: Settings, params: ParamSet) -> int:
    """K, the perturbed copies per batched forward: ``samples_per_pass`` if given, else one at a
    time on a CPU (a forward already keeps its cores busy: batching gained <25% on tiny MLPs and
    made a BatchNorm CNN 4.8x slower, benchmarks/RESULTS.md) and up to a memory budget elsewhere."""
    if s.samples_per_pass is not None:
        k = s.samples_per_pass
    elif params.device.type == "cpu":
        k = 1
    else:
        row_bytes = params.numel * params.tensors[0].element_size()
        k = min(MAX_SAMPLES_PER_PASS, max(1, SAMPLE_BUFFER_BYTES // max(1, row_bytes)))
    k = min(k, s.n_samples)
    if s.antithetic and k % 2 and k > 1:
        k -= 1
    return k


def _batched_losses(model, s: Settings, params: ParamSet, rows: torch.Tensor, x, y):
    """Loss and error of every row of ``rows`` (perturbed flat weights) in one vmapped forward."""
    at_row = _loss_and_error_at_row(model, s, params)
    return vmap(lambda row: at_row(row, x, y)[:2], randomness="error")(rows)


def average_sharpness(model, batches, params: ParamSet, s: Settings) -> SharpnessResult:
    """One sample at a time (K = 1) the model views one flat perturbed copy, written from the
    user's own tensors: 1 parameter-sized buffer. Batched, K rows of perturbed copies and the flat
    ``w0`` they are written from: K + 1, and the model keeps its own weights for the loss at w0."""
    flat = FlatState(params, s)
    K = _samples_per_pass(s, params)
    batched = K > 1
    rows = None
    if batched:
        rows = torch.empty((K, params.numel), dtype=flat.w0.dtype, device=params.device)
    else:
        flat.attach(with_grad=False)
    device = params.device
    dist = noise_distribution(s.norm)
    per_batch, per_batch_err, init_losses, init_errs, nonfinite = [], [], [], [], []
    has_err = True
    with torch.no_grad():
        for b, x, y in _batches(batches, device):
            if flat.current is not None:
                flat.reset()
            L0, E0, has_err = _loss_err(s, model, x, y)
            total_loss = torch.zeros((), dtype=torch.float64, device=device)
            total_err = torch.zeros((), dtype=torch.float64, device=device)
            bad = torch.zeros((), dtype=torch.bool, device=device)
            start = 0
            while start < s.n_samples:
                k = min(K, s.n_samples - start)
                first = AVERAGE_SAMPLE_BASE + (start // 2 if s.antithetic else start)
                losses = errs = None
                if batched:
                    _ops.perturb_batched_(rows[:k], flat.w0, flat.c, s.rho, s.seed, b, first, 0, dist, s.antithetic)
                    try:
                        losses, errs = _batched_losses(model, s, params, rows[:k], x, y)
                    except Exception as e:  # noqa: BLE001 - any vmap limitation: evaluate one by one
                        log.debug("sharpfast: cannot vmap this model (%s: %s); evaluating samples one "
                                  "at a time", type(e).__name__, e)
                        batched, rows = False, None
                        flat.attach(with_grad=False)
                if losses is None:
                    losses, errs = [], []
                    for j in range(k):
                        sample, sign = ((start + j) // 2, (-1) ** (start + j)) if s.antithetic else (start + j, 1)
                        flat.perturb(sign * s.rho, s.seed, b, AVERAGE_SAMPLE_BASE + sample, dist)
                        loss, err, _ = _loss_err(s, model, x, y)
                        losses.append(loss)
                        errs.append(err)
                    losses, errs = torch.stack(losses), torch.stack(errs)
                bad |= ~torch.isfinite(losses).all()
                total_loss += losses.double().sum()
                total_err += errs.double().sum()
                start += k
            per_batch.append(total_loss / s.n_samples - L0.double())
            per_batch_err.append(total_err / s.n_samples - E0.double())
            init_losses.append(L0)
            init_errs.append(E0)
            nonfinite.append(bad)
    zeros = [torch.zeros((), dtype=torch.float64, device=device)] * len(per_batch)
    return _finish(s, per_batch, per_batch_err, init_losses, init_errs, zeros, has_err, nonfinite)


__all__ = ["available", "worst_case_sharpness", "average_sharpness"]
