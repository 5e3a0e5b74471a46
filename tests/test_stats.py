"""Kendall tau-b, granulated tau / Psi (Jiang et al. 2020) and bootstrap CIs."""
import itertools
import math

import numpy as np
import pytest
from scipy.stats import kendalltau

from sharpfast.study.stats import bootstrap_tau, granulated_tau, kendall_tau_b, varying_factors


def test_tau_b_hand_computed_with_ties():
    # pairs: (1,2) C, (1,3) C, (1,4) C, (2,3) tied in x, (2,4) tied in y, (3,4) C
    # C=4, D=0, n0=6, n1=1, n2=1 -> tau_b = 4 / sqrt(5 * 5) = 0.8
    x, y = [1, 2, 2, 3], [1, 3, 2, 3]
    assert kendall_tau_b(x, y) == pytest.approx(0.8, abs=1e-12)
    assert kendalltau(x, y).statistic == pytest.approx(0.8, abs=1e-12)
    # one discordant pair: x=[1,2,3], y=[1,3,2] -> (2 - 1) / 3
    assert kendall_tau_b([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert kendall_tau_b([3, 2, 1], [1, 2, 3]) == pytest.approx(-1.0)


@pytest.mark.parametrize("seed", range(20))
def test_tau_b_matches_scipy_with_heavy_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 60))
    x = rng.integers(0, 4, n).astype(float)        # many ties
    y = x + rng.integers(-2, 3, n)                 # correlated, ties too
    if seed % 3 == 0:
        y = rng.normal(size=n)                     # no ties in y
    expected = kendalltau(x, y, variant="b").statistic
    got = kendall_tau_b(x, y)
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected, abs=1e-12)


def test_tau_b_undefined_and_validation():
    assert math.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))
    assert math.isnan(kendall_tau_b([1], [2]))
    # nan pairs are dropped
    assert kendall_tau_b([1, 2, np.nan, 3], [1, 2, 5, 3]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same length"):
        kendall_tau_b([1, 2], [1, 2, 3])


def test_granulated_hand_computed():
    # 2x2 grid over a, b. Within b=0: measure and target agree (+1); within b=1 they disagree (-1)
    # -> psi_a = 0. Within a=0: agree (+1); within a=1 the target is tied (tau-b undefined,
    # Jiang's sign sum gives 0) -> psi_b = 0.5. Psi = 0.25.
    hp = [{"a": 0, "b": 0}, {"a": 1, "b": 0}, {"a": 0, "b": 1}, {"a": 1, "b": 1}]
    measure = [1.0, 2.0, 3.0, 4.0]
    target = [1.0, 2.0, 4.0, 2.0]
    g = granulated_tau(measure, target, hp)
    assert g.psi == pytest.approx({"a": 0.0, "b": 0.5})
    assert g.n_groups == {"a": 2, "b": 2}
    assert g.n_undefined == {"a": 0, "b": 1}
    assert g.Psi == pytest.approx(0.25)


def test_granulated_matches_brute_force_with_scipy():
    rng = np.random.default_rng(0)
    grid = {"lr": [0.1, 0.2, 0.4], "bs": [16, 128], "aug": [False, True]}
    hp = [dict(zip(grid, v)) for v in itertools.product(*grid.values())]
    n = len(hp)
    measure = rng.normal(size=n)
    target = np.round(measure + rng.normal(size=n), 1)
    g = granulated_tau(measure, target, hp)
    for f in grid:
        others = [k for k in grid if k != f]
        taus = []
        for combo in itertools.product(*(grid[k] for k in others)):
            idx = [i for i, h in enumerate(hp) if all(h[k] == v for k, v in zip(others, combo))]
            t = kendalltau(measure[idx], target[idx]).statistic
            taus.append(0.0 if math.isnan(t) else t)
        assert g.psi[f] == pytest.approx(np.mean(taus), abs=1e-12)
        assert g.n_groups[f] == len(taus)
    assert g.Psi == pytest.approx(np.mean(list(g.psi.values())))


def test_granulated_skips_constant_factors_and_singletons():
    hp = [{"a": 0, "c": 1}, {"a": 1, "c": 1}, {"a": 2, "c": 1}]
    assert varying_factors(hp) == ["a"]
    g = granulated_tau([1, 2, 3], [3, 2, 1], hp)
    assert g.psi == {"a": -1.0}
    # a factor whose every group has one model has no defined psi
    hp2 = [{"a": 0, "b": 0}, {"a": 1, "b": 1}]
    g2 = granulated_tau([1, 2], [1, 2], hp2)
    assert math.isnan(g2.psi["a"]) and g2.n_groups["a"] == 0
    assert math.isnan(g2.Psi)


def test_bootstrap_ci():
    rng = np.random.default_rng(1)
    x = rng.normal(size=40)
    y = x + rng.normal(size=40)
    ci = bootstrap_tau(x, y, n_boot=500, seed=3)
    assert ci.tau == pytest.approx(kendalltau(x, y).statistic)
    assert -1 <= ci.low < ci.tau < ci.high <= 1
    assert ci.n_boot == 500
    again = bootstrap_tau(x, y, n_boot=500, seed=3)
    assert (again.low, again.high) == (ci.low, ci.high)   # seeded
    # a perfectly monotone relation stays +1 under every resample (ties from duplicates are handled)
    mono = bootstrap_tau(np.arange(10.0), np.arange(10.0) ** 2, n_boot=200)
    assert mono.low == mono.high == 1.0
    # wider samples give narrower intervals
    x2 = rng.normal(size=400)
    ci2 = bootstrap_tau(x2, x2 + rng.normal(size=400), n_boot=300)
    assert ci2.high - ci2.low < ci.high - ci.low
