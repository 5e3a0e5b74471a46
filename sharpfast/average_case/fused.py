"""Fused average-case sharpness: perturbed copies of the weights written straight from the Philox
stream (no noise tensor), evaluated one at a time through the model or K at a time in one
vmapped forward.

Memory (DESIGN.md §5): one sample at a time the model views one flat perturbed copy,
written from the user's own tensors (1 parameter-sized buffer); K at a time, K rows and the flat
``w0`` they are written from (K + 1), while the model keeps its own weights for the loss at w0.
"""
from __future__ import annotations

import logging

import torch
from torch.func import vmap

from .. import _ops
from ..result import SharpnessResult
from ..settings import Settings
from ..objective import batches_on_device
from ..params import ParamSet
from ..philox import AVERAGE_SAMPLE_BASE, noise_distribution
from ..engine import budget
from ..engine.flat import FlatState, Outcomes, finish, loss_and_error, read_back, results_by_model
from ..engine.problems import loss_and_error_at_row, stacked_flats, stacked_state

log = logging.getLogger("sharpfast.fused")



def solve(model, batches, params: ParamSet, s: Settings) -> SharpnessResult:
    flat = FlatState(params, s)
    samples = _Sequential(model, s, flat)
    K = samples_per_pass(s, params)
    if K > 1:
        samples = _Batched(model, s, params, flat, K, fallback=samples)
    device = params.device
    per_batch, per_batch_err, init_losses, init_errs, nonfinite = [], [], [], [], []
    labelled = True
    with torch.no_grad():
        for b, x, y in batches_on_device(batches, device):
            samples.reset()
            L0, E0, labelled = loss_and_error(s, model, x, y)
            total_loss = torch.zeros((), dtype=torch.float64, device=device)
            total_err = torch.zeros((), dtype=torch.float64, device=device)
            bad = torch.zeros((), dtype=torch.bool, device=device)
            for start in range(0, s.n_samples, K):
                losses, errs = samples.evaluate(b, start, min(K, s.n_samples - start), x, y)
                bad |= ~torch.isfinite(losses).all()
                total_loss += losses.double().sum()
                total_err += errs.double().sum()
            per_batch.append(total_loss / s.n_samples - L0.double())
            per_batch_err.append(total_err / s.n_samples - E0.double())
            init_losses.append(L0)
            init_errs.append(E0)
            nonfinite.append(bad)
    zeros = [torch.zeros((), dtype=torch.float64, device=device)] * len(per_batch)
    return finish(s, Outcomes(per_batch, per_batch_err, init_losses, init_errs, zeros, nonfinite), labelled)


def samples_per_pass(s: Settings, params: ParamSet, stacked: bool = False) -> int:
    """K, the perturbed copies per batched forward: ``samples_per_pass`` if given, else one at a
    time on a CPU (a forward already keeps its cores busy: batching gained <25% on tiny MLPs and
    made a BatchNorm CNN 4.8x slower, benchmarks/RESULTS.md; ``stacked``, per model of a stack,
    where the stack already fills the forward) and up to a memory budget elsewhere."""
    if s.samples_per_pass is not None:
        k = s.samples_per_pass
    elif params.device.type == "cpu" or stacked:
        k = 1
    else:
        k = budget.samples_per_pass(params.numel, params.tensors[0].element_size())
    k = min(k, s.n_samples)
    if s.antithetic and k % 2 and (k > 1 or stacked):   # pairs in one pass (n_samples is even)
        k += -1 if k > 1 else 1
    return k


def _sample_of(s: Settings, k: int) -> tuple[int, int]:
    """Sample k's draw index and sign: antithetic pairs share one draw, +xi then -xi."""
    return ((k // 2, (-1) ** k) if s.antithetic else (k, 1))


class _Sequential:
    """One perturbed copy at a time, through the model itself (its parameters view the copy)."""

    def __init__(self, model, s: Settings, flat: FlatState):
        self.model, self.s, self.flat = model, s, flat
        self.attached = False

    def reset(self) -> None:
        """The model's weights back to w0 (for the loss at w0)."""
        if not self.attached:
            self.flat.attach(with_grad=False)
            self.attached = True
        self.flat.reset()

    def evaluate(self, b: int, start: int, k: int, x, y):
        s, losses, errs = self.s, [], []
        for j in range(start, start + k):
            sample, sign = _sample_of(s, j)
            self.flat.perturb(sign * s.rho, s.seed, b, AVERAGE_SAMPLE_BASE + sample, noise_distribution(s.norm))
            loss, err, _ = loss_and_error(s, self.model, x, y)
            losses.append(loss)
            errs.append(err)
        return torch.stack(losses), torch.stack(errs)


class _Batched:
    """K perturbed copies as rows of a ``[K, N]`` buffer, evaluated in one vmapped forward. Its
    first evaluation is the probe: a model that vmap cannot trace is handed to ``fallback`` then,
    for that chunk and every later one (the choice is made once, and kept here)."""

    def __init__(self, model, s: Settings, params: ParamSet, flat: FlatState, K: int, fallback: _Sequential):
        self.s, self.flat, self.fallback = s, flat, fallback
        self.rows = torch.empty((K, params.numel), dtype=flat.w0.dtype, device=params.device)
        self.at_row = loss_and_error_at_row(model, s, params)
        self.vmappable = True

    def reset(self) -> None:
        if not self.vmappable:
            self.fallback.reset()

    def evaluate(self, b: int, start: int, k: int, x, y):
        if self.vmappable:
            s = self.s
            first = AVERAGE_SAMPLE_BASE + _sample_of(s, start)[0]
            _ops.perturb_batched_(self.rows[:k], self.flat.w0, self.flat.c, s.rho, s.seed, b, first, 0,
                                  noise_distribution(s.norm), s.antithetic)
            try:
                return vmap(lambda row: self.at_row(row, x, y)[:2], randomness="error")(self.rows[:k])
            except Exception as e:  # noqa: BLE001 - any vmap limitation: evaluate one by one
                log.debug("sharpfast: cannot vmap this model (%s: %s); evaluating samples one at a time",
                          type(e).__name__, e)
                self.vmappable, self.rows = False, None
                self.fallback.reset()
        return self.fallback.evaluate(b, start, k, x, y)


def solve_many(models, batches, params_list: list[ParamSet], s: Settings) -> list:
    """Average-case sharpness of K models of one architecture: per batch, their losses at ``w0``
    in one vmapped forward, then ``k`` perturbed copies of each model (``[K, k, N]`` rows, each
    model's written from its own ``w0`` and ``c`` with the draws of the one-model call) in one
    vmap over the models of a vmap over the samples. A result per model, or the exception its
    values raise."""
    K, device = len(models), params_list[0].device
    flats, w0 = stacked_flats(params_list, s)
    S = samples_per_pass(s, params_list[0], stacked=True)
    rows = torch.empty((K, S, params_list[0].numel), dtype=w0.dtype, device=device)
    at_row = loss_and_error_at_row(models[0], s, params_list[0])
    state = stacked_state(models, params_list[0])
    labelled = [True]

    def at(row, extra, x, y):
        loss, err, labelled[0] = at_row(row, x, y, extra)
        return loss, err
    at_w0 = vmap(at, in_dims=(0, 0, None, None), randomness="error")
    perturbed = vmap(vmap(at, in_dims=(0, None, None, None), randomness="error"), in_dims=(0, 0, None, None),
                     randomness="error")
    f64 = dict(dtype=torch.float64, device=device)
    per_batch, per_batch_err, init_losses, init_errs, nonfinite = [], [], [], [], []
    with torch.no_grad():
        for b, x, y in batches_on_device(batches, device):
            L0, E0 = at_w0(w0, state, x, y)
            total_loss, total_err = torch.zeros(K, **f64), torch.zeros(K, **f64)
            bad = torch.zeros(K, dtype=torch.bool, device=device)
            for start in range(0, s.n_samples, S):
                k = min(S, s.n_samples - start)
                first = AVERAGE_SAMPLE_BASE + _sample_of(s, start)[0]
                for row, flat in zip(rows, flats):
                    _ops.perturb_batched_(row[:k], flat.w0, flat.c, s.rho, s.seed, b, first, 0,
                                          noise_distribution(s.norm), s.antithetic)
                losses, errs = perturbed(rows[:, :k], state, x, y)
                bad |= ~torch.isfinite(losses).all(dim=1)
                total_loss += losses.double().sum(dim=1)
                total_err += errs.double().sum(dim=1)
            per_batch.append(total_loss / s.n_samples - L0.double())
            per_batch_err.append(total_err / s.n_samples - E0.double())
            init_losses.append(L0)
            init_errs.append(E0)
            nonfinite.append(bad)
    rows_by_model = lambda values: [v[k] for v in values for k in range(K)]   # batch-major: problem (b, k)
    zeros = [torch.zeros((), **f64)] * (len(per_batch) * K)
    host, _ = read_back(Outcomes(*map(rows_by_model, (per_batch, per_batch_err, init_losses, init_errs)), zeros,
                                 rows_by_model(nonfinite)))
    return [r for r, _ in results_by_model(s, host, [], list(range(K)) * len(per_batch), K, labelled[0])]
