import math

import pytest
import torch

from sharpfast import settings
from sharpfast.worst_case import apgd


@pytest.mark.parametrize("n_iters,expected", [
    (20, [5, 9, 12, 15, 16, 18, 19, 20]),
    (100, [22, 41, 58, 70, 80, 87, 93, 99, 105]),
    (200, [44, 82, 115, 140, 160, 174, 186, 198, 210]),
])
def test_checkpoint_schedule_vectors(n_iters, expected):
    assert apgd.checkpoint_schedule(n_iters) == expected


@pytest.mark.parametrize("n_iters", [1, 2, 3, 7, 50, 1000])
def test_checkpoint_schedule_is_increasing_and_reaches_the_end(n_iters):
    w = apgd.checkpoint_schedule(n_iters)
    assert w[0] == math.ceil(0.22 * n_iters)
    assert all(b >= a for a, b in zip(w, w[1:]))
    assert w[-1] >= n_iters or w[-1] == w[-2]


def test_bisection_matches_a_direct_transcription_of_the_published_loop():
    """The published loop, written out: same lambda sequence, same accepted lambda."""
    import torch
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, generator=g, dtype=torch.float64)
    c = torch.rand(50, generator=g, dtype=torch.float64) + 0.05
    rho = 0.5

    def norm_at(lam):
        return float((z * c / (c**2 + 2 * lam)).norm())

    seen = []
    lam, lo, hi, limit = 0.1, 0.0, 10.0, 10.0
    new = norm_at(0.0)
    assert new > rho
    while abs(new - rho) > 1e-5:
        applied = lam
        new = norm_at(lam)
        seen.append(lam)
        if new > rho:
            lam, lo = (lam + hi) / 2, lam
        else:
            lam, hi = (lo + lam) / 2, lam
        if limit - hi < 1e-2:
            limit, hi = limit * 2, hi * 2
    calls = []
    got = apgd.ellipsoid_lambda(lambda l: calls.append(l) or norm_at(l), rho, 1e-5)
    assert got == applied
    assert calls[1:] == seen
    assert abs(norm_at(got) - rho) <= 1e-5


def test_bisection_doubles_its_bracket_for_large_multipliers():
    # ||z c / (c^2 + 2 lam)|| = 1000 / (1 + 2 lam) = rho = 1 needs lam ~ 499.5 >> 10.
    got = apgd.ellipsoid_lambda(lambda lam: 1000.0 / (1 + 2 * lam), 1.0, 1e-5)
    assert abs(1000.0 / (1 + 2 * got) - 1.0) <= 1e-5


def test_bisection_tolerance_is_relative_below_rho_one():
    assert settings.bisection_tolerance(5.0) == 1e-5
    assert settings.bisection_tolerance(0.01) == pytest.approx(1e-7)
    assert settings.bisection_tolerance(0.01, 1e-5) == 1e-5


def _ellipsoid_problem(seed):
    """A random ``n(lambda) = ||z c / (c^2 + 2 lambda)||`` (some c = 0), its radius and tolerance."""
    import numpy as np
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    c = np.abs(rng.standard_normal(n)) * 10 ** rng.uniform(-3, 1)
    c[rng.random(n) < 0.1] = 0.0
    z = rng.standard_normal(n) * c * 10 ** rng.uniform(-2, 1.5)
    keep = c > 0
    norm_at = lambda lam: float(np.sqrt(np.sum((z[keep] * c[keep] / (c[keep] ** 2 + 2 * lam)) ** 2)))
    rho = 10 ** rng.uniform(-4, 0.5)
    tol = settings.bisection_tolerance(rho) if seed % 3 else settings.PUBLISHED_BISECTION_TOL
    return norm_at, rho, tol, rng


def test_replayed_bisection_returns_the_published_multiplier_from_fewer_passes():
    plain_total = replayed_total = passes_total = 0
    for seed in range(200):
        norm_at, rho, tol, rng = _ellipsoid_problem(seed)
        calls = []
        want = apgd.ellipsoid_lambda(lambda lam: calls.append(lam) or norm_at(lam), rho, tol)
        # hints as APGD gives them: none, near the answer, or far off on either side
        hint = [None, want * (1 + 0.1 * rng.standard_normal()), want * 100, want / 100][seed % 4]
        passes = []
        got, evaluations = apgd.replayed_ellipsoid_lambda(
            lambda lams: passes.append(list(lams)) or [norm_at(lam) for lam in lams], rho, tol, hint=hint)
        assert got == want, seed  # bit-identical: the same lambda as the published loop
        assert evaluations == sum(map(len, passes))
        if want > 0:
            plain_total += len(calls)          # the published loop: one pass per evaluation
            replayed_total += evaluations
            passes_total += len(passes)
    assert passes_total < 0.4 * plain_total and replayed_total < 0.7 * plain_total, \
        (passes_total, replayed_total, plain_total)


@pytest.mark.parametrize("levels", [1, 3, 5])
def test_replayed_bisection_with_speculative_levels(levels):
    for seed in range(30):
        norm_at, rho, tol, _ = _ellipsoid_problem(seed)
        got, _ = apgd.replayed_ellipsoid_lambda(lambda lams: [norm_at(lam) for lam in lams], rho, tol, levels=levels)
        assert got == apgd.ellipsoid_lambda(norm_at, rho, tol)


def test_replayed_bisection_edge_cases():
    replay = lambda f, rho, tol, **kw: apgd.replayed_ellipsoid_lambda(lambda ls: [f(l) for l in ls], rho, tol, **kw)[0]
    inside = lambda lam: 0.5 / (1 + 2 * lam)
    assert replay(inside, 1.0, 1e-5) == 0.0                       # already inside: no projection
    far = lambda lam: 1000.0 / (1 + 2 * lam)                      # lambda ~ 500: the bracket doubles
    assert replay(far, 1.0, 1e-5) == apgd.ellipsoid_lambda(far, 1.0, 1e-5)
    # a tolerance below float resolution: the 500-step guard and its feasible fallback, as published
    assert replay(far, 1.0, 1e-300) == apgd.ellipsoid_lambda(far, 1.0, 1e-300)
    # rho - tol <= 0 (the published absolute 1e-5 at a tiny radius): never "below", still the same answer
    tiny = lambda lam: 1e-3 / (1e-4 + 2 * lam)
    assert replay(tiny, 5e-6, 1e-5) == apgd.ellipsoid_lambda(tiny, 5e-6, 1e-5)
    # NaN norms (c^2 overflows for weights near the largest float): the published loop's steps on
    # them, to its 500-step guard, not a replay that waits forever for a value that decides
    broken = lambda lam: 2.0 if lam == 0.0 else math.nan
    assert replay(broken, 1.0, 1e-5) == apgd.ellipsoid_lambda(broken, 1.0, 1e-5)


def test_update_counter_is_compared_in_float64_on_every_backend():
    """0.28 * 25 = 7.000000000000001 in float64 (7 updates are too few), 7.0 in float32 (they are
    not): a device counter must decide as the published Python comparison does."""
    assert 0.28 * 25 > 7
    assert apgd.too_few_updates(7, 0.28, 25)
    assert bool(apgd.too_few_updates(torch.tensor(7), 0.28, 25))
    assert bool(apgd.too_few_updates(torch.tensor([7, 8]), 0.28, 25).equal(torch.tensor([True, False])))
    assert not (torch.tensor(7) < 0.28 * 25)   # the float32 comparison this replaces
    for ratio in (0.0, 0.3, 0.75, 1.0):
        for gap in range(0, 40):
            for n in range(0, gap + 2):
                assert bool(apgd.too_few_updates(torch.tensor(n), ratio, gap)) == apgd.too_few_updates(n, ratio, gap)
