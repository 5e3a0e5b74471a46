"""Closed forms the reference must reproduce.

Diagonal linear network (DESIGN.md §1): ``beta = u * v``, loss ``1/2 ||X beta - y||^2`` with
``X^T X = I``, at a zero-loss point ``X beta* = y``. Then ``L(u', v') = 1/2 ||u'v' - u v||^2`` and,
writing a perturbation as ``du = a p``, ``dv = b q`` (``a``, ``b``: the scale ``c`` on the u- and
v-coordinates), coordinate i contributes ``1/2 (A_i q_i + B_i p_i + a_i b_i p_i q_i)^2`` with
``A = u b``, ``B = v a``.

* Average-case, ``p = rho xi``, ``q = rho eta`` iid with variance ``s2`` (1 Gaussian, 1/3 uniform):
  ``S_avg = 1/2 sum_i [rho^2 s2 (A_i^2 + B_i^2) + rho^4 s2^2 a_i^2 b_i^2]`` exactly (odd moments vanish).
  c = |w|: ``(rho^2 s2 + rho^4 s2^2 / 2) ||beta||_2^2``; balanced c: ``rho^2 s2 ||beta||_1 + d rho^4 s2^2 / 2``.
* Worst-case linf (box ``|p|, |q| <= rho``): separable and bilinear per coordinate, so the max is at a
  vertex: ``S_max = 1/2 sum_i (rho (|A_i| + |B_i|) + rho^2 a_i b_i)^2``.
* Worst-case l2 (``sum p^2 + q^2 <= rho^2``), c = |w| or balanced: on one coordinate with budget
  ``r`` the max is at ``|p| = |q| = r / sqrt 2``; the value is convex in ``r^2``, so all the budget goes
  to the largest ``|beta_i|``: balanced ``1/2 (sqrt(2 ||beta||_inf) rho + rho^2 / 2)^2``,
  c = |w| ``1/2 ||beta||_inf^2 (sqrt 2 rho + rho^2 / 2)^2``.
"""
import math

import pytest
import torch

import sharpfast
from tests.toy_models import DiagonalLinearNetwork, half_squared_error

D, N = 5, 12


def diagonal_network(seed=0):
    g = torch.Generator().manual_seed(seed)
    X, _ = torch.linalg.qr(torch.randn(N, D, generator=g, dtype=torch.float64))
    u = torch.tensor([1.5, -0.7, 0.4, 2.0, -1.1], dtype=torch.float64)
    v = torch.tensor([0.8, 1.3, -0.5, 0.9, -0.6], dtype=torch.float64)
    model = DiagonalLinearNetwork(u, v)
    y = X @ (u * v)
    return model, X, y, u, v


def scales(kind, u, v):
    if kind == "adaptive":
        return u.abs(), v.abs()
    if kind == "standard":
        return torch.ones_like(u), torch.ones_like(v)
    return (u.abs() / v.abs()).sqrt(), (v.abs() / u.abs()).sqrt()   # balanced


def scale_kwargs(kind, a, b):
    if kind == "adaptive":
        return dict(adaptive=True)
    if kind == "standard":
        return dict(adaptive=False)
    return dict(adaptive=False, scale={"u": a, "v": b})


@pytest.mark.parametrize("c_kind", ["adaptive", "standard", "balanced"])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_diagonal_network_average_case(c_kind, norm):
    model, X, y, u, v = diagonal_network()
    a, b = scales(c_kind, u, v)
    rho, s2 = 0.3, (1.0 if norm == "l2" else 1.0 / 3.0)
    A, B = u * b, v * a
    exact = 0.5 * float((rho**2 * s2 * (A**2 + B**2) + rho**4 * s2**2 * a**2 * b**2).sum())
    if c_kind == "balanced":
        beta = u * v
        assert exact == pytest.approx(rho**2 * s2 * float(beta.abs().sum()) + D * rho**4 * s2**2 / 2, rel=1e-12)
    # Many batches of the same data give independent draws (one stream per batch).
    n_batches, n_samples = 40, 100
    r = sharpfast.average_sharpness(model, [(X, y)] * n_batches, rho=rho, norm=norm, n_samples=n_samples,
                                    loss_fn=half_squared_error, backend="reference", **scale_kwargs(c_kind, a, b))
    assert r.err_sharpness is None  # regression targets: no 0-1 error
    per_batch = torch.tensor(r.per_batch)
    standard_error = float(per_batch.std()) / math.sqrt(n_batches)
    assert abs(r.sharpness - exact) < 4 * standard_error + 1e-12, (r.sharpness, exact, standard_error)
    assert standard_error < 0.1 * exact  # the test has power


def exact_worst_case(c_kind, norm, rho, u, v):
    a, b = scales(c_kind, u, v)
    A, B = u * b, v * a
    if norm == "linf":
        return 0.5 * float(((rho * (A.abs() + B.abs()) + rho**2 * a * b) ** 2).sum())
    beta_inf = float((u * v).abs().max())
    if c_kind == "balanced":
        return 0.5 * (math.sqrt(2 * beta_inf) * rho + rho**2 / 2) ** 2
    return 0.5 * beta_inf**2 * (math.sqrt(2) * rho + rho**2 / 2) ** 2


@pytest.mark.parametrize("c_kind", ["adaptive", "standard", "balanced"])
def test_diagonal_network_worst_case_linf(c_kind):
    model, X, y, u, v = diagonal_network()
    a, b = scales(c_kind, u, v)
    rho = 0.2
    exact = exact_worst_case(c_kind, "linf", rho, u, v)
    # At a zero-loss point the gradient vanishes: APGD needs a random start to move, and each
    # coordinate has two locally optimal corners, so restarts are needed to find all the right ones.
    r = sharpfast.worst_case_sharpness(model, [(X, y)], rho=rho, norm="linf", n_iters=30, n_restarts=32,
                                       rand_init=True, loss_fn=half_squared_error, backend="reference",
                                       **scale_kwargs(c_kind, a, b))
    assert r.sharpness <= exact * (1 + 1e-9)          # a feasible point cannot beat the maximum
    assert r.sharpness == pytest.approx(exact, rel=1e-6)


def symmetric_diagonal_network():
    """``|u| = |v|``: the scale is the same on both coordinates of every product."""
    model, X, y, u, _ = diagonal_network()
    v = u.abs() * torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    model = DiagonalLinearNetwork(u, v)
    return model, X, X @ (u * v), u, v


@pytest.mark.parametrize("c_kind", ["adaptive", "balanced"])
def test_diagonal_network_worst_case_l2(c_kind):
    model, X, y, u, v = symmetric_diagonal_network()
    a, b = scales(c_kind, u, v)
    rho = 0.2
    exact = exact_worst_case(c_kind, "l2", rho, u, v)
    r = sharpfast.worst_case_sharpness(model, [(X, y)], rho=rho, norm="l2", n_iters=30, n_restarts=8,
                                       rand_init=True, loss_fn=half_squared_error, backend="reference",
                                       **scale_kwargs(c_kind, a, b))
    # The bisection accepts ||delta / c|| <= rho (1 + 1e-5): the value can exceed the max by ~2e-5.
    assert r.sharpness <= exact * (1 + 5e-5)
    assert r.sharpness == pytest.approx(exact, rel=2e-4)
    if c_kind == "balanced":   # to leading order rho^2 ||beta||_inf
        assert exact == pytest.approx(rho**2 * float((u * v).abs().max()), rel=0.3)


def test_published_l2_steps_stop_short_when_c_differs_within_the_optimum():
    """The published l2 step ascends along ``g * c`` and projects in the Euclidean metric, so its
    fixed points satisfy ``g ~ delta / c^3`` instead of the KKT condition ``g ~ delta / c^2``.
    Where the maximizing coordinates have unequal scales (here |u_i| != |v_i|) APGD therefore
    settles below the exact maximum; it must still never exceed it."""
    model, X, y, u, v = diagonal_network()
    exact = exact_worst_case("adaptive", "l2", 0.2, u, v)
    r = sharpfast.worst_case_sharpness(model, [(X, y)], rho=0.2, norm="l2", n_iters=30, n_restarts=8,
                                       rand_init=True, loss_fn=half_squared_error, backend="reference")
    assert 0.5 * exact < r.sharpness < 0.95 * exact


def scaled_linear_classifier(alpha):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4).double()
    with torch.no_grad():
        model.weight.mul_(alpha)
        model.bias.mul_(alpha)
    return model


def classification_data():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (32,), generator=g))
            for _ in range(2)]


@pytest.mark.parametrize("kind,norm", [("worst", "linf"), ("worst", "l2"), ("average", "l2"), ("average", "linf")])
@pytest.mark.parametrize("form", ["norm", "std"])
def test_scale_invariance_of_adaptive_normalized_sharpness(kind, norm, form):
    """Logits of a linear classifier scale with alpha; normalized logits and c = |w| undo it."""
    data = classification_data()
    fn = sharpfast.worst_case_sharpness if kind == "worst" else sharpfast.average_sharpness
    extra = dict(n_iters=10, rand_init=True) if kind == "worst" else dict(n_samples=8)
    values, raw = [], []
    for alpha in (1.0, 4.0):  # a power of two: the scaled weights are exact
        model = scaled_linear_classifier(alpha)
        values.append(fn(model, data, rho=0.1, norm=norm, adaptive=True, normalize_logits=form,
                         backend="reference", **extra).sharpness)
        raw.append(fn(model, data, rho=0.1, norm=norm, adaptive=True, backend="reference", **extra).sharpness)
    # The ellipsoid bisection is not scale-free (it starts at lambda = 0.1 whatever |w|), so l2
    # worst-case agrees only up to the bisection tolerance on ||delta / c||.
    rel = 1e-4 if (kind, norm) == ("worst", "l2") else 1e-9
    assert values[0] == pytest.approx(values[1], rel=rel, abs=1e-12)
    assert abs(raw[0] - raw[1]) > 1e-3 * max(abs(raw[0]), abs(raw[1]))


def test_average_case_small_rho_limit_matches_hessian_diagonal():
    """``S_avg = rho^2 / 2 sum_i c_i^2 H_ii + O(rho^4)``; antithetic pairs cancel the gradient term."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x = torch.randn(20, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (20,))
    params = list(model.parameters())
    flat = torch.cat([p.detach().flatten() for p in params])

    def loss_of(flat_w):
        chunks = flat_w.split([p.numel() for p in params])
        out = torch.func.functional_call(model, {n: c.view_as(p) for (n, p), c in
                                                 zip(model.named_parameters(), chunks)}, (x,))
        return torch.nn.functional.cross_entropy(out, y)

    H = torch.autograd.functional.hessian(loss_of, flat)
    c = flat.abs()
    rho = 1e-3
    predicted = rho**2 / 2 * float((c**2 * H.diagonal()).sum())
    r = sharpfast.average_sharpness(model, [(x, y)] * 30, rho=rho, norm="l2", n_samples=64, antithetic=True,
                                    backend="reference")
    se = float(torch.tensor(r.per_batch).std()) / math.sqrt(30)
    assert abs(r.sharpness - predicted) < 4 * se + 1e-3 * abs(predicted), (r.sharpness, predicted, se)


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("norm, solver", [("linf", "published"), ("linf", "scaled"), ("l2", "scaled")])
def test_delta_norm_of_weights_near_the_largest_float(backend, norm, solver):
    """Weights scaled by 1e306 and inputs by 1e-306 compute the same function, so adaptive
    sharpness is the same and ``||delta||`` is 1e306 times as large: about 1e304, finite, although
    its square is not."""
    if backend == "fused":
        pytest.importorskip("sharpfast._C")
    torch.manual_seed(0)
    small = torch.nn.Linear(4, 3, bias=False).double()
    large = torch.nn.Linear(4, 3, bias=False).double()
    with torch.no_grad():
        large.weight.copy_(small.weight * 1e306)
    data = [(torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,)))]
    settings = sharpfast.WorstCaseSettings(rho=0.05, norm=norm, solver=solver, n_iters=3, backend=backend)
    want = sharpfast.evaluate_sharpness(small, data, settings)
    got = sharpfast.evaluate_sharpness(large, [(x * 1e-306, y) for x, y in data], settings)
    assert got.sharpness == pytest.approx(want.sharpness, rel=1e-9)
    assert math.isfinite(got.delta_norm) and got.delta_norm == pytest.approx(want.delta_norm * 1e306, rel=1e-9)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_the_published_l2_projection_refuses_a_scale_whose_square_overflows(backend):
    """It divides by ``c^2 + 2 lambda``: at weights near the largest float it projected nothing (a
    sharpness of 0, reference) or gave NaN (fused). Refused, naming the solvers that never square c."""
    if backend == "fused":
        pytest.importorskip("sharpfast._C")
    torch.manual_seed(0)
    large = torch.nn.Linear(4, 3, bias=False).double()
    with torch.no_grad():
        large.weight.mul_(1e306)
    data = [(torch.randn(8, 4, dtype=torch.float64) * 1e-306, torch.randint(0, 3, (8,)))]
    with pytest.raises(ValueError, match="whose square overflows float64.*solver='scaled' or norm='linf'"):
        sharpfast.worst_case_sharpness(large, data, rho=0.05, norm="l2", n_iters=2, backend=backend)
    assert math.isfinite(sharpfast.worst_case_sharpness(large, data, rho=0.05, norm="l2", solver="scaled", n_iters=2,
                                                        backend=backend).delta_norm)
