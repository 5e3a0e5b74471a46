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
* :func:`conditional_mutual_information` — Jiang et al.'s conditional-independence score (the PGDL
  competition's metric): the normalized mutual information between the measure's and the
  target's orderings of model pairs, minimized over conditioning on up to two hyperparameters.
* :func:`robust_sign_error` — Dziugaite et al. (2020): how often the measure orders a coupled
  pair (one hyperparameter changed) against the target, Hoeffding-weighted, worst environment.
"""
from __future__ import annotations

import json
import math
from itertools import combinations
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


# ----------------------------------------------------------------------------- conditional mutual information

@dataclass
class ConditionalMI:
    """Jiang et al.'s conditional-independence score ``K``: ``by_subset[S] = I(V_mu; V_g | U_S) /
    H(V_g | U_S)`` for every hyperparameter subset ``S`` of at most ``max_conditioned`` factors, and
    ``score`` their minimum (``argmin`` the subset). Subsets that decide ``V_g`` alone
    (``H(V_g | U_S) = 0``: nothing left to explain) are left out of the minimum."""

    score: float
    argmin: tuple[str, ...] | None
    by_subset: dict[tuple[str, ...], float]


def conditional_mutual_information(measure: Sequence[float], target: Sequence[float],
                                   hparams: Sequence[dict[str, Any]], factors: Sequence[str] | None = None,
                                   max_conditioned: int = 2) -> ConditionalMI:
    """The PGDL conditional mutual information score (Jiang et al. 2020, "Fantastic generalization
    measures", §6; the NeurIPS 2020 PGDL competition's metric).

    Over ordered pairs of distinct models ``(a, b)`` drawn uniformly, ``V_g = sign(g_a - g_b)`` and
    ``V_mu = sign(mu_a - mu_b)``; ``U_S`` is the pair's values of the hyperparameters in ``S``. A
    measure that only mirrors a hyperparameter carries no information once that hyperparameter is
    conditioned on, so the score is the minimum over ``S`` with ``|S| <= max_conditioned`` of the
    normalized conditional mutual information. Pairs tied in the target are left out (no order to
    predict); ties in the measure are a third value of ``V_mu``. Models with a nan are left out."""
    m, t = _as_1d(measure, "measure"), _as_1d(target, "target")
    if not (len(m) == len(t) == len(hparams)):
        raise ValueError("measure, target and hparams must have the same length")
    keep = [i for i in range(len(m)) if not (math.isnan(m[i]) or math.isnan(t[i]))]
    hp, m, t = [hparams[i] for i in keep], m[keep], t[keep]
    if factors is None:
        factors = varying_factors(hp)
    a, b = np.nonzero(~np.eye(len(m), dtype=bool))
    vg = np.sign(t[a] - t[b])
    a, b, vg = a[vg != 0], b[vg != 0], vg[vg != 0]
    vm = np.sign(m[a] - m[b])
    codes = {f: np.unique([_key(h.get(f)) for h in hp], return_inverse=True)[1] for f in factors}
    by_subset: dict[tuple[str, ...], float] = {}
    for k in range(max_conditioned + 1):
        for subset in combinations(factors, k):
            groups = np.zeros(len(a), dtype=np.int64)
            for f in subset:   # the pair's values of f, mixed-radix into one group id
                n_values = int(codes[f].max()) + 1
                groups = (groups * n_values + codes[f][a]) * n_values + codes[f][b]
            by_subset[subset] = _normalized_cmi(vm, vg, groups)
    defined = {s: v for s, v in by_subset.items() if not math.isnan(v)}
    if not defined:
        return ConditionalMI(float("nan"), None, by_subset)
    argmin = min(defined, key=defined.get)
    return ConditionalMI(defined[argmin], argmin, by_subset)


def _normalized_cmi(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """``I(X; Y | G) / H(Y | G)`` from samples (natural logs; nan where ``H(Y | G) = 0``)."""
    if len(y) == 0:
        return float("nan")
    _, g = np.unique(groups, return_inverse=True)
    _, xi = np.unique(x, return_inverse=True)
    _, yi = np.unique(y, return_inverse=True)
    counts = np.zeros((g.max() + 1, xi.max() + 1, yi.max() + 1))
    np.add.at(counts, (g, xi, yi), 1.0)
    p = counts / counts.sum()
    pg = p.sum(axis=(1, 2), keepdims=True)
    pxg, pyg = p.sum(axis=2, keepdims=True), p.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        mi = np.where(p > 0, p * np.log(p * pg / (pxg * pyg)), 0.0).sum()
        h = -np.where(pyg > 0, pyg * np.log(pyg / pg), 0.0).sum()
    return float(mi / h) if h > 1e-12 else float("nan")


# ----------------------------------------------------------------------------- robust sign-error

@dataclass
class SignError:
    """Dziugaite et al.'s robust sign-error: ``robust``, the largest sign-error over environments
    (pairs of settings that differ in one hyperparameter); ``mean`` over environments; ``by_factor``
    the largest per varied hyperparameter; ``n_environments`` with a nonzero weight."""

    robust: float
    mean: float
    by_factor: dict[str, float]
    n_environments: int


def robust_sign_error(measure: Sequence[float], target: Sequence[float], hparams: Sequence[dict[str, Any]],
                      n_test: int | None = None, factors: Sequence[str] | None = None,
                      seed_factors: Sequence[str] = ("seed",)) -> SignError:
    """The robust sign-error of Dziugaite et al. (NeurIPS 2020, "In search of robust measures of
    generalization"), over coupled pairs of models.

    A pair is two models whose hyperparameters differ in exactly one factor that is not a seed
    (the seed included in "the others": coupled networks share their randomness). An environment
    is the varied factor, its two values and the other settings; its sign-error is the weighted
    mean over its pairs of ``|sign(mu_a - mu_b) - sign(g_a - g_b)| / 2`` (a tie in the measure is half
    an error). Each pair is weighted by Hoeffding's lower bound on the probability that the sign of
    the observed target difference ``d`` is right, with ``n_test`` examples behind each model's
    error: ``max(0, 1 - 2 exp(-n_test d^2 / 2))`` (unweighted where ``n_test`` is None). Pairs tied in
    the target are left out. The robust sign-error is the largest over the environments."""
    m, t = _as_1d(measure, "measure"), _as_1d(target, "target")
    if not (len(m) == len(t) == len(hparams)):
        raise ValueError("measure, target and hparams must have the same length")
    if n_test is not None and (isinstance(n_test, bool) or not isinstance(n_test, int) or n_test < 1):
        raise ValueError(f"n_test must be a positive integer or None, got {n_test!r}")
    keep = [i for i in range(len(m)) if not (math.isnan(m[i]) or math.isnan(t[i]))]
    hp, m, t = [hparams[i] for i in keep], m[keep], t[keep]
    if factors is None:
        factors = [f for f in varying_factors(hp) if f not in seed_factors]
    names = sorted({k for h in hp for k in h})
    keys = [{k: _key(h.get(k)) for k in names} for h in hp]
    environments: dict[tuple, list[tuple[float, float]]] = {}
    for f in factors:   # coupled pairs: equal on every other hyperparameter (seed included), f differs
        groups: dict[tuple, list[int]] = {}
        for i, k in enumerate(keys):
            groups.setdefault(tuple(k[n] for n in names if n != f), []).append(i)
        for idx in groups.values():
            for i, j in combinations(idx, 2):
                d = t[i] - t[j]
                if keys[i][f] == keys[j][f] or d == 0:
                    continue
                weight = 1.0 if n_test is None else max(0.0, 1.0 - 2.0 * math.exp(-n_test * d * d / 2.0))
                error = abs(np.sign(m[i] - m[j]) - np.sign(d)) / 2.0
                others = tuple(keys[i][n] for n in names if n != f and n not in seed_factors)
                env = (f, *sorted((keys[i][f], keys[j][f])), others)
                environments.setdefault(env, []).append((weight, float(error)))
    errors: list[tuple[str, float]] = []
    for (f, *_), pairs in environments.items():
        total = sum(w for w, _ in pairs)
        if total > 0:
            errors.append((f, sum(w * e for w, e in pairs) / total))
    if not errors:
        return SignError(float("nan"), float("nan"), {}, 0)
    by_factor: dict[str, float] = {}
    for f, e in errors:
        by_factor[f] = max(by_factor.get(f, 0.0), e)
    return SignError(max(e for _, e in errors), float(np.mean([e for _, e in errors])), by_factor, len(errors))
