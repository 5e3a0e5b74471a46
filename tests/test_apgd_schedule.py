import math

import pytest

from sharpfast import apgd


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
    assert apgd.bisection_tolerance(5.0) == 1e-5
    assert apgd.bisection_tolerance(0.01) == pytest.approx(1e-7)
    assert apgd.bisection_tolerance(0.01, 1e-5) == 1e-5
