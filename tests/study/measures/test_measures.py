"""The Jiang et al. (2020) generalization measures on cases whose values are known in closed form:
linear models (singular values, Frobenius norms, the Fisher-Rao inner product), a two-layer ReLU
network (path-norm), convolutions against their dense matrices, a hand-built margin."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharpfast.study import measures as M
from sharpfast.study.measures import pacbayes as P
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
    # the margin: the (m // 10)-th smallest of f(x)_y - max_{j != y} f(x)_j, by sorting by hand
    out = model(x).detach()
    margins = sorted(float(out[i, y[i]] - max(out[i, j] for j in range(4) if j != y[i])) for i in range(40))
    gamma = margins[40 // 10 - 1]
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
                                         pytest.param(nn.Conv2d(16, 16, 3, padding=1), (1, 16, 20, 20),
                                                      marks=pytest.mark.slow)])   # power iteration
def test_convolutions_by_their_operator_norm(conv, shape):
    """Against the convolution's dense matrix on that input shape (zero padding, stride)."""
    w = conv.weight.detach().double()
    f = lambda v: F.conv2d(v, w, stride=conv.stride, padding=conv.padding)
    n = math.prod(shape)
    J = torch.autograd.functional.jacobian(f, torch.zeros(shape, dtype=torch.float64)).reshape(-1, n)
    assert M.operator_norm(conv, conv.weight, shape) == pytest.approx(float(torch.linalg.matrix_norm(J, 2)), rel=1e-6)


def test_spectral_measures_take_the_reshaped_kernel_as_the_authors_code_and_the_exact_ones_the_map():
    """Dziugaite et al.'s and Neyshabur et al.'s code take a convolution's ``||W||_2`` as the largest
    singular value of its kernel reshaped to ``[out, in * k * k]`` (of the BatchNorm-folded kernel); the
    ``-exact`` measures take the operator norm of the map it applies. Linear layers: both alike."""
    torch.manual_seed(0)
    model, init = zoo.cnn(8), zoo.cnn(8)
    model.train()
    with torch.no_grad():
        model(torch.rand(64, 1, 8, 8))   # running statistics to fold
    model.eval()
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    ctx = M.Context(model, init, x, y)
    folded = [m.weight for _, m in ctx.layers]
    reshaped = [float(torch.linalg.matrix_norm(w.detach().double().reshape(w.shape[0], -1), 2)) for w in folded]
    exact = [M.operator_norm(m, m.weight, ctx.shapes[n]) for n, m in ctx.layers]
    assert any(isinstance(m, nn.Conv2d) for _, m in ctx.layers)
    for (_, m), r, e in zip(ctx.layers, reshaped, exact):
        assert (r == pytest.approx(e, rel=1e-9)) == isinstance(m, nn.Linear)
    log_prod = lambda norms: sum(2 * math.log(v) for v in norms)
    assert M.MEASURES["prod-of-spec"](ctx) == pytest.approx(log_prod(reshaped), rel=1e-12)
    assert M.MEASURES["prod-of-spec-exact"](ctx) == pytest.approx(log_prod(exact), rel=1e-12)
    fro = [float(w.detach().double().norm()) for w in folded]
    assert M.MEASURES["fro/spec"](ctx) == pytest.approx(sum(f**2 / r**2 for f, r in zip(fro, reshaped)), rel=1e-12)
    dist = [float(torch.linalg.matrix_norm((w - m0.weight).detach().double().reshape(w.shape[0], -1), 2))
            for w, (_, m0) in zip(folded, M.layers(ctx.init))]
    assert M.MEASURES["spec-dist"](ctx) == pytest.approx(sum(v**2 for v in dist), rel=1e-12)
    spectral = [n for n in M.MEASURES if "spec" in n and not n.endswith("-exact") and "-exact/" not in n
                and not n.startswith(("spec-norm", "bound-"))]
    for name in spectral:   # every Jiang et al. spectral measure has its -exact twin
        twin = name.replace("/margin", "-exact/margin") if name.endswith("/margin") else name + "-exact"
        assert twin in M.MEASURES, name


@pytest.mark.parametrize("mode", ["circular", "reflect", "replicate", "zeros"])
@pytest.mark.parametrize("shape", [(1, 2, 6, 6), (1, 2, 48, 48)])   # dense matrix, and Lanczos above 4096 inputs
def test_convolutions_by_the_operator_norm_of_their_padding_mode(mode, shape):
    """The map a convolution applies includes its padding mode: against the Jacobian of the layer
    itself (bias off), and for circular padding against the closed form of Sedghi et al. (2019): the
    largest singular value over frequencies of the kernel's 2-D DFT at the input's size."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode, bias=False).double()
    got = M.operator_norm(conv, conv.weight, shape)
    if mode == "circular":
        dft = torch.fft.fft2(conv.weight.detach(), s=shape[2:]).permute(2, 3, 0, 1)   # [h, w, out, in]
        assert got == pytest.approx(float(torch.linalg.matrix_norm(dft, 2).max()), rel=1e-9)
        if shape[2] == 6:
            assert got == pytest.approx(1.24761, abs=1e-5)   # not 1.14599, the zero-padded map's
    if shape[2] == 6:
        J = torch.autograd.functional.jacobian(conv, torch.zeros(shape, dtype=torch.float64)).reshape(-1, math.prod(shape))
        assert got == pytest.approx(float(torch.linalg.matrix_norm(J, 2)), rel=1e-10)


def test_the_margin_is_the_kth_smallest_as_the_authors_code_takes_it():
    """Margins 1..25 (a linear model on one-hot inputs): Jiang et al.'s measures as Dziugaite et al.'s
    code computes them take the (25 // 10) = 2nd smallest, 2; Neyshabur et al.'s bounds the 5th
    percentile, 1 + 0.05 * 24 = 2.2 by linear interpolation."""
    n = 25
    model = nn.Linear(n, 2, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0] = torch.arange(1, n + 1, dtype=torch.float64).flip(0)   # class 0 logit = margin
    x, y = torch.eye(n, dtype=torch.float64), torch.zeros(n, dtype=torch.long)
    assert M.margin(model, x, y) == 2.0
    assert M.margin(model, x, y, "percentile5") == pytest.approx(2.2, abs=1e-12)
    assert M.measure("1/margin", model, x, y) == pytest.approx(1 / 4, abs=1e-15)
    small = M.margin(model, x[:7], y[:7])   # fewer than 10 examples: the smallest
    assert small == float(M.margins(model, x[:7], y[:7]).min())
    with pytest.raises(ValueError, match="margin convention"):
        M.margin(model, x, y, "median")


def bn_network(bias=True, bn_after_relu=False):
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 4, 3, padding=1, bias=bias), nn.BatchNorm2d(4), nn.ReLU(),
              nn.Conv2d(4, 6, 3, padding=1, stride=2, bias=bias), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
              nn.Linear(96, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)]
    if bn_after_relu:
        layers[4], layers[5] = layers[5], layers[4]
    model = nn.Sequential(*layers).double()
    with torch.no_grad():   # trained-looking statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 2), m.bias.uniform_(-1, 1)
    return model


def by_hand_folded(model):
    """The same network without BatchNorm, its layers' weights and biases folded by hand."""
    plain, i = [], 0
    mods = list(model)
    while i < len(mods):
        m = mods[i]
        if isinstance(m, (nn.Conv2d, nn.Linear)) and i + 1 < len(mods) and isinstance(mods[i + 1], nn.BatchNorm2d
                                                                                      | nn.BatchNorm1d):
            bn = mods[i + 1]
            s = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach()
            new = type(m)(*( (m.in_channels, m.out_channels, m.kernel_size) if isinstance(m, nn.Conv2d)
                             else (m.in_features, m.out_features)),
                          **(dict(stride=m.stride, padding=m.padding) if isinstance(m, nn.Conv2d) else {})).double()
            with torch.no_grad():
                new.weight.copy_(m.weight * s.reshape(-1, *[1] * (m.weight.dim() - 1)))
                b = m.bias if m.bias is not None else torch.zeros_like(s)
                new.bias.copy_(s * (b - bn.running_mean) + bn.bias)
            plain.append(new)
            i += 2
        else:
            plain.append(m)
            i += 1
    return nn.Sequential(*plain).eval()


@pytest.mark.parametrize("bias", [True, False])
def test_batchnorm_is_folded_into_the_layer_before_it(bias):
    """Folded, a BatchNorm CNN is the network of its folded layers (built by hand here): every measure
    equals that network's; the folded copy computes the model's function; the model is untouched."""
    model = bn_network(bias=bias)
    x = torch.randn(64, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = M.batchnorm_folded(model, x)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    model.eval()
    assert torch.allclose(folded(x), model(x), rtol=1e-12, atol=1e-12)
    plain = by_hand_folded(model)
    y = model(x).argmax(1)
    for name in ("param-norm", "prod-of-spec", "prod-of-fro", "path-norm", "fro/spec", "l1,inf-norm/margin",
                 "trace-norm/margin", "l1-path-norm/margin", "num-params"):
        assert M.measure(name, model, x, y) == pytest.approx(M.measure(name, plain, x, y), rel=1e-12), name
    unfolded = M.measure("param-norm", model, x, y, fold_batchnorm=False)
    assert unfolded == pytest.approx(sum(float(m.weight.double().norm()) ** 2 for m in model
                                         if isinstance(m, (nn.Conv2d, nn.Linear))), rel=1e-12)
    assert abs(unfolded / M.measure("param-norm", model, x, y) - 1) > 0.1


def test_a_batchnorm_that_does_not_follow_a_layer_is_left_as_it_is():
    model = bn_network(bn_after_relu=True).eval()   # Conv -> ReLU -> BN: not a linear map's output
    x = torch.randn(16, 1, 8, 8, dtype=torch.float64)
    folded = M.batchnorm_folded(model, x)
    kinds = [type(m).__name__ for m in folded]
    assert kinds.count("BatchNorm2d") == 1 and kinds.count("BatchNorm1d") == 0
    assert torch.allclose(folded(x), model(x), rtol=1e-12, atol=1e-12)


# a Hadamard matrix: entries +-1, H H^T = 4 I, so every singular value is 2 and every row's l_p norm 4^(1/p)
H4 = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64)


def hadamard_net(a, b):
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Identity(), nn.Linear(4, 4, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(a * H4)
        model[2].weight.copy_(b * H4)
    return model


def test_neyshabur_norms_and_bounds_in_closed_form():
    """A linear network W2 W1, W1 = a H4, W2 = b H4, initialized at a0 H4, b0 H4. Per layer (scale s): ||W||_{1,inf} = 4s,
    ||W||_{3,1.5} = (4 (4^(1/3) s)^1.5)^(1/1.5) = 4s, ||W||_F = 4s, ||W||_2 = 2s, trace norm 8s,
    Schatten-1.5 (4 (2s)^1.5)^(1/1.5) = 4^(2/3) 2s; the l1 path-norm of |W| on ones is 1^T |W2| |W1| 1 =
    64ab; ||W - W0||_{2,1} = 4 * 2|s - s0| and ||W - W0||_F = 4|s - s0| with 4 output units."""
    a, b, a0, b0 = 1.5, 0.7, 0.4, 0.2
    model, init = hadamard_net(a, b), hadamard_net(a0, b0)
    x = torch.randn(200, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % 4
    margins = (model(x).detach().gather(1, y[:, None]).squeeze(1)
               - model(x).detach().scatter(1, y[:, None], -math.inf).max(1).values)
    gamma, m = float(torch.quantile(margins, 0.05)), 200
    value = lambda name: M.measure(name, model, x, y, init=init)
    assert value("num-params") == 32
    assert value("l1,inf-norm/margin") == pytest.approx(16 * a * b / gamma, rel=1e-12)
    assert value("l3,1.5-norm/margin") == pytest.approx(16 * a * b / gamma, rel=1e-12)
    assert value("fro-norm/margin") == pytest.approx(16 * a * b / gamma, rel=1e-12)
    assert value("spec-norm/margin") == pytest.approx(4 * a * b / gamma, rel=1e-12)
    assert value("trace-norm/margin") == pytest.approx(64 * a * b / gamma, rel=1e-12)
    assert value("schatten-1.5-norm/margin") == pytest.approx(4 ** (4 / 3) * 4 * a * b / gamma, rel=1e-12)
    assert value("l1-path-norm/margin") == pytest.approx(64 * a * b / gamma, rel=1e-12)
    # path-norms of order p: (1^T |W2|^p |W1|^p 1)^(1/p) = (64 a^p b^p)^(1/p)
    assert value("l2-path-norm/margin") == pytest.approx(8 * a * b / gamma, rel=1e-12)
    alpha = math.sqrt(2 + math.log(4))
    assert value("bound-l1,inf-bartlett-mendelson-2002") == pytest.approx(alpha * 16 * a * b / gamma / math.sqrt(m),
                                                                          rel=1e-12)
    assert value("bound-fro-neyshabur-2015") == pytest.approx(alpha * 16 * a * b / gamma / math.sqrt(m), rel=1e-12)
    assert value("bound-l3,1.5-neyshabur-2015") == pytest.approx(alpha * 16 * a * b / gamma / m ** (1 / 3), rel=1e-12)
    ratio_21 = ((8 * (a - a0) / (2 * a)) ** (2 / 3) + (8 * (b - b0) / (2 * b)) ** (2 / 3)) ** 1.5
    assert value("bound-spec-l2,1-bartlett-2017") == pytest.approx(
        math.log(m) * math.log(32) * 4 * a * b / gamma * ratio_21 / math.sqrt(m), rel=1e-12)
    ratio_fro = ((2 * 4 * (a - a0) / (2 * a)) ** 2 + (2 * 4 * (b - b0) / (2 * b)) ** 2) ** 0.5
    assert value("bound-spec-fro-neyshabur-2018") == pytest.approx(2 * 4 * a * b / gamma * ratio_fro / math.sqrt(m),
                                                                   rel=1e-12)
    with pytest.raises(ValueError, match="initial weights"):
        M.measure("bound-spec-fro-neyshabur-2018", model, x, y)
    # a product beyond float64 is an error, not an inf stored as a value
    # (layers of norm ~1e60 whose product maps everything to 0: the output is the last bias, margin 1)
    huge = nn.Sequential(*[nn.Linear(4, 4, bias=False) for _ in range(5)], nn.Linear(4, 4)).double()
    low, high = torch.diag(torch.tensor([1.0, 1, 0, 0], dtype=torch.float64)), torch.diag(
        torch.tensor([0.0, 0, 1, 1], dtype=torch.float64))
    with torch.no_grad():
        for i, layer in enumerate(huge):
            layer.weight.copy_(1e60 * (low if i == 0 else high))
        huge[-1].bias.copy_(torch.tensor([1.0, 0, 0, 0]))
    big_y = torch.zeros(len(x), dtype=torch.long)
    with pytest.raises(ValueError, match=r"the measure is e\^\d+, beyond float64"):
        M.measure("l1,inf-norm/margin", huge, x, big_y)


def test_every_measure_on_the_zoo_architectures():
    torch.manual_seed(0)
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    for make in (lambda: zoo.mlp(16), lambda: zoo.cnn(8), lambda: zoo.vit(16)):
        model, init = make(), make()
        for name in M.MEASURES:
            if name.endswith("margin") or name.startswith("bound-") or name.startswith(("spectral-init", "spectral-orig")) or name == "num-step-to-0.1-loss" or \
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
    assert len({d.key for d in defs}) == len(defs) == 34 and all(d.rho is None for d in defs)
    assert [d.measure for d in preset("neyshabur")] == list(M.NEYSHABUR)
    assert Definition("measure", measure="path-norm", n_iters=99).key == Definition("measure", measure="path-norm").key
    with pytest.raises(ValueError, match="measure must be one of"):
        Definition("measure", measure="vc-dim")


def trained_digits_mlp():
    from sharpfast.study.zoo import digits
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
    assert 0 < alpha < sigma < P.SEARCH_MAX   # the worst case of a box moves the error sooner than noise
    step = P.SEARCH_MAX / 2**P.SEARCH_STEPS
    for radius, worst in ((sigma, False), (alpha, True)):
        d = P._deviation(ctx, radius, worst, magnitude=False)
        near = abs(d - P.ACCURACY_DEVIATION) < P.DEVIATION_TOLERANCE
        assert near or (P._deviation(ctx, radius + step, worst, False) > P.ACCURACY_DEVIATION >= d)
    # a smaller radius moves it less (the searches are monotone where they look)
    assert P._deviation(ctx, sigma / 4, False, False) < P.ACCURACY_DEVIATION
    # the bounds count the layers' weights, biases left out (Dziugaite et al.'s code): omega = num-params
    weights = lambda net: [m.weight for m in net.modules() if isinstance(m, nn.Linear)]
    w = torch.cat([p.detach().double().reshape(-1) for p in weights(model)])
    w0 = torch.cat([p.detach().double().reshape(-1) for p in weights(init)])
    m, omega = len(y), w.numel()
    assert omega == M.MEASURES["num-params"](ctx) < sum(p.numel() for p in model.parameters())
    assert values["pacbayes-orig"] == pytest.approx(float(w @ w) / (4 * sigma**2) + math.log(m / sigma) + 10, rel=1e-12)
    assert values["pacbayes-init"] == pytest.approx(float((w - w0) @ (w - w0)) / (4 * sigma**2)
                                                    + math.log(m / sigma) + 10, rel=1e-12)
    assert values["1/sigma-pacbayes"] == pytest.approx(1 / sigma**2) and values["1/alpha-sharpness"] == 1 / alpha**2
    s_alpha = alpha / math.sqrt(2 * math.log(2 * omega))
    assert values["sharpness-orig"] == pytest.approx(float(w @ w) * math.log(2 * omega) / (4 * alpha**2)
                                                     + math.log(m / s_alpha) + 10, rel=1e-12)
    # bound_parameters="all": every parameter, at the same radius
    every = M.Context(model, init, x, y, bound_parameters="all")
    every._cache.update({k: v for k, v in ctx._cache.items() if k[0] == "radius"})
    w_all = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    assert M.MEASURES["pacbayes-orig"](every) == pytest.approx(float(w_all @ w_all) / (4 * sigma**2)
                                                               + math.log(m / sigma) + 10, rel=1e-12)
    with pytest.raises(ValueError, match="bound_parameters must be one of"):
        M.Context(model, init, x, y, bound_parameters="biases")
    # the sharpness search's deviation is the worst case the sharpness function reports
    r = sharpfast.worst_case_sharpness(model, [(x, y)], rho=alpha, norm="linf", adaptive=False, n_iters=P.ASCENT_STEPS)
    assert P._deviation(ctx, alpha, True, False) == abs(r.err_sharpness)
