"""The Jiang et al. (2020) generalization measures on cases whose values are known in closed form:
linear models (singular values, Frobenius norms, the Fisher-Rao inner product), a two-layer ReLU
network (path-norm), convolutions against their dense matrices, a hand-built margin."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharpfast.study import measures as M
from sharpfast.study import zoo
from sharpfast.study.definitions import Definition, preset


def matrix_with_singular_values(s, n_out, n_in, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n_out, n_out, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n_in, n_in, generator=g, dtype=torch.float64))
    S = torch.zeros(n_out, n_in, dtype=torch.float64)
    S[range(len(s)), range(len(s))] = torch.tensor(s, dtype=torch.float64)
    return U @ S @ V.T


def two_layer(s1, s2, bias=False):
    model = nn.Sequential(nn.Linear(6, 5, bias=bias), nn.ReLU(), nn.Linear(5, 4, bias=bias)).double()
    with torch.no_grad():
        model[0].weight.copy_(matrix_with_singular_values(s1, 5, 6, seed=1))
        model[2].weight.copy_(matrix_with_singular_values(s2, 4, 5, seed=2))
    return model


def data(n=40, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def test_norm_measures_of_a_two_layer_network_in_closed_form():
    s1, s2 = [3.0, 2.0, 1.0, 0.5, 0.1], [2.0, 1.5, 0.3, 0.2]
    model, init = two_layer(s1, s2), two_layer([1.0] * 5, [1.0] * 4)
    x, y = data()
    value = lambda name: M.measure(name, model, x, y, init=init)
    fro = [sum(v * v for v in s1), sum(v * v for v in s2)]      # ||W||_F^2 = sum of squared singular values
    assert value("param-norm") == pytest.approx(sum(fro), rel=1e-12)
    assert value("prod-of-spec") == pytest.approx(2 * math.log(3.0) + 2 * math.log(2.0), rel=1e-12)
    assert value("sum-of-spec") == pytest.approx(math.log(2) + (2 * math.log(3.0) + 2 * math.log(2.0)) / 2, rel=1e-12)
    assert value("prod-of-fro") == pytest.approx(math.log(fro[0]) + math.log(fro[1]), rel=1e-12)
    assert value("sum-of-fro") == pytest.approx(math.log(2) + (math.log(fro[0]) + math.log(fro[1])) / 2, rel=1e-12)
    assert value("fro/spec") == pytest.approx(fro[0] / 9.0 + fro[1] / 4.0, rel=1e-12)
    dW = [model[0].weight - init[0].weight, model[2].weight - init[2].weight]
    assert value("frob-distance") == pytest.approx(sum(float(d.norm()) ** 2 for d in dW), rel=1e-12)
    assert value("spec-dist") == pytest.approx(sum(float(torch.linalg.matrix_norm(d, 2)) ** 2 for d in dW), rel=1e-12)
    # the margin: the 10th percentile of f(x)_y - max_{j != y} f(x)_j, by sorting by hand
    out = model(x).detach()
    margins = sorted(float(out[i, y[i]] - max(out[i, j] for j in range(4) if j != y[i])) for i in range(40))
    gamma = float(torch.quantile(torch.tensor(margins, dtype=torch.float64), 0.1))
    if gamma > 0:
        assert value("1/margin") == pytest.approx(1 / gamma**2, rel=1e-12)
        assert value("prod-of-spec/margin") == pytest.approx(value("prod-of-spec") - 2 * math.log(gamma), rel=1e-12)
    else:
        with pytest.raises(ValueError, match="margin"):
            value("1/margin")


def test_margin_measures_need_a_positive_margin_and_use_it():
    """A linear classifier scaled by a: margins scale by a, so 1/margin scales by 1/a^2 and the
    /margin forms of the log-products shift by -2 log a."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 6, generator=g, dtype=torch.float64)
    W = torch.randn(4, 6, generator=g, dtype=torch.float64)
    y = (x @ W.T).argmax(1)                                   # every example right: a positive margin
    model = nn.Linear(6, 4, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(W)
    one = {n: M.measure(n, model, x, y) for n in ("1/margin", "prod-of-spec/margin", "spectral-orig")}
    with torch.no_grad():
        model.weight.mul_(3.0)
    three = {n: M.measure(n, model, x, y) for n in one}
    assert three["1/margin"] == pytest.approx(one["1/margin"] / 9, rel=1e-10)
    assert three["prod-of-spec/margin"] == pytest.approx(one["prod-of-spec/margin"], rel=1e-10)   # scale-free
    assert three["spectral-orig"] == pytest.approx(one["spectral-orig"], rel=1e-10)
    with pytest.raises(ValueError, match="margin"):
        M.measure("1/margin", model, x, (y + 1) % 4)          # every example wrong


def test_path_norm_of_a_relu_network_is_the_sum_over_paths():
    model = two_layer([3.0, 2.0, 1.0, 0.5, 0.1], [2.0, 1.5, 0.3, 0.2])
    x, y = data()
    W1, W2 = model[0].weight.detach(), model[2].weight.detach()
    paths = float(torch.ones(4, dtype=torch.float64) @ (W2**2) @ (W1**2) @ torch.ones(6, dtype=torch.float64))
    assert M.measure("path-norm", model, x, y) == pytest.approx(paths, rel=1e-12)
    biased = two_layer([3.0, 2.0, 1.0, 0.5, 0.1], [2.0, 1.5, 0.3, 0.2], bias=True)
    with torch.no_grad():
        biased[0].bias.fill_(0.5)
        biased[2].bias.fill_(-1.0)
    # squared biases add 0.25 per hidden unit (through W2^2) and 1 per output
    want = paths + float(torch.ones(4, dtype=torch.float64) @ (W2**2) @ torch.full((5,), 0.25, dtype=torch.float64)) + 4
    assert M.measure("path-norm", biased, x, y) == pytest.approx(want, rel=1e-12)


def test_fisher_rao_of_a_linear_model():
    """For f = W x and cross-entropy, <W, grad_W loss> = (p - e_y)^T f: the measure is
    (d + 1)^2 / m sum_i ((p_i - e_{y_i})^T f_i)^2 with d = 1."""
    model = nn.Linear(6, 4, bias=False).double()
    x, y = data()
    f = model(x).detach()
    inner = ((F.softmax(f, 1) - F.one_hot(y, 4)) * f).sum(1)
    assert M.measure("fisher-rao", model, x, y) == pytest.approx(4 / 40 * float((inner**2).sum()), rel=1e-10)


def test_entropy_and_cross_entropy():
    model = nn.Linear(6, 4).double()
    x, y = data()
    f = model(x).detach()
    assert M.measure("cross-entropy", model, x, y) == pytest.approx(float(F.cross_entropy(f, y)), rel=1e-12)
    p = F.softmax(f, 1)
    assert M.measure("neg-entropy", model, x, y) == pytest.approx(float((p * p.log()).sum(1).mean()), rel=1e-10)


@pytest.mark.parametrize("conv, shape", [(nn.Conv2d(2, 3, 3, padding=1, stride=2), (1, 2, 8, 8)),
                                         (nn.Conv2d(1, 4, 3, padding=1), (1, 1, 8, 8)),
                                         (nn.Conv2d(2, 2, 3, stride=2), (1, 2, 7, 7)),
                                         (nn.Conv2d(16, 16, 3, padding=1), (1, 16, 20, 20))])   # power iteration
def test_convolutions_by_their_operator_norm(conv, shape):
    """Against the convolution's dense matrix on that input shape (zero padding, stride)."""
    w = conv.weight.detach().double()
    f = lambda v: F.conv2d(v, w, stride=conv.stride, padding=conv.padding)
    n = math.prod(shape)
    J = torch.autograd.functional.jacobian(f, torch.zeros(shape, dtype=torch.float64)).reshape(-1, n)
    assert M.operator_norm(conv, conv.weight, shape) == pytest.approx(float(torch.linalg.matrix_norm(J, 2)), rel=1e-6)


def test_every_measure_on_the_zoo_architectures():
    torch.manual_seed(0)
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    for make in (lambda: zoo.mlp(16), lambda: zoo.cnn(8), lambda: zoo.vit(16)):
        model, init = make(), make()
        for name in M.MEASURES:
            if name.endswith("margin") or name in ("spectral-init", "spectral-orig", "num-step-to-0.1-loss") or \
                    "pacbayes" in name or "sharpness" in name:
                continue   # an untrained model's margin is negative; no recorded trajectory here; searches below
            assert math.isfinite(M.measure(name, model, x, y, init=init)), name
    assert M.measure("num-step-to-0.1-loss", model, x, y, metrics={"steps_to_loss_0.1": 120}) == 120
    with pytest.raises(ValueError, match="did not record"):
        M.measure("num-step-to-0.1-loss", model, x, y)
    with pytest.raises(ValueError, match="initial weights"):
        M.measure("frob-distance", model, x, y)
    with pytest.raises(ValueError, match="unknown measure"):
        M.measure("vc-dim", model, x, y)


def test_the_jiang_preset_names_the_table_rows():
    defs = preset("jiang")
    assert [d.name for d in defs][:5] == ["param-norm", "frob-distance", "spec-dist", "fro/spec", "prod-of-spec"]
    assert len({d.key for d in defs}) == len(defs) == 33 and all(d.rho is None for d in defs)
    assert Definition("measure", measure="path-norm", n_iters=99).key == Definition("measure", measure="path-norm").key
    with pytest.raises(ValueError, match="measure must be one of"):
        Definition("measure", measure="vc-dim")


def trained_digits_mlp():
    from sharpfast.study import digits
    cfg = dict(zoo.DEFAULT_TRAIN, width=32, epochs=10, n_train=256)
    x, y, _, _ = digits.split(256)
    return zoo.train(cfg)[0], zoo.initialized(cfg), x, y


def test_pacbayes_and_sharpness_searches_hit_their_target_and_the_bounds_follow():
    """Each search's radius moves the training error by 0.1 (within the 1e-2 tolerance, or bisection's
    last step); the bounds are their formulas at that radius."""
    import sharpfast
    model, init, x, y = trained_digits_mlp()
    ctx = M.Context(model, init, x, y)
    values = {n: M.MEASURES[n](ctx) for n in ("pacbayes-init", "pacbayes-orig", "1/sigma-pacbayes", "sharpness-orig",
                                             "1/alpha-sharpness", "pacbayes-mag-orig", "1/alpha-sharpness-mag")}
    sigma, alpha = ctx.cached(("radius", False, False), None), ctx.cached(("radius", True, False), None)
    assert 0 < alpha < sigma < M.SEARCH_MAX   # the worst case of a box moves the error sooner than noise
    step = M.SEARCH_MAX / 2**M.SEARCH_STEPS
    for radius, worst in ((sigma, False), (alpha, True)):
        d = M._deviation(ctx, radius, worst, magnitude=False)
        near = abs(d - M.ACCURACY_DEVIATION) < M.DEVIATION_TOLERANCE
        assert near or (M._deviation(ctx, radius + step, worst, False) > M.ACCURACY_DEVIATION >= d)
    # a smaller radius moves it less (the searches are monotone where they look)
    assert M._deviation(ctx, sigma / 4, False, False) < M.ACCURACY_DEVIATION
    w = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    w0 = torch.cat([p.detach().double().reshape(-1) for p in init.parameters()])
    m, omega = len(y), w.numel()
    assert values["pacbayes-orig"] == pytest.approx(float(w @ w) / (4 * sigma**2) + math.log(m / sigma) + 10, rel=1e-12)
    assert values["pacbayes-init"] == pytest.approx(float((w - w0) @ (w - w0)) / (4 * sigma**2)
                                                    + math.log(m / sigma) + 10, rel=1e-12)
    assert values["1/sigma-pacbayes"] == pytest.approx(1 / sigma**2) and values["1/alpha-sharpness"] == 1 / alpha**2
    s_alpha = alpha / math.sqrt(2 * math.log(2 * omega))
    assert values["sharpness-orig"] == pytest.approx(float(w @ w) * math.log(2 * omega) / (4 * alpha**2)
                                                     + math.log(m / s_alpha) + 10, rel=1e-12)
    # the sharpness search's deviation is the worst case the sharpness function reports
    r = sharpfast.worst_case_sharpness(model, [(x, y)], rho=alpha, norm="linf", adaptive=False, n_iters=M.ASCENT_STEPS)
    assert M._deviation(ctx, alpha, True, False) == abs(r.err_sharpness)
