"""What an evaluation returns, and the checks that keep a non-finite number out of it."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SharpnessResult:
    """What an evaluation returns.

    ``sharpness``: mean over batches of the loss increase; ``err_sharpness``: the same for the 0-1
    error (None without class labels); ``per_batch`` / ``per_batch_err``: one value per batch;
    ``delta_norm``: worst-case, the largest ``||delta||_2`` over batches at the best point found
    (0.0 for average-case); ``init_loss`` / ``init_err``: mean loss / error at ``w``.

    Worst-case diagnostics: ``solver``; ``restarts_improved``, per batch, how many starts after the
    first found a higher loss than every start before them (0 everywhere: more restarts would
    likely not help); ``quadratic_model`` (l2, when computed: ``init="eigen"`` or
    ``quadratic_model=True``), the mean over batches of ``rho ||c g|| + rho^2/2 max(lambda_max, 0)``
    with ``g`` the gradient and ``lambda_max`` the top eigenvalue of ``C H C`` at ``w``: the
    second-order model's bound on the maximum, which the found value approaches as rho -> 0 when
    the solver finds the local maximum (``per_batch_quadratic_model``: one per batch).

    Geodesic sharpness: ``geodesic_correction``, the largest over batches of
    ``||Gamma(xi, xi) / 2||_w / ||xi||_w`` at the best point (0 without the correction): above 1 the
    second-order map has left the region where it approximates the geodesic (a warning says so);
    ``gl_blocks``, the number of GL blocks the metric treats (0: the value is the adaptive worst
    case; with ``blocks="auto"`` a warning says so).
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
    solver: str | None = None
    restarts_improved: list[int] | None = None
    quadratic_model: float | None = None
    per_batch_quadratic_model: list[float] | None = field(default=None, repr=False)
    geodesic_correction: float | None = None
    gl_blocks: int | None = None


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


def mean(values) -> float:
    return sum(values) / len(values)


def summarize(s, backend: str, per_batch, per_batch_err, init_losses, init_errs, delta_norm: float,
              **diagnostics) -> SharpnessResult:
    """The result of per-batch outcomes under settings ``s``: the means over the m-batches; the
    error's only where every batch has one; ``diagnostics``: a measure's own fields of the result
    (the solver, the restarts that improved, the quadratic model, the geodesic correction)."""
    has_err = len(per_batch_err) == len(per_batch)
    return SharpnessResult(
        sharpness=mean(per_batch), err_sharpness=mean(per_batch_err) if has_err else None,
        per_batch=per_batch, per_batch_err=per_batch_err if has_err else None,
        delta_norm=delta_norm, init_loss=mean(init_losses),
        init_err=mean(init_errs) if has_err else None, backend=backend, kind=s.kind,
        settings=s.describe(), **diagnostics)


def delta_l2_norm(delta: list[torch.Tensor]) -> float:
    """``||delta||_2``, reported as the result's ``delta_norm``: summed over ``delta / max|delta_i|``, so
    that float64 perturbations of weights near the largest float have a finite norm where it is one."""
    largest = max((float(d.detach().abs().max()) for d in delta if d.numel()), default=0.0)
    if largest == 0.0 or not math.isfinite(largest):
        return largest
    pieces = [piece for d in delta for piece in d.detach().reshape(-1).split(2**20)]   # float64 a piece at a time
    return largest * math.sqrt(sum(float((piece.double() / largest).pow(2).sum()) for piece in pieces))
