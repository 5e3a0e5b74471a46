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


def kendall_tau_a(x: Sequence[float], y: Sequence[float]) -> float:
    """Jiang et al.'s rank correlation (their eq. 4): the mean over ordered pairs ``i != j`` of
    ``sign(x_i - x_j) sign(y_i - y_j)`` (Kendall's tau-a: a pair tied in either counts 0)."""
    x, y = _as_1d(x, "x"), _as_1d(y, "y")
    n = len(x)
    if n < 2:
        return float("nan")
    return float((_signs(x) * _signs(y)).sum()) / (n * (n - 1))


TAU_VARIANTS = ("a", "b")


def granulated_tau(measure: Sequence[float], target: Sequence[float], hparams: Sequence[dict[str, Any]],
                   factors: Sequence[str] | None = None, tau: str = "a") -> Granulated:
    """Jiang et al.'s granulated Kendall coefficients ``psi_i`` and their mean ``Psi``.

    ``hparams[k]`` is model ``k``'s hyperparameter dict; ``factors`` defaults to every
    hyperparameter that varies. Models with a nan measure or target are left out. ``tau="a"`` (the
    default) is Jiang et al.'s definition, the sign sum over all pairs of a group (tied pairs count
    0); ``tau="b"`` takes Kendall's tau-b within each group instead (ties leave the pair count, and
    a group constant in either is undefined and counts 0, tallied in ``n_undefined``).
    """
    if tau not in TAU_VARIANTS:
        raise ValueError(f"tau must be one of {TAU_VARIANTS}, got {tau!r}")
    correlation = kendall_tau_a if tau == "a" else kendall_tau_b
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
            value = correlation(m[idx], t[idx])
            if math.isnan(value):
                undefined += 1
                value = 0.0
            taus.append(value)
        psi[f] = float(np.mean(taus)) if taus else float("nan")
        n_groups[f] = len(taus)
        n_undef[f] = undefined
    return Granulated(psi, n_groups, n_undef)


# ----------------------------------------------------------------------------- conditional mutual information

@dataclass
class ConditionalMI:
    """Jiang et al.'s conditional-independence score ``K``: ``by_subset[S]``, the normalized
    conditional mutual information given the hyperparameters in ``S``, for every subset the
    convention conditions on, and ``score`` their minimum (``argmin`` the subset; nan and None
    where no subset is defined, e.g. fewer than two varied hyperparameters under ``"pgdl"``)."""

    score: float
    argmin: tuple[str, ...] | None
    by_subset: dict[tuple[str, ...], float]
    convention: str = "pgdl"


CMI_CONVENTIONS = ("pgdl", "distinct-pairs")


def conditional_mutual_information(measure: Sequence[float], target: Sequence[float],
                                   hparams: Sequence[dict[str, Any]], factors: Sequence[str] | None = None,
                                   convention: str = "pgdl", max_conditioned: int = 2) -> ConditionalMI:
    """The conditional mutual information score of Jiang et al. (2020, "Fantastic generalization
    measures", §6), the NeurIPS 2020 PGDL competition's metric.

    For a pair of models ``(a, b)``, ``V_g`` is the order of their targets and ``V_mu`` that of their
    measures; ``U_S`` is the pair's values of the hyperparameters in ``S``. A measure that only
    mirrors a hyperparameter carries no information once that hyperparameter is conditioned on, so
    the score is the minimum over ``S`` of ``I(V_mu; V_g | U_S) / H(V_g | U_S)``.

    ``convention="pgdl"`` (the default) computes it as the competition's scoring program does
    (``mutual_information.py``): every ordered pair of models, a model with itself included;
    ``V = [a > b]``, so a tie (and a self-pair) is "-"; ``S`` every pair of two hyperparameters;
    for each value of ``U_S`` the mutual information and ``H(V_g)`` in bits, the entropy with
    ``1e-12`` inside its log, and the score the mean of the former over the values of ``U_S`` over
    the mean of the latter (the program's grids are complete, where this is the conditional
    quantity; here values of ``U_S`` no pair takes are left out, and a score whose mean entropy is
    below 1e-9 is undefined). ``convention="distinct-pairs"``: ordered pairs of distinct models,
    pairs tied in the target left out, a tie in the measure a third value of ``V_mu``, ``S`` every
    subset of at most ``max_conditioned`` hyperparameters, the probabilities of ``U_S`` weighting
    its values. Models with a nan are left out."""
    if convention not in CMI_CONVENTIONS:
        raise ValueError(f"convention must be one of {CMI_CONVENTIONS}, got {convention!r}")
    m, t = _as_1d(measure, "measure"), _as_1d(target, "target")
    if not (len(m) == len(t) == len(hparams)):
        raise ValueError("measure, target and hparams must have the same length")
    keep = [i for i in range(len(m)) if not (math.isnan(m[i]) or math.isnan(t[i]))]
    hp, m, t = [hparams[i] for i in keep], m[keep], t[keep]
    if factors is None:
        factors = varying_factors(hp)
    if len(m) < 2:
        return ConditionalMI(float("nan"), None, {}, convention)
    if convention == "pgdl":
        a, b = (ix.reshape(-1) for ix in np.indices((len(m), len(m))))
        vg, vm = t[a] > t[b], m[a] > m[b]
        subsets, score = list(combinations(factors, 2)), _pgdl_normalized_cmi
    else:
        a, b = np.nonzero(~np.eye(len(m), dtype=bool))
        vg = np.sign(t[a] - t[b])
        a, b, vg = a[vg != 0], b[vg != 0], vg[vg != 0]
        vm = np.sign(m[a] - m[b])
        subsets = [s for k in range(max_conditioned + 1) for s in combinations(factors, k)]
        score = _normalized_cmi
    codes = {f: np.unique([_key(h.get(f)) for h in hp], return_inverse=True)[1] for f in factors}
    by_subset: dict[tuple[str, ...], float] = {}
    for subset in subsets:
        groups = np.zeros(len(a), dtype=np.int64)
        for f in subset:   # the pair's values of f, mixed-radix into one group id
            n_values = int(codes[f].max()) + 1
            groups = (groups * n_values + codes[f][a]) * n_values + codes[f][b]
        by_subset[subset] = score(vm, vg, groups)
    defined = {s: v for s, v in by_subset.items() if not math.isnan(v)}
    if not defined:
        return ConditionalMI(float("nan"), None, by_subset, convention)
    argmin = min(defined, key=defined.get)
    return ConditionalMI(defined[argmin], argmin, by_subset, convention)


def _contingency(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Counts ``[group, value of x, value of y]`` (only the groups that occur)."""
    _, g = np.unique(groups, return_inverse=True)
    _, xi = np.unique(x, return_inverse=True)
    _, yi = np.unique(y, return_inverse=True)
    counts = np.zeros((g.max() + 1, xi.max() + 1, yi.max() + 1))
    np.add.at(counts, (g, xi, yi), 1.0)
    return counts


def _pgdl_normalized_cmi(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """The scoring program's ``mean_g I_g(X; Y) / mean_g H_g(Y)`` (bits; ``1e-12`` in the entropy's log)."""
    if len(y) == 0:
        return float("nan")
    counts = _contingency(x, y, groups)
    p = counts / counts.sum(axis=(1, 2), keepdims=True)          # within each value of U_S
    px, py = p.sum(axis=2, keepdims=True), p.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        mi = np.where(p > 0, p * np.log2(p / (px * py)), 0.0).sum(axis=(1, 2))
    h = -(py * np.log2(py + 1e-12)).sum(axis=(1, 2))
    return float(mi.mean() / h.mean()) if h.mean() > 1e-9 else float("nan")


def _normalized_cmi(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """``I(X; Y | G) / H(Y | G)`` from samples (natural logs; nan where ``H(Y | G) = 0``)."""
    if len(y) == 0:
        return float("nan")
    counts = _contingency(x, y, groups)
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
    """Dziugaite et al.'s robust sign-error: ``robust``, the largest sign-error over the environments
    kept (pairs of settings that differ in one hyperparameter, with an effective sample size of at
    least ``min_ess``); ``mean`` over them; ``by_factor`` the largest per varied hyperparameter;
    ``n_environments`` kept and ``n_dropped`` below ``min_ess`` (all dropped: nan, nothing measured);
    ``max_ess`` the largest effective sample size any environment had."""

    robust: float
    mean: float
    by_factor: dict[str, float]
    n_environments: int
    n_dropped: int = 0
    max_ess: float = 0.0
    min_ess: float = 0.0


PAIRINGS = ("all-runs", "same-seed")
SIGN_WEIGHTS = ("dziugaite", "hoeffding")
MIN_ESS = 12.0   # Dziugaite et al.'s figures keep environments with an effective sample size >= 12


def hoeffding_weight(d: float, n_test: int | None, weighting: str = "dziugaite") -> float:
    """The weight of a pair whose targets differ by ``d``, each measured on ``n_test`` examples.

    ``p = (1 - 2 exp(-n_test d^2 / 2))_+`` bounds by Hoeffding's inequality the probability that the
    sign of the observed ``d`` is the true one. ``"dziugaite"`` (their code's ``hoeffding_weight``
    and Monte-Carlo noise filter): ``(p^2 - 1/2)_+``; ``"hoeffding"``: ``p``. 1 without ``n_test``."""
    if n_test is None:
        return 1.0
    p = max(0.0, 1.0 - 2.0 * math.exp(-n_test * d * d / 2.0))
    return max(0.0, p * p - 0.5) if weighting == "dziugaite" else p


def robust_sign_error(measure: Sequence[float], target: Sequence[float], hparams: Sequence[dict[str, Any]],
                      n_test: int | None = None, factors: Sequence[str] | None = None,
                      seed_factors: Sequence[str] = ("seed",), pairing: str = "all-runs",
                      weighting: str = "dziugaite", min_ess: float = MIN_ESS) -> SignError:
    """The robust sign-error of Dziugaite et al. (NeurIPS 2020, "In search of robust measures of
    generalization"), over coupled pairs of models; the defaults reproduce their code
    (``experiments/coupled_networks``: ``create_environments.py``, ``get_all_losses``).

    A setting is a model's hyperparameters other than the seeds (``seed_factors``); the runs of a
    setting are its models. An environment is two settings that differ in exactly one factor; its
    sign-error is the weighted mean over its pairs of runs of ``(1 - sign(mu_a - mu_b) sign(g_a -
    g_b)) / 2`` (a tie in either is half an error). ``pairing="all-runs"`` pairs every run of one
    setting with every run of the other; ``"same-seed"`` only runs of equal seeds (coupled networks
    sharing their randomness). Each pair is weighted by :func:`hoeffding_weight` of its target
    difference with ``n_test`` examples behind each model's error (``weighting``; all 1 without
    ``n_test``). An environment counts where its effective sample size ``(sum w)^2 / sum w^2`` is at
    least ``min_ess`` (so with one run per setting, one pair, none does unless ``min_ess <= 1``).
    The robust sign-error is the largest over the environments that count."""
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    if weighting not in SIGN_WEIGHTS:
        raise ValueError(f"weighting must be one of {SIGN_WEIGHTS}, got {weighting!r}")
    if isinstance(min_ess, bool) or not isinstance(min_ess, (int, float)) or not min_ess >= 0:
        raise ValueError(f"min_ess must be a number >= 0, got {min_ess!r}")
    m, t = _as_1d(measure, "measure"), _as_1d(target, "target")
    if not (len(m) == len(t) == len(hparams)):
        raise ValueError("measure, target and hparams must have the same length")
    if n_test is not None and (isinstance(n_test, bool) or not isinstance(n_test, int) or n_test < 1):
        raise ValueError(f"n_test must be a positive integer or None, got {n_test!r}")
    keep = [i for i in range(len(m)) if not (math.isnan(m[i]) or math.isnan(t[i]))]
    hp, m, t = [hparams[i] for i in keep], m[keep], t[keep]
    if factors is None:
        factors = [f for f in varying_factors(hp) if f not in seed_factors]
    names = sorted({k for h in hp for k in h} - set(seed_factors))
    seeds = sorted({k for h in hp for k in h} & set(seed_factors))
    factors = [f for f in factors if f in names]   # (none of the models left has the others)
    runs: dict[tuple, list[int]] = {}   # setting -> its models
    for i, h in enumerate(hp):
        runs.setdefault(tuple(_key(h.get(n)) for n in names), []).append(i)
    seed_of = [tuple(_key(h.get(n)) for n in seeds) for h in hp]
    kept: list[tuple[str, float]] = []
    n_dropped, max_ess = 0, 0.0
    for f in factors:
        at = names.index(f)
        by_rest: dict[tuple, list[tuple]] = {}   # settings equal but in f
        for setting in runs:
            by_rest.setdefault(setting[:at] + setting[at + 1:], []).append(setting)
        for settings in by_rest.values():
            for s1, s2 in combinations(settings, 2):
                weights, errors = [], []
                for i in runs[s1]:
                    for j in runs[s2]:
                        if pairing == "same-seed" and seed_of[i] != seed_of[j]:
                            continue
                        weights.append(hoeffding_weight(t[i] - t[j], n_test, weighting))
                        errors.append((1.0 - np.sign(m[i] - m[j]) * np.sign(t[i] - t[j])) / 2.0)
                w = np.asarray(weights)
                total = w.sum()
                ess = total**2 / (w**2).sum() if total > 0 else 0.0
                max_ess = max(max_ess, ess)
                if total > 0 and (ess >= min_ess or math.isclose(ess, min_ess)):
                    kept.append((f, float((w * np.asarray(errors)).sum() / total)))
                else:
                    n_dropped += 1
    if not kept:
        return SignError(float("nan"), float("nan"), {}, 0, n_dropped, max_ess, min_ess)
    by_factor: dict[str, float] = {}
    for f, e in kept:
        by_factor[f] = max(by_factor.get(f, 0.0), e)
    return SignError(max(e for _, e in kept), float(np.mean([e for _, e in kept])), by_factor, len(kept),
                     n_dropped, max_ess, min_ess)
