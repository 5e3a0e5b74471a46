"""Rank-correlation statistics for generalization measures.

* :func:`kendall_tau_b` — Kendall's tau-b (ties in either variable handled), the statistic
  ``scipy.stats.kendalltau`` computes by default:
  ``tau_b = (C - D) / sqrt((n0 - n1) (n0 - n2))`` with ``n0 = n(n-1)/2`` pairs, ``n1`` / ``n2``
  the pairs tied in ``x`` / ``y``. ``nan`` where either variable is constant.
* :func:`granulated_tau` and Psi — Jiang et al. (ICLR 2020), "Fantastic generalization measures
  and where to find them", eq. (4)-(5): for hyperparameter ``i``, the models are grouped by
  the values of all *other* hyperparameters; ``psi_i`` is the mean over those groups of the
  rank correlation within the group (where only ``i`` varies); ``Psi`` is the mean of ``psi_i``
  over the hyperparameters. As in Jiang et al.'s sign-sum definition, a group in which the
  measure or the target is constant contributes 0 (tau-b is undefined there, tau-a is 0), and
  groups with a single model are not groups (nothing varies).
* :func:`bootstrap_tau` — percentile bootstrap confidence interval of tau-b over models.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np


def _as_1d(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def _signs(a: np.ndarray) -> np.ndarray:
    """``sign(a_i - a_j)`` over the last axis, as a ``[..., n, n]`` array."""
    return np.sign(a[..., :, None] - a[..., None, :])


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two equally long sequences (pairs with a nan are dropped)."""
    x, y = _as_1d(x, "x"), _as_1d(y, "y")
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if len(x) < 2:
        return float("nan")
    if len(x) > 3000:  # O(n^2) memory below; scipy's O(n log n) above
        from scipy.stats import kendalltau

        return float(kendalltau(x, y, variant="b").statistic)
    sx, sy = _signs(x), _signs(y)
    num = float((sx * sy).sum())
    den = math.sqrt(float((sx * sx).sum()) * float((sy * sy).sum()))
    return num / den if den > 0 else float("nan")


def _tau_b_batched(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """tau-b of each row pair of ``[B, n]`` arrays (nan where a row is constant)."""
    sx, sy = _signs(x), _signs(y)
    num = (sx * sy).sum(axis=(1, 2))
    den = np.sqrt((sx * sx).sum(axis=(1, 2)) * (sy * sy).sum(axis=(1, 2)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


@dataclass
class BootstrapCI:
    tau: float
    low: float
    high: float
    n_boot: int
    level: float


def bootstrap_tau(x: Sequence[float], y: Sequence[float], n_boot: int = 1000, level: float = 0.95,
                  seed: int = 0) -> BootstrapCI:
    """Percentile bootstrap CI of tau-b, resampling models with replacement (seeded)."""
    x, y = _as_1d(x, "x"), _as_1d(y, "y")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    tau = kendall_tau_b(x, y)
    n = len(x)
    if n < 3 or not n_boot:
        return BootstrapCI(tau, float("nan"), float("nan"), 0, level)
    rng = np.random.default_rng(seed)
    taus = []
    chunk = max(1, int(2e7 // (n * n)))
    left = n_boot
    while left > 0:
        b = min(chunk, left)
        idx = rng.integers(0, n, size=(b, n))
        taus.append(_tau_b_batched(x[idx], y[idx]))
        left -= b
    t = np.concatenate(taus)
    t = t[~np.isnan(t)]
    if len(t) == 0:
        return BootstrapCI(tau, float("nan"), float("nan"), 0, level)
    a = (1 - level) / 2
    return BootstrapCI(tau, float(np.quantile(t, a)), float(np.quantile(t, 1 - a)), len(t), level)


# ----------------------------------------------------------------------------- granulated

def _key(v: Any) -> str:
    return json.dumps(v, sort_keys=True)


@dataclass
class Granulated:
    """``psi[h]``: granulated tau for hyperparameter ``h``; ``Psi``: their mean."""

    psi: dict[str, float]
    n_groups: dict[str, int]
    n_undefined: dict[str, int] = field(default_factory=dict)

    @property
    def Psi(self) -> float:
        vals = [v for v in self.psi.values() if not math.isnan(v)]
        return float(np.mean(vals)) if vals else float("nan")


def varying_factors(hparams: Sequence[dict[str, Any]]) -> list[str]:
    """Hyperparameters that take more than one value across the models (in first-seen order)."""
    names: list[str] = []
    for h in hparams:
        for k in h:
            if k not in names:
                names.append(k)
    return [k for k in names if len({_key(h.get(k)) for h in hparams}) > 1]


def granulated_tau(measure: Sequence[float], target: Sequence[float], hparams: Sequence[dict[str, Any]],
                   factors: Sequence[str] | None = None) -> Granulated:
    """Jiang et al.'s granulated Kendall coefficients ``psi_i`` and their mean ``Psi``.

    ``hparams[k]`` is model ``k``'s hyperparameter dict; ``factors`` defaults to every
    hyperparameter that varies. Models with a nan measure or target are left out.
    """
    m, t = _as_1d(measure, "measure"), _as_1d(target, "target")
    if not (len(m) == len(t) == len(hparams)):
        raise ValueError("measure, target and hparams must have the same length")
    keep = [i for i in range(len(m)) if not (math.isnan(m[i]) or math.isnan(t[i]))]
    hp = [hparams[i] for i in keep]
    m, t = m[keep], t[keep]
    if factors is None:
        factors = varying_factors(hp)
    all_names = sorted({k for h in hp for k in h})
    psi, n_groups, n_undef = {}, {}, {}
    for f in factors:
        others = [k for k in all_names if k != f]
        groups: dict[str, list[int]] = {}
        for i, h in enumerate(hp):
            groups.setdefault(_key([h.get(k) for k in others]), []).append(i)
        taus, undefined = [], 0
        for idx in groups.values():
            if len({_key(hp[i].get(f)) for i in idx}) < 2:
                continue  # nothing varies in this group
            tau = kendall_tau_b(m[idx], t[idx])
            if math.isnan(tau):
                undefined += 1
                tau = 0.0
            taus.append(tau)
        psi[f] = float(np.mean(taus)) if taus else float("nan")
        n_groups[f] = len(taus)
        n_undef[f] = undefined
    return Granulated(psi, n_groups, n_undef)
