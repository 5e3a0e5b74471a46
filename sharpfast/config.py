"""Validated settings of one sharpness evaluation, and its result.

Every public entry point turns its arguments into a :class:`Settings` through
:func:`make_settings`, which rejects bad input with a ``ValueError``/``TypeError`` naming the
problem, so no backend ever sees a NaN-producing configuration.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from .apgd import bisection_tolerance
from .objective import Objective, resolve_logit_normalization
from .params import ParamSet, ScaleSpec
from .precision import check_policy

NORMS = ("l2", "linf")
BACKENDS = ("auto", "reference", "fused")


@dataclass
class SharpnessResult:
    """What an evaluation returns.

    ``sharpness``: mean over batches of the loss increase; ``err_sharpness``: the same for the 0-1
    error (None without class labels); ``per_batch`` / ``per_batch_err``: one value per batch;
    ``delta_norm``: worst-case, the largest ``||delta||_2`` over batches at the best point found
    (0.0 for average-case); ``init_loss`` / ``init_err``: mean loss / error at ``w``.
    """

    sharpness: float
    err_sharpness: float | None
    per_batch: list[float]
    per_batch_err: list[float] | None
    delta_norm: float
    init_loss: float
    init_err: float | None
    backend: str
    kind: str
    settings: dict = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Settings:
    kind: str                  # "worst" or "average"
    rho: float
    norm: str
    scale: ScaleSpec
    objective: Objective
    seed: int
    backend: str
    eval_mode: bool = True
    low_precision: str = "float32"  # fp16/bf16 parameters: evaluate a float32 copy, or "error" (precision.py)
    # worst-case
    n_iters: int = 20
    n_restarts: int = 1
    rand_init: bool = False
    step_size_mult: float = 1.0
    min_update_ratio: float = 0.75
    projection_tol: float = 1e-5   # absolute tolerance of the ellipsoid bisection (apgd.bisection_tolerance)
    solve_batches_together: bool | None = None  # one vmapped forward/backward for all m-batches; None: by device
    # average-case
    n_samples: int = 20
    antithetic: bool = False
    samples_per_pass: int | None = None  # perturbed copies per batched forward; None: by device (fused.py)

    def describe(self) -> dict:
        d = {k: getattr(self, k) for k in ("kind", "rho", "norm", "seed", "eval_mode")}
        d.update(adaptive=self.scale.adaptive, adaptive_eta=self.scale.eta,
                 adaptive_weights_only=self.scale.weights_only, custom_scale=bool(self.scale.custom),
                 normalize_logits=self.objective.logit_normalization)
        if self.kind == "worst":
            d.update(n_iters=self.n_iters, n_restarts=self.n_restarts, rand_init=self.rand_init,
                     step_size_mult=self.step_size_mult)
        else:
            d.update(n_samples=self.n_samples, antithetic=self.antithetic)
        return d


def _positive_int(name: str, v: Any, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return int(v)


def _positive_float(name: str, v: Any, allow_zero: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {v}")
    return v


def _check_scale(scale: Mapping[str, torch.Tensor] | None, params: ParamSet) -> dict | None:
    if scale is None:
        return None
    if not isinstance(scale, Mapping):
        raise TypeError(f"scale must be a dict {{parameter name: tensor}}, got {type(scale).__name__}")
    shapes = dict(zip(params.names, (p.shape for p in params.tensors)))
    checked = {}
    for name, c in scale.items():
        if name not in shapes:
            raise ValueError(f"scale names {name!r}, which is not a trainable floating-point "
                             f"parameter of the model (known: {', '.join(params.names[:8])}"
                             f"{', ...' if len(params.names) > 8 else ''})")
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"scale[{name!r}] must be a tensor, got {type(c).__name__}")
        if tuple(c.shape) != tuple(shapes[name]):
            raise ValueError(f"scale[{name!r}] has shape {tuple(c.shape)}, but the parameter has "
                             f"shape {tuple(shapes[name])}")
        c = c.detach()
        if not torch.isfinite(c).all():
            raise ValueError(f"scale[{name!r}] has non-finite entries")
        if (c < 0).any():
            raise ValueError(f"scale[{name!r}] has negative entries; c must be >= 0 (0 freezes a coordinate)")
        checked[name] = c
    return checked


def check_model(model: nn.Module) -> ParamSet:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = ParamSet(model)
    if len(params) == 0 or params.numel == 0:
        raise ValueError("the model has no trainable floating-point parameters "
                         "(requires_grad=True) to perturb")
    for name, p in zip(params.names, params.tensors):
        if not torch.isfinite(p.detach()).all():
            raise ValueError(f"parameter {name!r} has non-finite values (NaN or inf)")
    devices = {p.device for p in params.tensors}
    if len(devices) > 1:
        raise ValueError(f"all trainable parameters must be on one device, found {sorted(map(str, devices))}")
    return params


def make_settings(kind: str, model: nn.Module, *, rho, norm, adaptive, scale, loss_fn,
                  normalize_logits, seed, backend, adaptive_eta=0.0, adaptive_weights_only=False,
                  eval_mode=True, error_fn=None, low_precision="float32", **specific) -> tuple[Settings, ParamSet]:
    params = check_model(model)
    rho = _positive_float("rho", rho)
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected 'l2' or 'linf'")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError("loss_fn must be callable as loss_fn(output, y)")
    if error_fn is not None and not callable(error_fn):
        raise TypeError("error_fn must be callable as error_fn(output, y)")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2^64), got {seed!r}")
    spec = ScaleSpec(adaptive=bool(adaptive), eta=_positive_float("adaptive_eta", adaptive_eta, allow_zero=True),
                     weights_only=bool(adaptive_weights_only), custom=_check_scale(scale, params))
    objective = Objective(loss_fn=loss_fn, logit_normalization=resolve_logit_normalization(normalize_logits),
                          error_fn=error_fn)
    common = dict(kind=kind, rho=rho, norm=norm, scale=spec, objective=objective, seed=int(seed),
                  backend=backend, eval_mode=bool(eval_mode), low_precision=check_policy(low_precision))
    if kind == "worst":
        n_iters = _positive_int("n_iters", specific.get("n_iters", 20))
        n_restarts = _positive_int("n_restarts", specific.get("n_restarts", 1))
        rand_init = bool(specific.get("rand_init", False))
        if n_restarts > 1 and not rand_init:
            raise ValueError("n_restarts > 1 needs rand_init=True (restarts from delta = 0 are identical)")
        together = specific.get("solve_batches_together")
        if together is not None and not isinstance(together, bool):
            raise TypeError(f"solve_batches_together must be True, False or None, got {together!r}")
        settings = Settings(**common, n_iters=n_iters, n_restarts=n_restarts, rand_init=rand_init,
                            solve_batches_together=together,
                            step_size_mult=_positive_float("step_size_mult", specific.get("step_size_mult", 1.0)),
                            min_update_ratio=_positive_float("min_update_ratio",
                                                             specific.get("min_update_ratio", 0.75), allow_zero=True),
                            projection_tol=bisection_tolerance(rho, None if specific.get("projection_tol") is None else
                                                               _positive_float("projection_tol", specific["projection_tol"])))
    elif kind == "average":
        n_samples = _positive_int("n_samples", specific.get("n_samples", 20))
        antithetic = bool(specific.get("antithetic", False))
        if antithetic and n_samples % 2:
            raise ValueError(f"antithetic=True pairs +xi and -xi: n_samples must be even, got {n_samples}")
        samples_per_pass = specific.get("samples_per_pass")
        if samples_per_pass is not None:
            samples_per_pass = _positive_int("samples_per_pass", samples_per_pass)
        settings = Settings(**common, n_samples=n_samples, antithetic=antithetic, samples_per_pass=samples_per_pass)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return settings, params


def check_finite_loss(loss: float, where: str) -> None:
    if not math.isfinite(loss):
        raise ValueError(f"the loss is not finite ({loss}) {where}; check the model, the data and "
                         "loss_fn (and, at perturbed points, whether rho is too large)")


def check_batches(data: Any) -> list:
    """Materialize ``data`` (an iterable of batches) once; reject an empty one."""
    if isinstance(data, torch.Tensor) or not hasattr(data, "__iter__"):
        raise TypeError(f"data must be an iterable of (x, y) batches, got {type(data).__name__}")
    batches = list(data)
    if not batches:
        raise ValueError("data is empty: pass at least one (x, y) batch")
    return batches

