"""Kendall tau-b, granulated tau / Psi (Jiang et al. 2020) and bootstrap CIs."""
import itertools
import math

import numpy as np
import pytest
from scipy.stats import kendalltau

from sharpfast.study.analysis import stats
from sharpfast.study.analysis.stats import bootstrap_tau, granulated_tau, kendall_tau_b, varying_factors


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
    assert g.n_undefined == {"a": 0, "b": 0}      # the sign sum is defined on a tied group ...
    assert granulated_tau(measure, target, hp, tau="b").n_undefined == {"a": 0, "b": 1}   # ... tau-b is not
    assert g.Psi == pytest.approx(0.25)


def test_granulated_matches_brute_force_with_scipy():
    rng = np.random.default_rng(0)
    grid = {"lr": [0.1, 0.2, 0.4], "bs": [16, 128], "aug": [False, True]}
    hp = [dict(zip(grid, v)) for v in itertools.product(*grid.values())]
    n = len(hp)
    measure = rng.normal(size=n)
    target = np.round(measure + rng.normal(size=n), 1)
    g = granulated_tau(measure, target, hp, tau="b")
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
    r = stats.conditional_mutual_information([0, 2, 1], [0, 1, 2], [{}, {}, {}], convention="distinct-pairs")
    want = (2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)) / math.log(2)
    assert r.score == pytest.approx(want, rel=1e-12) and r.argmin == ()
    assert stats.conditional_mutual_information([5, 5, 5], [0, 1, 2], [{}, {}, {}],
                                                convention="distinct-pairs").score == 0.0


def test_conditional_mutual_information_discounts_a_measure_that_mirrors_a_hyperparameter():
    hp = [dict(lr=lr, width=w) for lr in (1, 2) for w in (1, 2, 3)]
    target = [h["lr"] + 0.1 * h["width"] for h in hp]
    cmi = lambda m, t, hp: stats.conditional_mutual_information(m, t, hp, convention="distinct-pairs")
    mirror = cmi([h["lr"] for h in hp], target, hp)
    assert mirror.by_subset[()] > 0.3                    # informative on its own ...
    assert mirror.score == 0.0 and "lr" in mirror.argmin  # ... and nothing once lr is known
    exact = cmi(target, target, hp)
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
    same_seed = dict(pairing="same-seed", weighting="hoeffding", min_ess=0)
    r = stats.robust_sign_error(m, t, hp, **same_seed)
    assert r.n_environments == 2
    assert r.by_factor == {"lr": 0.5, "width": 0.25}
    assert r.robust == 0.5 and r.mean == pytest.approx(0.375)
    # Hoeffding weights with 1000 test examples: 1 - 2 exp(-1000 d^2 / 2) is 0.987 for d = 0.1 and
    # 0 for d = 0.02 (the wrong order is within the noise); width's gaps 0.2 and 0.3 weigh ~1
    w = stats.robust_sign_error(m, t, hp, n_test=1000, **same_seed)
    w_tie, w_right = 1 - 2 * math.exp(-1000 * 0.2**2 / 2), 1 - 2 * math.exp(-1000 * 0.3**2 / 2)
    assert w.by_factor["lr"] == 0.0
    assert w.by_factor["width"] == pytest.approx(0.5 * w_tie / (w_tie + w_right))
    assert math.isnan(stats.robust_sign_error(m, t, hp, n_test=10, **same_seed).robust)   # nothing significant
    with pytest.raises(ValueError, match="n_test"):
        stats.robust_sign_error(m, t, hp, n_test=0)


# ----------------------------------------------------------------------------- the authors' conventions

def test_granulated_tau_is_jiangs_sign_sum_by_default():
    """One group of three: measure (1, 1, 2), target (1, 2, 3). Of the 6 ordered pairs, the two tied in
    the measure count 0 and the other four agree: Jiang et al.'s sign sum gives 4/6; tau-b divides
    by sqrt((6 - 2)(6 - 0)) instead: 4 / sqrt(24)."""
    hp = [{"a": 0}, {"a": 1}, {"a": 2}]
    assert granulated_tau([1, 1, 2], [1, 2, 3], hp).psi["a"] == pytest.approx(2 / 3, abs=1e-15)
    assert granulated_tau([1, 1, 2], [1, 2, 3], hp, tau="b").psi["a"] == pytest.approx(4 / math.sqrt(24), abs=1e-15)
    assert stats.kendall_tau_a([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / 3, abs=1e-15)
    # a group constant in the target is 0 under the sign sum without being "undefined"
    g = granulated_tau([1, 2, 3], [5, 5, 5], hp)
    assert g.psi["a"] == 0.0 and g.n_undefined["a"] == 0
    with pytest.raises(ValueError, match="tau"):
        granulated_tau([1, 2, 3], [1, 2, 3], hp, tau="c")


def test_granulated_tau_a_against_brute_force_sign_sums():
    rng = np.random.default_rng(5)
    grid = {"lr": [0.1, 0.2, 0.4], "bs": [16, 128], "aug": [0, 1]}
    hp = [dict(zip(grid, v)) for v in itertools.product(*grid.values())]
    measure, target = np.round(rng.normal(size=12), 0), np.round(rng.normal(size=12), 0)   # many ties
    g = granulated_tau(measure, target, hp)
    for f in grid:
        others = [k for k in grid if k != f]
        taus = []
        for combo in itertools.product(*(grid[k] for k in others)):
            idx = [i for i, h in enumerate(hp) if all(h[k] == v for k, v in zip(others, combo))]
            pairs = [(i, j) for i in idx for j in idx if i != j]
            taus.append(sum(np.sign(measure[i] - measure[j]) * np.sign(target[i] - target[j]) for i, j in pairs)
                        / len(pairs))
        assert g.psi[f] == pytest.approx(np.mean(taus), abs=1e-15)


# a noisy 3x2x2 grid; the PGDL scoring program (mutual_information.py, conditional_mutual_information)
# gives 0.14728671303877083 on it
PGDL_GRID = {"lr": [0.1, 0.2, 0.4], "bs": [16, 128], "aug": [0, 1]}
PGDL_GAP = [0.0, 0.3, -0.3, -0.9, -0.5, -1.0, 0.1, 1.3, -0.5, -0.6, 0.5, 0.4]
PGDL_MEASURE = [0.1, -0.6, -0.3, -0.2, -1.8, -1.5, -1.8, 0.0, -2.3, -0.8, -0.8, 0.7]


def pgdl_score_by_loops(measure, gap, hp, factors):
    """The scoring program's recipe, written out pair by pair: every ordered pair (self-pairs too),
    '+' where a > b strictly, for each pair of hyperparameters a 2 x 2 table per value of their
    (a, b) values; the mean of the tables' mutual informations over the mean of their gap entropies
    (bits, 1e-12 in the entropy's log); the minimum over the pairs of hyperparameters."""
    best = math.inf
    for h1, h2 in itertools.combinations(factors, 2):
        tables = {}
        for a in range(len(gap)):
            for b in range(len(gap)):
                key = (hp[a][h1], hp[b][h1], hp[a][h2], hp[b][h2])
                t = tables.setdefault(key, np.zeros((2, 2)))
                t[int(gap[a] > gap[b]), int(measure[a] > measure[b])] += 1
        mis, hs = [], []
        for t in tables.values():
            p = t / t.sum()
            pg, pm = p.sum(1), p.sum(0)
            mis.append(sum(p[i, j] * math.log2(p[i, j] / (pg[i] * pm[j])) for i in range(2) for j in range(2)
                           if p[i, j] > 0))
            hs.append(-sum(q * math.log2(q + 1e-12) for q in pg))
        best = min(best, np.mean(mis) / np.mean(hs))
    return best


def test_conditional_mutual_information_reproduces_the_pgdl_scoring_program():
    hp = [dict(zip(PGDL_GRID, v)) for v in itertools.product(*PGDL_GRID.values())]
    r = stats.conditional_mutual_information(PGDL_MEASURE, PGDL_GAP, hp)
    assert r.convention == "pgdl" and len(r.argmin) == 2
    assert r.score == pytest.approx(0.14728671303877083, abs=1e-14)
    assert set(r.by_subset) == set(itertools.combinations(PGDL_GRID, 2))   # exactly two conditioned on
    rng = np.random.default_rng(0)
    for _ in range(10):
        gap, measure = np.round(rng.normal(size=12), 0), np.round(rng.normal(size=12), 1)
        want = pgdl_score_by_loops(measure, gap, hp, list(PGDL_GRID))
        assert stats.conditional_mutual_information(measure, gap, hp).score == pytest.approx(want, abs=1e-13)
    # fewer than two varied hyperparameters: nothing to condition on two of
    one = stats.conditional_mutual_information([1, 2, 3], [1, 3, 2], [{"a": 0}, {"a": 1}, {"a": 2}])
    assert math.isnan(one.score) and one.argmin is None
    with pytest.raises(ValueError, match="convention"):
        stats.conditional_mutual_information([1, 2], [1, 2], [{}, {}], convention="jiang")


# a 2 x 2 grid (lr, depth) of 5 seeds each; Dziugaite et al.'s create_environments.py (n = 1000, noise
# filter on) and get_all_losses (min_ess = 12) give robust 0.11822146687110084, mean 0.06960795897219031
DZ_GAPS = [0.221, 0.244, 0.214, 0.231, 0.235, 0.351, 0.334, 0.312, 0.336, 0.317, 0.283, 0.308, 0.262, 0.291, 0.27,
           0.418, 0.385, 0.414, 0.411, 0.396]
DZ_MEASURE = [0.33, 0.203, 0.172, 0.227, 0.087, 0.343, 0.323, 0.349, 0.32, 0.372, 0.162, 0.254, 0.197, 0.196, 0.273,
              0.399, 0.416, 0.39, 0.494, 0.331]


def test_robust_sign_error_reproduces_dziugaite_et_al():
    hp = [dict(lr=lr, depth=depth, seed=seed) for lr in (0.01, 0.05) for depth in (2, 3) for seed in range(5)]
    r = stats.robust_sign_error(DZ_MEASURE, DZ_GAPS, hp, n_test=1000)
    assert r.robust == pytest.approx(0.11822146687110084, abs=1e-14)
    assert r.mean == pytest.approx(0.06960795897219031, abs=1e-14)
    assert r.n_environments + r.n_dropped == 4 and r.min_ess == 12


def test_robust_sign_error_weights_pairs_of_all_runs_and_filters_by_effective_sample_size():
    """Two settings (lr 1, 2), two runs each: the 4 pairs of runs, with targets 0.1 apart but for one
    pair 0.02 apart. With n = 1000: p = 1 - 2 exp(-n d^2 / 2), weight (p^2 - 1/2)_+."""
    hp = [dict(lr=1, seed=0), dict(lr=1, seed=1), dict(lr=2, seed=0), dict(lr=2, seed=1)]
    target = [0.10, 0.18, 0.20, 0.30]
    measure = [1.0, 3.0, 2.0, 4.0]      # pairs (a, b): (0, 2) right, (0, 3) right, (1, 2) wrong, (1, 3) right
    w = lambda d: max(0.0, (1 - 2 * math.exp(-1000 * d * d / 2)) ** 2 - 0.5)
    weights = [w(0.1), w(0.2), w(0.02), w(0.12)]
    r = stats.robust_sign_error(measure, target, hp, n_test=1000, min_ess=1)
    assert r.robust == pytest.approx(weights[2] / sum(weights), abs=1e-15)    # w(0.02) = 0: no error left
    assert r.robust == 0.0
    unweighted = stats.robust_sign_error(measure, target, hp, min_ess=1)      # n_test unknown: weight 1
    assert unweighted.robust == pytest.approx(1 / 4)
    assert unweighted.max_ess == pytest.approx(4.0)
    # the effective sample size of 4 equal weights is 4: below Dziugaite et al.'s 12, nothing is kept
    none = stats.robust_sign_error(measure, target, hp)
    assert math.isnan(none.robust) and none.n_dropped == 1 and none.n_environments == 0
    # pairing runs of the same seed only: (0, 2) and (1, 3), both right
    assert stats.robust_sign_error(measure, target, hp, pairing="same-seed", min_ess=1).robust == 0.0
    # a tie in the target is half an error (unweighted), and weighs 0 with n_test
    tied = stats.robust_sign_error([1.0, 2.0], [0.1, 0.1], [dict(lr=1), dict(lr=2)], min_ess=1)
    assert tied.robust == 0.5
    assert math.isnan(stats.robust_sign_error([1.0, 2.0], [0.1, 0.1], [dict(lr=1), dict(lr=2)], n_test=100,
                                              min_ess=1).robust)
    for bad in (dict(pairing="x"), dict(weighting="x"), dict(min_ess=-1)):
        with pytest.raises(ValueError):
            stats.robust_sign_error(measure, target, hp, **bad)
