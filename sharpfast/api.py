"""The public entry points: validate, guard the model, apply the precision policy, dispatch to
a backend."""
from __future__ import annotations

import warnings
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from . import precision, reference
from .config import SharpnessResult, check_batches, make_settings
from .params import ModelGuard, ParamSet


def resolve_backend(backend: str, params: ParamSet) -> str:
    """``"auto"`` picks the fused backend where the extension supports the parameters and passes
    its self-test on their device (:mod:`sharpfast.kernel_check`, once per device per process), else
    the reference (with a warning when the self-test failed). ``"fused"`` raises instead."""
    if backend == "reference":
        return "reference"
    from . import fused, kernel_check  # imported lazily: the reference needs no extension
    available, why = fused.available(params)
    if available:
        report = kernel_check.verified(params.device)
        if not report.ok:
            available = False
            why = (f"the extension's self-test failed on {report.device} for {', '.join(report.failed)} "
                   f"({'; '.join(c.message for c in report.checks if not c.ok)}); run `sharpfast doctor`")
            if backend == "auto":
                warnings.warn(f"sharpfast: using the pure-PyTorch reference: {why}", RuntimeWarning, stacklevel=4)
    if backend == "fused" and not available:
        raise RuntimeError(f"backend='fused' is not available for these parameters on {params.device}: {why}")
    return "fused" if available else "reference"


def _evaluate(kind: str, model: nn.Module, data: Iterable, **kwargs) -> SharpnessResult:
    settings, params = make_settings(kind, model, **kwargs)
    batches = check_batches(data)
    with ModelGuard(model, eval_mode=settings.eval_mode):
        batches = precision.apply_policy(model, params, batches, settings.low_precision)
        backend = resolve_backend(settings.backend, params)
        if backend == "fused":
            from . import fused
            impl = fused.worst_case_sharpness if kind == "worst" else fused.average_sharpness
        else:
            impl = reference.worst_case_sharpness if kind == "worst" else reference.average_sharpness
        return impl(model, batches, params, settings)


def worst_case_sharpness(
    model: nn.Module, data: Iterable, rho: float, norm: str = "linf", adaptive: bool = True,
    scale: Mapping[str, torch.Tensor] | None = None, loss_fn: Callable | None = None,
    normalize_logits: bool | str = False, n_iters: int = 20, n_restarts: int = 1,
    rand_init: bool = False, step_size_mult: float = 1.0, seed: int = 0, backend: str = "auto",
    adaptive_eta: float = 0.0, adaptive_weights_only: bool = False, eval_mode: bool = True,
    min_update_ratio: float = 0.75, projection_tol: float | None = None,
    solve_batches_together: bool | None = None, error_fn: Callable | None = None,
    low_precision: str = "float32",
) -> SharpnessResult:
    """Worst-case sharpness ``E_S max_{||delta/c||_p <= rho} L_S(w + delta) - L_S(w)`` by APGD.

    ``data``: iterable of ``(x, y)`` (or ``(x, _, y, _, _)``) batches, one per m-sharpness batch.
    ``norm``: ``"linf"`` or ``"l2"``. ``adaptive``: ``c = |w|`` (+ ``adaptive_eta``; only weight
    matrices with ``adaptive_weights_only``), else ``c = 1``; ``scale``: ``{name: c}`` overrides.
    ``normalize_logits``: ``True``/``"norm"`` (published code) or ``"std"`` (slides).
    ``projection_tol``: absolute tolerance of the l2 ellipsoid bisection; default
    ``1e-5 * min(1, rho)`` (the published code's 1e-5 is absolute, see ``apgd.bisection_tolerance``).
    ``solve_batches_together``: the fused backend solves the m-batches' APGD problems in one
    vmapped forward/backward per step (batches of one shape; same results); default: on a GPU
    when the ``[batches, parameters]`` buffers fit, else one batch at a time.
    ``error_fn(output, y)``: the batch's mean error for ``err_sharpness``; by default the
    classification error where outputs and labels are a classification pair (see
    ``objective.Objective``), else ``err_sharpness`` is None.
    ``low_precision``: for float16/bfloat16 parameters, ``"float32"`` (default) evaluates a float32
    copy of the same weights (a half-precision perturbation rounds away), ``"error"`` raises
    (see ``sharpfast.precision``).
    The model is left exactly as it was, also after an exception or interrupt.
    """
    return _evaluate("worst", model, data, rho=rho, norm=norm, adaptive=adaptive, scale=scale,
                     loss_fn=loss_fn, normalize_logits=normalize_logits, n_iters=n_iters,
                     n_restarts=n_restarts, rand_init=rand_init, step_size_mult=step_size_mult,
                     seed=seed, backend=backend, adaptive_eta=adaptive_eta,
                     adaptive_weights_only=adaptive_weights_only, eval_mode=eval_mode,
                     min_update_ratio=min_update_ratio, projection_tol=projection_tol,
                     solve_batches_together=solve_batches_together, error_fn=error_fn,
                     low_precision=low_precision)


def average_sharpness(
    model: nn.Module, data: Iterable, rho: float, norm: str = "l2", adaptive: bool = True,
    scale: Mapping[str, torch.Tensor] | None = None, loss_fn: Callable | None = None,
    normalize_logits: bool | str = False, n_samples: int = 20, seed: int = 0,
    backend: str = "auto", adaptive_eta: float = 0.0, adaptive_weights_only: bool = False,
    eval_mode: bool = True, antithetic: bool = False, samples_per_pass: int | None = None,
    error_fn: Callable | None = None, low_precision: str = "float32",
) -> SharpnessResult:
    """Average-case sharpness ``E_S E_xi L_S(w + rho * c * xi) - L_S(w)``.

    ``xi ~ N(0, I)`` for ``norm="l2"``, ``U(-1, 1)`` for ``"linf"``; ``n_samples`` draws per batch
    (``antithetic=True`` pairs ``+xi`` with ``-xi``, cancelling the odd terms of the estimate).
    ``samples_per_pass``: perturbed copies evaluated in one batched (vmapped) forward by the fused
    backend; default: as many as a memory budget allows on a GPU, one at a time on a CPU (there a
    forward already keeps the cores busy, and batched convolutions are slower). Any choice gives
    the same draws. Other arguments as :func:`worst_case_sharpness`.
    """
    return _evaluate("average", model, data, rho=rho, norm=norm, adaptive=adaptive, scale=scale,
                     loss_fn=loss_fn, normalize_logits=normalize_logits, n_samples=n_samples,
                     seed=seed, backend=backend, adaptive_eta=adaptive_eta,
                     adaptive_weights_only=adaptive_weights_only, eval_mode=eval_mode,
                     antithetic=antithetic, samples_per_pass=samples_per_pass, error_fn=error_fn,
                     low_precision=low_precision)


__all__ = ["worst_case_sharpness", "average_sharpness", "SharpnessResult", "resolve_backend"]
