"""Fused worst-case sharpness: the published APGD (DESIGN.md §2) with every
step one fused op over flat buffers and the bookkeeping on the device.

Memory (DESIGN.md §5): the perturbed weights and their gradient (which the model views),
``w0``, ``delta``, ``delta_prev`` and the gradient at the best point. The best point itself is
never stored: moving back to it is always followed by a step that rewrites every weight from
its gradient. The loss at a new point comes from the forward pass of the next gradient step, so
a restart costs ``n_iters`` forward+backward passes and one forward.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import _ops
from ..engine import problems
from ..engine.flat import FlatState, Outcomes, read_back, results_by_model
from ..params import ParamSet
from ..philox import RAND_INIT_SAMPLE_BASE, noise_distribution
from ..result import SharpnessResult
from ..settings import MOMENTUM, Settings
from . import apgd, starts
from .bookkeeping import Bookkeeping
from .scaled import ScaledRun

# bisection steps speculated per pass over memory: each costs an fp64 division per coordinate
# on a CPU (~15% of a pass), next to nothing on a GPU
BISECTION_LEVELS = {"cpu": 1, "cuda": 4}


def solve(model, batches, params: ParamSet, s: Settings) -> SharpnessResult:
    # the eigen start's vectors, computed at w0 before anything is attached (both backends alike)
    local = starts.for_call(model, params, s, batches)
    flat = FlatState(params, s)
    return _solve(problems.plan(model, batches, params, s, flat), s, [local])[0]


def solve_many(models, batches, params_list: list[ParamSet], s: Settings, xs, ys) -> list:
    """Worst-case sharpness of K models of one architecture, every (model, m-batch) problem a row
    of one group (:class:`~sharpfast.engine.problems.ManyModels`; ``xs``, ``ys``: the batches,
    equally shaped, on the device); a result per model, or the exception its values raise."""
    local = [starts.for_call(m, p, s, batches) for m, p in zip(models, params_list)]
    flats, w0 = problems.stacked_flats(params_list, s)
    return _solve([problems.ManyModels(models, s, params_list, flats, w0, xs, ys)], s, local, errors="return")


def _solve(groups, s: Settings, local: list, errors: str = "raise") -> list:
    """Every group's APGD runs; a result per model (``local``: the models' local models, or Nones)."""
    checkpoints = set(apgd.checkpoint_schedule(s.n_iters))
    results, pool = _Results(), {}
    Run = ScaledRun if s.solver == "scaled" else _Run
    for group in groups:   # the problems solved together
        run = Run(group, s, pool, None if local[0] is None else local)
        L0 = E0 = None
        if s.init != "zero":   # the first gradient is taken at the start: L0 needs its own forward
            L0, E0, results.labelled = group.evaluate(with_grad=False)
        worst = None
        for start in range(s.n_starts):
            run.start(start)
            loss, err, results.labelled = group.evaluate(with_grad=True)   # at the start point
            if L0 is None:   # delta = 0: this forward was at w0
                L0, E0 = loss, err
            book = run.solve(loss, err, L0, E0, checkpoints, results)
            worst = _best_of(worst, (book.best_loss, book.best_err, book.delta_norm(L0)), L0, E0, start)
        results.add(L0, E0, worst, run.loss_sum, group.owners)
    out = results.finish(s, local)
    if errors == "raise":
        for r in out:
            if isinstance(r, BaseException):
                raise r
    return out


class _Run(problems.GroupRun):
    """A group's published-APGD buffers (one row per problem) and its fused step."""

    def __init__(self, group, s: Settings, pool: dict, local=None):
        super().__init__(group, s, pool, local, n_buffers=3)
        self.delta, self.delta_prev, self.best_grad = self.buffers
        self.views = [(group.current[r], group.grad[r], self.delta[r], self.delta_prev[r], self.best_grad[r])
                      for r in self.rows]
        self.c_is_one = self.flats[0].params.unit_scale

    def solve(self, loss, err, L0, E0, checkpoints, results) -> Bookkeeping:
        """One published APGD run from the start just evaluated (``loss``, ``err``: its forward);
        returns its record."""
        s = self.s
        book = Bookkeeping(s, L0, E0, norm_scale=self.norm_scale)
        self.keep_best_grad(None)
        for i in range(s.n_iters):
            self.step(book.step)
            final = i == s.n_iters - 1
            loss, err, results.labelled = self.group.evaluate(with_grad=not final)   # final: its loss only
            self.loss_sum += loss
            improved = book.record(loss, err, self.delta_sq_norms())
            if final:
                break
            self.keep_best_grad(improved)
            if i in checkpoints:
                self.back_to_best(book.checkpoint(i))
        return book

    def start(self, restart: int) -> None:
        """delta = 0, the random start of this restart, or the eigen start; the weights to w0 + delta."""
        s = self.s
        if s.init == "eigen":
            for r in self.rows:
                c = self.flats[r].scale_values(self.best_grad[r])   # best_grad is free until the first gradient
                starts.eigen_start(self.local[r], restart, s, c, out=self.delta[r]).mul_(c)
            self.to_w0(self.group.current, self.delta)
        elif s.rand_init:
            dist = noise_distribution(s.norm)
            for r, stream in zip(self.rows, self.group.streams):
                delta = self.delta[r]
                c = self.flats[r].scale_values(self.best_grad[r])   # best_grad is free until the first gradient
                _ops.draw_(delta, s.seed, stream, RAND_INIT_SAMPLE_BASE + restart, 0, dist)
                if s.norm == "l2":  # a Gaussian direction on the ellipsoid's surface (see reference)
                    counted = torch.sign(c, out=self.delta_prev[r]).mul_(delta)   # frozen (c = 0) do not count
                    delta.div_(_ops.sum_squares(counted).sqrt().to(delta.dtype))
                delta.mul_(c).mul_(s.rho)   # frozen coordinates do not move
            self.to_w0(self.group.current, self.delta)
        else:
            self.delta.zero_()
            self.to_w0(self.group.current)
        self.delta_prev.copy_(self.delta)
        if s.norm == "l2":
            self.projections = [_Projection(w0, c, s, self.c_is_one) for w0, c in zip(self.w0s, self.cs)]

    def keep_best_grad(self, where) -> None:
        """The gradient just taken becomes the best point's (where it improved; everywhere at the start)."""
        if where is None:
            self.best_grad.copy_(self.group.grad)
            return
        for r, (_, grad, _, _, best_grad) in zip(self.rows, self.views):
            _ops.copy_if_(best_grad, grad, self.at(where, r))

    def back_to_best(self, where) -> None:
        """Where the step was halved, the next step starts from the best point's gradient (and, as
        published, the unchanged delta); the step rewrites every weight, so no weights are kept."""
        for r, (_, grad, _, _, best_grad) in zip(self.rows, self.views):
            _ops.copy_if_(grad, best_grad, self.at(where, r))

    def delta_sq_norms(self) -> torch.Tensor:
        k = self.norm_scale
        sq = [_ops.sum_squares(delta if k == 1.0 else delta / k) for _, _, delta, _, _ in self.views]
        return sq[0] if len(sq) == 1 else torch.stack(sq)

    @torch.no_grad()
    def step(self, step_size: torch.Tensor) -> None:
        s = self.s
        for r, (current, grad, delta, delta_prev, _) in zip(self.rows, self.views):
            w0, c = self.w0s[r], self.cs[r]
            if s.norm == "linf":
                _ops.apgd_step_linf_(current, delta, delta_prev, grad, w0, c, self.at(step_size, r), s.rho,
                                     MOMENTUM)
            else:
                grad_scale = self.at(step_size, r) / (_ops.sum_squares(grad).sqrt() + 1e-12)
                lam = self.projections[r](delta, grad, grad_scale)
                _ops.apgd_step_l2_(current, delta, delta_prev, grad, w0, c, grad_scale, lam, MOMENTUM)


class _Projection:
    """The l2 projection's multiplier lambda for one APGD problem, as a device scalar (see ``apgd``)."""

    def __init__(self, w0: torch.Tensor, c: _ops.Scale, s: Settings, c_is_one: bool):
        self.w0, self.c, self.s, self.c_is_one = w0, c, s, c_is_one
        self.device = w0.device
        self.levels = BISECTION_LEVELS.get(self.device.type, 3)
        self.zero = torch.zeros(1, dtype=torch.float64, device=self.device)
        self.hint = None

    def norms(self, delta, grad, grad_scale, lams):
        sq = _ops.ellipsoid_sq_norms(delta, grad, self.w0, self.c, grad_scale,
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
                                                rho, self.s.bisection_tol, hint=self.hint, levels=self.levels)
        self.hint = lam or self.hint
        return torch.tensor(lam, dtype=torch.float64, device=self.device)


def _best_of(worst, restart, L0, E0, start: int):
    """(loss, error, ||delta||, starts that improved after the first) of the best start so far,
    per problem; the unperturbed point (``L0``, ``delta = 0``) is the first candidate."""
    if worst is None:
        worst = (L0.clone(), E0.clone(), torch.zeros(L0.shape, dtype=torch.float64, device=L0.device),
                 torch.zeros(L0.shape, dtype=torch.int64, device=L0.device))
    better = restart[0] > worst[0]
    best = tuple(torch.where(better, new, old) for new, old in zip(restart, worst[:3]))
    return best + (worst[3] + (better & (start > 0)),)


class _Results:
    """Per-problem device values of a call, read back once at the end."""

    def __init__(self):
        self.per_batch, self.per_batch_err, self.init_losses, self.init_errs = [], [], [], []
        self.delta_norms, self.nonfinite, self.improved, self.owners = [], [], [], []
        self.labelled = True

    def add(self, L0, E0, worst, loss_sum, owners) -> None:
        worst_loss, worst_err, worst_norm, improved = worst
        self.owners += owners
        self.improved += list(improved.reshape(-1))
        self.per_batch += list((worst_loss - L0).reshape(-1))
        self.per_batch_err += list((worst_err - E0).reshape(-1))
        self.init_losses += list(L0.reshape(-1))
        self.init_errs += list(E0.reshape(-1))
        self.delta_norms += list(worst_norm.reshape(-1))
        self.nonfinite += list((~torch.isfinite(loss_sum)).reshape(-1))

    def finish(self, s: Settings, local: list) -> list:
        """Each model's result (its rows, in batch order, with its restarts that improved and its
        local models' diagnostics), or the exception its values raise: one read-back for all."""
        host, extras = read_back(Outcomes(self.per_batch, self.per_batch_err, self.init_losses, self.init_errs,
                                          self.delta_norms, self.nonfinite), (self.improved,))
        return [r if isinstance(r, BaseException) else
                dataclasses.replace(r, **starts.diagnostics(s, [int(n) for n in improved], model_local))
                for (r, (improved,)), model_local in zip(results_by_model(s, host, extras, self.owners, len(local),
                                                                          self.labelled), local)]
