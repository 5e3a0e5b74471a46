"""Kendall tau-b, granulated tau / Psi (Jiang et al. 2020) and bootstrap CIs."""
import itertools
import math

import numpy as np
import pytest
from scipy.stats import kendalltau

from sharpfast.study import stats
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


# ----------------------------------------------------------------------------- CMI and robust sign-error

def test_conditional_mutual_information_by_hand():
    """Three models, target order 0 < 1 < 2, measure order 0 < 2 < 1: over the 6 ordered pairs the
    joint of (V_mu, V_g) is (-,-) 2, (+,-) 1, (+,+) 2, (-,+) 1, both marginals uniform, so
    I = 2/3 log(4/3) + 1/3 log(2/3) and H(V_g) = log 2."""
    r = stats.conditional_mutual_information([0, 2, 1], [0, 1, 2], [{}, {}, {}])
    want = (2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)) / math.log(2)
    assert r.score == pytest.approx(want, rel=1e-12) and r.argmin == ()
    assert stats.conditional_mutual_information([5, 5, 5], [0, 1, 2], [{}, {}, {}]).score == 0.0


def test_conditional_mutual_information_discounts_a_measure_that_mirrors_a_hyperparameter():
    hp = [dict(lr=lr, width=w) for lr in (1, 2) for w in (1, 2, 3)]
    target = [h["lr"] + 0.1 * h["width"] for h in hp]
    mirror = stats.conditional_mutual_information([h["lr"] for h in hp], target, hp)
    assert mirror.by_subset[()] > 0.3                    # informative on its own ...
    assert mirror.score == 0.0 and "lr" in mirror.argmin  # ... and nothing once lr is known
    exact = stats.conditional_mutual_information(target, target, hp)
    assert exact.score == pytest.approx(1.0)
    # conditioning on both factors decides every pair here: left out of the minimum
    assert math.isnan(exact.by_subset[("lr", "width")])


def coupled(rows):
    """(measure, target, hparams) from rows (lr, width, seed, measure, target)."""
    return ([r[3] for r in rows], [r[4] for r in rows], [dict(lr=r[0], width=r[1], seed=r[2]) for r in rows])


def test_robust_sign_error_by_hand():
    """Coupled pairs change one hyperparameter with the seed fixed. Environment lr 1 -> 2 at width 1:
    seed 0 ordered right (target gap 0.1), seed 1 wrong (gap 0.02); environment width 1 -> 2 at
    lr 1: seed 0 a measure tie (half an error), seed 1 right."""
    m, t, hp = coupled([
        (1, 1, 0, 1.0, 0.10), (2, 1, 0, 2.0, 0.20), (1, 2, 0, 1.0, 0.30),
        (1, 1, 1, 3.0, 0.10), (2, 1, 1, 2.0, 0.12), (1, 2, 1, 4.0, 0.40),
    ])
    r = stats.robust_sign_error(m, t, hp)
    assert r.n_environments == 2
    assert r.by_factor == {"lr": 0.5, "width": 0.25}
    assert r.robust == 0.5 and r.mean == pytest.approx(0.375)
    # Hoeffding weights with 1000 test examples: 1 - 2 exp(-1000 d^2 / 2) is 0.987 for d = 0.1 and
    # 0 for d = 0.02 (the wrong order is within the noise); width's gaps 0.2 and 0.3 weigh ~1
    w = stats.robust_sign_error(m, t, hp, n_test=1000)
    w_tie, w_right = 1 - 2 * math.exp(-1000 * 0.2**2 / 2), 1 - 2 * math.exp(-1000 * 0.3**2 / 2)
    assert w.by_factor["lr"] == 0.0
    assert w.by_factor["width"] == pytest.approx(0.5 * w_tie / (w_tie + w_right))
    assert math.isnan(stats.robust_sign_error(m, t, hp, n_test=10).robust)   # nothing significant
    with pytest.raises(ValueError, match="n_test"):
        stats.robust_sign_error(m, t, hp, n_test=0)
